"""Scoring BLiMP's sentences: this package's scorer against `pipeline("text-classification")`, in one run.

(a) ``cola_hf``: `tokenize_blimp` (batched, cached by datasets; its first-run time is reported apart) then
`cola_hf.training.inference.acceptable_probabilities` (longest first, neighbours in length batched together,
`inference_mode`, logits kept on the device). (b) ``pipeline``: the obvious alternative, the text-classification
pipeline over the same sentences in file order with a batch size. Both run on the same model object on the same
device, after a short warm-up each; the table gives wall time and sentences per second, and the largest
difference between their probabilities (they must agree). Commands: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# Run from a checkout without installing the package.
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from speed import Stopwatch, machine_info  # noqa: E402

METHODS = ("cola_hf", "pipeline")
WARMUP_SENTENCES = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="a sequence-classification checkpoint")
    parser.add_argument(
        "--blimp_source", default=os.environ.get("BLIMP_ZIP"), help="BLiMP zip or directory (default: $BLIMP_ZIP)"
    )
    parser.add_argument("--limit", type=int, default=None, help="score the first N pairs only (default: all)")
    parser.add_argument("--batch_size", type=int, default=256, help="sentences per batch, both ways")
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the accelerator if any)")
    parser.add_argument("--bf16", action="store_true", help="both ways under bf16 autocast")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.blimp_source:
        build_parser().error("--blimp_source is required (or set BLIMP_ZIP)")
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from cola_hf.data.blimp_pairs import read_blimp, tokenize_blimp
    from cola_hf.training.inference import acceptable_index, acceptable_probabilities

    device = torch.device(args.device or (torch.accelerator.current_accelerator() or "cpu"))
    autocast = torch.bfloat16 if args.bf16 else None
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path).to(device).eval()

    with tempfile.TemporaryDirectory(prefix="blimp-speed-") as cache:
        pairs = read_blimp(args.blimp_source, cache)
        if args.limit is not None:
            pairs = pairs.select(range(min(args.limit, len(pairs))))
        texts = [
            sentence for pair in zip(pairs["sentence_good"], pairs["sentence_bad"], strict=True) for sentence in pair
        ]
        with Stopwatch() as tokenizing:  # a user's first run; later runs read datasets' cache
            sentences = tokenize_blimp(pairs, tokenizer, args.max_seq_length)

        def ours(rows: Any) -> np.ndarray:
            return acceptable_probabilities(
                model, rows, pad_token_id=tokenizer.pad_token_id, batch_size=args.batch_size,
                autocast_dtype=autocast, progress=False,
            )  # fmt: skip

        classifier = pipeline("text-classification", model=model, tokenizer=tokenizer, device=device)
        label = model.config.id2label[acceptable_index(model)]

        def theirs(batch: list[str]) -> np.ndarray:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                outputs = classifier(
                    batch, batch_size=args.batch_size, top_k=None, truncation=True, max_length=args.max_seq_length
                )
            return np.array([next(s["score"] for s in scores if s["label"] == label) for scores in outputs])

        warmup = min(WARMUP_SENTENCES, len(texts))  # CUDA kernels, allocator, thread pools: not what is measured
        ours(sentences.select(range(warmup)))
        theirs(texts[:warmup])
        timed: dict[str, Any] = {}
        with Stopwatch() as timed["cola_hf"]:
            ours_p = ours(sentences)
            _synchronize(device)
        with Stopwatch() as timed["pipeline"]:
            theirs_p = theirs(texts)
            _synchronize(device)

    results = {
        method: {
            "wall_s": watch.wall_s,
            "sentences_per_s": len(texts) / watch.wall_s,
            "cpu_s": watch.cpu_s,
            "others_cpu_share": watch.others_cpu_share,
        }
        for method, watch in timed.items()
    }
    results["cola_hf"]["tokenization_first_run_s"] = tokenizing.wall_s
    difference = float(np.abs(ours_p - theirs_p).max())
    table = format_table(results, len(texts))
    print(table)
    print(f"largest |P(acceptable) difference| between the two: {difference:.2e}")
    if args.output:
        report = {
            "sentences": len(texts),
            "results": results,
            "max_abs_difference": difference,
            "device": str(device),
            "bf16": args.bf16,
            "batch_size": args.batch_size,
            "machine": machine_info(),
            "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
            "table_markdown": table,
        }
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(results: dict[str, dict[str, Any]], sentences: int) -> str:
    lines = [
        f"| {sentences} sentences | wall time (s) | sentences/s | ratio |",
        "|---|---:|---:|---:|",
    ]
    baseline = results["pipeline"]["sentences_per_s"]
    names = {"cola_hf": "cola_hf (length-sorted, inference_mode)", "pipeline": 'pipeline("text-classification")'}
    for method in METHODS:
        result = results[method]
        lines.append(
            f"| {names[method]} | {result['wall_s']:.2f} | {result['sentences_per_s']:.0f} | "
            f"{result['sentences_per_s'] / baseline:.2f} |"
        )
    tokenizing = results["cola_hf"]["tokenization_first_run_s"]
    return "\n".join(lines) + f"\n\ncola_hf's tokenization on a first run (then cached): {tokenizing:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
