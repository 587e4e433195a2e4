#!/usr/bin/env bash
# The GPU check, for a GPU node as clusters have them (no network, a site-provided PyTorch): one GPU, stages with
# time limits, one table at the end. Install first (docs/cluster.md, "Installing on a node without network").
#
#   COLA_ZIP=path/to/cola_public_1.1.zip BLIMP_ZIP=path/to/BLiMP.zip TOKENIZER=path/to/bert-tokenizer-dir \
#       benchmarks/gpu_check.sh [OUTPUT_DIR]
#
# Stages (limits in seconds; the whole check is estimated at 6-7 minutes on one H100, see the end of the file):
#   preflight  (60)  CUDA visible, versions, imports, data paths: any failure is one line and exit 1
#   model      (60)  bert-base-uncased's architecture (BertConfig()'s defaults, random init: no download) with
#                    TOKENIZER's vocabulary (a directory: all-MiniLM-L6-v2 has bert-base-uncased's)
#   train fp32, train bf16 (240 each)  benchmarks/speed.py: the tutorial's own loop (AdamW without weight decay,
#                    as the tutorial's) and this package, STEPS optimizer steps each (default 100)
#   blimp fp32, blimp bf16 (180 each)  benchmarks/blimp_speed.py: BLiMP's 134,000 sentences by the package and by
#                    pipeline("text-classification")
#   end to end (300)  experiments/cola.py --bf16 true --max_steps 20 with BLiMP, then the saved model evaluated
#                    again in float32 (--do_train False): BLiMP's probabilities must agree (BLiMP is scored in
#                    float32 whatever the run's precision), to TOLERANCE (default 1e-5)
# One GPU: the first of CUDA_VISIBLE_DEVICES (GPU 0 when unset); a process that sees several would be wrapped in
# DataParallel by transformers. Nothing is fetched: HF_HUB_OFFLINE=1, W&B disabled.
# DRY_RUN=1 runs every stage on the CPU with a 2-layer model, 2 steps and a few BLiMP pairs: it checks the
# script (CI runs it), it measures nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-100}
TOLERANCE=${TOLERANCE:-1e-5}
dry=${DRY_RUN:-}
fail() {
  echo "gpu_check: $*" >&2
  exit 1
}

# A stage with a time limit; its output goes to OUTPUT_DIR/<name>.log, and a failure names the log.
stage() {
  local name=$1 limit=$2
  shift 2
  echo "gpu_check: $name (limit ${limit}s)" >&2
  local started=$SECONDS status=0
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1 || status=$?
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    fail "$name: over its ${limit}s limit; see $out/$name.log"
  elif [ "$status" != 0 ]; then
    fail "$name: failed (exit $status): $(grep -v '^\s*$' "$out/$name.log" | tail -n 1) (all of it: $out/$name.log)"
  fi
  echo "$name $((SECONDS - started))" >>"$out/stage_seconds.txt"
}

# One GPU, pinned before anything imports torch.
first_device=${CUDA_VISIBLE_DEVICES:-0}
export CUDA_VISIBLE_DEVICES=${first_device%%,*}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${1:-$(mktemp -d -t gpu-check-XXXXXX)}
mkdir -p "$out"
: >"$out/stage_seconds.txt"

# --- preflight: one line for the first thing missing ------------------------------------------------------------
[ -n "${COLA_ZIP:-}" ] || fail "preflight: set COLA_ZIP to cola_public_1.1.zip (or its unpacked directory)"
[ -n "${BLIMP_ZIP:-}" ] || fail "preflight: set BLIMP_ZIP to BLiMP.zip (or its unpacked directory)"
[ -n "${TOKENIZER:-}" ] || fail "preflight: set TOKENIZER to a directory with bert-base-uncased's vocabulary"
[ -e "$COLA_ZIP" ] || fail "preflight: COLA_ZIP=$COLA_ZIP does not exist"
[ -e "$BLIMP_ZIP" ] || fail "preflight: BLIMP_ZIP=$BLIMP_ZIP does not exist"
[ -d "$TOKENIZER" ] || fail "preflight: TOKENIZER=$TOKENIZER is not a directory (nothing is downloaded here)"
command -v "$PYTHON" >/dev/null || fail "preflight: no $PYTHON (set PYTHON to the environment's python)"
versions=$(timeout 60 "$PYTHON" - "$TOKENIZER" 2>&1 <<'PYTHON'
import os
import sys

try:
    import accelerate
    import datasets
    import torch
    import transformers

    import cola_hf
    import cola_hf.cli.train  # every layer of the package and what it imports
except Exception as err:  # noqa: BLE001 (one line, whatever it is)
    sys.exit(f"preflight: cannot import {getattr(err, 'name', None) or err}: install the package (docs/cluster.md)")
if not os.environ.get("DRY_RUN"):
    if not torch.cuda.is_available():
        sys.exit(f"preflight: torch {torch.__version__} sees no CUDA GPU (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})")
    if not torch.cuda.is_bf16_supported():
        sys.exit(f"preflight: {torch.cuda.get_device_name(0)} has no bf16 (the check's bf16 stages need Ampere or newer)")
try:
    transformers.AutoTokenizer.from_pretrained(sys.argv[1])
except Exception as err:  # noqa: BLE001
    sys.exit(f"preflight: TOKENIZER={sys.argv[1]} holds no tokenizer ({type(err).__name__})")
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (DRY_RUN on the CPU)"
cuda = torch.version.cuda or "no CUDA build"
print(
    f"{gpu} | torch {torch.__version__} (CUDA {cuda}) | transformers {transformers.__version__} | "
    f"accelerate {accelerate.__version__} | datasets {datasets.__version__} | cola_hf {cola_hf.__version__}"
)
PYTHON
) || fail "$(echo "$versions" | tail -n 1)"
[ -n "$dry" ] || case "$versions" in none*) fail "preflight: no CUDA GPU visible (DRY_RUN=1 checks the script on the CPU)" ;; esac
echo "gpu_check: $versions" >&2
echo "$versions" >"$out/versions.txt"

# The first `lines` lines of the files matching `pattern` in a zip or directory, into `target` (DRY_RUN's data).
excerpt='
import fnmatch
import sys
import zipfile
from pathlib import Path

source, target, pattern, lines = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
target.mkdir(parents=True, exist_ok=True)
if source.is_dir():
    files = {p.name: p.read_text(encoding="utf-8") for p in sorted(source.rglob("*")) if fnmatch.fnmatch(str(p), pattern)}
else:
    with zipfile.ZipFile(source) as archive:
        files = {
            Path(name).name: archive.read(name).decode("utf-8")
            for name in sorted(archive.namelist())
            if fnmatch.fnmatch(name, pattern) and "__MACOSX" not in name
        }
for name in sorted(files)[: 2 if pattern == "*.jsonl" else None]:
    (target / name).write_text("".join(files[name].splitlines(keepends=True)[:lines]), encoding="utf-8")
'
steps=$STEPS
cola=$COLA_ZIP
blimp=$BLIMP_ZIP
blimp_limit=()
cpu=()
if [ -n "$dry" ]; then
  steps=2
  blimp_limit=(--limit 64)
  cpu=(--use_cpu True) # TrainingArguments takes bf16 without a GPU only when told to use the CPU
  # The first lines of CoLA's raw files and of two BLiMP paradigms: every stage, in seconds.
  cola="$out/cola-small"
  blimp="$out/blimp-small"
  "$PYTHON" - "$COLA_ZIP" "$cola" "*/raw/*.tsv" 192 <<<"$excerpt"
  "$PYTHON" - "$BLIMP_ZIP" "$blimp/data" "*.jsonl" 8 <<<"$excerpt"
fi

# --- the model: bert-base-uncased's architecture with a fresh classifier -----------------------------------------
model="$out/bert-base-random"
stage model 60 "$PYTHON" - "$TOKENIZER" "$model" <<'PYTHON'
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

# --- speed: training, then BLiMP scoring, in fp32 and bf16 -------------------------------------------------------
for precision in fp32 bf16; do
  train=("${cpu[@]}")
  scoring=()
  if [ "$precision" = bf16 ]; then
    train+=(--tutorial_bf16 --bf16 True)
    scoring=(--bf16)
  fi
  stage "train_$precision" 240 "$PYTHON" benchmarks/speed.py --model_name_or_path "$model" --cola_source "$cola" \
    --max_steps "$steps" --output "$out/speed_$precision.json" "${train[@]}"
  stage "blimp_$precision" 180 "$PYTHON" benchmarks/blimp_speed.py --model_name_or_path "$model" \
    --blimp_source "$BLIMP_ZIP" --output "$out/blimp_$precision.json" "${scoring[@]}" "${blimp_limit[@]}"
done

# --- end to end: a bf16 run's BLiMP probabilities against a float32 evaluation of the model it saved ------------
run=(--cola_source "$cola" --blimp_source "$blimp" --annotations_source none --report_to none
  --disable_tqdm true --max_seq_length 64 "${cpu[@]}")
stage end_to_end 300 bash -c '
  set -e
  "$0" experiments/cola.py "${@:3}" --model_name_or_path "$1" --output_dir "$2/run_bf16" --bf16 true \
    --max_steps '"$([ -n "$dry" ] && echo 2 || echo 20)"' --save_strategy no
  "$0" experiments/cola.py "${@:3}" --model_name_or_path "$2/run_bf16" --output_dir "$2/eval_fp32" --do_train false
' "$PYTHON" "$model" "$out" "${run[@]}"
comparison=$("$PYTHON" - "$out" "$TOLERANCE" 2>&1 <<'PYTHON'
import sys
from pathlib import Path

from cola_hf.analysis.blimp_report import read_blimp_predictions

out, tolerance = Path(sys.argv[1]), float(sys.argv[2])
bf16 = read_blimp_predictions(out / "run_bf16" / "predictions_blimp.tsv")
fp32 = read_blimp_predictions(out / "eval_fp32" / "predictions_blimp.tsv")
if bf16.keys() != fp32.keys():
    sys.exit("end to end: the two BLiMP passes scored different pairs")
difference = max(abs(bf16.prob_good - fp32.prob_good).max(), abs(bf16.prob_bad - fp32.prob_bad).max())
print(f"{difference:.1e} over {len(fp32.uids)} pairs")
if difference > tolerance:
    sys.exit(
        f"end to end: BLiMP under --bf16 differs from a float32 pass of the same model by {difference:.1e} "
        f"(> {tolerance:g}): it is not scored in float32"
    )
PYTHON
) || fail "$(echo "$comparison" | tail -n 1)"

# --- the table ---------------------------------------------------------------------------------------------------
"$PYTHON" - "$out" "$comparison" "$SECONDS" <<'PYTHON'
import json
import sys
from pathlib import Path

out, comparison, total_s = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
versions = (out / "versions.txt").read_text().strip()
gpu = versions.split(" | ")[0]
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
for method in ("cola_hf", "pipeline"):
    rows.append(
        (
            f"BLiMP, {method}: sentences/s (wall s)",
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
print(f"\n{versions}\n\n| GPU: {gpu} | fp32 | bf16 |\n|---|---:|---:|")
for label, cells in rows:
    print(f"| {label} | {' | '.join(cells)} |")
print(f"\nEnd to end, BLiMP of a --bf16 run against a float32 pass of its model: largest difference {comparison}.")
stages = ", ".join(f"{name} {s}s" for name, s in (line.split() for line in (out / "stage_seconds.txt").read_text().splitlines()))
print(f"Stages: {stages}; whole check {total_s}s.")
if gpu.startswith("none"):
    print(f"DRY_RUN: a 2-layer model on the CPU, to check the script; these figures measure nothing. Files in {out}")
else:
    print(f"Random-init bert-base: MCCs mean nothing here; speed only. Files in {out}")
PYTHON

# Estimate for one H100 (from the work, not measured here): preflight and model ~15 s; each training stage 100
# steps of bert-base at batch 32 through two child processes (~15 s of imports and tokenizing each, ~5 s of steps,
# two evaluations) ~60 s; each BLiMP stage 134,000 sentences twice (the package in ~10 s, the pipeline in ~40 s,
# plus tokenizing) ~70 s; end to end two runs (20 steps, the test sets, BLiMP once each) ~90 s: ~6-7 minutes.
