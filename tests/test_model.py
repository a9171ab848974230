"""chatsft.training.model: RoPE scaling, pad token, family presets, dtype, attention, LoRA, on tiny saved Llamas."""

from __future__ import annotations

import copy

import pytest
import torch

from chatsft.errors import ConfigError
from chatsft.families import YUAN2_TOKENS, detect_family, family_preset, resolve_preset
from chatsft.tokenizer import (
    add_special_tokens,
    load_config,
    load_tokenizer,
    prepare_tokenizer,
    setup_pad_token,
)
from chatsft.training.lora import apply_lora, merge_lora
from chatsft.training.model import load_model, load_model_for, resize_embeddings, restore_use_cache
from chatsft.training.rope import apply_rope_scaling
from chatsft.training.tiny import build_model

CTX = 64
THETA = 500000.0
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def save_tiny(dest, tokenizer, layers: int = 1):
    """A tiny Llama (hidden 32, context 64, rope_theta 500000) and its tokenizer saved to `dest`."""
    model = build_model(tokenizer, hidden_size=32, layers=layers, heads=4, max_positions=CTX)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": THETA}
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, bpe_tokenizer):
    return save_tiny(tmp_path_factory.mktemp("tiny"), bpe_tokenizer)


def llama3_config(**rope):
    from transformers import LlamaConfig

    params = {
        "rope_type": "llama3",
        "rope_theta": THETA,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        **rope,
    }
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=50,
        max_position_embeddings=131072,
        rope_parameters=params,
    )


# --- RoPE ---------------------------------------------------------------------------------------------------


def test_rope_linear_factor_applied_before_weights_load_and_theta_kept(tiny_dir, tmp_path):
    model, notices = load_model(tiny_dir, model_max_length=4 * CTX)
    assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": THETA, "factor": 4.0}
    assert model.config.max_position_embeddings == CTX
    assert notices[0] == (
        "RoPE: model_max_length 256 > context 64: linear scaling factor 4 applied, rope_theta 500000.0 kept"
    )
    # The rotary embedding was built from the scaled config: theta 500000, frequencies divided by 4.
    dim = model.config.head_dim
    expected = 1.0 / (THETA ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)) / 4.0
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected, rtol=0, atol=0)
    assert model.config.use_cache is False
    restore_use_cache(model)
    model.save_pretrained(tmp_path)
    saved = load_config(tmp_path)
    assert saved.rope_parameters == {"rope_type": "linear", "rope_theta": THETA, "factor": 4.0}
    assert saved.use_cache is True


def test_rope_ceil_ratio_and_no_change_within_context(tiny_dir):
    config = load_config(tiny_dir)
    assert apply_rope_scaling(config, CTX) is None
    assert apply_rope_scaling(config, None) is None
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": THETA}
    apply_rope_scaling(config, CTX + 1)
    assert config.rope_parameters == {"rope_type": "linear", "rope_theta": THETA, "factor": 2.0}


def test_fastchat_assignment_would_lose_theta():
    """Why we do not assign config.rope_scaling as FastChat does: transformers 5 drops rope_theta."""
    config = llama3_config()
    with pytest.warns(FutureWarning):
        config.rope_scaling = {"type": "linear", "factor": 2.0}
    assert config.rope_parameters["rope_theta"] is None and "low_freq_factor" not in config.rope_parameters


def test_rope_llama3_left_alone_when_it_covers():
    config = llama3_config()
    before = dict(config.rope_parameters)
    notice = apply_rope_scaling(config, 100000)
    assert config.rope_parameters == before
    assert config.max_position_embeddings == 131072
    assert notice == (
        "RoPE: existing llama3 scaling (factor 8) already covers model_max_length 100000 "
        "(context 131072): left unchanged"
    )


def test_rope_llama3_extended_not_overwritten():
    from transformers import AutoModelForCausalLM

    config = llama3_config()
    notice = apply_rope_scaling(config, 200000)
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": THETA,
        "factor": 25.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config.max_position_embeddings == 204800
    assert notice == (
        "RoPE: model_max_length 200000 > context 131072: existing llama3 scaling extended, "
        "factor 8 -> 25 over original 8192 positions; max_position_embeddings 131072 -> 204800"
    )
    AutoModelForCausalLM.from_config(config)  # transformers accepts the result


def test_rope_other_existing_scalings():
    from transformers import GPT2Config, LlamaConfig

    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 50,
    }
    # Vicuna-16k style: linear factor 4 over 4096 positions covers 16384; 32768 needs factor 8.
    vicuna = LlamaConfig(
        **small,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    )
    assert "left unchanged" in apply_rope_scaling(vicuna, 16384)
    assert apply_rope_scaling(vicuna, 32768) == (
        "RoPE: model_max_length 32768 > context 16384: existing linear "
        "scaling factor 4 -> 8, rope_theta 10000.0 kept"
    )
    assert vicuna.rope_parameters == {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}
    # Qwen2.5 style yarn: max_position_embeddings is the original length; factor 4 covers 131072.
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6}
    qwen = LlamaConfig(**small, max_position_embeddings=32768, rope_parameters=dict(yarn))
    assert "left unchanged" in apply_rope_scaling(qwen, 131072)
    apply_rope_scaling(qwen, 200000)
    assert qwen.rope_parameters == {**yarn, "factor": 7.0}
    assert qwen.max_position_embeddings == 229376
    longrope = LlamaConfig(
        **small,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "longrope",
            "short_factor": [1.0] * 2,
            "long_factor": [2.0] * 2,
            "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0,
        },
    )
    with pytest.raises(ConfigError, match="'longrope' RoPE scaling cannot be extended"):
        apply_rope_scaling(longrope, 8192)
    with pytest.raises(ConfigError, match="has no RoPE to scale; use --model_max_length 64 or less"):
        apply_rope_scaling(GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=4), 128)


# --- pad token and vocabulary -------------------------------------------------------------------------------


def test_pad_token_kept(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir, model_max_length=128)
    assert setup_pad_token(tokenizer) == "kept"
    assert tokenizer.pad_token == "<pad>"
    assert (tokenizer.model_max_length, tokenizer.padding_side) == (128, "right")


def test_pad_token_unk(mistral_dir):
    tokenizer = load_tokenizer(mistral_dir, model_max_length=128, padding_side="left")
    assert tokenizer.pad_token is None
    assert setup_pad_token(tokenizer) == "unk"
    assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == ("<unk>", 0, 32000)
    assert tokenizer.padding_side == "left"


def test_pad_token_added_and_embeddings_resized(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        ["hello there, general kenobi"] * 5,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    vocab = len(tokenizer)
    assert tokenizer.pad_token is None and tokenizer.unk_token is None
    model = build_model(tokenizer, hidden_size=32, layers=1, heads=4, max_positions=CTX)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    assert setup_pad_token(tokenizer) == "added"
    assert resize_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    assert (tokenizer.pad_token, tokenizer.pad_token_id, len(tokenizer)) == ("<pad>", vocab, vocab + 1)
    assert model.get_input_embeddings().weight.shape == (vocab + 1, 32)
    assert model.get_output_embeddings().weight.shape == (vocab + 1, 32)
    assert model.config.vocab_size == vocab + 1 and model.config.pad_token_id == vocab
    assert torch.equal(model.get_input_embeddings().weight[:vocab], old_in)
    assert torch.equal(model.get_input_embeddings().weight[vocab], old_in.mean(dim=0))
    assert torch.equal(model.get_output_embeddings().weight[vocab], old_out.mean(dim=0))


def test_yuan2_preset_adds_tokens_and_resizes(tiny_dir, bpe_tokenizer):
    vocab = len(bpe_tokenizer)
    tokenizer, preset, notices = prepare_tokenizer(tiny_dir, model_max_length=CTX, model_family="yuan2")
    model, grew, more = load_model_for(tokenizer, tiny_dir)
    assert preset.template == "yuan2" and preset.special_tokens == YUAN2_TOKENS
    # The tiny vocabulary already holds <eod>, <sep>, <pad>: the 13 others take the next ids, in list order
    new = [t for t in YUAN2_TOKENS if t not in ("<eod>", "<sep>", "<pad>")]
    assert len(new) == 13 and len(tokenizer) == vocab + 13
    assert tokenizer.convert_tokens_to_ids(new) == list(range(vocab, vocab + 13))
    assert tokenizer.convert_tokens_to_ids("<eod>") == bpe_tokenizer.convert_tokens_to_ids("<eod>")
    assert tokenizer.tokenize("a<FIM_MIDDLE>b") == ["a", "<FIM_MIDDLE>", "b"]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert grew and f"pad token {tokenizer.pad_token!r} (kept)" in notices
    assert "family yuan2: template yuan2, 13 special tokens added" in notices
    assert f"embeddings resized {vocab} -> {vocab + 13} (new rows = mean of the old ones)" in more
    assert add_special_tokens(tokenizer, YUAN2_TOKENS) == 0 and not resize_embeddings(model, tokenizer)


def test_family_detection():
    assert detect_family("yuan") == "yuan2"
    assert detect_family("baichuan", vocab_size=125696) == "baichuan2"
    assert detect_family("baichuan", vocab_size=64000) == "baichuan"
    assert (
        detect_family("baichuan", name_or_path="/models/Baichuan2-13B-Chat", vocab_size=None) == "baichuan2"
    )
    assert detect_family("baichuan", name_or_path="/models/Baichuan-13B-Chat", vocab_size=None) == "baichuan"
    assert detect_family("llama", name_or_path="/models/vicuna-7b") == "none"
    with pytest.raises(ConfigError, match="cannot tell Baichuan from Baichuan2"):
        detect_family("baichuan", name_or_path="/models/my-finetune", vocab_size=70000)
    assert family_preset("baichuan").template == "baichuan-chat"
    assert family_preset("Baichuan2").template == "baichuan2-chat"
    assert family_preset("baichuan2").special_tokens == []
    with pytest.raises(ConfigError, match="unknown model family 'falcon'; choose one of yuan2, baichuan"):
        family_preset("falcon")

    class Config:
        model_type, vocab_size = "baichuan", 125696

    assert resolve_preset(Config()).name == "baichuan2"
    assert resolve_preset(Config(), model_family="baichuan").name == "baichuan"


# --- dtype, attention, errors -------------------------------------------------------------------------------


def test_dtype(tiny_dir):
    model, notices = load_model(tiny_dir, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert notices[-1].startswith("model: llama, ") and "bfloat16, attention sdpa" in notices[-1]
    # None: float32 master weights; auto: the checkpoint's dtype (float32 here)
    for dtype in (None, "fp32", "auto"):
        model, _ = load_model(tiny_dir, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        load_model(tiny_dir, dtype="int8")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_recorded(tiny_dir, attn):
    model, _ = load_model(tiny_dir, attn_implementation=attn)
    assert model.config._attn_implementation == attn


def test_flash_attention_without_cuda_is_a_config_error(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ConfigError) as err:
        load_model(tiny_dir, attn_implementation="flash_attention_2")
    assert str(err.value) == (
        "attn_implementation=flash_attention_2 needs a CUDA GPU, and none is visible; "
        "use sdpa (the default) or eager"
    )
    with pytest.raises(ConfigError, match="unknown attn_implementation 'flash'"):
        load_model(tiny_dir, attn_implementation="flash")


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^model folder '.*nope' does not exist$"):
        load_model(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"^model folder '.*' has no config.json$"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match=r"^cannot load the tokenizer from '.*'"):
        load_tokenizer(tmp_path, model_max_length=16)
    with pytest.raises(ConfigError, match=r"^cannot load the model config from 'nobody/nothing': "):
        load_model("nobody/nothing")  # a hub id: not cached, and the tests run offline
    with pytest.raises(ConfigError, match="padding_side must be 'right' or 'left'"):
        load_tokenizer(tmp_path, model_max_length=16, padding_side="middle")


# --- LoRA ---------------------------------------------------------------------------------------------------


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
