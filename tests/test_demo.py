"""`chatsft demo`, the README's main job, end to end but short: one epoch instead of sixteen."""

from __future__ import annotations

import json

import pytest

from chatsft.commands.cli import main
from chatsft.commands.demo import DEMO_PROMPTS


@pytest.mark.slow
def test_demo_trains_saves_and_answers(tmp_path, capfd):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--output_dir", str(out)]) == 0
    printed = capfd.readouterr().out
    assert [line.strip() for line in printed.splitlines() if line.strip().startswith("USER:")] == [
        f"USER: {p}" for p in DEMO_PROMPTS
    ]
    assert printed.count("    before: ") == 5 and printed.count("    after:  ") == 5
    assert "[chatsft] training done: 25 steps" in printed  # 395 conversations, batches of 16

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = out / "chat-model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.model_type == "llama"
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("USER: Hi ASSISTANT:")
    assert json.loads((model_dir / "audit.json").read_text())["train"]["records"] == 395
    assert (model_dir / "loss.png").is_file()
