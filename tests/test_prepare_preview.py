"""`chatsft prepare` and `chatsft preview` through the CLI dispatcher, on small files and real tokenizers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import chatsft
from chatsft.commands.cli import main
from chatsft.encode import IGNORE_INDEX, Encoder
from chatsft.records import Conversation
from chatsft.templates import BUILTINS

SRC = str(Path(chatsft.__file__).parents[1])  # the code under test, also in the commands run as subprocesses

RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {
        "id": "b",
        "conversations": [
            {"from": "human", "value": "What ends text?"},
            {"from": "gpt", "value": "The token </s> does."},
            {"from": "human", "value": "And <s>?"},
            {"from": "gpt", "value": "It starts it."},
        ],
    },
    {"id": "empty", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
    {
        "id": "c",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    },
]


def lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prepare(data, model_dir, out, *flags) -> int:
    """`chatsft prepare` through the CLI dispatcher; returns its exit code."""
    return main(
        [
            "prepare",
            "--data_path",
            str(data),
            "--model_name_or_path",
            str(model_dir),
            "--output",
            str(out),
            *flags,
        ]
    )


def preview(data, model_dir, *flags) -> int:
    """`chatsft preview` through the CLI dispatcher; returns its exit code."""
    return main(["preview", "--data_path", str(data), "--model_name_or_path", str(model_dir), *flags])


def test_prepare_writes_examples_in_order_with_the_audit(
    write_file, mistral_dir, mistral_tokenizer, tmp_path, capsys
):
    data = write_file("data.json", RECORDS)
    out = tmp_path / "out" / "examples.jsonl"
    code = prepare(data, mistral_dir, out, "--conv_template", "vicuna_v1.1")
    printed = capsys.readouterr().out
    assert code == 0
    rows = lines(out)
    assert [r["id"] for r in rows] == [
        "a",
        "b",
        "c",
    ]  # input order; 'empty' was rejected by the records layer
    assert set(rows[0]) == {"id", "text", "input_ids", "labels"}
    encoder = Encoder(BUILTINS["vicuna_v1.1"], mistral_tokenizer, max_length=2048)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    expected = encoder.encode(Conversation("a", messages)).examples[0]
    assert rows[0]["input_ids"] == expected.input_ids and rows[0]["labels"] == expected.labels
    assert rows[0]["text"].endswith("USER: Hi ASSISTANT: Hello!</s>")
    assert rows[1]["labels"].count(mistral_tokenizer.eos_token_id) == 2  # the reply's '</s>' is text, not EOS
    audit = json.loads((tmp_path / "out" / "examples.audit.json").read_text())
    assert (audit["records"], audit["examples"], audit["trained_turns"], audit["ok"]) == (3, 3, 4, True)
    assert "records read      4" in printed and "trained turns" in printed and "vicuna_v1.1" in printed


def test_prepare_loss_mode_flags_and_split_ids(write_file, mistral_dir, tmp_path, capsys):
    data = write_file("data.jsonl", "\n".join(json.dumps(r) for r in RECORDS[:2]))
    out = tmp_path / "split.jsonl"
    assert prepare(data, mistral_dir, out, "--split_example_loss", "--audit", str(tmp_path / "a.json")) == 0
    assert [r["id"] for r in lines(out)] == ["a#0", "b#0", "b#1"]
    assert json.loads((tmp_path / "a.json").read_text())["examples"] == 3
    code = prepare(data, mistral_dir, out, "--last_response_loss", "--split_example_loss")
    assert code == 2 and "--last_response_loss and --split_example_loss" in capsys.readouterr().err


def test_prepare_truncates_and_counts(write_file, mistral_dir, tmp_path, capsys):
    data = write_file("data.json", RECORDS[:2])
    out = tmp_path / "short.jsonl"
    assert prepare(data, mistral_dir, out, "--model_max_length", "48") == 0
    rows = lines(out)
    assert all(len(r["input_ids"]) <= 48 for r in rows)
    audit = json.loads(out.with_suffix(".audit.json").read_text())
    assert audit["truncated"] >= 1 and audit["examples"] + audit["dropped"] == 2


def test_prepare_missing_marker_suggests_add_special_tokens(write_file, mistral_dir, tmp_path, capsys):
    data = write_file("data.json", RECORDS[:1])
    out = tmp_path / "chatml.jsonl"
    assert prepare(data, mistral_dir, out, "--conv_template", "chatml") == 2
    assert "--add_special_tokens" in capsys.readouterr().err
    assert (
        prepare(
            data,
            mistral_dir,
            out,
            "--conv_template",
            "chatml",
            "--add_special_tokens",
            "<|im_start|>",
            "<|im_end|>",
        )
        == 0
    )
    (row,) = lines(out)
    assert row["text"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    # as in `chatsft train` (which saves them in generation_config) the template's stop tokens are stop ids
    audit = json.loads(out.with_suffix(".audit.json").read_text())
    assert audit["ok"] and audit["stop_ids"] == [2, row["input_ids"][-2]] and row["input_ids"][-2] >= 32000


def test_prepare_from_a_model_folder_uses_its_chat_template(write_file, bpe_tokenizer, tmp_path, capsys):
    from transformers import LlamaConfig

    folder = tmp_path / "model"
    bpe_tokenizer.chat_template = BUILTINS["chatml"].jinja()
    try:
        bpe_tokenizer.save_pretrained(folder)
    finally:
        bpe_tokenizer.chat_template = None
    LlamaConfig(
        vocab_size=len(bpe_tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    ).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    data = write_file("data.json", RECORDS[:1])
    out = tmp_path / "tok.jsonl"
    assert prepare(data, folder, out) == 0
    assert "the tokenizer's own chat_template" in capsys.readouterr().out
    (row,) = lines(out)
    assert row["text"] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert trained[-1] == 5  # '<|im_end|>', a stop id of this model's generation config
    assert json.loads(out.with_suffix(".audit.json").read_text())["ok"] is True


def test_preview_terminal_and_html(write_file, mistral_dir, tmp_path, capsys):
    data = write_file("data.json", RECORDS)
    page = tmp_path / "preview.html"
    assert preview(data, mistral_dir, "--index", "1", "--color", "never", "--html", str(page)) == 0
    out = capsys.readouterr().out
    assert "« The token </s> does.</s>»" in out and "« It starts it.</s>»" in out
    assert "USER: And <s>? ASSISTANT:" in out
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and 'class="t' in text and "&lt;/s&gt;" in text
    assert preview(data, mistral_dir, "--id", "c", "--color", "always") == 0
    out = capsys.readouterr().out
    assert "\033[30;42m" in out and "record c " in out and "Be terse." not in out  # coloured token by token
    assert preview(data, mistral_dir, "--index", "9") == 2
    assert "3 accepted records" in capsys.readouterr().err


def test_preview_reports_a_rejected_record(write_file, mistral_dir, tmp_path, capsys):
    """A tokenizer whose own template refuses system messages: that record is rejected with the reason."""
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(mistral_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}" + BUILTINS["mistral"].jinja()
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_file("data.json", RECORDS)
    assert preview(data, folder, "--id", "c") == 1
    assert "rejected: template_error: no system role" in capsys.readouterr().out
    assert preview(data, folder, "--id", "a", "--color", "never") == 0
    assert "<s> [INST] Hi [/INST]« Hello!</s>»" in capsys.readouterr().out


def test_preview_shows_reasoning_tool_calls_and_results(write_file, qwen_tokenizer, tmp_path, capsys):
    """Qwen3's real template on a record with reasoning, a tool call and its result: each part is labelled
    (no colour), has its colour (terminal) and its class (HTML); the tool result is never trained."""
    from importlib import resources

    from tool_data import ACCEPTED

    folder = tmp_path / "qwen3"
    qwen_tokenizer.chat_template = (resources.files("chatsft") / "assets/templates/qwen3.jinja").read_text()
    try:
        qwen_tokenizer.save_pretrained(folder)
    finally:
        qwen_tokenizer.chat_template = None
    record, _, _ = ACCEPTED["reasoning_and_tool_call"]
    data = write_file("tools.json", [{"id": "t\x1b[0m", **record}])
    page = tmp_path / "missing" / "folder" / "p.html"
    assert preview(data, folder, "--color", "never", "--html", str(page)) == 0
    out = capsys.readouterr().out
    assert "record t\\x1b[0m " in out  # the id's escape sequence is shown, not obeyed
    assert out.split("<|im_start|>user\n2+3?<|im_end|>\n")[1].split("\n\n\nwrote")[0] == (
        "<|im_start|>assistant\n«<think>\n⟨reasoning⟩I should add.\n⟨/reasoning⟩</think>\n\n<tool_call>\n"
        '{"name": "⟨call⟩add", "arguments": {"a": 2, "b": 3⟨/call⟩}}\n</tool_call><|im_end|>»\n'
        "<|im_start|>user\n<tool_response>\n⟨result⟩5⟨/result⟩\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n«<think>\n⟨reasoning⟩The tool said 5.\n⟨/reasoning⟩</think>\n\n"
        "2+3 is 5.<|im_end|>»"
    )
    text = page.read_text(encoding="utf-8")
    assert 'class="t1 reasoning"' in text or 'class="t0 reasoning"' in text
    assert ' call"' in text and ' result"' in text and 'class="t0 result"' not in text
    assert preview(data, folder, "--color", "always") == 0
    out = capsys.readouterr().out
    assert "\033[30;45m" in out or "\033[30;105m" in out  # trained reasoning
    assert "\033[30;46m" in out or "\033[30;106m" in out  # trained tool call
    assert "\033[33m" in out or "\033[2;33m" in out  # the tool result, untrained


def test_prepare_defaults_to_the_model_context_as_train_does(write_file, tiny_dir, tmp_path, capsys):
    from conftest import TINY_CTX

    reply = " ".join(str(i) for i in range(100))  # digits: a token or two each, far past the context
    long = {
        "id": "long",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": reply}],
    }
    data = write_file("long.json", [long])
    out = tmp_path / "out.jsonl"
    assert prepare(data, tiny_dir, out, "--conv_template", "chatml") == 0
    printed = capsys.readouterr().out
    assert (
        f"--model_max_length not given: using the model's context, {TINY_CTX} tokens" in printed.splitlines()
    )
    assert max(len(x["input_ids"]) for x in lines(out)) == TINY_CTX  # what train would cut it to


def test_preview_reads_only_as_far_as_the_record(write_file, mistral_dir, tmp_path, capsys):
    whole = json.dumps(RECORDS[:2])
    cut = tmp_path / "cut.json"
    cut.write_text(whole[: whole.index('"id": "b"') + 12], encoding="utf-8")  # cut short in record 'b'
    assert preview(cut, mistral_dir, "--color", "never") == 0
    assert "« Hello!</s>»" in capsys.readouterr().out
    assert preview(cut, mistral_dir, "--index", "1") == 2
    assert "cut.json:" in capsys.readouterr().err  # record 'b' is where the file breaks


# `python -m chatsft ...` that says at exit which of torch and transformers' model configurations (they
# import torch) it imported
AT_EXIT = """
import atexit, runpy, sys
heavy = ("torch", "transformers.configuration_utils")
atexit.register(lambda: print("imported:", [m for m in heavy if m in sys.modules]))
runpy.run_module("chatsft", run_name="__main__")
"""


def test_preview_prepare_and_check_never_import_torch(write_file, tiny_dir, mistral_dir, tmp_path):
    data = write_file("data.json", RECORDS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (SRC, os.environ.get("PYTHONPATH"))))}
    tiny, mistral = ("--model_name_or_path", str(tiny_dir)), ("--model_name_or_path", str(mistral_dir))
    commands = {
        "preview": ["--data_path", str(data), *tiny, "--conv_template", "chatml", "--color", "never"],
        "prepare": ["--data_path", str(data), *mistral, "--output", str(tmp_path / "out.jsonl")],
        "check": [str(data)],
    }
    runs = {}
    for name, flags in commands.items():
        cmd = [sys.executable, "-c", AT_EXIT, name, *flags]
        runs[name] = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert runs[name].stdout.splitlines()[-1] == "imported: []", runs[name].stderr[-2000:]
    preview = runs["preview"]
    assert preview.returncode == 0 and "<|im_start|>assistant\n«Hello!<|im_end|>»" in preview.stdout
    assert runs["prepare"].returncode == 0 and len(lines(tmp_path / "out.jsonl")) == 3
    assert runs["check"].returncode == 1 and "empty" in runs["check"].stdout  # the record with an empty reply
