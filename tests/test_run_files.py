"""The table of a run's files (cola_hf/run_files.py): every file a real run writes has its row, docs/outputs.md is
the table, and what the Hub push, --overwrite_output_dir and the card use derives from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cola_hf import run_files
from cola_hf.run_files import RUN_FILES, RunFile, row_of

REPO = Path(__file__).resolve().parents[1]


def unlisted(output_dir: Path, rows: list[RunFile]) -> list[str]:
    """The top-level files and directories of `output_dir` that no row of `rows` names."""
    return sorted(path.name for path in output_dir.iterdir() if not any(row.matches(path.name) for row in rows))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cola_zip, annotations_zip, blimp_dir, tiny_model_dir) -> Path:
    """A run that writes everything a run can: real CoLA with its annotations (the phenomena chart), BLiMP, a
    checkpoint, W&B offline inside the output directory."""
    from cola_hf.cli.train import main

    output_dir = tmp_path_factory.mktemp("full") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("WANDB_MODE", "offline")
        patch.delenv("WANDB_DIR", raising=False)
        code = main(
            [
                "--output_dir", str(output_dir), "--cola_source", str(cola_zip),
                "--annotations_source", str(annotations_zip), "--blimp_source", str(blimp_dir),
                "--model_name_or_path", str(tiny_model_dir), "--num_train_epochs", "1", "--max_train_samples", "64",
                "--learning_rate", "1e-3", "--disable_tqdm", "true", "--report_to", "wandb",
            ]
        )  # fmt: skip
    assert code == 0
    return output_dir


def test_every_file_a_run_writes_has_a_row_and_every_row_it_needs_bites(full_run):
    assert unlisted(full_run, RUN_FILES) == []
    written = {path.name for path in full_run.iterdir()}
    assert {"phenomena.png", "blimp.png", "predictions_blimp.tsv", "wandb", ".wandb_run_id"} <= written
    # Without its row, a file that only that row names is reported: the check is not vacuous. (BLiMP's
    # predictions file is also matched by the CoLA predictions' glob, after its own row.)
    sole = {rows[0] for name in written if len(rows := [r for r in RUN_FILES if r.matches(name)]) == 1}
    assert len(sole) >= 20
    for row in sole:
        others = [other for other in RUN_FILES if other is not row]
        assert unlisted(full_run, others), f"no file of {row.name} stands out without its row"


def test_every_file_is_owned_by_one_row():
    names = [row.name for row in RUN_FILES]
    assert len(names) == len(set(names))
    assert row_of("predictions_blimp.tsv").owner.endswith("blimp_report.py")  # before the CoLA predictions' glob
    assert row_of("predictions_glue_dev.tsv").owner.endswith("predictions_tsv.py")
    for row in RUN_FILES:
        if not row.owner.startswith(("transformers", "wandb")):
            assert (REPO / row.owner).is_file(), row.owner


def test_docs_outputs_is_the_table():
    docs = (REPO / "docs" / "outputs.md").read_text(encoding="utf-8")
    assert run_files.markdown() in docs


def test_the_lists_derive_from_the_rows():
    assert "predictions_*.tsv" not in run_files.PUBLISHED_FILES  # CoLA's sentences are never republished
    assert {"checkpoint-*", "*.safetensors", "results.json"} <= set(run_files.PREVIOUS_RUN_FILES)
    assert ".cola.lock" not in run_files.PREVIOUS_RUN_FILES  # held while the directory is cleared
    assert set(run_files.RUN_OUTCOME_FILES) == {"results.json", "README.md", "RUN_FAILED", "error.log"}


def test_the_card_shows_and_links_what_the_table_says(full_run):
    card = (full_run / "README.md").read_text(encoding="utf-8")
    entries = run_files.card_entries(full_run, ("out_of_domain_dev", "in_domain_dev", "glue_dev"))
    assert [file for _, file in entries if file.startswith("mcc_per_batch_")] == [
        "mcc_per_batch_out_of_domain_dev.png",
        "mcc_per_batch_in_domain_dev.png",
        "mcc_per_batch_glue_dev.png",
    ]
    for title, file in entries:
        link = f"![{title}]({file})" if file.endswith(".png") else f"[{title}]({file})"
        assert link in card
    linked = {file for _, file in entries}
    assert {"blimp.png", "phenomena.png", "analysis.md", "blimp.md", "results.json"} <= linked
    assert all(row_of(file).published for file in linked)  # the card links nothing the Hub would not hold
