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

import bisect
import json
import os
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from chatsft.errors import DataError
from chatsft.sources import FILE_REASONS, BadLine, FileError, iter_records, shards, type_name

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
    turn_histogram: Counter = field(default_factory=Counter)  # turns per accepted record -> how many records
    characters: int = 0
    keep: bool = True  # hold every problem and rejected record (check); training only counts and streams them
    first_problem: Problem | None = None
    last_problem: Problem | None = None

    @property
    def turns(self) -> list[int]:
        """Turns per accepted record, sorted (a histogram is kept, not one number per record)."""
        return sorted(self.turn_histogram.elements())

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
        if h := self.turn_histogram:
            lines.append(f"turns per record  min {min(h)}, median {_median(h):g}, max {max(h)}")
        lines.append(f"characters        {self.characters:,}")
        return "\n".join(lines)

    def write_rejects(self, path: str | os.PathLike) -> None:
        """Every rejected record with its reason, as JSON Lines, so nothing is lost."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in self.rejected_records:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _median(histogram: Counter) -> float:
    """`statistics.median` of the values a histogram counts, without expanding it."""
    n, seen, below = sum(histogram.values()), 0, None
    for value in sorted(histogram):
        seen += histogram[value]
        if below is None and 2 * seen >= n:
            below = value
            if 2 * seen > n or n % 2:
                return value
        elif below is not None:
            return (below + value) / 2
    return below


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
    """Read and validate every record of `paths` in order, into a list (what `check`, `preview` and `prepare`
    want; training streams with `iter_conversations`).

    With `policy=None` (what `chatsft check` uses) nothing raises: unreadable files and rejected records are
    only reported. With a policy (the training path), an unreadable file, a rejected record under `strict`, or
    too many rejected records raise `DataError`; rejected records are written to `policy.rejects_path`.
    """
    report = ReadReport()
    return list(iter_conversations(paths, policy, report)), report


def iter_conversations(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    policy: ReadPolicy | None = None,
    report: ReadReport | None = None,
    *,
    prepare=None,
) -> Iterator[Conversation]:
    """Yield the accepted conversations of `paths` one at a time, counting every record into `report`.

    Memory does not grow with the data except by the id set (`SeenIds`, 12-36 bytes per record with an id)
    and, when `report.keep` is set, the problems and rejected records kept for `check`. Rejected records are
    written to `policy.rejects_path` as they are met. `prepare(source, raw)`, if given, maps each raw record
    before validation (a mixture source's field and role mapping)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = report if report is not None else ReadReport()
    first_seen = SeenIds()
    with _RejectsFile(policy.rejects_path if policy is not None else None) as rejects:
        for source in _shards(paths, report, policy):
            report.files.append(source)
            first_seen.begin(source, report.records_read)
            items = _Items(source)
            for index, item in items:
                report.records_read += 1
                first_seen.ordinal = report.records_read - 1
                try:
                    if prepare is not None and not isinstance(item, BadLine):
                        item = prepare(source, item)
                    conv, dropped = _to_conversation(item, source, index, first_seen)
                except _Reject as r:
                    rid = _id_for_message(item, index)
                    raw = item.line if isinstance(item, BadLine) else item
                    problem = Problem(source, r.reason, r.detail, index, rid, r.turn)
                    rejects.write(_reject(report, problem, raw))
                    if policy is not None and policy.strict:
                        raise DataError(
                            f"{report.last_problem} (--strict stops at the first rejected record)"
                        ) from None
                    continue
                report.accepted += 1
                report.leading_assistant_dropped += dropped
                report.turn_histogram[len(conv.messages) - (conv.messages[0]["role"] == "system")] += 1
                report.characters += sum([len(m["content"]) for m in conv.messages])
                yield conv
            if items.error is not None:
                report.file_errors.append(items.error)
                if policy is not None:
                    raise DataError(str(items.error))
    if policy is not None:
        check_invalid_ratio(report, policy)


def _shards(paths, report: ReadReport, policy: ReadPolicy | None) -> Iterator[str]:
    """Each given path, a folder standing for its shard files in name order."""
    for path in paths:
        try:
            yield from shards(str(path))
        except FileError as e:
            report.files.append(str(path))
            report.file_errors.append(Problem(str(path), e.reason, e.detail, position=e.position))
            if policy is not None:
                raise DataError(str(report.file_errors[-1])) from None


def check_invalid_ratio(report: ReadReport, policy: ReadPolicy) -> None:
    """Raise when more than `--max_invalid_ratio` of the records read were rejected."""
    if report.records_read and report.rejected_total / report.records_read > policy.max_invalid_ratio:
        raise DataError(
            f"{report.rejected_total} of {report.records_read} records were rejected, more than "
            f"--max_invalid_ratio {policy.max_invalid_ratio:g}; first: {report.first_problem}. "
            f"Run `chatsft check` on the data to see every problem."
        )


class _RejectsFile:
    """Rejected records written as they are met (JSON Lines): none is held in memory on the training path."""

    def __init__(self, path: str | None):
        self.path, self.file = path, None

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        if self.file is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w", encoding="utf-8")  # closed by __exit__
        self.file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def _reject(report: ReadReport, problem: Problem, raw) -> dict:
    report.rejected[problem.reason] += 1
    report.last_problem = problem
    if report.first_problem is None:
        report.first_problem = problem
    row = {
        "source": problem.source,
        "index": problem.index,
        "id": problem.id,
        "turn": problem.turn,
        "reason": problem.reason,
        "detail": problem.detail,
        "record": raw,
    }
    if report.keep:
        report.problems.append(problem)
        report.rejected_records.append(row)
    return row


class SeenIds:
    """The ids met so far, for `duplicate_id`: an open-addressing table of 64-bit string hashes and 32-bit
    record numbers in two flat arrays (12 bytes a slot, kept at most 2/3 full: 18-36 MB per million ids), in
    place of a dict of strings (about 150 bytes an id). Two different ids with the same 64-bit hash would be
    taken for duplicates: about one chance in 10^6 at 10^7 ids. Used as the `first_seen` mapping of
    `_to_conversation`: the location it returns is the `source:index` of the first record with that id
    (`ordinal`, set by the read loop, is the number of the record being validated)."""

    def __init__(self, capacity: int = 1 << 12):
        self._keys, self._where = array("q", bytes(8 * capacity)), array("I", bytes(4 * capacity))
        self._size, self._starts, self._sources, self.ordinal = 0, [], [], 0

    def begin(self, source: str, first_ordinal: int) -> None:
        self._starts.append(first_ordinal)
        self._sources.append(source)

    def _slot(self, h: int) -> int:
        keys, mask = self._keys, len(self._keys) - 1
        i = h & mask
        while (k := keys[i]) != 0 and k != h:
            i = (i + 1) & mask
        return i

    def __contains__(self, rid: str) -> bool:
        return self._keys[self._slot(hash(rid) or 1)] != 0  # 0 marks an empty slot

    def __getitem__(self, rid: str) -> str:
        i = self._slot(hash(rid) or 1)
        if self._keys[i] == 0:
            raise KeyError(rid)
        ordinal = self._where[i]
        n = bisect.bisect_right(self._starts, ordinal) - 1
        return f"{self._sources[n]}:{ordinal - self._starts[n]}"

    def __setitem__(self, rid: str, _where: str) -> None:
        h = hash(rid) or 1
        i = self._slot(h)
        if self._keys[i] == 0:
            self._size += 1
        self._keys[i], self._where[i] = h, self.ordinal
        if 3 * self._size > 2 * len(self._keys):
            self._grow()

    def _grow(self) -> None:
        keys, where = self._keys, self._where
        self._keys, self._where = array("q", bytes(16 * len(keys))), array("I", bytes(8 * len(keys)))
        for k, w in zip(keys, where, strict=True):
            if k:
                i = self._slot(k)
                self._keys[i], self._where[i] = k, w

    def __len__(self) -> int:
        return self._size


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
