"""Read conversation records from .json/.jsonl/.parquet files, validate them, and turn them into messages.

A record is one raw JSON object: ShareGPT (`conversations: [{from, value}]`, optional top-level `system` and
`id`) or OpenAI-style (`messages: [{role, content}]`). Each record is checked one rule at a time and either
becomes a `Conversation` or is rejected with a `Problem` carrying a stable reason code (`REASONS`). Nothing is
dropped silently: every record read is counted as accepted or rejected, and rejected records can be written out.

Choices where the format is silent:
- A leading assistant turn is dropped, as FastChat does, and counted (`leading_assistant_dropped`), not rejected.
- An empty or whitespace-only user/assistant turn rejects the record (`empty_content`): training on an empty
  reply teaches the model to stop at once, and an empty question is almost always a scraping accident.
  An empty system prompt is allowed: it means "no system prompt" (distinct from absent, which takes the
  template's default).
- `"system": null` and `"id": null` are treated as absent (parquet writes missing fields as null).
- A `.json` file that holds one JSON object per line is read as JSON Lines.
- Turn numbers in messages are 0-based positions in the record's turn list.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from chatsft.errors import DataError
from chatsft.sources import FILE_REASONS, BadLine, FileError, iter_records, type_name

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
}

RECORD_REASONS = {
    "bad_json_line": "a JSON Lines line is not valid JSON",
    "not_an_object": "the record is not a JSON object",
    "missing_turns": "the record has neither `conversations` nor `messages`",
    "turns_not_a_list": "`conversations`/`messages` is not a list",
    "no_turns": "the record has zero turns",
    "turn_not_an_object": "a turn is not a JSON object",
    "missing_role": "a turn has no `from` (or `role`)",
    "missing_content": "a turn has no `value` (or `content`)",
    "content_not_string": "a turn's value is null or not a string",
    "empty_content": "a user or assistant turn is empty or whitespace only",
    "unknown_role": "a turn's role is not one of the known names",
    "system_not_first": "a system turn appears after the first turn, or twice",
    "repeated_role": "two turns of the same role in a row",
    "no_assistant_turn": "no assistant turn is left to train on",
    "bad_system": "the top-level `system` is not a string",
    "bad_id": "the `id` is not a string or an integer",
    "duplicate_id": "the id was already used by an earlier record",
}
REASONS = {**FILE_REASONS, **RECORD_REASONS}


@dataclass(frozen=True)
class Conversation:
    """One accepted record as messages.

    `messages` are dicts `{"role": "system"|"user"|"assistant", "content": str}`; a system message, when present,
    is first; after it the roles alternate user, assistant, user, ... starting with user. It may end on a user
    turn (encoding ignores a trailing user turn). `id` is the record's id as a string, or its index in its file.
    """

    id: str
    messages: list[dict[str, str]]
    source: str = ""
    index: int = 0


@dataclass(frozen=True)
class Problem:
    """Why a record (or a whole file, when `index` is None) was rejected."""

    source: str
    reason: str
    detail: str
    index: int | None = None
    id: str | None = None
    turn: int | None = None
    position: str | None = None  # "line:column" for JSON syntax errors

    def __str__(self) -> str:
        where = self.source
        if self.index is not None:
            where += f":{self.index}"
            if self.id is not None:
                where += f" (id={self.id})"
            if self.turn is not None:
                where += f" turn {self.turn}"
        elif self.position:
            where += f":{self.position}"
        return f"{where}: {self.reason}: {self.detail}"


class _Reject(Exception):
    def __init__(self, reason: str, detail: str, turn: int | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.turn = reason, detail, turn


@dataclass
class ReadReport:
    """What reading produced: counts by outcome and reason, and every problem in input order."""

    files: list[str] = field(default_factory=list)
    records_read: int = 0
    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)
    file_errors: list[Problem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rejected_records: list[dict] = field(default_factory=list)
    leading_assistant_dropped: int = 0
    turns: list[int] = field(default_factory=list)
    characters: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> str:
        lines = [
            f"files             {len(self.files)}"
            + (f" ({len(self.file_errors)} unreadable)" if self.file_errors else ""),
            f"records read      {self.records_read}",
            f"accepted          {self.accepted}",
            f"rejected          {self.rejected_total}",
        ]
        lines += [
            f"  {reason:<22}{n}"
            for reason, n in sorted(self.rejected.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        if self.leading_assistant_dropped:
            lines.append(
                f"leading assistant turns dropped (as FastChat does): {self.leading_assistant_dropped}"
            )
        if self.turns:
            lines.append(
                f"turns per record  min {min(self.turns)}, median {statistics.median(self.turns):g}, "
                f"max {max(self.turns)}"
            )
        lines.append(f"characters        {self.characters:,}")
        return "\n".join(lines)

    def write_rejects(self, path: str | os.PathLike) -> None:
        """Every rejected record with its reason, as JSON Lines, so nothing is lost."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in self.rejected_records:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class ReadPolicy:
    """How the training path treats rejected records: skip and count them, but stop when there are too many.

    `strict` stops at the first rejected record; `max_invalid_ratio` stops when more than that share of the
    records read was rejected; `rejects_path` receives every rejected record (e.g. `<output_dir>/rejected.jsonl`).
    File-level errors always stop.
    """

    max_invalid_ratio: float = 0.1
    strict: bool = False
    rejects_path: str | None = None

    def for_eval(self) -> ReadPolicy:
        """The same policy for the eval files, whose rejected records go beside the training ones."""
        path = self.rejects_path
        return replace(self, rejects_path=str(Path(path).with_name("rejected-eval.jsonl")) if path else None)


def read_conversations(
    paths: str | os.PathLike | Sequence[str | os.PathLike], policy: ReadPolicy | None = None
) -> tuple[list[Conversation], ReadReport]:
    """Read and validate every record of `paths` in order.

    With `policy=None` (what `chatsft check` uses) nothing raises: unreadable files and rejected records are
    only reported. With a policy (the training path), an unreadable file, a rejected record under `strict`, or
    too many rejected records raise `DataError`; rejected records are written to `policy.rejects_path`.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = ReadReport()
    conversations: list[Conversation] = []
    first_seen: dict[str, str] = {}
    for path in paths:
        source = str(path)
        report.files.append(source)
        items = _Items(source)
        for index, item in items:
            report.records_read += 1
            try:
                conv, dropped = _to_conversation(item, source, index, first_seen)
            except _Reject as r:
                rid = _id_for_message(item, index)
                raw = item.line if isinstance(item, BadLine) else item
                _reject(report, Problem(source, r.reason, r.detail, index, rid, r.turn), raw=raw)
                if policy is not None and policy.strict:
                    _finish(report, policy)
                    raise DataError(
                        f"{report.problems[-1]} (--strict stops at the first rejected record)"
                    ) from None
                continue
            report.accepted += 1
            report.leading_assistant_dropped += dropped
            report.turns.append(len(conv.messages) - (conv.messages[0]["role"] == "system"))
            report.characters += sum([len(m["content"]) for m in conv.messages])
            conversations.append(conv)
        if items.error is not None:
            report.file_errors.append(items.error)
            if policy is not None:
                raise DataError(str(items.error))
    if policy is not None:
        _finish(report, policy)
        if report.records_read and report.rejected_total / report.records_read > policy.max_invalid_ratio:
            raise DataError(
                f"{report.rejected_total} of {report.records_read} records were rejected, more than "
                f"--max_invalid_ratio {policy.max_invalid_ratio:g}; first: {report.problems[0]}. "
                f"Run `chatsft check` on the data to see every problem."
            )
    return conversations, report


def _finish(report: ReadReport, policy: ReadPolicy) -> None:
    if policy.rejects_path and report.rejected_records:
        report.write_rejects(policy.rejects_path)


def _reject(report: ReadReport, problem: Problem, raw) -> None:
    report.rejected[problem.reason] += 1
    report.problems.append(problem)
    report.rejected_records.append(
        {
            "source": problem.source,
            "index": problem.index,
            "id": problem.id,
            "turn": problem.turn,
            "reason": problem.reason,
            "detail": problem.detail,
            "record": raw,
        }
    )


















class _Items:
    """Iterator over (index, raw record | Problem) of one file; `error` is set if the file is unreadable."""

    def __init__(self, source: str):
        self.source = source
        self.error: Problem | None = None

    def __iter__(self) -> Iterator:
        try:
            yield from iter_records(self.source)
        except FileError as e:
            self.error = Problem(self.source, e.reason, e.detail, position=e.position)


def _id_for_message(raw, index: int) -> str | None:
    if (
        isinstance(raw, dict)
        and isinstance(raw.get("id"), (str, int))
        and not isinstance(raw.get("id"), bool)
    ):
        return str(raw["id"])
    return None


def _to_conversation(raw, source: str, index: int, first_seen: dict[str, str]) -> tuple[Conversation, int]:
    """Validate one raw record; return it as a Conversation and how many leading assistant turns were dropped."""
    if isinstance(raw, BadLine):
        raise _Reject("bad_json_line", raw.detail)
    if not isinstance(raw, dict):
        raise _Reject("not_an_object", f"the record is a JSON {type_name(raw)}, expected an object")

    rid = raw.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise _Reject("bad_id", f"`id` is a JSON {type_name(rid)}, expected a string or an integer")

    key = "conversations" if "conversations" in raw else "messages" if "messages" in raw else None
    if key is None:
        raise _Reject(
            "missing_turns",
            f"no `conversations` or `messages` key (keys: {', '.join(sorted(raw)) or 'none'})",
        )
    turns = raw[key]
    if not isinstance(turns, list):
        raise _Reject("turns_not_a_list", f"`{key}` is a JSON {type_name(turns)}, expected a list of turns")
    if not turns:
        raise _Reject("no_turns", f"`{key}` is an empty list")
    role_key, content_key = ("from", "value") if key == "conversations" else ("role", "content")

    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise _Reject("bad_system", f"top-level `system` is a JSON {type_name(system)}, expected a string")

    messages: list[dict[str, str]] = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Reject(
                "turn_not_an_object", f"the turn is a JSON {type_name(turn)}, expected an object", n
            )
        rk = (
            role_key
            if role_key in turn
            else ("role" if "role" in turn else "from" if "from" in turn else None)
        )
        if rk is None:
            raise _Reject("missing_role", f"no `{role_key}` field", n)
        ck = (
            content_key
            if content_key in turn
            else ("content" if "content" in turn else "value" if "value" in turn else None)
        )
        if ck is None:
            raise _Reject("missing_content", f"no `{content_key}` field", n)
        role_name, content = turn[rk], turn[ck]
        if type(content) is not str:
            content = _text(content)
        role = ROLE_ALIASES.get(role_name.lower()) if isinstance(role_name, str) else None
        if role is None:
            raise _Reject(
                "unknown_role",
                f"`{rk}` is {json.dumps(role_name, ensure_ascii=False)[:60]}; known: "
                f"{', '.join(ROLE_ALIASES)}",
                n,
            )
        if content is None:
            raise _Reject(
                "content_not_string", f"`{ck}` is a JSON {type_name(turn[ck])}, expected a string", n
            )
        if role == "system":
            if n != 0 or system is not None:
                why = (
                    "a top-level `system` is also given" if n == 0 else "a system turn is allowed only first"
                )
                raise _Reject("system_not_first", why, n)
        elif not content or content.isspace():
            raise _Reject(
                "empty_content",
                f"the {role} turn's `{ck}` is {'empty' if not content else 'whitespace only'}",
                n,
            )
        if messages and messages[-1]["role"] == role:
            raise _Reject("repeated_role", f"two {role} turns in a row (turns {n - 1} and {n})", n)
        messages.append({"role": role, "content": content})

    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    start = 1 if messages[0]["role"] == "system" else 0
    dropped = 0
    if len(messages) > start and messages[start]["role"] == "assistant":
        del messages[start]  # FastChat skips a conversation's leading assistant turn; we count it
        dropped = 1
    if not any(m["role"] == "assistant" for m in messages):
        raise _Reject(
            "no_assistant_turn",
            "no assistant turn to train on" + (" after dropping the leading one" if dropped else ""),
        )

    if rid is not None:
        rid = str(rid)
        where = f"{source}:{index}"
        if rid in first_seen:
            raise _Reject("duplicate_id", f"id {rid!r} was first used at {first_seen[rid]}")
        first_seen[rid] = where
    return Conversation(
        id=rid if rid is not None else str(index), messages=messages, source=source, index=index
    ), dropped


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
