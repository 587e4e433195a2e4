"""The sbatch scripts under a real Slurm: experiments/accelerate/slurm.sh (a job stopped mid-training saves,
requeues itself, finishes) and slurm_search.sh (a job array of search workers runs exactly N trials and builds one
best, through a preempted task).

Needs a Slurm that answers on this machine, with a free node (tests/slurm/start_local_slurm.sh starts one on
localhost); skipped otherwise. Jobs are submitted exactly as a user submits them, told to stay on the CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import REPO, offline_env

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


pytestmark = [
    pytest.mark.skipif(
        not slurm_has_a_free_node(), reason="no Slurm with a free node answers here (tests/slurm/start_local_slurm.sh)"
    ),
    # A group of its own goes first (tests/xdist_groups.py): its jobs wait on Slurm (a requeue waits 10 s), and
    # that waiting overlaps the other worker's work instead of ending the suite on one worker.
    pytest.mark.xdist_group("slurm"),
]


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); empty once Slurm has forgotten the job."""
    answer = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", answer.stdout)) if answer.returncode == 0 else {}


def wait_for(condition, what: str, log: Path, timeout: float):
    """`condition()`'s first true answer, polled until `timeout`; else an error with the job log's end and the
    queue (a task pending on Resources: the node was not free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log.exists() else ""
    queue = subprocess.run(["squeue", "--format=%i %T %r %C %S"], capture_output=True, text=True).stdout
    raise AssertionError(f"no {what} after {timeout:.0f} s; squeue:\n{queue}job log:\n{tail}")


def test_job_stopped_mid_training_saves_requeues_itself_and_finishes(tmp_path, tiny_model_dir, cola_dir, signal_hooks):
    output_dir, log, hold = tmp_path / "run", tmp_path / "slurm.out", tmp_path / "hold"
    hold.touch()
    # Held at step 5 of 24 (180 training sentences, 2 epochs) until the signal is in: it comes mid-training. The
    # requeued job finds no hold file and goes on.
    env = offline_env({"PYTHON": sys.executable, "COLA_TEST_HOLD": f"step:5:{hold}"}, signal_hooks)
    # The cluster's GPUs and time are the script's business; here one CPU and no time-limit signal.
    submit = ["sbatch", "--parsable", "--gpus=0", "--cpus-per-task=1", "--time=10", f"--output={log}"]
    training = [
        *("--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", output_dir),
        *("--num_train_epochs", "2", "--global_train_batch_size", "16", "--learning_rate", "1e-3"),
        *("--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"),
    ]
    submitted = subprocess.run(
        [*submit, str(SLURM_SCRIPT), *map(str, training)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: Path(f"{hold}.reached").exists(), "the job at step 5", log, timeout=60)
        # What the time limit's --signal=B:TERM does: SIGTERM to the batch shell, which passes it on.
        subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], check=True)
        wait_for(lambda: "SIGTERM received" in log.read_text(), "the run taking the signal", log, timeout=60)
        hold.unlink()
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


# --- a search as a job array ------------------------------------------------------------------------------------
SEARCH_SCRIPT = REPO / "experiments" / "accelerate" / "slurm_search.sh"


def submit_search_array(
    tmp_path: Path, tiny_model_dir: Path, data: Path, n_trials: int, hooks: Path | None = None
) -> tuple[str, Path]:
    """Two search workers as an array, sharing the study's journal in one OUTPUT_DIR, trials of one epoch; the
    array's job id. With `hooks`, each task holds its first trial at step 5 while tmp_path/hold-TASK exists."""
    space = tmp_path / "space.yaml"
    space.write_text(
        "method: random\nmetric: {name: eval/matthews_correlation, goal: maximize}\n"
        "parameters: {learning_rate: {values: [0.005, 0.002, 0.001]}}\n"
    )
    output_dir = tmp_path / "search"
    submit = ["sbatch", "--parsable", "--array=0-1", "--gpus=0", "--cpus-per-task=1", "--time=10"]
    submit.append(f"--output={tmp_path}/slurm-%A_%a.out")
    worker = [
        *("--model_name_or_path", tiny_model_dir, "--cola_source", data, "--output_dir", output_dir),
        *("--search", space, "--n_trials", n_trials, "--num_train_epochs", "1"),
        *("--global_train_batch_size", "16", "--annotations_source", "none"),
        *("--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true"),
    ]
    hold = {"COLA_TEST_HOLD": f"step:5:{tmp_path}/hold-$SLURM_ARRAY_TASK_ID"} if hooks else {}
    env = offline_env({"PYTHON": sys.executable, **hold}, hooks)
    submitted = subprocess.run(
        [*submit, str(SEARCH_SCRIPT), *map(str, worker)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0], output_dir


def search_states(output_dir: Path) -> list[str]:
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(output_dir / "search" / "study.journal"))
    )
    (name,) = optuna.get_all_study_names(storage)
    return [trial.state.name for trial in optuna.load_study(study_name=name, storage=storage).get_trials()]


def wait_for_tasks(array_id: str, logs: list[Path], timeout: float) -> list[dict[str, str]]:
    def ended() -> list[dict[str, str]] | None:
        tasks = [job_fields(f"{array_id}_{task}") for task in range(len(logs))]
        return tasks if all(task.get("JobState") in FINAL_STATES for task in tasks) else None

    return wait_for(ended, "end of both tasks", logs[-1], timeout=timeout)


def test_a_preempted_array_task_requeues_and_the_study_still_ends_with_n_trials(
    tmp_path, tiny_model_dir, cola_dir, signal_hooks
):
    # Both tasks held at step 5 of their first trial: task 0 cannot run all three trials before task 1 has one,
    # and task 1 is mid-trial when the signal comes.
    holds = [tmp_path / f"hold-{task}" for task in range(2)]
    for hold in holds:
        hold.touch()
    array_id, output_dir = submit_search_array(tmp_path, tiny_model_dir, cola_dir, n_trials=3, hooks=signal_hooks)
    logs = [tmp_path / f"slurm-{array_id}_{task}.out" for task in range(2)]
    try:
        for task, hold in enumerate(holds):
            wait_for(lambda hold=hold: Path(f"{hold}.reached").exists(), f"task {task} at step 5", logs[task], 120)
        # What the time limit's --signal=B:TERM does (preemption signals the step the same way).
        subprocess.run(["scancel", "--batch", "--signal=TERM", f"{array_id}_1"], check=True)
        wait_for(lambda: "SIGTERM received" in logs[1].read_text(), "task 1 taking the signal", logs[1], 60)
        for hold in holds:
            hold.unlink()
        tasks = wait_for_tasks(array_id, logs, timeout=400)
    finally:
        subprocess.run(["scancel", array_id], capture_output=True)
    texts = [log.read_text() if log.exists() else "" for log in logs]
    assert [(task["JobState"], task["ExitCode"]) for task in tasks] == [("COMPLETED", "0:0")] * 2, texts
    assert [task["Restarts"] for task in tasks] == ["0", "1"], texts
    assert f"requeueing task {array_id}_1" in texts[1] and texts[1].count(f"search worker {array_id}_1 ") == 2
    assert texts[0].count(f"search worker {array_id}_0 ") == 1
    # The stopped trial is recorded as failed and was run again: exactly 3 finished trials between the two
    # workers, and one best/, built once.
    states = search_states(output_dir)
    assert sorted(states) == ["COMPLETE"] * 3 + ["FAIL"], states
    assert (output_dir / "best" / "results.json").is_file()
    assert sum(text.count("its model and test results are in") for text in texts) == 1, texts
    print(f"\ntrial states: {states}")
