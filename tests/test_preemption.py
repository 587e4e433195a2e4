"""SIGTERM, as Slurm sends it on preemption or at a time limit: the run saves, stops (exit 75), and the same
command continues it to the same predictions as a run never interrupted. Plus one run per output directory.

Every run is the real command line in a subprocess, on the tiny random BERT and synthetic TSVs. Where a test
needs the signal at a precise moment (during validation, during the save), a `sitecustomize` installed into
the run's process through PYTHONPATH delivers it there: it sends the real signal to the process, or slows the
Trainer's checkpoint write so that the test can signal it mid-save. Nothing of cola_hf is replaced.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, SCRIPT, run_cola, write_cola_dir

STEPS_PER_EPOCH = 34  # 540 training sentences in batches of 16
RUN = [
    *("--num_train_epochs", "2", "--learning_rate", "1e-2", "--global_train_batch_size", "16"),
    *("--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true"),
]
STOPPED = 75
TEST_SPLITS = ("out_of_domain_dev", "in_domain_dev", "glue_dev")

HOOKS = """
import os, signal, time

if os.environ.get("COLA_TEST_SIGTERM_IN_VALIDATION"):
    import transformers

    _evaluation_loop = transformers.Trainer.evaluation_loop

    def evaluation_loop(self, *args, **kwargs):
        if self.state.global_step and not getattr(evaluation_loop, "sent", False):
            evaluation_loop.sent = True  # once: the first validation after some training
            os.kill(os.getpid(), signal.SIGTERM)
        return _evaluation_loop(self, *args, **kwargs)

    transformers.Trainer.evaluation_loop = evaluation_loop

if os.environ.get("COLA_TEST_SLOW_SAVE"):
    import transformers

    _original_save_rng_state = transformers.Trainer._save_rng_state
    flag = os.environ["COLA_TEST_SLOW_SAVE"]

    def slow_save_rng_state(self, output_dir):
        # Between the weights and trainer_state.json (the Trainer's last write): mid-save for as long as it takes.
        if os.path.exists(flag):
            with open(flag + ".saving", "w") as marker:
                marker.write(output_dir)
            time.sleep(4)
        return _original_save_rng_state(self, output_dir)

    transformers.Trainer._save_rng_state = slow_save_rng_state

if os.environ.get("COLA_TEST_SLOW_STEPS"):
    import transformers

    _training_step = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if os.path.exists(os.environ["COLA_TEST_SLOW_STEPS"]):  # slow while the test needs the run caught running
            time.sleep(0.5)
        return _training_step(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cola_dir(tmp_path_factory.mktemp("preemption") / "raw", train=600)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hooks")
    (directory / "sitecustomize.py").write_text(HOOKS, encoding="utf-8")
    return directory


def command(tiny_model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data),
            "--output_dir", str(output_dir), *RUN, *extra]  # fmt: skip


def environment(**extra: str) -> dict:
    if "PYTHONPATH" in extra:  # the hooks in front of the caller's path (which may name the cola_hf under test)
        extra["PYTHONPATH"] = os.pathsep.join(filter(None, [extra["PYTHONPATH"], os.environ.get("PYTHONPATH")]))
    # Unbuffered: the test reads the run's step logs as they come.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **extra}  # fmt: skip


def start(argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment(**env), cwd=REPO
    )


def wait_for_epoch(process: subprocess.Popen, at_least: float, output: list[str]) -> None:
    """Read the run's output until a training step of epoch `at_least` or later is logged."""
    for line in process.stdout:
        output.append(line)
        if (match := re.search(r"'epoch': '([\d.]+)'", line)) and "'loss'" in line and float(match[1]) >= at_least:
            return
    raise AssertionError("the run ended before the step awaited:\n" + "".join(output)[-4000:])


def finish(process: subprocess.Popen, output: list[str]) -> str:
    rest, _ = process.communicate(timeout=600)
    return "".join(output) + rest


def stop_line(output: str) -> str:
    """The run's last line on stopping: one line, no traceback."""
    assert "Traceback" not in output, output[-4000:]
    (line,) = [line for line in output.splitlines() if line.startswith("cola: stopped by")]
    return line


def predictions(output_dir: Path, split: str) -> pd.DataFrame:
    return pd.read_csv(output_dir / f"predictions_{split}.tsv", sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)


def assert_same_predictions(run: Path, reference: Path) -> None:
    for split in TEST_SPLITS:
        got, expected = predictions(run, split), predictions(reference, split)
        assert (got["prediction"] == expected["prediction"]).all(), split
        np.testing.assert_allclose(got["prob_acceptable"], expected["prob_acceptable"], atol=1e-6, err_msg=split)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, data) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_cola(*command(tiny_model_dir, data, output_dir)[2:], env={"OMP_NUM_THREADS": "1"})
    return output_dir


def resume(tiny_model_dir: Path, data: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """The same command again: it must continue the stopped run and finish."""
    return run_cola(*command(tiny_model_dir, data, output_dir, *extra)[2:], env={"OMP_NUM_THREADS": "1"})


@pytest.mark.lowest
def test_sigterm_mid_epoch_saves_stops_and_the_same_command_finishes_the_run(
    tmp_path, tiny_model_dir, data, uninterrupted
):
    output_dir = tmp_path / "run"
    process, output = start(command(tiny_model_dir, data, output_dir)), []
    wait_for_epoch(process, 0.2, output)
    process.send_signal(signal.SIGTERM)
    text = finish(process, output)

    assert process.returncode == STOPPED, text[-4000:]
    line = stop_line(text)
    match = re.fullmatch(
        r"cola: stopped by SIGTERM at step (\d+) of 68; saved checkpoint-(\d+); run the same command to continue",
        line,
    )
    assert match and match[1] == match[2], line
    step = int(match[1])
    assert 0 < step < STEPS_PER_EPOCH  # mid-epoch: the checkpoint a --save_steps run would have taken
    assert (output_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (output_dir / "results.json").exists() and not (output_dir / "README.md").exists()

    resumed = resume(tiny_model_dir, data, output_dir)
    assert f"continuing from checkpoint-{step}" in resumed.stderr
    assert_same_predictions(output_dir, uninterrupted)


def test_sigterm_during_validation_saves_after_it_and_resumes_to_the_same_results(
    tmp_path, tiny_model_dir, data, uninterrupted, hooks
):
    output_dir = tmp_path / "run"
    process = start(
        command(tiny_model_dir, data, output_dir), PYTHONPATH=str(hooks), COLA_TEST_SIGTERM_IN_VALIDATION="1"
    )
    text = finish(process, [])
    assert process.returncode == STOPPED, text[-4000:]
    assert stop_line(text) == (
        f"cola: stopped by SIGTERM at step {STEPS_PER_EPOCH} of 68; saved checkpoint-{STEPS_PER_EPOCH}; "
        "run the same command to continue"
    )
    # The epoch's validation finished and is in the checkpoint: the resumed run does not validate epoch 1 again.
    state = json.loads((output_dir / f"checkpoint-{STEPS_PER_EPOCH}" / "trainer_state.json").read_text())
    assert [entry["epoch"] for entry in state["log_history"] if "eval_loss" in entry] == [1.0]

    resume(tiny_model_dir, data, output_dir)
    assert_same_predictions(output_dir, uninterrupted)
    got = json.loads((output_dir / "results.json").read_text())
    expected = json.loads((uninterrupted / "results.json").read_text())
    assert [row["valid_mcc"] for row in got["epochs"]] == [row["valid_mcc"] for row in expected["epochs"]]


def test_a_second_sigterm_during_the_save_does_not_cut_it_short(tmp_path, tiny_model_dir, data, uninterrupted, hooks):
    output_dir, flag = tmp_path / "run", tmp_path / "slow"
    process = start(command(tiny_model_dir, data, output_dir), PYTHONPATH=str(hooks), COLA_TEST_SLOW_SAVE=str(flag))
    output: list[str] = []
    wait_for_epoch(process, 0.2, output)
    flag.touch()
    process.send_signal(signal.SIGTERM)
    wait_for_file(Path(f"{flag}.saving"), process)
    process.send_signal(signal.SIGTERM)  # impatient: a second one while the checkpoint is being written
    text = finish(process, output)

    assert process.returncode == STOPPED, text[-4000:]
    step = int(re.search(r"saved checkpoint-(\d+)", stop_line(text))[1])
    assert (output_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    resume(tiny_model_dir, data, output_dir)
    assert_same_predictions(output_dir, uninterrupted)


def test_sigkill_during_the_sigterm_save_resumes_from_the_previous_complete_checkpoint(
    tmp_path, tiny_model_dir, data, uninterrupted, hooks
):
    output_dir, flag = tmp_path / "run", tmp_path / "slow"
    process = start(command(tiny_model_dir, data, output_dir), PYTHONPATH=str(hooks), COLA_TEST_SLOW_SAVE=str(flag))
    output: list[str] = []
    wait_for_epoch(process, 1.2, output)  # epoch 1's checkpoint is complete by now
    flag.touch()
    process.send_signal(signal.SIGTERM)
    half_saved = Path(wait_for_file(Path(f"{flag}.saving"), process).read_text())
    process.send_signal(signal.SIGKILL)  # the grace period ran out in the middle of the save
    finish(process, output)
    assert not (half_saved / "trainer_state.json").exists()

    resumed = resume(tiny_model_dir, data, output_dir)
    assert f"{half_saved} is incomplete" in resumed.stderr
    assert f"continuing from checkpoint-{STEPS_PER_EPOCH}" in resumed.stderr
    assert_same_predictions(output_dir, uninterrupted)


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):  # written whole, not just created
        assert process.poll() is None and time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return path


# --- one run per output directory -------------------------------------------------------------------------------
def test_a_second_run_on_the_same_directory_stops_at_once_and_the_first_finishes_unaffected(
    tmp_path, tiny_model_dir, data, uninterrupted, hooks
):
    output_dir, slow = tmp_path / "run", tmp_path / "slow"
    slow.touch()
    first = start(command(tiny_model_dir, data, output_dir), PYTHONPATH=str(hooks), COLA_TEST_SLOW_STEPS=str(slow))
    output: list[str] = []
    wait_for_epoch(first, 0.1, output)
    second = subprocess.run(
        command(tiny_model_dir, data, output_dir), capture_output=True, text=True, env=environment(), cwd=REPO
    )
    slow.unlink()  # the first run goes on at full speed
    assert second.returncode == 2
    (line,) = [line for line in second.stderr.splitlines() if line.startswith("cola: error:")]
    assert re.fullmatch(
        rf"cola: error: {re.escape(str(output_dir))}: in use by another run \(pid {first.pid} on \S+, since "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it or stop it",
        line,
    ), line
    assert "Traceback" not in second.stderr

    text = finish(first, output)
    assert first.returncode == 0, text[-4000:]
    assert_same_predictions(output_dir, uninterrupted)


def test_a_killed_runs_lock_does_not_block_the_same_command(tmp_path, tiny_model_dir, data, uninterrupted):
    output_dir, every_10_steps = tmp_path / "run", ("--save_strategy", "steps", "--save_steps", "10")
    process, output = start(command(tiny_model_dir, data, output_dir, *every_10_steps)), []
    wait_for_epoch(process, 0.5, output)
    process.send_signal(signal.SIGKILL)
    finish(process, output)

    resumed = resume(tiny_model_dir, data, output_dir, *every_10_steps)
    assert "in use by another run" not in resumed.stderr
    assert "continuing from checkpoint-" in resumed.stderr


# --- several processes ------------------------------------------------------------------------------------------
def launch(tiny_model_dir: Path, data: Path, output_dir: Path) -> list[str]:
    """Two gloo processes on the CPU under `accelerate launch`, as a user starts them (see test_distributed)."""
    return [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(REPO / "experiments" / "accelerate" / "multi_gpu.yaml")),
        *("--num_processes", "2", "--mixed_precision", "no"),
        *command(tiny_model_dir, data, output_dir, "--use_cpu", "true")[1:],
    ]


def test_sigterm_to_the_launcher_stops_every_process_at_one_step_and_the_same_command_finishes(
    tmp_path, tiny_model_dir, data
):
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(launch(tiny_model_dir, data, reference), capture_output=True, text=True, env=environment())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    output_dir = tmp_path / "run"
    process, output = start(launch(tiny_model_dir, data, output_dir)), []
    wait_for_epoch(process, 0.2, output)
    process.send_signal(signal.SIGTERM)  # to the launcher, as Slurm or a user would
    text = finish(process, output)
    # Every process stopped at the one agreed step (a torchrun launcher reports its own stop with a traceback).
    assert "Traceback" not in text.split("cola: stopped by")[0], text[-4000:]
    step = int(re.search(r"saved checkpoint-(\d+)", stop_line(text.split("Traceback")[0]))[1])  # the run's one line
    checkpoint = output_dir / f"checkpoint-{step}"
    assert (checkpoint / "trainer_state.json").is_file()
    assert {path.name for path in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (output_dir / "results.json").exists()

    # On another number of processes it would be another run (each process continues its own random state).
    one = subprocess.run(command(tiny_model_dir, data, output_dir), capture_output=True, text=True, env=environment())
    assert one.returncode == 2 and "Traceback" not in one.stderr, one.stderr[-3000:]
    assert [line for line in one.stderr.splitlines() if line.startswith("cola: error:")] == [
        f"cola: error: {checkpoint}: saved by 2 processes, and this run has 1; each process continues its own random "
        "state, so it continues exactly only on 2: launch 2, or pass --overwrite_output_dir to start over"
    ]

    again = subprocess.run(launch(tiny_model_dir, data, output_dir), capture_output=True, text=True, env=environment())
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"continuing from checkpoint-{step}" in again.stdout + again.stderr
    assert_same_predictions(output_dir, reference)


# --- W&B: one run, one curve --------------------------------------------------------------------------------------
@pytest.mark.lowest
def test_a_preempted_run_continues_the_same_wandb_run(tmp_path, tiny_model_dir, data):
    from test_tracking import offline_runs, read_records, stored_run

    output_dir = tmp_path / "run"
    tracked = [*command(tiny_model_dir, data, output_dir), "--report_to", "wandb"]
    process, output = start(tracked, WANDB_MODE="offline"), []
    wait_for_epoch(process, 0.3, output)
    process.send_signal(signal.SIGTERM)
    text = finish(process, output)
    assert process.returncode == STOPPED, text[-4000:]
    resumed = subprocess.run(tracked, capture_output=True, text=True, env=environment(WANDB_MODE="offline"), cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    first, second = offline_runs(output_dir / "wandb")
    stored = [stored_run(first), stored_run(second)]
    assert stored[0]["run"].run_id == stored[1]["run"].run_id == (output_dir / ".wandb_run_id").read_text().strip()
    kinds = [record.WhichOneof("record_type") for record in read_records(next(first.glob("run-*.wandb")))]
    assert "preempting" in kinds
    # One curve: the resumed run's steps follow the stopped run's, without starting over.
    steps = [[row["train/global_step"] for row in run["history"] if "train/loss" in row] for run in stored]
    assert steps[0] and steps[1] and steps[1][0] == steps[0][-1] + 1 and steps[1][-1] == 68
