"""Read raw records from conversation files: .json (a list, or JSON Lines saved as .json), .jsonl and .parquet.

`iter_items(path)` yields `(index, raw record)` per record, and `BadLine` for a JSON Lines line that does not
parse (a record-level problem: the other lines are still read); a file that cannot be read at all raises
`FileError` with a stable reason code (`FILE_REASONS`). Validation of what a record holds is `chatsft.records`'.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Stable reason codes. File-level ones make the whole file unreadable; the others reject one record.
FILE_REASONS = {
    "file_missing": "the file does not exist",
    "file_unreadable": "the file cannot be opened (a directory, or no permission)",
    "file_empty": "the file is empty",
    "not_utf8": "the file is not valid UTF-8",
    "bad_json": "the file is not valid JSON",
    "not_a_list": "the top level of a .json file must be a list of records",
    "no_records": "the file holds no records",
    "bad_parquet": "the parquet file cannot be read",
    "unknown_format": "the file extension is not .json, .jsonl or .parquet",
}


@dataclass(frozen=True)
class BadLine:
    """A JSON Lines line that does not parse: rejected as a record, the other lines still read."""

    detail: str
    line: str


class FileError(Exception):
    def __init__(self, reason: str, detail: str, position: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.position = reason, detail, position


def iter_records(source: str) -> Iterator:
    path = Path(source)
    suffix = path.suffix.lower()
    if not path.exists():
        raise FileError("file_missing", "no such file")
    if suffix not in (".json", ".jsonl", ".parquet"):
        raise FileError(
            "unknown_format", f"expected .json, .jsonl or .parquet, got {suffix or 'no extension'!r}"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FileError("file_unreadable", e.strerror or str(e)) from None
    if not data.strip():
        raise FileError("file_empty", "the file is empty" if not data else "the file holds only whitespace")
    if suffix == ".parquet":
        rows = _parquet_rows(path)
        if not rows:
            raise FileError("no_records", "the parquet file has no rows")
        yield from enumerate(rows)
        return
    text = _decode(data)
    if suffix == ".jsonl":
        yield from _jsonl_records(text, source)
        return
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from _jsonl_records(text, source)  # JSON Lines saved as .json: common, and unambiguous
            return
        hint = " (a trailing comma?)" if text[: e.pos].rstrip().endswith(",") else ""
        raise FileError(
            "bad_json", f"{e.msg}{hint} at line {e.lineno} column {e.colno}", f"{e.lineno}:{e.colno}"
        ) from None
    if not isinstance(top, list):
        raise FileError(
            "not_a_list",
            f"the top level is a JSON {type_name(top)}; a .json file must hold a list of records",
        )
    if not top:
        raise FileError("no_records", "the file holds an empty list")
    yield from enumerate(top)


def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(
            "not_utf8", f"invalid UTF-8 byte 0x{data[e.start]:02x} at byte offset {e.start}"
        ) from None


def _jsonl_records(text: str, source: str) -> Iterator:
    index = -1
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        index += 1
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            yield index, BadLine(f"line {lineno} column {e.colno}: {e.msg}", line)
    if index < 0:
        raise FileError("no_records", "the file holds no JSON lines")


def _parquet_rows(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise FileError("bad_parquet", str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def type_name(value) -> str:
    return {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)

