"""RoPE scaling when `--model_max_length` exceeds the model's context, applied to the config before weights
load.

transformers 5 keeps RoPE settings in `config.rope_parameters`, one dict holding `rope_type`, `rope_theta`
and the scaling keys (`factor`, `original_max_position_embeddings`, ...). FastChat's
`config.rope_scaling = {"type": "linear", "factor": f}` goes through a deprecated setter that replaces that
dict, so `rope_theta` becomes None and an existing `llama3`/`yarn` scaling is lost; we edit a copy instead.
"""

from __future__ import annotations

import math

from chatsft.errors import ConfigError


def _covered(rtype: str, params: dict, ctx: int) -> float:
    """The context length the current RoPE settings cover, in transformers' conventions per type."""
    factor = float(params.get("factor") or 1.0)
    if rtype == "default":
        return ctx
    if rtype == "linear":  # positions are divided by factor: max_position_embeddings is the pretrained length
        return ctx * factor
    if rtype == "dynamic":  # NTK base grows with the sequence length at run time
        return math.inf
    # Llama-3.1 keeps the extended length in max_position_embeddings, Qwen's yarn the original one
    if rtype in ("llama3", "yarn"):
        return max(ctx, (params.get("original_max_position_embeddings") or ctx) * factor)
    return ctx


def apply_rope_scaling(config, model_max_length: int | None) -> str | None:
    """Scale RoPE in `config` (in place) so its context covers `model_max_length`; return a notice, or None.

    No scaling yet: linear, factor ceil(model_max_length / max_position_embeddings) (FastChat's rule),
    rope_theta and every other key kept. An existing scaling keeps its type: left alone when it already covers
    the length, else its factor is raised (linear: over max_position_embeddings; llama3/yarn: over
    original_max_position_embeddings, with max_position_embeddings raised to match, which is where vLLM reads
    the context of a llama3 model). `dynamic` adapts at run time and is left alone; other types (longrope,
    ...) cannot be extended safely and raise `ConfigError`.
    """
    ctx = getattr(config, "max_position_embeddings", None)
    if not model_max_length or not ctx:
        return None
    has_rope = hasattr(config, "rope_parameters")
    remote = not type(config).__module__.startswith("transformers.")
    params = getattr(config, "rope_parameters", None) or {}
    nested = any(isinstance(v, dict) for v in params.values())  # gemma3-style, one dict per layer type
    rtype = params.get("rope_type") or params.get("type") or "default"
    covered = _covered(rtype, params, ctx) if not nested else ctx
    if model_max_length <= covered:
        if rtype == "default":
            return None
        return (
            f"RoPE: existing {rtype} scaling (factor {float(params.get('factor') or 1):g}) already covers "
            f"model_max_length {model_max_length} "
            f"(context {covered if covered != math.inf else 'unbounded'}): left unchanged"
        )
    name = getattr(config, "model_type", None) or type(config).__name__
    if nested:
        raise ConfigError(
            f"model_max_length {model_max_length} exceeds {name}'s context {ctx} and its per-layer "
            "RoPE parameters cannot be scaled by chatsft; lower --model_max_length"
        )
    if not has_rope and not remote:
        raise ConfigError(
            f"model_max_length {model_max_length} exceeds {name}'s {ctx} positions and the model has "
            f"no RoPE to scale; use --model_max_length {ctx} or less"
        )
    new = dict(params)
    theta = new.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        new["rope_theta"] = theta
    if rtype in ("default", "linear"):
        new["rope_type"] = "linear"
        new["factor"] = float(math.ceil(model_max_length / ctx))
        if "type" in new or remote:  # legacy readers (remote code) look at "type"
            new["type"] = "linear"
        kept = f", rope_theta {theta} kept" if theta is not None else ""
        what = (
            "linear scaling factor {:g} applied".format(new["factor"])
            if rtype == "default"
            else "existing linear scaling factor {:g} -> {:g}".format(
                float(params.get("factor") or 1), new["factor"]
            )
        )
        notice = f"RoPE: model_max_length {model_max_length} > context {int(covered)}: {what}{kept}"
    elif rtype in ("llama3", "yarn"):
        orig = int(new.get("original_max_position_embeddings") or ctx)
        new["original_max_position_embeddings"] = orig
        new["factor"] = float(math.ceil(model_max_length / orig))
        new_ctx = max(ctx, int(orig * new["factor"]))
        notice = (
            f"RoPE: model_max_length {model_max_length} > context {int(covered)}: existing {rtype} scaling "
            f"extended, factor {float(params.get('factor') or 1):g} -> {new['factor']:g} over original "
            f"{orig} positions; max_position_embeddings {ctx} -> {new_ctx}"
        )
        config.max_position_embeddings = new_ctx
    else:
        raise ConfigError(
            f"model_max_length {model_max_length} exceeds {name}'s context {int(covered)} and its "
            f"'{rtype}' RoPE scaling cannot be extended safely; lower --model_max_length"
        )
    config.rope_parameters = new
    if remote:
        notice += " (remote-code model: it must read config.rope_scaling for this to take effect)"
    return notice
