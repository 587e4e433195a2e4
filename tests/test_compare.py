"""cola-compare: runs side by side from their results.json, with no W&B involved."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pandas as pd

from cola_hf.cli.compare import main as compare_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, lr: float, valid_mcc: list[float], test_mcc: dict[str, float]) -> Path:
    """A finished run's results.json, in the core's format (only the fields a comparison reads, plus a few)."""
    epochs = [
        {
            "epoch": number,
            "training_loss": 0.6 - 0.1 * number,
            "valid_loss": 0.55 - 0.05 * number,
            "valid_accuracy": 0.7 + 0.01 * number,
            "valid_mcc": mcc,
            "training_time_s": 10.0,
            "validation_time_s": 1.0,
        }
        for number, mcc in enumerate(valid_mcc, start=1)
    ]
    test = {
        split: {"matthews_correlation": mcc, "accuracy": 0.8, "positive_ratio": 0.7, "n": 500}
        for split, mcc in test_mcc.items()
    }
    config = {"model_name_or_path": "/models/all-MiniLM-L6-v2", "learning_rate": lr, "per_device_train_batch_size": 32,
              "num_train_epochs": len(valid_mcc), "seed": 42}  # fmt: skip
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"epochs": epochs, "test": test, "config": config}))
    return run_dir


def test_compare_writes_a_table_and_a_plot_of_two_runs(tmp_path, capsys):
    first = write_run(
        tmp_path / "a" / "seed-42", 2e-5, [0.31, 0.42, 0.40], {"out_of_domain_dev": 0.35, "glue_dev": 0.45}
    )
    second = write_run(tmp_path / "b" / "seed-42", 5e-5, [0.22, 0.38], {"out_of_domain_dev": 0.30, "glue_dev": 0.41})
    out = tmp_path / "comparison"

    assert compare_main([str(first), str(second), "--output", str(out)]) == 0

    table = pd.read_csv(out / "comparison.csv")
    # Both runs' folders are called seed-42: the labels take in their parents to stay apart.
    assert list(table["run"]) == ["a/seed-42", "b/seed-42"]
    assert list(table["learning_rate"]) == [2e-5, 5e-5]
    assert list(table["valid_mcc"]) == [0.40, 0.38]  # after the last epoch
    assert list(table["best_valid_mcc"]) == [0.42, 0.38]
    assert list(table["out_of_domain_dev_mcc"]) == [0.35, 0.30]
    assert list(table["glue_dev_mcc"]) == [0.45, 0.41]
    assert list(table["model"]) == ["all-MiniLM-L6-v2"] * 2

    markdown = (out / "comparison.md").read_text().splitlines()
    assert markdown[0].startswith("| run | model | learning_rate |") and set(markdown[1]) <= set("|-")
    assert markdown[2].startswith("| a/seed-42 | all-MiniLM-L6-v2 | 2e-05 | 32 | 3 | 42 | 0.4 | 0.42 | 0.35 |")
    assert len(markdown) == 4
    assert capsys.readouterr().out.startswith(markdown[0])

    png = out / "comparison.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    height, width, _channels = matplotlib.image.imread(png).shape
    assert (width, height) == (1200, 450)  # two panels: validation MCC and loss curves


def test_compare_names_a_directory_without_results(tmp_path, capsys):
    finished = write_run(tmp_path / "done", 2e-5, [0.3], {"out_of_domain_dev": 0.3})
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()

    assert compare_main([str(finished), str(unfinished), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cola-compare: error: {unfinished}: no results.json (not a run directory, or the run did not finish)"
    )
    assert not (tmp_path / "out").exists()
