"""`chatsft prepare`: write the exact `input_ids`/`labels` of every example to a JSON Lines file, with the
audit.

It loads the tokenizer and picks the template and loss mode the way `chatsft train` does (family presets,
`--add_special_tokens`, `--conv_template auto`), so the file holds what training will see.
`--model_name_or_path` may be a folder with only tokenizer files. The helpers here are shared with `chatsft
preview`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chatsft.audit import Audit, stop_token_ids
from chatsft.encode import LOSS_MODES, Encoder, loss_mode_from_flags
from chatsft.templates import TEMPLATE_CHOICES, get_template


def add_source_arguments(parser) -> None:
    """The flags `prepare` and `preview` share with `chatsft train` (same names, same meaning)."""
    parser.add_argument(
        "--data_path",
        nargs="+",
        required=True,
        metavar="FILE",
        help="conversation files (.json, .jsonl, .parquet; ShareGPT or OpenAI messages)",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, metavar="PATH", help="model or tokenizer folder (local)"
    )
    parser.add_argument(
        "--conv_template",
        default="auto",
        choices=TEMPLATE_CHOICES,
        help="prompt format; auto = the tokenizer's chat_template, else vicuna_v1.1",
    )
    parser.add_argument("--loss_mode", default=None, choices=LOSS_MODES, help="default: assistant_turns")
    for flag in ("efficient_loss", "last_response_loss", "split_example_loss"):
        parser.add_argument(f"--{flag}", action="store_true", help="FastChat/Yuan2 flag for --loss_mode")
    parser.add_argument(
        "--model_max_length",
        type=int,
        default=2048,
        metavar="N",
        help="truncate examples to N tokens, keeping the start (default 2048, as train)",
    )
    parser.add_argument("--model_family", default=None, help="preset (yuan2, baichuan, baichuan2)")
    parser.add_argument(
        "--add_special_tokens",
        nargs="*",
        default=[],
        metavar="TOKEN",
        help="extra special tokens to register, as in train",
    )


def add_arguments(parser) -> None:
    add_source_arguments(parser)
    parser.add_argument("--output", required=True, metavar="OUT.jsonl", help="one JSON line per example")
    parser.add_argument("--audit", default=None, metavar="FILE", help="audit JSON (default: OUT.audit.json)")


def load_encoder(args) -> tuple[Encoder, tuple[int, ...], list[str]]:
    """Tokenizer, template and loss mode as `chatsft train` resolves them -> (encoder, stop ids, notices)."""
    from chatsft.model import add_special_tokens, load_tokenizer, prepare_tokenizer

    loss_mode = loss_mode_from_flags(
        args.loss_mode, args.efficient_loss, args.last_response_loss, args.split_example_loss
    )
    path, template_name, generation = Path(args.model_name_or_path), args.conv_template, {}
    if (path / "config.json").is_file():
        tokenizer, preset, _, notices = prepare_tokenizer(
            path,
            model_max_length=args.model_max_length,
            model_family=args.model_family,
            extra_special_tokens=args.add_special_tokens,
        )
        if template_name == "auto" and preset.template:
            template_name = preset.template
    else:  # a tokenizer-only folder
        tokenizer = load_tokenizer(path, model_max_length=args.model_max_length)
        notices = []
        if args.add_special_tokens:
            added = add_special_tokens(tokenizer, args.add_special_tokens)
            notices.append(f"--add_special_tokens: {added} of {len(args.add_special_tokens)} tokens were new")
    if (path / "generation_config.json").is_file():
        generation = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    template, notice = get_template(template_name, tokenizer)
    encoder = Encoder(template, tokenizer, loss_mode, args.model_max_length)
    added = tokenizer.get_added_vocab()
    stops = stop_token_ids(tokenizer, generation, [added[t] for t in encoder.stops if t in added])
    return encoder, stops, [*notices, notice, f"loss mode: {loss_mode}"]


def read(args):
    """Every record of --data_path; rejected ones are counted (see `chatsft check`), unreadable files stop."""
    from chatsft.records import ReadPolicy, read_conversations

    return read_conversations(args.data_path, policy=ReadPolicy(max_invalid_ratio=1.0))


def audit_path(output: str, given: str | None) -> Path:
    if given:
        return Path(given)
    out = Path(output)
    return (
        out.with_suffix(".audit.json") if out.suffix == ".jsonl" else out.with_name(out.name + ".audit.json")
    )


def run(args) -> int:
    encoder, stops, notices = load_encoder(args)
    for line in notices:
        print(line)
    conversations, report = read(args)
    audit = Audit(stop_ids=stops)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for conv in conversations:
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
