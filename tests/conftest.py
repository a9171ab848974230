"""Shared fixtures: real tokenizers built offline (Mistral-7B-v0.1 SentencePiece from the mistral-common
wheel, byte-level BPE trained in-process) and helpers to write data files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

MISTRAL_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def mistral_tokenizer_dir(dest: Path, legacy: bool) -> Path:
    """A tokenizer folder holding Mistral-7B-v0.1's SentencePiece model (32000 tokens)."""
    import mistral_common

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": legacy,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, **MISTRAL_SPECIALS}))
    return dest


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory) -> Path:
    return mistral_tokenizer_dir(tmp_path_factory.mktemp("mistral"), legacy=False)


@pytest.fixture(scope="session")
def mistral_legacy_dir(tmp_path_factory) -> Path:
    return mistral_tokenizer_dir(tmp_path_factory.mktemp("mistral_legacy"), legacy=True)


@pytest.fixture(scope="session")
def mistral_tokenizer(mistral_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mistral_dir)


@pytest.fixture(scope="session")
def mistral_legacy_tokenizer(mistral_legacy_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(mistral_legacy_dir)


BPE_CORPUS = [
    "USER: What is the capital of France? ASSISTANT: The capital of France is Paris.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "Hello! How are you today? I am fine, thank you. 你好，世界。Привет, мир! 🙂",
    "system user assistant [INST] [/INST] <<SYS>> <</SYS>> \n\n",
] * 20


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from chatsft.training.tiny import build_tokenizer

    return build_tokenizer(BPE_CORPUS, vocab_size=400)


def extra_markers() -> list[str]:
    """Control markers of the built-in templates (read from the table) that the tiny tokenizer lacks."""
    from chatsft.templates import BUILTINS
    from chatsft.training.tiny import TINY_SPECIAL_TOKENS

    markers = {m for t in BUILTINS.values() for m in t.markers if m not in ("{bos}", "{eos}")}
    return sorted(markers - set(TINY_SPECIAL_TOKENS))


@pytest.fixture(scope="session")
def bpe_all_markers():
    """Byte-level BPE holding every built-in template's control markers as special tokens."""
    from chatsft.training.tiny import TINY_SPECIAL_TOKENS, build_tokenizer

    return build_tokenizer(BPE_CORPUS, vocab_size=400, special_tokens=TINY_SPECIAL_TOKENS + extra_markers())


@pytest.fixture()
def write_file(tmp_path):
    """write_file(name, content) -> Path; content is str (written as UTF-8), bytes, or a JSON-able object."""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        return path

    return _write


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_CTX, TINY_THETA = 64, 500000.0


def save_tiny(dest, tokenizer, layers: int = 1):
    """A tiny Llama (hidden 32, context 64, rope_theta 500000) and its tokenizer saved to `dest`."""
    from chatsft.training.tiny import build_model

    model = build_model(tokenizer, hidden_size=32, layers=layers, heads=4, max_positions=TINY_CTX)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": TINY_THETA}
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, bpe_tokenizer):
    """A tiny saved Llama with the byte-level BPE tokenizer (see `save_tiny`)."""
    return save_tiny(tmp_path_factory.mktemp("tiny"), bpe_tokenizer)
