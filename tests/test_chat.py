"""`chatsft chat`: replies through the saved chat template, ending at the saved stop ids; one-shot and stdin.

The model is a tiny random Llama, so what it says is noise, but it is exact noise: the expected reply is
computed here by a greedy loop of plain forwards over the rendered template, and the saved stop id is a token
that loop emits at a known position, so the reply must end exactly there.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chatsft.commands.cli import main
from chatsft.templates import get_template
from chatsft.training.tiny import build_model, build_tokenizer

CORPUS = [
    "USER: What is the capital of France? ASSISTANT: The capital of France is Paris.</s>",
    "USER: Hello there! ASSISTANT: Hello! How can I help you today?</s>",
] * 20


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([out])).logits
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]


def prompt_ids(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A saved folder whose generation_config stops on a token the model emits for "Hello" after three or
    more others; with that stop id and the reply it cuts to."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    tokenizer.chat_template = get_template("vicuna_v1.1")[0].jinja()
    model = build_model(tokenizer, hidden_size=32, layers=1, heads=2, max_positions=256)
    model.eval()
    tokens = greedy(model, prompt_ids(tokenizer, [{"role": "user", "content": "Hello"}]), 12)
    k = next(i for i in range(3, 12) if tokens[i] not in tokens[:i] and tokens[i] != tokenizer.eos_token_id)
    assert tokenizer.eos_token_id not in tokens[:k]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokens[k]]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, tokens[k], tokenizer.decode(tokens[:k], skip_special_tokens=True).strip()


def expected_reply(folder, messages, stop: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = greedy(model, prompt_ids(tokenizer, messages), 24)
    stops = {stop, tokenizer.eos_token_id}
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()


def test_chat_prompts_file_answers_each_prompt_and_stops_at_the_saved_stop_id(chat_model, tmp_path, capsys):
    folder, stop, _ = chat_model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nWhat is the capital of France?\n")
    assert main(["chat", "--model", str(folder), "--prompts", str(prompts), "--max_new_tokens", "24"]) == 0
    hello = expected_reply(folder, [{"role": "user", "content": "Hello"}], stop)
    france = expected_reply(folder, [{"role": "user", "content": "What is the capital of France?"}], stop)
    assert capsys.readouterr().out == (
        f"USER: Hello\nASSISTANT: {hello}\n\nUSER: What is the capital of France?\nASSISTANT: {france}\n\n"
    )
    assert hello == chat_model[2]  # cut exactly where the model emitted the saved stop id


def test_chat_reads_turns_from_stdin_keeps_history_and_resets(chat_model, monkeypatch, capsys):
    folder, stop, _ = chat_model
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nHello\n/reset\nHello\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(folder), "--max_new_tokens", "24"]) == 0
    first = expected_reply(folder, [{"role": "user", "content": "Hello"}], stop)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first}]
    second = expected_reply(folder, [*history, {"role": "user", "content": "Hello"}], stop)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"[chatsft] chatting with {folder} (its saved chat template; replies stop at ")
    assert out[1:] == [
        "USER: Hello",
        f"ASSISTANT: {first}",
        "",
        "USER: Hello",
        f"ASSISTANT: {second}",
        "",
        "[chatsft] new conversation",
        "USER: Hello",
        f"ASSISTANT: {first}",
        "",
    ]


def test_chat_mistakes_are_one_line(chat_model, tmp_path, capsys):
    folder, _, _ = chat_model
    assert main(["chat", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"chatsft chat: error: --model {tmp_path / 'nowhere'}: no such folder\n"
    assert main(["chat", "--model", str(folder), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert capsys.readouterr().err == (
        f"chatsft chat: error: --prompts {tmp_path / 'none.txt'}: No such file or directory\n"
    )
    no_template = tmp_path / "plain"
    no_template.mkdir()
    (no_template / "config.json").write_text(json.dumps({"model_type": "llama"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["chat", "--model", str(no_template)]) == 2
    assert "the tokenizer has no chat template" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # an abbreviation is an unknown flag, not a guess
        main(["chat", "--mod", str(folder)])
    assert exit_.value.code == 2
