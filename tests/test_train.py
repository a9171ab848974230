"""End to end on CPU: train a tiny model built in-process, checkpoint, resume past a damaged checkpoint, save,
reload."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chatsft.commands.train import cli, main
from chatsft.templates import get_template, render_text
from chatsft.training.tiny import build_model, build_tokenizer

pytestmark = pytest.mark.slow

CAPITALS = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Egypt", "Cairo"),
]


def conversations(n: int = 24) -> list[dict]:
    out = []
    for i in range(n):
        country, city = CAPITALS[i % len(CAPITALS)]
        other, other_city = CAPITALS[(i + 1) % len(CAPITALS)]
        turns = [
            {"from": "human", "value": f"What is the capital of {country}?"},
            {"from": "gpt", "value": f"The capital of {country} is {city}."},
        ]
        if i % 2:
            turns += [
                {"from": "human", "value": f"And of {other}?"},
                {"from": "gpt", "value": f"The capital of {other} is {other_city}."},
            ]
        out.append({"id": f"c{i}", "conversations": turns})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data.json"
    records = conversations()
    data.write_text(json.dumps(records))
    template, _ = get_template("vicuna_v1.1")
    from chatsft.records import read_conversations

    convs, _ = read_conversations([data])
    texts = [render_text(template, c.messages, bos="<s>", eos="</s>") for c in convs]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    base = root / "base"
    build_model(tokenizer, hidden_size=32, layers=2, heads=2, max_positions=256).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return root, base, data, convs


def flags(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(base),
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--conv_template",
        "vicuna_v1.1",
        "--model_max_length",
        "128",
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--logging_steps",
        "1",
        "--save_steps",
        "2",
        "--use_cpu",
        "True",
        "--report_to",
        "none",
        "--seed",
        "0",
        "--data_seed",
        "0",
        "--cache_dir",
        str(out.parent / "cache"),
        "--disable_tqdm",
        "True",
        *extra,
    ]


def test_train_checkpoint_resume_save(setup, capsys):
    root, base, data, convs = setup
    out = root / "run"
    assert main(flags(base, data, out)) == 0
    printed = capsys.readouterr().out
    assert "end in a stop token            " in printed

    state = json.loads((out / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert all((p / "chatsft-complete.json").is_file() for p in out.glob("checkpoint-*"))

    # every parameter the optimiser touched has changed
    before = load_file(base / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []

    # the saved folder is an ordinary transformers model whose chat template renders the training text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache is True
    template, _ = get_template("vicuna_v1.1")
    for conv in convs[:3]:
        expected = render_text(template, conv.messages, bos=tokenizer.bos_token, eos=tokenizer.eos_token)
        assert tokenizer.apply_chat_template(conv.messages, tokenize=False) == expected
    assert tokenizer.eos_token_id in (
        [model.generation_config.eos_token_id]
        if isinstance(model.generation_config.eos_token_id, int)
        else model.generation_config.eos_token_id
    )
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    audit = json.loads((out / "audit.json").read_text())
    assert audit["train"]["examples"] == 24 and audit["train"]["rejected"] == {}

    # the same command again: the run is finished, nothing trains
    assert main(flags(base, data, out)) == 0
    assert "already holds the final model of this same run: nothing to train" in capsys.readouterr().out

    # as if killed before the final save, with the newest checkpoint damaged: the same command skips it,
    # resumes from checkpoint-4, reaches step 6
    (out / "chatsft-final.json").unlink()
    (out / "checkpoint-6" / "model.safetensors").write_bytes(b"truncated")
    assert main(flags(base, data, out)) == 0
    printed = capsys.readouterr().out
    assert "checkpoint-6" in printed and "skip" in printed.lower()
    assert "checkpoint-4" in printed
    state2 = json.loads((out / "trainer_state.json").read_text())
    assert state2["global_step"] == 6
    resumed = [e["loss"] for e in state2["log_history"] if "loss" in e]
    assert resumed[:4] == losses[:4]  # steps 1-4 come from checkpoint-4's history
    assert resumed[4:] == pytest.approx(losses[4:], rel=1e-4)  # same data order and RNG after resuming


def test_split_eval_and_rejects(setup, tmp_path, capsys):
    root, base, data, _ = setup
    bad = tmp_path / "mixed.json"
    records = conversations(20) + [{"id": "bad", "conversations": [{"from": "human", "value": "x"}]}]
    bad.write_text(json.dumps(records))
    out = tmp_path / "run"
    argv = flags(
        base,
        bad,
        out,
        "--train_ratio",
        "0.8",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "3",
        "--max_steps",
        "3",
        "--save_strategy",
        "no",
        "--eval_generations",
        "2",
        "--eval_generation_max_new_tokens",
        "6",
    )
    if not torch.cuda.is_available():  # a CPU machine needs no --use_cpu
        del argv[argv.index("--use_cpu") : argv.index("--use_cpu") + 2]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    split = re.search(r"split 20 conversations \(seed 0\): (\d+) train, (\d+) eval", printed)
    assert split and int(split[2]) >= 2, printed  # the held-out share is drawn per conversation
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == ["bad"]
    state = json.loads((out / "trainer_state.json").read_text())
    history = state["log_history"]

    # evaluated once at step 3 (the last), not again after training; both losses named in the summary
    assert [e["step"] for e in history if "eval_loss" in e] == [3]
    losses = [e["loss"] for e in history if "loss" in e]
    lines = printed.splitlines()
    assert (
        f"[chatsft] training done: 3 steps, average train loss {history[-1]['train_loss']:.4f}, last "
        + (f"logged train loss {losses[-1]:.4f} (step 3)")
        in lines
    )
    eval_loss = next(e["eval_loss"] for e in history if "eval_loss" in e)
    assert f"[chatsft] eval loss {eval_loss:.4f} (step 3)" in lines
    # logs print numbers, not quoted strings
    logged = [x for x in lines if x.startswith("{'loss': ")]
    assert len(logged) == 3 and logged[0].startswith(f"{{'loss': {float(f'{losses[0]:.4g}')}, 'grad_norm': ")
    assert "'loss': '" not in printed

    # two sampled replies to eval prompts at the evaluation: printed, kept in generations.jsonl
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 3]
    assert all(
        r["prompt"].endswith(" ASSISTANT:") and r["reference"].startswith("The capital of ") for r in rows
    )
    assert [x for x in lines if x.startswith("[chatsft] eval generation ")] == [
        f"[chatsft] eval generation {i}/2 at step 3: ...{r['prompt'][-60:]!r} -> {r['completion']!r}"
        for i, r in enumerate(rows, 1)
    ]
    if not torch.cuda.is_available():
        assert "[chatsft] no GPU is visible: training on CPU (as with --use_cpu True)" in lines
    assert "pin_memory" not in captured.err


def test_user_mistakes_are_one_line(setup, tmp_path, capsys):
    root, base, data, _ = setup
    cases = [
        (flags(base, tmp_path / "missing.json", tmp_path / "o1"), "missing.json: no such file"),
        (
            flags(
                base, data, tmp_path / "o2", "--loss_mode", "last_response", "--split_example_loss", "True"
            ),
            "both choose the loss",
        ),
        (flags(base, data, tmp_path / "o3", "--conv_template", "nonsense"), "nonsense"),
    ]
    # The first through `python -m chatsft.train` as a user starts it (exit status, stderr of the whole
    # process); the others through the same entry function in this process, which spares two interpreter
    # starts (about 10 s of imports each): a traceback there would be an exception escaping `cli`.
    for i, (argv, expected) in enumerate(cases):
        if i == 0:
            proc = subprocess.run(
                [sys.executable, "-m", "chatsft.train", *argv], capture_output=True, text=True
            )
            code, err = proc.returncode, proc.stderr
        else:
            code, err = cli(argv), capsys.readouterr().err
        assert code != 0
        assert "Traceback" not in err, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith("chatsft train: error:") and expected in last


def test_lora_adapter_and_merged_save(setup, tmp_path, capsys):
    root, base, data, convs = setup
    out = tmp_path / "lora"
    assert (
        main(
            flags(
                base,
                data,
                out,
                "--lora_r",
                "4",
                "--lora_alpha",
                "8",
                "--merge_lora",
                "True",
                "--max_steps",
                "2",
                "--save_strategy",
                "no",
            )
        )
        == 0
    )
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    ids = tokenizer.apply_chat_template(
        convs[0].messages, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, adapted(**ids).logits, atol=1e-5)

    # `chatsft chat` talks to the adapter folder (it names its base by an absolute path) and to the merged one
    from chatsft.commands.cli import main as chatsft

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n")
    for folder in (out, out / "merged"):
        assert (
            chatsft(["chat", "--model", str(folder), "--prompts", str(prompts), "--max_new_tokens", "4"]) == 0
        )
