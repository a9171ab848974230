"""Preparing at scale: N generated ShareGPT-sized conversations, as JSON Lines and as a JSON array, through
`build_datasets` into an empty cache, in a child process whose tree is watched.

    python benchmarks/bench_scale.py --n 100000 [--format jsonl json] [--workers 2] [--work DIR]

Reports per run: wall time, the peak RSS of every process of the run (the main one and each encoding helper,
read from /proc/PID/status VmHWM while they live), the cache entry's size on disk, conversations/s, and the
ratio to the bare fast tokenizer's conversations/s on the same rendered strings (`tokenizer(texts)` in batches
of 1,000 on one process, measured on the first 20,000). Generated data: 2 exchanges per conversation, user
turns of about 250 characters and replies of about 900 (ShareGPT's median turn lengths, roughly), distinct
words so the tokenizer does real work; each conversation a distinct id.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mistral_tokenizer_dir

WORDS = (
    "the model answer question data train token reply user assistant system chat format loss mask "
    "river mountain city language science history music number table window garden energy system "
    "because however therefore example function variable return value error file memory process"
).split()


def conversation(i: int, rng: random.Random) -> dict:
    def text(chars: int) -> str:
        out, n = [], 0
        while n < chars:
            w = rng.choice(WORDS)
            out.append(w)
            n += len(w) + 1
        return " ".join(out).capitalize() + "."

    turns = []
    for _ in range(2):
        turns += [{"from": "human", "value": text(250)}, {"from": "gpt", "value": text(900)}]
    return {"id": f"c{i}", "conversations": turns}


def generate(n: int, fmt: str, dest: Path) -> Path:
    path = dest / f"gen-{n}.{fmt}"
    if path.is_file():
        return path
    if n > BASE and n % BASE == 0:
        return _replicate(generate(BASE, fmt, dest), n // BASE, fmt, path)
    rng = random.Random(n)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if fmt == "json":
            f.write("[\n")
        for i in range(n):
            line = json.dumps(conversation(i, rng), ensure_ascii=False)
            f.write(line + ("\n" if fmt == "jsonl" else (",\n" if i < n - 1 else "\n")))
        if fmt == "json":
            f.write("]\n")
    tmp.rename(path)
    return path


BASE = 100_000  # larger files repeat the 100k one with distinct ids (generating words is slow in Python)


def _replicate(base: Path, copies: int, fmt: str, path: Path) -> Path:
    lines = [line.rstrip(",\n") for line in base.read_text(encoding="utf-8").splitlines(True)]
    records = [line for line in lines if line.startswith("{")]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("[\n" if fmt == "json" else "")
        for j in range(copies):
            for i, line in enumerate(records):
                line = line.replace('{"id": "c', f'{{"id": "k{j}-c', 1)
                last = j == copies - 1 and i == len(records) - 1
                f.write(line + ("\n" if fmt == "jsonl" or last else ",\n"))
        f.write("]\n" if fmt == "json" else "")
    tmp.rename(path)
    return path


READ_CHILD = """
import sys, time, json
sys.path.insert(0, {src!r})
from chatsft.records import ReadPolicy, iter_conversations
from chatsft.report import ReadReport
t = time.perf_counter()
report = ReadReport(keep=False)
n = sum(1 for _ in iter_conversations([{data!r}], ReadPolicy(), report))
print(json.dumps({{"seconds": time.perf_counter() - t, "examples": n, "entry": None}}))
"""

CHILD = """
import sys, time, json
sys.path.insert(0, {src!r})
from chatsft.data import build_datasets
from chatsft.encode import Encoder
from chatsft.records import ReadPolicy
from chatsft.templates import VICUNA
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({tok!r})
enc = Encoder(VICUNA, tok, "assistant_turns", 2048)
t = time.perf_counter()
split = build_datasets(enc, [{data!r}], cache_dir={cache!r}, num_workers={workers}, policy=ReadPolicy())
print(json.dumps({{"seconds": time.perf_counter() - t, "examples": len(split.train),
                  "entry": str(split.cache_paths[0])}}))
"""


def watch(cmd: list[str], timeline: Path | None = None) -> tuple[str, dict[int, int], dict[int, int], float]:
    """Run `cmd`; poll its process tree every 0.1 s; return (stdout, pid -> peak RSS bytes, pid -> peak
    anonymous RSS bytes, wall seconds). RSS (the kernel's VmHWM) also counts the pages of memory-mapped files
    that are resident, which the kernel can drop at any time (the cache's Arrow files once loaded); RssAnon,
    polled, is the memory that cannot be given back. With `timeline`, a line per process every second and
    whenever its VmHWM rises: seconds, pid, VmHWM, VmRSS, RssAnon, RssFile (MB): when does a peak happen."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    anon: dict[int, int] = {}
    log = open(timeline, "w") if timeline else None  # closed below
    written = 0.0
    while proc.poll() is None:
        now = time.perf_counter() - start
        for pid in _tree(proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines())
                  if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}  # fmt: skip
            hwm = kb.get("VmHWM", 0) * 1024
            rose = hwm > peaks.get(pid, 0)
            peaks[pid] = max(peaks.get(pid, 0), hwm)
            anon[pid] = max(anon.get(pid, 0), kb.get("RssAnon", 0) * 1024)
            if log and (rose or now - written >= 1.0):
                mb = [kb.get(k, 0) // 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")]
                log.write(f"{now:.1f} {pid} {' '.join(map(str, mb))}\n")
        if log and now - written >= 1.0:
            written = now
            log.flush()
        time.sleep(0.1)
    if log:
        log.close()
    out = proc.stdout.read()
    return out, peaks, anon, time.perf_counter() - start


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def bare_rate(tokenizer_dir: Path, data: Path, n: int = 20000) -> float:
    from transformers import AutoTokenizer

    from chatsft.records import iter_conversations
    from chatsft.templates import VICUNA, render_text

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = []
    for conv in iter_conversations([data]):
        texts.append(render_text(VICUNA, conv.messages, bos="<s>", eos="</s>"))
        if len(texts) >= n:
            break
    t = time.perf_counter()
    for i in range(0, len(texts), 1000):
        tok(texts[i : i + 1000], add_special_tokens=False)
    return len(texts) / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100000])
    parser.add_argument("--format", nargs="+", default=["jsonl", "json"], choices=["jsonl", "json"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/chatsft-bench-scale"))
    parser.add_argument(
        "--stage",
        default="prepare",
        choices=["prepare", "read"],
        help="prepare: build_datasets; read: only read and validate (iter_conversations), no encoding",
    )
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="write WORK/timeline-N-FORMAT.txt: each process's memory over time",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    tok = mistral_tokenizer_dir(args.work / "tokenizer")
    src = str(Path(__file__).resolve().parents[1] / "src")
    for n in args.n:
        for fmt in args.format:
            data = generate(n, fmt, args.work)
            cache = args.work / f"cache-{n}-{fmt}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            child = (CHILD if args.stage == "prepare" else READ_CHILD).format(
                src=src, tok=str(tok), data=str(data), cache=str(cache), workers=args.workers
            )
            timeline = args.timeline and args.work / f"timeline-{n}-{fmt}.txt"
            out, peaks, anon, wall = watch([sys.executable, "-c", child], timeline)
            result = json.loads(out.strip().splitlines()[-1])
            entry = Path(result["entry"]) if result["entry"] else None
            size = sum(f.stat().st_size for f in entry.iterdir()) if entry else 0
            bare = bare_rate(tok, data) if entry else None
            rate = n / result["seconds"]
            pids = sorted(peaks, key=peaks.get, reverse=True)
            rss = [peaks[p] for p in pids]
            print(
                json.dumps(
                    {
                        "n": n,
                        "format": fmt,
                        "stage": args.stage,
                        "data_bytes": data.stat().st_size,
                        "wall_s": round(wall, 1),
                        "build_s": round(result["seconds"], 1),
                        "examples": result["examples"],
                        "peak_rss_mb_per_process": [round(r / 2**20) for r in rss],
                        "peak_anon_mb_per_process": [round(anon.get(p, 0) / 2**20) for p in pids],
                        "cache_bytes": size,
                        "conversations_per_s": round(rate),
                        "bare_tokenizer_conversations_per_s": round(bare) if bare else None,
                        "ratio_to_bare": round(rate / bare, 2) if bare else None,
                        "loadavg": os.getloadavg(),
                    }
                ),
                flush=True,
            )
            subprocess.run(["rm", "-rf", str(cache)], check=True)


if __name__ == "__main__":
    main()
