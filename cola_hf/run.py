"""One CoLA run, as four phases that a run, a search trial and a search's best model compose:

    prepare   the data, the model and its Trainer (and the W&B run the Trainer logs into)
    fit       train, save the model and the Trainer's state
    evaluate  the test sets, the validation split's predictions (which choose the analysis's threshold), then
              BLiMP's minimal pairs
    finish    the tutorial's tables and plots, the analysis (CoLA's and BLiMP's), the model card, results.json
              (once, last: it marks the run finished), then W&B and the Hub

A run is all four, in its own output directory (`run`). A search trial is prepare (training and validation splits
only) + fit + finish without test sets; the search's best/ is prepare (from the best trial's model) + evaluate +
finish with the search's section (cola_hf/studies/search/).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers import TrainerCallback

from cola_hf.analysis import blimp_report, explanations
from cola_hf.analysis.run_analysis import ThresholdAnalysis, analyze_run, phenomena_markdown, wandb_tables
from cola_hf.analysis.tutorial_report import format_test_summary, report_test_split, write_epoch_outputs
from cola_hf.config import RunOptions
from cola_hf.data import blimp_pairs, cola
from cola_hf.data.annotations import load_annotations
from cola_hf.data.sources import is_url
from cola_hf.errors import StoppedBySignal, UsageError
from cola_hf.integrations import hub, tracking
from cola_hf.predictions_tsv import predictions_file, write_predictions
from cola_hf.redaction import redact_argv
from cola_hf.results import TEST_SPLITS, RunResults
from cola_hf.training import attributions
from cola_hf.training.best_epoch import kept_epoch
from cola_hf.training.layers import reinit_top_layers
from cola_hf.training.model import load_model
from cola_hf.training.output_dir import check_shared_output_dir, hold_output_dir, prepare_output_dir
from cola_hf.training.preemption import catching_sigterm
from cola_hf.training.scoring import score_on_every_process
from cola_hf.training.trainer import TutorialTrainer, build_trainer, epoch_table, predict_split

logger = logging.getLogger("cola")

# What a run predicts: every sentence of each test set and of the validation split, as (labels, P(acceptable)).
Predictions = dict[str, tuple[np.ndarray, np.ndarray]]
# Tokenized CoLA files by what tokenizing depends on (RunOptions.tokenization_key): the runs of a study share them.
FilesCache = dict[tuple, datasets.DatasetDict]


@dataclass
class PreparedRun:
    """A run ready to fit or evaluate: its options, its splits and its Trainer."""

    options: RunOptions
    trainer: TutorialTrainer
    splits: datasets.DatasetDict
    data_sha256: dict[str, str]  # of the raw CoLA files, for W&B's provenance
    annotations_source: str | None  # checked: a local source was readable
    data_s: float  # reading and tokenizing CoLA (0 when a study's cache had them)
    blimp_source: str | None = None  # checked likewise; None: no BLiMP (`none`, or a trial)
    blimp_pairs: datasets.Dataset | None = None  # read by score_blimp, for the explanations' sample

    @property
    def output_dir(self) -> Path:
        return Path(self.options.training.output_dir)


@dataclass
class Evaluation:
    """What evaluate predicted: CoLA's test sets and validation split, and BLiMP's pairs (None when BLiMP was not
    at hand, and on every process but the main one)."""

    predictions: Predictions
    blimp: blimp_report.BlimpPredictions | None = None
    explanations: explanations.Explanations | None = None


def run(options: RunOptions, files_cache: FilesCache | None = None) -> RunResults | None:
    """Train (unless --do_train False), test, and write every output; the results on the main process, else None.

    SIGTERM saves a checkpoint and raises `StoppedBySignal`; the same call again continues the run.
    """
    args = options.training
    with (
        hold_output_dir(args.output_dir, main_process=args.process_index == 0),
        # From the start: a signal while the data or model load stops it too.
        catching_sigterm(args.output_dir if args.world_size > 1 else None) as sigterm,
    ):
        check_shared_output_dir(args.output_dir, args)
        checkpoint = prepare_output_dir(args.output_dir, args, options.trajectory())
        prepared = prepare(options, files_cache)
        prepared.trainer.stop_on_signal.watch(sigterm)  # from now on: a checkpoint at the next step, then a stop
        try:
            fit(prepared, checkpoint)
            evaluation = evaluate(prepared)
        except StoppedBySignal:
            tracking.stop_run_preempted()
            raise
        return finish(prepared, evaluation)


# --- the phases ------------------------------------------------------------------------------------------------
def prepare(
    options: RunOptions,
    files_cache: FilesCache | None = None,
    *,
    model_dir: str | None = None,
    test_sets: bool = True,
    callbacks: Sequence[TrainerCallback] = (),
) -> PreparedRun:
    """Read and tokenize CoLA, load the model (from `model_dir` instead of the options' checkpoint, if given) and
    build its Trainer; without `test_sets` the Trainer gets the training and validation splits only."""
    args = options.training
    annotations_source = check_annotations(options) if test_sets else None
    blimp_source = check_blimp_source(options) if test_sets else None
    if args.do_train:
        logger.info(args.batch_layout())  # world size x per-device batch x accumulation = global
    files_cache = {} if files_cache is None else files_cache
    key = options.tokenization_key()
    cached = key in files_cache
    started = time.perf_counter()
    raw_files = None if cached else cola.read_cola(options.data.cola_source)  # bad data fails before the model loads
    data_s = time.perf_counter() - started
    model, tokenizer = load_model(
        model_dir or options.model.model_name_or_path,
        args.seed,
        options.model.cache_dir,
        options.model.trust_remote_code,
    )
    check_range_for_model(options, model)
    if model_dir is None and args.do_train and args.reinit_top_layers:
        logger.info(
            "Re-initialised from seed %d: %s",
            args.seed,
            ", ".join(reinit_top_layers(model, args.reinit_top_layers, args.seed)),
        )
    if not cached:
        started = time.perf_counter()
        with args.main_process_first(desc="tokenizing"):
            files_cache[key] = tokenize_files(options, raw_files, tokenizer)
        data_s += time.perf_counter() - started
    files = files_cache[key]
    splits = split_data(options, files)
    if not test_sets:  # a trial's Trainer cannot score a test set: it never sees one
        splits = datasets.DatasetDict(train=splits["train"], validation=splits["validation"])
    trainer = build_trainer(options, splits, model, tokenizer, callbacks=callbacks)
    data_sha256 = cola.file_hashes(files)
    tracking.start_run(trainer, options, data_sha256)  # before training: the callback logs into it
    return PreparedRun(options, trainer, splits, data_sha256, annotations_source, data_s, blimp_source)


def fit(prepared: PreparedRun, checkpoint: str | None = None, *, save_model: bool = True) -> None:
    """Train (from `checkpoint`, if given), save the model (unless told not to: a trial keeps only its best) and
    the Trainer's state (trainer_state.json: the log history); nothing with --do_train False."""
    if not prepared.options.training.do_train:
        return
    trainer = prepared.trainer
    trainer.train(resume_from_checkpoint=checkpoint)
    if save_model:
        trainer.save_model()
    trainer.save_state()


def evaluate(prepared: PreparedRun) -> Evaluation:
    """(labels, probability of 'acceptable') of every sentence of the test sets and of the validation split (whose
    predictions choose the analysis's decision threshold), in order; then BLiMP's pairs."""
    trainer, splits = prepared.trainer, prepared.splits
    predictions = {split: predict_split(trainer, splits[split]) for split in TEST_SPLITS}
    predictions["validation"] = trainer.validation_predictions(splits["validation"])
    blimp = score_blimp(prepared)
    return Evaluation(predictions, blimp, explain(prepared, predictions, blimp))


def score_blimp(prepared: PreparedRun) -> blimp_report.BlimpPredictions | None:
    """P(acceptable) of both sentences of every BLiMP pair, in float32, every process scoring a share; the pairs'
    predictions on the main process, None on the others. None without BLiMP (`none`, or offline: read_blimp has
    said how to point at a copy)."""
    trainer, options = prepared.trainer, prepared.options
    if prepared.blimp_source is None:
        return None
    tokenizer = trainer.processing_class
    with trainer.args.main_process_first(desc="reading BLiMP"):  # downloaded and tokenized once, into the cache
        pairs = blimp_pairs.read_blimp(prepared.blimp_source, options.model.cache_dir)
        if pairs is None:
            return None
        sentences = blimp_pairs.tokenize_blimp(pairs, tokenizer, options.data.max_seq_length)
    prepared.blimp_pairs = pairs  # the explanations' sample of pairs reads their sentences
    started = time.perf_counter()
    probabilities = score_on_every_process(
        trainer,
        sentences,
        pad_token_id=tokenizer.pad_token_id,
        progress=not options.training.disable_tqdm,
        desc="Scoring BLiMP",
        before_batch=lambda: trainer.stop_on_signal.stop_if_received("while scoring BLiMP"),
    )
    if probabilities is None:
        return None
    seconds = time.perf_counter() - started
    logger.info(
        "BLiMP: %d sentences scored in %.1f s (%.0f a second)", len(sentences), seconds, len(sentences) / seconds
    )
    columns = sentences.with_format("numpy", columns=["pair", "label"])[:]
    return blimp_report.pair_predictions(pairs, columns["pair"], columns["label"], probabilities)


EXPLAINED_ERRORS = 5  # per test set: its most confidently wrong sentences
EXPLAINED_SPLITS = ("in_domain_dev", "out_of_domain_dev")  # glue_dev is the two together


def explain(
    prepared: PreparedRun, predictions: Predictions, blimp: blimp_report.BlimpPredictions | None
) -> explanations.Explanations | None:
    """Word-level explanations of the test sets' most confidently wrong sentences and of --explain_pairs BLiMP
    pairs per paradigm, with the hit rates; on the main process only. None with --explain_pairs 0 or a slow
    tokenizer (said in one log line)."""
    trainer, data = prepared.trainer, prepared.options.data
    if data.explain_pairs == 0 or not trainer.is_world_process_zero():
        return None
    tokenizer = trainer.processing_class
    try:
        attributions.check_explainable(tokenizer)
    except UsageError as err:
        logger.warning("Explanations skipped: %s", err)
        return None
    seed = prepared.options.training.seed

    def attribute(texts: list[str]) -> list[explanations.ExplainedSentence]:
        scored = attributions.attribute_words(
            trainer.model, tokenizer, texts, method=data.explain_method, max_length=data.max_seq_length
        )
        return [explanations.explained_sentence(attribution) for attribution in scored]

    started = time.perf_counter()
    errors = []
    for split in EXPLAINED_SPLITS:
        labels, probabilities = predictions[split]
        rows = attributions.most_confidently_wrong(labels, probabilities, EXPLAINED_ERRORS)
        sentences = attribute([prepared.splits[split][row]["sentence"] for row in rows])
        errors += [
            explanations.ExplainedError(split, int(labels[row]), float(probabilities[row]), sentence)
            for row, sentence in zip(rows, sentences, strict=True)
        ]
    pairs = []
    if blimp is not None and prepared.blimp_pairs is not None:
        rows = attributions.sample_pairs(blimp.uids, data.explain_pairs, seed)
        chosen = prepared.blimp_pairs.select(rows)
        scored = attribute([*chosen["sentence_good"], *chosen["sentence_bad"]])
        for index, row in enumerate(rows):
            good, bad = scored[index], scored[len(rows) + index]
            pairs.append(
                explanations.explained_pair(
                    blimp.uids[row], blimp.pair_ids[row], blimp.terms[row], good, bad, bool(blimp.correct[row])
                )
            )
    seconds = time.perf_counter() - started
    count = len(errors) + 2 * len(pairs)
    logger.info("Explanations: %d sentences in %.1f s (%.1f a second)", count, seconds, count / seconds)
    return explanations.Explanations(
        method=data.explain_method,
        ig_steps=attributions.IG_STEPS if data.explain_method == "integrated_gradients" else 1,
        baseline=attributions.BASELINE,
        pairs_per_paradigm=data.explain_pairs,
        seed=seed,
        max_seq_length=data.max_seq_length,
        hits=explanations.hit_table(pairs),
        pairs=pairs,
        errors=errors,
        sentences=count,
        seconds=round(seconds, 3),
        sentences_per_second=round(count / seconds, 3),
    )


def finish(
    prepared: PreparedRun,
    evaluation: Evaluation | None,
    *,
    search: dict[str, Any] | None = None,
    card_sections: Sequence[str] = (),
) -> RunResults | None:
    """Write the tutorial's reports, the analyses and the card from the predictions (None: a trial, which has no
    test sets), then results.json with `search` (the search's section, if any); upload last. The results on the
    main process, else None."""
    trainer, options, output_dir = prepared.trainer, prepared.options, prepared.output_dir
    if not trainer.is_world_process_zero():
        return None
    epochs = epoch_table(trainer.state.log_history)
    if epochs:
        write_epoch_outputs(output_dir, epochs)
    config = options.config() | ({"search": search} if search is not None else {})
    kept = kept_epoch(trainer.state, options.training.load_best_model_at_end)
    results = RunResults(epochs=epochs, config=config, kept_epoch=kept)
    tables, summary = None, {}
    if evaluation is not None:
        predictions = evaluation.predictions
        results.test = {
            split: report_test_split(output_dir, split, prepared.splits[split], *predictions[split])
            for split in TEST_SPLITS
        }
        _, probabilities = predictions["validation"]
        validation = predictions_file(output_dir, "validation")
        write_predictions(validation, prepared.splits["validation"], (probabilities > 0.5).astype(int), probabilities)
        logger.info("Test sets:\n%s", format_test_summary(results.test))
        analysis = analyze_run(
            output_dir,
            prepared.annotations_source,
            minor_features=options.data.minor_features,
            cache_dir=options.model.cache_dir,
        )
        tables = wandb_tables(analysis)
        blimp_table = ""
        if evaluation.blimp is None:
            blimp_report.remove_blimp_outputs(output_dir)
        else:
            blimp_figures = finish_blimp(output_dir, evaluation.blimp, analysis.threshold)
            tables |= blimp_report.wandb_tables(blimp_figures)
            summary = blimp_report.summary_metrics(blimp_figures)
            blimp_table = blimp_report.phenomena_markdown(blimp_figures)
        explained = evaluation.explanations
        if explained is None:
            explanations.remove_explanations(output_dir)
        else:
            explanations.write_explanations(output_dir, explained)
            card_sections = (*card_sections, explanations.card_section(explained))
        hub.write_model_card(
            output_dir,
            results,
            options.model.model_name_or_path,
            shlex.join(["python", *redact_argv(sys.argv)]),
            options.training.hub_model_id,
            base_model=options.model.base_model,
            phenomena=phenomena_markdown(analysis),
            blimp=blimp_table,
            sections=card_sections,
        )
    results.save(output_dir)  # last: its presence means "finished"
    if kept is not None:
        summary = {**summary, "kept_epoch": kept}
    tracking.log_run_outputs(output_dir, results, log_model=options.tracking.log_model, tables=tables, summary=summary)
    if options.training.push_to_hub:
        hub.push_trainer_output(trainer)  # after results.json: a failed upload leaves a finished local run
    return results


def finish_blimp(
    output_dir: Path, predictions: blimp_report.BlimpPredictions, threshold: ThresholdAnalysis | None
) -> blimp_report.BlimpAnalysis:
    """predictions_blimp.tsv, then blimp.json, blimp.md and the chart from it, at the run's decision threshold."""
    blimp_report.write_blimp_predictions(output_dir / blimp_report.PREDICTIONS_FILE, predictions)
    return blimp_report.analyze_blimp_run(output_dir, threshold.threshold if threshold is not None else None)


# --- the steps of prepare ---------------------------------------------------------------------------------------
def check_annotations(options: RunOptions) -> str | None:
    """The phenomena annotations' source; a local one is read now, so a wrong path fails before training."""
    source = options.data.annotations_source
    if source is None or source.lower() == "none":
        return None
    if not is_url(source):
        load_annotations(source, options.data.minor_features, options.model.cache_dir)
    return source


def check_blimp_source(options: RunOptions) -> str | None:
    """BLiMP's source; a local one is read and checked now, so a wrong path fails before training."""
    source = options.data.blimp_source
    if blimp_pairs.skipped(source):
        return None
    if not is_url(source):
        blimp_pairs.check_blimp(source, options.model.cache_dir)
    return source


def check_range_for_model(options: RunOptions, model: Any) -> None:
    """--max_seq_length within the model's position embeddings (config.py checks every range it can alone)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and options.data.max_seq_length > positions:
        raise UsageError(
            f"--max_seq_length {options.data.max_seq_length}: out of range, expected <= {positions} "
            f"(the position embeddings of {options.model.model_name_or_path})"
        )


def tokenize_files(options: RunOptions, files: datasets.DatasetDict, tokenizer: Any) -> datasets.DatasetDict:
    return cola.tokenize_cola(files, tokenizer, options.data.max_seq_length, options.data.pad_to_max_length)


def split_data(options: RunOptions, files: datasets.DatasetDict) -> datasets.DatasetDict:
    """The run's splits (train/validation by its seed, and the test sets), with --max_train_samples applied."""
    tokenized = cola.split_cola(files, options.data.validation_fraction, options.training.seed)
    if (limit := options.data.max_train_samples) is not None:
        tokenized["train"] = tokenized["train"].select(range(min(limit, len(tokenized["train"]))))
    logger.info("CoLA splits: %s", {split: len(rows) for split, rows in tokenized.items()})
    return tokenized
