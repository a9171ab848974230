"""Turns -> messages for tool calling, reasoning and weights: every record of `tool_data` read from real files
(.json, .jsonl, parquet), with its exact outcome."""

from __future__ import annotations

import json

import pytest
from tool_data import ACCEPTED, REJECTED, TOOLS, A, U, call

from chatsft.messages import MESSAGE_REASONS
from chatsft.records import RECORD_REASONS, read_conversations


def test_the_data_set_is_large_and_covers_every_new_code():
    assert len(ACCEPTED) + len(REJECTED) >= 40
    new = {
        "bad_reasoning",
        "bad_weight",
        "bad_tool_calls",
        "bad_tool_arguments",
        "unknown_tool",
        "tool_without_call",
        "missing_tool_result",
        "tool_result_mismatch",
        "bad_tool_message",
        "bad_tools",
        "bad_unicode",
    }
    assert new <= {reason for _, reason, _, _ in REJECTED.values()}
    assert new <= set(MESSAGE_REASONS) and set(MESSAGE_REASONS) <= set(RECORD_REASONS)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_every_record_has_its_exact_outcome(write_file, suffix):
    names = list(ACCEPTED) + list(REJECTED)
    records = [{"id": name, **ACCEPTED[name][0]} for name in ACCEPTED]
    records += [{"id": name, **REJECTED[name][0]} for name in REJECTED]
    if suffix == ".json":
        path = write_file("tools.json", json.dumps(records))  # ASCII: `"\\ud800"` stays an escape
    else:
        path = write_file("tools.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    convs, report = read_conversations([path])
    assert report.records_read == len(names) and report.accepted == len(ACCEPTED)
    got = {c.id: (c.messages, c.tools) for c in convs}
    assert got == {name: (messages, tools) for name, (_, messages, tools) in ACCEPTED.items()}
    lines = {p.id: str(p) for p in report.problems}
    expected = {}
    for name, (_, reason, turn, detail) in REJECTED.items():
        at = f" turn {turn}" if turn is not None else ""
        expected[name] = f"{path}:{names.index(name)} (id={name}){at}: {reason}: {detail}"
    assert lines == expected


def test_check_counts_tools_and_reasoning(write_file, capsys):
    from chatsft.commands.cli import main

    path = write_file("tools.json", [{"id": n, **r} for n, (r, _, _) in ACCEPTED.items()])
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.split("tools and reasoning (accepted records)\n")[1].splitlines() == [  # counted by hand
        "  records with tools      9",
        "  tool definitions        17",
        "  records with tool calls 19",
        "  tool calls              24",
        "  tool messages           20",
        "  records with reasoning  4",
        "  replies with reasoning  5",
        "  replies of weight 0     3",
    ]


def test_check_counts_per_file(write_file, capsys):
    from chatsft.commands.cli import main

    a = write_file(
        "a.json", [{"id": n, **ACCEPTED[n][0]} for n in ("reasoning_content", "weight_zero_and_one")]
    )
    b = write_file(
        "b.json", [{"id": n, **ACCEPTED[n][0]} for n in ("parallel_calls_with_ids", "tools_as_json_string")]
    )
    assert main(["check", str(a), str(b)]) == 0
    assert capsys.readouterr().out.split("tools and reasoning (accepted records)\n")[1].splitlines() == [
        "  records with tools      2",
        "  tool definitions        4",
        "  records with tool calls 2",
        "  tool calls              3",
        "  tool messages           2",
        "  records with reasoning  1",
        "  replies with reasoning  1",
        "  replies of weight 0     1",
        f"  {a}: records with reasoning 1, replies with reasoning 1, replies of weight 0 1",
        f"  {b}: records with tools 2, tool definitions 4, records with tool calls 2, tool calls 3, "
        "tool messages 2",
    ]


def test_parquet_rows_with_null_fields(tmp_path):
    """Parquet gives every message every field (null where absent) and arguments as structs or strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": "p0",
            "tools": json.dumps(TOOLS),
            "messages": [
                {"role": "user", "content": "2+3?", "tool_calls": None, "tool_call_id": None, "weight": None},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("add", '{"a": 2, "b": 3}', "c1")],
                    "tool_call_id": None,
                    "weight": None,
                },
                {"role": "tool", "content": "5", "tool_calls": None, "tool_call_id": "c1", "weight": None},
                {"role": "assistant", "content": "5", "tool_calls": None, "tool_call_id": None, "weight": 0},
                {
                    "role": "user",
                    "content": "Thanks",
                    "tool_calls": None,
                    "tool_call_id": None,
                    "weight": None,
                },
                {
                    "role": "assistant",
                    "content": "Bye",
                    "tool_calls": None,
                    "tool_call_id": None,
                    "weight": 1,
                },
            ],
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    [conv], report = read_conversations([tmp_path / "t.parquet"])
    assert report.rejected_total == 0 and conv.tools == TOOLS
    assert conv.messages == [
        U("2+3?"),
        A("", tool_calls=[call("add", {"a": 2, "b": 3}, "c1")]),
        {"role": "tool", "content": "5", "tool_call_id": "c1"},
        A("5", weight=0),
        U("Thanks"),
        A("Bye"),
    ]


def test_leading_assistant_with_calls_is_dropped_with_its_results(write_file):
    record = {
        "messages": [A("", tool_calls=[call("add", {})]), {"role": "tool", "content": "0"}, U("q"), A("a")]
    }
    _, report = read_conversations([write_file("d.json", [record])])
    assert [str(p).split(": ", 1)[1] for p in report.problems] == [
        "tool_without_call: its call was in the leading assistant turn, which is dropped (as FastChat does)"
    ]
    assert report.problems[0].turn == 1


def test_the_readme_examples_are_read_as_documented(write_file):
    """The README's data examples (every JSON object in its `## Data` section) are accepted, as it says."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Data\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```json\n")[1:]]
    decoder, records = json.JSONDecoder(), []
    for block in blocks:
        pos = 0
        while block[pos:].strip():
            record, end = decoder.raw_decode(block, len(block) - len(block[pos:].lstrip()))
            records.append(record)
            pos = end
    path = write_file("readme.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    convs, report = read_conversations([path])
    assert report.rejected_total == 0 and [c.id for c in convs] == ["a1", "a2", "t1", "r1", "s1"]
    t1, r1, s1 = convs[2:]
    weather = call("get_weather", {"city": "Paris"})
    assert t1.messages[1] == A(
        "", reasoning_content="I should look it up.", tool_calls=[{"id": "call_1", **weather}]
    )
    assert r1.messages[1] == A("5", weight=0) and r1.messages[3] == A(
        "4", reasoning_content="Two and two make four."
    )
    assert s1.messages == [
        U("Weather in Paris?"),
        A("", tool_calls=[weather]),
        {"role": "tool", "content": "18C, sunny"},
        A("It is 18C and sunny in Paris."),
    ]
    assert s1.tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
