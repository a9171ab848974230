"""Resident memory added by the training datasets: eager (memory-mapped Arrow) versus lazy (holds the
conversations).

FastChat's 500-conversation sample (`../shared/data/dummy_conversation.json`, or --data) is cycled to N
conversations with distinct ids (default 100,000); Mistral-7B-v0.1's tokenizer, vicuna_v1.1, model_max_length
2048. Each mode runs in a fresh Python process: it imports everything and loads the tokenizer, then reads RSS
("before"), calls `build_datasets`, reads 5 examples spread over the dataset plus `len()`, runs the garbage
collector and reads RSS again ("after"). "peak" is the process's high-water mark (ru_maxrss) over the whole
run, so it includes the transient cost of reading and validating the JSON file. Encoding workers are separate
processes; their memory is not in these figures (they exit when encoding ends).

  eager, cold cache   build_datasets encodes (default workers) and writes the Arrow cache, then maps it
  eager, warm cache   build_datasets loads the Arrow cache written by the previous row
  lazy                build_datasets(lazy=True): keeps the validated conversations, encodes on access

Run: .venv/bin/python benchmarks/bench_memory.py [N]   (default 100000)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_DATA, MAX_LENGTH, make_data, mistral_tokenizer_dir  # benchmarks/common.py


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, data: str, tok_dir: str, cache: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import datasets  # noqa: F401
    import pyarrow  # noqa: F401

    from chatsft.data import build_datasets
    from chatsft.encode import Encoder
    from chatsft.templates import VICUNA
    from chatsft.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir, model_max_length=MAX_LENGTH)
    encoder = Encoder(VICUNA, tokenizer, "assistant_turns", MAX_LENGTH)
    tokenizer("warm up the tokenizer", add_special_tokens=False)
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    split = build_datasets(encoder, [data], cache_dir=cache, lazy=mode == "lazy")
    seconds = time.perf_counter() - start
    n = len(split.train)
    for i in range(5):
        example = split.train[i * (n - 1) // 4]
        assert len(example["input_ids"]) == len(example["labels"]) > 0
    gc.collect()
    after = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hit = split.cache_hit
    print(
        json.dumps(
            {
                "mode": mode,
                "examples": n,
                "before": before,
                "after": after,
                "peak": peak,
                "seconds": seconds,
                "cache_hit": hit,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=100_000, help="conversations (default 100000)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ShareGPT JSON to cycle")
    parser.add_argument(
        "--child", nargs=4, metavar=("MODE", "DATA", "TOKENIZER", "CACHE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = mistral_tokenizer_dir(tmp / "mistral")
        data = make_data(args.data, args.n, tmp / "data.json")
        size = data.stat().st_size / 2**20
        for mode in ("eager", "eager", "lazy"):  # the second eager run finds the first one's cache
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(data), str(tok_dir), str(tmp / "cache")],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(f"  {results[-1]}", file=sys.stderr, flush=True)

    print(
        f"\n{args.n:,} conversations ({size:.0f} MB of JSON), Mistral-7B tokenizer, vicuna_v1.1, "
        f"model_max_length {MAX_LENGTH}; RSS in MB, one fresh process per row"
    )
    print(f"{'mode':<20}{'examples':>10}{'before':>9}{'after':>9}{'added':>9}{'peak':>9}{'seconds':>9}")
    for r in results:
        name = "lazy" if r["mode"] == "lazy" else f"eager, {'warm' if r['cache_hit'] else 'cold'} cache"
        print(
            f"{name:<20}{r['examples']:>10,}{r['before']:>9.0f}{r['after']:>9.0f}"
            f"{r['after'] - r['before']:>9.0f}"
            f"{r['peak']:>9.0f}{r['seconds']:>9.1f}"
        )


if __name__ == "__main__":
    main()
