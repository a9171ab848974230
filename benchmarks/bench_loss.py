"""Time one training step (forward + backward) with the model's own loss (head and cross-entropy on every
position) against `chatsft.training.loss.causal_lm_loss` (head and cross-entropy on trained positions only).

    .venv/bin/python benchmarks/bench_loss.py [--vocab 32000] [--hidden 256] [--layers 2] [--trained 0.4]

Synthetic batch: `--batch` examples of `--length` tokens, each with its last `--trained` share of tokens
trained (the rest is prompt), padded collation. Prints the median of `--repeats` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

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


if __name__ == "__main__":
    main()
