"""`chatsft.data.build_datasets`: the eager Arrow cache (hits, every kind of miss), lazy/eager parity in
every loss mode, the seeded train/eval split, multi-worker encoding, and where rejected records go. Small
files written by each test; real tokenizers from conftest (byte-level BPE, Mistral-7B SentencePiece)."""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import time

import pytest

from chatsft import cache, data
from chatsft.data import LazyDataset, build_datasets
from chatsft.encode import IGNORE_INDEX, LOSS_MODES, Encoder, _label_by_segment, _label_by_token
from chatsft.errors import ChatsftError, ConfigError, DataError
from chatsft.mixture import DataSource, parse_source, uniform
from chatsft.records import Conversation, ReadPolicy, read_conversations
from chatsft.templates import BUILTINS, VICUNA, Segment, render

QUESTIONS = ["What is the capital of France?", "Hello! How are you today?", "你好，世界。", "Why?", "2+2?"]
ANSWERS = ["The capital of France is Paris.", "I am fine, thank you.", "Привет, мир! 🙂", "Because.", "4"]


def records(n: int, turns: int = 2, prefix: str = "r") -> list[dict]:
    """n ShareGPT records, 1..turns exchanges each (varied), deterministic."""
    out = []
    for i in range(n):
        conv = []
        for t in range(1 + i % turns):
            conv += [
                {"from": "human", "value": f"{QUESTIONS[(i + t) % 5]} ({i}.{t})"},
                {"from": "gpt", "value": ANSWERS[(i + 2 * t) % 5]},
            ]
        out.append({"id": f"{prefix}{i}", "conversations": conv})
    return out


def rows(dataset) -> list[tuple]:
    """(id, input_ids, labels) of every example, from an eager (Arrow) or lazy dataset."""
    return [
        (ex["id"], list(ex["input_ids"]), list(ex["labels"]))
        for ex in (dataset[i] for i in range(len(dataset)))
    ]


def build(encoder, paths, tmp_path, **kwargs):
    kwargs.setdefault("num_workers", 1)
    return build_datasets(encoder, [str(p) for p in paths], cache_dir=tmp_path / "cache", **kwargs)


# ---- (a) cache hit ----


def test_second_call_is_a_cache_hit_with_identical_examples(bpe_tokenizer, write_file, tmp_path):
    path = write_file("train.json", records(12, turns=3))
    encoder = Encoder(VICUNA, bpe_tokenizer, "assistant_turns", 2048)
    first = build(encoder, [path], tmp_path)
    second = build(encoder, [path], tmp_path)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert any("encoded and cached: 12" in n for n in first.notices)
    assert any("loaded from cache: 12" in n for n in second.notices)
    assert first.cache_paths == second.cache_paths and (first.cache_paths[0] / "train.arrow").is_file()
    assert rows(first.train) == rows(second.train) and len(first.train) == 12
    assert first.train_audit.to_dict() == second.train_audit.to_dict()
    assert first.eval is None and second.eval is None
    # the first example is the encoder's own output for the first record
    expected = encoder.encode(read_conversations([path])[0][0]).examples[0]
    assert rows(second.train)[0] == (expected.id, expected.input_ids, expected.labels)
    assert second.sample.id == "r0"


def test_a_fresh_encoder_equal_in_every_input_hits_the_cache(bpe_tokenizer, write_file, tmp_path):
    path = write_file("train.json", records(4))
    build(Encoder(VICUNA, bpe_tokenizer), [path], tmp_path)
    again = build(Encoder(VICUNA, copy.deepcopy(bpe_tokenizer)), [path], tmp_path)
    assert again.cache_hit is True


# ---- (b) every kind of miss re-encodes ----


def test_each_input_that_changes_the_examples_is_a_cache_miss(
    bpe_tokenizer, write_file, tmp_path, monkeypatch
):
    path = write_file("train.json", records(6, turns=2))
    base = Encoder(VICUNA, bpe_tokenizer, "assistant_turns", 2048)
    reference = build(base, [path], tmp_path)
    seen = {reference.cache_paths[0]}

    def miss(encoder, paths=(path,)):
        split = build(encoder, paths, tmp_path)
        assert split.cache_hit is False, split.notices
        assert split.cache_paths[0] not in seen
        seen.add(split.cache_paths[0])
        return rows(split.train)

    # tokenizer: one more (added) token changes the fingerprint
    grown = copy.deepcopy(bpe_tokenizer)
    grown.add_tokens(["<extra_token>"])
    assert miss(Encoder(VICUNA, grown, "assistant_turns", 2048)) == rows(reference.train)
    # template: another system prompt shows up in the examples
    other = dataclasses.replace(VICUNA, default_system="Be brief.")
    assert build(base, [path], tmp_path).cache_hit is True  # the original's cache is still there
    assert all(
        ids[:6] != r[1][:6]
        for (_, ids, _), r in zip(miss(Encoder(other, bpe_tokenizer)), rows(reference.train))
    )
    # loss mode: only the last reply trains
    last = miss(Encoder(VICUNA, bpe_tokenizer, "last_response", 2048))
    assert [r[1] for r in last] == [r[1] for r in rows(reference.train)]
    assert any(a[2] != b[2] for a, b in zip(last, rows(reference.train)))
    # model_max_length: the examples are cut
    limit = max(len(r[1]) for r in rows(reference.train)) - 3
    short = miss(Encoder(VICUNA, bpe_tokenizer, "assistant_turns", limit))
    assert max(len(r[1]) for r in short) == limit and len(short) == len(reference.train)
    # encoder version: same examples, encoded again
    monkeypatch.setattr(cache, "ENCODER_VERSION", cache.ENCODER_VERSION + "-next")
    assert miss(base) == rows(reference.train)
    monkeypatch.undo()
    # data file contents: same path, one reply changed
    changed = records(6, turns=2)
    changed[3]["conversations"][1]["value"] = "A different reply."
    write_file("train.json", changed)
    new_rows = miss(base)
    assert new_rows[:3] == rows(reference.train)[:3] and new_rows[3] != rows(reference.train)[3]
    assert [r[0] for r in new_rows] == [r[0] for r in rows(reference.train)]


def test_split_and_seed_are_part_of_the_key(bpe_tokenizer, write_file, tmp_path):
    path = write_file("train.json", records(10))
    encoder = Encoder(VICUNA, bpe_tokenizer)
    a = build(encoder, [path], tmp_path, train_ratio=0.8, seed=1)
    b = build(encoder, [path], tmp_path, train_ratio=0.8, seed=2)
    c = build(encoder, [path], tmp_path, train_ratio=0.8, seed=1)
    assert (a.cache_hit, b.cache_hit, c.cache_hit) == (False, False, True)
    assert len(a.cache_paths) == 1 and a.cache_paths == c.cache_paths != b.cache_paths


# ---- (c) lazy == eager ----


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_lazy_and_eager_give_identical_examples(mode, mistral_tokenizer, write_file, tmp_path):
    path = write_file("train.json", records(9, turns=3))
    encoder = Encoder(VICUNA, mistral_tokenizer, mode, 2048)
    eager = build(encoder, [path], tmp_path)
    lazy = build(encoder, [path], tmp_path, lazy=True)
    assert isinstance(lazy.train, LazyDataset) and rows(lazy.train) == rows(eager.train)
    # the audit exists in every mode: lazy takes the eager entry's, or encodes once without writing examples
    assert lazy.train_audit.to_dict() == eager.train_audit.to_dict() and lazy.cache_hit is True
    alone = build(encoder, [path], tmp_path / "lazy-only", lazy=True)
    assert alone.cache_hit is False and alone.train_audit.to_dict() == eager.train_audit.to_dict()
    assert not (alone.cache_paths or list((tmp_path / "lazy-only" / "cache").glob("*/train.arrow")))
    n_replies = sum(1 + i % 3 for i in range(9))
    assert len(eager.train) == (n_replies if mode == "split_turns" else 9)
    if mode == "split_turns":
        assert [r[0] for r in rows(eager.train)][:3] == ["r0#0", "r1#0", "r1#1"]
    trained = [sum(label != IGNORE_INDEX for label in r[2]) for r in rows(eager.train)]
    assert all(trained)


def test_lazy_replaces_an_example_with_nothing_to_train_by_the_next(
    bpe_tokenizer, write_file, tmp_path, caplog
):
    """A known difference: eager drops such an example (and the audit counts it); lazy, which cannot know
    lengths without tokenizing, serves the next usable example in its place and logs the skip."""
    recs = records(3, turns=1)
    recs[1]["conversations"][0]["value"] = "What is the capital of France? " * 20  # the reply is cut off
    path = write_file("train.json", recs)
    convs = read_conversations([path])[0]
    limit = 2 + max(
        len(Encoder(VICUNA, bpe_tokenizer).encode(convs[i]).examples[0].input_ids) for i in (0, 2)
    )
    encoder = Encoder(VICUNA, bpe_tokenizer, "assistant_turns", limit)
    eager = build(encoder, [path], tmp_path)
    assert [r[0] for r in rows(eager.train)] == ["r0", "r2"] and eager.train_audit.dropped == 1
    lazy = build(encoder, [path], tmp_path, lazy=True)
    with caplog.at_level(logging.WARNING, logger="chatsft.data"):
        assert [r[0] for r in rows(lazy.train)] == ["r0", "r2", "r2"]
    assert "skips example r1" in caplog.text


# ---- (d) train/eval split ----


def test_train_ratio_splits_by_conversation_seeded_and_deterministic(bpe_tokenizer, write_file, tmp_path):
    """The side of a conversation is a hash of (seed, file name, id): the same in every run and process, with
    nothing held in memory. The eval share is binomial around 1 - ratio (not the exact count it was when the
    split shuffled a list of every conversation)."""
    path = write_file("train.json", records(20, turns=3))
    encoder = Encoder(VICUNA, bpe_tokenizer, "split_turns")
    split = build(encoder, [path], tmp_path, train_ratio=0.75, seed=7)
    again = build(encoder, [path], tmp_path / "other", train_ratio=0.75, seed=7)
    assert split.cache_hit is False and again.cache_hit is False  # another cache folder: encoded again
    assert rows(split.train) == rows(again.train) and rows(split.eval) == rows(again.eval)
    train_convs = {r[0].split("#")[0] for r in rows(split.train)}
    eval_convs = {r[0].split("#")[0] for r in rows(split.eval)}
    assert not train_convs & eval_convs and train_convs | eval_convs == {f"r{i}" for i in range(20)}
    held_out = {f"r{i}" for i in range(20) if uniform(7, "split", "train.json", f"r{i}") >= 0.75}
    assert eval_convs == held_out and 0 < len(held_out) < 20
    # every example of a conversation lands on its side, in input order
    n_examples = {f"r{i}": 1 + i % 3 for i in range(20)}
    assert len(split.train) == sum(n_examples[c] for c in train_convs)
    order = [int(r[0].split("#")[0][1:]) for r in rows(split.train)]
    assert order == sorted(order)
    assert any(f"{20 - len(held_out)} train, {len(held_out)} eval" in n for n in split.notices)
    assert split.eval_audit.records == len(held_out) and split.train_audit.records == 20 - len(held_out)
    # the seed decides
    other = build(encoder, [path], tmp_path, train_ratio=0.75, seed=8)
    assert {r[0].split("#")[0] for r in rows(other.eval)} != eval_convs
    # the share: 10,000 ids at ratio 0.9 give 1,000 +- 30 (one standard deviation) held out
    share = sum(uniform(3, "split", "f.json", f"id{i}") >= 0.9 for i in range(10_000))
    assert abs(share - 1000) < 4 * 30


def test_no_eval_set_at_ratio_one_and_eval_file_excludes_a_ratio(bpe_tokenizer, write_file, tmp_path):
    path = write_file("train.json", records(5))
    eval_path = write_file("eval.json", records(3, prefix="e"))
    encoder = Encoder(VICUNA, bpe_tokenizer)
    only = build(encoder, [path], tmp_path)
    assert only.eval is None and only.eval_audit is None and len(only.cache_paths) == 1
    with pytest.raises(ConfigError, match="not both"):
        build(encoder, [path], tmp_path, eval_data_path=[str(eval_path)], train_ratio=0.9)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="train_ratio"):
            build(encoder, [path], tmp_path, train_ratio=bad)
    both = build(encoder, [path], tmp_path, eval_data_path=[str(eval_path)])
    assert [r[0] for r in rows(both.eval)] == ["e0", "e1", "e2"] and len(both.train) == 5
    assert (
        both.cache_hit is False
        and build(encoder, [path], tmp_path, eval_data_path=[str(eval_path)]).cache_hit
    )


# ---- (e) several workers ----


def test_two_workers_give_the_single_worker_examples_and_audit_in_input_order(
    bpe_tokenizer, write_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(data, "CHUNK", 3)  # many chunks, so both workers interleave
    recs = records(20, turns=3)
    recs[4]["conversations"][-1]["value"] = "word " * 80  # truncated
    recs[9]["conversations"][0]["value"] = "long question " * 60  # nothing left to train: dropped
    recs[13]["conversations"][2:4] = [{"from": "human", "value": "Par"}, {"from": "gpt", "value": "is"}]
    recs[17]["conversations"][0:2] = [{"from": "human", "value": "Hel"}, {"from": "gpt", "value": "lo!"}]
    path = write_file("train.json", recs)
    glued = dataclasses.replace(
        VICUNA, name="glued", user="{content}", cue="", reply="{content}", default_system=""
    )
    for template in (VICUNA, glued):  # glued: some tokens straddle user/reply, so some records are rejected
        encoder = Encoder(template, bpe_tokenizer, "split_turns", 96)
        one = build(encoder, [path], tmp_path / "w1", num_workers=1)
        two = build(encoder, [path], tmp_path / "w2", num_workers=2)
        assert rows(one.train) == rows(two.train)
        assert one.train_audit.to_dict() == two.train_audit.to_dict()
        audit = two.train_audit
        ids = [r[0] for r in rows(two.train)]
        assert sorted(ids, key=lambda i: (int(i.split("#")[0][1:]), int(i.split("#")[1]))) == ids
        assert audit.records == 20 and audit.examples == len(two.train)
        if template is VICUNA:
            assert audit.truncated >= 1 and audit.dropped >= 1 and not audit.rejected
        else:
            assert audit.rejected.get("token_straddles_boundary", 0) >= 1
            assert audit.first_rejected["token_straddles_boundary"] == next(
                c.id for c in read_conversations([path])[0] if encoder.encode(c).rejected
            )


def test_the_encoding_bar_shows_the_share_of_bytes_read_and_the_conversations(
    bpe_tokenizer, write_file, tmp_path, capsys, monkeypatch
):
    """Local files: a percentage (bytes read of all of them) and a time left. A `datasets` folder, whose
    size in records is not known before reading: the count alone."""
    import datasets

    monkeypatch.setattr(data, "CHUNK", 4)
    a = write_file("a.jsonl", "\n".join(json.dumps(r) for r in records(20, prefix="a")))
    b = write_file("b.json", records(10, prefix="b"))
    enc = Encoder(VICUNA, bpe_tokenizer, "assistant_turns", 256)

    def frames() -> list[str]:
        err = capsys.readouterr().err.replace("\r", "\n")
        return [line.strip() for line in err.split("\n") if line.startswith("encoding")]

    build(enc, [a, b], tmp_path, progress=True, num_workers=2)
    shown = frames()
    assert shown[0].startswith("encoding:   0%|") and shown[-1].startswith("encoding: 100%|")
    assert ", 30 conversations, " in shown[-1] and shown[-1].endswith("/s]")
    datasets.Dataset.from_list(records(6, prefix="d")).save_to_disk(str(tmp_path / "saved"))
    build(enc, [tmp_path / "saved"], tmp_path, progress=True)
    assert frames()[-1].startswith("encoding: 6 conversations [")


def test_a_killed_worker_is_a_one_line_error_and_leaves_no_cache_folder(
    bpe_tokenizer, write_file, tmp_path, monkeypatch
):
    monkeypatch.setattr(data, "CHUNK", 2)
    parent, encode_chunk = os.getpid(), data._encode_chunk

    def killed_in_helper(*args):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        time.sleep(0.02)
        return encode_chunk(*args)

    monkeypatch.setattr(data, "_encode_chunk", killed_in_helper)
    path = write_file("train.json", records(12))
    with pytest.raises(ChatsftError, match=r"^a preprocessing process died \(exit code -9"):
        build(Encoder(VICUNA, bpe_tokenizer), [path], tmp_path, num_workers=2)
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []


def test_a_full_disk_is_a_one_line_error_wherever_it_happens(
    bpe_tokenizer, write_file, tmp_path, monkeypatch
):
    import errno

    monkeypatch.setattr(data, "CHUNK", 2)
    encode_chunk = data._encode_chunk

    def disk_full(*args):
        if args[-1][0] == 3:  # one chunk, in whichever process takes it
            raise OSError(errno.ENOSPC, "No space left on device")
        return encode_chunk(*args)

    monkeypatch.setattr(data, "_encode_chunk", disk_full)
    path = write_file("train.json", records(12))
    for workers in (1, 2):
        with pytest.raises(DataError) as err:
            build(Encoder(VICUNA, bpe_tokenizer), [path], tmp_path, num_workers=workers)
        assert str(err.value) == (
            f"no space left on the device of the preprocessing cache ({tmp_path / 'cache'}): free some, or "
            "point --cache_dir at a larger disk"
        )
        assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []


def test_a_killed_runs_half_written_folder_is_removed_by_the_next_run(bpe_tokenizer, write_file, tmp_path):
    import socket
    import subprocess
    import sys

    path = write_file("train.json", records(6))
    encoder = Encoder(VICUNA, bpe_tokenizer)
    first = build(encoder, [path], tmp_path)
    entry = first.cache_paths[0]
    shutil.rmtree(entry)  # as if never finished: the next run encodes again
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    stale = entry.with_name(f"{entry.name}.tmp-{host}-{int(dead.stdout)}")  # its process has exited
    live = entry.with_name(f"{entry.name}.tmp-{host}-{os.getppid()}")  # a process still running
    other_host = entry.with_name(f"{entry.name}.tmp-elsewhere.example-{int(dead.stdout)}")
    for folder in (stale, live, other_host):
        folder.mkdir()
        (folder / "examples.arrow").write_bytes(b"half")
    assert build(encoder, [path], tmp_path).cache_hit is False
    kept = sorted(p.name for p in entry.parent.iterdir() if p.is_dir())
    assert kept == sorted([entry.name, live.name, other_host.name])


# ---- (f) rejected records ----


def test_rejected_records_go_to_the_policy_rejects_file(bpe_tokenizer, write_file, tmp_path):
    recs = records(8)
    recs[2]["conversations"][1]["value"] = "   "
    recs[5]["conversations"][0]["from"] = "robot"
    path = write_file("train.json", recs)
    eval_recs = records(3, prefix="e")
    eval_recs[1]["conversations"] = []
    eval_path = write_file("eval.json", eval_recs)
    rejects, eval_rejects = tmp_path / "out" / "rejected.jsonl", tmp_path / "out" / "rejected-eval.jsonl"
    split = build(
        Encoder(VICUNA, bpe_tokenizer),
        [path],
        tmp_path,
        eval_data_path=[str(eval_path)],
        policy=ReadPolicy(max_invalid_ratio=0.4, rejects_path=str(rejects)),  # eval: 1 of 3 rejected
    )
    written = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["reason"]) for r in written] == [("r2", "empty_content"), ("r5", "unknown_role")]
    assert written[0]["record"] == recs[2]
    assert [json.loads(line)["reason"] for line in eval_rejects.read_text().splitlines()] == ["no_turns"]
    assert f"8 records from 1 file(s): 6 accepted, 2 rejected (written to {rejects})" in split.notices[0]
    assert [r[0] for r in rows(split.train)] == ["r0", "r1", "r3", "r4", "r6", "r7"]
    assert [r[0] for r in rows(split.eval)] == ["e0", "e2"]
    # too many rejected: the run stops, and the rejects are still written
    again = tmp_path / "again.jsonl"
    with pytest.raises(DataError, match="max_invalid_ratio"):
        build(
            Encoder(VICUNA, bpe_tokenizer),
            [path],
            tmp_path,
            policy=ReadPolicy(max_invalid_ratio=0.1, rejects_path=str(again)),
        )
    assert len(again.read_text().splitlines()) == 2


# ---- the fast labelling build_datasets relies on ----


def test_labels_per_segment_boundary_equal_the_per_token_rule(mistral_tokenizer, bpe_tokenizer):
    """Encoding labels tokens with a few bisections per segment boundary; the result equals the per-token
    reference rule (labels, each trained turn's last token, the first straddling token), and unusual offsets
    (an empty span) send encoding to the per-token rule."""
    convs = [
        Conversation(
            r["id"],
            [
                {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in r["conversations"]
            ],
        )
        for r in records(12, turns=3)
    ]
    convs.append(
        Conversation(
            "ctl",
            [
                {"role": "user", "content": "Say </s> and <s>"},
                {"role": "assistant", "content": "Here: </s><s> done"},
            ],
        )
    )
    convs.append(
        Conversation("glue", [{"role": "user", "content": "Hel"}, {"role": "assistant", "content": "lo!"}])
    )
    glued = dataclasses.replace(
        VICUNA, name="glued", user="{content}", cue="", reply="{content}", default_system=""
    )
    straddles = 0
    for tok in (mistral_tokenizer, bpe_tokenizer):
        for template in (VICUNA, BUILTINS["chatml"], glued):
            for mode in LOSS_MODES:
                try:
                    encoder = Encoder(template, tok, mode)
                except ConfigError:
                    continue  # this tokenizer lacks the template's markers
                for c in convs:
                    for _, messages, trained in encoder.views(c):
                        segments = render(template, messages, trained, bos=encoder.bos, eos=encoder.eos)
                        text = "".join(s.text for s in segments)
                        enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
                        starts = [sum(len(s.text) for s in segments[:i]) for i in range(len(segments))]

                        def covered(s, e, segments=segments, starts=starts):
                            a = bisect.bisect_right(starts, s) - 1
                            return segments[a : max(a, bisect.bisect_right(starts, e - 1) - 1) + 1]

                        fast = _label_by_segment(segments, starts, enc.ids, enc.offsets, mode == "all_tokens")
                        slow = _label_by_token(segments, covered, enc.ids, enc.offsets, mode == "all_tokens")
                        assert fast is not None
                        if slow[2] is None:
                            assert fast == slow
                        else:  # a straddling token: both name the same first one
                            assert fast[2] == slow[2]
                            straddles += 1
    assert straddles  # the glued template made some
    two = [Segment("<s>", False, False, -1), Segment("hello", True, True, 1)]
    assert _label_by_segment(two, [0, 3], [1, 2, 3], [(0, 3), (3, 3), (3, 8)], False) is None


def test_default_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert data.usable_cpus() == 3  # a SLURM job's cpuset, not the whole node
    monkeypatch.delattr(os, "sched_getaffinity")
    assert data.usable_cpus() == 128


# ---- (g) mixtures ----


def test_a_weighted_mixture_is_seeded_counted_and_keyed(bpe_tokenizer, write_file, tmp_path):
    """Three sources of 200 conversations at weights 1, 0.5 and 2.5: 200, 100 +- 7 and 400 + (100 +- 7) used
    (a binomial draw per conversation: standard deviation sqrt(200 * 0.5 * 0.5) ~ 7; we allow 4 of them)."""
    paths = [write_file(f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records(200, prefix=name)))
             for name in "abc"]  # fmt: skip
    weights = [1, 0.5, 2.5]
    sources = [DataSource(str(p), weight=w) for p, w in zip(paths, weights, strict=True)]
    encoder = Encoder(VICUNA, bpe_tokenizer)
    split = build_datasets(encoder, sources=sources, cache_dir=tmp_path / "c", num_workers=2, seed=5)
    used = {name: c["conversations"] for name, c in split.sources["train"].items()}
    assert used[str(paths[0])] == 200
    assert abs(used[str(paths[1])] - 100) <= 28 and abs(used[str(paths[2])] - 500) <= 28
    assert len(split.train) == sum(used.values())  # one example per conversation in this loss mode
    # the draws are the hash of (seed, source, id): exactly these conversations
    drawn_b = [f"b{i}" for i in range(200) if uniform(5, str(paths[1]), f"b{i}") < 0.5]
    assert [r[0] for r in rows(split.train) if r[0].startswith("b")] == drawn_b
    ids_c = [r[0] for r in rows(split.train) if r[0].startswith("c")]
    assert len(ids_c) == used[str(paths[2])] and set(ids_c) == {f"c{i}" for i in range(200)}
    # audit.json carries the per-source counts
    body = json.loads(split.audit_json())
    assert {n: c["conversations"] for n, c in body["train"]["sources"].items()} == used
    assert (
        sum(c["trained_tokens"] for c in body["train"]["sources"].values()) == body["train"]["trained_tokens"]
    )
    # same inputs: a hit; another weight or seed: another entry
    assert build_datasets(encoder, sources=sources, cache_dir=tmp_path / "c", seed=5).cache_hit is True
    changed = [*sources[:2], DataSource(str(paths[2]), weight=2.0)]
    other = build_datasets(encoder, sources=changed, cache_dir=tmp_path / "c", seed=5)
    assert other.cache_hit is False and other.cache_paths != split.cache_paths
    assert other.sources["train"][str(paths[2])]["conversations"] == 400


def test_per_source_options_mapping_system_template_and_max_samples(bpe_tokenizer, write_file, tmp_path):
    odd = [
        {
            "uid": f"o{i}",
            "dialog": [{"speaker": "Human", "text": f"Hi {i}"}, {"speaker": "Bot", "text": "Hello."}],
        }
        for i in range(4)
    ]
    odd_path = write_file("odd.json", odd)
    plain = write_file("plain.json", records(6))
    sources = [
        DataSource(
            str(odd_path),
            name="odd",
            fields={"conversations": "dialog", "id": "uid", "from": "speaker", "value": "text"},
            roles={"Human": "user", "Bot": "assistant"},
            system="Answer briefly.",
        ),
        DataSource(str(plain), name="plain", max_samples=3, conv_template="chatml"),
    ]
    encoder = Encoder(VICUNA, bpe_tokenizer)
    split = build_datasets(encoder, sources=sources, cache_dir=tmp_path / "c", num_workers=1)
    assert [r[0] for r in rows(split.train)] == ["o0", "o1", "o2", "o3", "r0", "r1", "r2"]
    assert split.sources["train"]["plain"] | {} == {**split.sources["train"]["plain"], "accepted": 6}
    mapped = Conversation(
        "o0",
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi 0"},
            {"role": "assistant", "content": "Hello."},
        ],
    )
    assert rows(split.train)[0][1] == encoder.encode(mapped).examples[0].input_ids
    chatml = sources[1].encoder(encoder)
    first_plain = read_conversations([plain])[0][0]
    assert (
        rows(split.train)[4][1]
        == chatml.encode(first_plain).examples[0].input_ids
        != (encoder.encode(first_plain).examples[0].input_ids)
    )


def test_mixture_entries_from_the_command_line_and_their_errors():
    src = parse_source("data/a.jsonl::weight=0.5,system=Be brief.,fields.from=speaker,roles.Bot=assistant")
    assert src == DataSource(
        "data/a.jsonl", weight=0.5, system="Be brief.", fields={"from": "speaker"}, roles={"Bot": "assistant"}
    )
    assert parse_source('{"path": "b.json", "max_samples": 10}') == DataSource("b.json", max_samples=10)
    for text, message in [
        ("a.json::weight=2,max_samples=3", "dataset 'a.json': give weight or max_samples, not both"),
        ("a.json::weight=-1", "dataset 'a.json': weight must be a number above 0, got -1"),
        (
            "a.json::wieght=1",
            "--datasets 'a.json': unknown option(s) wieght; known: path, name, weight, "
            "max_samples, conv_template, loss_mode, system, fields, roles",
        ),  # fmt: skip
        ("a.json::weight", "--datasets 'a.json::weight': 'weight' is not key=value"),
        ('{"weight": 1}', """--datasets '{"weight": 1}': each entry needs a path"""),
    ]:
        with pytest.raises(ConfigError) as err:
            parse_source(text)
        assert str(err.value) == message


@pytest.mark.slow
def test_a_three_source_mixture_from_a_config_trains_end_to_end(tmp_path, capfd):
    """`--config` with a `datasets:` list of three weighted sources (300 conversations each, weights 1, 0.5,
    0.2): the final folder's audit.json counts 300, 150 +- 9 and 60 +- 7 conversations (binomial standard
    deviations; 4 allowed), and trains. The train command runs in this process (`chatsft.commands.train.main`,
    what `python -m chatsft.train` calls): the interpreter start is not what is tested here."""
    import yaml

    from chatsft.commands.train import main
    from tests.chatsft_runs import conversations, make_setup, train_flags

    setup = make_setup(tmp_path / "setup", dropout=0.0, n=8)
    paths = []
    for name in "xyz":
        recs = [{**r, "id": f"{name}{i}"} for i, r in enumerate(conversations(300))]
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in recs))
    weights = [1, 0.5, 0.2]
    config = tmp_path / "mix.yaml"
    config.write_text(
        yaml.safe_dump({"datasets": [{"path": str(p), "weight": w} for p, w in zip(paths, weights)]})
    )
    flags = train_flags(
        setup, tmp_path / "out", cache=tmp_path / "cache", max_steps=2, accumulation=1, save_steps=10
    )
    i = flags.index("--data_path")
    flags[i : i + 2] = ["--config", str(config)]
    assert main(flags) == 0
    printed = "".join(capfd.readouterr())
    audit = json.loads((tmp_path / "out" / "audit.json").read_text())["train"]
    used = [audit["sources"][str(p)]["conversations"] for p in paths]
    assert used[0] == 300 and abs(used[1] - 150) <= 4 * 9 and abs(used[2] - 60) <= 4 * 7
    assert audit["records"] == sum(used) and audit["examples"] == sum(used)
    assert f"source {paths[1]}: 300 accepted, {used[1]} conversations used" in printed
    # --lazy_preprocess (FastChat's default) keeps the audit: the same audit.json, printed too
    lazy_flags = [*flags, "--lazy_preprocess", "True"]
    lazy_flags[lazy_flags.index("--output_dir") + 1] = str(tmp_path / "lazy")
    assert main(lazy_flags) == 0
    printed = "".join(capfd.readouterr())
    assert json.loads((tmp_path / "lazy" / "audit.json").read_text())["train"] == audit
    assert "train audit:" in printed


def test_help_says_what_each_data_flag_accepts(capsys):
    from chatsft.training.config import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in [
        "--data-path DATA_PATH [DATA_PATH ...] Training data, one source each: .json (a list or JSON Lines), "
        ".jsonl or .parquet files",
        "folders written by datasets' save_to_disk, or Hub dataset names (org/name[:split], through "
        "datasets.load_dataset, where the network allows)",
        "--datasets DATASETS [DATASETS ...] A mixture, instead of or beside --data_path",
        "[EVAL_DATA_PATH ...] Evaluation data: files, folders or Hub names, as --data_path.",
    ]:
        assert phrase in text


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_launchers_encode_once_and_train_on_identical_examples(tmp_path):
    """Two `torchrun --nnodes 2` launchers (one process each, gloo, rendezvous on 127.0.0.1) sharing a cache
    folder, as two nodes on a shared file system: one process encodes, the other waits on the entry's lock
    (no collective) and maps it; both see the same examples in the same order, and the sampler gives them
    disjoint batches that together cover the data."""
    import sys
    import time

    from tests.chatsft_runs import DRIVER, Launch, free_port, make_setup, train_flags

    setup = make_setup(tmp_path / "setup", dropout=0.0, n=24)
    flags = train_flags(
        setup, tmp_path / "out", cache=tmp_path / "cache", max_steps=3, accumulation=1, save_steps=10
    )
    port, start = free_port(), time.monotonic()
    launches = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(DRIVER), "--dump-data", str(tmp_path / "data.{rank}.json"), "--", *flags]  # fmt: skip
        launches.append(Launch(cmd, tmp_path / f"node{node}.log"))
    try:
        dumps = [tmp_path / f"data.{rank}.json" for rank in (0, 1)]
        launches[0].wait_for(lambda: all(d.is_file() for d in dumps), "the first training step")
        first_step = time.monotonic() - start
        codes = [launch.wait() for launch in launches]
    finally:
        for launch in launches:
            launch.kill_group()
    output = launches[0].output()
    assert codes == [0, 0], output[-3000:] + launches[1].output()[-3000:]
    encoded = [line for line in output.splitlines() if "training examples encoded and cached" in line]
    loaded = [line for line in output.splitlines() if "training examples loaded from cache" in line]
    assert len(encoded) == 1 and len(loaded) == 1 and ("rank 1: " in encoded[0]) != ("rank 1: " in loaded[0])
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    data = [json.loads(d.read_text()) for d in dumps]
    assert data[0]["ids"] == data[1]["ids"] and len(data[0]["ids"]) == 24
    seen = [i for d in data for batch in d["batches"] for i in batch]
    assert sorted(seen) == sorted(data[0]["ids"])  # each example once per epoch, on one rank or the other
    print(f"two launchers: {first_step:.1f} s from launch to the first training step")


def test_the_audit_counts_every_record_read_the_rejected_ones_too(bpe_tokenizer, write_file, tmp_path):
    """5 read, 3 rejected by validation: audit.json says records 5 and names the rejections (issue: it said
    2)."""
    bad = [{"id": f"bad{i}", "conversations": [{"from": "human", "value": "?"}]} for i in range(3)]
    path = write_file("mixed.json", records(2) + bad)
    encoder = Encoder(VICUNA, bpe_tokenizer, "assistant_turns", 2048)
    for _ in range(2):  # encoded, then loaded from the cache: the same audit
        split = build(encoder, [path], tmp_path, policy=ReadPolicy(max_invalid_ratio=0.9))
        audit = json.loads(split.audit_json())["train"]
        assert (audit["records"], audit["examples"]) == (5, 2)
        assert audit["rejected"] == {"no_assistant_turn": 3}
        assert audit["first_rejected"] == {"no_assistant_turn": "bad0"}


def test_bad_input_in_any_source_is_one_line_naming_source_record_and_field(
    bpe_tokenizer, write_file, tmp_path
):
    good = write_file("good.jsonl", "".join(json.dumps(r) + "\n" for r in records(3)))
    bad_recs = records(3, prefix="b")
    bad_recs[1]["dialog"] = bad_recs[1].pop("conversations")
    bad_recs[1]["dialog"][1]["speaker"] = bad_recs[1]["dialog"][1].pop("from")
    bad_recs[1]["dialog"][1]["speaker"] = "robot"
    for r in (bad_recs[0], bad_recs[2]):
        r["dialog"] = r.pop("conversations")
        for t in r["dialog"]:
            t["speaker"] = t.pop("from")
    bad = write_file("bad.json", bad_recs)
    sources = [
        DataSource(str(good)),
        DataSource(str(bad), weight=2, fields={"conversations": "dialog", "from": "speaker"}),
    ]
    encoder = Encoder(VICUNA, bpe_tokenizer)
    with pytest.raises(DataError) as err:
        build_datasets(encoder, sources=sources, cache_dir=tmp_path / "c", policy=ReadPolicy(strict=True))
    assert str(err.value).startswith(f'{bad}:1 (id=b1) turn 1: unknown_role: `from` is "robot"; known: human')
    assert str(err.value).endswith("(--strict stops at the first rejected record)")
    assert [p for p in (tmp_path / "c").iterdir() if p.is_dir()] == []  # nothing half-written is left
    with pytest.raises(DataError) as err:
        build_datasets(encoder, sources=[DataSource(str(tmp_path / "gone.jsonl"))], cache_dir=tmp_path / "c")
    assert str(err.value) == f"{tmp_path / 'gone.jsonl'}: file_missing: no such file"
