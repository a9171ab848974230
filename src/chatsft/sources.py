"""Read raw records from conversation sources, one at a time: .json (a list, or JSON Lines saved as .json),
.jsonl and .parquet files, folders of such shards, `datasets.save_to_disk` folders, and Hub dataset names.

`iter_records(source)` yields `(index, raw record)` per record, and `BadLine` for a JSON Lines line that does
not parse (a record-level problem: the other lines are still read); a source that cannot be read at all raises
`FileError` with a stable reason code (`FILE_REASONS`), possibly after the records before the damage were
yielded. Validation of what a record holds is `chatsft.records`'.

Nothing is read whole, so memory does not grow with the file: JSON Lines line by line (split on "\\n" only:
`str.splitlines` would also split on U+2028/U+0085, which are valid raw inside JSON strings), a JSON array
with `ijson`'s C backend (yajl2_c; measured faster than `json.loads` on the whole text: 0.42 s vs 0.76 s for
120 MB, and the pure-Python backend 30x slower), parquet by row group, `datasets` folders batch by batch from
the memory-mapped Arrow files. When the incremental parser meets a syntax error in a file of at most
`EXACT_ERRORS_BELOW` bytes, the file is parsed again whole to name the line and column; a larger one names the
record after which the damage starts. (Over 300 lines: one reader per kind of source, each streaming.)
"""

from __future__ import annotations

import codecs
import json
import re
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
    "bad_dataset_folder": "a `datasets` folder or a folder of shards cannot be read",
    "hub_unavailable": "a Hub dataset name that cannot be loaded (offline, or no such dataset)",
}
SUFFIXES = (".json", ".jsonl", ".parquet")
EXACT_ERRORS_BELOW = 64 << 20
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class BadLine:
    """A JSON Lines line that does not parse: rejected as a record, the other lines still read."""

    detail: str
    line: str


class FileError(Exception):
    def __init__(self, reason: str, detail: str, position: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.position = reason, detail, position


def shards(source: str) -> list[str]:
    """The files a source stands for: itself, or a folder's .json/.jsonl/.parquet files in name order (a
    `datasets.save_to_disk` folder, or a Hub name, is one source of its own and stays as given)."""
    path = Path(source)
    if not path.is_dir() or is_saved_dataset(path):
        return [source]
    found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not found:
        raise FileError("bad_dataset_folder", f"the folder holds no {', '.join(SUFFIXES)} files")
    return found


def is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def is_hub_name(source: str) -> bool:
    return not Path(source).exists() and bool(_HUB_NAME.match(source)) and Path(source).suffix not in SUFFIXES


class Position:
    """How far reading has got into the file being read, in bytes: `tell` is the open file's (the line reader
    and ijson read in blocks, so it runs a block ahead of the records), None until a JSON or JSON Lines file
    is open (parquet is read by row group, folders and the Hub through `datasets`)."""

    tell = None


def iter_records(source: str, where: Position | None = None) -> Iterator:
    path = Path(source)
    if path.is_dir() and is_saved_dataset(path):
        yield from _dataset_rows(_load_saved(path))
        return
    if is_hub_name(source):
        yield from _dataset_rows(_load_hub(source))
        return
    suffix = path.suffix.lower()
    if not path.exists():
        raise FileError("file_missing", "no such file")
    if suffix not in SUFFIXES:
        raise FileError(
            "unknown_format", f"expected .json, .jsonl or .parquet, got {suffix or 'no extension'!r}"
        )
    try:
        f = open(path, "rb")  # closed by the `with` below, also when the caller stops early
    except OSError as e:
        raise FileError("file_unreadable", e.strerror or str(e)) from None
    with f:
        first = _first_byte(f)
        if where is not None and suffix != ".parquet":
            where.tell = f.tell
        if suffix == ".parquet":
            yield from _parquet_rows(path)
        elif suffix == ".jsonl":
            yield from _jsonl_records(f)
        elif first == b"[":
            yield from _json_array(f, path)
        elif first == b"{" and _holds_lines(f):
            yield from _jsonl_records(f)  # JSON Lines saved as .json: common, and unambiguous
        else:
            _not_an_array(path)


def _first_byte(f) -> bytes:
    """The first byte that is not whitespace (after a UTF-8 byte-order mark); `f` is left at the start of the
    content (after the mark)."""
    start = 3 if f.read(3) == b"\xef\xbb\xbf" else 0
    f.seek(start)
    empty = True
    while block := f.read(1 << 16):
        empty = False
        stripped = block.lstrip()
        if stripped:
            f.seek(start)
            return stripped[:1]
    raise FileError("file_empty", "the file is empty" if empty else "the file holds only whitespace")


def _holds_lines(f) -> bool:
    """Whether a .json file starting with `{` is JSON Lines: its first line is a whole value and another
    non-blank line follows (a single object is refused as not a list, as before)."""
    start = f.tell()
    try:
        json.loads(f.readline())
        more = any(line.strip() for line in iter(f.readline, b""))
    except (json.JSONDecodeError, UnicodeDecodeError):
        more = False
    f.seek(start)
    return more


def _jsonl_records(f) -> Iterator:
    index, offset = -1, f.tell()
    decoder = codecs.getincrementaldecoder("utf-8")()
    for lineno, raw in enumerate(f, start=1):  # a binary file splits on b"\n" only
        try:
            line = decoder.decode(raw, final=True)
        except UnicodeDecodeError as e:
            raise FileError(
                "not_utf8", f"invalid UTF-8 byte 0x{raw[e.start]:02x} at byte offset {offset + e.start}"
            ) from None
        offset += len(raw)
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        index += 1
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            yield index, BadLine(f"line {lineno} column {e.colno}: {e.msg}", line)
        except RecursionError:
            yield index, BadLine(f"line {lineno}: nested too deeply", line[:200])
    if index < 0:
        raise FileError("no_records", "the file holds no JSON lines")


def _json_array(f, path: Path) -> Iterator:
    import ijson

    # yajl2_c reads the escape of a lone surrogate ("\\ud800") as "?", silently; the Python backend keeps it,
    # so that validation rejects the record (`bad_unicode`) rather than training on altered text
    backend = ijson.get_backend("python") if _prescan(f) else ijson
    index = -1
    try:
        for index, item in enumerate(backend.items(f, "item", use_float=True)):
            yield index, item
    except (ijson.JSONError, UnicodeDecodeError) as e:
        _syntax_error(path, e, index + 1)
    if index < 0:
        raise FileError("no_records", "the file holds an empty list")


MAX_DEPTH = 1000  # JSON nesting a .json file may have (a record nests a few levels; json.loads allows ~990)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F]")
_HIGH = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_STRING = re.compile(rb'"[^"]*"')
_ESCAPE = re.compile(rb"\\.", re.DOTALL)


def _prescan(f, block_size: int = 1 << 20) -> bool:
    """One pass over a JSON array file, block by block, before ijson reads it; `f` is left where it was.

    Raises `bad_json` when the nesting goes deeper than `MAX_DEPTH`: ijson keeps a path string per level, so
    memory grows with the square of the depth (10^5 levels took all memory). Returns whether the file may
    spell a lone surrogate escape: surrogate escapes not all in high-low pairs (a false alarm, a pair cut by a
    block boundary, only costs the slower parser). Brackets inside strings do not count: escapes are removed,
    then all but quotes and brackets, then the strings (about 15% of ijson's time on FastChat's sample)."""
    start, carry, depth, inside, lone, offset = f.tell(), b"", 0, False, False, 0
    while True:
        block = f.read(block_size)
        data = carry + block
        cut = data.rfind(b"\\", max(0, len(data) - 12)) if block else -1
        if cut >= 0:  # the next block starts at a backslash run: no escape, no surrogate pair is cut
            while cut > 0 and data[cut - 1] == 0x5C:
                cut -= 1
            if cut >= 6 and _HIGH.match(data, cut - 6):
                cut -= 6
            data, carry = data[:cut], data[cut:]
        else:
            carry = b""
        if not lone and _SURROGATE.search(data):
            lone = len(_SURROGATE.findall(data)) != 2 * len(_PAIR.findall(data))
        bare = (_ESCAPE.sub(b"", data) if b"\\" in data else data).translate(None, _NOT_STRUCTURE)
        bare = _STRING.sub(b"", (b'"' if inside else b"") + bare.replace(b'""', b""))
        inside = b'"' in bare  # an unclosed string runs into the next block
        bare = bare.split(b'"', 1)[0].translate(bytes.maketrans(b"{}", b"[]"))
        nested = b"[" * depth + bare
        # each pass removes the innermost pairs: the nesting is the number of passes (an upper bound)
        passes = 0
        while b"[]" in nested and passes <= MAX_DEPTH:
            nested, passes = nested.replace(b"[]", b""), passes + 1
        depth = len(nested) - len(nested.rstrip(b"["))  # the brackets still open
        if passes + depth > MAX_DEPTH:
            raise FileError(
                "bad_json",
                f"nested more than {MAX_DEPTH} levels deep, within bytes {offset}-{offset + len(data)}",
            )
        offset += len(data)
        if not block:
            break
    f.seek(start)
    return lone


def _syntax_error(path: Path, error: Exception, read: int):
    """Raise the FileError for a JSON file the incremental parser stopped in, as exactly as is affordable."""
    offset = _bad_utf8_offset(path)
    if offset is not None:
        with open(path, "rb") as f:
            f.seek(offset)
            byte = f.read(1)[0]
        raise FileError("not_utf8", f"invalid UTF-8 byte 0x{byte:02x} at byte offset {offset}") from None
    if path.stat().st_size <= EXACT_ERRORS_BELOW:
        _not_an_array(path)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise FileError("bad_json", f"{first}, after record {read - 1}" if read else first) from None


def _bad_utf8_offset(path: Path) -> int | None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        else:
            offset = 3
        while block := f.read(1 << 20):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return offset + e.start
            offset += len(block)
    return None


def _not_an_array(path: Path):
    """Raise why a .json file is not a list of records. Parses the whole file (only ever for a file that is
    already refused and small, or whose top level is not a list, so nothing of it is trained on)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(
            "not_utf8", f"invalid UTF-8 byte 0x{data[e.start]:02x} at byte offset {e.start}"
        ) from None
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (a trailing comma?)" if text[: e.pos].rstrip().endswith(",") else ""
        raise FileError(
            "bad_json", f"{e.msg}{hint} at line {e.lineno} column {e.colno}", f"{e.lineno}:{e.colno}"
        ) from None
    except RecursionError:
        raise FileError("bad_json", "nested too deeply to read") from None
    if isinstance(top, list):  # parsed whole but not incrementally: not expected; say what the parser said
        raise FileError("bad_json", "the incremental JSON parser could not read the list")
    raise FileError(
        "not_a_list", f"the top level is a JSON {type_name(top)}; a .json file must hold a list of records"
    )


def _parquet_rows(path: Path) -> Iterator:
    import pyarrow.parquet as pq

    index = -1
    try:
        table = pq.ParquetFile(path)
        for batch in table.iter_batches(batch_size=1024):  # one row group's slice at a time
            for row in batch.to_pylist():
                index += 1
                yield index, row
    except FileError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise FileError("bad_parquet", _first_line(e)) from None
    if index < 0:
        raise FileError("no_records", "the parquet file has no rows")


def _load_saved(path: Path):
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:
        raise FileError("bad_dataset_folder", _first_line(e)) from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise FileError(
                "bad_dataset_folder", f"a DatasetDict without a 'train' split (splits: {', '.join(data)})"
            )
        data = data["train"]
    return data


def _load_hub(source: str):
    """A Hub dataset through `datasets.load_dataset` (`org/name` or `org/name:split`, default split train).
    Downloaded into the `datasets` cache, then memory-mapped like a saved folder (no `streaming`: the encoded
    cache is written in one pass anyway, and a re-run then reads nothing from the network)."""
    import datasets

    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise FileError(
            "hub_unavailable",
            f"not a local file or folder, and the Hub dataset {name!r} cannot be loaded "
            f"({type(e).__name__}: {_first_line(e)[:200]})",
        ) from None


def _dataset_rows(data) -> Iterator:
    if len(data) == 0:
        raise FileError("no_records", "the dataset has no rows")
    index = -1
    for batch in data.iter(batch_size=1024):
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            index += 1
            yield index, dict(zip(names, values, strict=True))


def fingerprint_of(source: str) -> str | None:
    """What identifies a source that is not a file of its own: a `datasets` fingerprint (saved folders and Hub
    datasets), else None (the caller hashes the file)."""
    path = Path(source)
    if path.is_dir() and is_saved_dataset(path):
        return _load_saved(path)._fingerprint
    if is_hub_name(source):
        return _load_hub(source)._fingerprint
    return None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
