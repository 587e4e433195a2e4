"""The model card and the push to the Hub, offline.

The Hub is replaced at huggingface_hub's own HTTP layer (`set_client_factory` with an httpx2 MockTransport):
every request the Trainer, huggingface_hub and our code make reaches a small in-process stand-in that
answers like the Hub's API and records what it was sent. Nothing of ours is mocked.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import _http as hub_http
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from cola_hf.config import ColaTrainingArguments
from cola_hf.errors import UsageError
from cola_hf.integrations import hub
from cola_hf.results import RunResults
from cola_hf.training.trainer import TutorialTrainer

FAKE_TOKEN = "hf_PlantedFakeToken0123456789abcdefXYZ"
REPO_ID = "someone/cola-tiny"
SPLITS = ("out_of_domain_dev", "in_domain_dev", "glue_dev")


def results_json() -> dict:
    """A results.json as a run writes it, with distinct values everywhere so a mix-up shows."""
    return {
        "epochs": [
            {
                "epoch": epoch,
                "training_loss": 0.61 / epoch,
                "valid_loss": 0.52 + epoch / 100,
                "valid_accuracy": 0.70 + epoch / 100,
                "valid_mcc": 0.30 + epoch / 100,
                "training_time_s": 12.5 * epoch,
                "validation_time_s": 0.75,
            }
            for epoch in (1, 2)
        ],
        "test": {
            split: {
                "matthews_correlation": 0.4123 + index / 100,
                "accuracy": 0.8011 + index / 100,
                "positive_ratio": 0.69,
                "n": (516, 527, 1043)[index],
                "mcc_per_batch": [0.4, 0.5],
            }
            for index, split in enumerate(SPLITS)
        },
        "config": {
            "model_name_or_path": "google-bert/bert-base-uncased",
            "learning_rate": 2e-05,
            "adam_epsilon": 1e-08,
            "num_train_epochs": 2.0,
            "seed": 42,
            "hub_token": "<HUB_TOKEN>",
        },
    }


def metric_values(card: ModelCard) -> dict[tuple[str, str], float]:
    return {(result.dataset_split, result.metric_type): result.metric_value for result in card.data.eval_results}


# --- the card ---------------------------------------------------------------------------------------------------
def test_model_card_metadata_holds_the_three_test_sets(tmp_path):
    results = results_json()
    (tmp_path / "learning_curve.png").write_bytes(b"png")
    (tmp_path / "mcc_per_batch_glue_dev.png").write_bytes(b"png")
    command = "python experiments/cola.py experiments/recipes/tutorial.yaml --push_to_hub"
    path = hub.write_model_card(
        tmp_path, RunResults.from_dict(results), "google-bert/bert-base-uncased", command, REPO_ID
    )

    card = ModelCard.load(path)  # huggingface_hub's parser: YAML block, then ModelCardData with its checks
    data = card.data
    assert data.license == "apache-2.0"
    assert data.base_model == "google-bert/bert-base-uncased"
    assert data.datasets == ["nyu-mll/glue"]
    assert data.pipeline_tag == "text-classification"
    assert "matthews_correlation" in data.metrics
    assert data.model_name == "cola-tiny"

    expected = {}
    for split, hub_split in zip(SPLITS, ("out_of_domain_dev", "in_domain_dev", "validation"), strict=True):
        expected[(hub_split, "matthews_correlation")] = results["test"][split]["matthews_correlation"]
        expected[(hub_split, "accuracy")] = results["test"][split]["accuracy"]
    assert metric_values(card) == expected
    assert all(r.dataset_type == "nyu-mll/glue" and r.dataset_config == "cola" for r in data.eval_results)

    # huggingface_hub's own offline validation: the model-index parses back to the same results, and the
    # whole metadata block rebuilds a ModelCardData without errors (it raises on an invalid model-index).
    model_index = data.to_dict()["model-index"]
    name, eval_results = model_index_to_eval_results(model_index)
    assert eval_results_to_model_index(name, eval_results) == model_index
    assert len({result.unique_identifier for result in eval_results}) == 3
    ModelCardData(**data.to_dict())

    text = card.text
    assert "| `learning_rate` | `2e-05` |" in text
    assert "| 2 | 0.3050 | 0.5400 | 0.7200 | 0.3200 | 25.0 | 0.8 |" in text  # epoch 2 of the per-epoch table
    assert "(learning_curve.png)" in text and "(mcc_per_batch_glue_dev.png)" in text
    assert "mcc_per_batch_in_domain_dev.png" not in text  # only plots the run wrote are linked
    assert command in text
    assert f'pipeline("text-classification", model="{REPO_ID}")' in text


def test_base_model_and_license_come_from_the_checkpoint(tmp_path):
    results = results_json()
    local = tmp_path / "my-checkpoint"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\n---\n# a local model\n", encoding="utf-8")
    card = hub.build_model_card(tmp_path, RunResults.from_dict(results), str(local), "cmd")
    assert card.data.license == "mit"  # the base model's license carries over
    assert card.data.base_model is None  # a local directory has no Hub id to name
    assert card.data.model_name == tmp_path.name

    snapshot = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "0123abc"
    assert (
        hub.build_model_card(tmp_path, RunResults.from_dict(results), str(snapshot), "cmd").data.base_model
        == "some-org/some-model"
    )
    explicit = hub.build_model_card(
        tmp_path, RunResults.from_dict(results), str(local), "cmd", base_model="org/base", license="cc-by-4.0"
    )
    assert (explicit.data.base_model, explicit.data.license) == ("org/base", "cc-by-4.0")

    evaluation_only = hub.build_model_card(
        tmp_path, RunResults.from_dict({**results, "epochs": []}), "org/fine-tuned", "cmd"
    )
    assert "No training in this run" in evaluation_only.text and "| Epoch |" not in evaluation_only.text


def test_model_card_never_holds_a_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    command = f"python experiments/cola.py --push_to_hub --hub_token {FAKE_TOKEN} --hub_token=hf_another0123456789abcd"
    results = results_json()
    results["config"]["note"] = f"copied by mistake: {FAKE_TOKEN}"
    text = str(hub.build_model_card(tmp_path, RunResults.from_dict(results), "org/base", command, REPO_ID))
    assert FAKE_TOKEN not in text and "hf_another0123456789abcd" not in text
    assert "--hub_token *** --hub_token=***" in text


# --- the push ---------------------------------------------------------------------------------------------------
class HubStandIn:
    """Answers the Hub API calls an upload makes (create repo, validate README, preupload, commit); records them.

    Every file is declared a regular (non-LFS) file in the preupload answer, so its content travels inside the
    commit request and the whole upload is visible here; unknown endpoints get a 404.
    """

    def __init__(self, fail_commits_with: int | None = None) -> None:
        self.requests: list[httpx2.Request] = []
        self.fail_commits_with = fail_commits_with

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo_id = f"{body['organization']}/{body['name']}"
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}", "name": repo_id})
        if request.method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and "/preupload/" in path:
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return httpx2.Response(200, json={"files": modes})
        if request.method == "POST" and "/commit/" in path:
            if self.fail_commits_with:
                return httpx2.Response(self.fail_commits_with, json={"error": "You don't have the rights"})
            repo_id = path.split("/api/models/")[1].split("/commit/")[0]
            oid = f"{len(self.requests):040x}"
            commit_url = f"https://huggingface.co/{repo_id}/commit/{oid}"
            return httpx2.Response(200, json={"commitUrl": commit_url, "commitOid": oid})
        return httpx2.Response(404, json={"error": "not served by the stand-in"})

    def creates(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests if r.url.path == "/api/repos/create"]

    def commits(self) -> list[tuple[str, dict[str, bytes]]]:
        """(repo path of the commit URL, {file path: content}) for every commit request, in order."""
        commits = []
        for request in self.requests:
            if "/commit/" not in request.url.path:
                continue
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            added = [line["value"] for line in lines if line["key"] == "file"]
            files = {value["path"]: base64.b64decode(value["content"]) for value in added}
            commits.append((request.url.path, files))
        return commits


@pytest.fixture
def stand_in(monkeypatch):
    """Route every huggingface_hub HTTP request to a HubStandIn, with a planted token in HF_TOKEN."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = HubStandIn()

    def client() -> httpx2.Client:
        # The Hub's own request hook stays in, as in huggingface_hub's default client.
        return httpx2.Client(
            transport=httpx2.MockTransport(server), event_hooks={"request": [hub_http.hf_request_event_hook]}
        )

    hub_http.set_client_factory(client)
    yield server
    hub_http.set_client_factory(hub_http.default_client_factory)


def finished_run(output_dir: Path, model_dir: Path) -> TutorialTrainer:
    """The trainer as experiments/cola.py builds it with --push_to_hub, and the files a finished run leaves."""
    args = ColaTrainingArguments(
        output_dir=str(output_dir),
        push_to_hub=True,
        hub_model_id=REPO_ID,
        hub_private_repo=True,
        eval_strategy="no",  # no training here, so no validation set either
        use_cpu=True,
    )
    hub.prepare_push(args)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    trainer = TutorialTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.save_model()  # with --push_to_hub the Trainer uploads here too, with its own card
    (output_dir / "results.json").write_text(json.dumps(results_json()), encoding="utf-8")
    (output_dir / "learning_curve.png").write_bytes(b"png")
    (output_dir / "predictions_glue_dev.tsv").write_text("sentence_source\tlabel\tsentence\n", encoding="utf-8")
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")
    command = "python experiments/cola.py --push_to_hub"
    hub.write_model_card(output_dir, RunResults.from_dict(results_json()), str(model_dir), command, REPO_ID)
    return trainer


def test_push_uploads_the_output_dir_with_our_card(stand_in, tiny_model_dir, tmp_path, caplog, capfd):
    output_dir = tmp_path / "run"
    for name in ("huggingface_hub", "transformers", "cola_hf"):
        logging.getLogger(name).setLevel(logging.DEBUG)  # the most a log could ever show
    with caplog.at_level(logging.DEBUG):
        trainer = finished_run(output_dir, tiny_model_dir)
        commit_url = hub.push_trainer_output(trainer)

    assert commit_url.startswith(f"https://huggingface.co/{REPO_ID}/commit/")
    creates = stand_in.creates()
    private_repo = {"name": "cola-tiny", "organization": "someone", "visibility": "private"}
    assert creates and all(create == private_repo for create in creates)
    path, files = stand_in.commits()[-1]
    assert path == f"/api/models/{REPO_ID}/commit/main"
    expected = {
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "results.json",
        "learning_curve.png",
    }
    # No checkpoint-*, no predictions TSV with the corpus' sentences, no pickled training_args.bin.
    assert set(files) == expected
    assert files["README.md"] == (output_dir / "README.md").read_bytes()  # our card, not the Trainer's
    assert ModelCard(files["README.md"].decode()).data.eval_results
    assert json.loads(files["config.json"])["id2label"] == {"0": "unacceptable", "1": "acceptable"}

    # The token came from the environment, and went nowhere else than the Authorization header.
    writes = [r for r in stand_in.requests if r.method == "POST"]
    assert writes and all(r.headers["authorization"] == f"Bearer {FAKE_TOKEN}" for r in writes)
    for file in output_dir.rglob("*"):
        if file.is_file():
            assert FAKE_TOKEN.encode() not in file.read_bytes(), file
    out, err = capfd.readouterr()
    assert FAKE_TOKEN not in caplog.text + out + err
    assert any("someone/cola-tiny" in record.getMessage() for record in caplog.records)  # logs were captured


def test_failed_push_is_one_line_and_leaves_the_outputs(stand_in, tiny_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    trainer = finished_run(output_dir, tiny_model_dir)
    before = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}
    stand_in.fail_commits_with = 403
    with pytest.raises(hub.HubPushError) as failure:
        hub.push_trainer_output(trainer)
    message = str(failure.value)
    assert "\n" not in message and FAKE_TOKEN not in message
    assert f"{output_dir} was not uploaded to the Hub repository {REPO_ID}" in message
    assert "retry with: hf upload someone/cola-tiny" in message
    assert {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()} == before


def test_push_flags_are_checked_before_any_work(monkeypatch, tmp_path):
    def args(**overrides) -> TrainingArguments:
        options = {"output_dir": str(tmp_path), "push_to_hub": True, "hub_model_id": REPO_ID, "report_to": "none"}
        return TrainingArguments(**{**options, **overrides})

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert hub.prepare_push(args(push_to_hub=False)) is None
    with pytest.raises(UsageError, match="not on the command line"):
        hub.prepare_push(args(hub_token=FAKE_TOKEN))
    with pytest.raises(UsageError, match="not a valid repository id"):
        hub.prepare_push(args(hub_model_id="some one/with spaces"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(UsageError, match="no Hub token found"):
        hub.prepare_push(args())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE"):
        hub.prepare_push(args())


# --- what a whole run publishes (the real command line, in this process, against the stand-in) ---------------
def run_args(output_dir: Path, cola_dir: Path, model_dir: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--cola_source", str(cola_dir), "--model_name_or_path", str(model_dir),
        "--num_train_epochs", "1", "--max_train_samples", "64", "--learning_rate", "1e-3", "--disable_tqdm", "true",
        "--annotations_source", "none", "--push_to_hub", "true", "--hub_model_id", REPO_ID, *extra,
    ]  # fmt: skip


# A default run's commit: the model and its tokenizer, the card and every chart it or analysis.md shows, the
# measured results. Nothing hidden, no predictions TSV, no checkpoint, no W&B directory, nothing of an earlier run.
PUBLISHED = {
    "README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "results.json",
    "training_stats.csv", "analysis.json", "analysis.md", "learning_curve.png", "mcc_per_batch_out_of_domain_dev.png",
    "mcc_per_batch_in_domain_dev.png", "mcc_per_batch_glue_dev.png", "reliability.png", "confusion_matrix.png",
    "threshold.png", "explanations.json", "explanations.html",
}  # fmt: skip


@pytest.mark.parametrize("tracking", ["none", "wandb"])
def test_a_run_over_a_finished_one_publishes_its_own_files_once(
    stand_in, tracking, tmp_path, cola_dir, tiny_model_dir, monkeypatch
):
    from cola_hf.cli.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # W&B's offline run lands inside the output directory
    output_dir = tmp_path / "run"
    first = run_args(output_dir, cola_dir, tiny_model_dir, "--report_to", tracking)
    assert main(first) == 0
    # What another run (an older version, other options) left: a chart this run does not draw, another split's
    # predictions, a checkpoint.
    (output_dir / "phenomena.png").write_bytes(b"an older run's chart")
    (output_dir / "predictions_old.tsv").write_text("sentence_source\tlabel\tsentence\n", encoding="utf-8")
    (output_dir / "checkpoint-999").mkdir()
    stand_in.requests.clear()

    assert main([*first, "--overwrite_output_dir", "true", "--seed", "7"]) == 0
    commits = stand_in.commits()
    assert len(commits) == 1  # nothing during training: one commit, once the run has finished
    _, files = commits[0]
    assert set(files) == PUBLISHED
    assert not (output_dir / "phenomena.png").exists() and not (output_dir / "checkpoint-999").exists()
    assert "phenomena.png" not in files["README.md"].decode()  # the card links only this run's charts
    assert json.loads(files["results.json"])["config"]["seed"] == 7
    if tracking == "wandb":
        assert any(path.is_dir() for path in (output_dir / "wandb").iterdir())  # kept locally, never published


def test_a_run_stopped_by_sigterm_publishes_nothing(stand_in, tmp_path, cola_dir, tiny_model_dir, monkeypatch):
    import os
    import signal
    import threading
    import time

    from cola_hf.cli.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    output_dir = tmp_path / "run"

    returned = threading.Event()

    def stop_after_the_first_checkpoint() -> None:
        # Only while the run is on: a SIGTERM after main returned would kill this test's own process.
        while not returned.is_set() and not list(output_dir.glob("checkpoint-*/trainer_state.json")):
            time.sleep(0.01)
        if not returned.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=stop_after_the_first_checkpoint)
    killer.start()
    args = run_args(output_dir, cola_dir, tiny_model_dir, "--report_to", "none", "--num_train_epochs", "3")
    try:
        status = main([*args, "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "2"])
    finally:
        returned.set()
        killer.join()
    assert status == 75
    assert stand_in.commits() == []  # a stopped run is not a result: its weights stay local


def test_a_hub_strategy_other_than_end_is_refused_before_any_work(stand_in, tmp_path, capsys):
    from cola_hf.cli.train import main

    status = main(["--output_dir", str(tmp_path / "run"), "--push_to_hub", "true", "--hub_model_id", REPO_ID,
                   "--hub_strategy", "every_save"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "--hub_strategy every_save: a run is published once, when it has finished" in err
    assert not (tmp_path / "run").exists() and stand_in.commits() == []
