"""Crash-safe resume: training killed anywhere (SIGKILL mid-step, mid-checkpoint-write) or pre-empted
(SIGTERM) and relaunched with the same command ends with exactly the weights and loss history of an
uninterrupted run.

Every run is a separate `python` process on CPU in fp32 with one thread, so runs are bit-for-bit repeatable
and the comparisons are exact (`torch.equal`, float equality of the logged values). The tiny model has
attention dropout, so every forward draws from torch's RNG: a resumed run matches only if the Trainer restored
the RNG state (`rng_state.pth`) and the data order exactly, which the per-micro-batch trace of
`train_driver.py` (hashes of each batch's input_ids and of the RNG states as its forward starts) checks
directly.

Schedule: 32 examples, batch 2, accumulation 2: 8 optimizer steps per epoch, 10 steps in all (the resumed runs
cross the epoch boundary), a checkpoint every 2 steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
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

from chatsft import cache
from chatsft.training.checkpoint import MARKER_NAME, checkpoint_problem
from chatsft.training.final import FINAL_MARKER_NAME, FINAL_TMP_NAME
from chatsft.training.preempt import PreemptionCallback

MAX_STEPS, SAVE_STEPS = 10, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # two records that validation rejects: the cache entry then holds a rejects file too
    return make_setup(tmp_path_factory.mktemp("faults"), dropout=0.1, bad_records=2)


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
    """The uninterrupted run: final weights, logged losses and the trace of every micro-batch; and this
    machine's pace now (seconds from launch to the first micro-batch, and of a micro-batch), which the random
    trials scale their moments by."""
    out = setup.root / "reference"
    trace = setup.root / "reference.trace"
    with Launch(
        command(flags(setup, out), driver=["--trace", str(trace)]), setup.root / "reference.log"
    ) as run_:
        began = time.monotonic()
        run_.wait_for(lambda: trace_lines(trace) > 0, "the first micro-batch")
        startup = time.monotonic() - began
        rc = run_.wait()
        output = run_.output()
    assert rc == 0, output[-3000:]
    assert "read 34 records from 1 file(s): 32 accepted, 2 rejected" in output
    rows = read_trace(trace)
    assert [r["step"] for r in rows] == [s for s in range(1, MAX_STEPS + 1) for _ in range(2)]
    assert len({r["rng"] for r in rows}) == len(rows)  # dropout draws: the RNG state moves every micro-batch
    micro_batch = statistics.median(rows[i + 1]["t"] - rows[i]["t"] for i in range(0, len(rows), 2))
    return {
        "weights": weights(out),
        "logged": logged(out),
        "trace": rows,
        "startup": startup,
        "micro_batch": micro_batch,
    }


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

    # 2. The relaunch skips it and starts over; killed when every file of checkpoint-4 but the marker is
    # written.
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

    # 2. Relaunched (resumes from checkpoint-2), then killed at a random moment inside step 7: after its
    # second micro-batch has begun, a random fraction of the time its first one took (this machine's pace).
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
    """SIGTERM mid-run: the step finishes, a complete checkpoint of it is written (even with --save_strategy
    no), the process exits 143 without a final model, and the same command resumes and ends as if never
    stopped."""
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
    done = f"training done: {MAX_STEPS} steps ({MAX_STEPS - step} in this launch), average train loss "
    assert done in output
    assert_matches_reference(out, trace2, reference, resumed_from=step)


# ---- the pre-emption callback on its own (one process, no training) ----------------------------------------


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


def test_a_sigterm_after_the_last_step_is_named_and_the_run_goes_on(caplog):
    """Arriving during the last step's checkpoint save, after the last step's end: no step is left to stop
    after, so the run goes on to its final save (exit 0), and says so."""
    from transformers import TrainerControl, TrainerState

    callback, state, control = PreemptionCallback(), TrainerState(), TrainerControl()
    callback.on_train_begin(_Args(), state, control)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        callback.on_train_end(_Args(), state, control)
    assert callback.stopped_at is None and callback.exit_code is None
    assert [r.getMessage() for r in caplog.records] == [
        "pre-emption: SIGTERM arrived after the last step: the run goes on to its final save"
    ]


def test_preemption_callback_outside_the_main_thread_installs_nothing():
    import threading

    before = signal.getsignal(signal.SIGTERM)
    result = []
    thread = threading.Thread(target=lambda: result.append(PreemptionCallback().install()))
    thread.start()
    thread.join()
    assert result == [False] and signal.getsignal(signal.SIGTERM) is before


# ---- the final save, a full disk -------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_the_final_save_finishes_it(setup, reference):
    """With --save_strategy no the final save is the only copy of the training: a SIGTERM during it waits."""
    out = setup.root / "sigterm-final"
    argv = flags(setup, out, "--save_strategy", "no")
    with Launch(command(argv, driver=["--slow-final", "1"]), setup.root / "sigterm-final.log") as launch:
        launch.wait_for(lambda: (out / FINAL_TMP_NAME / "model.safetensors").is_file(), "the final save")
        launch.proc.send_signal(signal.SIGTERM)
        rc = launch.wait()
        output = launch.output()
    assert rc == 0, output[-3000:]
    assert "SIGTERM arrived during the final save: the save was completed first" in output
    assert (out / FINAL_MARKER_NAME).is_file() and not (out / FINAL_TMP_NAME).exists()
    final = weights(out)
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"])
    rc, output = run(command(argv), setup.root / "sigterm-final2.log")  # the same command: nothing left to do
    assert rc == 0 and "already holds the final model of this same run: nothing to train" in output


@contextlib.contextmanager
def small_disk(folder: Path, size: int):
    """A tmpfs of `size` bytes at `folder` (root only: mount(2)); skips the test where none can be mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` until `leave` bytes are free."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


DISK_FULL = re.compile(
    r"^chatsft train: error: no space left on the disk of --output_dir (\S+) \(.* free\) while writing "
    r"(.+): (the newest complete checkpoint is checkpoint-\d+|no checkpoint is complete yet)(; an earlier "
    r"final model in it is unchanged)?\. Free space \(or lower --save_total_limit\), then run the same "
    r"command to resume$"
)
DISK_REFUSED = "needed for 2 checkpoints"  # pre-flight saw too little space: refused before training
TRIALS = int(os.environ.get("CHATSFT_FAULT_TRIALS", "1"))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_disk_that_fills_at_a_random_byte(setup, reference, tmp_path, trial):
    """The output folder on a 4 MiB tmpfs, filled to leave a random number of bytes (seeded per trial): the
    run stops with one line naming where space ran out (or pre-flight refuses it); freed, the same command
    resumes and ends with the uninterrupted run's weights."""
    rng = random.Random(1000 + trial)
    with small_disk(tmp_path / "disk", 4 << 20) as disk:
        out = disk / "out"
        argv = flags(setup, out, "--save_total_limit", "2")
        filler = fill(disk, rng.randrange(1300 << 10, 2300 << 10))  # checkpoints are ~700 KB
        rc, output = run(command(argv), tmp_path / "full.log")
        last = output.strip().splitlines()[-1]
        if rc == 0:
            outcome = "finished"  # the space left was enough after all
        elif DISK_REFUSED in last:
            assert rc == 2 and "Traceback" not in output, output[-3000:]
            outcome = "refused by pre-flight"
        else:
            assert rc == 1 and "Traceback" not in output, output[-3000:]
            assert DISK_FULL.match(last), last
            outcome = f"full while writing {DISK_FULL.match(last).group(2)}"
        print(f"trial {trial}: {shutil.disk_usage(disk).free} bytes free at the end: {outcome}")
        filler.unlink()
        rc, output = run(command(argv), tmp_path / "freed.log")
        assert rc == 0, output[-3000:]
        final = weights(out)
        assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"]), outcome


# ---- random trials over a whole run ----------------------------------------------------------------------

PHASES = ("start-up", "training", "checkpoint save", "final save")
WINDOW = 0.5  # seconds the driver holds a checkpoint's or the final save's last act back: the save's span


def _other_data(setup) -> Path:
    other = setup.root / "other.json"
    records = json.loads(setup.data.read_text())
    records[1]["conversations"][1]["value"] = "Madrid, of course."
    other.write_text(json.dumps(records))
    return other


def _driver_options(phase: str, trace: Path, hold: Path) -> list[str]:
    options = ["--trace", str(trace)]
    if phase == "start-up":
        options += ["--hold", str(hold)]
    if phase == "checkpoint save":
        options += ["--slow-marker", str(WINDOW)]
    if phase == "final save":
        options += ["--slow-final", str(WINDOW), "--slow-final-marker", str(WINDOW)]
    return options


def _wait_for_the_moment(phase, rng, launch, out, trace, hold, reference):
    """Wait until a random moment inside `phase` (seeded); return (where it is, a check that the process is
    still inside that phase: true until the phase's next act has happened)."""
    if phase == "start-up":  # a random moment before the first micro-batch (held there if it comes sooner)
        delay = rng.uniform(0, reference["startup"])
        began = time.monotonic()
        launch.wait_for(
            lambda: time.monotonic() - began >= delay or Path(f"{hold}.held").exists(), "start-up"
        )
        held = " (held at the first micro-batch)" if Path(f"{hold}.held").exists() else ""
        return f"{time.monotonic() - began:.2f} s after launch{held}", lambda: trace_lines(trace) == 0
    if phase == "training":  # inside a random step, a random fraction of a micro-batch after it began
        step = rng.randrange(1, MAX_STEPS + 1)
        first = 2 * step - 1  # its first micro-batch's line in the trace
        launch.wait_for(lambda: trace_lines(trace) >= first, f"step {step}")
        delay = rng.uniform(0, reference["micro_batch"])
        time.sleep(delay)
        ck = out / f"checkpoint-{step}"
        return (
            f"step {step}, {1000 * delay:.0f} ms into it",
            lambda: trace_lines(trace) <= first + 1 and not ck.exists(),
        )
    if phase == "checkpoint save":  # after a random checkpoint's folder appeared, before its marker
        step = rng.randrange(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)
        ck = out / f"checkpoint-{step}"
        launch.wait_for(ck.is_dir, f"checkpoint-{step}")
        delay = rng.uniform(0, 0.8 * WINDOW)
        time.sleep(delay)
        return (
            f"checkpoint-{step}, {1000 * delay:.0f} ms after its folder appeared",
            lambda: not (ck / MARKER_NAME).exists(),
        )
    # the final save: while its files are written to the hidden folder, or while they are moved into place
    moving = rng.random() < 0.5
    started = (out / "model.safetensors").is_file if moving else (out / FINAL_TMP_NAME).is_dir
    launch.wait_for(started, "the final save")
    delay = rng.uniform(0, 0.8 * WINDOW)
    time.sleep(delay)
    what = "the moves into place" if moving else "its writing"
    return f"{1000 * delay:.0f} ms into {what}", lambda: not (out / FINAL_MARKER_NAME).exists()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(len(PHASES) * TRIALS))
def test_a_signal_at_a_random_moment_then_relaunch(setup, reference, tmp_path, trial):
    """SIGKILL or SIGTERM at a random moment (seeded) inside a chosen phase of a run, the phases taken in turn
    (start-up, a training step, a checkpoint save, the final save; SIGKILL and SIGTERM alternate so that
    every eight trials meet each pair); then a relaunch on changed data (refused by name when a checkpoint
    is there to resume), then the same command, which must end with the uninterrupted run's weights."""
    rng = random.Random(2000 + trial)
    phase = PHASES[trial % len(PHASES)]
    sig = (signal.SIGKILL, signal.SIGTERM)[(trial + trial // len(PHASES)) % 2]
    out, trace, hold = tmp_path / "out", tmp_path / "killed.trace", tmp_path / "hold"
    argv = flags(setup, out)
    with Launch(command(argv, driver=_driver_options(phase, trace, hold)), tmp_path / "killed.log") as launch:
        where, inside = _wait_for_the_moment(phase, rng, launch, out, trace, hold, reference)
        assert inside(), f"{phase}: {where}: the phase was over before the signal"
        launch.proc.send_signal(sig)
        hold.touch()  # a process that lives on through the signal may begin training
        rc = launch.wait()
        output = launch.output()
    if sig == signal.SIGKILL:
        assert inside(), f"{phase}: {where}: the phase was over when the kill landed"
    assert "Traceback" not in output, output[-3000:]
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL, output[-3000:]
    elif phase == "final save":
        assert rc == 0 and "SIGTERM arrived during the final save: the save was completed first" in output
    elif rc == 0:  # the last checkpoint's save: no step is left to stop after, the run ends as it would
        assert phase == "checkpoint save" and f"checkpoint-{MAX_STEPS}," in where, output[-3000:]
        assert "SIGTERM arrived after the last step: the run goes on to its final save" in output
        assert "saved the final model" in output
    elif rc == 143:
        assert re.search(
            r"stopped by SIGTERM after step \d+: .* is saved; run the same command to resume", output
        )
    else:  # the default action, before the handler is installed (start-up)
        assert phase == "start-up" and rc == -signal.SIGTERM, output[-3000:]
    outcome = f"{phase}, {sig.name} {where}: exit {rc}"

    changed = list(argv)
    changed[changed.index("--data_path") + 1] = str(_other_data(setup))
    if (
        any(checkpoint_problem(p) is None for p in checkpoints(out).values())
        and not (out / FINAL_MARKER_NAME).exists()
    ):
        rc2, output2 = run(command(changed), tmp_path / "changed.log")
        assert rc2 == 2, output2[-3000:]
        last = output2.strip().splitlines()[-1]
        assert last.startswith("chatsft train: error: cannot resume from ") and "(the data files)" in last, (
            last
        )
        outcome += ", changed data refused"
    rc3, output3 = run(command(argv), tmp_path / "relaunch.log")
    assert rc3 == 0, output3[-3000:]
    final = weights(out)
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"]), outcome
    assert logged(out) == reference["logged"]
    print(f"trial {trial}: {outcome}, relaunch exit 0, weights identical")


@pytest.mark.slow
def test_a_flipped_byte_in_any_checkpoint_file_is_caught_and_resume_falls_back(setup, reference, tmp_path):
    """One byte flipped at a random offset in every file of the newest checkpoints, in turn: each damaged
    checkpoint is skipped by name; the relaunch resumes from the newest intact one and ends identical."""
    rng = random.Random(3000)
    out = tmp_path / "out"
    shutil.copytree(setup.root / "reference", out)
    (out / FINAL_MARKER_NAME).unlink()  # as if killed before the final save
    flipped, outcomes = 0, {}
    for step in (10, 8):
        folder = out / f"checkpoint-{step}"
        files = sorted(p for p in folder.iterdir() if p.name != MARKER_NAME)
        for path in files:
            original = path.read_bytes()
            data = bytearray(original)
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            problem = checkpoint_problem(folder)
            # named by its hash, or sooner by a check that reads it (trainer_state.json, a weights header)
            assert problem is not None and problem.startswith(path.name), (path, at, problem)
            reason = problem.split(" ", 1)[1]
            outcomes[reason] = outcomes.get(reason, 0) + 1
            path.write_bytes(original)  # each file is tested alone
            flipped += 1
        # leave one damaged file in this checkpoint for the relaunch
        victim = rng.choice(files)
        data = bytearray(victim.read_bytes())
        data[rng.randrange(len(data))] ^= 0x80
        victim.write_bytes(bytes(data))
    assert flipped == 2 * len(files)
    print(f"{flipped} flips: {outcomes}")
    trace = tmp_path / "resume.trace"
    rc, output = run(command(flags(setup, out), driver=["--trace", str(trace)]), tmp_path / "resume.log")
    assert rc == 0, output[-3000:]
    assert "skipping incomplete checkpoint" in output and f"resuming from {out / 'checkpoint-6'}" in output
    assert_matches_reference(out, trace, reference, resumed_from=6)


@pytest.mark.slow
def test_a_flipped_byte_in_any_cache_entry_file_is_caught_and_encoded_again(setup, reference, tmp_path):
    """One bit flipped at a random offset in each file of the run's cache entry (the Arrow data, the rejected
    records, the manifest), many times over: the entry's verification names the file every time. Then the
    same command on a fresh output folder, with a flip left in the training data: one notice that the entry
    was damaged and encoded again, exit 0, and the weights of the uninterrupted run, not of altered data."""
    rng = random.Random(4000)
    root = tmp_path / "cache"
    shutil.copytree(setup.root / "cache", root)
    (entry,) = [p for p in root.iterdir() if p.is_dir()]
    files = sorted(p for p in entry.iterdir())
    assert [p.name for p in files] == ["manifest.json", "rejected.jsonl", "train.arrow"]
    assert cache.verify(entry)[1] is None
    flips, outcomes = 10 * TRIALS, {}
    for path in files:
        original = path.read_bytes()
        for _ in range(flips):
            data = bytearray(original)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            manifest, problem = cache.verify(entry)
            assert manifest is None and problem is not None, path
            if path.name == cache.MANIFEST:
                assert problem.startswith("its manifest "), problem
            else:
                assert problem == f"{path.name} does not match its manifest's checksum", problem
            outcomes[f"{path.name}: {problem}"] = outcomes.get(f"{path.name}: {problem}", 0) + 1
        path.write_bytes(original)
    print(f"{flips * len(files)} flips in the cache entry: {outcomes}")

    arrow = entry / "train.arrow"
    data = bytearray(arrow.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    arrow.write_bytes(bytes(data))
    argv = flags(setup, tmp_path / "out")
    argv[argv.index("--cache_dir") + 1] = str(root)
    rc, output = run(command(argv), tmp_path / "relaunch.log")
    assert rc == 0, output[-3000:]
    notice = f"the cache entry {entry} is damaged (train.arrow does not match its manifest's checksum): "
    assert output.count(notice + "encoding it again") == 1, output[-3000:]
    assert f"training examples encoded and cached: 32 ({entry})" in output
    final = weights(tmp_path / "out")
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"]), at
    assert cache.verify(entry)[1] is None  # mended
    rejects = (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in rejects] == ["bad0", "bad1"]
    print(f"relaunch with byte {at} of train.arrow flipped: exit 0, encoded again, weights identical")


@pytest.mark.slow
def test_a_relaunch_from_the_last_steps_checkpoint_trains_nothing_more(setup, reference, tmp_path):
    """Cut off in the final save (or stopped by SIGTERM in the last step), the run's newest checkpoint is at
    max_steps: the relaunch saves it as the final model and trains no step past max_steps (the Trainer's loop
    alone would train one more, on one more batch)."""
    out = tmp_path / "out"
    shutil.copytree(setup.root / "reference", out)
    (out / FINAL_MARKER_NAME).unlink()
    trace = tmp_path / "resume.trace"
    rc, output = run(command(flags(setup, out), driver=["--trace", str(trace)]), tmp_path / "resume.log")
    assert rc == 0, output[-3000:]
    assert f"resuming from {out / f'checkpoint-{MAX_STEPS}'}" in output
    assert f"training done: {MAX_STEPS} steps, none left to train in this launch (resumed at step 10)" in (
        output
    )
    assert read_trace(trace) == [] and sorted(checkpoints(out)) == list(range(2, MAX_STEPS + 1, 2))
    assert (out / FINAL_MARKER_NAME).is_file() and logged(out) == reference["logged"]
    final = weights(out)
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"])


@pytest.mark.slow
def test_two_launches_at_once_into_one_folder(setup, reference, tmp_path):
    """Started together: one trains to the end, the other stops with one line naming it; nothing mixed."""
    out = tmp_path / "out"
    go = tmp_path / "go"  # the launch holding the lock waits before its first step until this exists, so the
    # other cannot start after it has finished (a tiny run can end before a slow start-up reaches the lock)
    held = command(flags(setup, out), driver=["--hold", str(go)])
    with Launch(held, tmp_path / "a.log") as a, Launch(held, tmp_path / "b.log") as b:
        deadline = time.monotonic() + 300
        while a.proc.poll() is None and b.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        go.touch()
        codes = sorted([a.wait(), b.wait()])
        outputs = a.output() + b.output()
    assert codes == [0, 2], outputs[-3000:]
    assert re.search(
        r"chatsft train: error: --output_dir \S+ is in use by another run \(process \d+ on host", outputs
    )
    final = weights(out)
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"])


def test_the_stop_line_says_how_to_resume_a_run_started_with_overwrite(tmp_path):
    callback = PreemptionCallback()
    callback.signum, callback.stopped_at = signal.SIGTERM, 6
    assert callback.farewell(tmp_path, overwrite=True) == (
        f"stopped by SIGTERM after step 6: {tmp_path / 'checkpoint-6'} is saved; run the same command "
        "without --overwrite_output_dir to resume (exit code 143)"
    )
    assert "; run the same command to resume (exit code 143)" in callback.farewell(tmp_path)
