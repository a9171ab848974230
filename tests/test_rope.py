"""chatsft.training.rope: RoPE scaling for a longer model_max_length, set on the config before weights
load."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CTX as CTX
from conftest import TINY_THETA as THETA

from chatsft.errors import ConfigError
from chatsft.tokenizer import (
    load_config,
)
from chatsft.training.model import load_model, restore_use_cache
from chatsft.training.rope import apply_rope_scaling


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
