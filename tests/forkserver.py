"""Runs launched from a fork server: processes of their own, without paying for their imports again.

A fresh `python experiments/cola.py` spends 4 to 5 s of CPU importing torch, transformers, datasets and evaluate
before its first step, and a tiny run's work is a second or two. The suite launches such runs about forty times
where a process of its own is the point (a SIGTERM or SIGKILL mid-step, concurrent search workers, a lock held
by another run). A fork server, one per pytest worker, imports what a run imports once, under the environment
every launch gets (launching.offline_env); each launch is a fork of it: a real process, with its own pid, signals,
exit status and file descriptors 1 and 2, that runs `experiments/cola.py` as `python experiments/cola.py` would
(`__main__`, sys.argv, the interpreter's exit: atexit handlers, threads joined), only with its modules imported
already. multiprocessing's "forkserver" does the same for its workers.

`python -m accelerate.commands.launch ... experiments/cola.py` (several processes, as a user launches them) is
forked too, and its workers are forks of it (`fork_workers`): torch's elastic agent starts them as it starts a
function entrypoint's, with each rank's environment set by the agent as for a fresh worker.

`launching.fork` execs a fresh interpreter instead whenever what a test checks could happen before or during
the imports: another launcher, a script other than experiments/cola.py, and an environment that differs from the
server's in anything a library may read when imported (only COLA_TEST_* and WANDB_* may differ: wandb is not
imported here; the signal hooks' directory is run as its sitecustomize would be, in each worker of a launch).

Run as a script, this file is the server: `python tests/forkserver.py SOCKET_PATH`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# What a run imports, imported once by the server (wandb is left out: tracking imports it only with an open run).
PRELOADED = (
    "cola_hf.cli.train",
    "cola_hf.run",
    "transformers.trainer",
    "transformers.models.bert.modeling_bert",
    "transformers.models.bert.tokenization_bert",
    "datasets",
    "evaluate",
    "sklearn.metrics",
    "matplotlib.pyplot",
)
# Variables a launch may set differently from the server's environment: none is read when a library is imported.
# pytest names the test under way in PYTEST_CURRENT_TEST; the others are written into a pytest worker's environment
# by what ran in it (torch: its default TORCHINDUCTOR_CACHE_DIR once it compiled; transformers' pipelines:
# TOKENIZERS_PARALLELISM; sklearn's import: KMP_*, read by Intel's OpenMP only), and so passed on to its launches.
LAUNCH_VARIABLES = (
    "COLA_TEST_", "WANDB_", "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR", "TOKENIZERS_PARALLELISM", "KMP_",
)  # fmt: skip
MESSAGE_BYTES = 1 << 20


# --- the server ------------------------------------------------------------------------------------------------
def serve(socket_path: str) -> None:
    import importlib
    import selectors
    import threading

    import matplotlib

    matplotlib.use("Agg")  # as cola_hf.charts does before pyplot
    before = dict(os.environ)
    for module in PRELOADED:
        importlib.import_module(module)
    # What the imports wrote into the environment (sklearn's KMP_* variables): a fresh process has it too.
    written_by_imports = {name: value for name, value in os.environ.items() if before.get(name) != value}
    # A fork copies only the forking thread: a lock another thread held would stay held in the child.
    assert threading.active_count() == 1, [thread.name for thread in threading.enumerate()]

    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(socket_path)
    server.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj is server:
                connection, _ = server.accept()
                request, fds, _, _ = socket.recv_fds(connection, MESSAGE_BYTES, 2)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    server.close()
                    connection.close()
                    run_child(json.loads(request), fds, written_by_imports)  # never returns
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    connection.send(str(pid).encode())
                selector.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, connection))
            else:  # a child ended: its status to whoever launched it
                pid, connection = key.data
                selector.unregister(key.fileobj)
                os.close(key.fileobj)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):  # nobody waits for it any more (the test is over)
                    connection.send(str(os.waitstatus_to_exitcode(status)).encode())
                connection.close()


def run_child(request: dict, fds: list[int], written_by_imports: dict[str, str]) -> None:
    """In the forked process: become `python SCRIPT ARGS` (or `python -m MODULE ARGS`) with the request's
    environment, then exit as the interpreter would."""
    import runpy

    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in (stdin, *fds):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**written_by_imports, **request["env"]})
    argv, hooks = request["argv"], request.get("hooks")
    if argv[0] == "-m":  # a launcher (accelerate launch, torchrun): its workers are forked from it, hooks and all
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        fork_workers(hooks)
        status = run_as_main(lambda: runpy.run_module(argv[1], run_name="__main__", alter_sys=True), None)
    else:
        status = run_script(argv, hooks)
    exit_as_interpreter(status)


def run_script(argv: list[str], hooks: str | None) -> int:
    """`python SCRIPT ARGS` in this process, the hooks first as its sitecustomize; its exit status."""
    import runpy

    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
    return run_as_main(lambda: runpy.run_path(argv[0], run_name="__main__"), hooks)


def run_as_main(main, hooks: str | None) -> int:
    import traceback

    try:
        if hooks:
            path = Path(hooks) / "sitecustomize.py"
            exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), {"__name__": "sitecustomize"})
        main()
    except SystemExit as stop:
        return exit_status(stop.code)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def interpreter_exit() -> None:
    """What the interpreter does at exit: non-daemon threads joined, then atexit's handlers, streams flushed."""
    import atexit
    import threading

    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


def exit_as_interpreter(status: int) -> None:
    interpreter_exit()
    os._exit(status)


def fork_workers(hooks: str | None) -> None:
    """torch's elastic agent (under accelerate launch or torchrun) starts its workers, `python -u SCRIPT ARGS`,
    as forks of this launcher instead of fresh interpreters: the agent's own way for a function entrypoint
    (start method "fork"), with everything else of the launch as it is (the environment of each rank, the
    agent's signal forwarding, its handling of a worker that fails). The hooks run in each worker, under its
    RANK, as its sitecustomize would; the atexit handlers the launcher registered stay the launcher's."""
    import atexit

    import torch.distributed.run as distributed_run

    launchers_exit_handlers = []
    register = atexit.register

    def register_launchers(function, *args, **kwargs):
        launchers_exit_handlers.append(function)
        return register(function, *args, **kwargs)

    atexit.register = register_launchers
    config_from_args = distributed_run.config_from_args

    def forked_workers(args):
        config, command, command_args = config_from_args(args)
        if command != sys.executable or command_args[:1] != ["-u"] or command_args[1:2] == ["-m"]:
            return config, command, command_args

        def worker(*argv: str) -> None:
            atexit.register = register
            for function in launchers_exit_handlers:
                atexit.unregister(function)
            status = run_script(list(argv), hooks)
            interpreter_exit()
            if status:
                os._exit(status)  # the agent reads it as a fresh worker's exit status
            # 0: back to torch's worker wrapper, which reports the worker's end to the agent and exits

        worker.__name__ = worker.__qualname__ = os.path.basename(command_args[1])  # the agent's name for it
        config.start_method = "fork"
        return config, worker, command_args[1:]

    distributed_run.config_from_args = forked_workers


def exit_status(code: object) -> int:
    """sys.exit(code) as the interpreter turns it into an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# --- the client, in a pytest worker ----------------------------------------------------------------------------
class ForkServer:
    """The server of this pytest worker: started on first use, under `env`; gone when the worker ends."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.directory = Path(tempfile.mkdtemp(prefix="cola-forkserver-"))
        self.socket_path = str(self.directory / "socket")
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.socket_path], env=env, cwd=cwd, stdout=subprocess.PIPE, text=True
        )
        ready = self.process.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the fork server did not start (exit {self.process.wait()})")

    def can_fork(self, env: dict[str, str]) -> bool:
        changed = {name for name in env.keys() | self.env.keys() if env.get(name) != self.env.get(name)}
        return all(name.startswith(LAUNCH_VARIABLES) for name in changed)

    def start(self, argv: list[str], env: dict[str, str], hooks: Path | None, combined: bool) -> ForkedProcess:
        return ForkedProcess(self.socket_path, argv, env, self.cwd, hooks, combined)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for path in self.directory.iterdir():
            path.unlink()
        self.directory.rmdir()


class ForkedProcess:
    """A forked run, as much of subprocess.Popen as the suite uses: pid, poll, wait, communicate, send_signal,
    kill, returncode. Its output goes to files (text, read once it has ended): stdout and stderr apart, or
    `combined` in one, in the order written (as stderr=STDOUT)."""

    def __init__(
        self, socket_path: str, argv: list[str], env: dict[str, str], cwd: Path, hooks: Path | None, combined: bool
    ) -> None:
        self.args, self.returncode = [sys.executable, *argv], None
        self.outputs = [tempfile.TemporaryFile() for _ in range(1 if combined else 2)]
        request = {"argv": argv, "env": env, "cwd": str(cwd), "hooks": str(hooks) if hooks else None}
        self.connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.connection.connect(socket_path)
        fds = [output.fileno() for output in self.outputs]
        socket.send_fds(self.connection, [json.dumps(request).encode()], fds if not combined else fds * 2)
        self.pid = int(self.connection.recv(64))

    def poll(self) -> int | None:
        if self.returncode is None:
            self.connection.setblocking(False)
            try:
                self._ended(self.connection.recv(64))
            except BlockingIOError:
                pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.connection.settimeout(timeout)
            try:
                self._ended(self.connection.recv(64))
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def _ended(self, message: bytes) -> None:
        if not message:
            raise RuntimeError("the fork server ended before the run did")
        self.returncode = int(message)
        self.connection.close()

    def communicate(self, timeout: float | None = None) -> tuple[str, str | None]:
        self.wait(timeout)
        texts = []
        for output in self.outputs:
            output.seek(0)
            texts.append(output.read().decode("utf-8", errors="replace"))
            output.close()
        self.outputs = []
        return texts[0], (texts[1] if len(texts) > 1 else None)

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


if __name__ == "__main__":
    serve(sys.argv[1])
