"""Model families: what a family needs beyond the generic path (its template, the tokens its tokenizer lacks),
and how a config points to its family. One table; a new family is one entry here (and one template entry).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from chatsft.errors import ConfigError

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
