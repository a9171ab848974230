"""The duplicate-id set's memory, inserted into between allocations like the pipeline's.

    python benchmarks/bench_idset.py --n 2300000 [--src DIR]

Inserts N distinct ids (`c0`, `c1`, ...) into `records.SeenIds` while making what a preparation makes around
it: per id a record of four strings (~2.3 KB, a 256-record chunk kept), per id a 380-item list (an example's
ids, dropped every 256). Prints the process's anonymous memory (RssAnon, read every 5,000 ids) at the start,
its peak and its end, and the set's own size; `--src` measures another checkout's `src` (for a before/after).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path


def anon_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2_300_000)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    from chatsft.records import SeenIds

    ids = [j & 255 for j in range(380)]
    seen, chunk, examples = SeenIds(), collections.deque(maxlen=256), []
    seen.begin("a.jsonl", 0)
    start = peak = anon_mb()
    t = time.perf_counter()
    for i in range(args.n):
        rid = f"c{i}"
        chunk.append({"id": rid, "conversations": ["h" * 250 + rid, "g" * 900 + rid, "h" * 250, "g" * 900]})
        assert seen.first_use(rid, i) is None
        examples.append(ids[:])
        if len(examples) == 256:
            examples = []
        if i % 5000 == 0:
            peak = max(peak, anon_mb())
    end = anon_mb()
    print(
        f"{args.src}: {args.n:,} ids, anonymous MB start {start}, peak {max(peak, end)}, end {end}; "
        f"the set {seen.nbytes / 2**20:.1f} MiB; {time.perf_counter() - t:.1f} s"
    )


if __name__ == "__main__":
    main()
