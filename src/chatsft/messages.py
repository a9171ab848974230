"""The turns of one record -> messages: roles, text, reasoning, tool calls, tool results, per-message weights.

`to_messages(turns, ...)` checks each turn one rule at a time and raises `Reject` (a stable reason code from
`MESSAGE_REASONS`, a one-line detail, the 0-based turn) or returns the messages in the one shape the rest of
the pipeline reads:
- `{"role": "system"|"user", "content": str}`;
- `{"role": "assistant", "content": str}`, plus, each only when present, `"reasoning_content": str` (input key
  `reasoning_content` or `reasoning`), `"weight": 0` and
  `"tool_calls": [{"id"?: str, "type": "function", "function": {"name": str, "arguments": dict}}]`;
- `{"role": "tool", "content": str}`, plus `"tool_call_id"` and `"name"` (strings) when given.
`to_tools(value)` turns a record's `tools` into OpenAI schemas `{"type": "function", "function": {...}}`.

Choices where the formats are silent or disagree:
- Tool calls may be OpenAI's nested form (`{"type": "function", "function": {"name", "arguments"}}`) or the
  flat `{"name", "arguments"}` of ShareGPT/LLaMA-Factory `function_call` turns and Hermes-style dumps; both
  become the nested form. `arguments` may be an object or a string holding a JSON object (always a dict
  afterwards); a missing or null `arguments` means `{}` (a function without parameters).
- Flat tool schemas (`{"name", "description", "parameters"}`, LLaMA-Factory's `tools`) become the nested form;
  null fields are dropped (parquet writes a struct's missing fields as null). `tools: []` means no tools.
- An assistant message with tool calls may have `content` null, empty or absent (it becomes ""); one with
  neither text nor tool calls is `empty_content`, reasoning or not. Empty reasoning is the same as none.
- `weight` (OpenAI fine-tuning) is 0 or 1 on assistant messages; only 0 is kept: that reply stays in the
  context and is not trained. A record whose replies all have weight 0 has nothing to train
  (`no_assistant_turn`).
- ShareGPT `function_call` turns become tool calls of an assistant message; one directly after an assistant
  turn is merged into it (the text, then the calls: one reply as models write it). `observation` (and `tool`,
  and OpenAI's legacy `function` role) turns become tool messages; OpenAI's legacy assistant `function_call`
  field is read as one tool call.
- Order: an optional system message first; then user and assistant alternate, except that an assistant
  message with tool calls is followed by its tool results (one or more tool messages, at most one per call;
  fewer is allowed because some formats answer several calls in one message), then by an assistant or a user
  message. A tool message needs an assistant message with tool calls before it (`tool_without_call`); tool
  calls followed directly by another turn lack their result (`missing_tool_result`), but a conversation may
  end on them. A `tool_call_id` or `name` on a result must match a call of that assistant message (ids are
  checked when the calls carry ids).
- Text that is not valid Unicode (a lone surrogate such as `"\\ud800"`, which JSON can spell but no tokenizer
  can encode) rejects the record (`bad_unicode`), wherever it is.

The module is longer than most because each field (role, text, reasoning, weight, calls, arguments, results,
tool schemas) has checks of its own; all serve the one job of turning a record's turns into messages.
"""

from __future__ import annotations

import json

from chatsft.sources import type_name

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "function_call": "assistant",  # ShareGPT: the turn's value holds the calls
}

MESSAGE_REASONS = {
    "turn_not_an_object": "a turn is not a JSON object",
    "missing_role": "a turn has no `from` (or `role`)",
    "missing_content": "a turn has no `value` (or `content`)",
    "content_not_string": "a turn's value is null or not a string",
    "empty_content": "a user turn, or an assistant turn without tool calls, is empty or whitespace only",
    "unknown_role": "a turn's role is not one of the known names",
    "system_not_first": "a system turn appears after the first turn, or twice",
    "repeated_role": "two user (or two assistant) turns in a row",
    "bad_reasoning": "`reasoning_content`/`reasoning` is not a string, not on an assistant turn, or the two "
    "differ",
    "bad_weight": "`weight` is not 0 or 1, or is not on an assistant turn",
    "bad_tool_calls": "`tool_calls` (or a `function_call` turn) is not a list of calls naming a function",
    "bad_tool_arguments": "a tool call's `arguments` is neither a JSON object nor a string holding one",
    "unknown_tool": "a tool call names a function that the record's `tools` does not define",
    "tool_without_call": "a tool message does not follow an assistant turn with tool calls",
    "missing_tool_result": "an assistant turn's tool calls are followed by another turn, not their results",
    "tool_result_mismatch": "a tool message answers no call: unknown `tool_call_id` or `name`, or more "
    "results than calls",
    "bad_tool_message": "a tool message's `tool_call_id` or `name` is not a string",
    "bad_tools": "`tools` is not a list (or a JSON string of one) of function schemas with distinct names",
    "bad_unicode": "a string holds a lone surrogate (not valid Unicode; no tokenizer can encode it)",
    "nested_too_deeply": "tool-call arguments or tool schemas nest more than 64 levels deep",
}


class Reject(Exception):
    """Why a record is rejected: a reason code, a one-line detail, the 0-based turn (None: the record)."""

    def __init__(self, reason: str, detail: str, turn: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.turn = reason, detail, turn


def to_messages(
    turns: list, sharegpt: bool, tools: list[dict] | None, top_system: bool = False
) -> tuple[list[dict], list[int]]:
    """Validate a record's turns; return the messages and, per message, the turn it came from.

    `top_system`: the record also has a top-level `system`, so a system turn is one too many."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    names = {t["function"]["name"] for t in tools} if tools else None
    messages: list[dict] = []
    origin: list[int] = []
    other_role, other_content = ("role", "content") if sharegpt else ("from", "value")
    plain = True  # no tool call or result so far: only roles repeating need checking
    for n, turn in enumerate(turns):
        if type(turn) is not dict:
            raise Reject("turn_not_an_object", f"the turn is a JSON {type_name(turn)}, expected an object", n)
        rk = role_key if role_key in turn else other_role if other_role in turn else None
        if rk is None:
            raise Reject("missing_role", f"no `{role_key}` field", n)
        name = turn[rk]
        lowered = name.lower() if type(name) is str else None
        role = ROLE_ALIASES.get(lowered)
        if role is None:
            raise Reject("unknown_role", f"`{rk}` is {shown(name)}; known: {', '.join(ROLE_ALIASES)}", n)
        ck = content_key if content_key in turn else other_content if other_content in turn else None
        content = turn[ck] if ck is not None else None
        if (
            len(turn) == 2
            and type(content) is str
            and content
            and not content.isspace()
            and lowered != "function_call"
        ):
            # the common turn, {role, text} and nothing else: the checks below, done at once
            if not content.isascii():
                unicode_ok(content, f"`{ck}`", n)
            message = {"role": role, "content": content}
        elif lowered == "function_call":
            message = _function_call_turn(turn, ck, n, names)
        elif role == "assistant":
            message = _assistant(turn, ck, content_key, n, names)
        else:
            message = _plain(turn, role, ck, content_key, n)
        if role == "system" and (n != 0 or top_system):
            why = "a top-level `system` is also given" if n == 0 else "a system turn is allowed only first"
            raise Reject("system_not_first", why, n)
        if lowered == "function_call" and messages and messages[-1]["role"] == "assistant":
            _merge(messages[-1], message, n)
            plain = False
            continue
        if len(message) > 2 or role == "tool":
            plain = False
        elif plain and messages and messages[-1]["role"] == role and role != "system":
            raise Reject("repeated_role", f"two {role} turns in a row (turns {origin[-1]} and {n})", n)
        messages.append(message)
        origin.append(n)
    if not plain:  # tool calls and results have an order of their own
        _check_order(messages, origin)
    return messages, origin


def _plain(turn: dict, role: str, ck: str | None, content_key: str, n: int) -> dict:
    if ck is None:
        raise Reject("missing_content", f"no `{content_key}` field", n)
    content = _text(turn[ck])
    if content is None:
        raise Reject("content_not_string", f"`{ck}` is a JSON {type_name(turn[ck])}, expected a string", n)
    for key in ("reasoning_content", "reasoning"):
        if turn.get(key) is not None:
            raise Reject(
                "bad_reasoning", f"`{key}` is given on a {role} turn; only assistant turns reason", n
            )
    if turn.get("weight") is not None:
        raise Reject(
            "bad_weight", f"`weight` is given on a {role} turn; it applies to assistant turns only", n
        )
    if turn.get("tool_calls") is not None or turn.get("function_call") is not None:
        raise Reject("bad_tool_calls", f"tool calls are given on a {role} turn; only assistant turns call", n)
    if role == "user" and (not content or content.isspace()):
        why = "empty" if not content else "whitespace only"
        raise Reject("empty_content", f"the user turn's `{ck}` is {why}", n)
    unicode_ok(content, f"`{ck}`", n)
    message = {"role": role, "content": content}
    if role == "tool":
        for key in ("tool_call_id", "name"):
            value = turn.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise Reject(
                    "bad_tool_message", f"`{key}` is a JSON {type_name(value)}, expected a string", n
                )
            unicode_ok(value, f"`{key}`", n)
            message[key] = value
    return message


def _assistant(turn: dict, ck: str | None, content_key: str, n: int, names: set[str] | None) -> dict:
    raw_calls = turn.get("tool_calls")
    if raw_calls is None and turn.get("function_call") is not None:  # OpenAI's legacy single call
        raw_calls = [turn["function_call"]]
    calls = _tool_calls(raw_calls, "`tool_calls`", n, names) if raw_calls is not None else []
    if ck is None and not calls:
        raise Reject("missing_content", f"no `{content_key}` field", n)
    value = turn.get(ck) if ck is not None else None
    content = "" if value is None and calls else _text(value)
    if content is None:
        raise Reject("content_not_string", f"`{ck}` is a JSON {type_name(value)}, expected a string", n)
    if not calls and (not content or content.isspace()):
        why = "empty" if not content else "whitespace only"
        raise Reject("empty_content", f"the assistant turn's `{ck}` is {why} and it has no tool calls", n)
    unicode_ok(content, f"`{ck}`", n)
    message = {"role": "assistant", "content": content}
    reasoning = _reasoning(turn, n)
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = calls
    if _weight(turn, n) == 0:
        message["weight"] = 0
    return message


def _function_call_turn(turn: dict, ck: str | None, n: int, names: set[str] | None) -> dict:
    """A ShareGPT `function_call` turn: its value is the JSON of a call `{"name", "arguments"}` or a list."""
    if ck is None:
        raise Reject("missing_content", "no `value` field", n)
    value = turn[ck]
    if isinstance(value, str):
        value = _parse_json(value, "bad_tool_calls", f"the function_call `{ck}`", n)
    calls = _tool_calls(value if isinstance(value, list) else [value], f"the function_call `{ck}`", n, names)
    if not calls:
        raise Reject("bad_tool_calls", f"the function_call `{ck}` is an empty list", n)
    message = {"role": "assistant", "content": "", "tool_calls": calls}
    if _weight(turn, n) == 0:
        message["weight"] = 0
    return message


def _merge(previous: dict, calls_message: dict, n: int) -> None:
    if previous.get("weight", 1) != calls_message.get("weight", 1):
        raise Reject("bad_weight", "the function_call turn's `weight` differs from the reply it continues", n)
    previous.setdefault("tool_calls", []).extend(calls_message["tool_calls"])


def _reasoning(turn: dict, n: int) -> str:
    found = {k: turn[k] for k in ("reasoning_content", "reasoning") if turn.get(k) is not None}
    for key, value in found.items():
        if not isinstance(value, str):
            raise Reject("bad_reasoning", f"`{key}` is a JSON {type_name(value)}, expected a string", n)
        unicode_ok(value, f"`{key}`", n)
    if len(set(found.values())) > 1:
        raise Reject("bad_reasoning", "`reasoning_content` and `reasoning` are both given and differ", n)
    return next(iter(found.values()), "")


def _weight(turn: dict, n: int) -> int:
    value = turn.get("weight")
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise Reject("bad_weight", f"`weight` is {shown(value, 40)}, expected 0 or 1", n)
    return int(value)


def _tool_calls(raw, what: str, n: int, names: set[str] | None) -> list[dict]:
    if not isinstance(raw, list):
        raise Reject("bad_tool_calls", f"{what} is a JSON {type_name(raw)}, expected a list", n)
    calls = []
    for k, call in enumerate(raw):
        if not isinstance(call, dict):
            raise Reject("bad_tool_calls", f"call {k} is a JSON {type_name(call)}, expected an object", n)
        kind = call.get("type")
        if kind is not None and kind != "function":
            raise Reject("bad_tool_calls", f'call {k} has `type` {shown(kind, 40)}, expected "function"', n)
        fn = call.get("function") if call.get("function") is not None else call
        if not isinstance(fn, dict):
            raise Reject(
                "bad_tool_calls", f"call {k}'s `function` is a JSON {type_name(fn)}, expected an object", n
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            what = "no `name`" if name is None else f"`name` {shown(name, 40)}"
            raise Reject("bad_tool_calls", f"call {k} has {what}; a call must name its function", n)
        unicode_ok(name, f"call {k}'s `name`", n)
        if names is not None and name not in names:
            known = ", ".join(sorted(names))
            raise Reject("unknown_tool", f"call {k} names {name!r}; the record's tools are: {known}", n)
        out = {}
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise Reject(
                    "bad_tool_calls",
                    f"call {k}'s `id` is a JSON {type_name(call['id'])}, expected a string",
                    n,
                )
            unicode_ok(call["id"], f"call {k}'s `id`", n)
            out["id"] = call["id"]
        out["type"] = "function"
        out["function"] = {"name": name, "arguments": _arguments(fn.get("arguments"), k, n)}
        calls.append(out)
    ids = [c["id"] for c in calls if "id" in c]
    if len(ids) != len(set(ids)):
        raise Reject("bad_tool_calls", "two calls of one turn share an `id`", n)
    return calls


def _arguments(value, k: int, n: int) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        value = _parse_json(value, "bad_tool_arguments", f"call {k}'s `arguments`", n)
        if not isinstance(value, dict):
            raise Reject(
                "bad_tool_arguments",
                f"call {k}'s `arguments` holds a JSON {type_name(value)}, expected an object",
                n,
            )
    elif not isinstance(value, dict):
        raise Reject(
            "bad_tool_arguments",
            f"call {k}'s `arguments` is a JSON {type_name(value)}, expected an object",
            n,
        )
    unicode_ok(value, f"call {k}'s `arguments`", n)
    return value


def _check_order(messages: list[dict], origin: list[int]) -> None:
    calls: list[dict] = []  # the open tool calls of the last assistant message
    answered = 0
    for i, (m, n) in enumerate(zip(messages, origin)):
        prev = messages[i - 1] if i else None
        role = m["role"]
        if role == "tool":
            if prev is None or prev["role"] not in ("assistant", "tool") or not calls:
                raise Reject("tool_without_call", "no assistant turn with tool calls comes before it", n)
            answered += 1
            _match_result(m, calls, answered, messages, i, n)
            continue
        if prev is not None and prev["role"] == "assistant" and prev.get("tool_calls"):
            raise Reject("missing_tool_result", f"the tool calls of turn {origin[i - 1]} have no result", n)
        if prev is not None and prev["role"] == role and role in ("user", "assistant"):
            raise Reject("repeated_role", f"two {role} turns in a row (turns {origin[i - 1]} and {n})", n)
        calls, answered = m.get("tool_calls", []), 0


def _match_result(m: dict, calls: list[dict], answered: int, messages: list[dict], i: int, n: int) -> None:
    if answered > len(calls):
        raise Reject("tool_result_mismatch", f"{answered} tool results for {len(calls)} call(s)", n)
    ids = [c["id"] for c in calls if "id" in c]
    if "tool_call_id" in m and ids:
        if m["tool_call_id"] not in ids:
            raise Reject("tool_result_mismatch", f"`tool_call_id` {m['tool_call_id']!r} matches no call", n)
        earlier = [x.get("tool_call_id") for x in messages[i - answered + 1 : i]]
        if m["tool_call_id"] in earlier:
            raise Reject("tool_result_mismatch", f"call {m['tool_call_id']!r} is answered twice", n)
    if "name" in m and m["name"] not in {c["function"]["name"] for c in calls}:
        raise Reject("tool_result_mismatch", f"`name` {m['name']!r} matches none of the calls", n)


def to_tools(value) -> list[dict] | None:
    """A record's `tools` (a list, or a JSON string of one) as OpenAI function schemas; None if absent."""
    if value is None:
        return None
    if isinstance(value, str):
        value = _parse_json(value, "bad_tools", "`tools`", None)
        if not isinstance(value, list):
            raise Reject("bad_tools", f"`tools` holds a JSON {type_name(value)}, expected a list")
    elif not isinstance(value, list):
        raise Reject("bad_tools", f"`tools` is a JSON {type_name(value)}, expected a list")
    tools, seen = [], set()
    for k, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise Reject("bad_tools", f"tool {k} is a JSON {type_name(entry)}, expected an object")
        if entry.get("type") not in (None, "function"):
            raise Reject("bad_tools", f'tool {k} has `type` {shown(entry["type"], 40)}, expected "function"')
        nested = entry.get("function") is not None
        fn = entry["function"] if nested else entry
        if not isinstance(fn, dict):
            raise Reject("bad_tools", f"tool {k}'s `function` is a JSON {type_name(fn)}, expected an object")
        fn = {key: v for key, v in fn.items() if v is not None and (nested or key != "type")}
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise Reject("bad_tools", f"tool {k} has no function name")
        if name in seen:
            raise Reject("bad_tools", f"tool {k} repeats the name {name!r}")
        for key, kind in (("description", str), ("parameters", dict)):
            if key in fn and not isinstance(fn[key], kind):
                expected = "a string" if kind is str else "an object"
                raise Reject(
                    "bad_tools", f"tool {k}'s `{key}` is a JSON {type_name(fn[key])}, expected {expected}"
                )
        unicode_ok(fn, f"tool {k}")
        seen.add(name)
        tools.append({"type": "function", "function": fn})
    return tools or None


MAX_DEPTH = 64  # nesting kept in arguments and tool schemas (JSON schemas nest a few levels)


def unicode_ok(value, what: str, turn: int | None = None) -> None:
    """Reject a lone surrogate anywhere in `value` (a string, or nested lists and dicts, keys included), and
    nesting deeper than `MAX_DEPTH` (rendering it, `tojson` in a template, would overflow the stack)."""
    stack = [(value, 0)]
    while stack:  # a loop, not recursion: values may nest as deep as the JSON parser allows
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise Reject(
                        "bad_unicode",
                        f"{what} holds a lone surrogate U+{ord(item[e.start]):04X} at character {e.start}",
                        turn,
                    ) from None
        elif isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise Reject("nested_too_deeply", f"{what} nests more than {MAX_DEPTH} levels deep", turn)
            if isinstance(item, dict):
                stack.extend((k, depth + 1) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def shown(value, limit: int = 60) -> str:
    """A value as it reads in JSON, cut to `limit` characters, for details; containers by their type only."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return json.dumps(value, ensure_ascii=False)[:limit]
    return f"a JSON {type_name(value)}"


def _text(value) -> str | None:
    """A turn's text: a string, or OpenAI-style content parts that are all text; None otherwise."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        )
    ):
        return "".join(p["text"] for p in value)
    return None


def _parse_json(text: str, reason: str, what: str, n: int | None):
    """A field given as a JSON string, parsed; else a `Reject` with `reason` saying why `what` is not JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise Reject(reason, f"{what} is not valid JSON: {_why(e)}", n) from None


def _why(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return f"{e.msg} at column {e.colno}"
