"""Reading and validating records: every reason code, on real files written by the tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from chatsft.errors import DataError
from chatsft.records import FILE_REASONS, REASONS, RECORD_REASONS, ReadPolicy, SeenIds, read_conversations

H, G = "human", "gpt"


def turn(role, value):
    return {"from": role, "value": value}


def rec(*turns, **extra):
    return {"conversations": list(turns), **extra}


GOOD = rec(turn(H, "Hi"), turn(G, "Hello!"), id="good")


def read_one(write_file, record, name="d.json"):
    path = write_file(name, [record])
    convs, report = read_conversations([path])
    return convs, report, path


# --- file-level reasons -------------------------------------------------------------------------------------

FILE_CASES = {
    "file_empty": ("empty.json", b""),
    "no_records": ("list.json", "[]"),
    "bad_json": ("trunc.json", '[{"conversations": [{"from": "human", "value": "Hi"'),
    "not_a_list": ("obj.json", json.dumps(GOOD)),
    "not_utf8": ("latin.json", b'[{"conversations": [{"from": "human", "value": "caf\xe9"}]}]'),
    "bad_parquet": ("broken.parquet", b"PAR1 this is not parquet"),
    "unknown_format": ("data.csv", "a,b\n"),
}


@pytest.mark.parametrize("reason", sorted(FILE_CASES))
def test_file_level_reasons(write_file, reason):
    name, content = FILE_CASES[reason]
    path = write_file(name, content)
    convs, report = read_conversations([path])
    assert convs == [] and report.records_read == 0
    [error] = report.file_errors
    assert error.reason == reason
    assert str(error).startswith(f"{path}")
    assert f": {reason}: " in str(error)
    with pytest.raises(DataError, match=reason):
        read_conversations([path], ReadPolicy())


def test_file_missing(tmp_path):
    _, report = read_conversations([tmp_path / "nope.json"])
    assert report.file_errors[0].reason == "file_missing"


def test_empty_folder(tmp_path):
    (tmp_path / "dir.json").mkdir()  # a folder stands for its shard files: here none
    _, report = read_conversations([tmp_path / "dir.json"])
    assert report.file_errors[0].reason == "bad_dataset_folder"


def test_error_messages_name_the_position(write_file):
    _, report = read_conversations([write_file("c.json", '[{"conversations": []},\n]')])
    assert str(report.file_errors[0]).endswith(
        ":2:1: bad_json: Expecting value (a trailing comma?) at line 2 column 1"
    )
    assert report.file_errors[0].position == "2:1"
    _, report = read_conversations([write_file("u.json", b'[{"id": "\xff"}]')])
    assert report.file_errors[0].detail == "invalid UTF-8 byte 0xff at byte offset 9"


def test_every_code_is_documented():
    assert set(REASONS) == set(FILE_REASONS) | set(RECORD_REASONS)
    assert all(REASONS.values())


# --- record-level reasons -----------------------------------------------------------------------------------

RECORD_CASES = {
    "not_an_object": ["just a string", None],
    "missing_turns": [{"id": "x", "turns": []}, None],
    "turns_not_a_list": [{"conversations": {"from": H, "value": "a"}}, None],
    "no_turns": [rec(), None],
    "turn_not_an_object": [rec([turn(H, "a"), turn(G, "b")]), 0],
    "missing_role": [rec({"value": "a"}, turn(G, "b")), 0],
    "missing_content": [rec(turn(H, "a"), {"from": G}), 1],
    "content_not_string": [rec(turn(H, None), turn(G, "b")), 0],
    "empty_content": [rec(turn(H, "a"), turn(G, "  ")), 1],
    "unknown_role": [rec(turn("robot", "a"), turn(G, "b")), 0],
    "system_not_first": [rec(turn(H, "a"), turn("system", "s"), turn(G, "b")), 1],
    "repeated_role": [rec(turn(H, "a"), turn(H, "b"), turn(G, "c")), 1],
    "no_assistant_turn": [rec(turn(H, "a")), None],
    "bad_system": [rec(turn(H, "a"), turn(G, "b"), system=["x"]), None],
    "bad_id": [rec(turn(H, "a"), turn(G, "b"), id=[1]), None],
}


@pytest.mark.parametrize("reason", sorted(RECORD_CASES))
def test_record_level_reasons(write_file, reason):
    record, turn_no = RECORD_CASES[reason]
    path = write_file("d.json", [GOOD, record])
    convs, report = read_conversations([path])
    assert [c.id for c in convs] == ["good"]
    assert report.records_read == 2 and report.accepted == 1 and dict(report.rejected) == {reason: 1}
    [problem] = report.problems
    assert (problem.reason, problem.index, problem.turn) == (reason, 1, turn_no)
    line = str(problem)
    assert line.startswith(f"{path}:1")
    assert "\n" not in line
    if turn_no is not None:
        assert f" turn {turn_no}: {reason}: " in line


def test_record_lines_are_exact(write_file):
    path = write_file(
        "d.json",
        [
            GOOD,
            rec(turn(H, "a"), turn(G, None), id="r7"),
            rec(turn(H, "a"), turn(G, 5)),
            rec(turn(H, "a"), turn(G, "b"), turn(G, "c"), id=3),
        ],
    )
    _, report = read_conversations([path])
    assert [str(p) for p in report.problems] == [
        f"{path}:1 (id=r7) turn 1: content_not_string: `value` is a JSON null, expected a string",
        f"{path}:2 turn 1: content_not_string: `value` is a JSON integer, expected a string",
        f"{path}:3 (id=3) turn 2: repeated_role: two assistant turns in a row (turns 1 and 2)",
    ]


def test_two_gpt_turns_and_unknown_roles(write_file):
    _, report, _ = read_one(write_file, rec(turn(H, "a"), turn(G, "b"), turn(G, "c")))
    assert report.problems[0].reason == "repeated_role"
    _, report, _ = read_one(write_file, {"messages": [{"role": "customer", "content": "a"}]})
    assert report.problems[0].reason == "unknown_role"
    assert '`role` is "customer"' in report.problems[0].detail


def test_duplicate_ids_across_files(write_file):
    a = write_file("a.json", [GOOD])
    b = write_file("b.jsonl", json.dumps(GOOD) + "\n")
    convs, report = read_conversations([a, b])
    assert len(convs) == 1
    assert str(report.problems[0]) == f"{b}:0 (id=good): duplicate_id: id 'good' was first used at {a}:0"


def test_the_id_set_finds_every_repeat_and_names_its_first_use_in_15_to_19_bytes_an_id():
    seen = SeenIds()
    seen.begin("a.jsonl", 0)
    n = 60_000
    assert all(seen.first_use(f"conv-{i}", i) is None for i in range(n))
    seen.begin("b.jsonl", n)
    assert seen.first_use("conv-b", n) is None
    assert [seen.first_use(f"conv-{i}", n + 1 + i) for i in (0, 1, 31_337, n - 1)] == [
        "a.jsonl:0",
        "a.jsonl:1",
        "a.jsonl:31337",
        f"a.jsonl:{n - 1}",
    ]
    assert seen.first_use("conv-b", n + 9) == "b.jsonl:0"  # a repeat is not kept again
    assert len(seen) == n + 1
    assert 15 <= seen.nbytes / len(seen) <= 19, seen.nbytes


def test_jsonl_broken_line_keeps_the_others(write_file):
    lines = [json.dumps(GOOD), '{"conversations": [', "", json.dumps(rec(turn(H, "x"), turn(G, "y"), id="z"))]
    path = write_file("d.jsonl", "\n".join(lines) + "\n")
    convs, report = read_conversations([path])
    assert [c.id for c in convs] == ["good", "z"]
    assert report.records_read == 3 and report.accepted == 2
    assert str(report.problems[0]) == f"{path}:1: bad_json_line: line 2 column 20: Expecting value"
    assert report.rejected_records[0]["record"] == '{"conversations": ['


def test_nested_list_instead_of_turns(write_file):
    _, report, _ = read_one(write_file, rec([turn(H, "a")], [turn(G, "b")]))
    assert report.problems[0].reason == "turn_not_an_object"
    assert report.problems[0].detail == "the turn is a JSON list, expected an object"


# --- accepted shapes ----------------------------------------------------------------------------------------


def test_sharegpt_with_system_and_aliases(write_file):
    record = rec(
        turn("user", "q"),
        turn("chatgpt", "a"),
        turn("human", "q2"),
        turn("bard", "a2"),
        system="Be brief.",
        id=7,
    )
    [conv], report, path = read_one(write_file, record)
    assert conv.id == "7" and conv.source == str(path) and conv.index == 0
    assert conv.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert report.turns == [4] and report.characters == len("Be brief.qaq2a2")


def test_openai_messages_and_system_turn(write_file):
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    }
    [conv], _, _ = read_one(write_file, record)
    assert conv.id == "0"
    assert conv.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ab"},
    ]


def test_leading_assistant_dropped_and_counted(write_file):
    [conv], report, _ = read_one(write_file, rec(turn(G, "intro"), turn(H, "q"), turn(G, "a")))
    assert conv.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert report.leading_assistant_dropped == 1 and report.accepted == 1
    _, report, _ = read_one(write_file, rec(turn(G, "only")))
    assert report.problems[0].reason == "no_assistant_turn"


def test_trailing_user_turn_is_kept(write_file):
    [conv], _, _ = read_one(write_file, rec(turn(H, "q"), turn(G, "a"), turn(H, "q2")))
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "user"]


def test_bom_and_jsonl_saved_as_json(write_file):
    path = write_file("bom.json", b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    assert len(read_conversations([path])[0]) == 1
    lines = "\n".join(json.dumps(rec(turn(H, "q"), turn(G, "a"), id=i)) for i in range(3))
    convs, report = read_conversations([write_file("lines.json", lines)])
    assert [c.id for c in convs] == ["0", "1", "2"] and not report.file_errors


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        rec(turn(H, "q"), turn(G, "a"), id="p0", system="S"),
        rec(turn(H, "q"), turn(G, "a"), id="p1", system=None),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    convs, report = read_conversations([tmp_path / "d.parquet"])
    assert [c.id for c in convs] == ["p0", "p1"]
    assert convs[0].messages[0] == {"role": "system", "content": "S"}
    assert convs[1].messages[0]["role"] == "user"


# --- the training policy ------------------------------------------------------------------------------------


def mixed(write_file, bad: int, good: int = 10):
    records = [rec(turn(H, f"q{i}"), turn(G, f"a{i}"), id=f"g{i}") for i in range(good)]
    records += [rec(turn(H, "q"), turn(H, "q"), id=f"b{i}") for i in range(bad)]
    return write_file("mixed.json", records)


def test_policy_skips_counts_and_writes_rejects(write_file, tmp_path):
    path = mixed(write_file, bad=1)
    rejects = tmp_path / "out" / "rejected.jsonl"
    convs, report = read_conversations([path], ReadPolicy(max_invalid_ratio=0.1, rejects_path=str(rejects)))
    assert len(convs) == 10 and report.accepted + report.rejected_total == report.records_read == 11
    [row] = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert row["id"] == "b0" and row["reason"] == "repeated_role" and row["record"]["id"] == "b0"


def test_policy_stops_over_ratio_and_on_strict(write_file):
    path = mixed(write_file, bad=2)
    with pytest.raises(DataError, match=r"2 of 12 records were rejected, more than --max_invalid_ratio 0.1"):
        read_conversations([path], ReadPolicy(max_invalid_ratio=0.1))
    assert len(read_conversations([path], ReadPolicy(max_invalid_ratio=0.2))[0]) == 10
    with pytest.raises(DataError, match=r"mixed.json:10 \(id=b0\) turn 1: repeated_role"):
        read_conversations([path], ReadPolicy(strict=True))


def test_mixed_file_counts_add_up(write_file):
    records = [
        GOOD,
        None,
        rec(),
        rec(turn(H, "q"), turn(G, "a"), id="good"),
        rec(turn(H, 1), turn(G, "a")),
        rec(turn(H, "q"), turn(G, "a")),
    ]
    _, report = read_conversations([write_file("m.json", records)])
    assert report.records_read == 6
    assert report.accepted == 2 and report.rejected_total == 4
    assert report.accepted + report.rejected_total == report.records_read


# --- the command --------------------------------------------------------------------------------------------


def test_check_command_exit_codes(write_file, capsys):
    from chatsft.commands.cli import main

    good = write_file("good.json", [GOOD])
    assert main(["check", str(good)]) == 0
    bad = write_file("bad.json", [GOOD, rec(turn(H, "a"), turn(H, "b"))])
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:1 turn 1: repeated_role: two user turns in a row (turns 0 and 1)" in out
    assert "records read      2" in out and "accepted          1" in out
    assert main(["check", str(write_file("e.json", ""))]) == 2


def test_check_rejects_file(write_file, tmp_path):
    from chatsft.commands.cli import main

    bad = write_file("bad.json", [GOOD, rec(turn(H, "a"))])
    out = tmp_path / "rej.jsonl"
    assert main(["check", str(bad), "--rejects", str(out)]) == 1
    assert [json.loads(x)["reason"] for x in out.read_text().splitlines()] == ["no_assistant_turn"]


@pytest.mark.parametrize("content", ["", "[]", "[{", '{"conversations": []}', b"\xff\xfe[]"])
def test_check_subprocess_one_line_no_traceback(write_file, content):
    path = write_file("f.json", content)
    proc = subprocess.run(
        [sys.executable, "-m", "chatsft", "check", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"chatsft check: error: {path}")


def test_bundled_sample_data_is_valid():
    from importlib import resources

    path = resources.files("chatsft") / "assets" / "sample_conversations.json"
    if not path.is_file():
        pytest.skip("sample data not generated yet")
    convs, report = read_conversations([str(path)])
    assert report.rejected_total == 0 and len(convs) >= 200


# --- hostile input, as a user meets it: `chatsft check` gives one line per problem, never a traceback -------


def check(*args, shell=None):
    """Run `chatsft check` in a process of its own; (exit code, stdout, stderr)."""
    command = shell or [sys.executable, "-m", "chatsft", "check", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, shell=shell is not None)
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def test_nesting_deeper_than_any_record(write_file):
    depth = 10**5
    deep = "[" * depth + "]" * depth
    array = write_file("deep.json", '[{"conversations": ' + deep + "}]")
    code, out, err = check(array)
    assert code == 2
    assert err == (
        f"chatsft check: error: {array}: bad_json: nested more than 1000 levels deep, within bytes 0-200021\n"
    )
    lines = write_file("deep.jsonl", json.dumps(GOOD) + '\n{"conversations": ' + deep + "}\n")
    code, out, err = check(lines)
    assert code == 1 and err == ""
    assert f"  {lines}:1: bad_json_line: line 2: nested too deeply\n" in out
    arguments = {"a": 1}
    for _ in range(70):  # within what the parser reads, beyond what a template can render
        arguments = {"a": arguments}
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": arguments}]}
    _, report = read_conversations(
        [write_file("args.json", [{"messages": [{"role": "user", "content": "q"}, call]}])]
    )
    assert str(report.problems[0]).endswith(
        ":0 turn 1: nested_too_deeply: call 0's `arguments` nests more than 64 levels deep"
    )


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_lone_surrogates_are_rejected_and_kept(write_file, tmp_path, suffix):
    """JSON can spell "\\ud800"; no tokenizer can encode it. Rejected wherever it is, printed escaped, and
    kept in the rejects file as the same JSON escape (json.dumps writes it so: ASCII-only)."""
    records = [
        GOOD,
        rec(turn(H, "q"), turn(G, "a"), id="x\ud800"),
        rec(turn(H, "bad \udfff here"), turn(G, "a"), id="c"),
        rec(turn(H, "q"), turn(G, "😀 fine"), id="pair"),
    ]
    text = json.dumps(records) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in records)
    path = write_file("s" + suffix, text)
    rejects = tmp_path / "rejected.jsonl"
    code, out, err = check(path, "--rejects", rejects)
    assert code == 1 and err == ""
    assert (
        f"  {path}:1 (id=x\\ud800): bad_unicode: `id` holds a lone surrogate U+D800 at character 1\n" in out
    )
    assert (
        f"  {path}:2 (id=c) turn 0: bad_unicode: `value` holds a lone surrogate U+DFFF at character 4\n"
        in out
    )
    assert "accepted          2\n" in out
    rows = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [r["record"] for r in rows] == records[1:3]


def test_parquet_values_json_cannot_hold(tmp_path):
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": b"r0",
            "when": datetime.datetime(2024, 5, 1, 12, 30),
            "price": decimal.Decimal("1.50"),
            "conversations": [turn(H, "q"), turn(G, "a")],
        },
        {"id": b"\xff\xfe", "when": None, "price": None, "conversations": [turn(H, "q"), turn(G, "a")]},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    rejects = tmp_path / "rej.jsonl"
    code, out, err = check(path, "--rejects", rejects)
    assert code == 1 and err == ""
    assert f"  {path}:0: bad_id: `id` is a JSON bytes, expected a string or an integer\n" in out
    assert [json.loads(line)["record"] for line in rejects.read_text().splitlines()] == [
        {
            "id": "r0",
            "when": "2024-05-01T12:30:00",
            "price": "1.50",
            "conversations": rows[0]["conversations"],
        },
        {"id": "base64://4=", "when": None, "price": None, "conversations": rows[1]["conversations"]},
    ]


def test_ids_that_would_fake_lines_are_escaped(write_file):
    path = write_file("ids.json", [rec(id="a\nids.json:0: fake"), rec(id="\x1b[31mred\x1b[0m")])
    code, out, _ = check(path)
    assert code == 1
    assert out.splitlines()[-2:] == [
        f"  {path}:0 (id=a\\nids.json:0: fake): no_turns: `conversations` is an empty list",
        f"  {path}:1 (id=\\x1b[31mred\\x1b[0m): no_turns: `conversations` is an empty list",
    ]


def test_output_cut_short_by_its_reader(write_file, tmp_path):
    bad = [rec(turn(H, "a"), turn(H, "b"), id=f"b{i}") for i in range(3000)]  # ~300 KB of problem lines
    path = write_file("bad.json", bad)
    rejects = tmp_path / "rej.jsonl"
    cmd = f"{sys.executable} -m chatsft check {path} --max_problems 0 --rejects {rejects} | head -n 2"
    code, out, err = check(shell=cmd)
    assert code == 0 and err == ""  # head's status; check itself stopped quietly
    assert out.splitlines() == ["files             1", "records read      3000"]
    assert len(rejects.read_text().splitlines()) == 3000  # written before the output


def test_rejects_path_that_cannot_be_written(write_file, tmp_path):
    bad = write_file("bad.json", [GOOD, rec(turn(H, "a"))])
    (tmp_path / "file.txt").write_text("")
    code, _, err = check(bad, "--rejects", tmp_path / "file.txt" / "rej.jsonl")
    assert code == 2
    target = tmp_path / "file.txt" / "rej.jsonl"
    assert (
        err == f"chatsft check: error: cannot write rejected records to {target}: {target.parent} is a file\n"
    )
