"""`chatsft check FILE...`: validate conversation files and say what is wrong, where.

Prints a summary (records read, accepted, rejected by reason, turns, characters; records with tools, tool
calls, tool messages, reasoning and weight-0 replies), then the first problems, one line each as
`FILE:RECORD_INDEX (id=ID) turn N: REASON: detail` (what a terminal would not show as itself is escaped).
Exit 0 when every record is accepted, 1 when some are rejected, 2 when a file cannot be read at all or
`--rejects` cannot be written (one line on stderr). Output cut short by its reader (`| head`) ends quietly.
"""

from __future__ import annotations

import argparse
import os
import sys

from chatsft.records import read_conversations
from chatsft.report import printable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help=".json, .jsonl or .parquet conversation files, folders of them, datasets save_to_disk folders, "
        "or Hub dataset names (org/name[:split], where the network allows)",
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
    if args.rejects:  # before printing: the file is wanted even when the reader of the output goes away
        report.write_rejects(args.rejects)
    code = 2 if report.file_errors else 1 if report.rejected_total else 0
    try:
        _show(report, args)
    except BrokenPipeError:
        # `chatsft check ... | head`: the reader has gone, so stop quietly (Python's documented way: point
        # stdout at /dev/null so that the interpreter's last flush does not complain)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    for error in report.file_errors:  # the one line a user must see, also on stderr for scripts
        print(f"chatsft check: error: {error}", file=sys.stderr)
    return code


def _show(report, args: argparse.Namespace) -> None:
    print(report.summary())
    problems = report.file_errors + report.problems
    if problems:
        shown = problems if args.max_problems <= 0 else problems[: args.max_problems]
        print(f"problems ({len(shown)} of {len(problems)} shown):")
        for problem in shown:
            print(f"  {problem}")
    if args.rejects:
        print(f"wrote {len(report.rejected_records)} rejected records to {printable(args.rejects)}")
    sys.stdout.flush()
