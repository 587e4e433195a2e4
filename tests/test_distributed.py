"""Two CPU processes (gloo) train and evaluate like one: the scale-out promises of the README's "Scaling out".

Both runs go through `accelerate launch` exactly as a user starts them: the default single-process config,
and the multi-GPU config with `--num_processes 2` plus `--use_cpu true`, which is how accelerate starts
several processes on a machine without GPUs (`accelerate launch --cpu` starts only one). Both are forked from
the tests' fork server, the launcher and its workers with the libraries already imported (tests/forkserver.py;
test_launching.py checks that a forked launch starts and ends its workers as an exec'd one does).

The tiny model is the shared fixture with dropout switched off. With dropout on, the two runs differ for a
reason that has nothing to do with batching: each process draws its own dropout masks for its half of the
batch, while the single process draws one mask for the whole batch, so the losses drift apart by ~1e-2
after a few steps (measured on this model) and a tolerance loose enough for that would also pass a wrong
batch split. Without dropout the only difference left is floating-point summation order (DDP averages two
half-batch gradients, the single process averages 32 per-example terms at once; each half is padded to its
own longest sentence), about 1e-7 per step; the 1e-5 tolerance on the losses leaves room for that to grow
over the run and is still far below what one misplaced sentence per batch does (~1e-3).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from forkserver import ForkedProcess
from launching import REPO, SCRIPT, cola_command, offline_env, start_process, write_hooks
from sklearn.metrics import matthews_corrcoef
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from cola_hf.config import ColaTrainingArguments, parse_args
from cola_hf.errors import UsageError

TEST_SPLITS = ("out_of_domain_dev", "in_domain_dev", "glue_dev")
LOSS_TOLERANCE = 1e-5

# A run long and fast enough to learn the synthetic rule (so MCC is not trivially 0), on a training set of
# 5 x 32 sentences: every step has a full global batch, with no wrap-around padding (see README).
RUN_FLAGS = [
    *("--max_train_samples", "160", "--num_train_epochs", "8", "--learning_rate", "3e-3"),
    *("--logging_steps", "1", "--use_cpu", "true", "--disable_tqdm", "true", "--report_to", "none"),
]

# Installed into the launched processes through PYTHONPATH: an audit hook (a standard Python facility,
# sys.addaudithook) that records every file a process other than rank 0 creates, opens for writing,
# renames or deletes under the watched directory.
WRITE_WATCH = """
import os, sys
_watched, _rank = os.environ.get("COLA_TEST_WATCH_DIR"), os.environ.get("RANK")
if _watched and _rank is not None:
    _log = os.path.join(os.environ["COLA_TEST_WATCH_LOG"], f"writes-rank{_rank}.txt")
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (any(c in (mode or "") for c in "wax+") or (flags or 0) & _writing):
                return
        elif event not in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            return
        else:
            path = args[0]
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return
        if path.startswith(_watched + os.sep) or path == _watched:
            with open(_log, "a", encoding="utf-8") as log:
                log.write(f"{event} {path}\\n")

    sys.addaudithook(_hook)

    import atexit

    def _at_exit():  # registered first, so it runs last: what the process left when its interpreter ends
        if "torch.distributed" in sys.modules:
            state = "open" if sys.modules["torch.distributed"].is_initialized() else "closed"
            with open(os.path.join(os.environ["COLA_TEST_WATCH_LOG"], f"exit-rank{_rank}.txt"), "w") as out:
                out.write(state)

    atexit.register(_at_exit)
"""


@pytest.fixture(scope="module")
def dropout_free_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny fixture's architecture and tokenizer, without dropout, with seeded weights that learn the
    synthetic rule in a few epochs (so that MCC is not trivially 0 and the MCC comparison has teeth)."""
    directory = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    config = AutoConfig.from_pretrained(
        tiny_model_dir,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def finish(process: subprocess.Popen | ForkedProcess) -> str:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, process.args))}\nexited {process.returncode}\n{output[-6000:]}")
    return output


@pytest.fixture(scope="module")
def runs(cola_dir, dropout_free_model, tmp_path_factory) -> dict:
    """The same recipe on 1 process (1 x 32) and on 2 gloo processes (2 x 16), side by side; the second one
    with every write of its processes under output_dir recorded."""
    root = tmp_path_factory.mktemp("distributed")
    flags = ["--cola_source", str(cola_dir), "--model_name_or_path", str(dropout_free_model), *RUN_FLAGS]
    watch = write_hooks(root / "watch", WRITE_WATCH)
    # One process under accelerate's default single-process config, as `make tutorial` starts it.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no"]
    one_process = [*launcher, "--config_file", str(REPO / "accelerate_config.yaml")]
    one = start_process([*one_process, str(SCRIPT), *flags, "--output_dir", str(root / "one")])
    two = start_process(
        cola_command(*flags, "--output_dir", root / "two", processes=2),
        env={"COLA_TEST_WATCH_DIR": str(root / "two"), "COLA_TEST_WATCH_LOG": str(watch)},
        hooks=watch,
    )
    logs = {"one": finish(one), "two": finish(two)}
    return {"one": root / "one", "two": root / "two", "logs": logs, "watch": watch}


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def loss_log(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))
    return [entry for entry in state["log_history"] if "loss" in entry]


def test_the_log_states_how_the_global_batch_is_split(runs):
    assert (
        "batch: world size 1 x per-device batch 32 x gradient accumulation 1 = global batch 32" in runs["logs"]["one"]
    )
    assert (
        "batch: world size 2 x per-device batch 16 x gradient accumulation 1 = global batch 32" in runs["logs"]["two"]
    )


@pytest.fixture(scope="module")
def reference(runs, cola_dir) -> dict:
    """The test sets from the input files, and a plain 1-process evaluation of the 2-process run's model."""
    files = {"out_of_domain_dev": ["out_of_domain_dev.tsv"], "in_domain_dev": ["in_domain_dev.tsv"]}
    files["glue_dev"] = files["in_domain_dev"] + files["out_of_domain_dev"]  # GLUE's order
    rows = {
        split: [line.split("\t") for name in names for line in (cola_dir / name).read_text().splitlines()]
        for split, names in files.items()
    }
    sentences = {split: [row[3] for row in split_rows] for split, split_rows in rows.items()}
    return {
        "sentences": sentences,
        "labels": {split: [int(row[1]) for row in split_rows] for split, split_rows in rows.items()},
        "probabilities": single_process_probabilities(runs["two"], sentences),
    }


def test_predictions_hold_every_test_sentence_once_in_file_order(runs, reference):
    """Row i of predictions_<split>.tsv is sentence i of the input, scored by the saved model itself."""
    for split in TEST_SPLITS:
        rows = read_tsv(runs["two"] / f"predictions_{split}.tsv")
        assert [row["sentence"] for row in rows] == reference["sentences"][split], split
        written = np.array([float(row["prob_acceptable"]) for row in rows])
        np.testing.assert_allclose(written, reference["probabilities"][split], atol=1e-5, err_msg=split)


def test_mcc_equals_a_single_process_evaluation_of_the_saved_model(runs, reference):
    results = json.loads((runs["two"] / "results.json").read_text(encoding="utf-8"))
    for split in TEST_SPLITS:
        labels = reference["labels"][split]
        predictions = (reference["probabilities"][split] > 0.5).astype(int)
        assert results["test"][split]["n"] == len(labels)
        assert results["test"][split]["matthews_correlation"] == pytest.approx(
            matthews_corrcoef(labels, predictions), abs=1e-12
        )
    # The comparison has teeth only if the model predicts both classes somewhere.
    assert results["test"]["glue_dev"]["matthews_correlation"] > 0


def test_two_by_sixteen_trains_like_one_by_thirty_two(runs):
    one, two = loss_log(runs["one"]), loss_log(runs["two"])
    assert len(one) == len(two) == 40  # 8 epochs x 160/32 optimizer steps, one log per step
    assert [entry["step"] for entry in one] == [entry["step"] for entry in two]
    # The same linear schedule, step for step: 3e-3 x (1 - k/40).
    assert [entry["learning_rate"] for entry in one] == [entry["learning_rate"] for entry in two]
    np.testing.assert_allclose(
        [entry["learning_rate"] for entry in one], [3e-3 * (1 - k / 40) for k in range(40)], rtol=1e-6
    )
    np.testing.assert_allclose(
        [entry["loss"] for entry in two], [entry["loss"] for entry in one], rtol=0, atol=LOSS_TOLERANCE
    )
    epochs_one = json.loads((runs["one"] / "results.json").read_text(encoding="utf-8"))["epochs"]
    epochs_two = json.loads((runs["two"] / "results.json").read_text(encoding="utf-8"))["epochs"]
    assert len(epochs_one) == len(epochs_two) == 8
    for first, second in zip(epochs_one, epochs_two, strict=True):
        assert second["training_loss"] == pytest.approx(first["training_loss"], abs=LOSS_TOLERANCE)
        # Accuracy and MCC come from the gathered predictions, each validation sentence once.
        assert (second["valid_accuracy"], second["valid_mcc"]) == pytest.approx(
            (first["valid_accuracy"], first["valid_mcc"]), abs=1e-9
        )


def test_only_the_main_process_writes_outputs(runs):
    rank0 = runs["watch"] / "writes-rank0.txt"
    rank1 = runs["watch"] / "writes-rank1.txt"
    assert rank0.is_file() and "results.json" in rank0.read_text(encoding="utf-8")  # the watch works
    # The one exception is Trainer's own: every process saves its RNG state into each checkpoint (creating
    # the checkpoint-N directory if it gets there first), so that a resumed run continues every process's
    # random stream exactly. Nothing else, and no file the user reads.
    written = rank1.read_text(encoding="utf-8").splitlines() if rank1.is_file() else []
    allowed = re.compile(r"(os\.mkdir .*/checkpoint-\d+|open .*/checkpoint-\d+/rng_state_1\.pth)$")
    assert [line for line in written if not allowed.match(line)] == []
    assert sorted(path.name for path in runs["two"].iterdir()) == sorted(path.name for path in runs["one"].iterdir())


def test_every_process_closes_its_process_group_before_it_exits(runs):
    """Left open, gloo's threads meet the interpreter's end: now and then a process that finished its run aborts
    ("terminate called without an active exception", SIGABRT) and the launcher reports the run failed."""
    states = {path.name: path.read_text(encoding="utf-8") for path in runs["watch"].glob("exit-rank*.txt")}
    assert states == {"exit-rank0.txt": "closed", "exit-rank1.txt": "closed"}


def single_process_probabilities(model_dir: Path, sentences: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """P(acceptable) per sentence from a plain forward pass of the saved model, one sentence at a time."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    probabilities = {}
    with torch.no_grad():
        for split, texts in sentences.items():
            encoded = [tokenizer(text, truncation=True, max_length=64, return_tensors="pt") for text in texts]
            probabilities[split] = np.array([model(**e).logits.softmax(-1)[0, 1].item() for e in encoded])
    return probabilities


# ---- The global batch's split (cola_hf.config.ColaTrainingArguments.resolve_batch_layout) ----


def batch_split(*flags: str) -> tuple[int, int]:
    args = parse_args(["--output_dir", "unused", "--report_to", "none", *flags]).training
    assert isinstance(args, ColaTrainingArguments)
    return args.per_device_train_batch_size, args.gradient_accumulation_steps


def test_accumulation_covers_what_one_device_cannot_hold():
    assert batch_split() == (32, 1)  # the tutorial on one device
    assert batch_split("--per_device_train_batch_size", "8") == (8, 4)
    assert batch_split("--per_device_train_batch_size", "12") == (8, 4)  # the largest that divides 32
    assert batch_split("--global_train_batch_size", "64", "--per_device_train_batch_size", "48") == (32, 2)
    assert batch_split("--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2") == (16, 2)


def test_global_batch_zero_takes_the_flags_as_given():
    flags = (
        "--global_train_batch_size",
        "0",
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "3",
    )
    assert batch_split(*flags) == (8, 3)


def test_accumulation_that_contradicts_the_global_batch_is_refused():
    with pytest.raises(UsageError, match="--global_train_batch_size 0"):
        batch_split("--gradient_accumulation_steps", "2")


def test_processes_that_did_not_form_one_group_are_refused(monkeypatch):
    """torchrun on a machine without GPUs, without --use_cpu: each process would train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="--use_cpu true"):
        batch_split()


def test_a_global_batch_that_does_not_divide_over_the_processes_stops_every_process(tmp_path):
    parse = "import sys; from cola_hf.config import parse_args; parse_args(sys.argv[1:])"
    (tmp_path / "parse.py").write_text(parse, encoding="utf-8")
    flags = ["--use_cpu", "true", "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        *(str(tmp_path / "parse.py"), *flags, "--global_train_batch_size", "33"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=offline_env())
    assert result.returncode != 0
    assert result.stderr.count("--global_train_batch_size 33 does not split evenly over 2 processes") == 2
