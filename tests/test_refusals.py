"""What is refused in one line before it can do harm: values out of range, an evaluation-only run in a training run's
directory, a second study in a search's directory; and what an error nobody foresaw still gets: one line.

The command line runs in this process (`cola_hf.cli.train.main`), offline, on the tiny random BERT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import error_line

from cola_hf.cli.train import main
from cola_hf.run_files import ERROR_LOG, FAILED_MARKER

QUICK = ["--report_to", "none", "--disable_tqdm", "true", "--annotations_source", "none"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


# --- every numeric option's range ------------------------------------------------------------------------------
RANGES = [
    (["--learning_rate", "-1"], "--learning_rate -1: out of range, expected > 0"),
    (["--learning_rate", "nan"], "--learning_rate nan: out of range, expected > 0"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0: out of range, expected > 0"),
    (["--max_steps", "0"], "--max_steps 0: out of range, expected -1 or >= 1"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0: out of range, expected >= 1"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: out of range, expected >= 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: out of range, expected >= 1"),
    (["--global_train_batch_size", "-32"], "--global_train_batch_size -32: out of range, expected >= 0"),
    (["--warmup_steps", "-2"], "--warmup_steps -2: out of range, expected >= 0"),
    (["--weight_decay", "-0.1"], "--weight_decay -0.1: out of range, expected >= 0"),
    (["--adam_beta1", "1"], "--adam_beta1 1: out of range, expected >= 0 and < 1"),
    (["--adam_beta2", "-0.5"], "--adam_beta2 -0.5: out of range, expected >= 0 and < 1"),
    (["--adam_epsilon", "0"], "--adam_epsilon 0: out of range, expected > 0"),
    (["--max_grad_norm", "-1"], "--max_grad_norm -1: out of range, expected >= 0"),
    (["--max_seq_length", "1"], "--max_seq_length 1: out of range, expected >= 2"),
    (["--max_train_samples", "0"], "--max_train_samples 0: out of range, expected >= 1"),
    (["--validation_fraction", "1.5"], "--validation_fraction 1.5: out of range, expected > 0 and < 1"),
    (["--validation_fraction", "0"], "--validation_fraction 0: out of range, expected > 0 and < 1"),
    (["--logging_steps", "0"], "--logging_steps 0: out of range, expected > 0"),
    (["--eval_steps", "0"], "--eval_steps 0: out of range, expected > 0"),
    (["--save_steps", "-5"], "--save_steps -5: out of range, expected > 0"),
    (["--save_total_limit", "0"], "--save_total_limit 0: out of range, expected >= 1"),
    (["--seed", "-3"], "--seed -3: out of range, expected >= 0 and <= 4294967295"),
    (["--seeds", "42", "-1"], "--seeds -1: out of range, expected >= 0 and <= 4294967295"),
    (["--n_trials", "0"], "--n_trials 0: out of range, expected >= 1"),
    (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1: out of range, expected >= 0"),
]


@pytest.mark.parametrize("flags, line", RANGES, ids=[" ".join(flags) for flags, _ in RANGES])
def test_a_value_out_of_range_is_one_line_and_exit_2_before_anything_runs(flags, line, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert main(["--output_dir", str(output_dir), *QUICK, *flags]) == 2
    assert error_line(capsys.readouterr().err).startswith(line)
    assert not output_dir.exists()  # refused before any directory was taken


def test_a_batch_order_that_is_not_exact_on_resume_is_refused(tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert main(["--output_dir", str(output_dir), *QUICK, "--train_sampling_strategy", "batch_rebalance"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--train_sampling_strategy" in line and "invalid choice: 'batch_rebalance'" in line
    assert not output_dir.exists()


def test_a_recipe_value_out_of_range_is_refused_too(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"learning_rate": -0.001}))
    assert main([str(recipe), "--output_dir", str(tmp_path / "run")]) == 2
    assert error_line(capsys.readouterr().err) == "--learning_rate -0.001: out of range, expected > 0"


def test_a_sweep_value_out_of_range_is_refused_before_any_trial(tmp_path, capsys):
    sweep = tmp_path / "space.yaml"
    sweep.write_text(yaml.safe_dump({"method": "random", "parameters": {"weight_decay": {"min": -0.1, "max": 0.1}}}))
    assert main(["--output_dir", str(tmp_path / "run"), "--search", str(sweep), "--n_trials", "2", *QUICK]) == 2
    expected = f"{sweep}: parameter 'weight_decay': --weight_decay -0.1: out of range, expected >= 0"
    assert error_line(capsys.readouterr().err) == expected


def test_a_sequence_length_beyond_the_model_is_refused_once_the_model_is_known(
    tmp_path, cola_dir, tiny_model_dir, capsys
):
    output_dir = tmp_path / "run"
    argv = [
        "--output_dir",
        str(output_dir),
        "--cola_source",
        str(cola_dir),
        "--model_name_or_path",
        str(tiny_model_dir),
    ]
    assert main([*argv, *QUICK, "--max_seq_length", "500"]) == 2
    line = error_line(capsys.readouterr().err)
    assert line == f"--max_seq_length 500: out of range, expected <= 128 (the position embeddings of {tiny_model_dir})"
    assert (output_dir / FAILED_MARKER).read_text().strip() == line  # the directory was taken: it says why


# --- directories that hold another run or another study ----------------------------------------------------------
def training(output_dir: Path, cola_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--cola_source", str(cola_dir), "--model_name_or_path", str(model_dir),
        "--max_train_samples", "64", "--learning_rate", "1e-3", *QUICK, *extra,
    ]  # fmt: skip


def test_an_evaluation_only_run_never_finishes_a_training_run(tmp_path, cola_dir, tiny_model_dir, capsys):
    """Into an unfinished training run (a checkpoint, no results.json) and into a finished one: refused, and the
    training run's own command still continues it."""
    output_dir = tmp_path / "run"
    command = training(output_dir, cola_dir, tiny_model_dir, "--num_train_epochs", "2")
    assert main([*command, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]) == 0
    (output_dir / "results.json").unlink()  # as a run stopped after its checkpoint leaves it
    capsys.readouterr()
    evaluate = ["--do_train", "false", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output_dir)]
    assert main([*evaluate, "--cola_source", str(cola_dir), *QUICK]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"{output_dir}: holds an unfinished training run (checkpoint-2); an evaluation-only run (--do_train False) "
        "needs a directory of its own: pass another --output_dir"
    )
    assert not (output_dir / "results.json").exists()
    assert main([*command, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]) == 0

    assert (output_dir / "results.json").is_file()  # finished now
    assert main([*evaluate, "--cola_source", str(cola_dir), *QUICK, "--overwrite_output_dir", "true"]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"{output_dir}: holds a finished training run; an evaluation-only run (--do_train False) needs a directory "
        "of its own: pass another --output_dir"
    )
    assert main([*evaluate, "--cola_source", str(cola_dir), *QUICK, "--output_dir", str(tmp_path / "eval")]) == 0


def write_sweep(path: Path, learning_rates: list[float]) -> Path:
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"learning_rate": {"values": learning_rates}}}))
    return path


def test_a_second_study_in_a_search_directory_is_refused_unless_overwritten(tmp_path, cola_dir, tiny_model_dir, capsys):
    first, second = write_sweep(tmp_path / "a.yaml", [1e-3]), write_sweep(tmp_path / "b.yaml", [2e-3, 5e-4])
    out = tmp_path / "search"
    base = training(out, cola_dir, tiny_model_dir, "--num_train_epochs", "1")
    assert main([*base, "--search", str(first)]) == 0
    capsys.readouterr()
    assert main([*base, "--search", str(second)]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"{out}: holds the search 'cola-a' ({first}); this one is 'cola-b' ({second}): pass another --output_dir, "
        "or --overwrite_output_dir to replace it"
    )
    assert main([*base, "--search", str(first), "--seed", "7"]) == 2  # the same space from another recipe
    line = error_line(capsys.readouterr().err)
    assert "study 'cola-a' in this storage searched another recipe than" in line and "(seed differ)" in line

    assert main([*base, "--search", str(second), "--overwrite_output_dir", "true"]) == 0
    best = json.loads((out / "best" / "results.json").read_text())["config"]["search"]
    summary = json.loads((out / "search" / "summary.json").read_text())
    assert best["study"] == summary["study"] == "cola-b" and best["sweep"] == str(second)
    assert sorted(path.name for path in (out / "trials").iterdir()) == ["trial-000", "trial-001"]


# --- an error nobody foresaw ---------------------------------------------------------------------------------------
def test_an_unforeseen_error_is_one_line_with_its_traceback_in_the_run_directory(
    tmp_path, cola_dir, tiny_model_dir, capsys
):
    """A checkpoint whose optimizer state is damaged (a full disk, say) fails deep inside torch: exit 1, one line,
    the traceback in OUTPUT_DIR/error.log, RUN_FAILED."""
    output_dir = tmp_path / "run"
    command = training(output_dir, cola_dir, tiny_model_dir, "--num_train_epochs", "2")
    assert main([*command, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]) == 0
    (output_dir / "results.json").unlink()
    (output_dir / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a torch file")
    capsys.readouterr()
    assert main([*command, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("unexpected ")
    assert line.endswith(f"the traceback is in {output_dir / ERROR_LOG} (--debug shows it here)")
    assert "Traceback (most recent call last)" in (output_dir / ERROR_LOG).read_text()
    assert (output_dir / FAILED_MARKER).read_text().strip() == line
