"""Several processes that fail or disagree end together, promptly, in one line: never a hang until a timeout.

- A rank that raises mid-training (a fault injected on rank 1 only, through a `sitecustomize` on PYTHONPATH:
  nothing of cola_hf is replaced) ends every process of the run within the launch's time limit, with RUN_FAILED
  written in the output directory, so the directory does not look like a run that was merely stopped.
- Two "machines" that do not share the output directory (two torchrun nodes on localhost, each with its own
  --output_dir, as two nodes with node-local disks): refused on every rank in one line, exit 2.
"""

from __future__ import annotations

import socket
import subprocess
import sys

from launching import REPO, SCRIPT, offline_env, write_hooks

# Raises on rank 1 at the step named by COLA_TEST_FAIL_AT_STEP, as a local divergence check or a device error
# would; rank 0 is then in (or about to enter) the step's gradient all-reduce.
FAIL_ON_RANK_1 = """
import os
_step = os.environ.get("COLA_TEST_FAIL_AT_STEP")
if _step and os.environ.get("RANK") == "1":
    import transformers

    _training_step = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step + 1 == int(_step):
            # As under NCCL, rank 0 must not learn of the failure from its connection to this process: a child
            # keeps the connection open (without stdout or stderr) while this process fails and exits.
            if os.fork() == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                for stream in (0, 1, 2):
                    os.dup2(devnull, stream)
                import time

                time.sleep(float(os.environ["COLA_TEST_HOLD_S"]))
                os._exit(0)
            raise RuntimeError("injected failure on rank 1")
        return _training_step(self, *args, **kwargs)

    transformers.Trainer.training_step = training_step
"""

# Records, at the interpreter's very end (registered first, so run last), whether the process left its process
# group open.
GROUP_AT_EXIT = """
import atexit, os, sys

def _at_exit():
    if "torch.distributed" in sys.modules and os.environ.get("RANK") is not None:
        state = "open" if sys.modules["torch.distributed"].is_initialized() else "closed"
        name = "exit-rank" + os.environ["RANK"] + ".txt"
        with open(os.path.join(os.environ["COLA_TEST_EXIT_LOG"], name), "w") as out:
            out.write(state)

atexit.register(_at_exit)
"""

RUN = [
    *("--max_train_samples", "64", "--num_train_epochs", "2", "--global_train_batch_size", "16"),
    *("--max_seq_length", "16", "--disable_tqdm", "true", "--report_to", "none", "--use_cpu", "true"),
    *("--annotations_source", "none", "--blimp_source", "none"),
]


def test_a_rank_that_raises_ends_every_process_with_run_failed(tmp_path, cola_dir, tiny_model_dir):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FAIL_ON_RANK_1, encoding="utf-8")
    output_dir = tmp_path / "run"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)),
        *("--cola_source", str(cola_dir), "--model_name_or_path", str(tiny_model_dir), *RUN),
        *("--output_dir", str(output_dir)),
    ]
    env = offline_env({"COLA_TEST_FAIL_AT_STEP": "3", "COLA_TEST_HOLD_S": "90"}, hooks)
    # A hang (the survivor in a collective until the launcher's SIGKILL, or the 30-minute distributed timeout)
    # fails here; the run itself takes seconds.
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.returncode != 0
    assert "injected failure on rank 1" in (output_dir / "RUN_FAILED").read_text(encoding="utf-8")
    assert not (output_dir / "results.json").exists()
    # Rank 0 ended on the record of rank 1's failure, not on its connection to it nor on the launcher's SIGKILL.
    assert "another process of the run failed (process 1: unexpected RuntimeError: injected failure" in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_machines_that_do_not_share_the_output_directory_are_refused_on_every_rank(tmp_path, cola_dir, tiny_model_dir):
    """Two torchrun "nodes" on localhost (static rendezvous, --node_rank 0 and 1), each with a directory of its own,
    as two machines whose --output_dir is on a local disk."""
    port, hooks = str(free_port()), write_hooks(tmp_path / "hooks", GROUP_AT_EXIT)
    nodes = []
    for node in (0, 1):
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"),
            *("--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port, str(SCRIPT)),
            *("--cola_source", str(cola_dir), "--model_name_or_path", str(tiny_model_dir), *RUN),
            *("--output_dir", str(tmp_path / f"node{node}" / "run")),
        ]
        env = offline_env({"COLA_TEST_EXIT_LOG": str(tmp_path)}, hooks)
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    # A hang (each node deciding alone whether to resume) fails here.
    outputs = [node.communicate(timeout=120) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode != 0
        lines = [line for line in stderr.splitlines() if line.startswith("cola: error:")]
        assert len(lines) == 1, stderr[-3000:]
        assert "not the same directory on every node: process 1 (on" in lines[0]
        assert "give every node one shared directory" in lines[0]
        assert "exitcode  : 2" in stderr  # torchrun's summary of its worker: a UsageError
    assert not (tmp_path / "node0" / "run" / "trainer_state.json").exists()
    # Refused on every process at once, they closed their group: left open to the interpreter's end, gloo's
    # threads now and then abort a process (SIGABRT), and torchrun reports a signal instead of the refusal.
    exits = {path.name: path.read_text() for path in tmp_path.glob("exit-rank*.txt")}
    assert exits == {"exit-rank0.txt": "closed", "exit-rank1.txt": "closed"}
