"""A full disk while saving is one line: where the space ran out, what is kept, and that the run can resume.

The writers fail each in their own words: `OSError` ENOSPC (json, os.replace), safetensors'
`SafetensorError` ("No space left on device" inside its IoError), torch's zip writer ("file write failed",
"unexpected pos", the errno lost: taken for a full disk only when the disk is nearly full).
`disk_full_is_one_line` turns any of them, raised while training (checkpoints) or during the final save,
into a `ChatsftError` naming the disk, the file or save being written, the newest complete checkpoint (or
that the previous final model is unchanged), and the command to run once space is freed. A cut-off
checkpoint has no completion marker, so the relaunch skips it by itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from chatsft.errors import ChatsftError

_FULL_WORDS = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")
# torch.save's zip writer drops the errno: "file write failed", "unexpected pos 576 vs 534", "iostream error"
_TORCH_WRITE = ("file write failed", "unexpected pos", "iostream error")
_NEARLY_FULL = 64 << 20  # torch's message is only taken for a full disk when less than this is free


class DiskFullError(ChatsftError):
    exit_code = 1


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException, output_dir: str | os.PathLike) -> bool:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if any(word in text for word in _FULL_WORDS):
            return True
        if any(words in text for words in _TORCH_WRITE):
            with contextlib.suppress(OSError):
                return shutil.disk_usage(output_dir).free < _NEARLY_FULL
    return False


def _being_written(exc: BaseException, out: Path) -> str:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
    from chatsft.training.checkpoint import MARKER_NAME, checkpoint_step

    if (out / ".chatsft-final-tmp").exists():
        return "the final model"
    unmarked = [p for p in out.glob("checkpoint-*") if checkpoint_step(p) and not (p / MARKER_NAME).exists()]
    if unmarked:
        return str(max(unmarked, key=lambda p: checkpoint_step(p)))
    return "a checkpoint"


def disk_full_line(exc: BaseException, output_dir: str | os.PathLike, rerun: str) -> str:
    from chatsft.training.checkpoint import find_resume_checkpoint
    from chatsft.training.preflight import human_bytes

    out = Path(output_dir)
    what = _being_written(exc, out)
    try:
        free = human_bytes(shutil.disk_usage(out).free)
    except OSError:
        free = "?"
    newest, _ = find_resume_checkpoint(out)
    kept = f"the newest complete checkpoint is {newest.name}" if newest else "no checkpoint is complete yet"
    if what == "the final model":
        kept += "; an earlier final model in it is unchanged"
    return (
        f"no space left on the disk of --output_dir {out} ({free} free) while writing {what}: {kept}. Free "
        f"space (or lower --save_total_limit), then {rerun} to resume"
    )


@contextlib.contextmanager
def disk_full_is_one_line(output_dir: str | os.PathLike, *, rerun: str = "run the same command"):
    """Turn a full disk inside the block into a `DiskFullError` (exit 1) with one line; other errors pass."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, output_dir):
            raise
        raise DiskFullError(disk_full_line(exc, output_dir, rerun)) from None
