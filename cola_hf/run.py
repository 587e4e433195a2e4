"""One CoLA run, start to finish: the code behind `experiments/cola.py`, `cola-train` and `cola_hf.train()`.

    options -> data -> model and Trainer -> train -> test sets -> reports, analysis, card, results.json -> W&B, Hub

`main(argv)` is the command line (one run, or a study of several); `train(...)` is the same for a notebook;
`run(options)` is one run, built from the small steps below it.
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from cola_hf import data, hub, reporting, study, tracking
from cola_hf.analysis import analyze_run, phenomena_markdown
from cola_hf.config import RunOptions, make_parser, parse_args
from cola_hf.errors import HubPushError, RunFailed, StoppedBySignal, UsageError
from cola_hf.output_dir import hold_output_dir, prepare_output_dir
from cola_hf.phenomena import load_annotations
from cola_hf.preemption import SigtermLatch, catching_sigterm
from cola_hf.results import RunResults
from cola_hf.trainer import TutorialTrainer, build_trainer, load_model_and_tokenizer, predict_split

logger = logging.getLogger("cola")

__all__ = ["main", "make_parser", "run", "train"]


def run(options: RunOptions, tokenized_files: datasets.DatasetDict | None = None) -> RunResults | None:
    """Train (unless --do_train False), test, and write every output; the results on the main process, else None.

    `tokenized_files` (read_cola's files after tokenize_cola) lets a study tokenize once for all its runs.
    SIGTERM saves a checkpoint and raises `StoppedBySignal`; the same call again continues the run.
    """
    with (
        hold_output_dir(options.training.output_dir, main_process=options.training.process_index == 0),
        catching_sigterm() as sigterm,  # from the start: a signal while the data or model load stops it too
    ):
        return _run(options, tokenized_files, sigterm)


def _run(options: RunOptions, tokenized_files: datasets.DatasetDict | None, sigterm: SigtermLatch) -> RunResults | None:
    args = options.training
    checkpoint = prepare_output_dir(args.output_dir, args, options.trajectory())
    annotations = check_annotations(options)
    if args.do_train:
        logger.info(args.batch_layout())  # world size x per-device batch x accumulation = global

    # --- data, model, Trainer ---
    # Bad data fails before the model loads.
    raw_files = data.read_cola(options.data.cola_source) if tokenized_files is None else None
    model, tokenizer = load_model(options)
    files = tokenized_files
    if files is None:
        with args.main_process_first(desc="tokenizing"):
            files = tokenize_files(options, raw_files, tokenizer)
    tokenized = split_data(options, files)
    trainer = build_trainer(options, tokenized, model, tokenizer)
    tracking.start_run(trainer, options, data.file_hashes(files))  # before training: the callback logs into it

    trainer.stop_on_signal.watch(sigterm)  # SIGTERM from now on: a checkpoint at the next step, then a stop
    try:
        # --- train ---
        if args.do_train:
            trainer.train(resume_from_checkpoint=checkpoint)
            trainer.save_model()
            trainer.save_state()
        # --- test sets and validation predictions ---
        predictions = predict_splits(trainer, tokenized)
    except StoppedBySignal:
        tracking.stop_run_preempted()
        raise
    # --- reports, sharing ---
    return finish_run(trainer, options, tokenized, predictions, annotations)


def predict_splits(
    trainer: TutorialTrainer, tokenized: datasets.DatasetDict
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(labels, probability of 'acceptable') of every sentence of the test sets and of the validation split (whose
    predictions choose the analysis's decision threshold), in order."""
    predictions = {split: predict_split(trainer, tokenized[split]) for split in data.TEST_SPLITS}
    return {**predictions, "validation": trainer.validation_predictions(tokenized["validation"])}


def check_annotations(options: RunOptions) -> str | None:
    """The phenomena annotations' source; a local one is read now, so a wrong path fails before training."""
    source = options.data.annotations_source
    if source is None or source.lower() == "none":
        return None
    if not data.is_url(source):
        load_annotations(source, options.data.minor_features, options.model.cache_dir)
    return source


def load_model(options: RunOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The checkpoint, its new classifier head drawn from the run's seed: a search trial and a run of its recipe
    with the same seed start from the same weights."""
    set_seed(options.training.seed)
    return load_model_and_tokenizer(
        options.model.model_name_or_path, options.model.cache_dir, options.model.trust_remote_code
    )


def tokenize_files(options: RunOptions, files: datasets.DatasetDict, tokenizer: Any) -> datasets.DatasetDict:
    return data.tokenize_cola(files, tokenizer, options.data.max_seq_length, options.data.pad_to_max_length)


def split_data(options: RunOptions, files: datasets.DatasetDict) -> datasets.DatasetDict:
    """The run's splits (train/validation by its seed, and the test sets), with --max_train_samples applied."""
    tokenized = data.split_cola(files, options.data.validation_fraction, options.training.seed)
    if (limit := options.data.max_train_samples) is not None:
        tokenized["train"] = tokenized["train"].select(range(min(limit, len(tokenized["train"]))))
    logger.info("CoLA splits: %s", {split: len(rows) for split, rows in tokenized.items()})
    return tokenized


def finish_run(
    trainer: TutorialTrainer,
    options: RunOptions,
    tokenized: datasets.DatasetDict,
    predictions: dict[str, tuple[np.ndarray, np.ndarray]],
    annotations_source: str | None,
) -> RunResults | None:
    """Write the reports, the analysis, the card and results.json from the predictions; push last."""
    if not trainer.is_world_process_zero():
        return None
    output_dir = Path(options.training.output_dir)
    epochs = reporting.epoch_table(trainer.state.log_history)
    if epochs:
        reporting.write_epoch_outputs(output_dir, epochs)
    results = RunResults(
        epochs=epochs,
        test={
            split: reporting.report_test_split(output_dir, split, tokenized[split], *predictions[split])
            for split in data.TEST_SPLITS
        },
        config=options.config(),
    )
    labels, probabilities = predictions["validation"]
    reporting.write_predictions(
        output_dir / "predictions_validation.tsv",
        tokenized["validation"],
        (probabilities > 0.5).astype(int),
        probabilities,
    )
    logger.info("Test sets:\n%s", reporting.format_test_summary(results.test))
    analysis = analyze_run(
        output_dir, annotations_source, minor_features=options.data.minor_features, cache_dir=options.model.cache_dir
    )
    hub.write_model_card(
        output_dir,
        results,
        options.model.model_name_or_path,
        shlex.join(["python", *sys.argv]),
        options.training.hub_model_id,
        base_model=options.model.base_model,
        phenomena=phenomena_markdown(analysis),
    )
    reporting.write_results(output_dir, results)  # last: its presence means "finished"
    tracking.log_run_outputs(output_dir, results, log_model=options.tracking.log_model, analysis=analysis)
    if options.training.push_to_hub:
        hub.push_trainer_output(trainer)  # after results.json: a failed upload leaves a finished local run
    return results


# --- the command line and the notebook call ---------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python experiments/cola.py [RECIPE.yaml] [--flags]`: exit 0, 1 (the run failed) or 2 (bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    options = None
    try:
        options = parse_args(argv)
        configure_logging(options)
        hub.prepare_push(options.training)  # fails in one line before any work: no token, offline, bad repo id
        study.run_study(run, options)  # one run, --seeds or --grid
        return 0
    except HubPushError as err:  # the local run is complete: no RUN_FAILED marker
        print(f"cola: error: {err}", file=sys.stderr)
        return err.exit_code
    except StoppedBySignal as err:  # not a failure: the checkpoint is complete, the same command continues
        if options is None or options.training.process_index == 0:  # one line for the run, not one per process
            print(f"cola: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except (UsageError, RunFailed) as err:
        if debug:
            raise
        args = options.training if options is not None else None
        if args is not None and args.should_save and Path(args.output_dir).is_dir():
            reporting.mark_failed(args.output_dir, str(err))
        print(f"cola: error: {err}", file=sys.stderr)
        return err.exit_code


def train(recipe: str | Path | None = None, **options: Any) -> RunResults | None:
    """Run from Python (a notebook, say) with the command line's options, e.g.

        results = train("experiments/recipes/tutorial.yaml", num_train_epochs=2, output_dir="outputs/ep2")
        results.test["out_of_domain_dev"].matthews_correlation

    Keyword arguments are the command line's flags (lists for options that take several values), parsed and
    checked the same way; bad ones raise `UsageError`. Returns the run's results (None on processes other
    than the main one); with `seeds` or `grid`, the study's summary instead.
    """
    argv = [str(recipe)] if recipe is not None else []
    for name, value in options.items():
        values = value if isinstance(value, list | tuple) else [value]
        argv += [f"--{name}", *map(str, values)]
    parsed = parse_args(argv)
    configure_logging(parsed)
    hub.prepare_push(parsed.training)
    return study.run_study(run, parsed)


def configure_logging(options: RunOptions) -> None:
    args = options.training
    # Our own progress lines on the main process; the libraries at the level TrainingArguments asks for.
    ours = logging.INFO if args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=ours, force=True)
    level = args.get_process_log_level()
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
