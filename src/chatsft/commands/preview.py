"""`chatsft preview`: show one record's tokens, the trained ones coloured, in the terminal and as an HTML
page.

Tokens are shown as the text they cover in the rendered conversation; neighbouring tokens alternate shades so
their boundaries show, trained tokens are green, control tokens bold. Reasoning, tool calls and tool results
have colours of their own (reasoning magenta, tool calls cyan, both brighter when trained; tool results
yellow, never trained) and HTML classes (`reasoning`, `call`, `result`). Without colour (a pipe, or --color
never) trained stretches are wrapped in «» and those parts in ⟨reasoning⟩…⟨/reasoning⟩, ⟨call⟩…⟨/call⟩,
⟨result⟩…⟨/result⟩.

Where those parts lie in the rendered text is found by looking for each message's reasoning, tool-call names
and argument values and tool-result text in order; this only colours the display (what trains comes from the
encoder, never from this search), and a part the template does not render verbatim is shown uncoloured.
"""

from __future__ import annotations

import bisect
import html
import json
import os
import sys
from pathlib import Path

from chatsft.encode import IGNORE_INDEX, Example
from chatsft.errors import DataError
from chatsft.records import ReadPolicy, iter_conversations
from chatsft.report import printable
from chatsft.tokenizer import add_encoder_arguments, load_encoder_from_args

_TRAINED = ("\033[30;42m", "\033[30;102m")
_PROMPT = ("\033[2m", "\033[0m")
_RESET, _BOLD = "\033[0m", "\033[1m"
# (trained, untrained) styles per part; None: the plain styles above
_KINDS = {
    "reasoning": (("\033[30;45m", "\033[30;105m"), ("\033[35m", "\033[2;35m")),
    "call": (("\033[30;46m", "\033[30;106m"), ("\033[36m", "\033[2;36m")),
    "result": (("\033[30;43m", "\033[30;103m"), ("\033[33m", "\033[2;33m")),
}


def add_arguments(parser) -> None:
    add_encoder_arguments(parser)
    parser.add_argument("--index", type=int, default=0, help="which accepted record, 0-based, in input order")
    parser.add_argument("--id", default=None, help="pick the record by its id instead")
    parser.add_argument("--html", default=None, metavar="FILE", help="also write a standalone HTML page")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")


def parts(text: str, messages: list[dict]) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the reasoning, tool calls and tool results of `messages` in the rendered `text`,
    in order; kind is "reasoning", "call" or "result". A part not found verbatim is left out."""
    found, pos = [], 0

    def locate(needle: str, kind: str | None) -> tuple[int, int] | None:
        nonlocal pos
        needle = needle.strip()
        at = text.find(needle, pos) if needle else -1
        if at < 0:
            return None
        pos = at + len(needle)
        if kind:
            found.append((at, pos, kind))
        return at, pos

    for m in messages:
        if m["role"] == "tool":
            locate(m["content"], "result")
            continue
        if m.get("reasoning_content"):
            locate(m["reasoning_content"], "reasoning")
        locate(m["content"], None)
        for call in m.get("tool_calls", ()):
            fn = call["function"]
            start = locate(fn["name"], None)
            if start is None:
                continue
            end = start[1]
            for value in _leaves(fn["arguments"]):
                hit = locate(value, None)
                end = hit[1] if hit else end
            found.append((start[0], end, "call"))
    return found


def _leaves(value) -> list[str]:
    """The argument values as a template writes them in JSON (strings quoted and escaped like `tojson`)."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in (json.dumps(k, ensure_ascii=False), *_leaves(v))]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [json.dumps(value, ensure_ascii=False)]


def pieces(example: Example, control_ids=(), regions=()) -> list[tuple[str, bool, bool, int, str | None]]:
    """(text, trained, control, token id, part kind) per token; tokens sharing a span (byte pieces) show it
    once. `regions` are `parts()` of the example's text."""
    starts = [r[0] for r in regions]

    def kind(at: int) -> str | None:
        i = bisect.bisect_right(starts, at) - 1
        return regions[i][2] if i >= 0 and at < regions[i][1] else None

    out, pos = [], 0
    for tok, label, (s, e) in zip(example.input_ids, example.labels, example.spans):
        if s > pos:  # text no token covers (none for the tokenizers we know)
            out.append((example.text[pos:s], False, False, -1, kind(pos)))
        shown = example.text[max(s, pos) : e] if e > pos else ""
        out.append((shown, label != IGNORE_INDEX, tok in control_ids, tok, kind(max(s, pos))))
        pos = max(pos, e)
    if pos < len(example.text):
        out.append((example.text[pos:], False, False, -1, kind(pos)))
    return out


def terminal(example: Example, control_ids, color: bool, regions=()) -> str:
    out, shade, in_run, in_kind = [], 0, False, None
    for text, trained, control, _, kind in pieces(example, control_ids, regions):
        shade ^= 1
        if color:
            styles = (_TRAINED, _PROMPT) if kind is None else _KINDS[kind]
            style = styles[0 if trained else 1][shade] + (_BOLD if control else "")
            shown = text.replace("\n", "↵\n") if trained else text
            out.append("".join(f"{style}{line}{_RESET}" if line else "" for line in _keep_newlines(shown)))
        else:
            if kind != in_kind and in_kind is not None:
                out.append(f"⟨/{in_kind}⟩")
            if trained != in_run:
                out.append("«" if trained else "»")
                in_run = trained
            if kind != in_kind and kind is not None:
                out.append(f"⟨{kind}⟩")
            in_kind = kind
            out.append(text)
    if not color and in_kind is not None:
        out.append(f"⟨/{in_kind}⟩")
    if in_run and not color:
        out.append("»")
    return "".join(out)


def _keep_newlines(text: str) -> list[str]:
    """Split so that colours are reset before each newline (else terminals paint the rest of the line)."""
    parts = text.split("\n")
    return [p + ("\n" if i < len(parts) - 1 else "") for i, p in enumerate(parts)]


def page(examples: list[Example], control_ids, title: str, regions=None) -> str:
    blocks = []
    for n, ex in enumerate(examples):
        spans, shade = [], 0
        for text, trained, control, tok, kind in pieces(ex, control_ids, regions[n] if regions else ()):
            shade ^= 1
            cls = f"{'t' if trained else 'p'}{shade}{' c' if control else ''}{f' {kind}' if kind else ''}"
            spans.append(f'<span class="{cls}" title="id {tok}">{html.escape(text)}</span>')
        trained = sum(label != IGNORE_INDEX for label in ex.labels)
        blocks.append(
            f"<h2>{html.escape(printable(ex.id))}: {len(ex.input_ids)} tokens, {trained} trained</h2>"
            f"<pre>{''.join(spans)}</pre>"
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body {{ font-family: sans-serif; margin: 2em; }}
pre {{ white-space: pre-wrap; font-size: 14px; line-height: 1.6; border: 1px solid #ccc; padding: 1em; }}
.t0 {{ background: #b7f0b1; }} .t1 {{ background: #8fdc88; }}
.p0 {{ background: #f2f2f2; color: #555; }} .p1 {{ background: #e2e2e2; color: #555; }}
.c {{ font-weight: bold; outline: 1px solid #999; }}
.reasoning {{ font-style: italic; color: #7a1f86; }} .t0.reasoning {{ background: #efc6f5; }}
.t1.reasoning {{ background: #e2a9eb; }}
.call {{ color: #0b5f73; }} .t0.call {{ background: #b9e9f5; }} .t1.call {{ background: #94dbed; }}
.result {{ color: #6b5200; }} .p0.result {{ background: #fbefc0; }} .p1.result {{ background: #f5e29b; }}
</style></head><body><h1>{html.escape(title)}</h1>
<p><span class="t0">trained</span> <span class="p0">not trained</span> <span class="p0 c">control token</span>
<span class="t0 reasoning">reasoning</span> <span class="t0 call">tool call</span>
<span class="p0 result">tool result</span> (hover a token for its id)</p>
{"".join(blocks)}
</body></html>
"""


def pick(args):
    """The record --id or --index names, reading only as far as it (the whole input only to say it is not
    there)."""
    conversations, count = iter_conversations(args.data_path, ReadPolicy(max_invalid_ratio=1.0)), 0
    try:
        for conv in conversations:
            if conv.id == args.id if args.id is not None else count == args.index:
                return conv
            count += 1
    finally:
        conversations.close()
    if args.id is not None:
        raise DataError(f"no accepted record has id {args.id!r} (`chatsft check` lists rejected records)")
    raise DataError(f"--index {args.index}: there are {count} accepted records")


def run(args) -> int:
    encoder, notices = load_encoder_from_args(args)
    conv = pick(args)
    result = encoder.encode(conv, keep_spans=True)
    where = f"{conv.source}:{conv.index}"
    title = printable(f"record {conv.id} ({where}), template {encoder.template.name}, {encoder.loss_mode}")
    for line in notices:
        print(line)
    print(title)
    if result.rejected:
        print(f"rejected: {result.rejected}: {printable(result.detail)}")
        return 1
    color = args.color == "always" or (
        args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )
    regions = [parts(ex.text, conv.messages) for ex in result.examples]
    for ex, found in zip(result.examples, regions):
        trained = sum(label != IGNORE_INDEX for label in ex.labels)
        print(f"\n{printable(ex.id)}: {len(ex.input_ids)} tokens, {trained} trained")
        print(terminal(ex, encoder.control_ids, color, found))
    if result.truncated:
        cut = f"{result.truncated} example(s) truncated to {encoder.max_length} tokens"
        print(f"\n{cut}, {result.dropped} dropped")
    if args.html:
        try:
            Path(args.html).parent.mkdir(parents=True, exist_ok=True)
            Path(args.html).write_text(page(result.examples, encoder.control_ids, title, regions), "utf-8")
        except OSError as e:
            raise DataError(f"cannot write --html {args.html}: {e.strerror or e}") from None
        print(f"\nwrote {args.html}")
    return 0
