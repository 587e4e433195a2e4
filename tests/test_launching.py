"""The suite's launches (tests/launching.py, tests/forkserver.py): a one-process run forked from the fork server is
the command as a fresh process runs it, and a launch is exec'd whenever the environment could change an import."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from forkserver import ForkedProcess
from launching import REPO, STOPPED, cola_command, finish, fork, offline_env, run_process, start_cola, wait_for_file


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


def test_an_environment_read_at_import_or_several_processes_are_execd():
    assert fork(cola_command("--help"), {"HF_DATASETS_CACHE": "/tmp/elsewhere"}, None, combined=True) is None
    assert fork(cola_command("--help", processes=2), None, None, combined=True) is None
    assert fork([sys.executable, "-c", "pass"], None, None, combined=True) is None
    result = run_process(cola_command("--help"), {"PYTHONPROFILEIMPORTTIME": "1"})
    assert result.returncode == 0 and "import time:" in result.stderr  # a fresh interpreter's imports
