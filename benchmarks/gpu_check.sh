#!/usr/bin/env bash
# The GPU check, in one call of a few minutes: the tutorial recipe on bert-base-uncased's architecture
# (BertConfig()'s defaults, random init, so no download; a tokenizer with bert-base-uncased's vocabulary) through
# the tutorial's own loop and through this package (benchmarks/speed.py, one epoch each), in fp32 and in bf16,
# then BLiMP's 134,000 sentences scored by the package and by pipeline("text-classification")
# (benchmarks/blimp_speed.py); one table at the end. Every JSON is kept in OUTPUT_DIR.
#
#   COLA_ZIP=path/to/cola_public_1.1.zip BLIMP_ZIP=path/to/BLiMP.zip TOKENIZER=path/to/bert-tokenizer \
#       benchmarks/gpu_check.sh [OUTPUT_DIR]
#
# TOKENIZER: a directory (or Hub id) with bert-base-uncased's WordPiece vocabulary; all-MiniLM-L6-v2 has it.
# STEPS=N times N optimizer steps instead of an epoch. DRY_RUN=1 runs the same plumbing on the CPU with a 2-layer
# model, 2 steps and 64 BLiMP pairs: it checks the script, it measures nothing.
# Without a CUDA GPU (and without DRY_RUN) it stops at once with one line and exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

gpu=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")') || {
  echo "gpu_check: $PYTHON cannot import torch" >&2
  exit 1
}
if [ -z "$gpu" ] && [ -z "${DRY_RUN:-}" ]; then
  echo "gpu_check: no CUDA GPU visible to $PYTHON's torch; nothing timed (DRY_RUN=1 checks the script on the CPU)" >&2
  exit 1
fi
: "${COLA_ZIP:?gpu_check: set COLA_ZIP to cola_public_1.1.zip}"
: "${BLIMP_ZIP:?gpu_check: set BLIMP_ZIP to BLiMP.zip}"
: "${TOKENIZER:?gpu_check: set TOKENIZER to a tokenizer with bert-base-uncased vocabulary (all-MiniLM-L6-v2 has it)}"
steps=${STEPS:-}
blimp_limit=()
if [ -n "${DRY_RUN:-}" ]; then
  steps=2
  blimp_limit=(--limit 64)
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
out=${1:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$out"
model="$out/bert-base-random"

# bert-base-uncased's architecture with a fresh classifier: what the tutorial fine-tunes, minus the pretraining.
"$PYTHON" - "$TOKENIZER" "$model" <<'PYTHON'
import os
import sys

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

labels = {0: "unacceptable", 1: "acceptable"}
small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
config = BertConfig(
    num_labels=2, id2label=labels, label2id={name: i for i, name in labels.items()},
    **(small if os.environ.get("DRY_RUN") else {}),
)
torch.manual_seed(42)
BertForSequenceClassification(config).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PYTHON

for precision in fp32 bf16; do
  train=()
  blimp=()
  if [ "$precision" = bf16 ]; then
    train=(--tutorial_bf16 --bf16 True)
    blimp=(--bf16)
  fi
  if [ -n "${DRY_RUN:-}" ]; then
    train+=(--use_cpu True)  # TrainingArguments takes bf16 without a GPU only when told so
  fi
  echo "gpu_check: training, $precision" >&2
  "$PYTHON" benchmarks/speed.py --model_name_or_path "$model" --cola_source "$COLA_ZIP" \
    ${steps:+--max_steps "$steps"} --output "$out/speed_$precision.json" "${train[@]}"
  echo "gpu_check: BLiMP scoring, $precision" >&2
  "$PYTHON" benchmarks/blimp_speed.py --model_name_or_path "$model" --blimp_source "$BLIMP_ZIP" \
    --output "$out/blimp_$precision.json" "${blimp[@]}" "${blimp_limit[@]}"
done

"$PYTHON" - "$out" "${gpu:-none (DRY_RUN on the CPU)}" <<'PYTHON'
import json
import sys
from pathlib import Path

out, gpu = Path(sys.argv[1]), sys.argv[2]
speed = {p: json.loads((out / f"speed_{p}.json").read_text()) for p in ("fp32", "bf16")}
blimp = {p: json.loads((out / f"blimp_{p}.json").read_text()) for p in ("fp32", "bf16")}


def training(key, path, fmt):
    return [fmt.format(speed[p]["results"][path][key]) for p in speed]


rows = [
    ("tutorial loop: training samples/s", training("train_samples_per_s", "tutorial", "{:.0f}")),
    ("cola_hf: training samples/s", training("train_samples_per_s", "package", "{:.0f}")),
    ("cola_hf / tutorial loop", [f"{speed[p]['ratio_package_over_tutorial']['train_samples_per_s']:.2f}" for p in speed]),
    ("tutorial loop: time per epoch (s)", training("epoch_time_s", "tutorial", "{:.1f}")),
    ("cola_hf: time per epoch (s)", training("epoch_time_s", "package", "{:.1f}")),
    ("tutorial loop: peak memory (MB)", training("peak_memory_mb", "tutorial", "{:.0f}")),
    ("cola_hf: peak memory (MB)", training("peak_memory_mb", "package", "{:.0f}")),
    ("steps timed", [str(speed[p]["results"]["package"]["steps"]) for p in speed]),
]
for method, name in (("cola_hf", "cola_hf"), ("pipeline", "pipeline")):
    rows.append(
        (
            f"BLiMP, {name}: sentences/s (wall s)",
            [
                f"{blimp[p]['results'][method]['sentences_per_s']:.0f} ({blimp[p]['results'][method]['wall_s']:.1f})"
                for p in blimp
            ],
        )
    )
rows.append(
    (
        "BLiMP, cola_hf / pipeline",
        [
            f"{blimp[p]['results']['cola_hf']['sentences_per_s'] / blimp[p]['results']['pipeline']['sentences_per_s']:.2f}"
            for p in blimp
        ],
    )
)
rows.append(("BLiMP sentences", [str(blimp[p]["sentences"]) for p in blimp]))
rows.append(("BLiMP, largest P difference of the two", [f"{blimp[p]['max_abs_difference']:.1e}" for p in blimp]))
print(f"\n| GPU: {gpu} | fp32 | bf16 |\n|---|---:|---:|")
for label, cells in rows:
    print(f"| {label} | {' | '.join(cells)} |")
if gpu.startswith("none"):
    print(f"\nDRY_RUN: a 2-layer model on the CPU, to check the script; these figures measure nothing. JSON in {out}")
else:
    print(f"\nRandom-init bert-base: MCCs mean nothing here; speed only. JSON in {out}")
PYTHON
