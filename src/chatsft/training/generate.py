"""Replies from a chat model: prompts formatted by the model folder's saved chat template, generation stopped
at its saved stop ids (`generation_config.json`'s `eos_token_id`, which the final save fills with the
template's end-of-turn ids). One helper behind `chatsft chat`, the demo's answers before and after training,
and the samples logged at evaluation (`chatsft.training.generations`), so that all three see what inference
sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from chatsft.errors import ConfigError


def load_chat_model(folder: str | Path):
    """`(model, tokenizer)` from a saved model folder (a full model, or a LoRA adapter folder whose
    `adapter_config.json` names its base), in eval mode; `ConfigError` when it cannot be used for chat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--model {folder}: no such folder")
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise ConfigError(f"--model {folder}: not a model folder (no config.json or adapter_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise ConfigError(
            f"--model {folder}: the tokenizer has no chat template (a model saved by `chatsft train` carries "
            "the one it was trained with)"
        )
    try:
        with warnings.catch_warnings():  # peft probes transformers' deprecated checkpointing alias
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {folder}: cannot load the model: {str(err).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


def saved_stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a reply: the generation config's `eos_token_id`, else the tokenizer's eos."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = tokenizer.eos_token_id
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def generate_ids(
    model,
    prompt_ids: Sequence[int],
    *,
    stop_ids: Sequence[int],
    pad_id: int | None,
    max_new_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
) -> list[int]:
    """The new ids after `prompt_ids`, up to and without the stop id that ended them.

    `temperature` None keeps the model's generation config (greedy or its sampling settings), 0 is greedy,
    above 0 samples (with `top_p` when given).
    """
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    options: dict = {}
    if temperature is not None:
        options["do_sample"] = temperature > 0
        if temperature > 0:
            options["temperature"] = temperature
            options["top_p"] = top_p if top_p is not None else 1.0
            options["top_k"] = 0
        else:  # greedy: leave no sampling setting behind, or transformers warns about it
            options.update(temperature=None, top_p=None, top_k=None)
    elif top_p is not None:
        options["top_p"] = top_p
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids) or None,
            pad_token_id=pad_id if pad_id is not None else (list(stop_ids) or [None])[0],
            use_cache=True,
            **options,
        )
    new = output[0, ids.shape[1] :].tolist()
    for i, token in enumerate(new):
        if token in stop_ids:
            return new[:i]
    return new


def reply(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
) -> str:
    """The assistant's reply to `messages`, formatted by the tokenizer's chat template with the generation
    prompt, generated until one of the saved stop ids."""
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    new = generate_ids(
        model,
        prompt["input_ids"],
        stop_ids=saved_stop_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def answers(folder: str | Path, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy one-turn replies to `prompts` from a saved model folder (the demo's before/after answers)."""
    model, tokenizer = load_chat_model(folder)
    return [
        reply(
            model,
            tokenizer,
            [{"role": "user", "content": prompt}],
            max_new_tokens=max_new_tokens,
            temperature=0,
        )
        for prompt in prompts
    ]
