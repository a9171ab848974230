"""Pre-emption: on SIGTERM, finish the optimizer step, write a complete checkpoint, stop, exit 143.

Schedulers (SLURM, Kubernetes, spot instances, torchrun passing its own SIGTERM on) announce the end of a job
with SIGTERM and kill it a grace period later. The default SIGTERM action kills the process mid-step and loses
everything since the last checkpoint. `PreemptionCallback` installs a handler when training begins (only the
main thread can) that merely records the signal; at the end of each optimizer step the ranks agree whether any
of them was signalled (a one-element all-reduce, MAX), and if so every rank asks the Trainer for a checkpoint
and a stop at that same step. Agreement matters: a rank that stopped one step before the others would leave
them waiting in the next collective, and the checkpoint would mix two steps. The save is the Trainer's
ordinary checkpoint, so `CheckpointMarker` marks it complete and relaunching the same command resumes from it;
`chatsft.train` then skips the final save and exits with 128 + the signal number, so the scheduler sees an
interrupted job.

A SIGTERM during the final save (`finishing_save`) is held until the save is done: the save takes seconds to
minutes, less than a checkpoint (no optimizer state) and well inside a scheduler's grace period, and with
`--save_strategy no` it is the only copy of the training. The run then ends as finished (exit 0) with a line
saying the signal came and the save was completed first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

from chatsft.training.checkpoint import CheckpointMarker

logger = logging.getLogger("chatsft")

EXIT_BASE = 128  # shell convention: a process ended by signal N exits with 128 + N (143 for SIGTERM)


class PreemptionCallback(TrainerCallback):
    """Checkpoint and stop at the end of the optimizer step during which `signals` (default SIGTERM) arrived.

    Put it before `CheckpointMarker` among the callbacks, so that the marker sees the save request at the same
    `on_step_end`. After `trainer.train()` returns, `stopped_at` is the step that was saved (None when
    training ran to its end) and `exit_code` the code to exit with. Call `restore()` when training is over
    (also after an exception), which puts the previous handlers back.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received: int | None = None  # the signal this process got, if any (set in the handler)
        self.signum: int | None = None  # the signal the ranks agreed to stop for
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int | None:
        return EXIT_BASE + self.signum if self.signum is not None else None

    def _handle(self, signum, frame) -> None:
        # Only a flag: the step finishes and the save runs in the training loop, not inside the handler.
        self.received = signum

    def install(self) -> bool:
        """Install the handlers; False (and nothing installed) outside the main thread."""
        if self._previous:
            return True
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "pre-emption: training runs outside the main thread, so SIGTERM cannot be caught; "
                "a SIGTERM will end it without a checkpoint"
            )
            return False
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def farewell(self, output_dir, overwrite: bool = False) -> str:
        """The line to print when training stopped for a signal."""
        saved = Path(output_dir) / f"checkpoint-{self.stopped_at}"
        return (
            f"stopped by {signal.Signals(self.signum).name} after step {self.stopped_at}: {saved} is saved; "
            f"{rerun_hint(overwrite)} to resume (exit code {self.exit_code})"
        )

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.signum = self.stopped_at = None
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agree(self.received or 0, getattr(args, "device", None))
        if signum:
            self.signum, self.stopped_at = signum, state.global_step
            control.should_save = True
            control.should_training_stop = True
            logger.warning(
                "pre-emption: %s received %s, saving checkpoint-%d and stopping",
                signal.Signals(signum).name,
                "here" if self.received else "by another process",
                state.global_step,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.received and self.stopped_at is None:  # it came after the last step ended (in its checkpoint)
            logger.warning(
                "pre-emption: %s arrived after the last step: the run goes on to its final save",
                signal.Signals(self.received).name,
            )
        self.restore()

    @staticmethod
    def _agree(signum: int, device) -> int:
        """The largest signal number any rank received this step (0: none); every rank must call this."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return signum
        flag = torch.tensor([signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


@contextlib.contextmanager
def preemptible(trainer):
    """`with preemptible(trainer) as p: trainer.train()`: SIGTERM checkpoints and stops at a step boundary
    (`p.stopped_at`, `p.exit_code`); the previous handlers are back afterwards, also after an exception. The
    trainer must already hold a `CheckpointMarker`, which this callback is put before (both act on the same
    `on_step_end`)."""
    callback = PreemptionCallback()
    callbacks = trainer.callback_handler.callbacks
    marker = next((i for i, c in enumerate(callbacks) if isinstance(c, CheckpointMarker)), len(callbacks))
    callbacks.insert(marker, callback)
    try:
        yield callback
    finally:
        callback.restore()


def rerun_hint(overwrite: bool) -> str:
    """How to resume: the same command, less --overwrite_output_dir (with it, the relaunch would start
    over)."""
    return "run the same command without --overwrite_output_dir" if overwrite else "run the same command"


@contextlib.contextmanager
def finishing_save(say, signals: tuple[int, ...] = (signal.SIGTERM,)):
    """Hold `signals` until the block (the final save) is done, then say that one came; the run ends normally.
    Outside the main thread nothing can be installed and the default action stays."""
    got: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda signum, frame: got.append(signum)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if got:
            say(f"{signal.Signals(got[0]).name} arrived during the final save: the save was completed first")
