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

The cut is delivered by the signal hooks of tests/launching.py (a `sitecustomize` in the run's main process) at
the drawn moment: they send the real signal, as Slurm would, to the process or to the launcher (SIGTERM), or to
every process of the job (SIGKILL), and for SIGTERM wait until the run has taken it. Nothing of cola_hf is replaced.

Each cut also proves what a stop promises: a SIGTERM ends in one line (step, checkpoint, "run the same command to
continue"), exit 75, a complete checkpoint where the signal came (after the epoch's validation for a cut during
it, and that validation is in the checkpoint), no results.json or model card, and the next launch says it continues
from that checkpoint; a SIGKILL mid-save leaves a checkpoint that the next launch names as incomplete and passes
over; a SIGKILL leaves no lock that stops the next launch. On 2 processes every process saved its random state,
and the same directory on 1 process is refused in one line.

Budget: 22 launches of the tiny model on 180 sentences (3 epochs of 12 steps, batches of 16, the last of 4), 7 of
them on 2 processes.
"""

from __future__ import annotations

import csv
import json
import random
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from launching import STOPPED, cola_command, run_here, run_process

RUN_ID_FILE = ".wandb_run_id"  # where a run keeps its W&B run id (cola_hf.tracking)

EPOCHS, STEPS_PER_EPOCH = 3, 12  # 180 training sentences in batches of 16: 11 full and one of 4
SIGNALS = ("SIGTERM", "SIGKILL")
PREDICTION_FILES = ("out_of_domain_dev", "in_domain_dev", "glue_dev", "validation")
RUN = [
    *("--num_train_epochs", str(EPOCHS), "--learning_rate", "1e-2", "--global_train_batch_size", "16"),
    *("--max_seq_length", "16", "--logging_steps", "4", "--disable_tqdm", "true", "--annotations_source", "none"),
    *("--blimp_source", "none", "--explain_pairs", "0"),
]


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
def data(cola_dir) -> Path:
    return cola_dir  # 200 training rows: 180 after the 10% validation split


def launch(argv: list[str], signal_hooks: Path, log: Path, cut: Cut | None = None, run: str = "") -> tuple[int, str]:
    """The command in a process of its own, cut at `cut` if given; its exit status and output."""
    env = {"WANDB_MODE": "offline", "COLA_TEST_CUT": cut.env() if cut else "", "COLA_TEST_CUT_RUN": run,
           "COLA_TEST_CUT_LOG": str(log)}  # fmt: skip
    result = run_process(argv, env, signal_hooks, timeout=300)
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
    argv: list[str],
    cuts: list[tuple[Cut, str]],
    hooks: Path,
    log: Path,
    watched: Path | None,
    after_cut: Callable[[Cut, int], None] | None = None,
    total_steps: int = EPOCHS * STEPS_PER_EPOCH,
) -> tuple[list[list], list[str]]:
    """Each cut (in the run whose directory ends with its name) in one launch of the same command, then a launch
    that must finish. `watched`: the cut run's directory, whose launches continue it (not a search's trial, which
    is run again from its start): what each stop left there is checked. `after_cut(cut, step)` runs after each
    cut's launch. The table's rows, and every launch's output. A stop says so in one line, with no traceback
    before it."""
    rows, outputs, run_id, expected_next = [], [], None, []
    for cut, run in cuts:
        before = log.read_text(encoding="utf-8").count("\n") if log.exists() else 0
        status, output = launch(argv, hooks, log, cut, run)
        assert all(line in output for line in expected_next), (expected_next, output[-3000:])
        logged = log.read_text(encoding="utf-8").splitlines()[before:] if log.exists() else []
        assert len(logged) == 1, f"{cut} was not reached (exit {status}):\n{output[-3000:]}"
        step = json.loads(logged[0])["step"]
        expected_next = []
        if cut.signal == "SIGKILL":
            assert status == -signal.SIGKILL, output[-3000:]
            if watched is not None and cut.kind == "save":  # half-written: named and passed over
                assert not (watched / f"checkpoint-{step}" / "trainer_state.json").exists()
                expected_next = [f"checkpoint-{step} is incomplete (the run stopped while saving it)"]
        else:  # the launcher of several processes reports the workers' stop in its own way; one process exits 75
            assert status == STOPPED or (status != 0 and "--num_processes" in argv), output[-3000:]
            # Saved where the signal came: the step under way, or the epoch's end for a validation or a save.
            assert re.search(
                rf"^cola: stopped by SIGTERM at step {step} of {total_steps}; saved checkpoint-{step}; "
                r"run the same command to continue$",
                output,
                re.MULTILINE,
            ), output[-3000:]
            assert "Traceback" not in output.split("cola: stopped by")[0], output[-3000:]
            if watched is not None:
                state = json.loads((watched / f"checkpoint-{step}" / "trainer_state.json").read_text())
                validated = [entry["epoch"] for entry in state["log_history"] if "eval_loss" in entry]
                if cut.kind == "validation":  # it finished before the save: the next launch does not repeat it
                    assert validated[-1] == cut.number, validated
                expected_next = [f"continuing from checkpoint-{step}"]
        if watched is not None:
            assert not (watched / "results.json").exists() and not (watched / "README.md").exists()
            if (watched / RUN_ID_FILE).exists():
                current = (watched / RUN_ID_FILE).read_text().strip()
                assert run_id in (None, current)  # one W&B run from the first launch on, whatever the cut
                run_id = current
        if after_cut is not None:
            after_cut(cut, step)
        rows.append([cut.kind, step, cut.signal, status])
        outputs.append(output)
    status, output = launch(argv, hooks, log)
    assert status == 0, output[-3000:]
    assert all(line in output for line in expected_next), (expected_next, output[-3000:])
    return rows, [*outputs, output]


def report(name: str, rows: list[list], difference: float) -> None:
    print(f"\nfault injection, {name}: kind | step cut at | signal | exit status | largest difference")
    for row in rows:
        print(" | ".join(str(value) for value in [*row, f"{difference:.1e}"]))


def uncut(flags: list[object], signal_hooks: Path, tmp_path: Path, processes: int = 1) -> None:
    """The reference: the same command, never cut. On one process without W&B in this process (run_here): the
    same run, without a launch's imports."""
    if processes == 1 and "wandb" not in flags:
        result = run_here(*flags)
        status, output = result.returncode, result.stdout + result.stderr
    else:
        status, output = launch(cola_command(*flags, processes=processes), signal_hooks, tmp_path / "uncut.log")
    assert status == 0, output[-3000:]


def refused_on_another_number_of_processes(run_dir: Path, flags: list[str]) -> Callable[[Cut, int], None]:
    """After the first SIGTERM of a 2-process chain: both processes saved their random state, and the same
    directory on 1 process is refused in one line (each process continues its own random state)."""
    checked = []

    def check(cut: Cut, step: int) -> None:
        if cut.signal != "SIGTERM" or checked:
            return
        checked.append(step)
        checkpoint = run_dir / f"checkpoint-{step}"
        assert {path.name for path in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
        one = run_here(*flags, "--output_dir", run_dir)
        assert one.returncode == 2 and "Traceback" not in one.stderr, one.stderr[-3000:]
        assert [line for line in one.stderr.splitlines() if line.startswith("cola: error:")] == [
            f"cola: error: {checkpoint}: saved by 2 processes, and this run has 1; each process continues its own "
            "random state, so it continues exactly only on 2: launch 2, or pass --overwrite_output_dir to start over"
        ]

    check.checked = checked
    return check


@pytest.mark.parametrize(
    ("sampler", "processes", "cuts"),
    [
        pytest.param("group_by_length", 2, CHAINS[1], marks=pytest.mark.xdist_group("faults-2-processes")),
        pytest.param("random", 1, CHAINS[2], marks=pytest.mark.xdist_group("faults-1-process")),
    ],
    ids=["group_by_length-2-processes", "random-1-process"],
)
def test_a_run_cut_anywhere_finishes_as_the_uncut_run(
    tmp_path, data, tiny_model_dir, signal_hooks, sampler, processes, cuts
):
    flags = ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data), *RUN, "--report_to", "none",
             "--train_sampling_strategy", sampler]  # fmt: skip
    reference, run_dir = tmp_path / "uncut", tmp_path / "cut"
    uncut([*flags, "--output_dir", reference], signal_hooks, tmp_path, processes)
    argv = cola_command(*flags, "--output_dir", run_dir, processes=processes)
    after_cut = refused_on_another_number_of_processes(run_dir, flags) if processes > 1 else None
    rows, _ = cut_chain(argv, [(cut, "") for cut in cuts], signal_hooks, tmp_path / "cuts.log", run_dir, after_cut)
    if after_cut is not None:
        assert after_cut.checked, "no SIGTERM in the 2-process chain"
    difference = largest_difference(run_dir, reference)
    report(f"{sampler}, {processes} process{'es' if processes > 1 else ''}", rows, difference)
    assert difference <= 1e-6
    assert_same_results(run_dir, reference)


@pytest.mark.xdist_group("faults-seed-study")
def test_a_seed_study_cut_during_its_second_seed_finishes_as_the_uncut_study(
    tmp_path, data, tiny_model_dir, signal_hooks
):
    flags = ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data), *RUN, "--report_to", "wandb",
             "--seeds", "1", "2"]  # fmt: skip
    reference, study = tmp_path / "uncut", tmp_path / "cut"
    uncut([*flags, "--output_dir", reference], signal_hooks, tmp_path)
    first, second = (f"cola-lr0.01-bs16-ep{EPOCHS}-seed{seed}" for seed in (1, 2))  # the study's run names
    argv = cola_command(*flags, "--output_dir", study)
    rows, outputs = cut_chain(
        argv, [(cut, second) for cut in CHAINS[0]], signal_hooks, tmp_path / "cuts.log", study / second
    )
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


@pytest.mark.xdist_group("faults-search")
def test_a_search_cut_in_a_trials_second_epoch_keeps_every_trial(tmp_path, data, tiny_model_dir, signal_hooks):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"method": "random", "parameters": {"learning_rate": {"values": [1e-2, 3e-3]}}}))
    flags = ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(data), *RUN, "--report_to", "none",
             "--num_train_epochs", "2", "--search", str(space), "--n_trials", "2",
             "--search_pruner", "none"]  # fmt: skip
    reference, search = tmp_path / "uncut", tmp_path / "cut"
    uncut([*flags, "--output_dir", reference], signal_hooks, tmp_path)
    # The second trial, cut in its second epoch: it is run again from its start, as trial 2.
    rng = random.Random(19)
    cuts = [(Cut("step", STEPS_PER_EPOCH + rng.randint(1, STEPS_PER_EPOCH - 1), rng.choice(SIGNALS)), "trial-001")]
    argv = cola_command(*flags, "--output_dir", search)
    rows, _ = cut_chain(argv, cuts, signal_hooks, tmp_path / "cuts.log", None, total_steps=2 * STEPS_PER_EPOCH)

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
