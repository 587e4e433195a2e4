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
    assert not (out / FAILED_MARKER).exists()  # refused: the search there did not fail

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


# --- a refused directory is left exactly as it was ------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: its size and modification time."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_a_refusal_never_writes_into_the_directory_it_refuses(tmp_path, cola_dir, tiny_model_dir, capsys):
    """Every refusal of an output directory, unfinished run and finished one: exit 2, one line, and not a file
    added, removed or changed there (no RUN_FAILED: the run it holds did not fail)."""
    import shutil

    from cola_hf.training.output_dir import hold_output_dir

    output_dir = tmp_path / "run"
    steps = ["--num_train_epochs", "2", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    command = training(output_dir, cola_dir, tiny_model_dir, *steps)
    assert main(command) == 0
    results = (output_dir / "results.json").read_bytes()
    (output_dir / "results.json").unlink()  # as a run stopped after its checkpoint leaves it
    evaluate = ["--do_train", "false", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(output_dir)]
    evaluate += ["--cola_source", str(cola_dir), *QUICK]
    unfinished = {
        "other options": ([*command, "--learning_rate", "2e-3"], "holds an unfinished run with other options"),
        "other layout": ([*command, "--per_device_train_batch_size", "4"], "saved with a per-device batch of 32"),
        "evaluation only": (evaluate, "holds an unfinished training run (checkpoint-2)"),
        "conflicting study flags": ([*command, "--seeds", "1", "--grid", "g.yaml"], "--seeds and --grid"),
    }
    finished = {
        "the same command": (command, "holds a finished run"),
        "--resume without a checkpoint": (
            [*command, "--resume", "true", "--save_total_limit", "1"],
            "--resume given, but it holds no complete checkpoint",
        ),
        "evaluation only": ([*evaluate, "--overwrite_output_dir", "true"], "holds a finished training run"),
        "conflicting study flags": ([*command, "--seeds", "1", "--grid", "g.yaml"], "--seeds and --grid"),
    }

    def refused(cases: dict) -> None:
        for case, (argv, message) in cases.items():
            before = snapshot(output_dir)
            capsys.readouterr()
            assert main(argv) == 2, case
            assert message in error_line(capsys.readouterr().err), case
            assert snapshot(output_dir) == before, case

    # A checkpoint cut short while saving: the run's own command removes it, a refusal leaves it.
    (output_dir / "checkpoint-3").mkdir()
    (output_dir / "checkpoint-3" / "model.safetensors").write_bytes(b"cut")
    refused(unfinished)
    with hold_output_dir(output_dir):  # another run holds it
        refused({"in use": (command, "in use by another run")})
    for checkpoint in output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    (output_dir / "results.json").write_bytes(results)  # finished, keeping no checkpoint
    refused(finished)
    assert not (output_dir / FAILED_MARKER).exists()


# --- a path or a file that cannot be what it should -------------------------------------------------------------
def test_an_output_dir_that_is_a_file_is_one_line_naming_it(tmp_path, cola_dir, tiny_model_dir, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for output_dir, study in (
        (a_file, []),
        (a_file / "run", []),
        (a_file, ["--seeds", "1", "2"]),
        (a_file, ["--search", str(write_sweep(tmp_path / "s.yaml", [1e-3])), "--n_trials", "1"]),
    ):
        capsys.readouterr()
        assert main([*training(output_dir, cola_dir, tiny_model_dir), *study]) == 2
        line = error_line(capsys.readouterr().err)
        assert line.startswith(f"--output_dir {output_dir}: not a directory"), line
        assert a_file.read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "s.yaml"]


@pytest.mark.parametrize("kept", [0.5, 0.001], ids=["half", "header cut"])
def test_a_truncated_weights_file_is_one_line_naming_it(kept, tmp_path, cola_dir, tiny_model_dir, capsys):
    import shutil

    from cola_hf.cli.predict import main as predict_main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * kept)])
    assert main(training(tmp_path / "run", cola_dir, model_dir)) == 2
    assert error_line(capsys.readouterr().err).startswith(f"{weights} is damaged or incomplete")
    assert predict_main(["--model", str(model_dir), "Mary saw it."]) == 2
    err = capsys.readouterr().err
    assert f"--model {model_dir}: {weights} is damaged or incomplete" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_recipe_after_the_flags_is_told_to_come_first(tmp_path, capsys):
    recipe = str(Path(__file__).parents[1] / "experiments" / "recipes" / "tutorial.yaml")
    for argv in (
        ["--seed", "3", recipe],
        ["--seed", "3", recipe, "--learning_rate", "1e-3"],
        ["--output_dir", str(tmp_path), "my.yml"],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        assert error_line(capsys.readouterr().err) == (
            f"{argv[2]}: a recipe comes first, before the flags: experiments/cola.py RECIPE.yaml --flags"
        )
    assert not any(tmp_path.iterdir())
