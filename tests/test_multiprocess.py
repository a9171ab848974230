"""Several processes under torchrun: the same training as one process, files written once, SIGTERM agreed.

On CPU the ranks are gloo DDP processes (`--use_cpu True`). Why 2 processes with per-device batch B and
accumulation A train exactly like 1 process with batch B and accumulation 2A:
- the sampler: accelerate replaces the Trainer's RandomSampler by a SeedableRandomSampler seeded with
  `--data_seed` (plus the epoch) in both cases, so both runs draw one permutation; with 2 processes
  `BatchSamplerShard` cuts it into batches of B and deals them out in turn (rank 0 batches 0, 2, 4, ...; rank
  1 batches 1, 3, 5, ...), so an optimizer step of A micro-batches per rank covers global batches 0..2A-1, the
  ones the single process accumulates over 2A micro-batches (32 examples, a global batch of 8: 4 steps an
  epoch, no remainder; 6 steps cross the epoch boundary);
- the loss: with `average_tokens_across_devices` (the default) the Trainer divides each rank's summed token
  loss by the trained tokens of all ranks and micro-batches and scales by the world size, which DDP's gradient
  average undoes: the gradient is sum(loss) / all trained tokens, as in one process; the logged loss is the
  mean over ranks of the same scaled sums, i.e. the same number. The model has no dropout here (each rank
  would draw its own masks). What differs is only the order of fp32 additions (per-rank partial sums, then the
  all-reduce): losses agree to ~1e-7 relative and weights to ~3e-7 absolute after 6 Adam steps at lr 1e-2, so
  the tolerances are 1e-6 relative for logged values and 1e-5 absolute for weights. Normalising per rank
  instead (`--average_tokens_across_devices False`) moves the weights by ~5e-2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections import defaultdict

import pytest
import torch
from chatsft_runs import (
    Launch,
    checkpoints,
    command,
    free_port,
    logged,
    make_setup,
    read_trace,
    run,
    train_flags,
    weights,
)

from chatsft.training.checkpoint import checkpoint_problem
from chatsft.training.final import FINAL_MARKER_NAME

MAX_STEPS, SAVE_STEPS, BATCH, ACCUMULATION = 6, 3, 2, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("multi"), dropout=0.0, bad_records=1)


def flags(setup, out, cache, accumulation, *extra, cpu=True):
    return train_flags(
        setup,
        out,
        cache=cache,
        cpu=cpu,
        max_steps=MAX_STEPS,
        batch=BATCH,
        accumulation=accumulation,
        save_steps=SAVE_STEPS,
        extra=extra,
    )


@pytest.fixture(scope="module")
def one_process(setup):
    out, trace = setup.root / "one", setup.root / "one.trace"
    argv = flags(setup, out, setup.root / "cache-one", 2 * ACCUMULATION)
    rc, output = run(command(argv, driver=["--trace", str(trace)]), setup.root / "one.log")
    assert rc == 0, output[-3000:]
    return out, output, read_trace(trace)


@pytest.fixture(scope="module")
def two_processes(setup):
    out = setup.root / "two"
    # without --use_cpu where no GPU is visible: torchrun on a CPU machine must still form one gloo run
    argv = flags(setup, out, setup.root / "cache-two", ACCUMULATION, cpu=torch.cuda.is_available())
    trace = setup.root / "two.{rank}.trace"
    rc, output = run(command(argv, driver=["--trace", str(trace)], nproc=2), setup.root / "two.log")
    assert rc == 0, output[-3000:]
    rows = read_trace(setup.root / "two.0.trace", setup.root / "two.1.trace")
    return out, output, rows


def batches_by_step(rows):
    steps = defaultdict(list)
    for row in rows:
        steps[row["step"]].append(row["batch"])
    return {step: sorted(batch) for step, batch in steps.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_train_like_one_with_twice_the_accumulation(one_process, two_processes):
    one, _, one_rows = one_process
    two, _, two_rows = two_processes
    # the same global batches in every optimizer step, half of them on each rank
    assert batches_by_step(two_rows) == batches_by_step(one_rows)
    assert len(batches_by_step(one_rows)) == MAX_STEPS
    for rank in (0, 1):
        assert sum(r["rank"] == rank for r in two_rows) == MAX_STEPS * ACCUMULATION

    one_log, two_log = logged(one), logged(two)
    assert [e["step"] for e in two_log] == list(range(1, MAX_STEPS + 1))
    for a, b in zip(one_log, two_log):
        assert (a["step"], a["epoch"], a["learning_rate"]) == (b["step"], b["epoch"], b["learning_rate"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6, abs=0)
    assert two_log[-1]["loss"] < two_log[0]["loss"]

    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_trains_like_torchrun(setup, two_processes):
    """The README's `accelerate launch --multi_gpu --num_processes 2 -m chatsft.train ...` (on a CPU machine
    `--multi_gpu` is what makes accelerate start the processes through torch.distributed.run; without it,
    `--num_processes 2` starts one): the same run as under torchrun."""
    out = setup.root / "accelerate"
    argv = flags(setup, out, setup.root / "cache-accelerate", ACCUMULATION, cpu=torch.cuda.is_available())
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "-m", "chatsft.train"]
    rc, output = run([*launch, *argv], setup.root / "accelerate.log")
    assert rc == 0, output[-3000:]
    if not torch.cuda.is_available():
        joined = "[chatsft] no GPU is visible: 2 CPU processes joined over gloo (as with --use_cpu True)"
        assert joined in output
    assert output.count("[chatsft] saved the final model") == 1
    for a, b in zip(logged(two_processes[0]), logged(out), strict=True):
        assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_write_everything_once(setup, one_process, two_processes):
    one, one_output, _ = one_process
    two, output, _ = two_processes

    # one final model, one set of checkpoints, one audit and one rejects file: the same files as one process
    def listing(folder):
        return sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith("rng_state")
        )

    assert listing(two) == listing(one)
    assert (two / FINAL_MARKER_NAME).is_file()
    assert sorted(checkpoints(two)) == [3, 6]
    for folder in checkpoints(two).values():
        assert checkpoint_problem(folder) is None
        assert sorted(p.name for p in folder.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    rejected = [json.loads(line) for line in (two / "rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == ["bad0"]
    audit = json.loads((two / "audit.json").read_text())
    assert audit == json.loads((one / "audit.json").read_text())

    # only rank 0 prints; the data were encoded once, by whichever rank took the cache folder's lock first,
    # and the other rank mapped what it wrote (rank 0 reports rank 1's line prefixed "rank 1: ")
    for notice in ("saved the final model", "training done: 6 steps", "read 33 records"):
        assert output.count(notice) == 1, notice
    if not torch.cuda.is_available():
        assert output.count("[chatsft] no GPU is visible: 2 CPU processes joined over gloo") == 1
    assert "find_unused_parameters" not in output  # DDP's warning, once per rank, when it is left on
    cache = setup.root / "cache-two"
    lines = output.splitlines()
    encoded = [x for x in lines if "encoded and cached" in x]
    loaded = [x for x in lines if "loaded from cache" in x]
    prefixes = {"[chatsft] ", "[chatsft] rank 1: "}
    assert len(encoded) == 1 and len(loaded) == 1
    assert {x[: x.index("training examples")] for x in (*encoded, *loaded)} == prefixes
    assert encoded[0].endswith(
        f"training examples encoded and cached: 32 ({cache}/" + encoded[0].rsplit("/", 1)[1]
    )
    assert "training examples loaded from cache: 32" in loaded[0]
    # one cache entry (a folder beside its lock and the fingerprint memo), no half-written tmp folder left
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    assert not [p.name for p in cache.iterdir() if ".tmp-" in p.name]
    assert "rank 1:" not in one_output


def _folder_state(out):
    """What a test must see of `out` before the next launch touches it: each checkpoint's problem (None when
    complete) and RNG files, and whether a final model is there."""
    return {
        "checkpoints": {
            step: (checkpoint_problem(folder), sorted(p.name for p in folder.glob("rng_state*")))
            for step, folder in checkpoints(out).items()
        },
        "final": (out / FINAL_MARKER_NAME).exists(),
    }


@pytest.fixture(scope="module")
def preempted_twice(setup):
    """One run pre-empted twice, as a busy cluster may do: launch 1 gets SIGTERM to rank 1 only after its
    first logged step; launch 2, the same command, resumes and gets SIGTERM to torchrun after its first
    logged step; launch 3, the same command again, resumes and runs to the end. Two interruptions each
    followed by its own resumption would take four launches; chained they take three, and each stop is still
    checked on its own (the folder is looked at before the next launch touches it) while the end must be
    bit-identical to the uninterrupted run. Returns {launch: (rc, output, folder state after it)}, the rank
    pids of launch 1, and the output folder."""
    out = setup.root / "sigterm"
    argv = flags(setup, out, setup.root / "cache-two", ACCUMULATION)
    launches = {}
    with Launch(command(argv, nproc=2), setup.root / "sigterm1.log") as launch:
        launch.wait_for(lambda: "'loss'" in launch.output(), "the first logged step")
        workers = launch.worker_pids()
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)
        rc = launch.wait()
        launches[1] = (rc, launch.output(), _folder_state(out))
    with Launch(command(argv, nproc=2), setup.root / "sigterm2.log") as launch:
        launch.wait_for(lambda: "'loss'" in launch.output(), "the first logged step after resuming")
        launch.proc.send_signal(signal.SIGTERM)
        rc = launch.wait()
        launches[2] = (rc, launch.output(), _folder_state(out))
    rc, output = run(command(argv, nproc=2), setup.root / "sigterm3.log")
    launches[3] = (rc, output, _folder_state(out))
    return launches, workers, out


def stopped_step(output: str) -> int:
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(stopped) == 1, output[-3000:]
    step = int(stopped[0].split("after step ")[1].split(":")[0])
    assert 1 <= step < MAX_STEPS
    return step


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes(preempted_twice, two_processes):
    """Only rank 1 gets SIGTERM (launch 1 of `preempted_twice`): the ranks agree at the end of the step, both
    save that step's checkpoint and exit 143; `torchrun -m chatsft.train` relaunched with the same flags
    resumes from it, and the run ends exactly like the uninterrupted one."""
    launches, workers, out = preempted_twice
    assert sorted(workers) == [0, 1]
    rc, output, _ = launches[1]
    assert rc != 0, output[-3000:]
    # Each rank exits 143 after the checkpoint; once the first has left, torchrun sends SIGTERM to the other,
    # which then may be past the save with the default handler back (-15): nothing is lost by then, since no
    # rank leaves `CheckpointMarker.on_save` before every rank has finished the checkpoint.
    codes = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", output))
    assert "143" in codes.values() and set(codes.values()) <= {"143", "-15"}, output[-3000:]
    step = stopped_step(output)
    # rank 1 got the signal, rank 0 learnt of it from the all-reduce at the same step's end
    agreed = sorted(line for line in output.splitlines() if "pre-emption: SIGTERM received" in line)
    assert agreed == [
        f"pre-emption: SIGTERM received by another process, saving checkpoint-{step} and stopping",
        f"pre-emption: SIGTERM received here, saving checkpoint-{step} and stopping",
    ], agreed
    assert_saved_and_resumes_like(two_processes[0], out, step, launches[1], launches[2], launches[3])


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_to_torchrun_reaches_every_rank_and_they_save(preempted_twice, two_processes):
    """What a scheduler does: SIGTERM to the launcher (launch 2 of `preempted_twice`, itself a resumed run).
    torchrun passes it to every worker and waits its --shutdown-timeout (30 s by default: the example scripts
    raise it) before SIGKILL; the ranks finish the step, save it and exit 143, and the relaunch ends like the
    uninterrupted run."""
    launches, _, out = preempted_twice
    rc, output, _ = launches[2]
    assert rc != 0, output[-3000:]
    step = stopped_step(output)
    assert step > stopped_step(launches[1][1])  # it trained on from launch 1's checkpoint before stopping
    received = [line for line in output.splitlines() if line.startswith("pre-emption: SIGTERM received here")]
    assert len(received) == 2, output[-3000:]  # both ranks got it from torchrun
    assert_saved_and_resumes_like(two_processes[0], out, step, launches[2], launches[3], launches[3])


def assert_saved_and_resumes_like(reference, out, step, stopped, resumed, last):
    """After the `stopped` launch, checkpoint-`step` is complete with both ranks' RNG states and there is no
    final model; the `resumed` launch (the same flags) resumes from it; after the `last` launch the run exited
    0 and is bit-identical to the uninterrupted `reference` run."""
    saved = out / f"checkpoint-{step}"
    problem, rng = stopped[2]["checkpoints"][step]
    assert problem is None
    assert rng == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not stopped[2]["final"]
    assert f"resuming from {saved}" in resumed[1]
    rc, output, _ = last
    assert rc == 0, output[-3000:]
    assert logged(out) == logged(reference)
    w, ref = weights(out), weights(reference)
    assert [k for k in ref if not torch.equal(w[k], ref[k])] == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 1, reason="FSDP through the HF Trainer needs a CUDA device; none is visible"
)
def test_fsdp_full_shard_on_gpu(setup, tmp_path):
    """`--fsdp full_shard auto_wrap` (FSDP2, sharded checkpoints) through the Trainer on 1-2 GPUs: trains like
    one plain GPU process with the same global batch, saves one full model, and resumes from a sharded
    checkpoint. GPU kernels and reduce-scatter order are not bit-reproducible: tolerances 1e-4."""
    nproc = min(2, torch.cuda.device_count())
    config = tmp_path / "fsdp.json"
    config.write_text(
        json.dumps(
            {
                "version": 2,
                "reshard_after_forward": True,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "state_dict_type": "SHARDED_STATE_DICT",
            }
        )
    )
    gpu = ("--tf32", "False")
    fsdp = ("--fsdp", "full_shard auto_wrap", "--fsdp_config", str(config))

    plain = tmp_path / "plain"
    rc, output = run(
        command(
            train_flags(
                setup,
                plain,
                cache=tmp_path / "cache",
                max_steps=MAX_STEPS,
                batch=BATCH,
                accumulation=4,
                save_steps=SAVE_STEPS,
                cpu=False,
                extra=gpu,
            )
        ),
        tmp_path / "plain.log",
    )
    assert rc == 0, output[-3000:]

    out = tmp_path / "fsdp"
    argv = train_flags(
        setup,
        out,
        cache=tmp_path / "cache",
        max_steps=MAX_STEPS,
        batch=BATCH,
        accumulation=4 // nproc,
        save_steps=SAVE_STEPS,
        cpu=False,
        extra=gpu + fsdp,
    )
    rc, output = run(command(argv, nproc=nproc, launcher=True), tmp_path / "fsdp.log")
    assert rc == 0, output[-3000:]
    assert "FSDP: each LlamaDecoderLayer is one shard unit" in output
    assert output.count("saved the final model") == 1
    assert sorted(checkpoints(out)) == [3, 6]
    for folder in checkpoints(out).values():
        assert checkpoint_problem(folder) is None
        assert any(p.is_dir() for p in folder.glob("pytorch_model_fsdp*"))  # sharded, one file set per rank
    for a, b in zip(logged(plain), logged(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    w_plain, w_fsdp = weights(plain), weights(out)
    assert w_plain.keys() == w_fsdp.keys()  # the full model, gathered from the shards
    for name in w_plain:
        torch.testing.assert_close(w_fsdp[name], w_plain[name], rtol=0, atol=1e-4, msg=name)

    # resume from the sharded checkpoint-3 (checkpoint-6 voided): the same final weights
    (checkpoints(out)[6] / "chatsft-complete.json").unlink()
    rc, output = run(command(argv, nproc=nproc, launcher=True), tmp_path / "fsdp-resume.log")
    assert rc == 0, output[-3000:]
    assert f"resuming from {checkpoints(out)[3]}" in output
    resumed = weights(out)
    for name in w_fsdp:
        torch.testing.assert_close(resumed[name], w_fsdp[name], rtol=0, atol=1e-4, msg=name)
