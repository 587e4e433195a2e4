"""notebooks/cola_tutorial.ipynb, executed top to bottom in a Jupyter kernel as a reader runs it: on the tiny model
and the real CoLA release (COLA_ZIP; skipped without it), with its parameters set the way papermill sets them, and
CoLA's annotations when COLA_ANNOTATIONS_ZIP is set.

The kernel is this interpreter's (a kernel spec written for the test, so a `python3` kernel installed elsewhere on
the machine is not picked up) and imports this checkout's cola_hf.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import COLA_ANNOTATIONS_ZIP
from ipykernel.kernelspec import write_kernel_spec
from launching import REPO, offline_env, run_cola
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK = REPO / "notebooks" / "cola_tutorial.ipynb"
EPOCHS = 2
TRAIN_SAMPLES = 64
# Cell id -> what it must display: a table (a DataFrame's HTML) or a chart (a PNG).
SHOWS = {
    "random-rows": {"table"},
    "unacceptable": {"table"},
    "model-parameters": {"table"},
    "recipe": {"table"},
    "epoch-table": {"table"},
    "learning-curve": {"chart"},
    "test-mccs": {"table"},
    "mcc-per-batch": {"chart"},
    "mistakes": {"table", "chart"},
    "load-back": {"table"},
    "blimp": {"chart"},
    "explain": {"table"},
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parameter_names(notebook: nbformat.NotebookNode) -> set[str]:
    """The names the cell tagged `parameters` assigns (papermill's convention: exactly one such cell)."""
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    tree = ast.parse(tagged[0].source)
    return {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}


def inject_parameters(notebook: nbformat.NotebookNode, **values: object) -> nbformat.NotebookNode:
    """A copy with a cell after the parameters cell that assigns `values`, as `papermill -p NAME VALUE` does."""
    unknown = set(values) - parameter_names(notebook)
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    notebook = copy.deepcopy(notebook)
    position = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    injected = nbformat.v4.new_code_cell(source, id="injected-parameters")
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(position + 1, injected)
    return notebook


def append_environment_cell(notebook: nbformat.NotebookNode) -> None:
    """A last cell that prints the kernel's interpreter and where its cola_hf comes from."""
    source = "import sys\n\nimport cola_hf\n\nprint(sys.executable, cola_hf.__file__)"
    notebook.cells.append(nbformat.v4.new_code_cell(source, id="environment"))


def displays(cell: nbformat.NotebookNode) -> set[str]:
    """What a cell's outputs show: 'table' for a DataFrame's HTML, 'chart' for a real PNG."""
    shown = set()
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        if "<table" in data.get("text/html", ""):
            shown.add("table")
        if "image/png" in data and base64.b64decode(data["image/png"]).startswith(PNG_SIGNATURE):
            shown.add("chart")
    return shown


def printed(cell: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.output_type == "stream")


@pytest.fixture(scope="module")
def executed(tiny_model_dir, cola_zip, blimp_dir, tmp_path_factory) -> tuple[dict[str, nbformat.NotebookNode], Path]:
    """The notebook run end to end (2 epochs on 64 training sentences); its cells by id, and its output_dir."""
    work = tmp_path_factory.mktemp("notebook")
    write_kernel_spec(work / "jupyter" / "kernels" / "python3")
    output_dir = work / "run"
    notebook = inject_parameters(
        nbformat.read(NOTEBOOK, as_version=4),
        model_name_or_path=str(tiny_model_dir),
        cola_source=str(cola_zip),
        annotations_source=COLA_ANNOTATIONS_ZIP or "none",
        blimp_source=str(blimp_dir),  # a few synthetic paradigms: section 6.3 shows its table and chart
        num_train_epochs=EPOCHS,
        max_train_samples=TRAIN_SAMPLES,
        output_dir=str(output_dir),
        hub_model_id="someone/cola-tiny",
    )
    append_environment_cell(notebook)
    environment = {
        "JUPYTER_PATH": str(work / "jupyter"),
        **{name: offline_env()[name] for name in ("PYTHONPATH", "HF_HUB_OFFLINE", "WANDB_MODE")},
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        client = NotebookClient(
            notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(work)}}
        )
        try:
            client.execute()
        except CellExecutionError as err:
            pytest.fail(f"a notebook cell failed:\n{err}")
    return {cell.id: cell for cell in notebook.cells}, output_dir


def test_every_cell_runs(executed):
    cells, _ = executed
    code = [cell for cell in cells.values() if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    assert not [cell.id for cell in code if any(o.output_type == "error" for o in cell.outputs)]


def test_kernel_is_this_interpreter_and_this_checkout(executed):
    cells, _ = executed
    executable, package = printed(cells["environment"]).split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(package).resolve().is_relative_to(REPO)
    assert not cells["install"].outputs  # cola_hf was importable, so nothing was installed


@pytest.mark.parametrize("cell_id", sorted(SHOWS))
def test_cell_shows_its_table_or_chart(executed, cell_id):
    cells, _ = executed
    assert SHOWS[cell_id] <= displays(cells[cell_id]), f"{cell_id} shows {displays(cells[cell_id]) or 'nothing'}"


def test_parameters_reach_the_run(executed, tiny_model_dir, cola_zip):
    cells, output_dir = executed
    results = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["model_name_or_path"] == str(tiny_model_dir)
    assert results["config"]["cola_source"] == str(cola_zip)
    assert results["config"]["max_train_samples"] == TRAIN_SAMPLES
    assert [row["epoch"] for row in results["epochs"]] == list(range(1, EPOCHS + 1))
    # The table the notebook shows is the run's: one row per epoch, and the test MCCs it printed.
    assert f"{results['test']['out_of_domain_dev']['matthews_correlation']:.3f}" in printed(cells["mcc-per-batch"])
    table = cells["epoch-table"].outputs[0].data["text/html"]
    assert table.split("<tbody>")[1].count("<tr>") == EPOCHS


def test_the_notebook_trains_what_the_command_line_trains(executed, tiny_model_dir, cola_zip, tmp_path):
    """train() in the notebook and `experiments/cola.py RECIPE --flags` take the same steps: the same epoch table
    (times aside), test results and per-sentence probabilities, to every digit."""
    _, output_dir = executed
    cli_dir = tmp_path / "cli"
    run_cola(
        "experiments/recipes/tutorial.yaml",
        *("--model_name_or_path", tiny_model_dir, "--cola_source", cola_zip, "--annotations_source", "none"),
        *("--num_train_epochs", EPOCHS, "--max_train_samples", TRAIN_SAMPLES, "--output_dir", cli_dir),
        in_process=True,  # the command's main, as experiments/cola.py calls it; the notebook runs in a kernel
    )

    def measured(run_dir: Path) -> tuple[list[dict], dict]:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        epochs = [
            {key: value for key, value in row.items() if not key.endswith("_time_s")} for row in results["epochs"]
        ]
        return epochs, results["test"]

    assert measured(output_dir) == measured(cli_dir)
    tsvs = sorted(path.name for path in cli_dir.glob("predictions_*.tsv"))  # CoLA's (the command skips BLiMP)
    assert len(tsvs) == 4
    for name in tsvs:
        assert (output_dir / name).read_bytes() == (cli_dir / name).read_bytes(), name


def test_phenomena_shown_when_annotations_are_given(executed):
    cells, _ = executed
    if COLA_ANNOTATIONS_ZIP:
        assert displays(cells["phenomena"]) == {"table", "chart"}
    else:
        assert "Phenomena skipped" in printed(cells["phenomena"])


def test_push_is_skipped_without_a_token(executed):
    cells, _ = executed
    assert printed(cells["push"]).startswith("Skipped: no Hub token")


def test_injection_refuses_a_name_that_is_not_a_parameter():
    with pytest.raises(AssertionError, match="not parameters"):
        inject_parameters(nbformat.read(NOTEBOOK, as_version=4), learning_rate=1e-3)
