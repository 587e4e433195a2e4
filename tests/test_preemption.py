"""SIGTERM, as Slurm sends it on preemption or at a time limit, where tests/test_fault_injection.py's chains do not
reach: a second SIGTERM during the save, one run per output directory, and W&B's run across a stop.

The stops themselves (mid-step, during validation, mid-save, on the last step; SIGTERM and SIGKILL; 1 and 2
processes; the one line, exit 75, the checkpoint, the same command continuing to the uninterrupted run's results,
the lock of a killed run) are proven there. Every run here is the real command line in a subprocess, on the tiny
random BERT and conftest's synthetic TSVs, with the signal hooks of tests/launching.py: they send the real signal
at a step, or hold the run at a step or in the middle of a save until the test removes a file.
"""

from __future__ import annotations

import csv
import re
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from launching import STOPPED, finish, run_cola, run_here, start_cola, wait_for_file

EPOCHS, STEPS_PER_EPOCH = 2, 12  # 180 training sentences (conftest's 200, less validation) in batches of 16
RUN = [
    *("--num_train_epochs", str(EPOCHS), "--learning_rate", "1e-2", "--global_train_batch_size", "16"),
    *("--max_seq_length", "16", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true"),
    *("--annotations_source", "none"),
]
TEST_SPLITS = ("out_of_domain_dev", "in_domain_dev", "glue_dev")


def run_args(tiny_model_dir: Path, cola_dir: Path, output_dir: Path) -> list[str]:
    return ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(cola_dir),
            "--output_dir", str(output_dir), *RUN]  # fmt: skip


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
def uninterrupted(tmp_path_factory, tiny_model_dir, cola_dir) -> Path:
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_cola(*run_args(tiny_model_dir, cola_dir, output_dir), in_process=True)
    return output_dir


def test_a_second_sigterm_during_the_save_does_not_cut_it_short(
    tmp_path, tiny_model_dir, cola_dir, uninterrupted, signal_hooks
):
    output_dir, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    # SIGTERM mid-step 5; the checkpoint it saves is held half-written (weights, no trainer_state.json yet).
    hooks_env = {"COLA_TEST_CUT": "step:5:SIGTERM", "COLA_TEST_HOLD": f"save:0:{hold}"}
    process = start_cola(*run_args(tiny_model_dir, cola_dir, output_dir), env=hooks_env, hooks=signal_hooks)
    saving = Path(wait_for_file(Path(f"{hold}.reached"), process))
    assert saving.name == "checkpoint-5" and not (saving / "trainer_state.json").exists()
    process.send_signal(signal.SIGTERM)  # impatient: a second one while the checkpoint is being written
    hold.unlink()
    text = finish(process)

    assert process.returncode == STOPPED, text[-4000:]
    assert stop_line(text) == (
        f"cola: stopped by SIGTERM at step 5 of {EPOCHS * STEPS_PER_EPOCH}; saved checkpoint-5; "
        "run the same command to continue"
    )
    assert (saving / "trainer_state.json").is_file()
    run_cola(*run_args(tiny_model_dir, cola_dir, output_dir), in_process=True)
    assert_same_predictions(output_dir, uninterrupted)


# --- one run per output directory -------------------------------------------------------------------------------
def test_a_second_run_on_the_same_directory_stops_at_once_and_the_first_finishes_unaffected(
    tmp_path, tiny_model_dir, cola_dir, uninterrupted, signal_hooks
):
    output_dir, hold = tmp_path / "run", tmp_path / "hold"
    hold.touch()
    args = run_args(tiny_model_dir, cola_dir, output_dir)
    first = start_cola(*args, env={"COLA_TEST_HOLD": f"step:3:{hold}"}, hooks=signal_hooks)
    wait_for_file(Path(f"{hold}.reached"), first)  # mid-run, holding its directory
    second = run_here(*args)  # the same command: in this process, a launch saved
    hold.unlink()  # the first run goes on
    assert second.returncode == 2
    (line,) = [line for line in second.stderr.splitlines() if line.startswith("cola: error:")]
    assert re.fullmatch(
        rf"cola: error: {re.escape(str(output_dir))}: in use by another run \(pid {first.pid} on \S+, since "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it or stop it",
        line,
    ), line
    assert "Traceback" not in second.stderr

    text = finish(first)
    assert first.returncode == 0, text[-4000:]
    assert_same_predictions(output_dir, uninterrupted)


# --- W&B: one run, one curve --------------------------------------------------------------------------------------
@pytest.mark.lowest
@pytest.mark.xdist_group("preemption-wandb")  # shares no fixture with the tests above
def test_a_preempted_run_continues_the_same_wandb_run(tmp_path, tiny_model_dir, cola_dir, signal_hooks):
    from test_tracking import offline_runs, read_records, stored_run

    output_dir = tmp_path / "run"
    tracked = [*run_args(tiny_model_dir, cola_dir, output_dir), "--report_to", "wandb"]
    cut = {"WANDB_MODE": "offline", "COLA_TEST_CUT": "step:7:SIGTERM"}
    stopped = run_cola(*tracked, env=cut, hooks=signal_hooks, check=False)
    assert stopped.returncode == STOPPED, stopped.stderr[-4000:]
    run_cola(*tracked, env={"WANDB_MODE": "offline"})

    first, second = offline_runs(output_dir / "wandb")
    stored = [stored_run(first), stored_run(second)]
    assert stored[0]["run"].run_id == stored[1]["run"].run_id == (output_dir / ".wandb_run_id").read_text().strip()
    kinds = [record.WhichOneof("record_type") for record in read_records(next(first.glob("run-*.wandb")))]
    assert "preempting" in kinds
    # One curve: the resumed run's steps follow the stopped run's, without starting over.
    steps = [[row["train/global_step"] for row in run["history"] if "train/loss" in row] for run in stored]
    assert steps[0][-1] == 7 and steps[1][0] == 8 and steps[1][-1] == EPOCHS * STEPS_PER_EPOCH
