"""W&B tracking, checked against what W&B itself stored: a run's own transaction log, read back record by record.

No W&B server is reachable here, so every run is an offline run; its `run-<id>.wandb` file holds exactly
what `wandb sync` would upload.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import importlib.metadata
import json
import socket
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
import yaml
from launching import REPO, cola_command, offline_env

matplotlib.use("Agg")

SWEEP = REPO / "experiments" / "sweeps" / "bert_paper_grid.yaml"


# --- reading a .wandb transaction log --------------------------------------------------------------------------
# The format is LevelDB's log format (https://github.com/google/leveldb/blob/main/doc/log_format.md) behind a
# 7-byte W&B header; each complete entry is a serialized wandb.proto Record. wandb 0.31 writes it from its Go
# core and ships no Python reader, so this is one.
BLOCK_SIZE = 32768
HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, version = struct.unpack("<4sHB", data[:HEADER_SIZE])
    assert (ident, version) == (b":W&B", 0), f"{path}: not a W&B transaction log"
    records, pending, position = [], b"", HEADER_SIZE
    while position + HEADER_SIZE <= len(data):
        if BLOCK_SIZE - position % BLOCK_SIZE < HEADER_SIZE:  # a block's zero-padded tail
            position += BLOCK_SIZE - position % BLOCK_SIZE
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + HEADER_SIZE])
        chunk = data[position + HEADER_SIZE : position + HEADER_SIZE + length]
        position += HEADER_SIZE + length
        if kind == 0:
            continue
        assert checksum == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"{path}: corrupt record"
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _items(updates) -> dict:
    return {".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in updates}


def stored_run(run_dir: Path) -> dict:
    """The run's header (name, group, tags...), merged config and summary, history rows and artifacts."""
    import wandb

    # A finished run's records may still be on their way to disk: teardown waits for W&B's service to write
    # them all (what the end of a process does for a user's run).
    wandb.teardown()
    (log,) = run_dir.glob("run-*.wandb")
    stored: dict = {"run": None, "config": {}, "summary": {}, "history": [], "artifacts": [], "files": run_dir}
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            stored["run"] = record.run
            stored["config"].update(_items(record.run.config.update))
        elif kind == "config":
            stored["config"].update(_items(record.config.update))
        elif kind == "summary":
            stored["summary"].update(_items(record.summary.update))
        elif kind == "history":
            stored["history"].append(_items(record.history.item))
        elif kind == "artifact":
            stored["artifacts"].append(record.artifact)
    return stored


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted(wandb_dir.glob("offline-run-*"))


# --- a run with no API key -------------------------------------------------------------------------------------
def no_credentials_env(tmp_path: Path) -> dict:
    """The user's environment minus every W&B setting and credential, as on a fresh machine."""
    env = {key: value for key, value in offline_env().items() if not key.startswith("WANDB_")}
    env.update(
        NETRC=str(tmp_path / "no-netrc"),  # no `wandb login` key either
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
    )
    return env


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_without_api_key_goes_offline_and_wandb_stores_metrics_config_summary_media(
    tmp_path, cola_dir, tiny_model_dir, blimp_dir
):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            *cola_command("experiments/recipes/tutorial.yaml"),
            "--cola_source", str(cola_dir), "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(out),
            "--num_train_epochs", "2", "--max_train_samples", "64", "--max_seq_length", "16",
            "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
            "--report_to", "wandb", "--experiment_name", "tracking-test", "--log_model", "true",
            "--blimp_source", str(blimp_dir),
        ],
        capture_output=True, text=True, env=no_credentials_env(tmp_path), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]

    # The run finished with its local outputs, in a W&B offline run directory of its own...
    results = json.loads((out / "results.json").read_text())
    (run_dir,) = offline_runs(out / "wandb")
    # ... announced by one line that says why and how to upload it later.
    notices = [line for line in result.stdout.splitlines() if "logged offline" in line]
    assert notices == [
        "W&B: no W&B API key (set WANDB_API_KEY or run `wandb login`), so this run is logged offline; "
        f"upload it later with: wandb sync {run_dir}"
    ]

    stored = stored_run(run_dir)
    name = "tutorial-lr2e-05-bs32-ep2-seed42-n64"
    assert stored["run"].display_name == name
    assert stored["run"].run_group == "tracking-test"
    assert stored["run"].job_type == "train"
    assert set(stored["run"].tags) == {f"model:{tiny_model_dir.name}", "recipe:tutorial"}

    config = stored["config"]
    assert config["learning_rate"] == 2e-5 and config["num_train_epochs"] == 2 and config["seed"] == 42
    assert config["cola_source"] == config["data/source"] == str(cola_dir)
    assert config["model_name_or_path"] == config["model/name"] == str(tiny_model_dir)
    assert config["experiment_name"] == "tracking-test" and config["recipe"] == "tutorial"
    assert config["data/sha256"] == {tsv.name: sha256(tsv) for tsv in cola_dir.glob("*.tsv")}
    from transformers import AutoModelForSequenceClassification

    parameters = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).num_parameters()
    assert config["model/num_parameters"] == parameters
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert config["code/git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    for package in ("torch", "transformers", "datasets", "evaluate", "accelerate"):
        assert config["versions"][package] == importlib.metadata.version(package)

    # Per step (the Trainer's callback): training loss and learning rate; per epoch: validation metrics.
    history = stored["history"]
    assert sum("train/loss" in row for row in history) == 4  # 2 steps per epoch, logged every step
    assert [row["train/learning_rate"] for row in history if "train/learning_rate" in row][0] == 2e-5
    assert [row["eval/matthews_correlation"] for row in history if "eval/matthews_correlation" in row] == [
        epoch["valid_mcc"] for epoch in results["epochs"]
    ]
    assert [row["eval/accuracy"] for row in history if "eval/accuracy" in row] == [
        epoch["valid_accuracy"] for epoch in results["epochs"]
    ]

    # After training: every test set's metrics in the summary, under its own name.
    summary = stored["summary"]
    for split in ("out_of_domain_dev", "in_domain_dev", "glue_dev"):
        for metric in ("matthews_correlation", "accuracy", "positive_ratio", "n"):
            assert summary[f"test/{split}/{metric}"] == results["test"][split][metric]

    # Media: the per-epoch table, the charts, the misclassified sentences, as W&B files of this run.
    table = json.loads((run_dir / "files" / summary["training_stats.path"]).read_text())
    assert table["columns"][:5] == ["epoch", "training_loss", "valid_loss", "valid_accuracy", "valid_mcc"]
    assert [row[4] for row in table["data"]] == [epoch["valid_mcc"] for epoch in results["epochs"]]
    for chart in ("learning_curve", "mcc_per_batch_out_of_domain_dev", "mcc_per_batch_glue_dev"):
        assert summary[f"charts/{chart}._type"] == "image-file"
        assert (run_dir / "files" / summary[f"charts/{chart}.path"]).is_file()
    predictions = pd.read_csv(
        out / "predictions_in_domain_dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False
    )
    wrong = predictions[predictions["label"] != predictions["prediction"]]
    table = json.loads((run_dir / "files" / summary["misclassified/in_domain_dev.path"]).read_text())
    assert table["columns"] == ["sentence_source", "sentence", "label", "prob_acceptable"]
    assert [row[1] for row in table["data"]] == list(wrong["sentence"])

    # BLiMP: its figures in the summary, its tables (the published figures beside) and its chart.
    blimp = json.loads((out / "blimp.json").read_text())
    assert summary["blimp/pair_accuracy"] == blimp["overall"]["pair_accuracy"]
    assert summary["blimp/sentence_matthews_correlation"] == blimp["sentences"]["matthews_correlation"]
    phenomena = json.loads((run_dir / "files" / summary["analysis/blimp_phenomena.path"]).read_text())
    assert {"phenomenon", "pair_accuracy", "gpt2", "human"} <= set(phenomena["columns"])
    assert [row[phenomena["columns"].index("phenomenon")] for row in phenomena["data"]][-1] == "overall"
    assert summary["charts/blimp._type"] == "image-file"
    assert not any(key.startswith("misclassified/blimp") for key in summary)  # its file has no sentences
    # The explanations page, as W&B's own HTML media.
    assert summary["explanations._type"] == "html-file"
    assert (run_dir / "files" / summary["explanations.path"]).read_text() == (out / "explanations.html").read_text()

    # --log_model: the final model as an artifact.
    (artifact,) = [artifact for artifact in stored["artifacts"] if artifact.type == "model"]
    assert artifact.name == f"model-{name}"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {
        entry.path for entry in artifact.manifest.contents
    }


def test_server_probe_tells_a_live_server_from_a_dead_port():
    from cola_hf.integrations.tracking import server_reachable

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # The bare handler answers every request with an HTTP error: still a server that is there.
        assert server_reachable(f"http://127.0.0.1:{server.server_address[1]}", timeout=5)
    finally:
        server.shutdown()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    assert not server_reachable(f"http://127.0.0.1:{dead_port}", timeout=5)
    assert not server_reachable("http://unresolvable.invalid", timeout=5)


# --- W&B failing during a run ---------------------------------------------------------------------------------
@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    yield lambda: wandb.init(mode="offline", project="cola-hf-tests", dir=str(tmp_path))
    if wandb.run is not None:
        wandb.run.finish()


def test_wandb_dying_mid_training_stops_uploads_not_training(tmp_path, tiny_model_dir, offline_wandb, capsys):
    from transformers import AutoModelForSequenceClassification, TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import WandbCallback

    from cola_hf.integrations.tracking import GuardedWandbCallback

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")
    state, control = TrainerState(), TrainerControl()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    run = offline_wandb()
    plain, guarded = WandbCallback(), GuardedWandbCallback()
    for callback in (plain, guarded):
        callback.on_train_begin(args, state, control, model=model)
        callback.on_log(args, state, control, logs={"loss": 0.69})
    capsys.readouterr()

    run.finish()  # W&B goes away in the middle of training
    with pytest.raises(Exception, match="wandb.init"):
        plain.on_log(args, state, control, logs={"loss": 0.68})  # the Trainer's own callback would stop training
    guarded.on_log(args, state, control, logs={"loss": 0.68})
    assert "W&B failed during training" in capsys.readouterr().err
    guarded.on_log(args, state, control, logs={"loss": 0.67})
    guarded.on_train_end(args, state, control, model=model)
    assert capsys.readouterr().err == ""  # told once, then silent


def test_a_failed_upload_is_named_and_the_rest_still_uploaded(tmp_path, offline_wandb, capsys):
    import matplotlib.pyplot as plt

    from cola_hf.integrations.tracking import log_run_outputs
    from cola_hf.results import RunResults

    out = tmp_path / "out"
    out.mkdir()
    figure, axes = plt.subplots()
    axes.plot([1, 2], [0.6, 0.5])
    figure.savefig(out / "learning_curve.png")
    plt.close(figure)
    # A predictions file without its prediction column: its table cannot be built.
    (out / "predictions_out_of_domain_dev.tsv").write_text("sentence_source\tlabel\tsentence\nx\t1\tA dog saw it.\n")
    results = {
        "epochs": [{"epoch": 1, "training_loss": 0.6, "valid_loss": 0.5, "valid_accuracy": 0.7, "valid_mcc": 0.3}],
        "test": {"out_of_domain_dev": {"matthews_correlation": 0.25, "accuracy": 0.7, "positive_ratio": 0.6, "n": 1}},
    }
    run = offline_wandb()
    log_run_outputs(out, RunResults.from_dict(results))

    err = capsys.readouterr().err
    assert "not uploaded: misclassified sentences of out_of_domain_dev" in err
    assert f"Local outputs in {out} are complete" in err
    import wandb

    assert wandb.run is None  # the run was finished all the same
    stored = stored_run(Path(run.settings.sync_dir))
    assert stored["summary"]["test/out_of_domain_dev/matthews_correlation"] == 0.25
    assert stored["summary"]["charts/learning_curve._type"] == "image-file"
    assert stored["summary"]["training_stats._type"] == "table-file"
    assert not any(key.startswith("misclassified/") for key in stored["summary"])


# --- the BERT paper's grid as a W&B sweep -------------------------------------------------------------------------
def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command line `wandb agent` builds for one combination, with W&B's own expansion of ${args}."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [sweep["program"]],
        **create_sweep_command_args({"args": {name: {"value": value} for name, value in values.items()}}),
    }
    command: list[str] = []
    for token in sweep["command"]:
        command += macros[token[2:-1]] if token.startswith("${") else [token]
    return command


def test_sweep_file_is_the_18_run_grid_over_flags_that_cola_py_accepts(monkeypatch):
    import itertools

    from transformers.integrations.integration_utils import rewrite_logs
    from transformers.trainer_utils import EvalPrediction

    from cola_hf.config import make_parser, parse_args
    from cola_hf.metrics import compute_metrics

    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["method"] == "grid"
    # The metric is named as the Trainer's W&B callback logs our validation MCC.
    validation = compute_metrics(EvalPrediction(predictions=[[0.1, 0.9], [0.8, 0.2]], label_ids=[1, 0]))
    logged = rewrite_logs({f"eval_{key}": value for key, value in validation.items()})
    assert sweep["metric"] == {"name": "eval/matthews_correlation", "goal": "maximize"}
    assert sweep["metric"]["name"] in logged

    parameters = {name: spec["values"] for name, spec in sweep["parameters"].items()}
    assert parameters == {
        "global_train_batch_size": [16, 32],
        "learning_rate": [5e-5, 3e-5, 2e-5],
        "num_train_epochs": [2, 3, 4],
    }
    flags = {action.dest for action in make_parser()._actions}
    assert set(parameters) <= flags
    assert (REPO / sweep["program"]).is_file()

    combinations = [dict(zip(parameters, values, strict=True)) for values in itertools.product(*parameters.values())]
    monkeypatch.chdir(REPO)  # the agent runs from the repository root: the command's paths are relative to it
    seen = set()
    for values in combinations:
        command = agent_command(sweep, values)
        assert command[:3] == ["/usr/bin/env", "python", "experiments/cola.py"]
        options = parse_args(command[3:])
        training_args = options.training
        # The batch an optimizer step sees: per device x accumulation x processes (here 1).
        batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        assert batch == values["global_train_batch_size"]
        seen.add((batch, training_args.learning_rate, training_args.num_train_epochs))
        assert training_args.report_to == ["wandb"] and options.study.per_run_output_dir
    assert len(seen) == len(combinations) == 18
