"""`chatsft preview`: show one record's tokens, the trained ones coloured, in the terminal and as an HTML
page.

Tokens are shown as the text they cover in the rendered conversation; neighbouring tokens alternate shades so
their boundaries show, trained tokens are green, control tokens bold. Without colour (a pipe, or --color
never) trained stretches are wrapped in «».
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

from chatsft.encode import IGNORE_INDEX, Example
from chatsft.errors import DataError
from chatsft.records import ReadPolicy, read_conversations
from chatsft.tokenizer import add_encoder_arguments, load_encoder_from_args

_TRAINED = ("\033[30;42m", "\033[30;102m")
_PROMPT = ("\033[2m", "\033[0m")
_RESET, _BOLD = "\033[0m", "\033[1m"


def add_arguments(parser) -> None:
    add_encoder_arguments(parser)
    parser.add_argument("--index", type=int, default=0, help="which accepted record, 0-based, in input order")
    parser.add_argument("--id", default=None, help="pick the record by its id instead")
    parser.add_argument("--html", default=None, metavar="FILE", help="also write a standalone HTML page")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")


def pieces(example: Example, control_ids=()) -> list[tuple[str, bool, bool, int]]:
    """(text, trained, control, token id) per token; tokens sharing a span (byte pieces) show it once."""
    out, pos = [], 0
    for tok, label, (s, e) in zip(example.input_ids, example.labels, example.spans):
        if s > pos:  # text no token covers (none for the tokenizers we know)
            out.append((example.text[pos:s], False, False, -1))
        shown = example.text[max(s, pos) : e] if e > pos else ""
        out.append((shown, label != IGNORE_INDEX, tok in control_ids, tok))
        pos = max(pos, e)
    if pos < len(example.text):
        out.append((example.text[pos:], False, False, -1))
    return out


def terminal(example: Example, control_ids, color: bool) -> str:
    out, shade, in_run = [], 0, False
    for text, trained, control, _ in pieces(example, control_ids):
        shade ^= 1
        if color:
            style = (_TRAINED if trained else _PROMPT)[shade] + (_BOLD if control else "")
            shown = text.replace("\n", "↵\n") if trained else text
            out.append("".join(f"{style}{line}{_RESET}" if line else "" for line in _keep_newlines(shown)))
        else:
            if trained != in_run:
                out.append("«" if trained else "»")
                in_run = trained
            out.append(text)
    if in_run:
        out.append("»")
    return "".join(out)


def _keep_newlines(text: str) -> list[str]:
    """Split so that colours are reset before each newline (else terminals paint the rest of the line)."""
    parts = text.split("\n")
    return [p + ("\n" if i < len(parts) - 1 else "") for i, p in enumerate(parts)]


def page(examples: list[Example], control_ids, title: str) -> str:
    blocks = []
    for ex in examples:
        spans, shade = [], 0
        for text, trained, control, tok in pieces(ex, control_ids):
            shade ^= 1
            cls = f"{'t' if trained else 'p'}{shade}{' c' if control else ''}"
            spans.append(f'<span class="{cls}" title="id {tok}">{html.escape(text)}</span>')
        trained = sum(label != IGNORE_INDEX for label in ex.labels)
        blocks.append(
            f"<h2>{html.escape(ex.id)}: {len(ex.input_ids)} tokens, {trained} trained</h2>"
            f"<pre>{''.join(spans)}</pre>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; margin: 2em; }}
pre {{ white-space: pre-wrap; font-size: 14px; line-height: 1.6; border: 1px solid #ccc; padding: 1em; }}
.t0 {{ background: #b7f0b1; }} .t1 {{ background: #8fdc88; }}
.p0 {{ background: #f2f2f2; color: #555; }} .p1 {{ background: #e2e2e2; color: #555; }}
.c {{ font-weight: bold; outline: 1px solid #999; }}
</style></head><body><h1>{html.escape(title)}</h1>
<p><span class="t0">trained</span> <span class="p0">not trained</span> <span class="p0 c">control token</span>
(hover a token for its id)</p>
{"".join(blocks)}
</body></html>
"""


def run(args) -> int:
    encoder, notices = load_encoder_from_args(args)
    conversations, report = read_conversations(args.data_path, policy=ReadPolicy(max_invalid_ratio=1.0))
    if args.id is not None:
        chosen = [c for c in conversations if c.id == args.id]
        if not chosen:
            raise DataError(f"no accepted record has id {args.id!r} (`chatsft check` lists rejected records)")
        conv = chosen[0]
    else:
        if not 0 <= args.index < len(conversations):
            raise DataError(f"--index {args.index}: there are {len(conversations)} accepted records")
        conv = conversations[args.index]
    result = encoder.encode(conv, keep_spans=True)
    where = f"{conv.source}:{conv.index}"
    title = f"record {conv.id} ({where}), template {encoder.template.name}, {encoder.loss_mode}"
    for line in notices:
        print(line)
    print(title)
    if result.rejected:
        print(f"rejected: {result.rejected}: {result.detail}")
        return 1
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )
    for ex in result.examples:
        trained = sum(label != IGNORE_INDEX for label in ex.labels)
        print(f"\n{ex.id}: {len(ex.input_ids)} tokens, {trained} trained")
        print(terminal(ex, encoder.control_ids, color))
    if result.truncated:
        cut = f"{result.truncated} example(s) truncated to {encoder.max_length} tokens"
        print(f"\n{cut}, {result.dropped} dropped")
    if args.html:
        Path(args.html).write_text(page(result.examples, encoder.control_ids, title), encoding="utf-8")
        print(f"\nwrote {args.html}")
    return 0
