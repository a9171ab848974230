"""Reading speed: generate N ShareGPT records (a JSON list and a JSONL file), time `read_conversations`.

Run: .venv/bin/python benchmarks/bench_records.py [N]   (default 100000)
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from chatsft.records import read_conversations


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the a chat model user assistant reply question answer train token data quick brown fox".split()
    records = []
    for i in range(n):
        turns = []
        for t in range(rng.choice([2, 4, 6, 8])):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            turns.append({"from": "human" if t % 2 == 0 else "gpt", "value": text})
        records.append({"id": f"r{i}", "conversations": turns})
    return records


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    records = make_records(n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        as_json = Path(tmp) / "data.json"
        as_json.write_text(json.dumps(records))
        as_jsonl = Path(tmp) / "data.jsonl"
        as_jsonl.write_text("\n".join(json.dumps(r) for r in records))
        for path in (as_json, as_jsonl):
            start = time.perf_counter()
            convs, report = read_conversations([path])
            seconds = time.perf_counter() - start
            assert len(convs) == n and report.rejected_total == 0
            rows.append((path.suffix, n, path.stat().st_size / 1e6, seconds, n / seconds))
    print(f"{'format':<8}{'records':>10}{'MB':>8}{'seconds':>10}{'records/s':>12}")
    for fmt, count, mb, seconds, rate in rows:
        print(f"{fmt:<8}{count:>10}{mb:>8.1f}{seconds:>10.2f}{rate:>12,.0f}")


if __name__ == "__main__":
    main()
