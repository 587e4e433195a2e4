"""Launching the command in tests: the offline environment, the 1- and 2-process commands, and the hooks that
signal or hold a run at a chosen moment.

Every test that starts `experiments/cola.py` (or other code of this repository) in a process of its own builds
that process's environment and command line here, so that they are the same everywhere: offline (the Hub and
W&B are unreachable from the suite), one intra-op thread per process (two pytest workers share two cores), and
this checkout's `cola_hf` first on the path whatever is installed.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from forkserver import ForkedProcess, ForkServer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "cola.py"
# accelerate's multi-GPU config, which with --use_cpu true starts gloo processes on a machine without GPUs
# (`accelerate launch --cpu` starts only one).
MULTI_PROCESS_CONFIG = REPO / "experiments" / "accelerate" / "multi_gpu.yaml"
LAUNCHER = "accelerate.commands.launch"  # `accelerate launch`, as `python -m`
SESSION_ENVIRON = dict(os.environ)  # as this module was first imported: before any test could change it
STOPPED = 75  # the exit status of a run stopped by SIGTERM (cola_hf.errors.StoppedBySignal)


# The loggers a run configures (cola_hf.cli.train.configure_logging), and a test may turn up to see everything.
CONFIGURED_LOGGERS = ("", "transformers", "datasets", "huggingface_hub", "optuna", "cola_hf")


@contextmanager
def preserved_logging() -> Iterator[None]:
    """The logging of the process as it was, once the block ends: each test starts as a new process would (a
    library left at INFO by one test's run prints lines into the next test's one-line error)."""
    loggers = [logging.getLogger(name) for name in CONFIGURED_LOGGERS]
    saved = [(logger, logger.level, logger.handlers[:], logger.propagate) for logger in loggers]
    try:
        yield
    finally:
        for logger, level, handlers, propagate in saved:
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def offline_env(
    extra: Mapping[str, str] | None = None, hooks: Path | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a launched process: this one's, with the Hub offline, W&B disabled, one thread, output
    unbuffered (tests read a run's lines as they come) and this checkout (behind `hooks`, if given) first on
    PYTHONPATH; `extra` last, so a test may set any of these otherwise (W&B offline, say)."""
    path = [str(hooks)] if hooks is not None else []
    base = os.environ if base is None else base
    path += [str(REPO), *filter(None, [base.get("PYTHONPATH")])]
    return {
        **base,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(path),
        **(extra or {}),
    }


def cola_command(*args: object, processes: int = 1) -> list[str]:
    """`python experiments/cola.py ARGS`, or on several gloo processes under `accelerate launch` as a user starts
    them (fp32: multi_gpu.yaml asks for bf16)."""
    script = [str(SCRIPT), *map(str, args)]
    if processes == 1:
        return [sys.executable, *script]
    return [
        *(sys.executable, "-m", LAUNCHER, "--config_file", str(MULTI_PROCESS_CONFIG)),
        *("--num_processes", str(processes), "--mixed_precision", "no", *script, "--use_cpu", "true"),
    ]


def without_blimp_or_explanations(args: tuple[str, ...]) -> tuple[str, ...]:
    """Without BLiMP unless the test asks for it (--blimp_source): offline the default URL is skipped anyway, but
    a copy in datasets' cache would have every run score 134,000 sentences. Without explanations likewise
    (--explain_pairs): importing captum alone takes seconds in every process that explains, and
    tests/test_explanations.py checks them in-process."""
    if "--blimp_source" not in args:
        args = (*args, "--blimp_source", "none")
    return args if "--explain_pairs" in args else (*args, "--explain_pairs", "0")


def run_cola(
    *args: object,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    processes: int = 1,
    hooks: Path | None = None,
    timeout: float = 600,
    in_process: bool = False,
) -> subprocess.CompletedProcess:
    """experiments/cola.py in a subprocess, offline, as a user would run it; its output captured.

    `in_process`: the command's `main` in this process instead (`run_here`), where a process of its own is not
    what the test is about: the same run, without the seconds every new process spends importing torch,
    transformers, datasets and evaluate (a tiny run's work is a second or two). What only a process shows stays
    in one: signals, several processes, W&B's service, and what the libraries print to the stderr they found
    when imported.
    """
    args = without_blimp_or_explanations(tuple(map(str, args)))
    if in_process:
        if processes != 1 or hooks is not None:
            raise ValueError("in_process: one process, without signal hooks")
        result = run_here(*args, env=env)
    else:
        result = run_process(cola_command(*args, processes=processes), env=env, hooks=hooks, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"cola.py exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def start_cola(
    *args: object, env: Mapping[str, str] | None = None, processes: int = 1, hooks: Path | None = None
) -> subprocess.Popen | ForkedProcess:
    """experiments/cola.py started, not awaited: stdout and stderr as one text (see `finish`)."""
    return start_process(
        cola_command(*without_blimp_or_explanations(tuple(map(str, args))), processes=processes), env, hooks
    )


def start_process(
    command: list[str], env: Mapping[str, str] | None = None, hooks: Path | None = None
) -> subprocess.Popen | ForkedProcess:
    """A command started in the offline environment, not awaited: its stdout and stderr as one text, in the order
    written (`finish` or `communicate()[0]`). A one-process run of experiments/cola.py is forked from this
    worker's fork server where it may be (tests/forkserver.py); anything else is exec'd."""
    if (forked := fork(command, env, hooks, combined=True)) is not None:
        return forked
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=offline_env(env, hooks), cwd=REPO
    )


def run_process(
    command: list[str], env: Mapping[str, str] | None = None, hooks: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """A command run to its end in the offline environment (forked as `start_process` says); stdout, stderr apart."""
    process = fork(command, env, hooks, combined=False) or subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offline_env(env, hooks), cwd=REPO
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


_fork_server: list[ForkServer] = []
_fork_server_lock = threading.Lock()


def fork(command: list[str], env: Mapping[str, str] | None, hooks: Path | None, combined: bool) -> ForkedProcess | None:
    """`command` forked from this worker's fork server, or None where it must be exec'd: neither experiments/cola.py
    nor `accelerate launch` of it (whose workers are then forked from the launcher), or an environment that differs
    from the server's in what a library may read when it is imported (COLA_NO_FORK_SERVER=1: never forked)."""
    one_process = command[:2] == [sys.executable, str(SCRIPT)]
    launched = command[:3] == [sys.executable, "-m", LAUNCHER] and str(SCRIPT) in command
    if not (one_process or launched) or os.environ.get("COLA_NO_FORK_SERVER") == "1":
        return None
    with _fork_server_lock:
        if not _fork_server:  # the environment the session started with, whatever the test under way has set
            _fork_server.append(ForkServer(offline_env(base=SESSION_ENVIRON), REPO))
            atexit.register(_fork_server[0].close)
    server = _fork_server[0]
    if not server.can_fork(offline_env(env)):
        return None
    return server.start(command[1:], offline_env(env, hooks), hooks, combined)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """A started process's whole output once it has ended (killed if it outlives `timeout`)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"still running after {timeout:.0f} s:\n{output[-3000:]}") from None
    return output


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 300) -> str:
    """The text of a file a running process writes (a handshake), once written whole; fails if it exits first."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and (text := path.read_text(encoding="utf-8"))):
        assert process.poll() is None, f"{path} never appeared: exit {process.returncode}\n{finish(process)[-3000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared within {timeout:.0f} s"
        time.sleep(0.01)
    return text


# --- the hooks: a `sitecustomize` put on a launched run's PYTHONPATH (`hooks=`), armed by environment variables ---
# Nothing of cola_hf is replaced: the hooks wrap three Trainer methods to know where the run is, then send the real
# signal, or wait on a file that the test removes. On the main process only (RANK 0, or no RANK).
#
# COLA_TEST_CUT=KIND:NUMBER:SIGNAL  sends SIGTERM or SIGKILL once, at
#     step:N        the start of step N (mid-step: the step under way is N)
#     last:0        the start of the run's last step
#     validation:E  the start of epoch E's validation
#     save:E        the middle of epoch E's checkpoint (between the weights and trainer_state.json)
#   logging {"cut", "step"} to $COLA_TEST_CUT_LOG if set. SIGTERM goes to the process, or under `accelerate launch`
#   to the launcher, as Slurm or a user sends it, and the hook waits until the run's handler has it; SIGKILL goes
#   to every process of the job, as Slurm sends it once the grace period is over.
# COLA_TEST_HOLD=KIND:NUMBER:PATH  holds the run once, at step:N or save:E (save:0: the first save, wherever it
#   falls), while PATH exists: it writes PATH.reached (the step, or the checkpoint's directory for a save), then
#   waits until the test removes PATH, handling any signal that comes meanwhile. Environment variables in PATH are
#   expanded in the run's process ($SLURM_ARRAY_TASK_ID: one path per task of a job array).
# Either acts in the first run (a study's seed, a search's trial) whose output_dir ends with $COLA_TEST_CUT_RUN
# (any run if unset).
SIGNAL_HOOKS = """
import json, os, signal, time

_cut, _hold = os.environ.get("COLA_TEST_CUT"), os.environ.get("COLA_TEST_HOLD")
if (_cut or _hold) and os.environ.get("RANK", "0") == "0":
    import transformers

    _cut_kind, _cut_number, _cut_signal = _cut.split(":") if _cut else ("", "0", "")
    _cut_number, _run = int(_cut_number), os.environ.get("COLA_TEST_CUT_RUN", "")
    _hold_kind, _hold_number, _hold_path = _hold.split(":", 2) if _hold else ("", "0", "")
    _hold_number, _hold_path = int(_hold_number), os.path.expandvars(_hold_path)
    _done = []

    def _cut_here(trainer, step):
        if "cut" in _done or not str(trainer.args.output_dir).endswith(_run):
            return
        _done.append("cut")
        if os.environ.get("COLA_TEST_CUT_LOG"):
            with open(os.environ["COLA_TEST_CUT_LOG"], "a") as log:
                log.write(json.dumps({"cut": _cut, "step": step}) + "\\n")
        launched = "LOCAL_RANK" in os.environ  # under accelerate launch: the launcher is the parent
        if _cut_signal == "SIGKILL":
            if launched:
                import psutil

                launcher = psutil.Process(os.getppid())
                for process in [*launcher.children(recursive=True), launcher]:
                    if process.pid != os.getpid():
                        process.kill()
            os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getppid() if launched else os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 60
        while getattr(signal.getsignal(signal.SIGTERM), "received", None) is None and time.monotonic() < deadline:
            time.sleep(0.01)  # until the run's handler has it (through the launcher on several processes)

    def _hold_here(trainer, where):
        if "hold" in _done or not str(trainer.args.output_dir).endswith(_run):
            return
        _done.append("hold")
        with open(_hold_path + ".reached", "w") as reached:
            reached.write(str(where))
        deadline = time.monotonic() + 300
        while os.path.exists(_hold_path) and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs a signal's handler here, between two sleeps

    def _at_epoch(trainer, number):
        epoch = trainer.state.epoch
        return trainer.state.global_step > 0 and epoch is not None and abs(epoch - number) < 1e-9

    _training_step = transformers.Trainer.training_step
    _evaluation_loop = transformers.Trainer.evaluation_loop
    _save_rng_state = transformers.Trainer._save_rng_state

    def training_step(self, *args, **kwargs):
        step = self.state.global_step + 1  # the step under way
        if (_cut_kind == "step" and step == _cut_number) or (_cut_kind == "last" and step == self.state.max_steps):
            _cut_here(self, step)
        if _hold_kind == "step" and step == _hold_number:
            _hold_here(self, step)
        return _training_step(self, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        if _cut_kind == "validation" and kwargs.get("metric_key_prefix") == "eval" and _at_epoch(self, _cut_number):
            _cut_here(self, self.state.global_step)
        return _evaluation_loop(self, *args, **kwargs)

    def save_rng_state(self, output_dir):  # between the weights and trainer_state.json: mid-save
        if _cut_kind == "save" and _at_epoch(self, _cut_number):
            _cut_here(self, self.state.global_step)
        if _hold_kind == "save" and (_hold_number == 0 or _at_epoch(self, _hold_number)):
            _hold_here(self, output_dir)
        return _save_rng_state(self, output_dir)

    transformers.Trainer.training_step = training_step
    transformers.Trainer.evaluation_loop = evaluation_loop
    transformers.Trainer._save_rng_state = save_rng_state
"""


def write_hooks(directory: Path, source: str = SIGNAL_HOOKS) -> Path:
    """`directory` holding `source` as its sitecustomize.py: pass it as `hooks=` to a launch."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(source, encoding="utf-8")
    return directory


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block (offline_env's OMP_NUM_THREADS=1), whatever this process had."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_here(*args: object, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command's `main` in this process, where a process of its own is not the point (bad input, a refusal, a
    run whose files the test reads): it saves a launch. Its exit status and output as a subprocess's would be,
    under the offline environment's variables. The arguments as given (a refusal stops before BLiMP)."""
    from unittest import mock

    from cola_hf.cli.train import main

    argv = list(map(str, args))
    variables = {name: offline_env(env)[name] for name in ("HF_HUB_OFFLINE", "WANDB_MODE", *(env or {}))}
    stdout, stderr = io.StringIO(), io.StringIO()
    # main configures logging, as it would in a process of its own; one intra-op thread, as a launched process has
    with preserved_logging(), one_thread(), mock.patch.dict(os.environ, variables):
        with redirect_stdout(stdout), redirect_stderr(stderr):
            status = main(argv)
    return subprocess.CompletedProcess(argv, status, stdout.getvalue(), stderr.getvalue())
