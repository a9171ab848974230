"""benchmarks/gpu/run.py --dry-run: the whole GPU script on CPU with a tiny model and vocabulary, so that it
cannot rot while no GPU is lent. Every part runs (the `gpu` tests are collected and skip without CUDA); the
table is printed and written, the JSON holds every part."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute on the shared 2-core machine (imports, four tiny trainings, a pytest run)
def test_dry_run_prints_and_writes_every_part(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu" / "run.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    written = [line for line in (out / "gpu-benchmark.md").read_text().splitlines() if line.startswith("| ")]
    assert [line for line in written if "---" not in line] == table
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]
    report = json.loads((out / "gpu-benchmark.json").read_text())
    assert report["dry_run"] is True and report["device"] == "cpu"
    assert "errors" not in report, report.get("errors")
    assert [r["part"] for r in report["table"]] == [r[0] for r in rows]

    env = [r for r in rows if r[0] == "env"]
    assert [r[1] for r in env] == ["cpu", "matmul peak"] and env[1][3].endswith(
        "no datasheet peak for this device"
    )

    tests = {r[1]: (r[2], r[3]) for r in rows if r[0] == "tests"}
    assert "test_packing_self_test_in_bf16[sdpa]" in tests and "test_fsdp_full_shard_on_gpu" in tests
    assert "test_deepspeed_zero3_16bit_final_save" in tests and "test_mfu_is_logged_on_the_gpu" in tests
    assert all(outcome == "skipped" for outcome, _ in tests.values()), tests

    variants = [r[1] for r in rows if r[0] == "throughput"]
    assert variants == [
        "data",
        "chatsft default",
        "chatsft --packing",
        "chatsft --packing, chunked",
        "trl",
        "best chatsft / TRL",
    ]
    results = {r["variant"]: r for r in report["throughput"]}
    # the same examples, the same counts: chatsft --packing and TRL's bfd packing fill rows alike
    assert all(r["padding_share"] == 0.0 for r in results.values())
    assert all(r["trained_tokens_per_s"] > 0 and r["mfu_measured"] > 0 for r in results.values())
    packed, chunked = (
        results["chatsft --packing"]["last_loss"],
        results["chatsft --packing, chunked"]["last_loss"],
    )
    assert chunked == pytest.approx(packed, rel=1e-6)  # the same training, the head summed in another order

    heads = {r["head"]: r for r in report["loss_heads"]["results"]}
    assert list(heads) == [
        "plain: logits, fp32 copy, F.cross_entropy",
        "chunked: logits, chunked_cross_entropy",
        "liger: fused linear cross-entropy",
    ]
    assert heads["chunked: logits, chunked_cross_entropy"]["loss_rel_diff"] <= 1e-6
