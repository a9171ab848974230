"""The read report (counts, summary, kept problems) and the rejects file, on records read from real files."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from chatsft.errors import DataError
from chatsft.records import iter_conversations, read_conversations
from chatsft.report import Problem, ReadReport, RejectsFile, _median, printable


def sharegpt(rid, *values):
    roles = ["human", "gpt"] * len(values)
    return {"id": rid, "conversations": [{"from": r, "value": v} for r, v in zip(roles, values)]}


def test_the_summary_counts_every_record_by_outcome_reason_and_feature(write_file):
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]}
    tools = [{"type": "function", "function": {"name": "f"}}]
    a = write_file(
        "a.json",
        [
            sharegpt("a0", "Hi", "Hello!"),
            {
                "id": "a1",
                "conversations": [
                    {"from": "gpt", "value": "Lead"},
                    *sharegpt("", "q", "ab")["conversations"],
                ],
            },
            sharegpt("a2", "q", "a", "q2"),
            {"id": "a3", "conversations": []},
        ],
    )
    b = write_file(
        "b.jsonl",
        json.dumps(
            {
                "id": "b0",
                "tools": tools,
                "messages": [
                    {"role": "user", "content": "q"},
                    call,
                    {"role": "tool", "content": "2"},
                    {"role": "assistant", "content": "two", "reasoning_content": "think"},
                ],
            }
        )
        + "\nnot json\n"
        + json.dumps(sharegpt("a0", "again", "dup"))
        + "\n",
    )
    _, report = read_conversations([a, b])
    assert report.summary() == "\n".join(
        [
            "files             2",
            "records read      7",
            "accepted          4",
            "rejected          3",
            "  bad_json_line         1",
            "  duplicate_id          1",
            "  no_turns              1",
            "leading assistant turns dropped (as FastChat does): 1",
            "turns per record  min 2, median 2.5, max 4",
            f"characters        {len('HiHello!') + len('qab') + len('qaq2') + len('q2twothink')}",
            "tools and reasoning (accepted records)",
            "  records with tools      1",
            "  tool definitions        1",
            "  records with tool calls 1",
            "  tool calls              1",
            "  tool messages           1",
            "  records with reasoning  1",
            "  replies with reasoning  1",
            f"  {b}: records with tools 1, tool definitions 1, records with tool calls 1, tool calls 1, "
            "tool messages 1, records with reasoning 1, replies with reasoning 1",
        ]
    )
    assert report.accepted + report.rejected_total == report.records_read == 7
    assert [str(p) for p in report.problems] == [
        f"{a}:3 (id=a3): no_turns: `conversations` is an empty list",
        f"{b}:1: bad_json_line: line 2 column 1: Expecting value",
        f"{b}:2 (id=a0): duplicate_id: id 'a0' was first used at {a}:0",
    ]
    assert report.first_problem == report.problems[0] and report.last_problem == report.problems[-1]


def test_a_streaming_report_counts_without_keeping(write_file):
    path = write_file("d.json", [sharegpt("x", "q", "a"), {"id": "y", "conversations": []}])
    report = ReadReport(keep=False)
    assert [c.id for c in iter_conversations([path], report=report)] == ["x"]
    assert report.rejected == Counter(no_turns=1) and report.problems == [] and report.rejected_records == []
    assert str(report.first_problem) == f"{path}:1 (id=y): no_turns: `conversations` is an empty list"


@pytest.mark.parametrize(
    ("counts", "median"),
    [({3: 1}, 3), ({1: 1, 2: 1}, 1.5), ({1: 2, 5: 1}, 1), ({1: 1, 4: 1, 9: 2}, 6.5), ({2: 3, 7: 3}, 4.5)],
)
def test_the_median_of_a_histogram_is_that_of_its_values(counts, median):
    assert _median(Counter(counts)) == median


def test_problem_lines_escape_what_a_terminal_would_not_show_as_itself():
    problem = Problem("a\nb.json", "bad_id", "x\x1b[31m", index=2, id="\ud800", turn=1)
    assert str(problem) == "a\\nb.json:2 (id=\\ud800) turn 1: bad_id: x\\x1b[31m"
    assert str(Problem("f.json", "bad_json", "eof", position="3:4")) == "f.json:3:4: bad_json: eof"
    assert printable("plain: text") == "plain: text"


def test_the_rejects_file_replaces_a_link_and_writes_what_json_cannot_hold(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    path = tmp_path / "rejected.jsonl"
    path.symlink_to(target)
    deep: list = []
    for _ in range(10**5):
        deep = [deep]
    with RejectsFile(str(path)) as rejects:
        rejects.write({"record": {"bytes": b"\xff\xfe", "text": b"ok", "s": "\ud800"}})
        rejects.write({"record": deep, "reason": "bad_json"})
    assert target.read_text() == "keep me" and not path.is_symlink()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"record": {"bytes": "base64://4=", "text": "ok", "s": "\ud800"}},
        {"record": "(nested too deeply to write)", "reason": "bad_json"},
    ]


def test_no_path_writes_nothing_and_a_path_under_a_file_is_one_line(tmp_path):
    with RejectsFile(None) as rejects:
        rejects.write({"record": 1})
    (tmp_path / "file.txt").write_text("")
    target = tmp_path / "file.txt" / "rej.jsonl"
    with pytest.raises(DataError) as e, RejectsFile(str(target)) as rejects:
        rejects.write({"record": 1})
    assert str(e.value) == f"cannot write rejected records to {target}: {target.parent} is a file"
    assert list(tmp_path.iterdir()) == [tmp_path / "file.txt"]
