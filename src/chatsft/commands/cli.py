"""`chatsft <command>`: the command-line entry point.

Each command lives in its own module, imported only when it runs (so `chatsft check` never imports torch).
A command module defines `add_arguments(parser)` and `run(args) -> int`; `train` parses its own flags with
HfArgumentParser, so it receives the raw argument list instead. User mistakes (`ChatsftError`) print one line
and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from chatsft.errors import ChatsftError

# name -> (module, one-line help). Modules are imported lazily.
COMMANDS = {
    "train": (
        "chatsft.commands.train",
        "fine-tune a model on conversations (FastChat-compatible flags; see `chatsft train --help`)",
    ),
    "demo": (
        "chatsft.commands.demo",
        "fine-tune a tiny model on the bundled sample conversations and show it answering",
    ),
    "chat": (
        "chatsft.commands.chat",
        "talk to a saved model through its chat template (interactive, or --prompts FILE)",
    ),
    "check": ("chatsft.commands.check", "validate conversation files and say what is wrong, where"),
    "prepare": (
        "chatsft.commands.prepare",
        "write the exact input_ids/labels of every example to a JSONL file",
    ),
    "preview": (
        "chatsft.commands.preview",
        "show which tokens of a record are trained (terminal colours or HTML)",
    ),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="chatsft", description="Fine-tune causal language models into chat models.", allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for name, (_, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(
            name, help=help_text, description=help_text, add_help=name != "train", allow_abbrev=False
        )
    return parser, parsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, parsers = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    try:
        module = importlib.import_module(COMMANDS[name][0])
        if name == "train":
            return module.main(argv[1:]) or 0
        sub = parsers[name]
        module.add_arguments(sub)
        args = sub.parse_args(argv[1:])
        return module.run(args) or 0
    except ChatsftError as err:
        print(f"chatsft {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"chatsft {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
