"""benchmarks/speed.py runs both paths and reports every column; the length-grouped sampler loses no example.

No timing is asserted anywhere: timings depend on the machine. What is checked is what must hold on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_cola_dir
from launching import REPO, offline_env

SPEED = REPO / "benchmarks" / "speed.py"
COLUMNS = (
    "tokenization_s",
    "tokenization_cached_s",
    "train_samples_per_s",
    "epoch_time_s",
    "peak_memory_mb",
    "valid_mcc",
    "glue_dev_mcc",
    "epoch_cpu_s",
)
STEPS = 2
BATCH = 32
TRAIN = 180  # the conftest's 200 synthetic in_domain_train rows, less the 10% validation split


def run_speed(*args: object) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SPEED), *map(str, args)], capture_output=True, text=True, env=offline_env(), cwd=REPO
    )
    assert result.returncode == 0, f"speed.py exited {result.returncode}\n{result.stdout}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def speed_report(tiny_model_dir, cola_dir, tmp_path_factory) -> tuple[dict, str, Path]:
    output = tmp_path_factory.mktemp("speed") / "speed.json"
    # No --max_steps: the default, one epoch.
    result = run_speed("--model_name_or_path", tiny_model_dir, "--cola_source", cola_dir, "--output", output)
    return json.loads(output.read_text()), result.stdout, output


def test_both_paths_finish_and_the_json_has_every_column(speed_report):
    report, stdout, _ = speed_report
    assert set(report["columns"]) == set(COLUMNS)
    for path in ("tutorial", "package"):
        result = report["results"][path]
        for column in COLUMNS:
            assert math.isfinite(result[column]), (path, column, result[column])
        assert -1 <= result["valid_mcc"] <= 1 and -1 <= result["glue_dev_mcc"] <= 1
        assert result["peak_memory_mb"] >= result["memory_before_train_mb"] > 0
        share = result["others_cpu_share_during_training"]
        assert share is None or 0 <= share <= 1
        # Same work on both sides: one epoch of the same number of optimizer steps over the same sentences.
        assert result["steps"] == result["steps_per_epoch"] == math.ceil(TRAIN / BATCH)
        assert result["train_samples"] == TRAIN
    assert set(report["ratio_package_over_tutorial"]) == set(COLUMNS)
    ratio = report["ratio_package_over_tutorial"]["epoch_time_s"]
    results = report["results"]
    assert ratio == pytest.approx(results["package"]["epoch_time_s"] / results["tutorial"]["epoch_time_s"])
    for label in report["columns"].values():
        assert label in stdout


def test_tutorial_pads_to_64_and_the_package_pads_per_batch(speed_report):
    tutorial, package = speed_report[0]["results"]["tutorial"], speed_report[0]["results"]["package"]
    assert tutorial["train_tokens_incl_padding"] == TRAIN * 64
    # The synthetic sentences are at most a dozen tokens: per-batch padding must show it.
    assert package["train_tokens_incl_padding"] < TRAIN * 16


def test_package_flags_switch_a_lever_off(speed_report, tiny_model_dir, cola_dir, tmp_path):
    """Flags speed.py does not know reach the package path: --pad_to_max_length gives the tutorial's batches."""
    spec = importlib.util.spec_from_file_location("speed", SPEED)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    result_file = tmp_path / "package.json"
    # The child's side of the script, in this process (its imports are already loaded here, so it is quick).
    speed.main(
        ["--model_name_or_path", str(tiny_model_dir), "--cola_source", str(cola_dir), "--max_steps", str(STEPS),
         "--pad_to_max_length", "--path", "package", "--result_file", str(result_file)]
    )  # fmt: skip
    package = json.loads(result_file.read_text())
    assert package["package_flags"] == ["--pad_to_max_length"]
    assert package["steps"] == STEPS
    assert package["train_tokens_incl_padding"] == STEPS * BATCH * 64


# --- the length-grouped sampler, as Trainer builds it from the package's defaults ---------------------------------
@pytest.fixture(scope="module")
def grouped_data(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from cola_hf.data.cola import read_cola, split_cola, tokenize_cola

    # 360 training sentences: enough for mega-batches of 2 batches, so grouping actually reorders across batches.
    raw = split_cola(
        read_cola(str(write_cola_dir(tmp_path_factory.mktemp("cola-grouped") / "raw", train=400))), 0.1, 42
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tokenize_cola(raw, tokenizer), tokenizer


def train_and_record_batches(tiny_model_dir, grouped_data, tmp_path, seed: int, epochs: int = 2):
    """Train with the package's default arguments; return the training batches each epoch saw, as token rows."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    from cola_hf.config import parse_args
    from cola_hf.training.sampler import GlobalBatchSampler
    from cola_hf.training.trainer import TutorialTrainer

    class RecordingTrainer(TutorialTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"].bool()
            batches.append([tuple(ids[keep].tolist()) for ids, keep in zip(inputs["input_ids"], mask, strict=True)])
            return super().training_step(model, inputs, num_items_in_batch)

    tokenized, tokenizer = grouped_data
    batches: list[list[tuple[int, ...]]] = []
    training_args = parse_args(
        ["--output_dir", str(tmp_path / f"run-{seed}"), "--seed", str(seed), "--num_train_epochs", str(epochs),
         "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"]
    ).training  # fmt: skip
    assert training_args.train_sampling_strategy == "group_by_length"  # the package's default
    trainer = RecordingTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_model_dir),
        args=training_args,
        train_dataset=tokenized["train"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, GlobalBatchSampler) and sampler.order == "group_by_length"
    trainer.train()
    steps_per_epoch = math.ceil(len(tokenized["train"]) / BATCH)
    assert len(batches) == epochs * steps_per_epoch
    return [batches[start : start + steps_per_epoch] for start in range(0, len(batches), steps_per_epoch)]


@pytest.fixture(scope="module")
def grouped_batches(tiny_model_dir, grouped_data, tmp_path_factory):
    return train_and_record_batches(tiny_model_dir, grouped_data, tmp_path_factory.mktemp("grouped"), seed=42)


def test_length_grouped_sampler_visits_every_example_once_per_epoch(grouped_data, grouped_batches):
    tokenized, _ = grouped_data
    expected = Counter(tuple(ids) for ids in tokenized["train"]["input_ids"])
    for batches in grouped_batches:
        assert Counter(row for batch in batches for row in batch) == expected
    assert grouped_batches[0] != grouped_batches[1], "each epoch draws a new order"


def test_length_grouped_sampler_is_reproducible_for_a_seed(tiny_model_dir, grouped_data, grouped_batches, tmp_path):
    again = train_and_record_batches(tiny_model_dir, grouped_data, tmp_path, seed=42)
    other = train_and_record_batches(tiny_model_dir, grouped_data, tmp_path, seed=7)
    assert again == grouped_batches
    assert other[0] != grouped_batches[0]


# --- the fast defaults themselves ---------------------------------------------------------------------------------
def test_fast_defaults_on_the_cpu(tiny_model_dir, tmp_path):
    import torch

    from cola_hf.config import parse_args
    from cola_hf.training.model import load_model_and_tokenizer

    options = parse_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    data_args, args = options.data, options.training
    assert not data_args.pad_to_max_length and args.train_sampling_strategy == "group_by_length"
    assert args.optim == "adamw_torch_fused"
    if not torch.cuda.is_available():  # workers and pinned memory would only take the CPU's cores
        assert args.dataloader_num_workers == 0 and not args.dataloader_pin_memory
    explicit = parse_args(["--output_dir", str(tmp_path), "--report_to", "none", "--dataloader_num_workers", "3"])
    assert explicit.training.dataloader_num_workers == 3
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    assert model.config._attn_implementation == "sdpa"  # transformers' default for BERT: checked, not assumed
