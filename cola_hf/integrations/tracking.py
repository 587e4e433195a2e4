"""Weights & Biases tracking: what the Trainer's own `WandbCallback` leaves out.

The callback logs every argument (`args.to_dict()`), the model's config and parameter count, the training loss
and learning rate every `logging_steps` and the validation metrics every epoch, all against
`train/global_step`. This module adds, around it:

- the decision online / offline / off, made before anything can hang: no API key or no reachable server
  means W&B's own offline mode, announced in one line with the `wandb sync` command for later;
- a run opened by us before training, so the callback logs into a run with a readable name, a group, tags,
  a job type and provenance the callback doesn't know (data hashes, git commit, library versions);
- after the run's local outputs exist: test metrics in the summary, tables and charts, optionally the model;
- a guard so that W&B failing mid-run stops the uploads, never the training or the local outputs.

The run calls `start_run(trainer, ...)` after building the Trainer and `log_run_outputs(...)` after
the run wrote results.json. Both do nothing unless `--report_to` includes wandb, and only the main
process talks to W&B.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.integrations import WandbCallback

from cola_hf.config import model_short_name
from cola_hf.errors import StoppedBySignal, one_line
from cola_hf.predictions_tsv import predictions_file, read_predictions
from cola_hf.redaction import redact_options
from cola_hf.results import EPOCH_COLUMNS, TEST_SPLITS
from cola_hf.run_files import EXPLANATIONS_HTML, MODEL_CARD, MODEL_FILES
from cola_hf.run_files import WANDB_RUN_ID as RUN_ID_FILE

if TYPE_CHECKING:
    from types import ModuleType

    import pandas as pd
    from transformers import Trainer

    from cola_hf.config import RunOptions
    from cola_hf.results import RunResults

PROJECT = "cola-hf"
TRACKED_PACKAGES = ("torch", "transformers", "datasets", "evaluate", "accelerate", "wandb", "cola-hf")
TEST_METRICS = ("matthews_correlation", "accuracy", "positive_ratio", "n")
SERVER_TIMEOUT_S = 3.0
# wandb waits 90 s by default for a server it cannot reach; after our reachability probe passed, a
# shorter wait still covers a slow server without stalling a run that lost its network.
INIT_TIMEOUT_S = 30.0


# --- online, offline or off ------------------------------------------------------------------------------------
def server_reachable(url: str, timeout: float = SERVER_TIMEOUT_S) -> bool:
    """Any HTTP answer, even an error status, means the server is there; no answer in `timeout` means not."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, timeouts and refused connections are all OSErrors
        return False
    return True


def resolve_wandb_mode() -> tuple[str, str | None]:
    """Return (mode, reason): mode is 'online', 'offline' or 'disabled'; reason says why we went offline.

    An explicit WANDB_MODE wins. Otherwise online needs credentials (WANDB_API_KEY, `wandb login`'s
    netrc, an identity token) and a server that answers within a few seconds; anything else is offline.
    The probe runs once per process: the runs of a seed study or a grid share it, and one notice.
    """
    global _probed
    explicit = os.environ.get("WANDB_MODE", "").lower()
    if explicit in ("offline", "dryrun"):
        return "offline", None
    if explicit == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", None
    if _probed is None:
        _probed = _probe_wandb()
    return _probed


def _probe_wandb() -> tuple[str, str | None]:
    import wandb

    base_url = wandb.setup().settings.base_url  # the settings wandb.init will use: WANDB_BASE_URL, files
    # prompt=False: never wait for a key to be typed in; verify=False: no network needed to look.
    if not wandb.login(prompt=False, verify=False):
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    if not server_reachable(base_url):
        return "offline", f"W&B server {base_url} not reachable"
    return "online", None


_probed: tuple[str, str | None] | None = None
_announced = False


def _announce_offline(reason: str, run: Any) -> None:
    global _announced
    if _announced:  # one line per process; wandb itself prints each offline run's sync command at its end
        return
    _announced = True
    print(f"W&B: {reason}, so this run is logged offline; upload it later with: wandb sync {run.settings.sync_dir}")


# --- the run -------------------------------------------------------------------------------------------------
PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(directory: Path = PACKAGE_DIR) -> dict[str, Any]:
    """The commit of the cola_hf package (not of the current directory), and whether it has local edits."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:  # installed from a wheel: no repository to ask
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def provenance(options: RunOptions, data_sha256: dict[str, str]) -> dict[str, Any]:
    """What the callback's config (every TrainingArguments field) lacks: our other options and reproducibility.

    Masked like every record of the options (cola_hf/redaction.py): `wandb sync` uploads it."""
    code = git_commit()
    return redact_options(
        {
            **options.values(),
            "recipe": options.recipe,
            "model/name": options.model.model_name_or_path,
            "data/source": options.data.cola_source,
            "data/sha256": data_sha256,
            "code/git_commit": code["commit"],
            "code/git_dirty": code["dirty"],
            "versions": package_versions(),
        }
    )


def start_run(trainer: Trainer, options: RunOptions, data_sha256: dict[str, str]) -> Any | None:
    """Open the W&B run for this Trainer before it trains or evaluates; None when tracking is off.

    The Trainer's WandbCallback reuses an open run (it only calls wandb.init when `wandb.run` is None), so
    its per-step and per-epoch logs land in this run, under our name, group, tags and config.
    """
    args = trainer.args
    if "wandb" not in args.report_to or not trainer.is_world_process_zero():
        return None
    mode, reason = resolve_wandb_mode()
    if mode == "disabled":
        return None
    import wandb

    callback = guard_wandb_callback(trainer)
    init = {
        "project": options.tracking.wandb_project or os.environ.get("WANDB_PROJECT") or PROJECT,
        "name": options.run_name(),
        "group": options.tracking.experiment_name,
        # W&B caps a tag at 64 characters.
        "tags": [
            tag[:64]
            for tag in (f"model:{model_short_name(options.model.model_name_or_path)}", f"recipe:{options.recipe}")
        ],
        "job_type": "train" if args.do_train else "eval",
        "config": provenance(options, data_sha256),
        # Next to the run's other outputs, unless the user chose a place with WANDB_DIR.
        "dir": os.environ.get("WANDB_DIR") or args.output_dir,
        # The same W&B run for every start of the same unfinished run (preempted, then resumed): one curve.
        "id": stable_run_id(args.output_dir, fresh=not args.resume and args.overwrite_output_dir),
        "resume": "allow",
    }
    Path(init["dir"]).mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S), **init)
    except Exception as err:  # wandb raises its own CommError, UsageError, AuthenticationError...
        run = None
        if mode == "online":
            # The server passed the probe and still failed (a rejected key, say): offline keeps it all for later.
            global _probed
            mode, reason = _probed = ("offline", f"W&B server failed ({one_line(err)})")
            try:
                run = wandb.init(mode=mode, **init)
            except Exception as offline_err:
                err = offline_err
        if run is None:
            trainer.pop_callback(GuardedWandbCallback)  # nothing to log into: the Trainer must not try either
            _warn(f"W&B could not start ({one_line(err)}); this run is not tracked.")
            return None
    if reason is not None:
        _announce_offline(reason, run)
    # The callback's own set-up (arguments, model config, parameter count) now, not at the first training
    # step: an evaluation-only run never trains, and its config would stay empty.
    if callback is not None:
        callback.setup(args, trainer.state, trainer.model)
    return run


def stable_run_id(output_dir: str | Path, fresh: bool = False) -> str:
    """The W&B run id of the run in `output_dir`, kept in the directory so that a resumed run logs into it."""
    from wandb.sdk.lib.runid import generate_id

    path = Path(output_dir) / RUN_ID_FILE
    if not fresh and path.is_file() and (run_id := path.read_text(encoding="utf-8").strip()):
        return run_id
    run_id = generate_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def open_wandb() -> ModuleType | None:
    """The wandb module while a W&B run is open in this process, else None. A run without W&B never imported
    wandb, and need not now: importing it takes most of a second of every such run's end."""
    wandb = sys.modules.get("wandb")
    return wandb if wandb is not None and wandb.run is not None else None


def stop_run_preempted() -> None:
    """Mark the open W&B run as preempted (the run resumes later into the same W&B run) and close it."""
    wandb = open_wandb()
    if wandb is None:
        return
    try:
        wandb.run.mark_preempting()
        wandb.run.finish(exit_code=StoppedBySignal.exit_code)
    except Exception as err:  # W&B failing must not hide the stop
        _warn(f"W&B: could not mark the run preempted ({one_line(err)})")


# --- after the run -------------------------------------------------------------------------------------------
def log_run_outputs(
    output_dir: str | Path,
    results: RunResults,
    log_model: bool = False,
    tables: dict[str, pd.DataFrame] | None = None,
    summary: dict[str, float] | None = None,
) -> None:
    """Upload what the run wrote, then finish the W&B run: summary, tables, charts and (optionally) the model.

    `tables` (the analysis's, say) go up as `analysis/<name>` W&B tables; `summary` (BLiMP's figures, say) joins
    the test metrics in the run's summary.
    Each upload is tried on its own: whatever fails is named in one message, the rest still goes up, and the
    local outputs (already complete when this is called) are never touched.
    """
    wandb = open_wandb()
    if wandb is None:
        return
    run = wandb.run
    output_dir = Path(output_dir)
    failed: list[str] = []

    def attempt(what: str, upload: Any) -> None:
        try:
            upload()
        except Exception as err:  # W&B failing must cost the uploads only
            failed.append(f"{what} ({one_line(err)})")

    for split, metrics in results.test.items():
        values = {f"test/{split}/{name}": getattr(metrics, name) for name in TEST_METRICS}
        attempt(
            f"test metrics of {split}",
            functools.partial(run.summary.update, {key: value for key, value in values.items() if value is not None}),
        )
    if summary:
        attempt("summary metrics", functools.partial(run.summary.update, summary))
    media: dict[str, Any] = {}
    attempt("training_stats table", lambda: media.update(_epoch_table(results)))
    for png in sorted(output_dir.glob("*.png")):
        attempt(png.name, lambda png=png: media.__setitem__(f"charts/{png.stem}", wandb.Image(str(png))))
    page = output_dir / EXPLANATIONS_HTML
    if page.is_file():
        # inject=False: W&B would add a stylesheet link to its site, and the page is meant to need no network.
        html = functools.partial(wandb.Html, page.read_text(encoding="utf-8"), inject=False, data_is_not_path=True)
        attempt(page.name, lambda: media.__setitem__("explanations", html()))
    for split in ("validation", *TEST_SPLITS):  # CoLA's predictions files (BLiMP's has no sentences)
        predictions = predictions_file(output_dir, split)
        if not predictions.is_file():
            continue
        attempt(
            f"misclassified sentences of {split}",
            lambda split=split, tsv=predictions: media.__setitem__(f"misclassified/{split}", _misclassified_table(tsv)),
        )
    if tables:
        for name, frame in tables.items():
            attempt(
                f"analysis table {name}",
                lambda name=name, frame=frame: media.__setitem__(f"analysis/{name}", wandb.Table(dataframe=frame)),
            )
    if media:
        attempt("tables and charts", functools.partial(run.log, media))
    # Not WANDB_LOG_MODEL=end: the callback uploads at the end of training, before the test sets are scored and
    # the model card written, and adds an untrained "base_model" artifact; this one is the finished directory.
    if log_model:
        attempt("model artifact", functools.partial(_log_model_artifact, run, output_dir, results))
    attempt("the end of the run", run.finish)
    if failed:
        _warn(f"W&B: not uploaded: {'; '.join(failed)}. Local outputs in {output_dir} are complete.")


def _epoch_table(results: RunResults) -> dict[str, Any]:
    import wandb

    rows = results.to_dict()["epochs"]
    if not rows:  # evaluation-only runs have no epochs
        return {}
    # The tutorial's columns in its order (as in training_stats.csv), then whatever else a row holds.
    columns = list(dict.fromkeys([*EPOCH_COLUMNS, *(key for row in rows for key in row)]))
    return {"training_stats": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])}


def _misclassified_table(predictions_tsv: Path) -> Any:
    import wandb

    frame = read_predictions(predictions_tsv).frame()
    wrong = frame[frame["label"] != frame["prediction"]]
    return wandb.Table(dataframe=wrong[["sentence_source", "sentence", "label", "prob_acceptable"]])


def _log_model_artifact(run: Any, output_dir: Path, results: RunResults) -> None:
    import wandb

    patterns = (*MODEL_FILES, MODEL_CARD)  # the model and its card
    files = sorted({path for pattern in patterns for path in output_dir.glob(pattern) if path.is_file()})
    if not any(path.suffix == ".safetensors" for path in files):
        raise FileNotFoundError(f"no saved model (*.safetensors) in {output_dir}")
    metadata = {f"test/{split}/matthews_correlation": mcc for split, mcc in results.test_mccs().items()}
    artifact = wandb.Artifact(name=re.sub(r"[^\w.-]", "_", f"model-{run.name}"), type="model", metadata=metadata)
    for path in files:
        artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=["final_model"])


# --- W&B failing mid-run -------------------------------------------------------------------------------------
def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _guarded(hook: Any) -> Any:
    @functools.wraps(hook)
    def guarded(self: GuardedWandbCallback, *args: Any, **kwargs: Any) -> Any:
        if self._wandb is None:
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception as err:
            # `_wandb = None` is the callback's own off switch: every hook returns early from now on.
            self._wandb = None
            _warn(
                f"W&B failed during training ({one_line(err)}); training goes on "
                "without uploads, and every local output is still written."
            )
            return None

    return guarded


class GuardedWandbCallback(WandbCallback):
    """The Trainer's WandbCallback, except that a W&B error stops the uploads instead of the training."""

    setup = _guarded(WandbCallback.setup)
    on_train_begin = _guarded(WandbCallback.on_train_begin)
    on_train_end = _guarded(WandbCallback.on_train_end)
    on_log = _guarded(WandbCallback.on_log)
    on_save = _guarded(WandbCallback.on_save)

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any, **kwargs: Any) -> None:
        # The parent logs every predict() as `test/<metric>`: three test sets would overwrite each other
        # there. log_run_outputs puts each one under its own name, `test/<split>/<metric>`, instead.
        return None


def guard_wandb_callback(trainer: Trainer) -> GuardedWandbCallback | None:
    """Swap the WandbCallback that `report_to` installed for the guarded one (same logging, same settings)."""
    if trainer.pop_callback(WandbCallback) is None:
        return None
    callback = GuardedWandbCallback()
    trainer.add_callback(callback)
    return callback
