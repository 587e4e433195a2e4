"""Sharing a run: the model card that makes an output directory a complete Hub model repository, and the push.

The Hub is optional at run time: nothing here is needed for a run to finish locally, and every failure to
reach the Hub becomes one line saying what was not uploaded.

The final commit is ours, after the card is in place (`push_trainer_output`); why: docs/architecture.md.
The token comes from `HF_TOKEN` or the saved login; `--hub_token` is refused, so it is never in argv or files.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import huggingface_hub
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.trainer_utils import HubStrategy

from cola_hf.config import options_with
from cola_hf.errors import HubPushError, UsageError, one_line
from cola_hf.file_io import write_text
from cola_hf.redaction import redact_text
from cola_hf.results import EPOCH_COLUMNS, RunResults, TestSetResults
from cola_hf.run_files import MODEL_CARD, PUBLISHED_FILES, RESULTS_FILE, card_entries

if TYPE_CHECKING:  # transformers' Trainer takes a second to import: the command's --help and bad input need none
    from transformers import Trainer, TrainingArguments

logger = logging.getLogger(__name__)

CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
DEFAULT_LICENSE = "apache-2.0"
DATASET_ID = "nyu-mll/glue"
DATASET_CONFIG = "cola"
# Our test sets -> (split named in the model-index, title). glue_dev is exactly the `validation` split of
# nyu-mll/glue's cola config; the two CoLA dev sets have no split of their own there, so they keep our names.
TEST_SETS = {
    "out_of_domain_dev": ("out_of_domain_dev", "CoLA out-of-domain dev"),
    "in_domain_dev": ("in_domain_dev", "CoLA in-domain dev"),
    "glue_dev": ("validation", "GLUE CoLA validation"),
}
EPOCH_TITLES = {
    "epoch": "Epoch",
    "training_loss": "Training loss",
    "valid_loss": "Validation loss",
    "valid_accuracy": "Validation accuracy",
    "valid_mcc": "Validation MCC",
    "training_time_s": "Training time (s)",
    "validation_time_s": "Validation time (s)",
}
# Top-level files only (a pattern like *.png would match inside checkpoint-*/ or wandb/ too), never a hidden one.
UNPUBLISHED = ("*/*", ".*")


# --- the model card --------------------------------------------------------------------------------------------
def build_model_card(
    output_dir: str | Path,
    results: RunResults,
    model_name_or_path: str,
    command: str,
    hub_model_id: str | None = None,
    *,
    base_model: str | None = None,
    license: str | None = None,
    phenomena: str = "",
    blimp: str = "",
    sections: Sequence[str] = (),
) -> ModelCard:
    """The card of a finished run: YAML metadata with a model-index of the three test sets, then the body.

    `results` is the run's results.json. `base_model` defaults to `model_name_or_path` when that is a Hub id
    (or a snapshot in the Hub cache); a local directory has no Hub id, so pass it when you know it.
    `license` defaults to the base model's, where its card is on disk, else apache-2.0. `phenomena` is the
    analysis's per-phenomenon table (markdown), left out when empty, and `blimp` BLiMP's (pair accuracy per
    phenomenon beside the published figures), likewise; `sections` are markdown sections appended after the body
    (a search's, say).
    """
    output_dir = Path(output_dir)
    charts, links = _card_files(output_dir)
    base_model = base_model or _hub_id_of(model_name_or_path)
    license = license or _license_of(model_name_or_path) or DEFAULT_LICENSE
    model_name = hub_model_id.split("/")[-1] if hub_model_id else output_dir.resolve().name
    eval_results = [
        EvalResult(
            task_type="text-classification",
            task_name="Text Classification",
            dataset_type=DATASET_ID,
            dataset_name=title,
            dataset_config=DATASET_CONFIG,
            dataset_split=hub_split,
            metric_type=metric,
            metric_name=metric_name,
            metric_value=getattr(results.test[split], metric),
        )
        for split, (hub_split, title) in TEST_SETS.items()
        for metric, metric_name in (("matthews_correlation", "MCC"), ("accuracy", "Accuracy"))
    ]
    card_data = ModelCardData(
        base_model=base_model,
        datasets=[DATASET_ID],
        eval_results=eval_results,
        language="en",
        library_name="transformers",
        license=license,
        metrics=["matthews_correlation", "accuracy"],
        model_name=model_name,
        pipeline_tag="text-classification",
        tags=["text-classification", "grammaticality", "cola", "glue", "generated_from_trainer"],
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        model_name=model_name,
        model_name_or_path=model_name_or_path,
        model_ref=hub_model_id or str(output_dir),
        test_rows=_test_rows(results.test),
        hyperparameters=_hyperparameters(results.config),
        epoch_header=[EPOCH_TITLES[column] for column in EPOCH_COLUMNS],
        epoch_rows=[[_format(column, getattr(row, column)) for column in EPOCH_COLUMNS] for row in results.epochs],
        kept_epoch=results.kept_epoch,
        epochs_trained=len(results.epochs),
        plots=charts,
        links=links,
        phenomena=phenomena,
        blimp=blimp,
        command=redact_text(command),
        versions=_versions(),
    )
    return ModelCard(redact_text("".join([str(card), *sections])))


def write_model_card(
    output_dir: str | Path,
    results: RunResults,
    model_name_or_path: str,
    command: str,
    hub_model_id: str | None = None,
    **card_options: Any,
) -> Path:
    """Build the card (see `build_model_card`) and write it as output_dir/README.md, atomically."""
    path = Path(output_dir) / MODEL_CARD
    card = build_model_card(output_dir, results, model_name_or_path, command, hub_model_id, **card_options)
    write_text(path, str(card))
    return path


def _hub_id_of(model_name_or_path: str) -> str | None:
    """The Hub id of a checkpoint given as an id or as a snapshot directory of the Hub cache, else None."""
    match = re.search(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]", model_name_or_path)
    if match:
        return f"{match[1]}/{match[2]}"
    if Path(model_name_or_path).expanduser().exists():
        return None
    try:
        validate_repo_id(model_name_or_path)
    except HFValidationError:
        return None
    return model_name_or_path


def _license_of(model_name_or_path: str) -> str | None:
    """The license in the base model's own card, if that card is on disk (a local checkpoint or the Hub cache)."""
    readme = Path(model_name_or_path).expanduser() / "README.md"
    if not readme.is_file():
        hub_id = _hub_id_of(model_name_or_path)
        # A cache lookup only: building a card never touches the network.
        cached = huggingface_hub.try_to_load_from_cache(hub_id, "README.md") if hub_id else None
        if not isinstance(cached, str):
            return None
        readme = Path(cached)
    try:
        license = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except (OSError, ValueError):
        return None
    return license if isinstance(license, str) else None


def _format(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column.endswith("_s"):
        return f"{value:.1f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _test_rows(test: Mapping[str, TestSetResults]) -> list[dict[str, str]]:
    return [
        {
            "title": f"{title} (`{split}`)",
            "n": str(test[split].n),
            "mcc": f"{test[split].matthews_correlation:.3f}",
            "accuracy": f"{test[split].accuracy:.3f}",
            "positive_ratio": f"{test[split].positive_ratio:.3f}",
        }
        for split, (_, title) in TEST_SETS.items()
    ]


def _hyperparameters(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    # The options config.py gives the role `card`, in its order: the settings that define the recipe.
    return [(f"`{name}`", f"`{config[name]}`") for name in options_with("card") if name in config]


def _card_files(output_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(title, relative file) of the charts the card shows and of the other files it links, among those the run
    wrote (the table in cola_hf/run_files.py says which); relative links render on the Hub and locally."""
    entries = card_entries(output_dir, parts=tuple(TEST_SETS), coming=[RESULTS_FILE])  # written last
    charts = [(title, file) for title, file in entries if file.endswith(".png")]
    return charts, [(title, file) for title, file in entries if not file.endswith(".png")]


def _versions() -> list[tuple[str, str]]:
    import datasets
    import torch
    import transformers

    return [
        ("cola-hf", _cola_hf_version()),
        ("transformers", transformers.__version__),
        ("torch", torch.__version__),
        ("datasets", datasets.__version__),
        ("huggingface_hub", huggingface_hub.__version__),
    ]


# --- the push --------------------------------------------------------------------------------------------------
def prepare_push(training_args: TrainingArguments) -> str | None:
    """Before any work: check the push flags, then create the repository, so a run that cannot push fails now.

    Returns the repository id (with the namespace the Hub resolved), or None without --push_to_hub and on
    processes other than the main one. The Trainer's own `init_hf_repo` then finds the repository in place.
    """
    # Refused with or without --push_to_hub: the Trainer pickles every argument into training_args.bin, and
    # W&B records the command line.
    if training_args.hub_token:
        raise UsageError(
            "--hub_token: pass the Hub token through the HF_TOKEN environment variable or `hf auth login`, "
            "not on the command line (it would end up in shell history and training_args.bin)"
        )
    if not training_args.push_to_hub or training_args.process_index != 0:
        return None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub")
    # Without --hub_model_id the Trainer names the repository after the output directory; so do we.
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"--hub_model_id {repo_id!r}: not a valid repository id (user/name)") from err
    if huggingface_hub.get_token() is None:
        raise UsageError("--push_to_hub: no Hub token found; set HF_TOKEN or run `hf auth login`")
    if training_args.hub_strategy != HubStrategy.END:
        raise UsageError(
            f"--hub_strategy {training_args.hub_strategy.value}: a run is published once, when it has finished, "
            "with its model card (checkpoints stay in --output_dir, and the same command resumes from them); "
            "leave --hub_strategy at 'end'"
        )
    try:
        return _api().create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True).repo_id
    except Exception as err:  # the network boundary: whatever failed, nothing was created
        raise HubPushError(f"cannot create the Hub repository {repo_id} ({redact_text(one_line(err))})") from err


def push_trainer_output(trainer: Trainer, commit_message: str = "End of training") -> str | None:
    """Upload the output directory, model card included, to the repository the Trainer created.

    Main process only (others return None). Call it last, once README.md and every other output is written.
    Returns the commit URL; raises `HubPushError` if the upload failed (the local outputs stay as they are).
    """
    if not trainer.is_world_process_zero():
        return None
    args = trainer.args
    if trainer.hub_model_id is None:
        raise ValueError("push_trainer_output: the Trainer was built without --push_to_hub")
    return push_output_dir(
        args.output_dir,
        trainer.hub_model_id,
        private=args.hub_private_repo,
        revision=args.hub_revision,
        commit_message=commit_message,
    )


def push_output_dir(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "End of training",
    allow_patterns: Sequence[str] = PUBLISHED_FILES,
) -> str:
    """Create the repository if needed and upload `output_dir` to it in one commit; return the commit URL.

    The token is whatever huggingface_hub finds (HF_TOKEN, then the saved login).
    """
    output_dir = Path(output_dir)
    if not (output_dir / MODEL_CARD).is_file():
        raise ValueError(f"{output_dir}: no README.md; write the model card (write_model_card) before pushing")
    api = _api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message=commit_message,
            revision=revision,
            allow_patterns=list(allow_patterns),
            ignore_patterns=list(UNPUBLISHED),
        )
    except Exception as err:  # the network boundary: any failure means the upload did not (fully) happen
        flags = [*_include_flags(allow_patterns), *_exclude_flags()]
        retry = shlex.join(["hf", "upload", repo_id, str(output_dir), *flags])
        raise HubPushError(
            f"{output_dir} was not uploaded to the Hub repository {repo_id} ({redact_text(one_line(err))}); "
            f"the local outputs are complete, retry with: {retry}"
        ) from err
    logger.info("Pushed %s to %s", output_dir, commit.commit_url)
    return commit.commit_url


def _api() -> HfApi:
    return HfApi(library_name="cola-hf", library_version=_cola_hf_version())


@functools.cache
def _cola_hf_version() -> str:
    # The installed distribution's (setup.cfg takes it from cola_hf.__version__): importing the package's root
    # from here would close an import cycle through `from cola_hf import train`.
    try:
        return importlib.metadata.version("cola-hf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _include_flags(patterns: Sequence[str]) -> list[str]:
    return [flag for pattern in patterns for flag in ("--include", pattern)]


def _exclude_flags() -> list[str]:
    return [flag for pattern in UNPUBLISHED for flag in ("--exclude", pattern)]
