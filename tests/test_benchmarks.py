"""The hand-run benchmarks still run: each script on a few hundred of the bundled conversations, its table
checked.

They are not timed here (figures live in benchmarks/README.md); this only keeps them from rotting when the
package changes under them (bench_train.py once crashed on a changed return value for a whole session).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "chatsft" / "assets" / "sample_conversations.json"


def run(script: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def table_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("|") and "---" not in line]


@pytest.mark.slow
def test_bench_train_prints_every_variant(tmp_path):
    out = run(
        "bench_train.py",
        "--data",
        str(SAMPLE),
        "--rounds",
        "1",
        "--lengths",
        "512",
        "--variants",
        "pad-to-max",
        "dynamic",
        "padding-free",
        "packing",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--baseline-steps",
        "1",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--threads",
        "1",  # each variant's process on one torch thread: two wait for each other on a busy machine
        cwd=tmp_path,
    )
    rows = table_rows(out)
    assert [row.split("|")[2].strip() for row in rows[1:]] == [
        "pad-to-max",
        "dynamic",
        "padding-free",
        "packing",
    ]
    assert "L=512: padding-free (the default) real share 1.000" in out


@pytest.mark.slow
def test_bench_preprocess_prints_every_method(tmp_path):
    out = run("bench_preprocess.py", "200", "--rounds", "1", "--data", str(SAMPLE), cwd=tmp_path)
    for method in (
        "raw fast tokenizer",
        "chatsft eager, cold cache",
        "chatsft eager, warm cache",
        "FastChat-style (slow SentencePiece)",
        "chatsft prepare (CLI in-process",
        "chatsft prepare (new",
    ):
        assert any(line.startswith(method) for line in out.splitlines()), method
    assert "0 examples zeroed for a mismatch" in out


@pytest.mark.slow
def test_bench_memory_records_idset_and_loss_print_their_tables(tmp_path):
    memory = run("bench_memory.py", "300", "--data", str(SAMPLE), cwd=tmp_path)
    assert [line.split()[0] for line in memory.splitlines()[-3:]] == ["eager,", "eager,", "lazy"]
    records = run("bench_records.py", "200", cwd=tmp_path)
    idset = run("bench_idset.py", "--n", "20000", cwd=tmp_path)
    assert re.fullmatch(
        r".*/src: 20,000 ids, anonymous MB start \d+, peak \d+, end \d+; the set 0\.3 MiB; .* s\n", idset
    )
    assert [line.split()[:2] for line in records.splitlines()[-2:]] == [[".json", "200"], [".jsonl", "200"]]
    loss = run(
        "bench_loss.py",
        "--repeats",
        "1",
        "--vocab",
        "2000",
        "--hidden",
        "32",
        "--layers",
        "1",
        "--batch",
        "2",
        "--length",
        "64",
        cwd=tmp_path,
    )
    assert [row.split("|")[1].strip() for row in table_rows(loss)[1:]] == [
        "model loss (all positions)",
        "causal_lm_loss (trained only)",
    ]


@pytest.mark.slow
def test_bench_scale_prints_one_row_per_format(tmp_path):
    out = run("bench_scale.py", "--n", "40", "--workers", "2", "--work", str(tmp_path / "work"), cwd=tmp_path)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["n"], r["format"], r["examples"]) for r in rows] == [(40, "jsonl", 40), (40, "json", 40)]
    assert all(len(r["peak_rss_mb_per_process"]) == 2 and r["cache_bytes"] > 0 for r in rows)
