"""Prompt formats as data: a `Template` per model family, one `render` loop, `get_template` for both kinds.

`render(template, messages)` turns messages into `Segment`s: pieces of the rendered text, each saying whether
it is trained, whether it came from a message (user data, encoded as plain text, never as control tokens) and
which message it belongs to. A trained assistant turn is the reply as the template writes it (vicuna: " " +
content, since SentencePiece folds that space into the first word) plus its end-of-turn marker; separators
after the marker (chatml's "\\n") are not trained. Every built-in also exports the Jinja `chat_template` that
renders the same text, so the template used in training is the one inference uses. A tokenizer's own Jinja
template is a `jinja_templates.JinjaTemplate` (its own rule, no segments); `get_template` returns either kind
and `render_text` renders either. No torch or transformers import here. The module is longer than most because
the table of built-ins (the data of every family: the table formats and the real templates in
`assets/templates/`) lives here beside the render loop, so a new family is one entry in one place.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import NamedTuple

from chatsft.errors import ConfigError, RenderError
from chatsft.jinja_templates import JinjaTemplate, refuse_unwritten

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


class Segment(NamedTuple):  # a tuple: immutable and cheap to build (a conversation makes a dozen)
    text: str
    trainable: bool
    content: bool  # True: text from a message, encoded as plain text (never as control tokens)
    turn: int  # index in `messages` of the message this text belongs to; -1 for text of no message


@dataclass(frozen=True)
class Template:
    """One prompt format; its strings use `{content}`, `{system}`, `{bos}`, `{eos}` (the tokenizer's tokens).

    A conversation renders as: BOS (if `bos`), `begin`, the system block (`system`, or inside the first user
    turn with `first_user`), then per user message `user` followed by the assistant `cue` (when a reply
    follows, or with add_generation_prompt), and per assistant message `reply` + `end` (both trained) +
    `after` (not trained). An empty system message renders as no system block unless `keep_empty_system`
    (the real chatml and Mistral templates write it). `join`/`single_cue` describe
    Yuan2 (see YUAN2). `markers` are the control tokens the format writes: each must be one token of the
    tokenizer. `stop` are the end-of-turn markers that end generation. (A tokenizer's own Jinja template is
    a `jinja_templates.JinjaTemplate`.)
    """

    name: str
    user: str = "{content}"
    cue: str = ""
    reply: str = "{content}"
    end: str = "{eos}"
    after: str = ""
    bos: bool = False
    begin: str = ""
    system: str = "{system}"
    first_user: str = ""
    default_system: str = ""
    keep_empty_system: bool = False
    join: str = ""
    single_cue: str = ""
    markers: tuple[str, ...] = ("{eos}",)
    stop: tuple[str, ...] = ("{eos}",)
    notes: str = ""

    def resolve(self, text: str, bos: str | None, eos: str | None) -> str:
        return text.replace("{bos}", bos or "").replace("{eos}", eos or "")

    def jinja(self) -> str:
        """The Jinja chat template that renders this format (what `tokenizer.chat_template` should hold)."""
        return _to_jinja(self)


VICUNA = Template(
    name="vicuna_v1.1",
    bos=True,
    system="{system} ",
    default_system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    user="USER: {content} ",
    cue="ASSISTANT:",
    reply=" {content}",
    markers=("{bos}", "{eos}"),
    notes="FastChat's get_prompt() (ADD_COLON_TWO, sep=' ', sep2=EOS) after the BOS its tokenizer adds.",
)
BAICHUAN = Template(
    name="baichuan-chat",
    user="<reserved_102>{content}",
    cue="<reserved_103>",
    markers=("<reserved_102>", "<reserved_103>", "{eos}"),
    notes="FastChat writes no end marker (sep=''), so its model never learns to stop; we end each reply "
    "with EOS as Baichuan's own fine-tuning does. No BOS, like Baichuan's build_chat_input.",
)
BAICHUAN2 = Template(
    name="baichuan2-chat",
    user="<reserved_106>{content}",
    cue="<reserved_107>",
    markers=("<reserved_106>", "<reserved_107>", "{eos}"),
    notes=BAICHUAN.notes,
)
LLAMA2 = Template(
    name="llama-2",
    system="",
    first_user="{bos}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
    user="{bos}[INST] {content} [/INST]",
    reply=" {content}",
    end=" {eos}",
    markers=("{bos}", "{eos}"),
    notes="Meta's format: every exchange is '<s>[INST] q [/INST] a </s>'; content is not stripped.",
)
MISTRAL = Template(
    name="mistral",
    bos=True,
    system="",
    first_user=" [INST] {system}\n\n{content} [/INST]",
    user=" [INST] {content} [/INST]",
    reply=" {content}",
    keep_empty_system=True,
    markers=("{bos}", "{eos}"),
    notes="Mistral-7B-Instruct-v0.2's Hub template (also v0.1's and Mixtral-8x7B-Instruct's since 2024): "
    "'<s> [INST] sys\\n\\nq [/INST] a</s> [INST] ...'. It has no generation prompt ([/INST] ends the turn).",
)
CHATML = Template(
    name="chatml",
    system="<|im_start|>system\n{system}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    cue="<|im_start|>assistant\n",
    keep_empty_system=True,
    end="<|im_end|>",
    after="\n",
    markers=("<|im_start|>", "<|im_end|>"),
    stop=("<|im_end|>",),
)
YUAN2 = Template(
    name="yuan2",
    system="{system}\n",
    end="<eod>",
    join="<n>",
    single_cue="<sep>",
    markers=("<sep>", "<eod>"),
    stop=("<eod>",),
    notes="""FastChat's train_yuan2.py format. Messages are joined with '<n>'; the final reply ends with
    '<eod>'. When one reply alone is trained (last_response, split_turns), '<sep>' precedes it, not '<n>'
    ('q1<n>a1<n>q2<sep>a2<eod>'): exactly the inference prompt ('...q2<sep>') plus the reply. When every reply
    is trained (assistant_turns, FastChat's efficient_loss) there is no '<sep>': 'q1<n>a1<n>q2<n>a2<eod>'.
    There the ids differ from inference, where the reply follows '<sep>', and a non-final reply ends in '<n>'
    (trained), not in a stop token. Unlike FastChat we do not rstrip('<n>'), which ate trailing '<', 'n', '>'
    characters of the last message. '<n>' is plain text here (the Yuan tokenizer's newline piece).""",
)


def real_template(name: str) -> str:
    """A model family's real chat template, bundled in chatsft/assets/templates/ (README there: sources)."""
    return (resources.files("chatsft") / "assets" / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def _real(name: str, markers: tuple[str, ...], tools=False, reasoning=False, notes="") -> JinjaTemplate:
    """A built-in that is its family's real template, rendered by the Jinja rule (chatsft.jinja_templates)."""
    source = real_template(name)
    return JinjaTemplate(name, source, markers=markers, tools=tools, reasoning=reasoning, notes=notes)


# The families whose real template writes tools or reasoning, or trims content, are that template itself:
# what trains is what the model generates at inference. One entry each: its file in assets/templates/, the
# control tokens every conversation writes (`markers`), whether it writes tools and reasoning.
QWEN, PHI3 = ("<|im_start|>", "<|im_end|>"), ("<|user|>", "<|assistant|>", "<|end|>")
GEMMA = ("<start_of_turn>", "<end_of_turn>")
DEEPSEEK = ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")
REAL_TEMPLATES = (
    _real(
        "llama-3",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        tools=True,
        notes="Llama 3.1 Instruct's template: content trimmed; always a system header with 'Cutting "
        "Knowledge Date: December 2023' and 'Today Date: 26 Jul 2024' (its date_string default, so the "
        "training text does not depend on the day); tools in the first user turn; one tool call per reply.",
    ),
    _real("qwen2.5", QWEN, tools=True, notes="Qwen2.5's default system prompt when there is none."),
    _real("qwen3", (*QWEN, "<think>", "</think>"), tools=True, reasoning=True),
    _real("qwen3-2507", QWEN, tools=True, notes="Qwen3-Instruct-2507: Qwen3 without thinking."),
    _real("gemma", GEMMA, notes="Gemma and Gemma 2: the template refuses a system message."),
    _real("gemma-3", GEMMA, notes="Gemma 3: system text opens the first user turn."),
    _real("phi-3", PHI3),
    _real("phi-3.5", PHI3, notes="Phi-3.5 skips an empty system prompt."),
    _real("deepseek", DEEPSEEK, tools=True, reasoning=True, notes="DeepSeek-V3's template."),
    _real("deepseek-r1", DEEPSEEK, reasoning=True, notes="R1 distills: tool calls beside text are dropped."),
)

BUILTINS: dict[str, Template | JinjaTemplate] = {
    t.name: t for t in (VICUNA, BAICHUAN, BAICHUAN2, LLAMA2, MISTRAL, CHATML, YUAN2, *REAL_TEMPLATES)
}
TEMPLATE_CHOICES = ("auto", "tokenizer", *BUILTINS)


def get_template(name: str, tokenizer=None) -> tuple[Template | JinjaTemplate, str]:
    """Resolve `--conv_template`: a built-in name, 'tokenizer' (its own Jinja template) or 'auto'.

    Returns the template (a Jinja built-in bound to `tokenizer`'s special tokens when one is given) and a
    one-line notice saying which was picked.
    """
    chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if name in BUILTINS:
        template = BUILTINS[name]
        if isinstance(template, JinjaTemplate) and tokenizer is not None:
            template = template.bind(tokenizer)
        return template, f"conversation template: {name}"
    if name == "tokenizer" or (name == "auto" and isinstance(chat_template, str) and chat_template):
        if not isinstance(chat_template, str) or not chat_template:
            raise ConfigError(
                "--conv_template tokenizer: this tokenizer has no chat_template; name a built-in "
                f"template instead ({', '.join(BUILTINS)})"
            )
        return template_from_tokenizer(tokenizer), "conversation template: the tokenizer's own chat_template"
    if name == "auto":
        return VICUNA, "conversation template: vicuna_v1.1 (the tokenizer has no chat_template)"
    raise ConfigError(f"unknown --conv_template {name!r}; choose from {', '.join(TEMPLATE_CHOICES)}")


def template_from_tokenizer(tokenizer) -> JinjaTemplate:
    """The tokenizer's own Jinja chat_template, bound to its special tokens, control tokens and stops."""
    return JinjaTemplate.from_tokenizer(tokenizer)


def check_messages(messages: Sequence[Mapping[str, str]]) -> int:
    """Raise RenderError('bad_roles') unless: optional system, then user/assistant alternating from user.

    Returns the index of the first non-system message.
    """
    start = 1 if messages and messages[0].get("role") == SYSTEM else 0
    for i in range(start, len(messages)):
        want = USER if (i - start) % 2 == 0 else ASSISTANT
        if messages[i].get("role") != want or not isinstance(messages[i].get("content"), str):
            raise RenderError("bad_roles", f"message {i} should be a {want} message with text content")
    if len(messages) == start:
        raise RenderError("bad_roles", "no user message")
    return start


def render(
    template: Template,
    messages: Sequence[Mapping[str, str]],
    trained: Collection[int] | None = None,
    *,
    bos: str | None = "<s>",
    eos: str | None = "</s>",
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping] | None = None,
) -> list[Segment]:
    """Render `messages` into segments. `trained`: indices of the assistant messages to train (None = all of
    them, which for yuan2 also selects the all-replies format). `bos`/`eos`: the tokenizer's tokens (None or
    "" = none). With `add_generation_prompt` the messages must end on a user turn and the prompt for the next
    reply is rendered. `tools`: the conversation's tool definitions, which no table format can write: a
    record with tools, tool calls or reasoning is refused (`template_has_no_tools`/`_reasoning`)."""
    if isinstance(template, JinjaTemplate):
        raise TypeError("a Jinja template has no segments; use JinjaTemplate.plan (see encode.Encoder)")
    refuse_unwritten(template.name, messages, tools)
    start = check_messages(messages)
    last = len(messages) - 1
    if add_generation_prompt and messages[last]["role"] != USER:
        raise RenderError("bad_roles", "a generation prompt needs the messages to end on a user turn")
    system = messages[0]["content"] if start else template.default_system
    plan = _plan(
        template,
        len(messages),
        start,
        bool(system) or bool(start and template.keep_empty_system),
        None if trained is None else frozenset(trained),
        bos or "",
        eos or "",
        add_generation_prompt,
    )
    out = [
        Segment(messages[m]["content"] if m >= 0 else text, trainable, m >= 0, turn)
        for m, text, trainable, turn in plan
    ]
    return out if all(map(_TEXT, out)) else _merge(out)  # an empty message drops out


@lru_cache(maxsize=4096)
def _plan(
    template: Template,
    n: int,
    start: int,
    system: bool,
    trained: frozenset[int] | None,
    bos: str,
    eos: str,
    add_generation_prompt: bool,
) -> tuple[tuple[int, str, bool, int], ...]:
    """The segments of every conversation of this shape as (message index or -1 for template text, text,
    trainable, turn), template text merged: rendering fills in the messages. Cached, since a data set has few
    shapes (roles alternate, so the shape is the number of messages and whether the first is a system one)."""
    last = n - 1
    train = set(range(start + 1, n, 2)) if trained is None else trained  # the assistants: start+1, +3, ...
    single = trained is not None and train == {last} and (last - start) % 2 == 1
    out: list[tuple[int, str, bool, int]] = []
    tokens = {"bos": bos, "eos": eos}

    def emit(fmt: str, turn: int, trainable: bool = False, message: int = -1):
        for kind, text in _pieces(fmt):
            if kind == "content":
                out.append((message, "", trainable, turn))
            elif kind == "system":
                out.append((0, "", False, 0) if start else (-1, template.default_system, False, -1))
            else:
                text = tokens.get(kind, text)
                if text:
                    out.append((-1, text, trainable, turn))

    sys_turn = 0 if start else -1
    if template.bos:
        emit("{bos}", -1)
    emit(template.begin, -1)
    if system and not template.first_user:
        emit(template.system, sys_turn)
    for i in range(start, n):
        if (i - start) % 2 == 0:  # a user message
            emit(
                template.first_user if (i == start and system and template.first_user) else template.user,
                i,
                message=i,
            )
            if i < last or add_generation_prompt:
                emit(template.cue, i)
                emit(template.single_cue if (single and i == last - 1) or i == last else template.join, i)
        else:
            emit(template.reply, i, i in train, message=i)
            emit(template.end if (i == last or not template.join) else template.join, i, i in train)
            emit(template.after, i)
    merged: list[tuple[int, str, bool, int]] = []
    for (
        step
    ) in out:  # join neighbouring template texts with the same flags (messages stay whole and separate)
        if step[0] < 0 and merged and merged[-1][0] < 0 and merged[-1][2:] == step[2:]:
            merged[-1] = (-1, merged[-1][1] + step[1], step[2], step[3])
        elif step[0] >= 0 or step[1]:
            merged.append(step)
    return tuple(merged)


def render_text(template: Template | JinjaTemplate, messages, trained=None, *, tools=None, **kwargs) -> str:
    """The rendered text of `messages`, for either kind of template (a Jinja one renders as transformers does;
    `trained`, `bos` and `eos` only shape a built-in's text)."""
    if isinstance(template, JinjaTemplate):
        return template.render_text(messages, tools, kwargs.get("add_generation_prompt", False))
    return "".join(s.text for s in render(template, messages, trained, **kwargs))


_TEXT = operator.itemgetter(0)  # a Segment's text
_PLACEHOLDER = re.compile(r"\{(content|system|bos|eos)\}")


@lru_cache(maxsize=256)
def _pieces(fmt: str) -> tuple[tuple[str, str], ...]:
    """`fmt` split into ("text", text) and (placeholder, "") pieces; cached: renders parse the same few."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(fmt):
        if m.start() > pos:
            out.append(("text", fmt[pos : m.start()]))
        out.append((m.group(1), ""))
        pos = m.end()
    if pos < len(fmt):
        out.append(("text", fmt[pos:]))
    return tuple(out)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring template pieces with the same flags (content segments stay whole and separate)."""
    out: list[Segment] = []
    for s in segments:
        if not s.text:
            continue
        p = out[-1] if out else None
        if p and not p.content and not s.content and (p.trainable, p.turn) == (s.trainable, s.turn):
            out[-1] = Segment(p.text + s.text, s.trainable, False, s.turn)
        else:
            out.append(s)
    return out


# ---- Jinja: the exported chat_template of a built-in ----


def _lit(text: str) -> str:
    """`text` as a Jinja expression; {bos}/{eos} become the tokenizer's tokens."""
    parts = []
    for kind, piece in _pieces(text):
        if kind in ("bos", "eos"):
            parts.append(f"({kind}_token or '')")
        elif kind == "text":
            esc = piece.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r")
            parts.append("'" + esc.replace("\t", "\\t") + "'")
        else:
            parts.append("message['content']" if kind == "content" else "system")
    return " + ".join(parts) or "''"


def _to_jinja(t: Template) -> str:
    out = [
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}",
        "{%- set loop_messages = messages[1:] -%}{%- else -%}",
        f"{{%- set system = {_lit(t.default_system)} -%}}",
        "{%- set loop_messages = messages -%}{%- endif -%}",
    ]
    if t.bos:
        out.append("{{- bos_token or '' -}}")
    if t.begin:
        out.append(f"{{{{- {_lit(t.begin)} -}}}}")
    if not t.first_user:
        out.append(f"{{%- if system -%}}{{{{- {_lit(t.system)} -}}}}{{%- endif -%}}")
    out.append("{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}")
    if t.first_user:
        out.append(
            f"{{%- if loop.first and system -%}}{{{{- {_lit(t.first_user)} -}}}}{{%- else -%}}"
            f"{{{{- {_lit(t.user)} -}}}}{{%- endif -%}}"
        )
    else:
        out.append(f"{{{{- {_lit(t.user)} -}}}}")
    if t.join:
        out.append(f"{{%- if not loop.last -%}}{{{{- {_lit(t.join)} -}}}}{{%- endif -%}}")
    out.append(f"{{%- else -%}}{{{{- {_lit(t.cue + t.reply)} -}}}}")
    if t.join:
        out.append(
            f"{{%- if loop.last -%}}{{{{- {_lit(t.end + t.after)} -}}}}{{%- else -%}}"
            f"{{{{- {_lit(t.join)} -}}}}{{%- endif -%}}"
        )
    else:
        out.append(f"{{{{- {_lit(t.end + t.after)} -}}}}")
    out.append("{%- endif -%}{%- endfor -%}")
    # the cue is written before a reply, and at the end only when asked for (add_generation_prompt)
    if t.cue or t.single_cue or t.join:
        out.append(
            f"{{%- if add_generation_prompt -%}}{{{{- {_lit(t.cue + (t.single_cue or t.join))} -}}}}"
            "{%- endif -%}"
        )
    return "".join(out)
