"""Helpers for the tests that run `chatsft.train` as separate processes (test_faults, test_multiprocess).

A tiny Llama and a byte-level BPE tokenizer are built in-process and saved as the base model; training runs in
subprocesses (plain `python`, or `torch.distributed.run` for several processes), through `train_driver.py`
when a test needs a per-micro-batch trace or a kill at a chosen point of a checkpoint save.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "train_driver.py"
# One thread per process: the same arithmetic in every launch, and two ranks fit on two cores.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}
LAUNCH_TIMEOUT = 180
LOGGED = ("step", "loss", "grad_norm", "learning_rate", "epoch")  # what must match between runs (not timings)

COUNTRIES = [
    ("France", "Paris"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Peru", "Lima"),
    ("Egypt", "Cairo"),
    ("Chile", "Santiago"),
    ("Kenya", "Nairobi"),
]


@dataclass
class Setup:
    root: Path
    base: Path
    data: Path


def conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        country, city = COUNTRIES[i % len(COUNTRIES)]
        other, other_city = COUNTRIES[(i + 3) % len(COUNTRIES)]
        turns = [{"from": "human", "value": f"Capital of {country}?"}, {"from": "gpt", "value": f"{city}."}]
        if i % 2:
            turns += [
                {"from": "human", "value": f"And {other}?"},
                {"from": "gpt", "value": f"It is {other_city}."},
            ]
        out.append({"id": f"c{i}", "conversations": turns})
    return out


def make_setup(root: Path, *, dropout: float, n: int = 32, bad_records: int = 0) -> Setup:
    """Data (`n` conversations, plus `bad_records` that validation rejects) and a saved tiny base model.

    `dropout` > 0 makes every forward draw from torch's RNG, so a resumed run matches only if the RNG state is
    restored exactly.
    """
    from chatsft.records import read_conversations
    from chatsft.templates import get_template, render_text
    from chatsft.training.tiny import build_model, build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.json"
    records = conversations(n) + [
        {"id": f"bad{i}", "conversations": [{"from": "human", "value": "?"}]} for i in range(bad_records)
    ]
    data.write_text(json.dumps(records))
    template, _ = get_template("vicuna_v1.1")
    convs, _ = read_conversations([data])
    texts = [render_text(template, c.messages, bos="<s>", eos="</s>") for c in convs]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    model = build_model(tokenizer, hidden_size=32, layers=2, heads=2, max_positions=256)
    model.config.attention_dropout = dropout
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return Setup(root, base, data)


def train_flags(
    setup: Setup,
    out: Path,
    *,
    cache: Path,
    max_steps: int,
    batch: int = 2,
    accumulation: int,
    save_steps: int,
    cpu: bool = True,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Flags of one run; `cpu` adds `--use_cpu True` (also where a GPU is visible: the CPU tests compare runs
    exactly, and torchrun on CPU needs it)."""
    return [
        "--model_name_or_path",
        str(setup.base),
        "--data_path",
        str(setup.data),
        "--output_dir",
        str(out),
        "--conv_template",
        "vicuna_v1.1",
        "--model_max_length",
        "256",
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        str(batch),
        "--gradient_accumulation_steps",
        str(accumulation),
        "--learning_rate",
        "1e-2",
        "--logging_steps",
        "1",
        "--save_steps",
        str(save_steps),
        "--report_to",
        "none",
        "--seed",
        "0",
        "--data_seed",
        "0",
        "--cache_dir",
        str(cache),
        "--disable_tqdm",
        "True",
        "--preprocessing_num_workers",
        "1",
        *(["--use_cpu", "True"] if cpu else []),
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(
    flags: list[str], *, driver: list[str] | None = None, nproc: int = 1, launcher: bool = False
) -> list[str]:
    """`python -m chatsft.train FLAGS`, through the driver when `driver` options are given, under torchrun
    when `nproc` > 1 or `launcher` (FSDP and DeepSpeed need one, also for a single process)."""
    target = [str(DRIVER), *driver, "--", *flags] if driver is not None else ["-m", "chatsft.train", *flags]
    if nproc == 1 and not launcher:
        return [sys.executable, *target]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *target,
    ]


class Launch:
    """A training run in its own process group, its output going to `log`; killed (group) on exit."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        self._file = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._file, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_group()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(
                f"{self.log.name}: no exit within {timeout} s\n{self.output()[-3000:]}"
            ) from None
        finally:
            self._file.close()

    def wait_for(self, condition, what: str, timeout: float = LAUNCH_TIMEOUT, poll: float = 0.002) -> None:
        """Poll `condition()` every `poll` seconds until it is true; fail if the run ends first."""
        end = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.log.name}: exited ({self.proc.returncode}) before {what}\n{self.output()[-3000:]}"
                )
            if time.monotonic() > end:
                raise AssertionError(
                    f"{self.log.name}: no {what} within {timeout} s\n{self.output()[-3000:]}"
                )
            time.sleep(poll)

    def kill_group(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._file.close()

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the worker processes of a torchrun launch (children of the launcher)."""
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ranks = {}
        for child in children:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            env = dict(kv.decode(errors="replace").split("=", 1) for kv in environ if b"=" in kv)
            if "RANK" in env:
                ranks[int(env["RANK"])] = int(child)
        return ranks


def run(cmd: list[str], log: Path, timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str]:
    with Launch(cmd, log) as launch:
        rc = launch.wait(timeout)
        return rc, launch.output()


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def logged(folder: Path) -> list[dict]:
    """The per-step training logs of `folder/trainer_state.json`, without the timing fields."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [{k: entry[k] for k in LOGGED} for entry in history if "loss" in entry]


def read_trace(*paths: Path) -> list[dict]:
    rows = []
    for path in paths:
        if path.is_file():
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def trace_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def checkpoints(folder: Path) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in folder.glob("checkpoint-*") if p.is_dir()}
