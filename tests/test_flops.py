"""flops.py: the FLOP count from a config equals a hand count (tiny Llama and Qwen2) and the weights of the
model built from that config; the peak table is looked up by device name; configs it does not describe get
none."""

from __future__ import annotations

import torch

from chatsft.training.flops import (
    PEAK_BF16_TFLOPS,
    ModelFlops,
    measure_matmul_peak,
    mfu_notice,
    model_flops,
    peak_flops,
)


def _matmul_weights(model) -> tuple[int, int]:
    """(weights of every nn.Linear but the head, the head's), counted on the built model."""
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return sum(m.weight.numel() for m in linears), head.weight.numel()


def test_llama_count_by_hand():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    # per layer: q 16x16 = 256, k and v 16x8 = 128 each, o 256, MLP 3 x 16 x 40 = 1920 -> 2688; two layers
    flops = model_flops(config)
    assert flops == ModelFlops(body=5376, head=1600, attention=2 * 16)
    assert _matmul_weights(AutoModelForCausalLM.from_config(config)) == (5376, 1600)
    # 10 tokens, 4 trained, two examples of 6 and 4 tokens: 21 + 10 causal pairs
    assert flops.step(tokens=10, trained=4, attended=31) == 6 * 5376 * 10 + 6 * 1600 * 4 + 12 * 32 * 31


def test_qwen2_count_by_hand_with_tied_head_and_one_kv_head():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    # head_dim 8: q 32x32 = 1024, k and v 32x8 = 256 each, o 1024, MLP 3 x 32 x 64 = 6144 -> 8704 per layer
    assert model_flops(config) == ModelFlops(body=3 * 8704, head=1600, attention=3 * 32)
    # the head is tied to the embeddings but still a matrix product at every trained position
    assert _matmul_weights(AutoModelForCausalLM.from_config(config)) == (3 * 8704, 1600)


def test_qwen2_5_1_5b_shape():
    """The benchmark's model: 1.31e9 matmul weights in the body, 151936 x 1536 in the head."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    )
    flops = model_flops(config)
    per_layer = 1536 * 1536 * 2 + 2 * 1536 * 256 + 3 * 1536 * 8960
    assert flops.body == 28 * per_layer == 1_310_195_712
    assert flops.head == 151936 * 1536 and flops.attention == 28 * 1536


def test_configs_the_count_does_not_describe():
    from transformers import GPT2Config, MixtralConfig

    assert model_flops(GPT2Config()) is None  # not a gated decoder
    assert model_flops(MixtralConfig(num_hidden_layers=1)) is None  # experts
    assert mfu_notice(None, None).startswith("MFU not logged: the FLOP count")


def test_peak_table_by_device_name():
    assert peak_flops("cpu") is None
    assert mfu_notice(ModelFlops(1, 1, 1), None) == "MFU not logged: no bf16 peak known for this device"
    table = {"cpu": 2.0}
    assert peak_flops(torch.device("cpu"), table) == ("cpu", 2e12)
    assert PEAK_BF16_TFLOPS["H200"] == PEAK_BF16_TFLOPS["H100"]
    assert next(k for k in PEAK_BF16_TFLOPS if k in "NVIDIA H100 PCIe") == "H100 PCIe"  # before "H100"
    assert mfu_notice(ModelFlops(1, 1, 1), ("NVIDIA H200", 989.4e12)) == (
        "MFU (field mfu) against the NVIDIA H200's dense bf16 peak, 989 TFLOP/s (datasheet)"
    )


def test_measured_matmul_peak_on_cpu_is_positive():
    assert measure_matmul_peak("cpu", size=64, repeats=2, dtype=torch.float32) > 0
