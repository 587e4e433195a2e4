"""Fine-tune a transformer on CoLA: the BERT tutorial's experiment on the Hugging Face stack.

    python experiments/cola.py [experiments/recipes/tutorial.yaml] [--flags]
    accelerate launch experiments/cola.py experiments/recipes/tutorial.yaml

Glue only: parse the recipe, build data, model and trainer, train, evaluate the test sets, report.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import datasets
import transformers
from transformers import DataCollatorWithPadding, set_seed
from transformers.trainer_utils import get_last_checkpoint

from cola_hf import data, hub, reporting, sweep, tracking
from cola_hf.config import ColaTrainingArguments, DataArguments, ModelArguments, TrackingArguments, parse_args
from cola_hf.errors import RunFailed, UsageError
from cola_hf.metrics import compute_metrics
from cola_hf.trainer import TutorialTrainer, load_model_and_tokenizer, predict_split

logger = logging.getLogger("cola")


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ColaTrainingArguments,
    tracking_args: TrackingArguments | None = None,
) -> dict:
    output_dir = Path(training_args.output_dir)
    checkpoint = prepare_output_dir(output_dir, training_args)
    set_seed(training_args.seed)
    if training_args.do_train:
        logger.info(training_args.batch_layout())  # world size x per-device batch x accumulation = global

    files = data.read_cola(data_args.cola_source)  # validated before the model loads: bad data fails fast
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, model_args.cache_dir, model_args.trust_remote_code
    )
    with training_args.main_process_first(desc="tokenizing"):
        files = data.tokenize_cola(files, tokenizer, data_args.max_seq_length, data_args.pad_to_max_length)
    tokenized = data.split_cola(files, data_args.validation_fraction, training_args.seed)
    if data_args.max_train_samples is not None:
        tokenized["train"] = tokenized["train"].select(range(min(data_args.max_train_samples, len(tokenized["train"]))))
    logger.info("CoLA splits: %s", {split: len(rows) for split, rows in tokenized.items()})

    trainer = TutorialTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"] if training_args.do_train else None,
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    tracking.start_run(trainer, model_args, data_args, tracking_args)  # before training: the callback logs into it
    if training_args.do_train:
        trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.save_state()

    test = {split: predict_split(trainer, tokenized[split]) for split in data.TEST_SPLITS}
    if not trainer.is_world_process_zero():
        return {}
    epochs = reporting.epoch_table(trainer.state.log_history)
    if epochs:
        reporting.write_epoch_outputs(output_dir, epochs)
    results = {
        "epochs": epochs,
        "test": {
            split: reporting.report_test_split(output_dir, split, tokenized[split], labels, probabilities)
            for split, (labels, probabilities) in test.items()
        },
        "config": {**asdict(model_args), **asdict(data_args), **training_args.to_dict()},
    }
    logger.info("Test sets:\n%s", reporting.format_test_summary(results["test"]))
    command = shlex.join(["python", *sys.argv])
    hub.write_model_card(
        output_dir,
        results,
        model_args.model_name_or_path,
        command,
        training_args.hub_model_id,
        base_model=model_args.base_model,
    )
    reporting.write_json(output_dir / "results.json", results)  # last: its presence means "finished"
    tracking.log_run_outputs(output_dir, results, log_model=bool(tracking_args and tracking_args.log_model))
    if training_args.push_to_hub:
        hub.push_trainer_output(trainer)  # after results.json: a failed upload leaves a finished local run
    return results


def prepare_output_dir(output_dir: Path, training_args: ColaTrainingArguments) -> str | None:
    """Refuse to clobber a finished run; return the checkpoint to resume from, if asked to."""
    finished = (output_dir / "results.json").exists()
    checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if training_args.resume:
        checkpoint = last_complete_checkpoint(output_dir, training_args.should_save) if checkpoint else None
        if checkpoint is None:
            raise UsageError(f"{output_dir}: --resume given, but it holds no complete checkpoint-* directory")
    elif finished and not training_args.overwrite_output_dir:
        raise UsageError(f"{output_dir}: holds a finished run; pass --overwrite_output_dir or another --output_dir")
    elif checkpoint is not None and training_args.do_train and not training_args.overwrite_output_dir:
        raise UsageError(
            f"{output_dir}: holds checkpoints of an unfinished run; pass --resume or --overwrite_output_dir"
        )
    if training_args.should_save:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("results.json", "README.md", reporting.FAILED_MARKER):
            (output_dir / stale).unlink(missing_ok=True)
    return checkpoint if training_args.resume else None


def last_complete_checkpoint(output_dir: Path, remove_incomplete: bool) -> str | None:
    """The newest checkpoint-N whose trainer_state.json (the Trainer writes it last) is whole, else None.

    A run killed while saving leaves a newer checkpoint without it, or with half of it. The Trainer deletes
    older checkpoints only once a new one is complete, so a complete one is still there. The incomplete ones
    are removed (by the main process), or checkpoint rotation would later keep them and delete the good one.
    """
    numbered = [
        (int(match[1]), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name))
    ]
    for _, path in sorted(numbered, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            logger.warning("%s is incomplete (the run stopped while saving it); resuming from an earlier one", path)
            if remove_incomplete:
                shutil.rmtree(path)
    return None


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv)
    argv = [arg for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--debug"]
    training_args = None
    try:
        model_args, data_args, training_args, tracking_args = parse_args(argv)
        tracking_args.recipe_name = tracking_args.recipe_name or tracking.recipe_from_argv(argv)
        configure_logging(training_args)
        hub.prepare_push(training_args)  # fails in one line before any work: no token, offline, bad repo id
        sweep.run_all(run, model_args, data_args, training_args, tracking_args)  # one run, --seeds or --grid
        return 0
    except hub.HubPushError as err:  # the local run is complete: no RUN_FAILED marker
        print(f"cola: error: {err}", file=sys.stderr)
        return err.exit_code
    except (UsageError, RunFailed) as err:
        if debug:
            raise
        if training_args is not None and training_args.should_save and Path(training_args.output_dir).is_dir():
            reporting.mark_failed(training_args.output_dir, str(err))
        print(f"cola: error: {err}", file=sys.stderr)
        return err.exit_code


def configure_logging(training_args: ColaTrainingArguments) -> None:
    # Our own progress lines on the main process; the libraries at the level TrainingArguments asks for.
    ours = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=ours, force=True)
    level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()


if __name__ == "__main__":
    sys.exit(main())
