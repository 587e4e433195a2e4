"""What a GPU run would meet, proven on the CPU through the same mechanism: several GPUs in one process refused,
BLiMP scored in float32 under mixed precision, a half-precision checkpoint loaded in float32, the launcher's
precision recorded and held to on resume, --use_cpu deciding pinned memory and loader workers.

The command line runs in this process (`cola_hf.cli.train.main`), offline, on the tiny random BERT. Where only a
GPU would trigger the behaviour, torch's own report of the GPUs is patched (`torch.cuda.device_count`,
`torch.cuda.is_available`): the library boundary, never cola_hf's code.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_simple_launcher_cmd_env
from conftest import REPO, error_line
from launching import offline_env
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from cola_hf.analysis import blimp_report
from cola_hf.classify import load_classifier
from cola_hf.cli.train import main
from cola_hf.config import parse_args
from cola_hf.data import blimp_pairs
from cola_hf.training.inference import acceptable_probabilities

QUICK = [
    *("--report_to", "none", "--disable_tqdm", "true", "--annotations_source", "none", "--blimp_source", "none"),
    *("--max_seq_length", "16", "--learning_rate", "1e-3", "--global_train_batch_size", "16"),
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)


def flags(model: Path, cola: Path, output_dir: Path, *extra: str) -> list[str]:
    # The later of two equal flags wins: `extra` may replace QUICK's.
    return ["--model_name_or_path", str(model), "--cola_source", str(cola), "--output_dir", str(output_dir),
            *QUICK, *extra]  # fmt: skip


# --- finding 1: several GPUs in one process ----------------------------------------------------------------------
def test_one_process_that_sees_several_gpus_is_refused_in_one_line(
    monkeypatch, tmp_path, capsys, tiny_model_dir, cola_dir
):
    """transformers counts the GPUs it would hand to nn.DataParallel with torch.cuda.device_count()."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    output_dir = tmp_path / "run"
    assert main(flags(tiny_model_dir, cola_dir, output_dir, "--max_steps", "1")) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith("this process sees 4 GPUs;"), line
    assert "accelerate launch --config_file experiments/accelerate/multi_gpu.yaml" in line
    assert "CUDA_VISIBLE_DEVICES=0" in line
    assert not output_dir.exists()  # refused before anything was written


def test_the_single_process_config_shows_its_process_one_gpu(monkeypatch):
    """What `accelerate launch --config_file accelerate_config.yaml` puts in the script's environment on a CUDA
    machine (accelerate asks torch which accelerator there is: that answer is patched)."""
    import accelerate.utils.launch

    monkeypatch.setattr(accelerate.utils.launch, "get_torch_accelerator_backend", lambda **_: ("cuda", torch.cuda))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # a machine's GPUs, or what a job was given
    argv = ["--config_file", str(REPO / "accelerate_config.yaml"), "experiments/cola.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    _, env = prepare_simple_launcher_cmd_env(args)
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


# --- finding 10: --use_cpu decides pinning and workers -----------------------------------------------------------
def test_use_cpu_on_a_gpu_machine_pins_no_memory_and_starts_no_workers(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"]).training
    assert (args.dataloader_pin_memory, args.dataloader_num_workers) == (False, 0)
    assert args.device.type == "cpu" and not args.accelerator_config.non_blocking
    assert not args.dataloader_persistent_workers


# --- finding 8: the launcher's precision --------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_launchers_mixed_precision_is_the_runs_recorded_option(monkeypatch, tmp_path, precision):
    """`accelerate launch --mixed_precision` (or its config's mixed_precision) reaches the script as this variable."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)
    options = parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true"])
    values = options.values()  # results.json's config, the card's table and W&B's config derive from it
    assert (values["bf16"], values["fp16"]) == (precision == "bf16", precision == "fp16")
    assert options.trajectory()[precision] is True
    assert options.training.mixed_precision == precision


def test_a_flag_given_to_the_script_wins_over_the_launcher(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    training = parse_args(["--output_dir", str(tmp_path), "--use_cpu", "true", "--fp16", "true"]).training
    assert (training.fp16, training.bf16, training.mixed_precision) == (True, False, "fp16")


def test_a_float32_checkpoint_refuses_to_continue_in_bf16(monkeypatch, tmp_path, tiny_model_dir, cola_dir, capsys):
    output_dir = tmp_path / "run"
    argv = flags(tiny_model_dir, cola_dir, output_dir, "--max_steps", "2", "--use_cpu", "true")
    assert main(argv) == 0
    (output_dir / "results.json").unlink()  # as if stopped after its last checkpoint: unfinished, resumable
    capsys.readouterr()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # the same command under `accelerate launch` in bf16
    assert main(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert "holds an unfinished run with other options (bf16 False there, True now)" in line, line


def test_a_bf16_run_under_the_launcher_records_bf16(monkeypatch, tmp_path, tiny_model_dir, cola_dir):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    output_dir = tmp_path / "run"
    assert main(flags(tiny_model_dir, cola_dir, output_dir, "--max_steps", "2", "--use_cpu", "true")) == 0
    assert json.loads((output_dir / "results.json").read_text())["config"]["bf16"] is True
    assert "| `bf16` | `True` |" in (output_dir / "README.md").read_text()


# --- finding 2: BLiMP in float32 under mixed precision ------------------------------------------------------------
def test_blimp_under_bf16_equals_a_float32_scoring_of_the_saved_model(tmp_path, tiny_model_dir, cola_dir, blimp_dir):
    output_dir = tmp_path / "run"
    argv = flags(tiny_model_dir, cola_dir, output_dir, "--max_steps", "3", "--bf16", "true", "--use_cpu", "true")
    assert main([*argv, "--blimp_source", str(blimp_dir)]) == 0
    written = blimp_report.read_blimp_predictions(output_dir / blimp_report.PREDICTIONS_FILE)

    model = AutoModelForSequenceClassification.from_pretrained(output_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    sentences = blimp_pairs.tokenize_blimp(blimp_pairs.read_blimp(str(blimp_dir)), tokenizer, 16)
    float32 = acceptable_probabilities(model, sentences, pad_token_id=tokenizer.pad_token_id, progress=False)
    np.testing.assert_allclose(written.prob_good, float32[0::2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(written.prob_bad, float32[1::2], rtol=0, atol=1e-6)


# --- finding 7: a bf16-saved model loads in float32 ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny BERT saved in bfloat16, as DeepSpeed ZeRO saves a bf16 run's model."""
    directory = tmp_path_factory.mktemp("bf16-model")
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).to(torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def saved_dtypes(directory: Path) -> set[str]:
    with safe_open(directory / "model.safetensors", framework="pt") as weights:
        return {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}  # noqa: SIM118


def test_a_bf16_saved_model_trains_in_float32(tmp_path, bf16_model_dir, cola_dir):
    assert saved_dtypes(bf16_model_dir) == {"BF16"}
    output_dir = tmp_path / "run"
    assert main(flags(bf16_model_dir, cola_dir, output_dir, "--max_steps", "2", "--use_cpu", "true")) == 0
    assert saved_dtypes(output_dir) == {"F32"}  # AdamW's float32 weights, saved as trained


def test_a_bf16_saved_model_is_evaluated_and_labels_sentences_in_float32(tmp_path, bf16_model_dir, cola_dir):
    """Its evaluation-only predictions are those of its weights widened to float32, and so are cola-predict's."""
    widened = tmp_path / "widened"
    AutoModelForSequenceClassification.from_pretrained(bf16_model_dir, dtype=torch.float32).save_pretrained(widened)
    AutoTokenizer.from_pretrained(bf16_model_dir).save_pretrained(widened)
    runs = {"bf16": tmp_path / "eval-bf16", "widened": tmp_path / "eval-widened"}
    for model, output_dir in zip((bf16_model_dir, widened), runs.values(), strict=True):
        assert main(flags(model, cola_dir, output_dir, "--do_train", "false", "--use_cpu", "true")) == 0
    for split in ("in_domain_dev", "out_of_domain_dev", "glue_dev"):
        name = f"predictions_{split}.tsv"
        assert (runs["bf16"] / name).read_text() == (runs["widened"] / name).read_text(), split
    classifier = load_classifier(str(bf16_model_dir))
    assert classifier.model.dtype == torch.float32


# --- finding 3: BLiMP over a sharded model ------------------------------------------------------------------------
SHARDED_SCORING = """
import os
import sys

import numpy as np
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from cola_hf import run
from cola_hf.config import parse_args

prepared = run.prepare(parse_args(sys.argv[2:]))
model, args = prepared.trainer.model, prepared.trainer.args
# What accelerate's FSDP config does to the model (accelerate.utils.fsdp_utils.fsdp2_prepare_model): each
# transformer block, then the whole model, sharded in place over the processes.
mesh = init_device_mesh("cpu", (args.world_size,))
for block in model.bert.encoder.layer:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
predictions = run.score_blimp(prepared)
if args.process_index == 0:
    np.savez(sys.argv[1], good=predictions.prob_good, bad=predictions.prob_bad)
torch.distributed.barrier()  # no process tears its connections down while another still uses them
torch.distributed.destroy_process_group()  # as cola_hf.cli.train.main does: see close_process_group there
# The trainer above still holds gloo's work objects, which abort the interpreter's finalization now and then
# (SIGABRT; pytorch/pytorch#179291): everything is written, so end without it.
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
"""


def test_blimp_over_a_model_sharded_on_2_processes_finishes_and_equals_1_process(
    tmp_path, tiny_model_dir, cola_dir, blimp_dir
):
    """accelerate 1.16 runs its FSDP config on GPUs only (on the CPU its processes become MULTI_CPU, plain DDP), so
    the two gloo processes shard the model with torch's `fully_shard`, the call accelerate's FSDP2 path makes."""
    script, scores = tmp_path / "sharded.py", tmp_path / "scores.npz"
    script.write_text(SHARDED_SCORING, encoding="utf-8")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), str(scores), *flags(tiny_model_dir, cola_dir, tmp_path / "run", "--use_cpu", "true"),
            "--do_train", "false", "--blimp_source", str(blimp_dir), "--ddp_timeout", "60"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, env=offline_env(), timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sentences = blimp_pairs.tokenize_blimp(blimp_pairs.read_blimp(str(blimp_dir)), tokenizer, 16)
    one_process = acceptable_probabilities(model, sentences, pad_token_id=tokenizer.pad_token_id, progress=False)
    sharded = np.load(scores)
    np.testing.assert_allclose(sharded["good"], one_process[0::2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sharded["bad"], one_process[1::2], rtol=0, atol=1e-6)


# --- finding 9: a finished run's model is freed -------------------------------------------------------------------
def test_each_run_of_a_seed_study_frees_its_model_when_it_returns(tmp_path, tiny_model_dir, cola_dir):
    """Freed by reference counting alone, as soon as the run returns: with the collector off, a model held in a
    reference cycle would stay (on the GPU, with its optimizer state) until the collector happened to run."""

    def live_models() -> int:
        return sum(isinstance(thing, PreTrainedModel) for thing in gc.get_objects())

    gc.collect()
    before = live_models()
    gc.disable()
    try:
        argv = flags(tiny_model_dir, cola_dir, tmp_path / "study", "--seeds", "1", "2", "--max_steps", "2")
        assert main([*argv, "--use_cpu", "true"]) == 0
        assert live_models() == before
    finally:
        gc.enable()
