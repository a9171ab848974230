"""Time one training step (forward + backward) with the model's own loss (head and cross-entropy on every
position) against `chatsft.training.loss.causal_lm_loss` (head and cross-entropy on trained positions only).

    .venv/bin/python benchmarks/bench_loss.py [--vocab 32000] [--hidden 256] [--layers 2] [--trained 0.4]

Synthetic batch: `--batch` examples of `--length` tokens, each with its last `--trained` share of tokens
trained (the rest is prompt), padded collation. Prints the median of `--repeats` steps after one warm-up.

    .venv/bin/python benchmarks/bench_loss.py --heads [--rows 2048] [--vocab 32000] [--hidden 256]

compares the loss heads of `causal_lm_loss` instead (`--loss_head plain` vs `chunked`): forward + backward of
hidden (rows, hidden) x head weight (vocab, hidden) -> summed cross-entropy in fp32, each head in a fresh
process; time is the median of `--repeats` after a warm-up, memory the growth of the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) over what it held before the head ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--trained", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--packed", action="store_true", help="one packed row instead of a padded batch")
    ap.add_argument("--heads", action="store_true", help="compare the loss heads (plain, chunked) instead")
    ap.add_argument("--rows", type=int, default=2048, help="with --heads: trained positions")
    ap.add_argument("--chunk-rows", type=int, default=0, help="with --heads: rows per block (0: the default)")
    ap.add_argument("--one-head", help=argparse.SUPPRESS)  # the child process of --heads
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.one_head:
        print(json.dumps(one_head(a)))
        return
    if a.heads:
        compare_heads(a)
        return

    from transformers import AutoModelForCausalLM, LlamaConfig

    from chatsft.collate import PackedCollator, PadCollator
    from chatsft.training.loss import causal_lm_loss

    positions = max(a.length, 2048) * (a.batch if a.packed else 1)
    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 4,
        num_hidden_layers=a.layers,
        num_attention_heads=max(a.hidden // 64, 1),
        max_position_embeddings=positions,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(a.batch):
        ids = torch.randint(1, a.vocab, (a.length,), generator=g).tolist()
        prompt = a.length - int(a.length * a.trained)
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = (PackedCollator() if a.packed else PadCollator(0))(examples)

    def full():
        return model(**batch, use_cache=False).loss

    def trained_only():
        return causal_lm_loss(model, batch)[0]

    fns = {"model loss (all positions)": full, "causal_lm_loss (trained only)": trained_only}
    times = {name: [] for name in fns}
    for i in range(a.repeats + 1):  # alternate, so that load from other processes hits both alike
        for name, fn in fns.items():
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            fn().backward()
            if i:
                times[name].append(time.perf_counter() - t)
    results = {name: statistics.median(ts) for name, ts in times.items()}
    base = results["model loss (all positions)"]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"vocab {a.vocab}, hidden {a.hidden}, layers {a.layers} ({params:.1f}M params), "
        f"{a.batch} x {a.length} tokens {'packed' if a.packed else 'padded'}, trained share {a.trained}, "
        f"{a.threads} thread(s)"
    )
    print("| loss | step s (median) | speed-up |\n| --- | ---: | ---: |")
    for name, s in results.items():
        print(f"| {name} | {s:.3f} | {base / s:.2f}x |")


HEADS = ("plain", "chunked")


def _kib(field: str) -> int:
    status = open("/proc/self/status").read()
    return int(next(line for line in status.splitlines() if line.startswith(field)).split()[1])


def one_head(a) -> dict:
    """In a fresh process: time and peak memory of one loss head's forward + backward."""
    import torch.nn.functional as F

    from chatsft.training.loss import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(a.rows, a.hidden, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, a.vocab, (a.rows,), generator=g)

    def step():
        h.grad = w.grad = None
        logits = h @ w.T
        loss = (
            chunked_cross_entropy(logits, t, a.chunk_rows or None)
            if a.one_head == "chunked"
            else F.cross_entropy(logits, t, reduction="sum")
        )
        loss.backward()
        return loss.item()

    before = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    loss = step()  # the first call: its peak is the memory figure
    peak = _kib("VmHWM") - before
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"head": a.one_head, "loss": loss, "seconds": statistics.median(times), "peak_mib": peak / 1024}


def compare_heads(a) -> None:
    results = []
    for head in HEADS:
        args = [sys.executable, __file__, "--one-head", head, "--rows", str(a.rows), "--vocab", str(a.vocab)]
        args += ["--hidden", str(a.hidden), "--repeats", str(a.repeats), "--threads", str(a.threads)]
        args += ["--chunk-rows", str(a.chunk_rows)]
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    logits_mib = a.rows * a.vocab * 4 / 2**20
    from chatsft.training.loss import CHUNK_BYTES

    chunk = a.chunk_rows or max(1, CHUNK_BYTES // (4 * a.vocab))
    print(
        f"loss heads: {a.rows} trained positions x vocab {a.vocab}, hidden {a.hidden}, fp32 on CPU, "
        f"{a.threads} thread(s); fp32 logits {logits_mib:.0f} MiB; chunked takes {chunk} rows at a time"
    )
    print("| head | fwd+bwd s (median) | peak memory growth MiB | loss |\n| --- | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['head']} | {r['seconds']:.3f} | {r['peak_mib']:.0f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
