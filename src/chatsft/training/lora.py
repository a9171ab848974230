"""LoRA through peft: adapters on every linear projection by default, resized embeddings trained too,
merging."""

from __future__ import annotations

import warnings
from pathlib import Path

from chatsft.errors import ConfigError


def lora_target_modules(model) -> list[str]:
    """Leaf names of every linear projection in the model (attention and MLP), the output head excluded."""
    import torch

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is head or not name:
            continue
        # Conv1D: GPT-2 style projections
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ConfigError("no linear layers found for LoRA; pass --lora_target_modules")
    return sorted(names)


def _module_name(model, target) -> str | None:
    return next((name for name, module in model.named_modules() if module is target), None)


def apply_lora(
    model,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    train_embeddings: bool = False,
    bias: str = "none",
):
    """Wrap `model` with LoRA adapters; return `(peft_model, notice)`.

    `train_embeddings` (pass `LoadedModel.vocab_grew`): the input embeddings and lm_head are trained in full
    and saved with the adapter (`modules_to_save`), since the new tokens' rows start as a mean and must be
    learned; a tied lm_head stays tied to its trained copy. Input grads are enabled so that gradient
    checkpointing (turned on now or later by the Trainer) still reaches the adapters through frozen layers.
    """
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ConfigError(f"lora r must be positive, got {r}")
    targets = list(target_modules) if target_modules else lora_target_modules(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(f"LoRA target modules not in the model: {', '.join(missing)}")
    to_save = None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if train_embeddings:
        heads = [model.get_input_embeddings(), model.get_output_embeddings()]
        to_save = [
            n.rsplit(".", 1)[-1] for n in (_module_name(model, m) for m in heads if m is not None) if n
        ]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias=bias,  # "all"/"lora_only": those biases train in full and are saved with the adapter
        task_type="CAUSAL_LM",
        modules_to_save=list(to_save or []) or None,  # a copy: peft extends it with the tied names
        # only when needed: older peft releases lack the option
        **({"ensure_weight_tying": True} if tied and to_save else {}),
    )
    model.enable_input_require_grads()
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias: a FutureWarning meant for
        # peft
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    for adapter in peft_model.peft_config.values():
        # peft records the base as it was typed; a relative path breaks loading from any other directory
        base = adapter.base_model_name_or_path
        if base and Path(base).expanduser().is_dir():
            adapter.base_model_name_or_path = str(Path(base).expanduser().resolve())
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    notice = (
        f"LoRA r={r} alpha={alpha} dropout={dropout} on {', '.join(targets)}"
        + (f", biases: {bias}" if bias != "none" else "")
        + (f", training {', '.join(to_save)} in full" if to_save else "")
        + f": {trainable:,} of {total:,} parameters trainable"
    )
    return peft_model, notice


def merge_lora(model):
    """Fold the adapters into the weights and return the plain transformers model (for a merged save)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model
