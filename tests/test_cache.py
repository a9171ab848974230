"""`chatsft.cache`: every entry is checked against its own manifest before it is mapped (truncated, empty,
swapped, altered and unlisted files are encoded again with a notice, never a traceback or silent training on
other data); one process per cache folder encodes while the others wait; data-file fingerprints are
remembered; a hit reads no data yet keeps the read policy and the rejects file."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import pytest

from chatsft import cache
from chatsft.data import build_datasets
from chatsft.encode import Encoder
from chatsft.errors import DataError
from chatsft.records import ReadPolicy
from chatsft.templates import VICUNA


def records(n, prefix="r"):
    return [
        {
            "id": f"{prefix}{i}",
            "conversations": [
                {"from": "human", "value": f"Question {i}?"},
                {"from": "gpt", "value": f"Answer {i}."},
            ],
        }
        for i in range(n)
    ]


def rows(dataset):
    return [(ex["id"], list(ex["input_ids"]), list(ex["labels"])) for ex in dataset]


def build(encoder, path, root, **kwargs):
    return build_datasets(encoder, [str(path)], cache_dir=root, num_workers=1, **kwargs)


@pytest.fixture
def setup(bpe_tokenizer, write_file, tmp_path):
    path = write_file("train.json", records(40))
    encoder = Encoder(VICUNA, bpe_tokenizer)
    first = build(encoder, path, tmp_path / "cache")
    first.expected = rows(first.train)  # read before the test damages the file this dataset maps
    return encoder, path, tmp_path / "cache", first


def damage_train(entry, how, other=None):
    arrow = entry / "train.arrow"
    data = arrow.read_bytes()
    if how == "truncated":
        arrow.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        arrow.write_bytes(b"")
    elif how == "flipped":  # same size, one byte changed far from the start
        i = len(data) * 3 // 4
        arrow.write_bytes(data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :])
    elif how == "swapped":  # another data set's (valid) Arrow file
        shutil.copyfile(other / "train.arrow", arrow)
    elif how == "no manifest":
        (entry / "manifest.json").unlink()
    elif how == "bad manifest":
        (entry / "manifest.json").write_text("{not json")
    elif how == "edited manifest":  # still valid JSON, one count changed: only its own checksum tells
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["audits"]["train"]["tokens"] += 1
        (entry / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "how", ["truncated", "empty", "flipped", "swapped", "no manifest", "bad manifest", "edited manifest"]
)
def test_a_damaged_entry_is_encoded_again_with_a_notice(how, setup, write_file, bpe_tokenizer, tmp_path):
    encoder, path, root, first = setup
    entry = first.cache_paths[0]
    other = build(encoder, write_file("other.json", records(64, prefix="o")), tmp_path / "other-cache")
    damage_train(entry, how, other.cache_paths[0])
    why = _why(how, entry, json.loads((other.cache_paths[0] / "manifest.json").read_text()))
    again = build(encoder, path, root)
    assert again.cache_hit is False and again.cache_paths == [entry]
    assert [n for n in again.notices if " is damaged " in n] == [
        f"the cache entry {entry} is damaged ({why}): encoding it again"
    ]
    assert rows(again.train) == first.expected and len(again.train) == 40
    assert build(encoder, path, root).cache_hit is True  # mended


def _why(how, entry, other_manifest):
    if how in ("no manifest", "bad manifest"):
        return "its manifest is missing or unreadable"
    if how == "edited manifest":
        return "its manifest does not match its own checksum"
    size = json.loads((entry / "manifest.json").read_text())["sets"]["train"]["bytes"]
    now = (entry / "train.arrow").stat().st_size
    assert how != "swapped" or now == other_manifest["sets"]["train"]["bytes"] != size
    return {
        "truncated": f"train.arrow has {now} bytes, its manifest says {size}",
        "empty": f"train.arrow has 0 bytes, its manifest says {size}",
        "flipped": "train.arrow does not match its manifest's checksum",
        "swapped": f"train.arrow has {now} bytes, its manifest says {size}",
    }[how]


def test_rows_are_checked_against_the_manifest(setup):
    """A manifest whose file checksum holds but whose row count does not (edited by hand, or written by a
    buggy version) is refused too."""
    encoder, path, root, first = setup
    entry = first.cache_paths[0]
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["sets"]["train"]["rows"] = 20000
    del manifest[cache.SELF_CHECKSUM]
    manifest[cache.SELF_CHECKSUM] = cache.manifest_checksum(manifest)  # sealed again, as a buggy writer would
    (entry / "manifest.json").write_text(json.dumps(manifest))
    again = build(encoder, path, root)
    assert any("train.arrow has 40 rows, its manifest says 20000" in n for n in again.notices)
    assert again.cache_hit is False and len(again.train) == 40


def test_a_hit_reads_no_data_but_keeps_the_policy_and_the_rejects(bpe_tokenizer, write_file, tmp_path):
    recs = records(10)
    recs[3]["conversations"][1]["value"] = " "
    path = write_file("train.json", recs)
    encoder = Encoder(VICUNA, bpe_tokenizer)
    rejects = tmp_path / "out" / "rejected.jsonl"
    first = build(encoder, path, tmp_path / "c", policy=ReadPolicy(rejects_path=str(rejects)))
    assert [json.loads(line)["id"] for line in rejects.read_text().splitlines()] == ["r3"]
    rejects.unlink()
    hit = build(encoder, path, tmp_path / "c", policy=ReadPolicy(rejects_path=str(rejects)))
    assert hit.cache_hit is True and hit.notices[0] == first.notices[0]
    assert [json.loads(line)["id"] for line in rejects.read_text().splitlines()] == ["r3"]
    with pytest.raises(DataError, match=r"r3\) turn 1: empty_content: .* \(--strict stops"):
        build(encoder, path, tmp_path / "c", policy=ReadPolicy(strict=True))
    with pytest.raises(DataError, match="1 of 10 records were rejected, more than --max_invalid_ratio 0.05"):
        build(encoder, path, tmp_path / "c", policy=ReadPolicy(max_invalid_ratio=0.05))


def test_file_fingerprints_are_remembered_until_the_file_changes(setup, monkeypatch):
    encoder, path, root, _ = setup
    hashed = []
    digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p: hashed.append(p) or digest(p))
    assert build(encoder, path, root).cache_hit is True and hashed == []
    path.write_text(path.read_text())  # same bytes, written again: hashed again, same entry
    assert build(encoder, path, root).cache_hit is True and hashed == [str(path)]


def test_a_large_data_file_is_announced_while_it_is_hashed_once(tmp_path, monkeypatch, caplog):
    import hashlib
    import logging

    data = tmp_path / "big.jsonl"
    data.write_bytes(b"x" * 1000)
    monkeypatch.setattr(cache, "HASH_NOTICE_BYTES", 1000)
    with caplog.at_level(logging.INFO, logger="chatsft"):
        assert cache.file_fingerprint(data, tmp_path / "c") == hashlib.sha256(b"x" * 1000).hexdigest()
        cache.file_fingerprint(data, tmp_path / "c")  # remembered: no second notice
    assert caplog.messages == [f"hashing {data} (0.0 GB) to find its cache entry; later runs remember it"]
    monkeypatch.setattr(cache, "HASH_NOTICE_BYTES", 1001)
    caplog.clear()
    data.write_bytes(b"y" * 1000)
    with caplog.at_level(logging.INFO, logger="chatsft"):
        cache.file_fingerprint(data, tmp_path / "c")
    assert caplog.messages == []


def test_a_damaged_fingerprint_memo_is_hashed_again_not_believed(tmp_path, monkeypatch):
    import hashlib

    data, root = tmp_path / "d.jsonl", tmp_path / "c"
    data.write_bytes(b"{}\n")
    right = hashlib.sha256(b"{}\n").hexdigest()
    hashed = []
    digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p: hashed.append(p) or digest(p))
    assert cache.file_fingerprint(data, root) == right and len(hashed) == 1
    memo = root / "fingerprints.json"
    text = memo.read_text()
    memo.write_text(text.replace(right, right[:-1] + ("0" if right[-1] != "0" else "1")))  # one digit flipped
    assert cache.file_fingerprint(data, root) == right and len(hashed) == 2
    assert cache.file_fingerprint(data, root) == right and len(hashed) == 2  # the memo was mended
    memo.write_text(json.dumps(json.loads(memo.read_text())["fingerprints"]))  # no checksum (an older memo)
    assert cache.file_fingerprint(data, root) == right and len(hashed) == 3
    memo.write_text("[1, 2")  # not JSON
    assert cache.file_fingerprint(data, root) == right and len(hashed) == 4


def _build_in_child(args):
    encoder, path, root = args
    split = build(encoder, path, root)
    return split.cache_hit, rows(split.train)


def test_concurrent_processes_encode_once(bpe_tokenizer, write_file, tmp_path):
    """Four processes start at once on an empty cache: one encodes, three wait on the lock and load it."""
    path = write_file("train.json", records(300))
    encoder = Encoder(VICUNA, bpe_tokenizer)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_build_in_child, [(encoder, path, tmp_path / "c")] * 4)
    assert sorted(hit for hit, _ in results) == [False, True, True, True]
    assert all(r == results[0][1] for _, r in results) and len(results[0][1]) == 300
    assert [p.name for p in (tmp_path / "c").iterdir() if p.is_dir()] == [p.name for p in _entries(tmp_path)]


def _entries(tmp_path):
    return [p for p in (tmp_path / "c").iterdir() if p.is_dir() and (p / "manifest.json").is_file()]


def test_lock_names_its_holder(tmp_path):
    with cache.locked(tmp_path / "entry"):
        assert (tmp_path / "entry.lock").read_text() == f"host {os.uname().nodename} pid {os.getpid()}\n"
