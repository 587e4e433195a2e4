"""cola-compare: finished runs side by side (a table, a plot), per phenomenon, and whether a difference is real."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cola_hf.analysis import comparison
from cola_hf.data.annotations import ANNOTATIONS_URL
from cola_hf.errors import UsageError
from cola_hf.markdown_tables import markdown_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cola-compare",
        description="Compare finished CoLA runs from their results.json files.",
        epilog="A DIR holding run directories instead of being one (a seed study) is a group of seeds.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="DIR", help="output directories of runs")
    parser.add_argument("--output", type=Path, default=Path("comparison"), help="where the table and plot go")
    parser.add_argument(
        "--phenomena", action="store_true", help="MCC per grammatical phenomenon side by side (phenomena.md/.csv)"
    )
    parser.add_argument(
        "--significance",
        action="store_true",
        help="test each DIR against the first on glue_dev: paired bootstrap for two runs, Welch's t-test for two "
        "groups of seeds (significance.md)",
    )
    parser.add_argument(
        "--blimp",
        action="store_true",
        help="test each DIR against the first on BLiMP's pairs, per phenomenon: exact McNemar for two runs, Welch's "
        "t-test for two groups of seeds (blimp_comparison.md/.csv)",
    )
    parser.add_argument(
        "--annotations_source",
        default=ANNOTATIONS_URL,
        help="CoLA_grammatical_annotations.zip (URL, zip or directory), for runs without phenomena in analysis.json",
    )
    parser.add_argument("--minor_features", action="store_true", help="with --phenomena: the 63 minor features too")
    return parser


def main(argv: list[str] | None = None) -> int:
    """cola-compare: a table (markdown, CSV) and a plot of finished runs' results.json. Exit 2 on bad input."""
    try:
        args = build_parser().parse_args(argv)
        groups = comparison.run_groups(args.run_dirs)
        frame = comparison.compare([run for members in groups for run in members], args.output)
        print(markdown_table(frame), end="")
        print(f"Wrote {args.output / 'comparison.md'}, comparison.csv and comparison.png")
        labels = comparison.run_labels(args.run_dirs)
        if args.phenomena:
            table = comparison.write_phenomena(
                labels, groups, args.output, args.annotations_source, args.minor_features
            )
            print(f"\nMCC per phenomenon on glue_dev:\n{table}", end="")
        if args.significance:
            table = comparison.write_significance(labels, groups, args.output)
            print(f"\nSignificance on glue_dev (against {labels[0]}):\n{table}", end="")
        if args.blimp:
            table = comparison.write_blimp(labels, groups, args.output)
            print(f"\nBLiMP pair accuracy per phenomenon, against {labels[0]}:\n{table}", end="")
    except UsageError as err:
        print(f"cola-compare: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0
