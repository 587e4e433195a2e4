"""experiments/accelerate/slurm.sh under a real Slurm: a job stopped mid-training saves, requeues itself, finishes.

Needs a Slurm that answers on this machine, with a free node (tests/slurm/start_local_slurm.sh starts one on
localhost); skipped otherwise. The job is submitted exactly as a user submits it, told to stay on the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_cola_dir

SLURM_SCRIPT = REPO / "experiments" / "accelerate" / "slurm.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def slurm_has_a_free_node() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        answer = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return answer.returncode == 0 and any(state.startswith(("idle", "mix")) for state in answer.stdout.split())


pytestmark = pytest.mark.skipif(
    not slurm_has_a_free_node(), reason="no Slurm with a free node answers here (tests/slurm/start_local_slurm.sh)"
)


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); empty once Slurm has forgotten the job."""
    answer = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", answer.stdout)) if answer.returncode == 0 else {}


def wait_for(condition, what: str, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log.exists() else ""
    raise AssertionError(f"no {what} after {timeout:.0f} s; job log:\n{tail}")


def test_job_stopped_mid_training_saves_requeues_itself_and_finishes(tmp_path, tiny_model_dir):
    data = write_cola_dir(tmp_path / "raw", train=600)  # 540 training sentences: 34 steps per epoch
    output_dir, log = tmp_path / "run", tmp_path / "slurm.out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    # The cluster's GPUs and time are the script's business; here one CPU and no time-limit signal.
    submit = ["sbatch", "--parsable", "--gpus=0", "--cpus-per-task=1", "--time=10", f"--output={log}"]
    training = [
        *("--model_name_or_path", tiny_model_dir, "--cola_source", data, "--output_dir", output_dir),
        *("--num_train_epochs", "30", "--global_train_batch_size", "16", "--learning_rate", "1e-3"),
        *("--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"),
    ]
    submitted = subprocess.run(
        [*submit, str(SLURM_SCRIPT), *map(str, training)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: log.exists() and "{'loss':" in log.read_text(), "training loss in the log", log, timeout=60)
        # What the time limit's --signal=B:TERM does: SIGTERM to the batch shell, which passes it on.
        subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], check=True)
        final = wait_for(
            lambda: (fields := job_fields(job_id)).get("JobState") in FINAL_STATES and fields, "end", log, timeout=120
        )
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)

    text = log.read_text()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", text[-4000:]
    assert final["Restarts"] == "1", text[-4000:]
    assert text.count(f"cola-hf: job {job_id} start") == 2  # both starts appended to one log
    stopped = re.search(r"cola: stopped by SIGTERM at step (\d+) of (\d+); saved checkpoint-(\d+)", text)
    assert stopped, text[-4000:]
    step, total, checkpoint = map(int, stopped.groups())
    assert 0 < step < total and checkpoint == step  # stopped mid-training, at the step it saved
    assert f"holds an unfinished run: continuing from checkpoint-{step}" in text  # the requeued job went on from it
    assert f"training stopped with exit status 75; requeueing job {job_id}" in text
    assert (output_dir / "results.json").exists()
