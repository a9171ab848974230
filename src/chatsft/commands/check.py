"""`chatsft check FILE...`: validate conversation files and say what is wrong, where.

Prints a summary (records read, accepted, rejected by reason, turns, characters), then the first problems, one
line each as `FILE:RECORD_INDEX (id=ID) turn N: REASON: detail`. Exit 0 when every record is accepted, 1 when
some are rejected, 2 when a file cannot be read at all.
"""

from __future__ import annotations

import argparse
import sys

from chatsft.records import read_conversations


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help=".json, .jsonl or .parquet conversation files"
    )
    parser.add_argument(
        "--rejects", metavar="FILE", help="write every rejected record with its reason as JSONL"
    )
    parser.add_argument(
        "--max_problems",
        "--max-problems",
        type=int,
        default=20,
        metavar="N",
        help="how many problems to print (default 20; 0 prints all)",
    )


def run(args: argparse.Namespace) -> int:
    _, report = read_conversations(args.files)
    print(report.summary())
    problems = report.file_errors + report.problems
    if problems:
        shown = problems if args.max_problems <= 0 else problems[: args.max_problems]
        print(f"problems ({len(shown)} of {len(problems)} shown):")
        for problem in shown:
            print(f"  {problem}")
    if args.rejects:
        report.write_rejects(args.rejects)
        print(f"wrote {len(report.rejected_records)} rejected records to {args.rejects}")
    for error in report.file_errors:  # the one line a user must see, also on stderr for scripts
        print(f"chatsft check: error: {error}", file=sys.stderr)
    if report.file_errors:
        return 2
    return 1 if report.rejected_total else 0
