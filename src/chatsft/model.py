"""Load the model and tokenizer for training: dtype, attention, RoPE scaling, pad token, family tokens.

This replaces FastChat's monkey patches and per-family scripts with plain functions. The config is read and
adjusted (RoPE, `use_cache`) before any weight loads; the vocabulary only ever grows, and when it does the
embeddings grow with it, new rows set to the mean of the old ones. Every user mistake (a missing folder, a
config.json that is not there, an unknown family, flash-attention without a GPU) is a one-line `ConfigError`.
RoPE scaling lives in `chatsft.rope`, LoRA in `chatsft.lora`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from chatsft.errors import ConfigError
from chatsft.rope import apply_rope_scaling

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

# FastChat's fastchat/train/train_yuan2.py list, in its order.
YUAN2_TOKENS = [
    "<eod>",
    "<sep>",
    "<pad>",
    "<mask>",
    "<predict>",
    "<FIM_SUFFIX>",
    "<FIM_PREFIX>",
    "<FIM_MIDDLE>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
]
BAICHUAN_VOCAB, BAICHUAN2_VOCAB = 64000, 125696


@dataclass(frozen=True)
class Preset:
    """What a model family needs beyond the generic path: its template and the tokens its tokenizer lacks."""

    name: str
    template: str | None = None
    special_tokens: list[str] = field(default_factory=list)


FAMILIES = {
    "yuan2": Preset("yuan2", "yuan2", YUAN2_TOKENS),
    "baichuan": Preset("baichuan", "baichuan-chat"),
    "baichuan2": Preset("baichuan2", "baichuan2-chat"),
    "none": Preset("none"),
}
ALIASES = {"yuan": "yuan2", "baichuan-chat": "baichuan", "baichuan2-chat": "baichuan2", "auto": "none"}


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    preset: Preset
    pad: str  # "kept" | "unk" | "added"
    vocab_grew: bool  # embeddings were resized: with LoRA, pass train_embeddings=True
    notices: list[str]


# --- paths and config ---------------------------------------------------------------------------------------


def _check_path(path, what: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{what} path {path!r} is a file; give the model folder")
        return path
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ConfigError(f"{what} folder {path!r} does not exist")
    return path  # an "org/name" hub id: transformers resolves it from its cache (or the hub when online)


def _hub_error(path: str, what: str, err: Exception) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"cannot load the {what} from {path!r}: {first}")


def load_config(path, *, trust_remote_code: bool = False):
    """The model's config, with a `ConfigError` for a missing folder or a folder without config.json."""
    from transformers import AutoConfig

    path = _check_path(path, "model")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model folder {path!r} has no config.json")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:  # unreadable JSON, unknown model_type, remote code refused
        raise _hub_error(path, "model config", err) from None


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
    path = _check_path(path, "model")
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
        raise _hub_error(path, "model", err) from None
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


def load_tokenizer(
    path, *, model_max_length: int, trust_remote_code: bool = False, padding_side: str = "right"
):
    """The (fast) tokenizer from a local folder or a cached hub id, with model_max_length and padding_side."""
    from transformers import AutoTokenizer

    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    path = _check_path(path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(
            path,
            model_max_length=model_max_length,
            padding_side=padding_side,
            trust_remote_code=trust_remote_code,
        )
    # no tokenizer files, protobuf missing, remote code refused
    except (OSError, ValueError, TypeError) as err:
        raise _hub_error(path, "tokenizer", err) from None


# --- vocabulary ---------------------------------------------------------------------------------------------


def resize_embeddings(model, tokenizer) -> bool:
    """Grow the embeddings (and an untied lm_head) to `len(tokenizer)`; new rows = mean of the old rows.

    Never shrinks: models often carry padded rows beyond the tokenizer (Qwen, Baichuan2). transformers 5's
    default (`mean_resizing=True`) samples new rows from N(mean, 1e-9 * covariance), computing a hidden x
    hidden covariance; the plain mean is what that approximates, costs nothing and is the same on every rank.
    Under DeepSpeed ZeRO-3 we leave it to transformers, which gathers the sharded weights itself.
    """
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    old = model.get_input_embeddings().weight.shape[0]
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


def add_special_tokens(tokenizer, tokens: list[str], model=None) -> int:
    """Add the tokens the tokenizer lacks as special tokens; return how many were new.

    With `model`, the embeddings grow to match (FastChat's Yuan2 script forgets this).
    """
    added = tokenizer.add_tokens(list(tokens), special_tokens=True) if tokens else 0
    if model is not None:
        resize_embeddings(model, tokenizer)
    return added


def setup_pad_token(tokenizer, model=None) -> str:
    """Give the tokenizer a pad token: its own ("kept"), else the unk token ("unk", FastChat's choice), else a
    new `<pad>` ("added"). With `model`, the embeddings grow if needed and `config.pad_token_id` follows."""
    if tokenizer.pad_token is not None:
        how = "kept"
    elif tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        how = "unk"
    else:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        how = "added"
    if model is not None:
        resize_embeddings(model, tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
    return how


# --- model families -----------------------------------------------------------------------------------------


def family_preset(family: str) -> Preset:
    """The preset of an explicit `--model_family` (yuan2, baichuan, baichuan2, none)."""
    key = ALIASES.get(family.lower(), family.lower())
    if key not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[key]


def detect_family(model_type: str | None, *, name_or_path: str = "", vocab_size: int | None = None) -> str:
    """The family a config's `model_type` (with the model's name, vocab size) points to; "none" if no preset.

    Baichuan-1 and Baichuan2 share model_type "baichuan": the name decides when it says "baichuan2", else the
    vocabulary (64000 for Baichuan-1, 125696 for Baichuan2).
    """
    name = Path(os.fspath(name_or_path)).name.lower() if name_or_path else ""
    model_type = (model_type or "").lower()
    if model_type in ("yuan", "yuan2") or "yuan2" in name:
        return "yuan2"
    if model_type == "baichuan" or "baichuan" in name:
        if "baichuan2" in name or vocab_size == BAICHUAN2_VOCAB:
            return "baichuan2"
        if vocab_size == BAICHUAN_VOCAB or "baichuan" in name:
            return "baichuan"
        raise ConfigError(
            f"cannot tell Baichuan from Baichuan2 (vocab_size {vocab_size}); "
            "pass --model_family baichuan or baichuan2"
        )
    return "none"


def resolve_preset(config, *, model_family: str | None = None, name_or_path: str = "") -> Preset:
    """An explicit family wins; else the one detected from the config."""
    if model_family:
        return family_preset(model_family)
    return FAMILIES[
        detect_family(
            getattr(config, "model_type", None),
            name_or_path=name_or_path,
            vocab_size=getattr(config, "vocab_size", None),
        )
    ]


def prepare_tokenizer(
    path,
    *,
    model_max_length: int,
    tokenizer_path=None,
    model_family: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    extra_special_tokens: list[str] | None = None,
    config=None,
) -> tuple[object, Preset, str, list[str]]:
    """Config -> family preset -> tokenizer with the family's and the user's special tokens and a pad token.

    Returns (tokenizer, preset, how the pad token was chosen, notices). Reads only the config (pass it when the
    caller has read it already), never the weights, so data problems surface before the model is loaded.
    """
    config = config or load_config(path, trust_remote_code=trust_remote_code)
    preset = resolve_preset(config, model_family=model_family, name_or_path=os.fspath(path))
    tokenizer = load_tokenizer(
        tokenizer_path or path,
        model_max_length=model_max_length,
        trust_remote_code=trust_remote_code,
        padding_side=padding_side,
    )
    notices = []
    if preset.name != "none":
        added = add_special_tokens(tokenizer, preset.special_tokens)
        notices.append(
            f"family {preset.name}: template {preset.template}"
            + (f", {added} special tokens added" if preset.special_tokens else "")
        )
    if extra_special_tokens:
        added = add_special_tokens(tokenizer, extra_special_tokens)
        notices.append(f"--add_special_tokens: {added} of {len(extra_special_tokens)} tokens were new")
    pad = setup_pad_token(tokenizer)
    notices.append(f"pad token {tokenizer.pad_token!r} ({pad})")
    return tokenizer, preset, pad, notices


def load_model_for(tokenizer, path, **load_kwargs) -> tuple[object, bool, list[str]]:
    """`load_model` and then fit its embeddings and pad id to the prepared tokenizer; returns (model, grew, notices)."""
    model, notices = load_model(path, **load_kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    grew = resize_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if grew:
        notices.append(f"embeddings resized {rows} -> {len(tokenizer)} (new rows = mean of the old ones)")
    return model, grew, notices


def load_for_training(
    path,
    *,
    model_max_length: int,
    tokenizer_path=None,
    model_family: str | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "right",
    gradient_checkpointing: bool = False,
    extra_special_tokens: list[str] | None = None,
) -> LoadedModel:
    """Both stages at once: `prepare_tokenizer`, then `load_model_for`."""
    tokenizer, preset, pad, notices = prepare_tokenizer(
        path,
        model_max_length=model_max_length,
        tokenizer_path=tokenizer_path,
        model_family=model_family,
        trust_remote_code=trust_remote_code,
        padding_side=padding_side,
        extra_special_tokens=extra_special_tokens,
    )
    model, grew, more = load_model_for(
        tokenizer,
        path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        model_max_length=model_max_length,
        gradient_checkpointing=gradient_checkpointing,
    )
    return LoadedModel(model, tokenizer, preset, pad, grew, more + notices)
