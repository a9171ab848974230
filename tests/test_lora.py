"""chatsft.training.lora: adapters, trained embeddings, tied heads, bias, merging."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_CTX as CTX

from chatsft.errors import ConfigError
from chatsft.tokenizer import (
    add_special_tokens,
    prepare_tokenizer,
)
from chatsft.training.lora import apply_lora, merge_lora
from chatsft.training.model import load_model, load_model_for, resize_embeddings

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _batch(vocab: int):
    ids = torch.arange(10).remainder(vocab).unsqueeze(0) + 3
    return {"input_ids": ids, "labels": ids.clone()}


def test_lora_trains_only_adapters_with_checkpointing_and_merges(tiny_dir):
    model, _ = load_model(tiny_dir, gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    peft_model, notice = apply_lora(model, r=4, alpha=8, dropout=0.0)
    assert notice.startswith(f"LoRA r=4 alpha=8 dropout=0.0 on {', '.join(LLAMA_TARGETS)}: ")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(LLAMA_TARGETS)
    peft_model.train()
    batch = _batch(model.config.vocab_size)
    peft_model(**batch).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    # B starts at 0, so A's grads are 0 on the first step: B's must not be
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)

    with torch.no_grad():  # give the adapters weight so that merging has something to fold in
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=batch["input_ids"]).logits
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, adapted, rtol=1e-5, atol=1e-5)


def test_lora_trains_resized_embeddings(tiny_dir):
    tokenizer, _, _ = prepare_tokenizer(tiny_dir, model_max_length=CTX, model_family="yuan2")
    model, grew, _ = load_model_for(tokenizer, tiny_dir)
    peft_model, notice = apply_lora(
        model,
        r=2,
        alpha=4,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        train_embeddings=grew,
    )
    assert "training embed_tokens, lm_head in full" in notice
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    full = {n for n in trainable if "lora_" not in n}
    assert full == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    }
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable - full} == {"q_proj", "v_proj"}
    peft_model.train()
    peft_model(**_batch(len(tokenizer))).loss.backward()
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    peft_model.eval()
    ids = torch.tensor([[3, len(tokenizer) - 1, 5]])  # includes a new token
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = merge_lora(peft_model)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    with pytest.raises(ConfigError, match="LoRA target modules not in the model: qkv"):
        apply_lora(merged, target_modules=["qkv"])


def test_lora_tied_embeddings_stay_tied(bpe_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = copy.deepcopy(bpe_tokenizer)  # the session fixture must not grow
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert add_special_tokens(tokenizer, ["<x>", "<y>"]) == 2 and resize_embeddings(model, tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    peft_model, notice = apply_lora(model, r=2, alpha=4, dropout=0.0, train_embeddings=True)
    assert "training embed_tokens, lm_head in full" in notice
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trained == ["base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    copies = peft_model.base_model.model
    assert (
        copies.lm_head.modules_to_save["default"].weight
        is copies.model.embed_tokens.modules_to_save["default"].weight
    )
    merged = merge_lora(peft_model)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


@pytest.mark.parametrize(
    ("bias", "trained_biases"),
    [
        ("none", set()),
        ("lora_only", {"q_proj", "v_proj"}),  # biases of the adapted layers only
        ("all", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_lora_bias_trains_the_chosen_biases(bias, trained_biases):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        attention_bias=True,
        mlp_bias=True,
    )
    model = LlamaForCausalLM(config)
    peft_model, notice = apply_lora(model, r=2, dropout=0.0, target_modules=["q_proj", "v_proj"], bias=bias)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    biases = {n.replace(".base_layer", "").rsplit(".", 2)[-2] for n in trainable if n.endswith(".bias")}
    assert biases == trained_biases
    assert {n for n in trainable if not n.endswith(".bias")} == {
        n for n, _ in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n
    }
    assert notice.startswith(
        "LoRA r=2 alpha=16 dropout=0.0 on q_proj, v_proj" + ("" if bias == "none" else f", biases: {bias}")
    )


def test_lora_adapter_loads_from_another_directory(tiny_dir, tmp_path, monkeypatch):
    """The base model typed as a relative path, as `--model_name_or_path base` would be: the adapter folder
    must still load with AutoModelForCausalLM from anywhere (peft records the base path as given)."""
    import shutil
    import warnings

    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_dir, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("base")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecation noise from peft's checkpointing probe
        peft_model, _ = apply_lora(model, r=4, alpha=8, dropout=0.0)
    peft_model.save_pretrained("run/adapter")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter")
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert any("lora_A" in name for name, _ in loaded.named_parameters())
