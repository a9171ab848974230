"""The training loss, computed only where something is trained, and the packing self-test.

Prompt tokens are often more than half of a chat example, and on a small model with a 32k vocabulary the
language-model head and the cross-entropy dominate a step. `causal_lm_loss` therefore projects to the
vocabulary only the hidden states whose next token is trained (`labels[:, 1:] != -100`) and takes the
cross-entropy there. It asks the model itself to do the selection through `logits_to_keep` with a boolean
(batch, seq) mask, which every transformers 5 causal LM applies before its head (`slice_logits_to_keep`):
the call goes through the model's top-level forward, so DDP/FSDP/DeepSpeed/PEFT wrappers, model-specific
head details (logit soft-capping, logit scales) and hooks all still apply. Models that do not support it
(remote code) run their decoder and `lm_head` directly when no distributed wrapper is in the way, else the
full logits are computed and the same loss is taken from them. Every forward passes `use_cache=False`: with
a cache, transformers ignores the packed-sequence boundaries in `position_ids`.

Normalisation follows transformers' `ForCausalLMLoss`: sum over trained targets divided by
`num_items_in_batch` when given (the HF Trainer counts `labels[..., 1:] != -100` over all micro-batches of
an optimizer step, which makes gradient accumulation exact), else the mean over this batch's trained targets
(0, not NaN, when there are none).

The loss head is how the cross-entropy is taken over those logits. "plain" (the default) upcasts them to fp32
and calls `F.cross_entropy`, which keeps an fp32 copy and an fp32 log-softmax of the whole (n_trained, vocab)
block alive for backward: at a 150k vocabulary and 8k trained tokens that is about 10 GB. "chunked"
(`chunked_cross_entropy`) keeps only the logits as the model returned them (bf16 under autocast) and one
log-sum-exp per row, and works in fp32 on a few hundred rows at a time, forward and backward; the result is
the same (tests compare losses and gradients in fp32). It is not the default because the GPU measurement
that would decide it (benchmarks/gpu) has not been run yet.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn.functional as F

from chatsft.collate import IGNORE_INDEX, STATS_KEY, PackedCollator
from chatsft.errors import ConfigError

NON_MODEL_KEYS = (STATS_KEY,)  # batch keys that are ours and never reach the model
LOSS_HEADS = ("plain", "chunked")
CHUNK_BYTES = 1 << 28  # fp32 working block of the chunked head: 256 MiB (441 rows at a 152k vocabulary)


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, seq): True at position i when the token after it, labels[:, i + 1], is trained."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def logits_route(model) -> str:
    """How `causal_lm_loss` gets the trained logits: "logits_to_keep", "decoder" or "full_logits"."""
    inner, wrapped = _unwrap(model)
    base = inner
    if _is_peft(inner):
        if _peft_prompt_learning(inner):
            return "full_logits"  # virtual tokens are prepended: labels no longer line up with positions
        base = inner.get_base_model()
    if _supports_logits_mask(base):
        return "logits_to_keep"
    has_head = isinstance(getattr(base, "lm_head", None), torch.nn.Module)
    if not wrapped and has_head and _decoder(base) is not None:
        return "decoder"
    return "full_logits"


def causal_lm_loss(
    model, inputs: dict, num_items_in_batch=None, *, route: str | None = None, head: str = "plain"
):
    """Next-token cross-entropy over trained targets only -> (loss, aux).

    `inputs` is a collated batch with `labels` (not pre-shifted); everything else but our own keys goes to the
    model. `aux` holds `num_trained` (a 0-d tensor). `route` overrides `logits_route(model)` (for tests);
    `head` is how the cross-entropy is taken over the trained logits (`LOSS_HEADS`).
    """
    if head not in LOSS_HEADS:
        raise ConfigError(f"unknown loss head {head!r}; choose one of {', '.join(LOSS_HEADS)}")
    logits, targets = _trained_logits_and_targets(model, inputs, route)
    if head == "chunked":
        loss = chunked_cross_entropy(logits, targets)
    else:
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    n = torch.tensor(targets.shape[0], device=loss.device)
    if num_items_in_batch is None:
        loss = loss / n.clamp(min=1)
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, {"num_trained": n}


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None):
    """Summed cross-entropy of `logits` (n, vocab) against `targets` (n,), in fp32 blocks of `chunk_rows`.

    Equal to `F.cross_entropy(logits.float(), targets, reduction="sum")`, but it saves for backward only the
    logits themselves and one fp32 log-sum-exp per row; the gradient is built block by block in the logits'
    dtype. Default block: `CHUNK_BYTES` of fp32.
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (4 * max(logits.shape[-1], 1)))
    return _ChunkedCrossEntropy.apply(logits, targets, chunk_rows)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, chunk_rows):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        losses = torch.empty(n, dtype=torch.float32, device=logits.device)
        for start in range(0, n, chunk_rows):
            block = logits[start : start + chunk_rows].float()
            rows = targets[start : start + chunk_rows]
            lse[start : start + chunk_rows] = torch.logsumexp(block, dim=-1)
            target_logit = block.gather(1, rows[:, None]).squeeze(1)
            losses[start : start + chunk_rows] = lse[start : start + chunk_rows] - target_logit
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_rows = chunk_rows
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            end = start + ctx.chunk_rows
            probs = torch.exp(logits[start:end].float() - lse[start:end, None])  # softmax
            probs[torch.arange(probs.shape[0], device=probs.device), targets[start:end]] -= 1.0
            grad[start:end] = (probs * grad_output).to(grad.dtype)
        return grad, None, None


def per_token_losses(model, inputs: dict, *, route: str | None = None) -> torch.Tensor:
    """Cross-entropy of every trained target of `inputs`, in row-major order (1-D)."""
    logits, targets = _trained_logits_and_targets(model, inputs, route)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def check_packing(model, examples: list[dict], tol: float = 1e-4) -> float:
    """Self-test: per-token loss of `examples` packed into one row vs each example alone; max abs difference.

    Runs in eval mode without gradients (restoring the mode). Raises `ConfigError` explaining what is wrong
    when the difference exceeds `tol` (pass `math.inf` to only measure). In bf16 the packed and the single
    forward round differently: 2.5e-3 was measured with sdpa on CPU (4-layer random model), so pass about 1e-2
    there; a model that lets packed examples see each other was off by 0.94 on the same test in fp32.
    """
    if not examples:
        return 0.0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = {k: v.to(device) for k, v in PackedCollator()(examples).items()}
            together = per_token_losses(model, packed)
            alone = [
                per_token_losses(
                    model,
                    {
                        "input_ids": torch.tensor([list(ex["input_ids"])], device=device),
                        "labels": torch.tensor([list(ex["labels"])], device=device),
                    },
                )
                for ex in examples
            ]
    finally:
        model.train(was_training)
    alone_t = torch.cat(alone)
    if together.shape != alone_t.shape:
        diff = float("inf")  # a target crossed an example boundary, or one was lost
    else:
        diff = (together - alone_t).abs().max().item() if together.numel() else 0.0
    if diff > tol:
        attn = getattr(getattr(_unwrap(model)[0], "config", None), "_attn_implementation", "?")
        raise ConfigError(
            f"packing self-test failed: an example's per-token loss differs by {diff:.3g} (tolerance {tol:g})"
            f" between packed and alone with attn_implementation={attn}; this model does not keep packed"
            f" examples apart through position_ids (use sdpa, eager or flash_attention_2, or train without"
            f" packing)"
        )
    return diff


def _trained_logits_and_targets(model, inputs: dict, route: str | None):
    """Logits (n_trained, vocab) where the next token is trained, and those n_trained targets, row-major."""
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in NON_MODEL_KEYS}
    keep = trained_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    logits = _trained_logits(model, model_inputs, keep, route or logits_route(model))
    if logits.shape[0] != targets.shape[0]:
        raise RuntimeError(f"the model returned {logits.shape[0]} logits for {targets.shape[0]} targets")
    return logits, targets.to(logits.device)


def _trained_logits(model, model_inputs: dict, keep: torch.Tensor, route: str) -> torch.Tensor:
    """Logits (n_trained, vocab) at the positions where `keep` is True, computed by `route`."""
    if route == "logits_to_keep":
        out = model(**model_inputs, use_cache=False, logits_to_keep=keep)
        return _logits(out)
    if route == "decoder":
        inner, _ = _unwrap(model)
        base = inner.get_base_model() if _is_peft(inner) else inner
        hidden = _decoder(base)(**model_inputs, use_cache=False)[0]
        return base.lm_head(hidden[keep.to(hidden.device)])
    if route == "full_logits":
        logits = _logits(model(**model_inputs, use_cache=False))
        return logits[keep.to(logits.device)]
    raise ValueError(f"unknown logits route {route!r}")


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _unwrap(model):
    """(innermost module, whether a distributed wrapper was found): DDP/FSDP1/DeepSpeed `.module`, compile."""
    wrapped = any(c.__name__ == "FSDPModule" for c in type(model).__mro__)  # FSDP2 patches the class in place
    while True:
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model, wrapped = model.module, True
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model, wrapped or any(c.__name__ == "FSDPModule" for c in type(model).__mro__)


def _is_peft(model) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def _peft_prompt_learning(model) -> bool:
    config = model.peft_config.get(getattr(model, "active_adapter", "default"))
    return bool(getattr(config, "is_prompt_learning", False))


def _supports_logits_mask(model) -> bool:
    """True when the model's forward takes `logits_to_keep` and slices it with transformers' helper, which
    accepts a boolean (batch, seq) mask (transformers >= 5; remote-code models usually do not)."""
    return _class_supports_logits_mask(type(model))


@functools.cache
def _class_supports_logits_mask(cls) -> bool:
    owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
    if owner is None:
        return False
    module = sys.modules.get(owner.__module__)
    try:
        params = inspect.signature(owner.__dict__["forward"]).parameters
    except (TypeError, ValueError):
        return False
    return "logits_to_keep" in params and getattr(module, "slice_logits_to_keep", None) is not None


def _decoder(base):
    get = getattr(base, "get_decoder", None)
    if callable(get):
        try:
            decoder = get()
        except (NotImplementedError, AttributeError):  # some remote-code models do
            decoder = None
        if isinstance(decoder, torch.nn.Module) and decoder is not base:
            return decoder
    decoder = getattr(base, "model", None)
    return decoder if isinstance(decoder, torch.nn.Module) else None
