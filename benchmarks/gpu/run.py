"""One prepared run on one GPU: the `gpu` tests, throughput against TRL, and the loss heads, in one table.

    benchmarks/gpu/fetch_wheels.sh        # here, with PyPI: fills benchmarks/gpu/wheels/ (git-ignored)
    bash benchmarks/gpu/run.sh --out DIR  # on the GPU machine: installs the wheels, then runs this script
    python benchmarks/gpu/run.py --dry-run --out DIR  # CPU, tiny model and vocabulary (the test suite)

Parts, in order, each timed and none stopping the others (a failure becomes its row):
1. environment: device, versions, a bf16 8192^3 matrix product timed (the measured peak for MFU);
2. tests: `pytest -m gpu` on tests/test_gpu.py and the FSDP2 test of tests/test_multiprocess.py, one row each;
3. throughput: a Qwen2.5-1.5B-shaped model from its config (random weights, fp32 masters, bf16 autocast, sdpa,
   no gradient checkpointing: 139 GiB leave room), sequence budget 4096, generated chat-mix conversations
   (benchmarks/gpu/parts.py): chatsft's default (padding-free batches), `--packing`, `--packing` with the
   chunked loss head, TRL's SFTTrainer (bfd packing, padding-free, its fused head) when trl imports; tokens/s,
   trained tokens/s, MFU against the measured and the datasheet peak, peak memory;
4. loss head at a 151,936 vocabulary (Qwen2.5's) on 8192 trained positions: plain, chunked, Liger's fused
   linear cross-entropy when it imports: time and peak memory.
The table goes to stdout and DIR/gpu-benchmark.md, everything to DIR/gpu-benchmark.json. `--budget` (s) is
the wall-clock allowance: parts that would start with too little left are reported as not run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(1, str(ROOT / "src"))

GPU_TESTS = ["tests/test_gpu.py", "tests/test_multiprocess.py::test_fsdp_full_shard_on_gpu"]
QWEN25_15B = {  # Qwen/Qwen2.5-1.5B's config.json, the fields that shape the model
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
TINY = {**QWEN25_15B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY.update(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model and vocabulary, a few steps")
    ap.add_argument("--out", default="gpu-benchmark-out", help="folder for the table and the JSON")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (360; dry run 900)")
    ap.add_argument("--parts", nargs="+", default=["env", "tests", "throughput", "loss"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (30; dry run 2)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = time.perf_counter()
    budget = a.budget or (900.0 if a.dry_run else 360.0)  # the dry run's CPUs may be shared and slow

    import torch

    device = "cpu" if a.dry_run or not torch.cuda.is_available() else "cuda"
    report = {
        "dry_run": a.dry_run,
        "device": device,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    rows: list[tuple[str, str, str, str]] = []  # (part, what, result, figures)

    def left() -> float:
        return budget - (time.perf_counter() - started)

    def part(name, needs, fn):
        if name not in a.parts:
            return
        if left() < needs:
            rows.append((name, "-", "not run", f"{left():.0f} s of the budget left, needs about {needs:.0f}"))
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as err:  # one part failing must not lose the others
            rows.append((name, "-", "error", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
            report.setdefault("errors", {})[name] = traceback.format_exc()
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)

    peaks = {"measured": None, "datasheet": None}
    part("env", 5, lambda: environment(report, rows, device, peaks, a.dry_run))
    # the tests leave about 110 s for throughput (4 x ~20 s on an H200, estimated) and the loss head
    part("tests", 60, lambda: gpu_tests(report, rows, out, timeout=max(60.0, min(300.0, left() - 110))))
    part("throughput", 30, lambda: throughput(report, rows, device, peaks, a, out))
    part("loss", 5, lambda: loss_part(report, rows, device, a.dry_run))

    report["total_seconds"] = round(time.perf_counter() - started, 1)
    table = format_table(rows, report)
    print(table)
    (out / "gpu-benchmark.md").write_text(table + "\n")
    report["table"] = [dict(zip(("part", "what", "result", "figures"), r)) for r in rows]
    (out / "gpu-benchmark.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


def environment(report, rows, device, peaks, dry_run):
    import importlib.metadata as md

    import torch

    from chatsft.training.flops import device_name, measure_matmul_peak, peak_flops

    versions = {"python": platform.python_version()}
    for pkg in (
        "torch",
        "transformers",
        "accelerate",
        "datasets",
        "trl",
        "liger-kernel",
        "deepspeed",
        "peft",
    ):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    report["versions"] = versions
    name = device_name(device)
    report["device_name"] = name
    size = 256 if dry_run else 8192
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    measured = measure_matmul_peak(device, size=size, repeats=3 if dry_run else 10, dtype=dtype)
    sheet = peak_flops(device)
    peaks["measured"], peaks["datasheet"] = measured, sheet[1] if sheet else None
    report["peak_flops"] = dict(peaks)
    rows.append(("env", name, "ok", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    figures = f"{measured / 1e12:.1f} TFLOP/s measured ({size}^3, {str(dtype).removeprefix('torch.')})"
    figures += f"; datasheet {sheet[1] / 1e12:.0f}" if sheet else "; no datasheet peak for this device"
    rows.append(("env", "matmul peak", "ok", figures))


def gpu_tests(report, rows, out, timeout):
    xml = out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs", *GPU_TESTS]
    try:
        import pytest_timeout  # noqa: F401  (the GPU image has it): a hanging test fails alone

        cmd.append("--timeout=150")
    except ImportError:
        pass
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [*cmd, f"--junitxml={xml}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        tail = (done.stdout + done.stderr)[-6000:]
    except subprocess.TimeoutExpired as err:
        tail = f"timed out after {timeout:.0f} s\n" + str(err.stdout or "")[-4000:]
    (out / "gpu-tests.log").write_text(tail)
    report["tests_log_tail"] = tail[-3000:]
    if not xml.is_file():
        rows.append(("tests", "pytest -m gpu", "error", tail.strip().splitlines()[-1][:200] if tail else "?"))
        return
    results = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", f"{float(case.get('time', 0)):.1f} s"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[child.tag]
                detail = (child.get("message") or "").splitlines()[0][:160] if child.get("message") else ""
        results.append({"test": case.get("name"), "outcome": outcome, "detail": detail})
        rows.append(("tests", case.get("name"), outcome, detail))
    report["tests"] = results


def throughput(report, rows, device, peaks, a, out):
    from parts import Workload, generate_examples, mix_summary, run_variant
    from transformers import Qwen2Config

    from chatsft.training.flops import model_flops

    dry = a.dry_run
    config = Qwen2Config(**(TINY if dry else QWEN25_15B))
    budget = 256 if dry else 4096
    steps = a.steps or (2 if dry else 30)
    examples = generate_examples(48 if dry else 1200, budget, config.vocab_size, seed=0)
    mix = mix_summary(examples)
    batch = max(1, round(budget / mix["mean_tokens"]))
    work = Workload(config, budget, steps, 1 if dry else 3, device, bf16=device != "cpu", batch=batch)
    flops = model_flops(config)
    report["throughput_setup"] = {
        "config": config.to_diff_dict(),
        "budget": budget,
        "mix": mix,
        "batch": batch,
    }
    rows.append(
        (
            "throughput",
            "data",
            "ok",
            f"{mix['conversations']} conversations, mean {mix['mean_tokens']} tokens "
            f"(median {mix['median_tokens']}, p95 {mix['p95_tokens']}), "
            f"{100 * mix['trained_share']:.1f}% trained; default batch {batch}",
        )
    )
    variants = ["chatsft default", "chatsft --packing", "chatsft --packing, chunked"]
    try:
        import trl  # noqa: F401

        variants.append("trl")
    except ImportError:
        rows.append(("throughput", "trl SFTTrainer", "skipped", "trl is not installed"))
    results = []
    for name in variants:
        try:
            # not under --out: only the report comes back; removed after each variant (a dry run too)
            with tempfile.TemporaryDirectory(prefix="chatsft-gpu-") as runs:
                r = run_variant(name, work, examples, flops, peaks, runs)
        except Exception as err:
            rows.append(
                ("throughput", name, "error", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            )
            report.setdefault("errors", {})[f"throughput {name}"] = traceback.format_exc()
            continue
        results.append(r)
        mfu = ", ".join(f"MFU {r[k]:.1%} ({k[4:]})" for k in ("mfu_measured", "mfu_datasheet") if r.get(k))
        memory = f", peak {r['peak_gib']} GiB" if r["peak_gib"] is not None else ""
        rows.append(
            (
                "throughput",
                name,
                "ok",
                f"{r['tokens_per_s']:,.0f} tok/s, {r['trained_tokens_per_s']:,.0f} trained tok/s"
                f"{', ' + mfu if mfu else ''}{memory}, padding {100 * r['padding_share']:.1f}%, "
                f"{steps} steps",
            )
        )
    report["throughput"] = results
    ours = [r for r in results if r["variant"].startswith("chatsft")]
    theirs = [r for r in results if r["variant"] == "trl"]
    if ours and theirs:
        best = max(ours, key=lambda r: r["trained_tokens_per_s"])
        ratio = best["trained_tokens_per_s"] / theirs[0]["trained_tokens_per_s"]
        report["trained_tokens_ratio_vs_trl"] = round(ratio, 3)
        rows.append(
            ("throughput", "best chatsft / TRL", f"{ratio:.2f}x", f"trained tokens/s ({best['variant']})")
        )


def loss_part(report, rows, device, dry_run):
    from parts import loss_heads

    n, hidden, vocab = (64, 32, 1000) if dry_run else (8192, 1536, 151936)
    results = loss_heads(n, hidden, vocab, device, repeats=2 if dry_run else 5)
    report["loss_heads"] = {"rows": n, "hidden": hidden, "vocab": vocab, "results": results}
    for r in results:
        if "skipped" in r:
            rows.append(("loss head", r["head"], "skipped", r["skipped"]))
            continue
        memory = f", peak +{r['peak_extra_gib']} GiB" if r["peak_extra_gib"] is not None else ""
        rows.append(
            (
                "loss head",
                r["head"],
                "ok",
                f"{r['ms']} ms fwd+bwd{memory} ({n} x {vocab:,}); loss rel. diff {r['loss_rel_diff']:.1e}",
            )
        )


def format_table(rows, report) -> str:
    name = report.get("device_name", report["device"])
    head = f"GPU benchmark ({'dry run, ' if report['dry_run'] else ''}{name}"
    head += f", {report['date_utc']} UTC, {report.get('total_seconds', 0):.0f} s)"
    lines = [head, "", "| part | what | result | figures |", "| --- | --- | --- | --- |"]
    lines += [f"| {p} | {w} | {r} | {f} |" for p, w, r, f in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
