"""`--search`: the sweep file as an Optuna space, bad input, and whole searches with the tiny model.

The searches train on CoLA-format files whose label follows the verb ("saw": acceptable, "praised": not), a
rule the tiny random BERT learns within an epoch at a high learning rate and not at all at a tiny one, so
trials differ in validation MCC and the best one is the one that learned.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from launching import REPO, cola_command, run_process, start_process, write_hooks

from cola_hf.config import make_parser
from cola_hf.errors import UsageError
from cola_hf.studies.search.space import load_space

WIDE = REPO / "experiments" / "sweeps" / "wide.yaml"
GRID = REPO / "experiments" / "sweeps" / "bert_paper_grid.yaml"


@pytest.fixture(scope="module")
def cola_main():
    from cola_hf.cli.train import main

    return main


@pytest.fixture
def base_args(verb_cola_dir, encoder_dir, monkeypatch) -> list[str]:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return [
        "--cola_source", str(verb_cola_dir), "--model_name_or_path", str(encoder_dir),
        "--max_seq_length", "16", "--global_train_batch_size", "8", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip


def write_sweep(path: Path, method: str, parameters: dict) -> Path:
    sweep = {"method": method, "metric": {"name": "eval/matthews_correlation", "goal": "maximize"}}
    path.write_text(yaml.safe_dump({**sweep, "parameters": parameters}))
    return path


def load_study(out: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search" / "study.journal"))
    )
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def states(out: Path) -> dict[int, str]:
    return {trial.number: trial.state.name for trial in load_study(out).get_trials(deepcopy=False)}


# --- the sweep file as a search space ------------------------------------------------------------------------------
def test_shipped_sweep_files_are_optuna_spaces_over_options_of_the_run():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    wide = load_space(WIDE, make_parser())
    assert wide.method == "bayes"
    assert {name: parameter.distribution for name, parameter in wide.parameters.items()} == {
        "learning_rate": FloatDistribution(1e-5, 3e-4, log=True),
        "warmup_steps": FloatDistribution(0.0, 0.2),
        "weight_decay": CategoricalDistribution([0.0, 0.01]),
        "num_train_epochs": IntDistribution(2, 5),
        "global_train_batch_size": CategoricalDistribution([16, 32]),
        "layerwise_lr_decay": FloatDistribution(0.6, 1.0),
        "reinit_top_layers": CategoricalDistribution([0, 1, 2]),
    }
    # Each drawn value becomes the option's own type, as the flag would give it.
    values = wide.option_values({"num_train_epochs": 3, "global_train_batch_size": 32, "learning_rate": 1e-4})
    assert values == {"num_train_epochs": 3.0, "global_train_batch_size": 32, "learning_rate": 1e-4}
    assert type(values["num_train_epochs"]) is float and type(values["global_train_batch_size"]) is int

    grid = load_space(GRID, make_parser(), method="grid")
    assert grid.grid() == {
        "global_train_batch_size": [16, 32],
        "learning_rate": [5e-5, 3e-5, 2e-5],
        "num_train_epochs": [2.0, 3.0, 4.0],
    }
    assert grid.grid_size() == 18


def test_wide_sweep_runs_under_the_wandb_agent_too(monkeypatch):
    """One file for both: the agent's command line for a point of wide.yaml parses as a run's options."""
    from test_tracking import agent_command

    from cola_hf.config import parse_args

    sweep = yaml.safe_load(WIDE.read_text())
    monkeypatch.chdir(REPO)
    point = {
        "learning_rate": 1.2e-4,
        "warmup_steps": 0.1,
        "weight_decay": 0.01,
        "num_train_epochs": 3,
        "global_train_batch_size": 16,
        "layerwise_lr_decay": 0.8,
        "reinit_top_layers": 1,
    }
    options = parse_args(agent_command(sweep, point)[3:])
    args = options.training
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.num_train_epochs) == (1.2e-4, 0.1, 0.01, 3)
    assert (args.layerwise_lr_decay, args.reinit_top_layers) == (0.8, 1)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 16
    assert args.get_warmup_steps(100) == 10  # below 1, warmup_steps is a fraction of the training steps


def test_every_wandb_distribution_with_an_optuna_equivalent(tmp_path):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    path = write_sweep(
        tmp_path / "kinds.yaml",
        "random",
        {
            "learning_rate": {"distribution": "log_uniform", "min": -11.5, "max": -8.1},
            "adam_beta1": {"distribution": "q_uniform", "min": 0.8, "max": 0.9, "q": 0.05},
            "weight_decay": {"min": 0.0, "max": 0.1},  # floats: W&B infers uniform
            "max_seq_length": {"min": 16, "max": 64},  # integers: W&B infers int_uniform
            "pad_to_max_length": {"values": [True, False]},
            "seed": {"value": 7},
        },
    )
    space = load_space(path, make_parser())
    kinds = {name: parameter.distribution for name, parameter in space.parameters.items()}
    assert kinds["learning_rate"].log and kinds["learning_rate"].low == pytest.approx(1.01e-5, rel=1e-2)
    assert kinds["adam_beta1"] == FloatDistribution(0.8, 0.9, step=0.05)
    assert kinds["weight_decay"] == FloatDistribution(0.0, 0.1)
    assert kinds["max_seq_length"] == IntDistribution(16, 64)
    assert kinds["pad_to_max_length"] == CategoricalDistribution([True, False])
    assert kinds["seed"] == CategoricalDistribution([7])

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    values = space.suggest(study.ask())
    assert 0.8 <= values["adam_beta1"] <= 0.9 and type(values["max_seq_length"]) is int and values["seed"] == 7


BAD_SPACES = {
    "unknown option": ({"learnin_rate": {"values": [1e-5]}}, "'learnin_rate' is not an option of experiments/cola.py"),
    "empty values": ({"learning_rate": {"values": []}}, "'values' must be a non-empty list"),
    "min above max": (
        {"learning_rate": {"distribution": "uniform", "min": 3e-4, "max": 1e-5}},
        "min 0.0003 is greater than max 1e-05",
    ),
    "log range from 0": (  # weight decay may be 0 (learning_rate's own range refuses 0 before the log check)
        {"weight_decay": {"distribution": "log_uniform_values", "min": 0, "max": 1e-2}},
        "a log range needs min > 0",
    ),
    "out of the option's range": (
        {"learning_rate": {"distribution": "log_uniform_values", "min": 0, "max": 1e-4}},
        "--learning_rate 0: out of range, expected > 0",
    ),
    "wrong type": ({"global_train_batch_size": {"values": [16, "big"]}}, "does not take 'big'"),
    "fractions for an integer option": (
        {"global_train_batch_size": {"distribution": "uniform", "min": 8, "max": 32}},
        "the option takes integers",
    ),
    "set by the search": ({"output_dir": {"values": ["a", "b"]}}, "'output_dir' cannot be searched"),
    "no Optuna equivalent": (
        {"learning_rate": {"distribution": "normal", "mu": 0, "sigma": 1}},
        "distribution 'normal' has no Optuna equivalent",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_a_bad_sweep_file_is_one_line_and_exit_2(case, tmp_path, base_args, cola_main, capsys):
    parameters, message = BAD_SPACES[case]
    path = write_sweep(tmp_path / "bad.yaml", "random", parameters)
    argv = [*base_args, "--output_dir", str(tmp_path / "out"), "--search", str(path), "--n_trials", "2"]
    assert cola_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cola: error: {path}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_sweep_file_shapes(tmp_path):
    parser = make_parser()
    cases = {
        "method: hyperopt\nparameters: {seed: {value: 1}}\n": "method is 'hyperopt'",
        "method: grid\nparameters: {learning_rate: {distribution: uniform, min: 0.1, max: 0.2}}\n": "finitely many",
        "method: random\nmetric: {name: eval/loss, goal: maximize}\nparameters: {seed: {value: 1}}\n": "optimises",
        "method: random\nmetric: {name: eval/accuracy}\nparameters: {seed: {value: 1}}\n": "optimises",
        "method: random\nmetric: eval/loss\nparameters: {seed: {value: 1}}\n": "optimises",
        "method: random\nparameters: {}\n": "non-empty 'parameters'",
        "method: random\nparameters: [\n": "not valid YAML",
    }
    for text, message in cases.items():
        path = tmp_path / "sweep.yaml"
        path.write_text(text)
        with pytest.raises(UsageError, match=message):
            load_space(path, parser)
    with pytest.raises(UsageError, match="--grid runs a grid"):
        load_space(WIDE, parser, method="grid")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--search", str(WIDE), "--n_trials", "0"], "--n_trials 0: out of range, expected >= 1"),
        (["--search", str(WIDE)], "needs --n_trials N"),
        (["--search", str(WIDE), "--n_trials", "2", "--seeds", "1", "2"], "--search with --seeds or --grid"),
        (["--search", str(WIDE), "--n_trials", "2", "--grid", str(GRID)], "--search with --seeds or --grid"),
        (["--search", str(WIDE), "--n_trials", "2", "--search_storage", "no such url"], "not a storage URL"),
        (
            ["--search", str(WIDE), "--n_trials", "2", "--search_storage", "sqlite:////no/such/dir/study.db"],
            "cannot open",
        ),
        (
            ["--search", str(WIDE), "--n_trials", "2", "--search_storage", "postgresql://me:secret@127.0.0.1:9/db"],
            "cannot open",
        ),
        (["--search", str(WIDE), "--n_trials", "2", "--search_pruner", "asha"], "invalid choice: 'asha'"),
    ],
)
def test_bad_search_flags_are_one_line_and_exit_2(flags, message, tmp_path, base_args, cola_main, capsys):
    assert cola_main([*base_args, "--output_dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cola: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "secret" not in err


# --- a whole search --------------------------------------------------------------------------------------------
@pytest.mark.lowest
def test_search_end_to_end_keeps_only_the_best_model_and_never_scores_a_test_set(
    tmp_path, base_args, encoder_dir, verb_cola_dir, cola_main, capsys, blimp_dir
):
    from transformers import pipeline

    from cola_hf.config import parse_args
    from cola_hf.data import cola as data
    from cola_hf.run import tokenize_files
    from cola_hf.studies.search.worker import run_search
    from cola_hf.training.model import load_model_and_tokenizer

    space = write_sweep(
        tmp_path / "space.yaml",
        "grid",
        {"learning_rate": {"values": [1e-7, 5e-3, 2e-3]}, "num_train_epochs": {"value": 2}},
    )
    out = tmp_path / "search"
    argv = [*base_args, "--output_dir", str(out), "--search", str(space), "--blimp_source", str(blimp_dir)]

    # Every read of a test file's rows is timed: none may come before the last trial ended.
    options = parse_args(argv)
    _, tokenizer = load_model_and_tokenizer(str(encoder_dir))
    files = tokenize_files(options, data.read_cola(str(verb_cola_dir)), tokenizer)
    reads: list[datetime] = []

    def timed(batch: dict) -> dict:
        reads.append(datetime.now())
        return batch

    for split in ("in_domain_dev", "out_of_domain_dev"):
        files[split] = files[split].with_transform(timed)
    run_search(options, files)

    study = load_study(out)
    trials = study.get_trials(deepcopy=False)
    assert [trial.state.name for trial in trials] == ["COMPLETE"] * 3
    assert reads and min(reads) > max(trial.datetime_complete for trial in trials)

    table = pd.read_csv(out / "search" / "trials.csv")
    assert list(table.columns[:4]) == ["number", "state", "learning_rate", "num_train_epochs"]
    assert {"best_valid_mcc", "best_epoch", "training_time_s"} <= set(table.columns)
    best = study.best_trial
    assert best.params["learning_rate"] in (5e-3, 2e-3) and best.value == 1.0  # the trial that learned
    for trial in trials:
        trial_dir = out / "trials" / f"trial-{trial.number:03d}"
        results = json.loads((trial_dir / "results.json").read_text())
        # The objective is the trial's best validation MCC; no test set (nor BLiMP) was scored for it.
        assert trial.value == max(epoch["valid_mcc"] for epoch in results["epochs"])
        assert results["test"] == {} and not list(trial_dir.glob("predictions_*"))
        # Disk: no checkpoints left, and a model only in the best trial.
        assert not list(trial_dir.glob("checkpoint-*"))
        assert (trial_dir / "model").is_dir() == (trial.number == best.number)

    best_dir = out / "best"
    results = json.loads((best_dir / "results.json").read_text())
    assert results["config"]["learning_rate"] == best.params["learning_rate"]
    assert results["config"]["search"]["trial"] == best.number
    assert (
        results["epochs"]
        == json.loads((out / "trials" / f"trial-{best.number:03d}" / "results.json").read_text())["epochs"]
    )
    assert results["test"]["glue_dev"]["matthews_correlation"] == 1.0  # the rule holds on the test sets too
    assert (best_dir / "predictions_glue_dev.tsv").is_file() and (best_dir / "learning_curve.png").is_file()
    assert (best_dir / "predictions_blimp.tsv").is_file() and (best_dir / "blimp.json").is_file()  # best/ only
    card = (best_dir / "README.md").read_text()
    assert "## Hyperparameter search" in card and f"trial {best.number}" in card
    classifier = pipeline("text-classification", model=str(best_dir))
    assert classifier("mary saw it.")[0]["label"] == "acceptable"
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (out / "search" / plot).is_file()

    # The same command again: nothing to add, nothing rebuilt.
    built = (best_dir / "results.json").stat().st_mtime_ns
    assert cola_main(argv) == 0
    assert len(load_study(out).get_trials()) == 3 and (best_dir / "results.json").stat().st_mtime_ns == built

    # best_params.yaml is a recipe that runs as is, and with the search's seed it retraces the best trial:
    # the same new classifier head, the same batches, the same epochs to the last digit.
    recipe = out / "search" / "best_params.yaml"
    assert cola_main([str(recipe), "--seeds", "42", "--output_dir", str(tmp_path / "confirm")]) == 0
    (confirm,) = (tmp_path / "confirm").glob("*/results.json")
    confirmed = json.loads(confirm.read_text())
    assert confirmed["config"]["learning_rate"] == best.params["learning_rate"]
    assert confirmed["config"]["load_best_model_at_end"]
    retraced = ("training_loss", "valid_loss", "valid_accuracy", "valid_mcc")
    assert [{name: epoch[name] for name in retraced} for epoch in confirmed["epochs"]] == [
        {name: epoch[name] for name in retraced} for epoch in results["epochs"]
    ]

    # cola-compare reads the trials.
    from cola_hf.cli.compare import main as compare_main

    trial_dirs = sorted(str(path) for path in (out / "trials").iterdir())
    assert compare_main([*trial_dirs, "--output", str(tmp_path / "comparison")]) == 0


def test_a_hopeless_trial_is_pruned_after_its_second_epoch(tmp_path, base_args, cola_main, monkeypatch):
    """With five trials that reached MCC 0.9 by epoch 2, one still at 0 there is stopped and recorded as pruned."""
    from test_tracking import offline_runs, stored_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    space_file = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"value": 1e-7}})
    out = tmp_path / "search"
    argv = [*base_args, "--output_dir", str(out), "--search", str(space_file), "--n_trials", "6"]
    argv += ["--num_train_epochs", "4", "--experiment_name", "pruning", "--report_to", "wandb"]
    (out / "search").mkdir(parents=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search" / "study.journal"))
    )
    study = optuna.create_study(study_name="pruning", storage=storage, direction="maximize")
    study.set_user_attr("space", load_space(space_file, make_parser()).fingerprint())
    distributions = {"learning_rate": optuna.distributions.CategoricalDistribution([1e-7])}
    for _ in range(5):  # finished earlier by other workers
        study.add_trial(
            optuna.trial.create_trial(
                params={"learning_rate": 1e-7},
                distributions=distributions,
                value=0.9,
                intermediate_values={1: 0.5, 2: 0.9, 3: 0.9, 4: 0.9},
            )
        )
    assert cola_main(argv) == 0

    trial = load_study(out).get_trials(deepcopy=False)[-1]
    assert (trial.number, trial.state.name, sorted(trial.intermediate_values)) == (5, "PRUNED", [1, 2])
    trial_dir = out / "trials" / "trial-005"
    assert len(json.loads((trial_dir / "results.json").read_text())["epochs"]) == 2
    assert not (trial_dir / "model").exists()
    row = pd.read_csv(out / "search" / "trials.csv").iloc[-1]
    assert (row["state"], row["note"]) == ("PRUNED", "pruned after epoch 2")
    assert "saved 2 epochs" in (out / "search" / "trials.md").read_text()
    # Every trial is a W&B run of the search's group.
    (run_dir,) = offline_runs(trial_dir / "wandb")
    stored = stored_run(run_dir)
    assert (stored["run"].display_name, stored["run"].run_group) == ("pruning-trial-005", "pruning")
    assert [row["eval/matthews_correlation"] for row in stored["history"] if "eval/matthews_correlation" in row] == [
        0.0,
        0.0,
    ]


@pytest.mark.lowest
def test_a_search_on_a_database_url_runs_its_trials_there(tmp_path, base_args, cola_main):
    """--search_storage URL: Optuna's RDB storage, with heartbeats and the stale-trial retry (SQLite here)."""
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3, 1e-7]}})
    url = f"sqlite:///{tmp_path / 'study.db'}"
    argv = [*base_args, "--output_dir", str(tmp_path / "search"), "--search", str(space), "--n_trials", "2"]
    assert cola_main([*argv, "--num_train_epochs", "1", "--search_storage", url]) == 0
    (name,) = optuna.get_all_study_names(url)
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE"]
    assert not (tmp_path / "search" / "search" / "study.journal").exists()  # the URL's database, not the journal
    assert json.loads((tmp_path / "search" / "best" / "results.json").read_text())["config"]["search"]["n_trials"] == 2


@pytest.mark.xdist_group("search-two-workers")  # searches in subprocesses: a group of their own
def test_two_workers_run_exactly_n_trials_between_them_and_best_is_the_first_of_equals_though_it_ends_last(
    tmp_path, base_args, signal_hooks
):
    """Two workers on one journal run exactly --n_trials between them, and best/ holds the best trial even when it
    ends last. Every trial is the same run (one learning rate, one seed: equal values); worker A's trial 0 is held
    at step 2 until worker B has run trials 1 and 2. Trial 0, the first of equals, is the best. (A trial saved its
    model only if it beat the best so far: trial 0 ended with none, and best/ was never built.)"""
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3]}})
    out, hold = tmp_path / "search", tmp_path / "hold"
    hold.touch()
    command = cola_command(*base_args, "--output_dir", out, "--search", space, "--n_trials", "3")
    command += ["--num_train_epochs", "2"]
    worker_a = start_process(command, {"COLA_TEST_HOLD": f"step:2:{hold}"}, signal_hooks)
    try:
        assert wait_until(lambda: Path(f"{hold}.reached").exists(), timeout=120), "worker A never reached step 2"
        worker_b = start_process(command)
        b_ran_its_trials = wait_until(lambda: states(out) == {0: "RUNNING", 1: "COMPLETE", 2: "COMPLETE"}, 240)
    finally:
        hold.unlink()
    logs = [worker.communicate(timeout=300)[0] for worker in (worker_a, worker_b)]
    assert b_ran_its_trials, logs[1][-3000:]
    assert [worker.returncode for worker in (worker_a, worker_b)] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "This worker ran trials [0]" in logs[0] and "This worker ran trials [1, 2]" in logs[1]
    study = load_study(out)
    assert len({trial.value for trial in study.get_trials()}) == 1  # equals, as the test needs
    results = json.loads((out / "best" / "results.json").read_text())
    assert results["config"]["search"]["trial"] == 0, logs[0][-3000:] + logs[1][-3000:]
    assert [path.parent.name for path in (out / "trials").glob("*/model")] == ["trial-000"]  # the others discarded


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


class RecordsATrialAfterTheNextRead(optuna.storages.InMemoryStorage):
    """A study's storage where another worker records a trial's end right after the next read of the trials."""

    def __init__(self) -> None:
        super().__init__()
        self.after_next_read = None

    def get_all_trials(self, *args, **kwargs):
        trials = super().get_all_trials(*args, **kwargs)
        if self.after_next_read is not None:
            other_worker, self.after_next_read = self.after_next_read, None
            other_worker()
        return trials


def test_discarding_models_keeps_the_model_of_a_trial_another_worker_records_meanwhile(tmp_path, base_args):
    """Trial 1 ended (0.5, its model kept); trial 0 is running in another worker, which records it (0.9, the
    best) while this worker discards models. Its model stays. (discard_models read the best, then the trials: a
    trial recorded between the two reads was not running any more, nor the best it had read, and lost its
    model; the study's best then had none, and best/ was never built.)"""
    from filelock import FileLock

    from cola_hf.config import parse_args
    from cola_hf.studies.search.study import MODEL_DIR, Search, discard_models

    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3]}})
    options = parse_args([*base_args, "--output_dir", str(tmp_path / "search"), "--search", str(space)])
    storage = RecordsATrialAfterTheNextRead()
    study = optuna.create_study(storage=storage, direction="maximize")
    lock = FileLock(str(tmp_path / "lock"))
    search = Search(options, load_space(space), 2, study, "g", lock, lock)
    running, ended = study.ask(), study.ask()
    study.tell(ended, 0.5)
    for trial in (running, ended):
        (search.trial_dir(trial.number) / MODEL_DIR).mkdir(parents=True)
    storage.after_next_read = lambda: study.tell(running, 0.9)
    discard_models(search)
    assert [trial.state.name for trial in study.get_trials()] == ["COMPLETE", "COMPLETE"]  # recorded meanwhile
    assert (search.trial_dir(running.number) / MODEL_DIR).is_dir()  # the best's model
    discard_models(search)  # the next look: trial 1 is not the best, its model goes
    assert not (search.trial_dir(ended.number) / MODEL_DIR).exists()
    assert (search.trial_dir(running.number) / MODEL_DIR).is_dir()


@pytest.mark.xdist_group("search-sigkill")
def test_sigkill_mid_trial_then_the_same_command_fails_and_reruns_only_the_interrupted_trial(
    tmp_path, base_args, signal_hooks
):
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3, 2e-3, 1e-3]}})
    out = tmp_path / "search"
    command = cola_command(*base_args, "--output_dir", out, "--search", space, "--n_trials", "3")
    command += ["--num_train_epochs", "2"]
    # Mid-trial: trial 1 killed in its second epoch (23 steps of 8 sentences each), its first one's checkpoint saved.
    cut = {"COLA_TEST_CUT": "step:30:SIGKILL", "COLA_TEST_CUT_RUN": "trial-001"}
    killed = run_process(command, cut, signal_hooks, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert list((out / "trials" / "trial-001").glob("checkpoint-*"))
    assert states(out) == {0: "COMPLETE", 1: "RUNNING"}
    first = (out / "trials" / "trial-000" / "results.json").stat().st_mtime_ns
    interrupted_params = load_study(out).get_trials()[1].params

    result = run_process(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    after = load_study(out).get_trials()
    assert [trial.state.name for trial in after] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert after[2].params == interrupted_params and after[2].system_attrs["retry_history"] == [1]
    assert (out / "trials" / "trial-000" / "results.json").stat().st_mtime_ns == first  # not run again
    table = pd.read_csv(out / "search" / "trials.csv")
    assert list(table["note"].fillna(""))[:3] == ["", "interrupted; run again as trial 2", "rerun of trial 1"]
    assert "interrupted" in result.stderr


# Records, from inside the command's own process, every file replaced under best/ and every read of its card: a
# sitecustomize (a launch's `hooks=`), so that it is in place before the command starts.
AUDIT_HOOK = """
import os, sys
log = open(os.environ["COLA_TEST_AUDIT_LOG"], "a", buffering=1)
def hook(event, args):
    if event == "os.rename" and os.fsdecode(args[1]).endswith(("best/README.md", "best/results.json")):
        log.write("write " + os.fsdecode(args[1]).rsplit("/", 1)[1] + "\\n")
    elif event == "open" and isinstance(args[0], str) and args[0].endswith("best/README.md"):
        log.write("read README.md\\n")
sys.addaudithook(hook)
"""


@pytest.mark.xdist_group("search-best-once")
def test_best_is_built_once_by_the_run_phases_its_card_complete_before_any_upload(tmp_path, base_args):
    """best/: results.json written once, with its search section; the card, search section included, is written
    once and only then read for W&B's model artifact (--log_model, W&B offline)."""
    space = write_sweep(tmp_path / "space.yaml", "grid", {"learning_rate": {"values": [5e-3, 1e-7]}})
    out, audit = tmp_path / "search", tmp_path / "audit.log"
    args = [*base_args, "--output_dir", out, "--search", space, "--num_train_epochs", "1"]
    args += ["--report_to", "wandb", "--log_model", "true"]
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "COLA_TEST_AUDIT_LOG": str(audit)}
    result = run_process(cola_command(*args), env, write_hooks(tmp_path / "audit-hooks", AUDIT_HOOK), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = audit.read_text().splitlines()
    writes = [event for event in events if event.startswith("write")]
    assert writes == ["write README.md", "write results.json"], events
    assert "read README.md" in events, "the model artifact never read the card"
    assert events.index("read README.md") > events.index("write results.json")
    results = json.loads((out / "best" / "results.json").read_text())
    assert results["config"]["search"]["trial"] == 0 and results["test"]
    assert "## Hyperparameter search" in (out / "best" / "README.md").read_text()


class PausingSampler(optuna.samplers.RandomSampler):
    """A random sampler that pauses inside Optuna's recording of a trial's end (its after_trial hook runs in
    `tell`, after the objective has returned and before the storage holds the new state) until told to go on."""

    def __init__(self, seed: int, in_window: threading.Event, go_on: threading.Event) -> None:
        super().__init__(seed=seed)
        self.in_window, self.go_on = in_window, go_on

    def after_trial(self, study, trial, state, values) -> None:
        super().after_trial(study, trial, state, values)
        self.in_window.set()
        assert self.go_on.wait(timeout=120)


def test_a_trial_that_has_returned_but_is_not_recorded_yet_does_not_look_dead(tmp_path, base_args):
    """Two workers on one journal: A's trial has returned and Optuna is recording it when B looks for trials whose
    worker is gone. B leaves it alone, and A records it. (A worker that let go of its trial's directory lock when
    the trial returned looked dead in that window: B failed the finished trial and queued it again, and A died with
    Optuna's "AssertionError: Should not reach.")"""
    from cola_hf.config import parse_args
    from cola_hf.studies.search.study import fail_interrupted_trials
    from cola_hf.studies.search.worker import join_study, run_trials

    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3]}})
    options = parse_args(
        [*base_args, "--output_dir", str(tmp_path / "search"), "--search", str(space), "--n_trials", "1"]
        + ["--num_train_epochs", "1"]
    )
    worker_a, worker_b = join_study(options), join_study(options)
    in_window, go_on = threading.Event(), threading.Event()
    worker_a.study.sampler = PausingSampler(0, in_window, go_on)
    looked: list[str] = []

    def worker_b_looks() -> None:
        try:
            assert in_window.wait(timeout=240)
            with worker_b.study_lock:
                fail_interrupted_trials(worker_b)
            looked.extend(trial.state.name for trial in worker_b.study.get_trials())
        finally:
            go_on.set()

    checker = threading.Thread(target=worker_b_looks)
    checker.start()
    run_trials(worker_a)  # the trial trains in this (main) thread: SIGTERM handling needs the main thread
    checker.join(timeout=60)
    assert looked == ["RUNNING"]  # B looked inside the window, and left the trial alone
    assert [trial.state.name for trial in worker_a.study.get_trials()] == ["COMPLETE"]  # no rerun queued


def test_overwrite_refuses_to_delete_a_study_other_workers_are_running(tmp_path, base_args, cola_main, capsys):
    """A job array given --overwrite_output_dir: a task must not delete the study another task is running a trial of."""
    space = write_sweep(tmp_path / "space.yaml", "random", {"learning_rate": {"values": [5e-3]}})
    out = tmp_path / "search"
    argv = [*base_args, "--output_dir", str(out), "--search", str(space), "--n_trials", "2"]
    argv += ["--num_train_epochs", "1", "--experiment_name", "shared"]
    (out / "search").mkdir(parents=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search" / "study.journal"))
    )
    optuna.create_study(study_name="shared", storage=storage, direction="maximize").ask()  # another worker's trial
    assert cola_main([*argv, "--overwrite_output_dir", "true"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite_output_dir: study 'shared' has trials running (0); stop its workers first" in err
    assert [trial.state.name for trial in load_study(out).get_trials()] == ["RUNNING"]  # the study is still there
    assert not (out / "RUN_FAILED").exists()  # the search there did not fail


def test_a_grid_for_the_lowest_validation_loss_reads_that_objective_everywhere(tmp_path, base_args, cola_main):
    """--grid, the same mechanism as --search, with the sweep file's `metric: {name: eval/loss, goal: minimize}`:
    every place that scores, compares, reports or resumes trials reads the one objective (a place still on
    validation MCC, maximised, breaks an assertion)."""
    sweep = {"method": "grid", "metric": {"name": "eval/loss", "goal": "minimize"}}
    parameters = {"learning_rate": {"values": [1e-7, 5e-3]}, "num_train_epochs": {"value": 2}}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**sweep, "parameters": parameters}))
    out = tmp_path / "search"
    argv = [*base_args, "--output_dir", str(out), "--grid", str(space)]
    assert cola_main(argv) == 0

    study = load_study(out)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    trials = study.get_trials(deepcopy=False)
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(trial.params["learning_rate"] for trial in trials) == [1e-7, 5e-3]  # every point, once
    for trial in trials:
        epochs = json.loads((out / "trials" / f"trial-{trial.number:03d}" / "results.json").read_text())["epochs"]
        losses = [epoch["valid_loss"] for epoch in epochs]
        assert trial.value == min(losses)  # record_trial: the lowest, not the highest, nor an MCC
        assert trial.user_attrs["best_epoch"] == epochs[losses.index(min(losses))]["epoch"]
        # ReportEpochs: the lowest so far after each epoch.
        assert [trial.intermediate_values[epoch] for epoch in (1, 2)] == [losses[0], min(losses)]
    best = min(trials, key=lambda trial: trial.value)
    assert best.params["learning_rate"] == 5e-3 and best.value < max(trial.value for trial in trials)

    # best/ holds the trial with the lowest loss, kept at its best epoch by the same metric.
    results = json.loads((out / "best" / "results.json").read_text())
    assert results["config"]["search"]["trial"] == best.number
    assert results["config"]["search"]["best_valid_loss"] == best.value
    assert results["config"]["metric_for_best_model"] == "loss" and results["config"]["greater_is_better"] is False
    assert (out / "best" / "predictions_glue_dev.tsv").is_file()
    recipe = yaml.safe_load((out / "search" / "best_params.yaml").read_text())
    assert recipe["metric_for_best_model"] == "loss" and recipe["greater_is_better"] is False
    table = pd.read_csv(out / "search" / "trials.csv")
    assert "best_valid_loss" in table.columns and "best_valid_mcc" not in table.columns
    summary = json.loads((out / "search" / "summary.json").read_text())
    assert summary["best"]["best_valid_loss"] == best.value
    assert "lowest" in (out / "search" / "trials.md").read_text()

    # The same study resumed for another objective is refused: Optuna would keep the stored direction.
    space.write_text(
        yaml.safe_dump({**sweep, "metric": {"name": "eval/matthews_correlation"}, "parameters": parameters})
    )
    assert cola_main(argv) == 2


def test_a_study_recorded_before_its_objective_resumes_only_in_the_direction_it_was_created_with(tmp_path):
    """Studies written before the objective was recorded hold their space and recipe only; Optuna keeps the direction
    it created them with, so that is what a resumed study is checked against."""
    from cola_hf.config import parse_args
    from cola_hf.studies.search.study import check_same_search

    options = parse_args(["--output_dir", str(tmp_path / "out")])
    parameters = {"learning_rate": {"values": [1e-3]}}
    for metric, refused in (
        ({"name": "eval/matthews_correlation"}, False),
        ({"name": "eval/loss", "goal": "minimize"}, True),
    ):
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump({"method": "random", "metric": metric, "parameters": parameters}))
        space = load_space(path, make_parser())
        study = optuna.create_study(direction="maximize")
        study.set_user_attr("space", space.fingerprint())
        study.set_user_attr(
            "recipe", {key: value for key, value in options.trajectory().items() if key not in parameters}
        )
        if refused:
            with pytest.raises(UsageError, match=r"searched another objective .* \(direction differ\)"):
                check_same_search(study, space, options)
        else:
            check_same_search(study, space, options)


def test_a_search_refused_by_its_directory_writes_nothing_there(tmp_path, base_args, cola_main, capsys):
    """Another study recorded there, the same study for another objective, a bad sweep file, a storage it cannot
    open: one line, exit 2, and the directory and its study are left as they were (no RUN_FAILED: the search that
    is there did not fail)."""
    parameters = {"learning_rate": {"values": [5e-3]}}
    space = tmp_path / "loss.yaml"
    space.write_text(
        yaml.safe_dump(
            {"method": "random", "metric": {"name": "eval/loss", "goal": "minimize"}, "parameters": parameters}
        )
    )
    out = tmp_path / "search"
    (out / "search").mkdir(parents=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search" / "study.journal"))
    )
    # A study of this directory that maximised validation MCC, recorded before studies recorded their objective.
    study = optuna.create_study(study_name="shared", storage=storage, direction="maximize")
    study.set_user_attr("space", load_space(space, make_parser()).fingerprint())
    bad_sweep = write_sweep(tmp_path / "typo.yaml", "random", {"learning_rat": {"values": [5e-3]}})
    argv = [*base_args, "--output_dir", str(out), "--n_trials", "1", "--experiment_name", "shared"]
    cases = [
        ([*argv, "--search", str(space)], "searched another objective than"),
        ([*argv, "--search", str(bad_sweep)], "'learning_rat' is not an option"),
        ([*argv, "--search", str(space), "--search_storage", "nosuch://x"], "nosuch is not supported"),
    ]

    def contents() -> dict[Path, bytes]:
        # Locks come and go with every try; Optuna's journal gets a no-op line from create_study(load_if_exists),
        # so the study is compared by what it holds instead.
        kept = [path for path in out.rglob("*") if path.is_file() and "lock" not in path.name]
        return {path: b"" if path.name == "study.journal" else path.read_bytes() for path in kept}

    for command, message in cases:
        before = contents()
        assert cola_main(command) == 2
        assert message in capsys.readouterr().err
        assert contents() == before
    assert load_study(out).user_attrs == {"space": study.user_attrs["space"]}  # nothing recorded by a refusal

    # Another study recorded in the directory: refused before its record is touched.
    (out / "search" / "study.json").write_text(json.dumps({"study": "elsewhere", "sweep": "old.yaml"}))
    assert cola_main([*argv[:-2], "--search", str(space)]) == 2
    assert "holds the search 'elsewhere' (old.yaml)" in capsys.readouterr().err
    assert json.loads((out / "search" / "study.json").read_text()) == {"study": "elsewhere", "sweep": "old.yaml"}
    assert not (out / "RUN_FAILED").exists()
