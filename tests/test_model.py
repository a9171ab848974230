"""chatsft.training.model: dtype, attention implementation, one-line errors, on tiny saved Llamas."""

from __future__ import annotations

import pytest
import torch

from chatsft.errors import ConfigError
from chatsft.tokenizer import (
    load_tokenizer,
)
from chatsft.training.model import load_model


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
