"""cola-predict: label sentences acceptable or unacceptable with a fine-tuned model (cola_hf/classify.py)."""

from __future__ import annotations

import argparse
import sys

from cola_hf.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    """cola-predict: label sentences acceptable or unacceptable with a fine-tuned model. Exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="cola-predict",
        description="Label English sentences as acceptable or unacceptable with a model fine-tuned on CoLA.",
        epilog="Output columns: sentence, label, probability (of that label). With a CoLA-format TSV as --input, "
        "its labels are scored and the MCC goes to stderr.",
    )
    parser.add_argument("sentences", nargs="*", help="sentences to classify (or use --input)")
    parser.add_argument("--model", required=True, help="a run's output directory or a Hub model id")
    parser.add_argument(
        "--input", help="file with one sentence per line, or a CoLA-format TSV (source, label, notes, sentence)"
    )
    parser.add_argument("--output", help="write here instead of stdout")
    parser.add_argument(
        "--glue_submission",
        metavar="FILE",
        help="with --input GLUE's CoLA test.tsv (index, sentence): write FILE (index, prediction 0/1) for the GLUE "
        "leaderboard; the usual output then goes only to --output, if given",
    )
    parser.add_argument("--format", choices=["tsv", "jsonl"], default="tsv", help="output format (default: tsv)")
    parser.add_argument("--batch_size", type=int, default=32, help="sentences per forward pass (default: 32)")
    parser.add_argument(
        "--max_length", type=int, help="truncate sentences to this many tokens (default: the model's limit)"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="score each word's push toward acceptable/unacceptable (integrated gradients): shaded in a terminal, "
        "else a word_scores column (TSV) or words/word_scores (JSONL)",
    )
    parser.add_argument("--explain_html", metavar="FILE", help="with --explain: also one self-contained page")
    args = parser.parse_args(argv)
    # Imported here, and the heavy libraries inside `predict` only once needed: bad input fails in a blink.
    import datasets
    import numpy as np
    import transformers

    from cola_hf import classify

    # Our own stderr lines say what matters; the libraries' loading bars and notices would bury them.
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        if args.input and args.sentences:
            raise UsageError("give sentences as arguments or --input FILE, not both")
        if not args.input and not args.sentences:
            raise UsageError("nothing to classify: give sentences as arguments or --input FILE")
        if args.batch_size < 1 or (args.max_length is not None and args.max_length < 2):
            raise UsageError("--batch_size must be at least 1 and --max_length at least 2")
        glue_test = None
        if args.glue_submission:
            if not args.input:
                raise UsageError("--glue_submission needs --input GLUE's CoLA test.tsv (index, sentence)")
            glue_test = classify.read_glue_test(args.input)
            sentences = classify.Sentences(glue_test.texts)
        else:
            sentences = classify.read_input(args.input) if args.input else classify.from_arguments(args.sentences)
        if not sentences.texts:
            raise UsageError("nothing to classify: every sentence is empty")
        if sentences.skipped:
            where = "line" if args.input else "argument"
            shown = ", ".join(map(str, sentences.skipped[:10])) + (", ..." if len(sentences.skipped) > 10 else "")
            print(f"cola-predict: skipped {len(sentences.skipped)} empty {where}(s): {shown}", file=sys.stderr)
        classifier = classify.load_classifier(args.model)
        max_length = args.max_length or classify.model_max_length(classifier)
        too_long = classify.count_too_long(classifier, sentences.texts, max_length)
        if too_long:
            print(f"cola-predict: truncated {too_long} sentence(s) longer than {max_length} tokens", file=sys.stderr)
        predictions = classify.classify(
            classifier, sentences.texts, args.batch_size, max_length, progress=args.input is not None
        )
        if args.explain_html and not args.explain:
            raise UsageError("--explain_html needs --explain")
        shown = False  # the shaded sentences took stdout's place
        if args.explain:
            explained = classify.explain(classifier, predictions, max_length=max_length)
            if args.explain_html:
                classify.write_explanation_page(args.explain_html, predictions, explained)
            if not args.output and glue_test is None and sys.stdout.isatty():
                classify.write_explained(predictions, sys.stdout, colour=True)
                shown = True
        if args.output:
            from cola_hf.file_io import atomic_path

            try:
                with atomic_path(args.output) as temporary, open(temporary, "w", encoding="utf-8") as stream:
                    classify.write_labelled(predictions, stream, args.format)
            except OSError as err:
                raise UsageError(f"--output {args.output}: cannot write ({err.strerror})") from err
        elif glue_test is None and not shown:
            classify.write_labelled(predictions, sys.stdout, args.format)
        if glue_test is not None:
            classify.write_glue_submission(
                args.glue_submission, glue_test.indices, classify.label_ids(classifier, predictions)
            )
            expected = (
                ""
                if len(predictions) == classify.GLUE_TEST_ROWS
                else f"; GLUE's test set has {classify.GLUE_TEST_ROWS}"
            )
            print(
                f"cola-predict: wrote {len(predictions)} predictions to {args.glue_submission}{expected}",
                file=sys.stderr,
            )
        if sentences.labels is not None:
            from cola_hf.metrics import score

            result = score(np.array(sentences.labels), classify.label_ids(classifier, predictions))
            print(
                f"cola-predict: {len(predictions)} labelled sentences: "
                f"matthews_correlation {result['matthews_correlation']:.6f}, accuracy {result['accuracy']:.6f}",
                file=sys.stderr,
            )
    except UsageError as err:
        print(f"cola-predict: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
