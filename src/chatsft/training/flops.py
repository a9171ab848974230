"""Model FLOPs of training, counted from the model's config, and the bf16 peak of the device that runs them.

MFU (model FLOPs utilisation) is the model FLOPs done per second over the device's peak. Model FLOPs count
the matrix products a dense decoder needs, as in PaLM's appendix B and torchtitan: 2 FLOPs per weight per
position forward and twice that backward, so 6 per weight per position in training; attention adds QK^T and
AV, 4 x the query width per (query, key) pair forward, 12 x in training, in every layer. Two choices differ
from the common formula (6N + 12 L d T per token) and are stated so that figures can be compared: the
language-model head counts only at trained positions (the loss needs it nowhere else, and chatsft computes it
nowhere else), and attention counts the causal pairs of each example (s(s+1)/2 for an example of s tokens,
packed examples kept apart), not T^2 per row: work that is needed, not work a kernel happens to do.
Recomputation under gradient checkpointing is not model FLOPs; norms, activations, rotary and softmax are
left out (a few percent).

The peak is the dense bf16 tensor-core rate from the vendor's datasheet, looked up by the name torch gives the
device. A device not in the table (any CPU) gets no MFU rather than a guessed one; so do configs this count
does not describe (mixture-of-experts, non-gated MLPs, model types not listed). `measure_matmul_peak` times a
large bf16 product on the device, for benchmarks that report MFU against a measured ceiling as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Dense bf16 tensor-core TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(); the first
# match wins.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM ("NVIDIA H100 80GB HBM3"); the H200 and GH200 have the same tensor cores
    "H200": 989.4,
    "GH200": 989.4,
    "H800": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "RTX 4090": 165.2,
}
# Dense decoders whose MLP is gated (gate, up, down: 3 x hidden x intermediate) and whose attention is q, k,
# v, o.
GATED_DECODERS = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite"}
)


@dataclass(frozen=True)
class ModelFlops:
    """Weights applied per position, split by where they apply; `step` turns batch counts into FLOPs."""

    body: int  # attention projections and MLP of all layers: applied at every position
    head: int  # hidden x vocabulary: applied at trained positions
    attention: int  # layers x query width: per causal (query, key) pair

    def step(self, tokens: int, trained: int, attended: int) -> int:
        """Training FLOPs (forward and backward): `tokens` positions, `trained` targets, `attended` pairs."""
        return 6 * self.body * tokens + 6 * self.head * trained + 12 * self.attention * attended


def model_flops(config) -> ModelFlops | None:
    """The FLOP counts of a dense gated decoder from its config; None when this count does not describe it."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "model_type", None) not in GATED_DECODERS:
        return None
    if any(getattr(config, key, 0) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        return None
    try:
        hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
        heads, inter = int(config.num_attention_heads), int(config.intermediate_size)
        vocab = int(config.vocab_size)
    except (AttributeError, TypeError):
        return None
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    per_layer = hidden * q_width + 2 * hidden * kv_width + q_width * hidden + 3 * hidden * inter
    return ModelFlops(body=layers * per_layer, head=hidden * vocab, attention=layers * q_width)


def device_name(device) -> str:
    """The name torch gives a CUDA device ("NVIDIA H200"); the device type for anything else ("cpu")."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(device, table: dict[str, float] | None = None) -> tuple[str, float] | None:
    """(device name, dense bf16 peak in FLOP/s) from `table` (default `PEAK_BF16_TFLOPS`); None if unknown."""
    name = device_name(device)
    for key, tflops in (PEAK_BF16_TFLOPS if table is None else table).items():
        if key in name:
            return name, tflops * 1e12
    return None


def mfu_notice(flops: ModelFlops | None, peak: tuple[str, float] | None) -> str:
    """The log line that says what the `mfu` field is measured against, or why there is none."""
    if flops is None:
        return "MFU not logged: the FLOP count does not describe this model (or only adapters train)"
    if peak is None:
        return "MFU not logged: no bf16 peak known for this device"
    name, tflops = peak[0], peak[1] / 1e12
    return f"MFU (field mfu) against the {name}'s dense bf16 peak, {tflops:.0f} TFLOP/s (datasheet)"


def measure_matmul_peak(device, size: int = 8192, repeats: int = 10, dtype=None) -> float:
    """FLOP/s of a size x size x size matrix product on `device` (bf16 by default): mean of `repeats` timed
    products after three warm-ups, on random data."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start)
