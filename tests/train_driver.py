"""`python -m chatsft.train` with test instruments, for the fault and multi-process tests (not product code).

    python tests/train_driver.py [--trace FILE] [--kill-at WHERE@STEP] [--slow-marker SECONDS]
        [--dump-data FILE] [--slow-final SECONDS] [--slow-final-marker SECONDS] [--hold FILE] -- <train flags>

--trace FILE: for every trained micro-batch append one JSON line: the optimizer step it belongs to, the rank,
  a hash of its input_ids and a hash of the RNG states (torch CPU, Python, NumPy) as the forward starts, and
  the time (`t`, seconds since the epoch) it started.
  `{rank}` in FILE is replaced by the rank, so that each process under torchrun has its own file.
--kill-at WHERE@STEP: SIGKILL this process inside the save of checkpoint-STEP: `optimizer` = the model
  weights are written, the optimizer state is not; `rng` = model and optimizer written, RNG state not;
  `marker` = every file written, the completion marker not. A real SIGKILL, as an outside kill at that
  moment would be.
--slow-marker SECONDS: sleep before each completion marker is written (a wide window for an outside kill).
--dump-data FILE: write this rank's dataset ids and the ids of its first epoch's batches (`{rank}` as above).
--slow-final SECONDS: sleep inside the final save, after the files are written to its hidden folder and before
  they are checked and moved into place (a wide window for a signal during the final save).
--slow-final-marker SECONDS: sleep inside the final save after its files are moved into `output_dir` and
  before its marker `chatsft-final.json` is written (a window for a signal amid the moves).
--hold FILE: before the first trained micro-batch, create FILE.held and wait until FILE exists (a signal sent
  "during start-up" then lands there even on a machine faster than expected; nothing has trained yet).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time


def _rng_hash() -> str:
    import numpy as np
    import torch

    h = hashlib.sha1(torch.random.get_rng_state().numpy().tobytes())
    h.update(repr(random.getstate()).encode())
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    h.update(keys.tobytes() + repr((kind, pos, has_gauss, cached)).encode())
    return h.hexdigest()[:16]


def _install_trace(path: str) -> None:
    from chatsft.training.trainer import ChatTrainer

    rank = int(os.environ.get("RANK", "0"))
    fd = os.open(path.replace("{rank}", str(rank)), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    original = ChatTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            ids = inputs["input_ids"].detach().cpu().contiguous().numpy().tobytes()
            row = {
                "step": self.state.global_step + 1,
                "rank": rank,
                "batch": hashlib.sha1(ids).hexdigest()[:16],
                "rng": _rng_hash(),
                "t": time.time(),
            }
            os.write(fd, (json.dumps(row) + "\n").encode())  # unbuffered: survives a SIGKILL
        return original(self, model, inputs, *args, **kwargs)

    ChatTrainer.compute_loss = compute_loss


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(where: str, step: int) -> None:
    import transformers

    import chatsft.training.checkpoint as checkpoint

    if where in ("optimizer", "rng"):
        name = {"optimizer": "_save_optimizer_and_scheduler", "rng": "_save_rng_state"}[where]
        original = getattr(transformers.Trainer, name)

        def patched(self, *args, **kwargs):
            if self.state.global_step == step:
                _die()
            return original(self, *args, **kwargs)

        setattr(transformers.Trainer, name, patched)
    elif where == "marker":
        original_marker = checkpoint.write_marker

        def write_marker(folder, at_step):
            if at_step == step:
                _die()
            return original_marker(folder, at_step)

        checkpoint.write_marker = write_marker
    else:
        raise SystemExit(f"--kill-at: unknown point {where!r}")


def _install_slow_marker(seconds: float) -> None:
    import chatsft.training.checkpoint as checkpoint

    original = checkpoint.write_marker

    def write_marker(folder, at_step):
        time.sleep(seconds)
        return original(folder, at_step)

    checkpoint.write_marker = write_marker


def _install_dump_data(path: str) -> None:
    """Write, when the training DataLoader is made, this rank's dataset ids in order and the ids of the
    batches its sampler gives it in the first epoch (iterating a seeded sampler does not change training)."""
    from chatsft.training.trainer import ChatTrainer

    rank = int(os.environ.get("RANK", "0"))
    original = ChatTrainer.get_train_dataloader

    def get_train_dataloader(self):
        loader = original(self)
        ids = list(self.train_dataset["id"])
        batches = [[ids[i] for i in batch] for batch in loader.batch_sampler]
        with open(path.replace("{rank}", str(rank)), "w") as f:
            json.dump({"rank": rank, "ids": ids, "batches": batches}, f)
        return loader

    ChatTrainer.get_train_dataloader = get_train_dataloader


def _install_slow_final(seconds: float) -> None:
    import chatsft.training.final as final

    original = final._verify_folder

    def verify(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    final._verify_folder = verify


def _install_slow_final_marker(seconds: float) -> None:
    import chatsft.training.final as final

    original = final.write_atomic  # only the final marker is written with it there

    def write_atomic(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    final.write_atomic = write_atomic


def _install_hold(path: str) -> None:
    from chatsft.training.trainer import ChatTrainer

    original = ChatTrainer.compute_loss
    held = []

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and not held:
            held.append(True)
            open(path + ".held", "w").close()
            while not os.path.exists(path):
                time.sleep(0.01)
        return original(self, model, inputs, *args, **kwargs)

    ChatTrainer.compute_loss = compute_loss


def main(argv: list[str]) -> int:
    split = argv.index("--")
    ours, flags = argv[:split], argv[split + 1 :]
    options = dict(zip(ours[::2], ours[1::2]))
    if "--trace" in options:
        _install_trace(options["--trace"])
    if "--kill-at" in options:
        where, step = options["--kill-at"].split("@")
        _install_kill(where, int(step))
    if "--dump-data" in options:
        _install_dump_data(options["--dump-data"])
    if "--slow-marker" in options:
        _install_slow_marker(float(options["--slow-marker"]))
    if "--slow-final" in options:
        _install_slow_final(float(options["--slow-final"]))
    if "--slow-final-marker" in options:
        _install_slow_final_marker(float(options["--slow-final-marker"]))
    if "--hold" in options:  # after --trace: it wraps the traced step, so a held run has traced nothing
        _install_hold(options["--hold"])
    from chatsft.commands.train import cli

    return cli(flags)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
