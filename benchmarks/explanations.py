"""Word-level explanations of a fine-tuned model on BLiMP's pairs: sentences per second and the hit-rate table of
each attribution method, on the same seeded sample a run explains (N pairs per paradigm), without scoring all
134,000 sentences first: only the sampled pairs' two sentences are scored, for "model right/wrong".

    python benchmarks/explanations.py --model RUN_DIR --blimp path/to/BLiMP.zip --pairs 5 --output out.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cola_hf.analysis import explanations  # noqa: E402
from cola_hf.data import blimp_pairs  # noqa: E402
from cola_hf.training import attributions  # noqa: E402
from cola_hf.training.inference import acceptable_probabilities  # noqa: E402
from cola_hf.training.model import load_model_and_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--blimp", required=True)
    parser.add_argument("--pairs", type=int, default=5, help="pairs per paradigm")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_seq_length", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(attributions.METHODS))
    parser.add_argument("--output", required=True, help="markdown file, and a .json per method beside it")
    args = parser.parse_args()

    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    pairs = blimp_pairs.read_blimp(args.blimp)
    rows = attributions.sample_pairs(pairs["UID"], args.pairs, args.seed)
    chosen = pairs.select(rows)
    good_texts, bad_texts = list(chosen["sentence_good"]), list(chosen["sentence_bad"])
    # The pairs' own sentences, tokenized as a run tokenizes BLiMP (data/blimp_pairs.py), then scored as it does.
    encoded = tokenizer(good_texts + bad_texts, truncation=True, max_length=args.max_seq_length)["input_ids"]
    scored_p = acceptable_probabilities(model, encoded, pad_token_id=tokenizer.pad_token_id, progress=False)
    good_p, bad_p = scored_p[: len(good_texts)], scored_p[len(good_texts) :]
    report = [f"model {args.model}; {len(rows)} pairs ({args.pairs} per paradigm, seed {args.seed})", ""]
    for method in args.methods:
        started = time.perf_counter()
        scored = attributions.attribute_words(
            model, tokenizer, good_texts + bad_texts, method=method, max_length=args.max_seq_length
        )
        seconds = time.perf_counter() - started
        sentences = [explanations.explained_sentence(attribution) for attribution in scored]
        explained = [
            explanations.explained_pair(
                chosen[index]["UID"],
                str(chosen[index]["pairID"]),
                chosen[index]["linguistics_term"],
                sentences[index],
                sentences[len(rows) + index],
                bool(good_p[index] > bad_p[index]),
            )
            for index in range(len(rows))
        ]
        record = explanations.Explanations(
            method=method,
            ig_steps=attributions.IG_STEPS if method == "integrated_gradients" else 1,
            baseline=attributions.BASELINE,
            pairs_per_paradigm=args.pairs,
            seed=args.seed,
            max_seq_length=args.max_seq_length,
            hits=explanations.hit_table(explained),
            pairs=explained,
            errors=[],
            sentences=len(scored),
            seconds=round(seconds, 3),
            sentences_per_second=round(len(scored) / seconds, 3),
        )
        Path(args.output).with_suffix(f".{method}.json").write_text(record.to_json())
        Path(args.output).with_suffix(f".{method}.html").write_text(explanations.page_html(record))
        large = sum(sentence.large_delta for sentence in sentences)
        report += [
            f"## {method}: {len(scored)} sentences in {seconds:.1f} s ({len(scored) / seconds:.2f} a second); "
            f"large delta: {large}",
            "",
            explanations.hits_markdown(record),
            "",
        ]
        Path(args.output).write_text("\n".join(report))
        print("\n".join(report[-4:]), flush=True)


if __name__ == "__main__":
    main()
