"""Prompt formats as data: a `Template` per model family, one `render` loop, the tokenizer's own Jinja.

`render(template, messages)` turns messages into `Segment`s: pieces of the rendered text, each saying whether
it is trained, whether it came from a message (user data, encoded as plain text, never as control tokens) and
which message it belongs to. A trained assistant turn is the reply as the template writes it (vicuna: " " +
content, since SentencePiece folds that space into the first word) plus its end-of-turn marker; separators
after the marker (chatml's "\\n") are not trained. Every built-in also exports the Jinja `chat_template` that
renders the same text, so the template used in training is the one inference uses. No torch or transformers
import here.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple

from chatsft.errors import ConfigError

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"


class Segment(NamedTuple):  # a tuple: immutable and cheap to build (a conversation makes a dozen)
    text: str
    trainable: bool
    content: bool  # True: text from a message, encoded as plain text (never as control tokens)
    turn: int  # index in `messages` of the message this text belongs to; -1 for text of no message


class RenderError(ValueError):
    """A record this template cannot render exactly; `reason` is a stable code counted by the audit."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Template:
    """One prompt format; its strings use `{content}`, `{system}`, `{bos}`, `{eos}` (the tokenizer's tokens).

    A conversation renders as: BOS (if `bos`), `begin`, the system block (`system`, or inside the first user
    turn with `first_user`), then per user message `user` followed by the assistant `cue` (when a reply
    follows, or with add_generation_prompt), and per assistant message `reply` + `end` (both trained) +
    `after` (not trained). An empty system message renders as no system block unless `keep_empty_system`
    (the real chatml and Mistral templates write it). `join`/`single_cue` describe
    Yuan2 (see YUAN2). `markers` are the control tokens the format writes: each must be one token of the
    tokenizer. `stop` are the end-of-turn markers that end generation. `chat_template` is set only for the
    tokenizer's own Jinja template.
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
    chat_template: str | None = None
    jinja_vars: tuple[
        tuple[str, str], ...
    ] = ()  # special tokens passed to the Jinja template (tokenizer only)
    control_tokens: tuple[str, ...] = ()  # the tokenizer's added tokens (tokenizer template only)

    def resolve(self, text: str, bos: str | None, eos: str | None) -> str:
        return text.replace("{bos}", bos or "").replace("{eos}", eos or "")

    def jinja(self) -> str:
        """The Jinja chat template that renders this format (what `tokenizer.chat_template` should hold)."""
        return self.chat_template if self.chat_template is not None else _to_jinja(self)


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
LLAMA3 = Template(
    name="llama-3",
    begin="<|begin_of_text|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    cue="<|start_header_id|>assistant<|end_header_id|>\n\n",
    end="<|eot_id|>",
    markers=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    stop=("<|eot_id|>",),
    notes="Content is kept as is (FastChat and Meta's Jinja strip it).",
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

BUILTINS: dict[str, Template] = {
    t.name: t for t in (VICUNA, BAICHUAN, BAICHUAN2, LLAMA2, LLAMA3, MISTRAL, CHATML, YUAN2)
}
TEMPLATE_CHOICES = ("auto", "tokenizer", *BUILTINS)


def get_template(name: str, tokenizer=None) -> tuple[Template, str]:
    """Resolve `--conv_template`: a built-in name, 'tokenizer' (its own Jinja template) or 'auto'.

    Returns the template and a one-line notice saying which was picked.
    """
    chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if name in BUILTINS:
        return BUILTINS[name], f"conversation template: {name}"
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


def template_from_tokenizer(tokenizer) -> Template:
    """A Template wrapping the tokenizer's Jinja chat_template, with the special tokens it may refer to."""
    jinja_vars = tuple((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str))
    added = tuple(t for t in tokenizer.get_added_vocab() if t.strip())
    template = Template(
        name="tokenizer",
        chat_template=tokenizer.chat_template,
        jinja_vars=jinja_vars,
        control_tokens=added,
        markers=(),
        stop=(),
    )
    try:  # its end-of-turn token, from a probe reply, is what generation must stop at
        probe = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "Hello"}]
        end = [
            s.text
            for s in render(template, probe, bos=tokenizer.bos_token, eos=tokenizer.eos_token)
            if s.trainable and not s.content
        ][-1]
        stop = max((t for t in added if end.endswith(t)), key=len)
    except (RenderError, IndexError, ValueError):
        return template
    return replace(template, stop=(stop,))


def refuse_tools_and_reasoning(template: Template, messages: Sequence[Mapping], tools=None) -> None:
    """A table format has no way to write tools, tool calls or reasoning: a record holding them is refused
    (`template_has_no_tools`, `template_has_no_reasoning`), never trained with them silently left out."""
    hint = "choose a template that writes them (see the README's families table) or the tokenizer's own"
    if tools:
        raise RenderError(
            "template_has_no_tools",
            f"the record defines tools; the {template.name} template cannot write them: {hint}",
        )
    for i, m in enumerate(messages):
        if m.get("role") == "tool" or m.get("tool_calls"):
            what = "is a tool result" if m.get("role") == "tool" else "makes tool calls"
            raise RenderError(
                "template_has_no_tools",
                f"message {i} {what}; the {template.name} template has no tool format: {hint}",
            )
        if m.get("reasoning_content"):
            raise RenderError(
                "template_has_no_reasoning",
                f"message {i} has reasoning; the {template.name} template has no reasoning format: {hint}",
            )


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
    reply is rendered. `tools`: the conversation's tool definitions, which no table format can write."""
    if template.chat_template is None:
        refuse_tools_and_reasoning(template, messages, tools)
    start = check_messages(messages)
    last = len(messages) - 1
    if add_generation_prompt and messages[last]["role"] != USER:
        raise RenderError("bad_roles", "a generation prompt needs the messages to end on a user turn")
    if template.chat_template is not None:
        return _render_jinja(template, messages, trained, bos, eos, add_generation_prompt)
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
    train = (
        set(range(start + 1, n, 2)) if trained is None else trained
    )  # the assistants: start+1, start+3, ...
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


def render_text(template: Template, messages, trained=None, **kwargs) -> str:
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


# ---- Jinja: the exported chat_template of a built-in, and rendering the tokenizer's own template ----


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


@lru_cache(maxsize=16)
def _compile(source: str):
    """Compile a chat template in an environment like transformers' (chat_template_utils)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # `{% generation %}` only marks text for transformers' assistant mask: render its body as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


_S0, _S1 = "\ue000", "\ue001"  # private-use characters around a message's index locate its content


def _run_jinja(template: Template, messages, gen: bool, variables: dict) -> str:
    try:
        return _compile(template.chat_template).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=gen,
            **variables,
        )
    except Exception as err:  # a template's raise_exception(), or any error inside it
        raise RenderError(
            "template_error", str(err).splitlines()[0] if str(err) else type(err).__name__
        ) from None


def _render_jinja(template, messages, trained, bos, eos, gen) -> list[Segment]:
    """Segments of the tokenizer's template, found without {% generation %} markers.

    Each message's content is located by rendering with a sentinel in its place; the real rendering must be
    the sentinel rendering with the contents put back (else the template alters content: rejected). A trained
    reply starts where the generation prompt for the messages before it ends (the prompt must be a prefix of
    the full rendering, followed only by whitespace before the content: else not prefix-stable, rejected) and
    ends after the first control token the template writes after the content (its end-of-turn; none:
    rejected).
    """
    variables = dict(template.jinja_vars)
    variables.update({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
    if any(_S0 in m["content"] or _S1 in m["content"] for m in messages):
        raise RenderError("unrenderable_content", "a message contains U+E000/U+E001")
    marked = [{"role": m["role"], "content": f"{_S0}{i}{_S1}"} for i, m in enumerate(messages)]
    sketch = _run_jinja(template, marked, gen, variables)
    pieces = re.split(f"{_S0}(\\d+){_S1}", sketch)
    order = [int(x) for x in pieces[1::2]]
    if order != list(range(len(messages))):
        raise RenderError("template_alters_content", "messages are not rendered once each, in order")
    text = "".join(p if k % 2 == 0 else messages[int(p)]["content"] for k, p in enumerate(pieces))
    if _run_jinja(template, messages, gen, variables) != text:
        raise RenderError("template_alters_content", "the template changes message text (e.g. strips it)")
    spans, pos = [], len(pieces[0])
    for i in range(len(messages)):
        spans.append((pos, pos + len(messages[i]["content"])))
        pos = spans[-1][1] + len(pieces[2 * i + 2])
    assistants = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
    train = set(assistants if trained is None else trained) if not gen else set()
    marks = []  # (start, end, trainable, content, turn)
    for i, (s, e) in enumerate(spans):
        marks.append((s, e, i in train, True, i))
    for k in sorted(train):
        prompt = _run_jinja(template, messages[:k], True, variables)
        s, e = spans[k]
        if not text.startswith(prompt) or len(prompt) > s or text[len(prompt) : s].strip():
            raise RenderError(
                "template_not_prefix_stable",
                f"the generation prompt before message {k} is not the start of the full rendering",
            )
        tail_end = spans[k + 1][0] if k + 1 < len(spans) else len(text)
        eot = _first_control(text, e, tail_end, template.control_tokens)
        if eot is None:
            raise RenderError("no_end_of_turn", f"no control token follows reply {k}")
        marks += [(len(prompt), s, True, False, k), (e, eot, True, False, k)]
    return _merge(_cut(text, marks))


def _first_control(text: str, start: int, stop: int, tokens: Sequence[str]) -> int | None:
    best = None
    for tok in tokens:
        j = text.find(tok, start, stop)
        if j >= 0 and (best is None or (j, -len(tok)) < best):
            best = (j, -len(tok))
    return None if best is None else best[0] - best[1]


def _cut(text: str, marks: list[tuple[int, int, bool, bool, int]]) -> list[Segment]:
    """Cut `text` into segments: the marked spans (non-overlapping) with their flags, untrained template
    elsewhere."""
    out, pos = [], 0
    for s, e, trainable, content, turn in sorted(marks):
        if s > pos:
            out.append(Segment(text[pos:s], False, False, -1))
        if e > s or content:
            out.append(Segment(text[s:e], trainable, content, turn))
        pos = max(pos, e)
    if pos < len(text):
        out.append(Segment(text[pos:], False, False, -1))
    return out
