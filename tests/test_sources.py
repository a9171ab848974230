"""`chatsft.sources`: records read one at a time from JSON Lines, JSON arrays, parquet, folders of shards and
`datasets` folders; the file-level errors of big files; Hub names offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from chatsft.records import read_conversations
from chatsft.sources import FileError, iter_records, shards


def rec(i, reply="a"):
    return {
        "id": f"r{i}",
        "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": reply}],
    }


def test_jsonl_splits_on_newline_only(write_file):
    """U+2028, U+2029 and U+0085 are valid raw inside JSON strings (`json.dumps(ensure_ascii=False)` writes
    them raw): `str.splitlines` used to cut such a line in two bad_json_line records."""
    replies = ["line\u2028separator", "para\u2029graph", "next\u0085line", "form\x0cfeed\x1d"]
    text = "".join(json.dumps(rec(i, r), ensure_ascii=False) + "\n" for i, r in enumerate(replies))
    path = write_file("odd.jsonl", text.encode("utf-8"))
    convs, report = read_conversations([path])
    assert report.records_read == 4 and report.rejected_total == 0
    assert [c.messages[-1]["content"] for c in convs] == replies


def test_jsonl_crlf_and_bad_utf8_offset(write_file):
    path = write_file("crlf.jsonl", (json.dumps(rec(0)) + "\r\n" + json.dumps(rec(1)) + "\r\n").encode())
    assert [c.id for c in read_conversations([path])[0]] == ["r0", "r1"]
    good = (json.dumps(rec(0)) + "\n").encode()
    path = write_file("bad.jsonl", good + b'{"id": "\xff"}\n')
    _, report = read_conversations([path])
    assert report.accepted == 1
    assert report.file_errors[0].detail == f"invalid UTF-8 byte 0xff at byte offset {len(good) + 8}"


def test_json_array_is_read_incrementally(write_file):
    import ijson

    assert ijson.backend == "yajl2_c"  # the C backend: the pure-Python one is 30x slower
    path = write_file("a.json", [rec(i) for i in range(3)])
    items = iter_records(str(path))
    assert next(items) == (0, rec(0))  # the first record comes before the rest is parsed
    assert [i for i, _ in items] == [1, 2]
    floats = write_file("f.json", [{**rec(0), "score": 0.5}])
    assert next(iter_records(str(floats)))[1]["score"] == 0.5 and isinstance(
        next(iter_records(str(floats)))[1]["score"], float
    )  # not Decimal: rejected records must stay JSON-serialisable


def test_big_file_syntax_error_names_the_record(write_file, monkeypatch):
    """Above EXACT_ERRORS_BELOW the file is not parsed again whole: the message names the last good record."""
    import chatsft.sources as sources

    text = json.dumps([rec(0), rec(1)])[:-1] + ",,]"
    path = write_file("broken.json", text)
    _, report = read_conversations([path])  # small: exact position, after the two records were read
    assert report.accepted == 2 and report.file_errors[0].reason == "bad_json"
    assert report.file_errors[0].detail.endswith("at line 1 column " + str(len(text) - 1))
    monkeypatch.setattr(sources, "EXACT_ERRORS_BELOW", 10)
    _, report = read_conversations([path])
    assert (
        report.file_errors[0].detail
        == "parse error: unallowed token at this point in JSON text, after record 1"
    )


def test_parquet_by_row_group(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([rec(i) for i in range(2500)]), tmp_path / "d.parquet", row_group_size=1000
    )
    items = iter_records(str(tmp_path / "d.parquet"))
    assert next(items) == (0, rec(0))
    assert sum(1 for _ in items) == 2499


def test_folder_of_shards_and_saved_dataset(tmp_path, write_file):
    import datasets

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps(rec(2)) + "\n")
    (folder / "a.json").write_text(json.dumps([rec(0), rec(1)]))
    (folder / "notes.txt").write_text("not data")
    assert shards(str(folder)) == [str(folder / "a.json"), str(folder / "b.jsonl")]
    convs, report = read_conversations([folder])
    assert [c.id for c in convs] == ["r0", "r1", "r2"] and report.files == shards(str(folder))
    assert convs[2].source == str(folder / "b.jsonl")

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([rec(i) for i in range(3)]).save_to_disk(str(saved))
    assert shards(str(saved)) == [str(saved)]
    convs, report = read_conversations([saved])
    assert [c.id for c in convs] == ["r0", "r1", "r2"] and report.rejected_total == 0
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([rec(5)])}).save_to_disk(str(both))
    assert [c.id for c in read_conversations([both])[0]] == ["r5"]

    empty = tmp_path / "empty"
    empty.mkdir()
    _, report = read_conversations([empty])
    assert (
        str(report.file_errors[0])
        == f"{empty}: bad_dataset_folder: the folder holds no .json, .jsonl, .parquet files"
    )


def test_hub_name_offline_is_one_line(tmp_path):
    """A name that is no local path is tried on the Hub; offline: one line naming it, exit 2, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "chatsft", "check", "someorg/some-chats"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        "chatsft check: error: someorg/some-chats: hub_unavailable: not a local file or folder, and the Hub "
        "dataset 'someorg/some-chats' cannot be loaded ("
    )


def test_missing_path_that_is_no_hub_name(tmp_path):
    with pytest.raises(FileError) as err:
        list(iter_records(str(tmp_path / "missing.json")))
    assert err.value.reason == "file_missing"


def test_prescan_depth_and_lone_surrogates_at_every_block_boundary():
    """The pass before ijson: nesting beyond MAX_DEPTH refused (ijson's memory grows with its square),
    brackets and escapes inside strings ignored, lone surrogate escapes found (yajl2_c would read them as
    "?"), with every cut a block boundary can make."""
    import io

    from chatsft.sources import MAX_DEPTH, _prescan

    lone = [b'["\\ud800"]', b'["\\udc00 x"]', b'["a\\ud83d"]']
    fine = [b'["\\ud83d\\ude00"]', b'["a\\\\", "\\\\\\"[[["]', b'[{"a": "[[[["}]']
    for text, want in [(t, True) for t in lone] + [(t, False) for t in fine]:
        for size in (1, 2, 3, 5, 7, 1 << 20):
            assert _prescan(io.BytesIO(text), block_size=size) is want, (text, size)
    for depth in (MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1):
        for size in (1, 7, 1 << 20):
            text = b"[" * depth + b"]" * depth
            if depth <= MAX_DEPTH:
                assert _prescan(io.BytesIO(text), block_size=size) is False
            else:
                with pytest.raises(FileError, match=f"nested more than {MAX_DEPTH} levels deep"):
                    _prescan(io.BytesIO(text), block_size=size)
    hidden = (
        b'[{"a": "' + b"}" * 3000 + b'", "b": ' + b"[" * 1200 + b"]" * 1200 + b"}]"
    )  # closers in a string
    quoted = b'["' + b"[" * 5000 + b'\\"' + b"[" * 5000 + b'"]'  # openers in a string
    for size in (1, 3, 64, 1 << 20):
        with pytest.raises(FileError):
            _prescan(io.BytesIO(hidden), block_size=size)
        assert _prescan(io.BytesIO(quoted), block_size=size) is False
