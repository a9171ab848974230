"""Crash-safe resume: training killed anywhere (SIGKILL mid-step, mid-checkpoint-write) or pre-empted (SIGTERM)
and relaunched with the same command ends with exactly the weights and loss history of an uninterrupted run.

Every run is a separate `python` process on CPU in fp32 with one thread, so runs are bit-for-bit repeatable and
the comparisons are exact (`torch.equal`, float equality of the logged values). The tiny model has attention
dropout, so every forward draws from torch's RNG: a resumed run matches only if the Trainer restored the RNG
state (`rng_state.pth`) and the data order exactly, which the per-micro-batch trace of `train_driver.py`
(hashes of each batch's input_ids and of the RNG states as its forward starts) checks directly.

Schedule: 32 examples, batch 2, accumulation 2: 8 optimizer steps per epoch, 10 steps in all (the resumed runs
cross the epoch boundary), a checkpoint every 2 steps.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from chatsft_runs import (
    Launch,
    checkpoints,
    command,
    logged,
    make_setup,
    read_trace,
    run,
    trace_lines,
    train_flags,
    weights,
)

from chatsft.training.checkpoint import MARKER_NAME, checkpoint_problem
from chatsft.training.final import FINAL_MARKER_NAME
from chatsft.training.preempt import PreemptionCallback

MAX_STEPS, SAVE_STEPS = 10, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("faults"), dropout=0.1)


def flags(setup, out: Path, *extra: str) -> list[str]:
    return train_flags(
        setup,
        out,
        cache=setup.root / "cache",
        max_steps=MAX_STEPS,
        accumulation=2,
        save_steps=SAVE_STEPS,
        extra=extra,
    )


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run: final weights, logged losses and the trace of every micro-batch."""
    out = setup.root / "reference"
    trace = setup.root / "reference.trace"
    rc, output = run(command(flags(setup, out), driver=["--trace", str(trace)]), setup.root / "reference.log")
    assert rc == 0, output[-3000:]
    rows = read_trace(trace)
    assert [r["step"] for r in rows] == [s for s in range(1, MAX_STEPS + 1) for _ in range(2)]
    assert len({r["rng"] for r in rows}) == len(rows)  # dropout draws: the RNG state moves every micro-batch
    return {"weights": weights(out), "logged": logged(out), "trace": rows}


def assert_matches_reference(out: Path, trace: Path, reference: dict, *, resumed_from: int) -> None:
    """Final weights and loss history equal the uninterrupted run's; after the resume point the same batches
    were trained in the same order, each starting from the same RNG states."""
    assert (out / FINAL_MARKER_NAME).is_file()
    final = weights(out)
    assert final.keys() == reference["weights"].keys()
    differ = [k for k in final if not torch.equal(final[k], reference["weights"][k])]
    assert differ == [], f"tensors differ from the uninterrupted run: {differ}"
    assert logged(out) == reference["logged"]
    rows = read_trace(trace)
    assert rows, "the relaunch trained nothing"
    assert rows[0]["step"] == resumed_from + 1
    expected = [r for r in reference["trace"] if r["step"] > resumed_from]
    assert [(r["step"], r["batch"]) for r in rows] == [
        (r["step"], r["batch"]) for r in expected
    ]  # data order
    assert [r["rng"] for r in rows] == [r["rng"] for r in expected]  # RNG restored
    assert all(checkpoint_problem(p) is None for p in checkpoints(out).values())


@pytest.mark.slow
def test_sigkill_inside_checkpoint_saves_then_resume(setup, reference):
    """Killed at two fixed points of a checkpoint save; each relaunch skips the cut-off checkpoint."""
    out = setup.root / "chain"
    root = setup.root

    # 1. Killed inside checkpoint-2's save: the weights are written, the optimizer state is not.
    rc, output = run(command(flags(setup, out), driver=["--kill-at", "optimizer@2"]), root / "chain1.log")
    assert rc == -signal.SIGKILL, output[-3000:]
    ck2 = out / "checkpoint-2"
    assert (ck2 / "model.safetensors").is_file() and not (ck2 / "optimizer.pt").exists()
    assert MARKER_NAME in checkpoint_problem(ck2)

    # 2. The relaunch skips it and starts over; killed when every file of checkpoint-4 but the marker is written.
    rc, output = run(command(flags(setup, out), driver=["--kill-at", "marker@4"]), root / "chain2.log")
    assert rc == -signal.SIGKILL, output[-3000:]
    assert f"skipping incomplete checkpoint {ck2}" in output
    assert "starting from step 0" in output
    assert checkpoint_problem(ck2) is None  # written again, whole this time
    ck4 = out / "checkpoint-4"
    assert {"model.safetensors", "optimizer.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in ck4.iterdir()
    }
    assert MARKER_NAME in checkpoint_problem(ck4)

    # 3. The relaunch skips checkpoint-4, resumes from checkpoint-2 and trains to the end.
    trace = root / "chain3.trace"
    rc, output = run(command(flags(setup, out), driver=["--trace", str(trace)]), root / "chain3.log")
    assert rc == 0, output[-3000:]
    assert f"skipping incomplete checkpoint {ck4}" in output
    assert f"resuming from {ck2}" in output
    assert sorted(checkpoints(out)) == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert_matches_reference(out, trace, reference, resumed_from=2)


@pytest.mark.slow
def test_sigkill_from_outside_mid_save_and_mid_step(setup, reference):
    """SIGKILL sent by another process: once while checkpoint-4 is being written, once at a random moment
    inside a training step; the third launch finishes."""
    out = setup.root / "outside"
    root = setup.root
    ck4 = out / "checkpoint-4"

    # 1. Killed as soon as checkpoint-4's folder appears (its marker is held back 0.5 s so the kill surely
    #    lands before it; where inside the save it lands is up to the timing).
    with Launch(command(flags(setup, out), driver=["--slow-marker", "0.5"]), root / "outside1.log") as launch:
        launch.wait_for(lambda: ck4.is_dir(), "checkpoint-4 folder")
        launch.proc.send_signal(signal.SIGKILL)
        assert launch.wait() == -signal.SIGKILL
    assert not (ck4 / MARKER_NAME).exists()
    assert checkpoint_problem(ck4) is not None

    # 2. Relaunched (resumes from checkpoint-2), then killed at a random moment inside step 7: after its second
    #    micro-batch has begun, a random fraction of the time its first one took (this machine's pace).
    trace2 = root / "outside2.trace"
    fraction = random.Random(7).random()
    with Launch(command(flags(setup, out), driver=["--trace", str(trace2)]), root / "outside2.log") as launch:
        first_of_step_7 = 2 * (7 - 3)  # this launch trains from step 3, two micro-batches a step
        launch.wait_for(lambda: trace_lines(trace2) > first_of_step_7, "step 7")
        began = time.monotonic()
        launch.wait_for(lambda: trace_lines(trace2) > first_of_step_7 + 1, "step 7's second micro-batch")
        micro_batch = time.monotonic() - began
        time.sleep(fraction * micro_batch)
        launch.proc.send_signal(signal.SIGKILL)
        assert launch.wait() == -signal.SIGKILL
        output = launch.output()
    assert f"resuming from {out / 'checkpoint-2'}" in output
    last_started = read_trace(trace2)[-1]["step"]
    complete = [s for s, p in checkpoints(out).items() if checkpoint_problem(p) is None]
    assert 4 in complete  # written again by this launch, over the cut-off folder
    newest = max(complete)
    assert newest < last_started, (
        f"killed {fraction * micro_batch:.4f} s into step 7's second micro-batch, yet no step was lost"
    )

    # 3. Relaunched: resumes from the newest complete checkpoint and finishes like the uninterrupted run.
    trace3 = root / "outside3.trace"
    rc, output = run(command(flags(setup, out), driver=["--trace", str(trace3)]), root / "outside3.log")
    assert rc == 0, output[-3000:]
    assert f"resuming from {out / f'checkpoint-{newest}'}" in output
    assert_matches_reference(out, trace3, reference, resumed_from=newest)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(setup, reference):
    """SIGTERM mid-run: the step finishes, a complete checkpoint of it is written (even with --save_strategy no),
    the process exits 143 without a final model, and the same command resumes and ends as if never stopped."""
    out = setup.root / "sigterm"
    trace = setup.root / "sigterm.trace"
    argv = flags(setup, out, "--save_strategy", "no")
    with Launch(command(argv, driver=["--trace", str(trace)]), setup.root / "sigterm1.log") as launch:
        launch.wait_for(
            lambda: trace_lines(trace) >= 5, "step 3"
        )  # the first micro-batch of step 3 has begun
        launch.proc.send_signal(signal.SIGTERM)
        rc = launch.wait()
        output = launch.output()
    assert rc == 143, output[-3000:]
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, output[-3000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 3 <= step < MAX_STEPS
    assert read_trace(trace)[-1]["step"] == step  # it stopped at the step boundary: nothing of step + 1 began
    assert list(checkpoints(out)) == [step]
    assert checkpoint_problem(out / f"checkpoint-{step}") is None
    assert not (out / "model.safetensors").exists() and not (out / FINAL_MARKER_NAME).exists()

    trace2 = setup.root / "sigterm2.trace"
    rc, output = run(command(argv, driver=["--trace", str(trace2)]), setup.root / "sigterm2.log")
    assert rc == 0, output[-3000:]
    assert f"resuming from {out / f'checkpoint-{step}'}" in output
    assert_matches_reference(out, trace2, reference, resumed_from=step)


# ---- the pre-emption callback on its own (one process, no training) -----------------------------------------


class _Args:
    device = "cpu"


def test_preemption_callback_turns_sigterm_into_save_and_stop():
    from transformers import TrainerControl, TrainerState

    before = signal.getsignal(signal.SIGTERM)
    callback, state, control = PreemptionCallback(), TrainerState(), TrainerControl()
    callback.on_train_begin(_Args(), state, control)
    try:
        state.global_step = 4
        callback.on_step_end(_Args(), state, control)  # no signal yet: nothing asked
        assert not control.should_save and not control.should_training_stop
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it; the process lives on
        state.global_step = 5
        callback.on_step_end(_Args(), state, control)
        assert control.should_save and control.should_training_stop
        assert (callback.stopped_at, callback.exit_code) == (5, 143)
    finally:
        callback.on_train_end(_Args(), state, control)
    assert signal.getsignal(signal.SIGTERM) is before


def test_preemption_callback_outside_the_main_thread_installs_nothing():
    import threading

    before = signal.getsignal(signal.SIGTERM)
    result = []
    thread = threading.Thread(target=lambda: result.append(PreemptionCallback().install()))
    thread.start()
    thread.join()
    assert result == [False] and signal.getsignal(signal.SIGTERM) is before
