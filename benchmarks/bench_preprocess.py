"""Preprocessing speed: conversations/s from ShareGPT records to `input_ids`/`labels`, against the limits.

FastChat's 500-conversation sample (`../shared/data/dummy_conversation.json`, or a path given with --data)
is cycled to N conversations with distinct ids; Mistral-7B-v0.1's SentencePiece tokenizer (from the
mistral-common wheel), vicuna_v1.1, model_max_length 2048. Rows, all on the same N conversations:

  raw fast tokenizer   `tokenizer(texts, add_special_tokens=False)`, one batch call on the already rendered
                       strings (no reading, no rendering, no masking): the ceiling
  chatsft eager, cold  `build_datasets` into an empty cache folder (read, validate, render, encode, mask,
                       audit, write Arrow), default workers (= CPU count)
  chatsft eager, warm  the same call again: the cache hit
  FastChat-style       json.load + FastChat's `preprocess()` (fastchat/train/train.py) reproduced here: render
                       with Vicuna's get_prompt(), tokenize padded to model_max_length with the slow
                       SentencePiece tokenizer (transformers' Python `SentencePieceBackend`, legacy=True, as
                       `use_fast=False` gave), then re-tokenize each turn and its instruction to patch the
                       mask
  chatsft prepare      `chatsft prepare ... --output OUT.jsonl` in-process through the CLI entry point (one
                       process, writes JSON Lines with the rendered text and the audit); and again as a new
                       Python process, so with interpreter start and imports

The rows run round-robin for --rounds rounds (so load from other work falls on all of them alike) and each
reports its best round. `datasets` and `pyarrow` are imported before any timing.

Run: .venv/bin/python benchmarks/bench_preprocess.py [N] [--rounds 3]   (default 5000 conversations)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (  # benchmarks/common.py
    DEFAULT_DATA,
    MAX_LENGTH,
    SPECIALS,
    make_data,
    mistral_tokenizer_dir,
)

# ---- FastChat, reproduced (fastchat/conversation.py vicuna_v1.1 and fastchat/train/train.py preprocess) ----

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IGNORE_TOKEN_ID = -100


def fastchat_prompt(source: list[dict]) -> str:
    """Conversation.get_prompt() for SeparatorStyle.ADD_COLON_TWO, roles USER/ASSISTANT, sep ' ', sep2
    '</s>'."""
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    if roles[source[0]["from"]] != "USER":
        source = source[1:]  # skip the first one if it is not from human
    seps = [" ", "</s>"]
    ret = VICUNA_SYSTEM + seps[0]
    for j, sentence in enumerate(source):
        role = roles[sentence["from"]]
        assert role == ("USER", "ASSISTANT")[j % 2]
        message = sentence["value"]
        ret += role + ": " + message + seps[j % 2] if message else role + ":"
    return ret


def fastchat_preprocess(sources, tokenizer) -> dict:
    """fastchat/train/train.py preprocess() (the version with the `tokenizer.legacy` adjustment)."""
    conversations = [fastchat_prompt(source) for source in sources]
    input_ids = tokenizer(
        conversations,
        return_tensors="pt",
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
    ).input_ids
    targets = input_ids.clone()
    sep = " " + "ASSISTANT" + ": "
    mismatches = 0
    for conversation, target in zip(conversations, targets):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())
        turns = conversation.split("</s>")
        cur_len = 1
        target[:cur_len] = IGNORE_TOKEN_ID
        for i, turn in enumerate(turns):
            if turn == "":
                break
            turn_len = len(tokenizer(turn).input_ids)
            parts = turn.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            instruction_len = (
                len(tokenizer(parts[0]).input_ids) - 2
            )  # "-2" is hardcoded for the Llama tokenizer
            if i != 0 and not tokenizer.legacy:
                instruction_len -= 1
            target[cur_len : cur_len + instruction_len] = IGNORE_TOKEN_ID
            cur_len += turn_len
            if i != 0 and not tokenizer.legacy:
                cur_len -= 1
        target[cur_len:] = IGNORE_TOKEN_ID
        if cur_len < tokenizer.model_max_length and cur_len != total_len:
            target[:] = IGNORE_TOKEN_ID  # FastChat: "WARNING: tokenization mismatch ... (ignored)"
            mismatches += 1
    return dict(
        input_ids=input_ids,
        labels=targets,
        attention_mask=input_ids.ne(tokenizer.pad_token_id),
        mismatches=mismatches,
    )


def slow_tokenizer(model_file: Path):
    """transformers' Python SentencePiece tokenizer (what `use_fast=False` gave FastChat), legacy Llama
    rules."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    tok = SentencePieceBackend(
        vocab_file=str(model_file),
        legacy=True,
        special_tokens_pattern="bos",
        model_max_length=MAX_LENGTH,
        padding_side="right",
        **SPECIALS,
    )
    tok.pad_token = tok.unk_token  # as fastchat.train.train does
    return tok


# ---- the table ----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=5000, help="conversations (default 5000)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ShareGPT JSON to cycle")
    parser.add_argument(
        "--workers", type=int, default=None, help="build_datasets workers (default: CPU count)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over all rows; each row reports its best"
    )
    args = parser.parse_args()

    start = time.perf_counter()
    import datasets  # noqa: F401  (imported once per process by any training run; not a per-conversation cost)
    import pyarrow  # noqa: F401

    imports = time.perf_counter() - start
    from chatsft.commands.cli import main as cli_main
    from chatsft.data import build_datasets, usable_cpus
    from chatsft.encode import Encoder
    from chatsft.records import read_conversations
    from chatsft.templates import VICUNA, render
    from chatsft.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = mistral_tokenizer_dir(tmp / "mistral")
        data = make_data(args.data, args.n, tmp / "data.json")
        tokenizer = load_tokenizer(tok_dir, model_max_length=MAX_LENGTH)
        encoder = Encoder(VICUNA, tokenizer, "assistant_turns", MAX_LENGTH)
        slow = slow_tokenizer(tok_dir / "tokenizer.model")
        texts = [
            "".join(s.text for s in render(VICUNA, conv.messages, None, bos="<s>", eos="</s>"))
            for conv in read_conversations([data])[0]
        ]
        facts = {}

        def raw(round_: int):
            tokenizer(texts, add_special_tokens=False)

        def cold(round_: int):
            split = build_datasets(
                encoder, [str(data)], cache_dir=tmp / f"cache{round_}", num_workers=args.workers
            )
            assert split.cache_hit is False, split.notices
            facts["examples"], facts["tokens"] = len(split.train), split.train_audit.tokens

        def warm(round_: int):
            split = build_datasets(
                encoder, [str(data)], cache_dir=tmp / f"cache{round_}", num_workers=args.workers
            )
            assert split.cache_hit is True, split.notices

        def fastchat(round_: int):
            records = json.loads(data.read_text(encoding="utf-8"))
            facts["mismatches"] = fastchat_preprocess([r["conversations"] for r in records], slow)[
                "mismatches"
            ]

        def prepare_args(output: Path) -> list[str]:
            return [
                "prepare",
                "--data_path",
                str(data),
                "--model_name_or_path",
                str(tok_dir),
                "--conv_template",
                "vicuna_v1.1",
                "--model_max_length",
                str(MAX_LENGTH),
                "--output",
                str(output),
            ]

        def prepare(round_: int):
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                code = cli_main(prepare_args(tmp / "prepared.jsonl"))
            assert code == 0

        def prepare_subprocess(round_: int):
            env = {**os.environ, "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true")}
            subprocess.run(
                [sys.executable, "-m", "chatsft.commands.cli", *prepare_args(tmp / "prepared2.jsonl")],
                check=True,
                stdout=subprocess.DEVNULL,
                env=env,
            )

        workers = args.workers or usable_cpus()
        names = {
            "raw": "raw fast tokenizer, one batch call",
            "cold": f"chatsft eager, cold cache ({workers} workers)",
            "warm": "chatsft eager, warm cache",
            "fastchat": "FastChat-style (slow SentencePiece)",
            "prepare": "chatsft prepare (CLI in-process, 1 process)",
            "prepare_subprocess": "chatsft prepare (new process, with imports)",
        }
        best = dict.fromkeys(names, float("inf"))
        # round-robin, so that load from other work on the machine falls on every row alike
        for round_ in range(args.rounds):
            for key, call in (
                ("raw", raw),
                ("cold", cold),
                ("warm", warm),
                ("fastchat", fastchat),
                ("prepare", prepare),
                ("prepare_subprocess", prepare_subprocess),
            ):
                start = time.perf_counter()
                call(round_)
                seconds = time.perf_counter() - start
                best[key] = min(best[key], seconds)
                print(f"  round {round_ + 1}: {key} {seconds:.2f} s", file=sys.stderr, flush=True)
        chars = sum(map(len, texts)) / len(texts)

    notes = {
        "cold": f"{best['raw'] / best['cold']:.2f}x raw",
        "fastchat": f"{facts['mismatches']} examples zeroed for a mismatch",
        "prepare": f"{best['fastchat'] / best['prepare']:.1f}x FastChat-style",
        "prepare_subprocess": f"{best['fastchat'] / best['prepare_subprocess']:.1f}x FastChat-style",
    }
    print(
        f"\n{args.n:,} conversations ({chars:.0f} characters rendered, {facts['tokens'] / args.n:.0f} "
        "tokens each), "
        f"Mistral-7B tokenizer, vicuna_v1.1, model_max_length {MAX_LENGTH}, {os.cpu_count()} CPUs, "
        f"best of {args.rounds} rounds"
    )
    print(f"{'method':<46}{'seconds':>9}{'conv/s':>10}  vs")
    for key, name in names.items():
        print(f"{name:<46}{best[key]:>9.2f}{args.n / best[key]:>10,.0f}  {notes.get(key, '')}")
    print(
        f"(importing datasets/pyarrow took {imports:.2f} s before any timing; once per process, in no row "
        "but "
        "the last)"
    )


if __name__ == "__main__":
    main()
