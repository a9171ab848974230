"""Load the model for training: dtype, attention, RoPE scaling, embeddings fitted to the prepared tokenizer.

This replaces FastChat's monkey patches and per-family scripts with plain functions. The config is read and
adjusted (RoPE, `use_cache`) before any weight loads; the vocabulary only ever grows, and when it does the
embeddings grow with it, new rows set to the mean of the old ones. Every user mistake (a missing folder, a
config.json that is not there, an unknown family, flash-attention without a GPU) is a one-line `ConfigError`.
The tokenizer is prepared first, without weights (`chatsft.tokenizer`); RoPE scaling lives in
`chatsft.training.rope`, LoRA in `chatsft.training.lora`.
"""

from __future__ import annotations

from chatsft.errors import ConfigError
from chatsft.tokenizer import check_model_path, hub_error, load_config
from chatsft.training.rope import apply_rope_scaling

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
    "auto": "auto",
}
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged|eager")


# --- model and tokenizer ------------------------------------------------------------------------------------


def _check_attention(attn_implementation: str | None) -> None:
    if attn_implementation is None:
        return
    if attn_implementation not in ATTENTION and "/" not in attn_implementation:  # "org/kernel" = a hub kernel
        raise ConfigError(
            f"unknown attn_implementation {attn_implementation!r}; choose one of {', '.join(ATTENTION)}"
        )
    if attn_implementation.startswith("flash_attention"):
        import torch
        from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

        if not torch.cuda.is_available():
            raise ConfigError(
                f"attn_implementation={attn_implementation} needs a CUDA GPU, and none is visible; "
                "use sdpa (the default) or eager"
            )
        available = (
            is_flash_attn_3_available() if attn_implementation.endswith("3") else is_flash_attn_2_available()
        )
        if not available:
            package = "flash_attn_3" if attn_implementation.endswith("3") else "flash-attn"
            raise ConfigError(
                f"attn_implementation={attn_implementation} needs the {package} package, which is not "
                "installed (pip install flash-attn --no-build-isolation); or use sdpa"
            )


def load_model(
    path,
    *,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    model_max_length: int | None = None,
    gradient_checkpointing: bool = False,
):
    """Load a causal LM for training; return `(model, notices)`.

    dtype None means float32 (FastChat's behaviour: master weights for mixed-precision training); "auto" keeps
    the checkpoint's dtype. RoPE scaling for `model_max_length` is set on the config before the weights load.
    `config.use_cache` is off for training: call `restore_use_cache(model)` before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of bf16, fp16, fp32, auto")
    torch_dtype = DTYPES[dtype or "fp32"]
    torch_dtype = torch_dtype if torch_dtype == "auto" else getattr(torch, torch_dtype)
    _check_attention(attn_implementation)
    path = check_model_path(path, "model")
    config = load_config(path, trust_remote_code=trust_remote_code)
    notices = []
    rope = apply_rope_scaling(config, model_max_length)
    if rope:
        notices.append(rope)
    config.use_cache = False
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except (ValueError, ImportError) as err:
        if "attn_implementation" in str(err) or "attention" in str(err).lower():
            raise ConfigError(
                f"attn_implementation={attn_implementation} cannot be used with this model: "
                f"{str(err).strip().splitlines()[0]}"
            ) from None
        raise
    except OSError as err:  # missing weights, unreachable hub id
        raise hub_error(path, "model", err) from None
    if gradient_checkpointing:
        # transformers 5: use_reentrant=False by default, and input grads enabled for adapters
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
    param_dtype = next(model.parameters()).dtype
    notices.append(
        f"model: {config.model_type}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{str(param_dtype).removeprefix('torch.')}, attention {model.config._attn_implementation}"
        + (", gradient checkpointing" if gradient_checkpointing else "")
    )
    return model, notices


def restore_use_cache(model) -> None:
    """Turn the KV cache back on in the config that will be saved (it is off while training)."""
    model.config.use_cache = True


# --- vocabulary ---------------------------------------------------------------------------------------------


def embedding_rows(model) -> int:
    """Rows of the input embeddings; under ZeRO-3 the loaded weight is a 0-row partition and `ds_shape` holds
    the real shape (read as 0, a padded vocabulary would be resized down to the tokenizer)."""
    weight = model.get_input_embeddings().weight
    return int(weight.ds_shape[0]) if hasattr(weight, "ds_shape") else int(weight.shape[0])


def resize_embeddings(model, tokenizer) -> bool:
    """Grow the embeddings (and an untied lm_head) to `len(tokenizer)`; new rows = mean of the old rows.

    Never shrinks: models often carry padded rows beyond the tokenizer (Qwen, Baichuan2). transformers 5's
    default (`mean_resizing=True`) samples new rows from N(mean, 1e-9 * covariance), computing a hidden x
    hidden covariance; the plain mean is what that approximates, costs nothing and is the same on every rank.
    Under DeepSpeed ZeRO-3 we leave it to transformers, which gathers the sharded weights itself.
    """
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    old = embedding_rows(model)
    new = len(tokenizer)
    if new <= old:
        return False
    if is_deepspeed_zero3_enabled():
        model.resize_token_embeddings(new, mean_resizing=True)
        return True
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        for module in {
            id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
        }.values():
            weight = module.weight
            weight[old:] = weight[:old].float().mean(dim=0).to(weight.dtype)
            bias = getattr(module, "bias", None)
            if bias is not None and bias.shape[0] == new:
                bias[old:] = bias[:old].float().mean().to(bias.dtype)
    return True


def load_model_for(tokenizer, path, **load_kwargs) -> tuple[object, bool, list[str]]:
    """`load_model` and then fit its embeddings and pad id to the prepared tokenizer; returns (model, grew,
    notices)."""
    model, notices = load_model(path, **load_kwargs)
    rows = embedding_rows(model)
    grew = resize_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if grew:
        notices.append(f"embeddings resized {rows} -> {len(tokenizer)} (new rows = mean of the old ones)")
    return model, grew, notices
