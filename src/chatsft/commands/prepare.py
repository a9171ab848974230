"""`chatsft prepare`: write the exact `input_ids`/`labels` of every example to a JSON Lines file, with the
audit.

It loads the tokenizer and picks the template and loss mode the way `chatsft train` does (family presets,
`--add_special_tokens`, `--conv_template auto`), so the file holds what training will see.
`--model_name_or_path` may be a folder with only tokenizer files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chatsft.audit import Audit
from chatsft.records import ReadPolicy, read_conversations
from chatsft.tokenizer import add_encoder_arguments, load_encoder_from_args


def add_arguments(parser) -> None:
    add_encoder_arguments(parser)
    parser.add_argument("--output", required=True, metavar="OUT.jsonl", help="one JSON line per example")
    parser.add_argument("--audit", default=None, metavar="FILE", help="audit JSON (default: OUT.audit.json)")


def audit_path(output: str, given: str | None) -> Path:
    if given:
        return Path(given)
    out = Path(output)
    return (
        out.with_suffix(".audit.json") if out.suffix == ".jsonl" else out.with_name(out.name + ".audit.json")
    )


def run(args) -> int:
    encoder, notices = load_encoder_from_args(args)
    for line in notices:
        print(line)
    # every record is read; rejected ones are counted (see `chatsft check`), unreadable files stop
    conversations, report = read_conversations(args.data_path, policy=ReadPolicy(max_invalid_ratio=1.0))
    audit = Audit(stop_ids=encoder.stop_ids)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(conversations, desc="encoding", unit=" conversations", disable=None)  # off when not a terminal
    with open(out, "w", encoding="utf-8") as f:
        for conv in bar:
            result = encoder.encode(conv)
            audit.add(result)
            for example in result.examples:
                f.write(json.dumps(example.to_dict(), ensure_ascii=False) + "\n")
    target = audit_path(args.output, args.audit)
    audit.write(target)
    print(report.summary())
    print(audit.format())
    print(f"wrote {audit.examples} examples to {out} and the audit to {target}")
    if not audit.ok:
        print(
            "warning: some trained replies do not end in a token that stops generation (see above)",
            file=sys.stderr,
        )
    return 0
