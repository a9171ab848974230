"""What reading produced: the counts by outcome and reason, the problems (`Problem`), and the rejects file.

`chatsft.records` fills a `ReadReport` as it reads; `check` and `prepare` print its summary, training streams
rejected records into a `RejectsFile` as they are met, and `chatsft.audit` takes its counts.
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from chatsft.errors import DataError
from chatsft.sources import Position

if TYPE_CHECKING:
    from chatsft.records import Conversation


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
        return printable(f"{where}: {self.reason}: {self.detail}")


def printable(text: str) -> str:
    """`text` with what a terminal would not show as itself escaped (`\\n`, `\\x1b`, `\\ud800`)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


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
    bytes_done: int = 0  # the sizes of the files read to their end
    reading: Position | None = field(default=None, repr=False, compare=False)  # in the file being read

    def bytes_read(self) -> int:
        """Bytes of the files read so far, the one being read up to where its reader has got (for the
        encoding bar's percentage and time left)."""
        tell = self.reading.tell if self.reading is not None else None
        try:
            return self.bytes_done + (tell() if tell is not None else 0)
        except (ValueError, OSError):  # closed
            return self.bytes_done

    @property
    def turns(self) -> list[int]:
        """Turns per accepted record, sorted (a histogram is kept, not one number per record)."""
        return sorted(self.turn_histogram.elements())

    # accepted records: "records with tools", "tool calls", "tool messages", "replies with reasoning", ...
    features: Counter = field(default_factory=Counter)
    features_by_source: dict[str, Counter] = field(default_factory=dict)  # the same, per file

    def add(self, conv: Conversation, dropped: int) -> None:
        """Count one accepted record."""
        self.accepted += 1
        self.leading_assistant_dropped += dropped
        messages = conv.messages
        self.turn_histogram[len(messages) - (messages[0]["role"] == "system")] += 1
        if conv.tools is None and all([len(m) == 2 for m in messages]):  # no reasoning, calls (so no tool
            self.characters += sum([len(m["content"]) for m in messages])  # results), weights
            return
        self.characters += sum([len(m["content"]) + len(m.get("reasoning_content", "")) for m in messages])
        calls = sum([len(m.get("tool_calls", ())) for m in messages])
        tool_messages = sum([m["role"] == "tool" for m in messages])
        reasoning = sum(["reasoning_content" in m for m in messages])
        unweighted = sum([m.get("weight") == 0 for m in messages])
        counts = (conv.tools is not None, len(conv.tools or ()), calls > 0, calls, tool_messages)
        for name, n in zip(FEATURES, (*counts, reasoning > 0, reasoning, unweighted)):
            if n:
                self.features[name] += n
                self.features_by_source.setdefault(conv.source, Counter())[name] += n

    def reject(self, problem: Problem, raw) -> dict:
        """Count one rejected record; return its rejects-file row (kept too when `keep` is set)."""
        self.rejected[problem.reason] += 1
        self.last_problem = problem
        if self.first_problem is None:
            self.first_problem = problem
        row = {
            "source": problem.source,
            "index": problem.index,
            "id": problem.id,
            "turn": problem.turn,
            "reason": problem.reason,
            "detail": problem.detail,
            "record": raw,
        }
        if self.keep:
            self.problems.append(problem)
            self.rejected_records.append(row)
        return row

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
        if self.features:
            lines.append("tools and reasoning (accepted records)")
            lines += [f"  {name:<24}{self.features[name]}" for name in FEATURES if self.features[name]]
            if len(self.files) > 1:  # per data set, when there are several
                for source, counts in self.features_by_source.items():
                    each = ", ".join(f"{name} {counts[name]}" for name in FEATURES if counts[name])
                    lines.append(printable(f"  {source}: {each}"))
        return "\n".join(lines)

    def write_rejects(self, path: str | os.PathLike) -> None:
        """Every rejected record with its reason, as JSON Lines (see `RejectsFile`), so nothing is lost."""
        with RejectsFile(str(path)) as rejects:
            rejects.open()
            for row in self.rejected_records:
                rejects.write(row)


FEATURES = (
    "records with tools",
    "tool definitions",
    "records with tool calls",
    "tool calls",
    "tool messages",
    "records with reasoning",
    "replies with reasoning",
    "replies of weight 0",
)


def _as_json(value):
    """What `json.dumps` cannot write, as text (parquet rows hold bytes, decimals, timestamps)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


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


class RejectsFile:
    """Rejected records written as they are met (JSON Lines): none is held in memory on the training path.

    Records are written as read. What JSON cannot hold is written as text: parquet's bytes (as UTF-8 text, or
    base64 when not UTF-8), decimals and timestamps (`str`/ISO 8601); a lone surrogate, which UTF-8 cannot
    hold, as its JSON escape (`\\ud800`), so the line still parses back to the same string; a record nested
    too deeply for `json.dumps` as a note saying so. A path that cannot be written is a `DataError`."""

    def __init__(self, path: str | None):
        self.path, self.file = path, None

    def open(self) -> None:
        parent = Path(self.path).parent
        if parent.exists() and not parent.is_dir():
            raise DataError(f"cannot write rejected records to {self.path}: {parent} is a file")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if os.path.islink(self.path):  # replace the link itself: never write through it to its target
                os.unlink(self.path)
            # closed by __exit__
            self.file = open(self.path, "w", encoding="utf-8", errors="backslashreplace")
        except OSError as e:
            raise DataError(f"cannot write rejected records to {self.path}: {e.strerror or e}") from None

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        if self.file is None:
            self.open()
        try:
            line = json.dumps(row, ensure_ascii=False, default=_as_json) + "\n"
        except RecursionError:  # a record nested deeper than json.dumps goes (ijson reads it)
            line = json.dumps({**row, "record": "(nested too deeply to write)"}, ensure_ascii=False) + "\n"
        try:
            self.file.write(line)
        except OSError as e:
            raise DataError(f"cannot write rejected records to {self.path}: {e.strerror or e}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
