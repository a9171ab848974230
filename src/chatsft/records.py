"""Read conversation records from .json/.jsonl/.parquet files, validate them, and turn them into messages.

A record is one raw JSON object: ShareGPT (`conversations: [{from, value}]`, optional top-level `system` and
`id`) or OpenAI-style (`messages: [{role, content}]`), either with optional `tools`. The record's own fields
are checked here, its turns by `chatsft.messages` (reasoning, tool calls, tool results, weights), one rule at
a time; each record either becomes a `Conversation` or is rejected with a `Problem` carrying a stable reason
code (`REASONS`). Nothing is dropped silently: every record read is counted as accepted or rejected, and
rejected records can be written out.

Choices where the format is silent:
- A leading assistant turn is dropped, as FastChat does, and counted (`leading_assistant_dropped`), not
  rejected.
- An empty or whitespace-only user/assistant turn rejects the record (`empty_content`): training on an empty
  reply teaches the model to stop at once, and an empty question is almost always a scraping accident.
  An empty system prompt is allowed: it means "no system prompt" (distinct from absent, which takes the
  template's default).
- `"system": null`, `"id": null`, `"tools": null` mean absent (parquet writes missing fields as null).
- A `.json` file that holds one JSON object per line is read as JSON Lines.
- Turn numbers in messages are 0-based positions in the record's turn list.
- Problem lines escape what is not printable (newlines, ANSI escapes, lone surrogates in an id or a path), so
  a record cannot fake or garble the lines of others; the rejects file keeps the record as read
  (`chatsft.report`, where the counts and the rejects file live).
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from chatsft.errors import DataError
from chatsft.messages import MESSAGE_REASONS, Reject, to_messages, to_tools, unicode_ok
from chatsft.report import Problem, ReadReport, RejectsFile
from chatsft.sources import FILE_REASONS, BadLine, FileError, Position, iter_records, shards, type_name

RECORD_REASONS = {
    "bad_json_line": "a JSON Lines line is not valid JSON",
    "not_an_object": "the record is not a JSON object",
    "missing_turns": "the record has neither `conversations` nor `messages`",
    "turns_not_a_list": "`conversations`/`messages` is not a list",
    "no_turns": "the record has zero turns",
    **MESSAGE_REASONS,
    "no_assistant_turn": "no assistant turn is left to train on (none, or all of weight 0)",
    "bad_system": "the top-level `system` is not a string",
    "bad_id": "the `id` is not a string or an integer",
    "duplicate_id": "the id was already used by an earlier record",
}
REASONS = {**FILE_REASONS, **RECORD_REASONS}


@dataclass(frozen=True)
class Conversation:
    """One accepted record as messages.

    `messages` are dicts in the shapes `chatsft.messages` describes: `{"role": "system"|"user", "content"}`,
    assistant messages with optional `reasoning_content`, `tool_calls` (arguments always a dict) and
    `weight: 0` (context only, not trained), and `{"role": "tool", "content", "tool_call_id"?, "name"?}`. A
    system message, when present, is first; after it user and assistant alternate starting with user, an
    assistant message with tool calls being followed by its tool results. It may end on a user turn (encoding
    ignores a trailing user turn). `tools` holds OpenAI function schemas
    `{"type": "function", "function": {"name", ...}}`, or is None.
    `id` is the record's id as a string, or its index in its file.
    """

    id: str
    messages: list[dict]
    source: str = ""
    index: int = 0
    tools: list[dict] | None = None


@dataclass(frozen=True)
class ReadPolicy:
    """How the training path treats rejected records: skip and count them, but stop when there are too many.

    `strict` stops at the first rejected record; `max_invalid_ratio` stops when more than that share of the
    records read was rejected; `rejects_path` receives every rejected record (such as
    `<output_dir>/rejected.jsonl`).
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
    check_ratio: bool = True,
) -> Iterator[Conversation]:
    """Yield the accepted conversations of `paths` one at a time, counting every record into `report`.

    Memory does not grow with the data except by the id set (`SeenIds`, 15-19 bytes per record with an id)
    and, when `report.keep` is set, the problems and rejected records kept for `check`. Rejected records are
    written to `policy.rejects_path` as they are met. `prepare(source, raw)`, if given, maps each raw record
    before validation (a mixture source's field and role mapping). `check_ratio=False` leaves the
    `max_invalid_ratio` check to the caller (`check_invalid_ratio`)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    report = report if report is not None else ReadReport()
    seen = SeenIds()
    with RejectsFile(policy.rejects_path if policy is not None else None) as rejects:
        for source in _shards(paths, report, policy):
            report.files.append(source)
            seen.begin(source, report.records_read)
            items = report.reading = _Items(source)
            for index, item in items:
                report.records_read += 1
                try:
                    if prepare is not None and not isinstance(item, BadLine):
                        item = prepare(source, item)
                    conv, dropped = _to_conversation(item, source, index)
                    if (rid := _id_for_message(item, index)) is not None:
                        if (first := seen.first_use(rid, report.records_read - 1)) is not None:
                            raise Reject("duplicate_id", f"id {rid!r} was first used at {first}")
                except Reject as r:
                    rid = _id_for_message(item, index)
                    raw = item.line if isinstance(item, BadLine) else item
                    problem = Problem(source, r.reason, r.detail, index, rid, r.turn)
                    rejects.write(report.reject(problem, raw))
                    if policy is not None and policy.strict:
                        raise DataError(
                            f"{report.last_problem} (--strict stops at the first rejected record)"
                        ) from None
                    continue
                report.add(conv, dropped)
                yield conv
            report.reading = None
            report.bytes_done += os.path.getsize(source) if os.path.isfile(source) else 0
            if items.error is not None:
                report.file_errors.append(items.error)
                if policy is not None:
                    raise DataError(str(items.error))
    if policy is not None and check_ratio:
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


class SeenIds:
    """The ids met so far, for `duplicate_id`, and where each was first used. Per id a 64-bit string hash and
    a 32-bit record number, in open-addressing tables (two flat arrays each) kept 64-80% full: 15-19 MB per
    million ids, where a dict of the strings takes about 150 bytes an id. The ids are spread over 256 tables
    by their hash, so a table that grows (by a quarter) copies 1/256 of the set, not all of it: no moment
    holds two copies. Each table lives in a private memory map of its own (`_table`; a page at least, so a
    small set takes 2 MB). Two different ids with the same 64-bit hash would be taken for duplicates: about
    one chance in 10^6 at 10^7 ids."""

    _FIRST = 16  # slots a table starts with

    def __init__(self):
        self._keys = [_table("q", self._FIRST) for _ in range(256)]
        self._where = [_table("I", self._FIRST) for _ in range(256)]
        self._used = [0] * 256
        self._starts: list[int] = []  # the record number each source starts at, and the sources
        self._sources: list[str] = []

    def begin(self, source: str, first_record: int) -> None:
        """Records numbered from `first_record` on are from `source`."""
        self._starts.append(first_record)
        self._sources.append(source)

    def first_use(self, rid: str, record: int) -> str | None:
        """Where `rid` was first used (`source:index`); None if it is new, and it is kept as used by `record`
        (numbered across sources, as `begin` was told)."""
        h = hash(rid) or 1  # 0 marks an empty slot
        t = h & 0xFF  # the low 8 bits choose the table, the others the slot
        keys = self._keys[t]
        size = len(keys)
        i = (h >> 8) % size
        while (k := keys[i]) != 0:
            if k == h:
                first = self._where[t][i]
                n = bisect.bisect_right(self._starts, first) - 1
                return f"{self._sources[n]}:{first - self._starts[n]}"
            i += 1
            if i == size:
                i = 0
        keys[i], self._where[t][i] = h, record
        self._used[t] += 1
        if 5 * self._used[t] > 4 * size:
            self._grow(t)
        return None

    def _grow(self, t: int) -> None:
        size = len(self._keys[t]) + len(self._keys[t]) // 4
        keys, where = _table("q", size), _table("I", size)
        for k, w in zip(self._keys[t], self._where[t], strict=True):
            if k:
                i = (k >> 8) % size
                while keys[i] != 0:
                    i += 1
                    if i == size:
                        i = 0
                keys[i], where[i] = k, w
        self._keys[t], self._where[t] = keys, where

    def __len__(self) -> int:
        return sum(self._used)

    @property
    def nbytes(self) -> int:
        """The tables' size in bytes (what the set holds in memory, less a few kB of bookkeeping)."""
        return sum(k.nbytes + w.nbytes for k, w in zip(self._keys, self._where))


def _table(fmt: str, slots: int) -> memoryview:
    """`slots` zeroed items of struct format `fmt`, in a private memory map given back to the OS as soon as
    the table is dropped. In the malloc heap a grown table's old space stays behind as holes among the
    pipeline's other allocations: 2.3M ids inserted between such allocations cost 43 MB of anonymous memory
    there, 37 MB in maps (the set's own 35.3 MiB is 37 MB; benchmarks/bench_idset.py, 2026-12-01)."""
    flags = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # Windows has no flags
    return memoryview(mmap.mmap(-1, struct.calcsize(fmt) * slots, **flags)).cast(fmt)


class _Items(Position):
    """Iterator over (index, raw record | Problem) of one file; `error` is set if the file is unreadable,
    `tell` while it is read (a `Position`)."""

    def __init__(self, source: str):
        self.source = source
        self.error: Problem | None = None

    def __iter__(self) -> Iterator:
        try:
            yield from iter_records(self.source, self)
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


def _to_conversation(raw, source: str, index: int) -> tuple[Conversation, int]:
    """Validate one raw record; return it as a Conversation and how many leading assistant turns were
    dropped."""
    if isinstance(raw, BadLine):
        raise Reject("bad_json_line", raw.detail)
    if not isinstance(raw, dict):
        raise Reject("not_an_object", f"the record is a JSON {type_name(raw)}, expected an object")

    rid = raw.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise Reject("bad_id", f"`id` is a JSON {type_name(rid)}, expected a string or an integer")
    if isinstance(rid, str):
        unicode_ok(rid, "`id`")

    key = "conversations" if "conversations" in raw else "messages" if "messages" in raw else None
    if key is None:
        raise Reject(
            "missing_turns",
            f"no `conversations` or `messages` key (keys: {', '.join(sorted(map(str, raw))) or 'none'})",
        )
    turns = raw[key]
    if not isinstance(turns, list):
        raise Reject("turns_not_a_list", f"`{key}` is a JSON {type_name(turns)}, expected a list of turns")
    if not turns:
        raise Reject("no_turns", f"`{key}` is an empty list")

    system = raw.get("system")
    if system is not None and not isinstance(system, str):
        raise Reject("bad_system", f"top-level `system` is a JSON {type_name(system)}, expected a string")
    if system is not None:
        unicode_ok(system, "top-level `system`")
    tools = to_tools(raw.get("tools"))

    messages, origin = to_messages(turns, key == "conversations", tools, top_system=system is not None)
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
        origin.insert(0, -1)
    start = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    if len(messages) > start and messages[start]["role"] == "assistant":
        del messages[start]  # FastChat skips a conversation's leading assistant turn; we count it
        dropped = 1
        if len(messages) > start and messages[start]["role"] == "tool":
            raise Reject(
                "tool_without_call",
                "its call was in the leading assistant turn, which is dropped (as FastChat does)",
                origin[start + 1],
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise Reject(
            "no_assistant_turn",
            "no assistant turn to train on" + (" after dropping the leading one" if dropped else ""),
        )
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise Reject("no_assistant_turn", "every assistant turn has weight 0: nothing to train on")

    rid = str(rid) if rid is not None else str(index)
    return Conversation(id=rid, messages=messages, source=source, index=index, tools=tools), dropped
