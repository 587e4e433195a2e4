"""Seed studies, through the run's own entry point (in this process: one import)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from cola_hf.results import RunResults
from cola_hf.studies.seeds import StudyRun as Trial
from cola_hf.studies.seeds import aggregate_seeds

SPLITS = ("out_of_domain_dev", "in_domain_dev", "glue_dev")


@pytest.fixture(scope="module")
def cola_main():
    from cola_hf.cli.train import main

    return main


@pytest.fixture
def quick_args(cola_dir, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return [
        "--cola_source", str(cola_dir), "--model_name_or_path", str(tiny_model_dir),
        "--num_train_epochs", "1", "--max_train_samples", "64", "--max_seq_length", "16",
        "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_seeds_run_once_each_in_one_wandb_group_and_aggregate_every_test_mcc(
    tmp_path, quick_args, cola_main, monkeypatch
):
    from test_tracking import offline_runs, stored_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "study"
    assert cola_main([*quick_args, "--output_dir", str(out), "--report_to", "wandb", "--seeds", "3", "4"]) == 0

    names = ["cola-lr2e-05-bs32-ep1-seed3-n64", "cola-lr2e-05-bs32-ep1-seed4-n64"]
    runs = [read_json(out / name / "results.json") for name in names]
    assert [run["config"]["seed"] for run in runs] == [3, 4]
    # Each seed its own W&B run, all in one group.
    for name in names:
        (run_dir,) = offline_runs(out / name / "wandb")
        stored = stored_run(run_dir)
        assert (stored["run"].display_name, stored["run"].run_group) == (name, "cola-seeds")

    summary = read_json(out / "summary.json")
    assert summary["seeds"] == [3, 4]
    for split in SPLITS:
        values = [run["test"][split]["matthews_correlation"] for run in runs]
        low, high = sorted(values)
        assert summary["test_mcc"][split] == pytest.approx(
            {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values),
                "median": statistics.fmean(values),
                "q1": low + (high - low) / 4,
                "q3": low + (high - low) * 3 / 4,
                "iqr": (high - low) / 2,
                "min": min(values),
                "max": max(values),
                "n": 2,
            }  # fmt: skip
        )
    table = (out / "summary.md").read_text().splitlines()
    assert table[0] == "| seed | " + " | ".join(SPLITS) + " | collapsed |"
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| 3", "| 4", "| mean", "| std", "| median", "| iqr", "| min", "| max", "| collapsed"
    ]  # fmt: skip
    assert (out / "comparison" / "comparison.png").is_file()


def test_seed_statistics_are_mean_sample_std_min_max():
    def trial(seed: int, ood: float, glue: float) -> Trial:
        results = {
            "epochs": [{"epoch": 1, "valid_mcc": 0.5}],
            "test": {"out_of_domain_dev": {"matthews_correlation": ood}, "glue_dev": {"matthews_correlation": glue}},
        }
        return Trial(f"run-{seed}", Path(f"run-{seed}"), {"seed": seed}, RunResults.from_dict(results))

    summary = aggregate_seeds([trial(1, 0.40, 0.50), trial(2, 0.30, 0.56), trial(3, 0.44, 0.53)], "g")
    ood = [0.40, 0.30, 0.44]
    assert summary["test_mcc"]["out_of_domain_dev"] == pytest.approx(
        {
            "mean": sum(ood) / 3,
            "std": (sum((x - sum(ood) / 3) ** 2 for x in ood) / 2) ** 0.5,
            "median": 0.40,
            "q1": 0.35,
            "q3": 0.42,
            "iqr": 0.07,
            "min": 0.30,
            "max": 0.44,
            "n": 3,
        }  # fmt: skip
    )
    assert summary["test_mcc"]["glue_dev"]["mean"] == pytest.approx(0.53)
    assert [run["valid_mcc"] for run in summary["runs"]] == [0.5, 0.5, 0.5]
