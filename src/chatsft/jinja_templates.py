"""A tokenizer's own Jinja chat template, rendered exactly as transformers renders it, and what trains in it.

`JinjaTemplate` holds the template source, the special-token variables it is rendered with, the control
tokens it writes and its end-of-turn (stop) tokens. What trains follows one rule for any template: for
assistant message k the context is `render(messages[:k], add_generation_prompt=True)`, the completion is
`render(messages[:k+1])` minus that context, and the completion is trained up to and including its first
end-of-turn token (separators after it, chatml's "\\n" or Phi-3's final EOS, stay untrained). Whatever the
template does to a reply (`| trim`, Qwen3's empty think block, a tool call written as JSON) is what trains,
and `plan` counts what it changed instead of refusing. Where one rendering of the conversation holds every
trained turn's context and completion, one example trains them all; turns the template renders differently
in later history (Qwen3 drops past reasoning, DeepSeek's generation prompt opens a think block that history
never shows) become examples of their own, and the counts say why.

DeepSeek-R1's generation prompt ends in `<think>\\n`, which the rendered reply never contains: the model is
made to think at inference. The trained completion is then the reply as the model must write it after that
prompt: `{reasoning}\\n</think>\\n\\n{answer}{end}`, the reasoning taken from `reasoning_content` (or an
inline `<think>...</think>` in the content). A reply without reasoning trains an empty think block
(`\\n</think>\\n\\n{answer}`): the model learns to close the think block and answer at once, which is what
such data asks for; to keep a model thinking, train it on data with reasoning. Both cases are counted.

Tool calls: each rendered call must parse back (JSON in the trained text) to the record's function name and
arguments, or the record is rejected (`tool_call_not_rendered`); a template that concatenates arguments as
text (DeepSeek) gets them as JSON text. Control tokens spelled inside message data are located with
private-use markers (transformers' `sanitize_control_tokens` method) so the encoder writes them as plain
text. The module is longer than most because the rule, its DeepSeek case and the tool-call check belong
together; no torch or transformers import (jinja2 only, imported when a template is compiled).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import NamedTuple

from chatsft.errors import RenderError

ASSISTANT = "assistant"
_START, _END = "\U000f0000", "\U000f0001"  # private-use markers around a control token spelled in data
_THINK_OPEN = re.compile(r"<think>\s*\Z")
_THINK_CLOSE = "\n</think>\n\n"


@lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile a chat template in an environment like transformers' (`chat_template_utils`)."""
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
    env.globals["dict"] = dict
    return env.from_string(source)


def template_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as transformers hands them to a template: None values dropped, reasoning also as `thinking`;
    our `weight` field is not the template's business."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None and k != "weight"}
        if "reasoning_content" in m:
            m = {"thinking": m["reasoning_content"], **m}
        out.append(m)
    return out


class Turn(NamedTuple):
    """One trained assistant turn by the rule, in the coordinates of its own example text."""

    index: int  # the message's index
    context: str  # render(messages[:k], add_generation_prompt=True)
    trained: str  # the completion up to and including its end-of-turn token
    after: str  # the rest of the completion (separators)
    marker: str  # the end-of-turn token ("" when the completion has none)
    data: tuple[tuple[int, int], ...]  # control tokens spelled in data, as spans of context+trained+after
    # False: context+completion is no rendering of the template (a think block we wrote)
    rendered: bool = True


@dataclass(frozen=True)
class JinjaExample:
    """One example of a record: its text, trained spans (start, end, turn), the data's control tokens."""

    suffix: str  # "" for the record's own id, else "#k" (k: the host reply's position among the replies)
    text: str
    spans: tuple[tuple[int, int, int], ...]
    data: tuple[tuple[int, int], ...]
    markers: tuple[tuple[int, str], ...]  # (turn, its end-of-turn token)
    turns: tuple[int, ...]
    # > 0: the text is no rendering of the template (the reply follows a prompt it does not continue), so the
    # encoder tokenizes the context (text[:cut]) on its own: the example starts with the prompt's own ids
    cut: int = 0


@dataclass(frozen=True)
class JinjaTemplate:
    """A Jinja chat template with what rendering needs from its tokenizer (see the module's rule).

    `variables`: the special tokens passed to the template (bos_token, eos_token, ...). `control_tokens`:
    the tokenizer's tokens the template writes (its special tokens and the added tokens in its source).
    `stop`: the end-of-turn tokens that end generation. `bind(tokenizer)` fills all three from a tokenizer.
    A built-in (a family's real template, `chatsft.templates.BUILTINS`) also says which control tokens every
    conversation writes (`markers`: each must be one token of the tokenizer, checked by the encoder) and
    whether the template writes tools and reasoning (`tools` False refuses a record with tools, tool calls or
    tool results; None, a tokenizer's own template, leaves them to the template and the tool-call round trip;
    `reasoning` is for the record: reasoning a template does not write is dropped by it and counted).
    """

    name: str
    source: str
    variables: tuple[tuple[str, str], ...] = ()
    control_tokens: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    notes: str = ""
    markers: tuple[str, ...] = ()
    tools: bool | None = None
    reasoning: bool | None = None

    def jinja(self) -> str:
        """The chat template to save with the model: the source itself."""
        return self.source

    @classmethod
    def from_tokenizer(cls, tokenizer, name: str = "tokenizer") -> JinjaTemplate:
        return cls(name=name, source=tokenizer.chat_template).bind(tokenizer)

    def bind(self, tokenizer) -> JinjaTemplate:
        """This template with the tokenizer's special-token variables, control tokens and stop tokens."""
        variables = tuple((k, v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str))
        chosen = getattr(tokenizer, "chat_control_tokens", None)
        control = tuple(
            t.content
            for t in tokenizer.added_tokens_decoder.values()
            if t.special or (t.content in (chosen or self.source) and not t.content.isspace())
        )
        bound = replace(self, variables=variables, control_tokens=control, stop=())
        eos = tokenizer.eos_token
        return replace(bound, stop=tuple(dict.fromkeys([*bound._probe_stop(), *([eos] if eos else [])])))

    def _probe_stop(self) -> list[str]:
        """The control token the template writes right after a reply: its end of turn."""
        for probe in (
            [{"role": "user", "content": "Hi"}, {"role": ASSISTANT, "content": "Hello"}],
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Hi"},
                {"role": ASSISTANT, "content": "Hello"},
            ],
        ):
            try:
                text = self.render_text(probe)
            except RenderError:
                continue
            at = text.rfind("Hello")
            found = [(text.find(t, at), -len(t), t) for t in self.control_tokens if text.find(t, at) >= 0]
            if at >= 0 and found:
                return [min(found)[2]]
        return []

    # ---- rendering ----

    def render_text(self, messages, tools=None, add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`, as `apply_chat_template(..., tokenize=False)` gives it."""
        try:
            return compile_template(self.source).render(
                **dict(self.variables),
                messages=template_messages(messages),
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as err:  # a template's raise_exception(), or any error inside it
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RenderError("template_error", first) from None

    def _render(self, messages, tools, gen: bool) -> tuple[str, tuple[tuple[int, int], ...]]:
        """The text and the spans of the control tokens spelled in message or tool data. Those are found by
        rendering the data with each such token between private-use markers; when the template reacts to
        the markers (it splits or tests the data at a control token), the tokens are read as the template
        reads them and no span is returned."""
        text = self.render_text(messages, tools, gen)
        pattern = _control_pattern(self.control_tokens)
        if pattern is None or not _spells(pattern, (messages, tools)):
            return text, ()
        marked = self.render_text(_mark(pattern, messages), _mark(pattern, tools), gen)
        spans, out, pos = [], [], 0
        for m in re.finditer(f"{_START}({pattern.pattern}){_END}", marked):
            out.append(marked[pos : m.start()])
            start = sum(map(len, out))
            out.append(m.group(1))
            spans.append((start, start + len(m.group(1))))
            pos = m.end()
        out.append(marked[pos:])
        if "".join(out) != text:
            return text, ()
        return text, tuple(spans)

    # ---- the rule ----

    def plan(
        self,
        messages: Sequence[Mapping],
        trained: Sequence[int],
        tools=None,
        per_turn: bool = False,
    ) -> tuple[list[JinjaExample], Counter]:
        """The examples that train assistant messages `trained` (sorted indices) by the rule, and the counts
        of what the template changed. `per_turn`: one example per turn (split_turns), else as few as the
        template allows. Raises RenderError for a record the template refuses or whose tool calls do not
        round-trip."""
        # reasoning the template does not write is its choice, counted ("reasoning dropped by the template")
        refuse_unwritten(self.name, messages, tools, tools_ok=self.tools, reasoning_ok=None)
        try:
            return self._plan(messages, trained, tools, per_turn)
        except RenderError as err:
            texts = _arguments_as_text(messages)
            if texts is None:
                raise
            try:  # the template concatenates arguments as text (DeepSeek): give them as JSON text
                examples, notes = self._plan(texts, trained, tools, per_turn)
            except RenderError as again:
                # the template took the text: its next objection is the record's problem
                raise (err if again.reason == "template_error" else again) from None
            notes["records whose tool-call arguments the template takes as JSON text"] += 1
            return examples, notes

    def _plan(self, messages, trained, tools, per_turn):
        notes: Counter = Counter()
        turns = {k: self._turn(messages, k, tools, notes) for k in trained}
        replies = [i for i, m in enumerate(messages) if m.get("role") == ASSISTANT]
        groups, remaining, why = [], list(trained), Counter()
        while remaining:
            host = turns[remaining[-1]]
            text = host.context + host.trained + host.after
            members = [host.index]
            for k in remaining[:-1]:
                t = turns[k]
                if per_turn:
                    continue
                if not text.startswith(t.context):
                    why["an earlier turn's context is rendered differently later (generation prompt)"] += 1
                elif not text.startswith(t.context + t.trained, 0):
                    why["an earlier reply is rendered differently in later history"] += 1
                else:
                    members.append(k)
            groups.append((host, text, sorted(members)))
            remaining = [k for k in remaining if k not in members]
        if len(groups) > 1 and not per_turn:
            notes["records split into several examples"] += 1
            notes["turns trained in an example of their own"] += len(groups) - 1
            for reason in why:
                notes[f"records split: {reason}"] += 1
        examples = []
        for n, (host, text, members) in enumerate(reversed(groups)):
            last = n == len(groups) - 1
            spans, markers = [], []
            for k in members:
                t = turns[k]
                spans.append((len(t.context), len(t.context) + len(t.trained), k))
                markers.append((k, t.marker))
            suffix = "" if last and not per_turn else f"#{replies.index(host.index)}"
            examples.append(
                JinjaExample(
                    suffix,
                    text,
                    tuple(spans),
                    host.data,
                    tuple(markers),
                    tuple(members),
                    0 if host.rendered else len(host.context),
                )
            )
        _check_tools_rendered(tools, examples)
        return examples, notes

    def _turn(self, messages, k: int, tools, notes: Counter) -> Turn:
        """Assistant message k by the rule: context, trained completion, separators, end-of-turn token."""
        context, context_data = self._render(messages[:k], tools, True)
        full, data = self._render(messages[: k + 1], tools, False)
        message = messages[k]
        if full.startswith(context):
            completion = full[len(context) :]
        elif not (think := _THINK_OPEN.search(context)) or not full.startswith(context[: think.start()]):
            # the reply does not continue the generation prompt (DeepSeek-V3 after tool results writes
            # `<｜tool▁outputs▁end｜>` there, but `<｜Assistant｜>` before a tool call): the reply as the
            # template writes it, from where the two renderings part, trains after the inference context
            at = self._parting(context, full)
            completion, shift = full[at:], len(context) - at
            notes["replies that do not continue the generation prompt (trained after it as written)"] += 1
            data = context_data + tuple((s + shift, e + shift) for s, e in data if s >= at)
        else:
            reasoning = _reasoning(message).strip("\n")
            rest = full[think.start() :]
            lead = len(rest) - len(rest.lstrip("\n"))
            completion = reasoning + _THINK_CLOSE + rest[lead:]
            rest_at = think.start() + lead
            shift = len(context) + len(reasoning) + len(_THINK_CLOSE) - rest_at
            what = "with its reasoning" if reasoning else "with an empty think block"
            notes[f"replies written after a think-opening generation prompt, {what}"] += 1
            pattern = _control_pattern(self.control_tokens)
            data = (
                context_data
                + tuple(
                    (len(context) + m.start(), len(context) + m.end())
                    for m in (pattern.finditer(reasoning) if pattern else ())
                )
                + tuple((s + shift, e + shift) for s, e in data if s >= rest_at)
            )
        base = len(context)
        data = tuple(sorted((s, e) for s, e in data))
        end, marker = None, ""
        for tok in self.stop:
            at = completion.find(tok)
            while at >= 0 and any(s <= base + at < e for s, e in data):
                at = completion.find(tok, at + 1)  # that one is spelled in the data
            if at >= 0 and (end is None or at < end - len(marker)):
                end, marker = at + len(tok), tok
        if end is None:
            end = len(completion)
            notes["replies with no end-of-turn token after them"] += 1
        trained = completion[:end]
        _count_changes(message, trained, notes)
        calls = message.get("tool_calls") or []
        if calls:
            problem = _round_trip(trained, calls)
            if problem:
                raise RenderError("tool_call_not_rendered", f"message {k}: {problem}")
        return Turn(k, context, trained, completion[end:], marker, data, full.startswith(context))

    def _parting(self, context: str, full: str) -> int:
        """Where two renderings part: their common prefix, backed off to the start of a control token it
        would cut."""
        at = 0
        for a, b in zip(context, full):
            if a != b:
                break
            at += 1
        for text in (context, full):
            pattern = _control_pattern(self.control_tokens)
            for m in pattern.finditer(text, max(0, at - 64), at + 64) if pattern else ():
                if m.start() < at < m.end():
                    at = m.start()
        return at


def refuse_unwritten(name: str, messages, tools=None, *, tools_ok=False, reasoning_ok=False) -> None:
    """A template without a tool (reasoning) format refuses a record with tools, tool calls or tool results
    (reasoning): `template_has_no_tools` (`template_has_no_reasoning`), never trains it with them left out.
    `tools_ok`/`reasoning_ok` None: not known (a tokenizer's own template), nothing refused here."""
    hint = "choose a template that writes them (see the README's families table) or the tokenizer's own"
    if tools_ok is False and tools:
        raise RenderError(
            "template_has_no_tools",
            f"the record defines tools; the {name} template cannot write them: {hint}",
        )
    for i, m in enumerate(messages):
        if tools_ok is False and (m.get("role") == "tool" or m.get("tool_calls")):
            what = "is a tool result" if m.get("role") == "tool" else "makes tool calls"
            raise RenderError(
                "template_has_no_tools", f"message {i} {what}; the {name} template has no tool format: {hint}"
            )
        if reasoning_ok is False and m.get("reasoning_content"):
            raise RenderError(
                "template_has_no_reasoning",
                f"message {i} has reasoning; the {name} template has no reasoning format: {hint}",
            )


# ---- helpers of the rule ----


@lru_cache(maxsize=16)
def _control_pattern(tokens: tuple[str, ...]):
    if not tokens:
        return None
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))))


def _spells(pattern, obj) -> bool:
    if isinstance(obj, str):
        return pattern.search(obj) is not None or _START in obj or _END in obj
    if isinstance(obj, Mapping):
        return any(_spells(pattern, v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_spells(pattern, v) for v in obj)
    return False


def _mark(pattern, obj):
    if isinstance(obj, str):
        obj = obj.replace(_START, "").replace(_END, "")
        return pattern.sub(f"{_START}\\g<0>{_END}", obj)
    if isinstance(obj, Mapping):
        return {k: _mark(pattern, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(pattern, v) for v in obj]
    return obj


def _reasoning(message: Mapping) -> str:
    """The reply's reasoning: `reasoning_content`, else an inline `<think>...</think>` in the content."""
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"]
    content = message.get("content") or ""
    if "</think>" in content:
        return content.split("</think>")[0].split("<think>")[-1]
    return ""


def _count_changes(message: Mapping, trained: str, notes: Counter) -> None:
    content = message.get("content") or ""
    if "</think>" in content and not isinstance(message.get("reasoning_content"), str):
        content = content.split("</think>")[-1]
    if content and content not in trained:
        if content.strip() in trained:
            notes["reply text trimmed by the template"] += 1
        else:
            notes["reply text changed by the template"] += 1
    reasoning = _reasoning(message).strip()
    if reasoning and reasoning not in trained:
        notes["reasoning the template does not render (not trained)"] += 1


def _arguments_as_text(messages):
    """`messages` with every tool call's arguments as JSON text, or None when none is a dict."""
    changed, out = False, []
    for m in messages:
        calls = m.get("tool_calls")
        if calls and any(isinstance(c.get("function", {}).get("arguments"), dict) for c in calls):
            changed = True
            calls = [
                {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                for c in calls
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out if changed else None


def _json_objects(text: str) -> list[tuple[int, int, object]]:
    """Every top-level JSON object in `text`, left to right, as (start, end, value)."""
    decoder, out, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        out.append((i, end, value))
        i = text.find("{", end)
    return out


def _round_trip(trained: str, calls: Sequence[Mapping]) -> str | None:
    """None when each call parses back, in order, from the trained text; else what is missing."""
    found, pos = _json_objects(trained), 0
    for n, call in enumerate(calls):
        function = call.get("function", call)
        name, args = function.get("name"), function.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        for s, e, value in found:
            if s < pos:
                continue
            if isinstance(value, dict) and value.get("name") == name:
                got = value.get("arguments", value.get("parameters"))
                if isinstance(got, str):
                    try:
                        got = json.loads(got)
                    except ValueError:
                        pass
                if got == args:
                    pos = e
                    break
            if value == args and name in trained[pos:s]:
                pos = e
                break
        else:
            return f"tool call {n} ({name}) is not in the reply as the template renders it"
    return None


def _check_tools_rendered(tools, examples: Sequence[JinjaExample]) -> None:
    """A record's tool definitions must reach the model: each tool's name is in every example's text."""
    for tool in tools or ():
        name = (tool.get("function") or tool).get("name") if isinstance(tool, Mapping) else None
        if name and not all(name in ex.text for ex in examples):
            raise RenderError("tools_not_rendered", f"the template does not render the tool {name!r}")
