"""Stable fine-tuning: layer-wise learning rates, re-initialised top layers, the best epoch kept (and resumed), and
seed studies that report medians and collapsed runs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRIPT, error_line
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, Trainer

from cola_hf.cli.compare import main as compare_main
from cola_hf.config import parse_args
from cola_hf.errors import UsageError
from cola_hf.predictions_tsv import read_predictions
from cola_hf.results import RunResults
from cola_hf.studies.seeds import StudyRun, aggregate_seeds, seed_table
from cola_hf.training.layers import reinit_top_layers
from cola_hf.training.trainer import TutorialTrainer

LAYERS = 3
# Each family's own names: (the prefix of its embeddings, the pattern of its encoder layers), written out here
# rather than derived, so the module-tree derivation in training/layers.py is checked against them.
FAMILIES = {
    "bert": (("bert.embeddings.",), r"^bert\.encoder\.layer\.(\d+)\."),
    "roberta": (("roberta.embeddings.",), r"^roberta\.encoder\.layer\.(\d+)\."),
    "electra": (("electra.embeddings.", "electra.embeddings_project."), r"^electra\.encoder\.layer\.(\d+)\."),
    "distilbert": (("distilbert.embeddings.",), r"^distilbert\.transformer\.layer\.(\d+)\."),
    "deberta-v2": (("deberta.embeddings.", "deberta.encoder.rel_embeddings."), r"^deberta\.encoder\.layer\.(\d+)\."),
    "modernbert": (("model.embeddings.",), r"^model\.layers\.(\d+)\."),
}
TINY = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 64,
        "max_position_embeddings": 64, "num_labels": 2}  # fmt: skip


def tiny_model(family: str, seed: int = 0, **extra) -> torch.nn.Module:
    sizes = {**TINY, **extra}
    if family == "distilbert":  # its own names for the same sizes
        sizes = {"dim": 16, "n_heads": 2, "hidden_dim": 32, "n_layers": LAYERS, "vocab_size": 64,
                 "max_position_embeddings": 64, "num_labels": 2}  # fmt: skip
    elif family == "electra":
        sizes |= {"embedding_size": 8, "num_hidden_layers": LAYERS}  # a projection from embeddings to hidden
    elif family == "modernbert":  # its special tokens' ids default to its own 50,000-word vocabulary's
        sizes |= {"num_hidden_layers": LAYERS, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                  "cls_token_id": 1, "sep_token_id": 2}  # fmt: skip
    elif family == "deberta-v2":
        sizes |= {"relative_attention": True, "position_biased_input": False, "num_hidden_layers": LAYERS}
    else:
        sizes |= {"num_hidden_layers": LAYERS}
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(family, **sizes))


def training_args(tmp_path: Path, *flags: str):
    return parse_args(["--output_dir", str(tmp_path), "--report_to", "none", "--eval_strategy", "no", *flags]).training


def expected_depth(family: str, name: str) -> int:
    embeddings, layer = FAMILIES[family]
    if name.startswith(embeddings):
        return 0
    match = re.match(layer, name)
    return int(match[1]) + 1 if match else LAYERS + 1


# --- layer-wise learning-rate decay ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_parameter_trains_at_the_rate_times_its_power_of_the_decay(tmp_path, family):
    model = tiny_model(family)
    args = training_args(tmp_path, "--learning_rate", "1e-3", "--layerwise_lr_decay", "0.5", "--weight_decay", "0.01")
    trainer = TutorialTrainer(model=model, args=args)

    optimizer = trainer.create_optimizer()

    rate, weight_decay, layer = {}, {}, {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            assert name not in rate, f"{name} in two groups"
            rate[name], weight_decay[name], layer[name] = group["lr"], group["weight_decay"], group["layer"]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(rate) == trainable
    decays = set(Trainer.get_decay_parameter_names(trainer, model))
    for name in trainable:
        depth = expected_depth(family, name)
        assert rate[name] == pytest.approx(1e-3 * 0.5 ** (LAYERS + 1 - depth)), name
        assert weight_decay[name] == (0.01 if name in decays else 0.0), name
    # Every depth is present: the embeddings, each layer, the head.
    assert {expected_depth(family, name) for name in trainable} == set(range(LAYERS + 2))
    assert {layer[name] for name in trainable if expected_depth(family, name) == 0} == {"embeddings"}
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the head first: the rate the Trainer logs


def test_a_model_without_one_module_per_layer_is_refused_in_one_line(tmp_path):
    albert = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("albert", **TINY, embedding_size=8, num_hidden_layers=LAYERS)
    )  # one layer's weights shared over its depth
    trainer = TutorialTrainer(model=albert, args=training_args(tmp_path, "--layerwise_lr_decay", "0.8"))
    with pytest.raises(UsageError, match=r"^--layerwise_lr_decay 0.8: albert has no list of 3 encoder layers"):
        trainer.create_optimizer()


def test_decay_one_builds_the_stock_trainers_optimizer(tmp_path):
    args = training_args(tmp_path, "--weight_decay", "0.01")
    ours = TutorialTrainer(model=tiny_model("bert"), args=args).create_optimizer()
    stock = Trainer(model=tiny_model("bert"), args=args).create_optimizer()
    assert type(ours) is type(stock)

    def described(optimizer):
        return [
            ({key: value for key, value in group.items() if key != "params"}, [p.shape for p in group["params"]])
            for group in optimizer.param_groups
        ]

    assert described(ours) == described(stock)


# --- re-initialisation ----------------------------------------------------------------------------------------
def changed_parameters(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "modernbert"])
@pytest.mark.parametrize("count", [1, LAYERS])
def test_reinit_changes_exactly_the_top_layers_reproducibly_from_the_seed(tmp_path, family, count):
    # A checkpoint as a run loads it (from_pretrained marks every loaded tensor initialised), as if pretrained: no
    # bias at 0 and no norm at 1, so that a reset shows everywhere.
    model = tiny_model(family)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    model.save_pretrained(tmp_path)

    def trained() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(tmp_path)

    model = trained()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng_before = torch.get_rng_state()

    reinitialised = reinit_top_layers(model, count, seed=7)

    assert torch.equal(torch.get_rng_state(), rng_before)  # dropout and batches draw as without it
    _, layer = FAMILIES[family]
    top = {str(index) for index in range(LAYERS - count, LAYERS)}
    in_top = {name for name in before if (match := re.match(layer, name)) and match[1] in top}
    pooler = {name for name in before if ".pooler." in name}  # BERT's; RoBERTa's classifier has none
    assert in_top and changed_parameters(before, model) == in_top | pooler
    assert len(reinitialised) == count + bool(pooler)

    again = trained()
    reinit_top_layers(again, count, seed=7)
    assert not changed_parameters(model.state_dict(), again)
    other = trained()
    reinit_top_layers(other, count, seed=8)
    assert changed_parameters(model.state_dict(), other)  # another seed, other weights


def test_reinit_beyond_the_models_layers_is_one_line():
    with pytest.raises(UsageError, match=rf"^--reinit_top_layers {LAYERS + 1}: out of range, expected <= {LAYERS} "):
        reinit_top_layers(tiny_model("bert"), LAYERS + 1, seed=0)


def test_more_layers_than_the_model_has_is_one_line_once_it_is_loaded(tmp_path, cola_dir, tiny_model_dir, capsys):
    from cola_hf.cli.train import main

    status = main(["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(cola_dir), "--report_to", "none",
                   "--output_dir", str(tmp_path / "run"), "--reinit_top_layers", "3"])  # fmt: skip

    assert status == 2
    assert error_line(capsys.readouterr().err) == (
        "--reinit_top_layers 3: out of range, expected <= 2 (the encoder layers of this model)"
    )


def test_patience_without_keeping_the_best_epoch_is_one_line():
    with pytest.raises(UsageError, match=r"^--early_stopping_patience 2 needs --load_best_model_at_end true"):
        parse_args(["--early_stopping_patience", "2"])
    assert parse_args(["--load_best_model_at_end", "true"]).training.metric_for_best_model == "matthews_correlation"


# --- the best epoch, kept, tested, and resumed after SIGTERM --------------------------------------------------
# The verb rule at a high rate: validation MCC 0 after epoch 1, then 1.0 from epoch 2 on (never better), so the best
# epoch is 2 and a patience of 2 stops the run after epoch 4 of 6. 180 training sentences: 12 steps an epoch. With
# layer-wise rates and a re-initialised layer, so that a resume restores their parameter groups and weights too.
STEPS_PER_EPOCH, BEST_EPOCH, LAST_EPOCH = 12, 2, 4
BEST_EPOCH_RUN = [
    *("--num_train_epochs", "6", "--learning_rate", "5e-3", "--global_train_batch_size", "16", "--seed", "42"),
    *("--max_seq_length", "16", "--disable_tqdm", "true", "--annotations_source", "none", "--blimp_source", "none"),
    *("--report_to", "none", "--load_best_model_at_end", "true", "--early_stopping_patience", "2"),
    *("--layerwise_lr_decay", "0.8", "--reinit_top_layers", "1"),  # resumed too: their groups, their weights
]


def probabilities_of(model_dir: Path, predictions_file: Path) -> np.ndarray:
    """P(acceptable) of the file's sentences by the model saved in `model_dir`."""
    sentences = read_predictions(predictions_file).sentences
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(**tokenizer(list(sentences), padding=True, truncation=True, max_length=16, return_tensors="pt"))
    return torch.softmax(logits.logits, dim=-1)[:, 1].numpy()


def test_the_best_epoch_is_kept_tested_and_recorded_and_a_sigtermed_run_resumes_to_it(
    tmp_path, tiny_model_dir, verb_cola_dir, signal_hooks
):
    from test_fault_injection import Cut, largest_difference, launch

    from cola_hf.cli.train import main

    flags = ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(verb_cola_dir), *BEST_EPOCH_RUN]
    uncut = tmp_path / "uncut"
    assert main([*flags, "--output_dir", str(uncut)]) == 0

    results = RunResults.load(uncut)
    assert [row.valid_mcc for row in results.epochs] == [0.0, 1.0, 1.0, 1.0]  # stopped early: patience 2
    assert results.kept_epoch == BEST_EPOCH and results.final_valid_mcc == 1.0
    assert json.loads((uncut / "results.json").read_text())["kept_epoch"] == BEST_EPOCH
    assert f"The model is epoch {BEST_EPOCH}'s of the {LAST_EPOCH} trained" in (uncut / "README.md").read_text()
    # The test sets were scored with the kept epoch's weights (its checkpoint is what the Trainer keeps at the end)...
    for split in ("glue_dev", "out_of_domain_dev"):
        scored = read_predictions(uncut / f"predictions_{split}.tsv")
        best = probabilities_of(uncut / f"checkpoint-{BEST_EPOCH * STEPS_PER_EPOCH}", scored.path)
        np.testing.assert_allclose(scored.probabilities, best, atol=1e-5)
    # ... which is not the last epoch's model: the validation split, scored like them, has epoch 2's loss, not 4's.
    validation = read_predictions(uncut / "predictions_validation.tsv")
    right = np.where(validation.labels == 1, validation.probabilities, 1 - validation.probabilities)
    loss = float(-np.log(right).mean())
    assert loss == pytest.approx(results.epochs[BEST_EPOCH - 1].valid_loss, rel=1e-3)
    assert loss > 5 * results.epochs[-1].valid_loss

    # SIGTERM mid-step in epoch 4, one validation without improvement counted: the resumed run must count it too.
    cut_dir = tmp_path / "cut"
    cut = Cut("step", (LAST_EPOCH - 1) * STEPS_PER_EPOCH + 5, "SIGTERM")
    status, output = launch([sys.executable, str(SCRIPT), *flags, "--output_dir", str(cut_dir)], signal_hooks,
                            tmp_path / "cut.log", cut)  # fmt: skip
    assert status == 75, output[-3000:]
    assert main([*flags, "--output_dir", str(cut_dir)]) == 0

    assert largest_difference(cut_dir, uncut) <= 1e-6
    resumed = RunResults.load(cut_dir)
    assert (resumed.kept_epoch, len(resumed.epochs), resumed.test) == (BEST_EPOCH, LAST_EPOCH, results.test)


# --- seed studies: median, IQR, collapsed runs ----------------------------------------------------------------
def study_run(seed: int, glue_dev: float, collapsed_epochs: tuple[bool, ...], kept_epoch: int | None = None):
    epochs = [
        {"epoch": number, "valid_mcc": 0.0 if collapsed else 0.3, "collapsed": collapsed}
        for number, collapsed in enumerate(collapsed_epochs, start=1)
    ]
    results = {"epochs": epochs, "test": {"glue_dev": {"matthews_correlation": glue_dev}}, "kept_epoch": kept_epoch}
    return StudyRun(f"run-seed{seed}", Path(f"run-seed{seed}"), {"seed": seed}, RunResults.from_dict(results))


def test_seed_summary_has_median_iqr_and_names_the_collapsed_runs():
    runs = [
        study_run(1, 0.30, (False, False)),
        study_run(2, 0.0, (True, True)),  # collapsed at the end: counted
        study_run(3, 0.28, (True, False)),  # collapsed at epoch 1 only, recovered: not counted
        study_run(4, 0.35, (False, True), kept_epoch=1),  # the kept epoch had not collapsed: not counted
        study_run(5, 0.0, (False, True)),  # collapsed at its last epoch, which it kept: counted
        study_run(6, 0.32, (True, False), kept_epoch=1),  # kept a collapsed epoch: counted
    ]

    summary = aggregate_seeds(runs, "g")

    values = [0.30, 0.0, 0.28, 0.35, 0.0, 0.32]  # sorted: 0, 0, .28, .30, .32, .35
    stats = summary["test_mcc"]["glue_dev"]
    assert stats["median"] == pytest.approx(0.29)
    # Quartiles by linear interpolation between order statistics: positions 1.25 and 3.75 of 0..5.
    assert stats["q1"] == pytest.approx(0.0 + 0.25 * 0.28) and stats["q3"] == pytest.approx(0.30 + 0.75 * 0.02)
    assert stats["iqr"] == pytest.approx(stats["q3"] - stats["q1"])
    assert stats["mean"] == pytest.approx(np.mean(values)) and stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["collapsed"] == {"count": 3, "runs": ["run-seed2", "run-seed5", "run-seed6"]}
    assert [run["collapsed"] for run in summary["runs"]] == [False, True, False, False, True, True]
    table = seed_table(summary)
    assert list(table["seed"]) == [*map(str, range(1, 7)), "mean", "std", "median", "iqr", "min", "max", "collapsed"]
    assert table.set_index("seed").loc["collapsed", "collapsed"] == "3"


def test_compare_significance_says_which_runs_of_a_group_collapsed(tmp_path, capsys):
    from test_analysis import synthetic_rows, write_synthetic_run

    rows = synthetic_rows(40, seed=5)
    for group, seeds in (("recipe-a", (1, 2)), ("recipe-b", (3, 4, 5))):
        for seed in seeds:
            write_synthetic_run(tmp_path / group / f"seed-{seed}", rows, seed=seed)
    collapsed = {"epochs": [{"epoch": 1, "valid_mcc": 0.0, "collapsed": True}], "test": {}, "config": {"seed": 4}}
    (tmp_path / "recipe-b" / "seed-4" / "results.json").write_text(json.dumps(collapsed))
    out = tmp_path / "comparison"

    assert compare_main([str(tmp_path / "recipe-a"), str(tmp_path / "recipe-b"), "--output", str(out),
                         "--significance"]) == 0  # fmt: skip

    note = "- recipe-b: 1 of 3 runs collapsed (one class on validation, MCC 0): seed-4; its figures include them"
    assert note in (out / "significance.md").read_text().splitlines()
    assert "recipe-a:" not in (out / "significance.md").read_text()
    assert note in capsys.readouterr().out
