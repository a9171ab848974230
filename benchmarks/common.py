"""Shared by the benchmarks: FastChat's sample data cycled to N conversations, and the Mistral-7B tokenizer
folder.

The tests build the same tokenizer folder in tests/conftest.py (tests must not import benchmarks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dummy_conversation.json"
MAX_LENGTH = 2048
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def mistral_tokenizer_dir(dest: Path) -> Path:
    """A tokenizer folder holding Mistral-7B-v0.1's SentencePiece model (as tests/conftest.py builds it)."""
    import mistral_common

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_bos_token": True,
        "add_eos_token": False,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, **SPECIALS}))
    return dest


def make_data(source: Path, n: int, dest: Path) -> Path:
    records = json.loads(source.read_text(encoding="utf-8"))
    out = []
    for i in range(n):
        record = dict(records[i % len(records)])
        record["id"] = f"{record.get('id', 'r')}_{i // len(records)}"
        out.append(record)
    dest.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return dest
