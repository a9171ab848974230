"""One run per output folder: `output_dir/.chatsft-lock` is locked (flock) by the process training into it.

Two runs in one folder resume from each other's checkpoints and overwrite each other's saves. The writing
process holds an exclusive `flock` on the lock file for its whole life and writes its host and pid into it,
so a second launch stops with one line naming the holder. The kernel drops the lock when its process dies
however it dies (SIGKILL, the out-of-memory killer), so a lock left by a dead run is simply taken over by
the next launch (with a notice naming it), and no pid check can race with a reused pid. Only the writing
rank (global rank 0) takes it: the other ranks of a launch are its own. On file systems without working
locks (some network mounts) the lock is skipped with a notice.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from chatsft.errors import ConfigError

LOCK_NAME = ".chatsft-lock"
_held: dict[Path, int] = {}  # lock path -> the open descriptor that holds it (kept open until exit)


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096) or b"{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def acquire_run_lock(output_dir: str | os.PathLike, *, writer: bool = True) -> list[str]:
    """Lock `output_dir` for this process (again: no-op); return notices. ConfigError: another run has it."""
    path = Path(output_dir).resolve() / LOCK_NAME
    if not writer or path in _held:
        return []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _holder(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            raise ConfigError(
                f"--output_dir {output_dir} is in use by another run ({who}); wait for it to end or choose "
                "another --output_dir"
            ) from None
        return [f"run lock skipped: {path.parent} does not support file locks ({err.strerror or err})"]
    previous = _holder(fd)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError:  # a full disk: the lock holds without its label (the label only names the holder)
        pass
    _held[path] = fd
    atexit.register(release_run_lock, path.parent)  # a clean exit leaves an empty file: no "took over" notice
    notices = _remove_stale_temporaries(path.parent)
    if previous and previous != me:
        notices.insert(
            0,
            f"took over the lock of a run that is gone (process {previous.get('pid')} on "
            f"{previous.get('host')})",
        )
    return notices


def _remove_stale_temporaries(out: Path) -> list[str]:
    """Half-written `.NAME.tmp-PID` files of a run killed mid-write (`write_atomic`): with the lock held, no
    live chatsft process writes here, so they are all dead writers'."""
    stale = [p for p in out.glob(".*.tmp-*") if p.is_file() and p.name.rsplit("-", 1)[-1].isdigit()]
    for p in stale:
        p.unlink(missing_ok=True)
    return (
        [f"removed {len(stale)} half-written file(s) of a killed run: {', '.join(p.name for p in stale)}"]
        if stale
        else []
    )


def release_run_lock(output_dir: str | os.PathLike) -> None:
    """Release this process's lock on `output_dir` (exiting does it too). The file stays: removing it would
    let a third launch lock a new file while a second one waits on the old."""
    fd = _held.pop(Path(output_dir).resolve() / LOCK_NAME, None)
    if fd is not None:
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
