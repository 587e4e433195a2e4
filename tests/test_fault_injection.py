"""Cut anywhere, then the same command: the run ends as if it had never been cut, and nothing is lost.

Kill points are drawn (seeded) across a whole run: mid-step in every epoch, during a validation, during a
checkpoint's save, and on the last step; each by SIGTERM (Slurm's preemption: the run saves and stops) or SIGKILL
(the grace period ran out: the run resumes from its last complete checkpoint). The twelve (point, signal) pairs go
to three chains of runs: a seed study cut during its second seed (1 process, length-grouped, W&B offline; it takes
SIGTERM and SIGKILL mid-step in epochs 2 and 3), 2 gloo processes length-grouped (with one more SIGTERM mid-step
in a later epoch), and 1 process with random batches. In a chain each cut falls in one launch of the same
command, the next launch continues, and the last one finishes: its predictions must equal an uncut run's (1e-6),
and so must its results.json, with one W&B run id and the study's first run never trained again. A search is cut
in a trial's second epoch: its trials and best model must be those of the uncut search.

The cut is delivered by a `sitecustomize` in the run's main process (through PYTHONPATH) at the drawn moment: it
sends the real signal, as Slurm would, to the process or to the launcher (SIGTERM), or to every process of the job
(SIGKILL), and for SIGTERM waits until the run has taken it. Nothing of cola_hf is replaced.

Budget: 22 launches of the tiny model on 180 sentences (3 epochs of 12 steps, batches of 16, the last of 4), 7 of
them on 2 processes.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from conftest import REPO, SCRIPT, write_cola_dir

RUN_ID_FILE = ".wandb_run_id"  # where a run keeps its W&B run id (cola_hf.tracking)

EPOCHS, STEPS_PER_EPOCH = 3, 12  # 180 training sentences in batches of 16: 11 full and one of 4
STOPPED = 75
SIGNALS = ("SIGTERM", "SIGKILL")
PREDICTION_FILES = ("out_of_domain_dev", "in_domain_dev", "glue_dev", "validation")
RUN = [
    *("--num_train_epochs", str(EPOCHS), "--learning_rate", "1e-2", "--global_train_batch_size", "16"),
    *("--max_seq_length", "16", "--logging_steps", "4", "--disable_tqdm", "true", "--annotations_source", "none"),
]

HOOKS = """
import json, os, signal, time

_cut = os.environ.get("COLA_TEST_CUT")
if _cut and os.environ.get("RANK", "0") == "0":
    import transformers

    _kind, _number, _signal = _cut.split(":")
    _number, _run = int(_number), os.environ.get("COLA_TEST_CUT_RUN", "")
    _done = []

    def _cut_here(trainer, step):
        if _done or not str(trainer.args.output_dir).endswith(_run):
            return
        _done.append(step)
        with open(os.environ["COLA_TEST_CUT_LOG"], "a") as log:
            log.write(json.dumps({"cut": _cut, "step": step}) + "\\n")
        launched = "LOCAL_RANK" in os.environ  # under accelerate launch: the launcher is the parent
        if _signal == "SIGKILL":  # every process of the job, as Slurm does when the grace period ends
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

    def _at_epoch(trainer):
        epoch = trainer.state.epoch
        return trainer.state.global_step > 0 and epoch is not None and abs(epoch - _number) < 1e-9

    _training_step = transformers.Trainer.training_step
    _evaluation_loop = transformers.Trainer.evaluation_loop
    _save_rng_state = transformers.Trainer._save_rng_state

    def training_step(self, *args, **kwargs):
        step = self.state.global_step + 1  # the step under way
        if (_kind == "step" and step == _number) or (_kind == "last" and step == self.state.max_steps):
            _cut_here(self, step)
        return _training_step(self, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        if _kind == "validation" and kwargs.get("metric_key_prefix") == "eval" and _at_epoch(self):
            _cut_here(self, self.state.global_step)
        return _evaluation_loop(self, *args, **kwargs)

    def save_rng_state(self, output_dir):  # between the weights and trainer_state.json: mid-save
        if _kind == "save" and _at_epoch(self):
            _cut_here(self, self.state.global_step)
        return _save_rng_state(self, output_dir)

    transformers.Trainer.training_step = training_step
    transformers.Trainer.evaluation_loop = evaluation_loop
    transformers.Trainer._save_rng_state = save_rng_state
"""


# --- the kill points -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cut:
    kind: str  # "step" (mid-step), "validation", "save" (mid-save of the epoch's checkpoint), "last" (last step)
    number: int  # the step for "step" and "last", the epoch for "validation" and "save"
    signal: str

    @property
    def event(self) -> int:
        return EVENTS.index(("step", EPOCHS * STEPS_PER_EPOCH) if self.kind == "last" else (self.kind, self.number))

    def env(self) -> str:
        return f"{self.kind}:{self.number}:{self.signal}"


# A run in order: each step, then the epoch's validation, then its checkpoint.
EVENTS = [
    event
    for epoch in range(1, EPOCHS + 1)
    for event in [("step", step) for step in range((epoch - 1) * STEPS_PER_EPOCH + 1, epoch * STEPS_PER_EPOCH + 1)]
    + [("validation", epoch), ("save", epoch)]
]


def resumes_at(cuts: list[Cut]) -> list[int]:
    """The event each launch after a cut starts from: after the checkpoint the cut left (SIGTERM), or after the
    last complete checkpoint before it (SIGKILL); 0 (from scratch) when there is none."""
    checkpoints, starts = [], []
    for cut in cuts:
        epoch_ends = [EVENTS.index(("save", epoch)) for epoch in range(1, EPOCHS + 1)]
        checkpoints += [end for end in epoch_ends if end < cut.event]
        if cut.signal == "SIGTERM":
            # Saved at the step's end, or after the epoch's validation when the step ends an epoch.
            step_ends_epoch = cut.kind in ("step", "last") and cut.number % STEPS_PER_EPOCH == 0
            mid_epoch = cut.kind == "step" and not step_ends_epoch
            checkpoints.append(cut.event if mid_epoch else min(end for end in epoch_ends if end >= cut.event))
        starts.append(max(checkpoints, default=-1) + 1)
    return starts


def draw_chains(seed: int) -> list[list[Cut]]:
    """Every (kind of point, signal) pair once, over three chains, each point drawn within its range.

    The first chain holds the issue's own cases (SIGTERM and SIGKILL mid-step in epochs 2 and 3 of the default
    recipe); the other pairs are dealt at random, and the second chain (2 processes) also gets a SIGTERM mid-step
    in epoch 2 or 3 (a resume within a later epoch is where several processes can lose the epoch's order). A draw
    is kept when each cut of a chain falls after the point its previous cut resumes from (else no launch would
    reach it).
    """
    rng = random.Random(seed)
    default = [("step", epoch, sig) for epoch in (2, 3) for sig in ("SIGTERM", "SIGKILL")]
    rest = [("step", 1, sig) for sig in ("SIGTERM", "SIGKILL")]
    rest += [(kind, 0, sig) for kind in ("validation", "save", "last") for sig in ("SIGTERM", "SIGKILL")]
    for _ in range(1000):
        rng.shuffle(rest)
        dealt = []
        for pairs in (default, [*rest[:4], ("step", rng.choice((2, 3)), "SIGTERM")], rest[4:]):
            cuts = []
            for kind, epoch, sig in pairs:
                if kind == "step":  # any step of the epoch but its last (the last step of the run is "last")
                    number = (epoch - 1) * STEPS_PER_EPOCH + rng.randint(1, STEPS_PER_EPOCH - 1)
                elif kind == "last":
                    number = EPOCHS * STEPS_PER_EPOCH
                else:
                    number = rng.randint(1, EPOCHS)
                cuts.append(Cut(kind, number, sig))
            cuts.sort(key=lambda cut: cut.event)
            dealt.append(cuts)
        if all(
            len({cut.event for cut in cuts}) == len(cuts)
            and all(cut.event >= start for cut, start in zip(cuts[1:], resumes_at(cuts)[:-1], strict=True))
            for cuts in dealt
        ):
            return dealt
    raise AssertionError("no reachable draw")


CHAINS = draw_chains(seed=19)


def test_the_draw_covers_every_kind_of_point_and_both_signals():
    cuts = [cut for chain in CHAINS for cut in chain]
    assert len(cuts) == 13
    assert {(cut.kind, cut.signal) for cut in cuts} == {
        (kind, sig) for kind in ("step", "validation", "save", "last") for sig in ("SIGTERM", "SIGKILL")
    }
    mid_step_epochs = {(cut.number - 1) // STEPS_PER_EPOCH + 1 for cut in cuts if cut.kind == "step"}
    assert mid_step_epochs == {1, 2, 3}


# --- running the command ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_cola_dir(tmp_path_factory.mktemp("faults") / "raw", train=200)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fault-hooks")
    (directory / "sitecustomize.py").write_text(HOOKS, encoding="utf-8")
    return directory


def command(processes: int, flags: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, str(SCRIPT), *flags]
    return [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(REPO / "experiments" / "accelerate" / "multi_gpu.yaml")),
        *("--num_processes", str(processes), "--mixed_precision", "no", str(SCRIPT), *flags, "--use_cpu", "true"),
    ]


def launch(argv: list[str], hooks: Path, log: Path, cut: Cut | None = None, run: str = "") -> tuple[int, str]:
    """The command in a subprocess, cut at `cut` if given; its exit status and output."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
        "COLA_TEST_CUT": cut.env() if cut else "",
        "COLA_TEST_CUT_RUN": run,
        "COLA_TEST_CUT_LOG": str(log),
    }
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    return result.returncode, result.stdout + result.stderr


def wandb_run_ids(run_dir: Path) -> set[str]:
    """The run ids of the W&B offline runs written in the run's directory (offline-run-<time>-<id>)."""
    return {path.name.rsplit("-", 1)[1] for path in (run_dir / "wandb").glob("offline-run-*")}


def predictions(run_dir: Path) -> dict[str, tuple[list[int], np.ndarray]]:
    loaded = {}
    for split in PREDICTION_FILES:
        with (run_dir / f"predictions_{split}.tsv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        loaded[split] = (
            [int(row["prediction"]) for row in rows],
            np.array([float(row["prob_acceptable"]) for row in rows]),
        )
    return loaded


def largest_difference(run_dir: Path, reference: Path) -> float:
    """The largest difference in probability over every prediction file; the predicted classes must agree."""
    got, expected = predictions(run_dir), predictions(reference)
    for split in PREDICTION_FILES:
        assert got[split][0] == expected[split][0], split
    return max(float(np.abs(got[split][1] - expected[split][1]).max()) for split in PREDICTION_FILES)


def assert_same_results(run_dir: Path, reference: Path) -> None:
    got, expected = (json.loads((path / "results.json").read_text(encoding="utf-8")) for path in (run_dir, reference))
    assert got["test"] == expected["test"]
    same = ("epoch", "valid_loss", "valid_accuracy", "valid_mcc")
    assert [[row[key] for key in same] for row in got["epochs"]] == [
        [row[key] for key in same] for row in expected["epochs"]
    ]
    # An epoch cut by a stop sums its training loss in two parts.
    np.testing.assert_allclose(
        [row["training_loss"] for row in got["epochs"]], [row["training_loss"] for row in expected["epochs"]], rtol=1e-9
    )


def cut_chain(
    argv: list[str], cuts: list[tuple[Cut, str]], hooks: Path, log: Path, watched: Path | None
) -> tuple[list[list], list[str]]:
    """Each cut (in the run whose directory ends with its name) in one launch of the same command, then a launch
    that must finish. `watched`: the run that must not finish early and keeps one W&B run. The table's rows, and
    every launch's output. A stop says so in one line, with no traceback before it."""
    rows, outputs, run_id = [], [], None
    for cut, run in cuts:
        before = log.read_text(encoding="utf-8").count("\n") if log.exists() else 0
        status, output = launch(argv, hooks, log, cut, run)
        logged = log.read_text(encoding="utf-8").splitlines()[before:] if log.exists() else []
        assert len(logged) == 1, f"{cut} was not reached (exit {status}):\n{output[-3000:]}"
        step = json.loads(logged[0])["step"]
        if cut.signal == "SIGKILL":
            assert status == -signal.SIGKILL, output[-3000:]
        else:  # the launcher of several processes reports the workers' stop in its own way; one process exits 75
            assert status == STOPPED or (status != 0 and "--num_processes" in argv), output[-3000:]
            # Saved where the signal came: the step under way, or the epoch's end for a validation or a save.
            assert re.search(rf"cola: stopped by SIGTERM at step {step} of \d+; saved checkpoint-{step};", output), (
                output[-3000:]
            )
            assert "Traceback" not in output.split("cola: stopped by")[0], output[-3000:]
        if watched is not None:
            assert not (watched / "results.json").exists()
            if (watched / RUN_ID_FILE).exists():
                current = (watched / RUN_ID_FILE).read_text().strip()
                assert run_id in (None, current)  # one W&B run from the first launch on, whatever the cut
                run_id = current
        rows.append([cut.kind, step, cut.signal, status])
        outputs.append(output)
    status, output = launch(argv, hooks, log)
    assert status == 0, output[-3000:]
    return rows, [*outputs, output]


def report(name: str, rows: list[list], difference: float) -> None:
    print(f"\nfault injection, {name}: kind | step cut at | signal | exit status | largest difference")
    for row in rows:
        print(" | ".join(str(value) for value in [*row, f"{difference:.1e}"]))


def uncut(argv: list[str], hooks: Path, tmp_path: Path) -> None:
    status, output = launch(argv, hooks, tmp_path / "uncut.log")
    assert status == 0, output[-3000:]


@pytest.mark.parametrize(
    ("sampler", "processes", "cuts"),
    [("group_by_length", 2, CHAINS[1]), ("random", 1, CHAINS[2])],
    ids=["group_by_length-2-processes", "random-1-process"],
)
def test_a_run_cut_anywhere_finishes_as_the_uncut_run(tmp_path, data, tiny_model_dir, hooks, sampler, processes, cuts):
    flags = ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data), *RUN, "--report_to", "none",
             "--train_sampling_strategy", sampler]  # fmt: skip
    reference, run_dir = tmp_path / "uncut", tmp_path / "cut"
    uncut(command(processes, [*flags, "--output_dir", str(reference)]), hooks, tmp_path)
    argv = command(processes, [*flags, "--output_dir", str(run_dir)])
    rows, _ = cut_chain(argv, [(cut, "") for cut in cuts], hooks, tmp_path / "cuts.log", run_dir)
    difference = largest_difference(run_dir, reference)
    report(f"{sampler}, {processes} process{'es' if processes > 1 else ''}", rows, difference)
    assert difference <= 1e-6
    assert_same_results(run_dir, reference)


def test_a_seed_study_cut_during_its_second_seed_finishes_as_the_uncut_study(tmp_path, data, tiny_model_dir, hooks):
    flags = ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data), *RUN, "--report_to", "wandb",
             "--seeds", "1", "2"]  # fmt: skip
    reference, study = tmp_path / "uncut", tmp_path / "cut"
    uncut(command(1, [*flags, "--output_dir", str(reference)]), hooks, tmp_path)
    first, second = (f"cola-lr0.01-bs16-ep{EPOCHS}-seed{seed}" for seed in (1, 2))  # the study's run names
    argv = command(1, [*flags, "--output_dir", str(study)])
    rows, outputs = cut_chain(argv, [(cut, second) for cut in CHAINS[0]], hooks, tmp_path / "cuts.log", study / second)
    # The first launch trained seed 1 whole before its cut in seed 2; no later launch trained it again.
    assert all(f"{first}: finished earlier, not run again" in output for output in outputs[1:])

    differences = [largest_difference(study / name, reference / name) for name in (first, second)]
    report("seed study cut in its second seed, group_by_length, 1 process", rows, differences[1])
    assert max(differences) <= 1e-6
    for name in (first, second):
        assert_same_results(study / name, reference / name)
        # One W&B run per seed: the cut one went on as the same run through every launch.
        assert wandb_run_ids(study / name) == {(study / name / RUN_ID_FILE).read_text().strip()}
    summary = json.loads((study / "summary.json").read_text())
    assert summary["seeds"] == [1, 2]
    assert summary["test_mcc"] == json.loads((reference / "summary.json").read_text())["test_mcc"]


def test_a_search_cut_in_a_trials_second_epoch_keeps_every_trial(tmp_path, data, tiny_model_dir, hooks):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"method": "random", "parameters": {"learning_rate": {"values": [1e-2, 3e-3]}}}))
    flags = ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data), *RUN, "--report_to", "none",
             "--num_train_epochs", "2", "--search", str(space), "--n_trials", "2",
             "--search_pruner", "none"]  # fmt: skip
    reference, search = tmp_path / "uncut", tmp_path / "cut"
    uncut(command(1, [*flags, "--output_dir", str(reference)]), hooks, tmp_path)
    # The second trial, cut in its second epoch: it is run again from its start, as trial 2.
    rng = random.Random(19)
    cuts = [(Cut("step", STEPS_PER_EPOCH + rng.randint(1, STEPS_PER_EPOCH - 1), rng.choice(SIGNALS)), "trial-001")]
    argv = command(1, [*flags, "--output_dir", str(search)])
    rows, _ = cut_chain(argv, cuts, hooks, tmp_path / "cuts.log", None)

    got, expected = study_trials(search), study_trials(reference)
    assert [trial.state.name for trial in got] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert [trial.state.name for trial in expected] == ["COMPLETE", "COMPLETE"]
    # Trial 0 was never run again; the rerun of the cut trial is the uncut search's trial 1, to the last digit.
    assert (got[0].params, got[0].value) == (expected[0].params, expected[0].value)
    assert (got[2].params, got[2].value) == (expected[1].params, expected[1].value)
    for ours, theirs in (("trial-000", "trial-000"), ("trial-002", "trial-001")):
        epochs = [json.loads((out / "trials" / name / "results.json").read_text())["epochs"]
                  for out, name in ((search, ours), (reference, theirs))]  # fmt: skip
        assert [row["valid_mcc"] for row in epochs[0]] == [row["valid_mcc"] for row in epochs[1]]
    difference = largest_difference(search / "best", reference / "best")
    report(
        "search cut in a trial's second epoch, 1 process",
        [[f"{run}: {row[0]}", *row[1:]] for (_, run), row in zip(cuts, rows, strict=True)],
        difference,
    )
    assert difference <= 1e-6


def study_trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search" / "study.journal"))
    )
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials()
