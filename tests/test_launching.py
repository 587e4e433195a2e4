"""The suite's launches (tests/launching.py, tests/forkserver.py): a one-process run forked from the fork server is
the command as a fresh process runs it, so is each worker of a forked `accelerate launch`, and a launch is exec'd
whenever the environment could change an import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from forkserver import ForkedProcess
from launching import (
    REPO,
    SCRIPT,
    STOPPED,
    cola_command,
    finish,
    fork,
    offline_env,
    run_process,
    start_cola,
    wait_for_file,
    write_hooks,
)


def test_a_forked_run_exits_and_prints_as_an_execd_one(monkeypatch):
    # torch writes TORCHINDUCTOR_CACHE_DIR into the environment of a process that has compiled (a pytest worker
    # after an in-process run): launches must still fork then.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_test")
    command = cola_command("--num_train_epochs", "0")
    forked = fork(command, None, None, combined=False)
    assert isinstance(forked, ForkedProcess) and forked.pid != os.getpid()
    stdout, stderr = forked.communicate(timeout=60)
    execd = subprocess.run(command, capture_output=True, text=True, env=offline_env(), cwd=REPO, timeout=120)
    assert (forked.returncode, stdout, stderr) == (execd.returncode, execd.stdout, execd.stderr)
    assert forked.returncode == 2 and stderr.startswith("cola: error: ")


def test_a_forked_run_is_a_process_of_its_own_whose_signal_handler_a_sigterm_reaches(
    tmp_path, tiny_model_dir, cola_dir, signal_hooks
):
    hold = tmp_path / "hold"
    hold.touch()
    flags = ["--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output_dir", tmp_path / "run"]
    process = start_cola(
        *flags, "--max_train_samples", "64", env={"COLA_TEST_HOLD": f"step:2:{hold}"}, hooks=signal_hooks
    )
    assert isinstance(process, ForkedProcess)
    assert wait_for_file(tmp_path / "hold.reached", process) == "2"  # the hooks ran, as its sitecustomize would
    process.send_signal(signal.SIGTERM)
    hold.unlink()
    output = finish(process, timeout=120)
    assert process.returncode == STOPPED, output[-3000:]
    assert "stopped by SIGTERM at step 2" in output


# Each worker's view of its start, written by the hooks (run as its sitecustomize would be): its environment, argv,
# how many threads it has (a fork copies only the forking thread of a launcher that has several), and whether it
# started with the run's modules imported (forked) or not (exec'd).
WORKER_RECORD = """
import json, os, sys, threading
record = {"env": dict(os.environ), "argv": sys.argv, "threads": threading.active_count(),
          "imported": "cola_hf.run" in sys.modules}
with open(os.path.join(os.environ["COLA_TEST_RECORDS"], "rank-" + os.environ["RANK"] + ".json"), "w") as file:
    json.dump(record, file)
"""
# Set per launch (the rendezvous port, torch's error-file directory, the test's own), or written by the imports
# that a forked worker had before its start and an exec'd one makes after its sitecustomize (sklearn: KMP_*; torch:
# its default TORCHINDUCTOR_CACHE_DIR).
PER_LAUNCH = ("MASTER_PORT", "TORCHELASTIC_ERROR_FILE", "PYTHONPATH", "COLA_", "KMP_", "TORCHINDUCTOR_CACHE_DIR")


def test_a_forked_launch_of_2_processes_starts_and_ends_each_worker_as_an_execd_one(monkeypatch, tmp_path):
    """accelerate launch on 2 processes, its workers forked from the launcher (itself forked) and as exec'd: every
    worker has the same environment and argv, and the launch ends with the same status and error lines."""
    command = cola_command("--num_train_epochs", "0", processes=2)  # refused on both ranks: a UsageError
    results, records = {}, {}
    monkeypatch.delenv("COLA_NO_FORK_SERVER", raising=False)
    for mode in ("forked", "execd"):
        if mode == "execd":
            monkeypatch.setenv("COLA_NO_FORK_SERVER", "1")
        hooks = write_hooks(tmp_path / mode / "hooks", WORKER_RECORD)
        results[mode] = run_process(command, {"COLA_TEST_RECORDS": str(tmp_path / mode)}, hooks, timeout=120)
        records[mode] = [json.loads((tmp_path / mode / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    errors = {mode: [line for line in result.stderr.splitlines() if line.startswith("cola: error:")]
              for mode, result in results.items()}  # fmt: skip
    assert results["forked"].returncode == results["execd"].returncode == 1
    assert errors["forked"] == errors["execd"] and len(errors["forked"]) == 2
    for forked, execd in zip(records["forked"], records["execd"], strict=True):
        assert forked["argv"] == execd["argv"] == [str(SCRIPT), "--num_train_epochs", "0", "--use_cpu", "true"]
        assert forked["threads"] == execd["threads"] == 1
        assert (forked["imported"], execd["imported"]) == (True, False)
        differ = {name for name in forked["env"].keys() | execd["env"].keys()
                  if forked["env"].get(name) != execd["env"].get(name)}  # fmt: skip
        assert {name for name in differ if not name.startswith(PER_LAUNCH)} == set()
        assert {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "ACCELERATE_MIXED_PRECISION"} <= forked["env"].keys()


def test_an_environment_read_at_import_or_another_launcher_is_execd():
    assert fork(cola_command("--help"), {"HF_DATASETS_CACHE": "/tmp/elsewhere"}, None, combined=True) is None
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT)]
    assert fork(torchrun, None, None, combined=True) is None
    assert fork([sys.executable, "-c", "pass"], None, None, combined=True) is None
    result = run_process(cola_command("--help"), {"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0 and "import time:" in result.stderr  # a fresh interpreter's imports
