"""One run per --output_dir (chatsft.training.lock): a second launch is refused by name, a dead run's lock and
half-written files are taken over, and the lock is gone when the holder exits however it exits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from chatsft.errors import ConfigError
from chatsft.training.lock import LOCK_NAME, acquire_run_lock, release_run_lock

HOLD = "import sys, time; from chatsft.training.lock import acquire_run_lock as a; a(sys.argv[1]); {end}"


def _holder(folder, end: str):
    return subprocess.Popen(
        [sys.executable, "-c", HOLD.format(end=end), str(folder)], env=os.environ, stdout=subprocess.PIPE
    )


def _wait_locked(folder, proc):
    lock = folder / LOCK_NAME
    for _ in range(2000):
        if lock.is_file() and lock.read_text().strip():
            return json.loads(lock.read_text())
        assert proc.poll() is None, "the holder exited before locking"
        time.sleep(0.01)
    raise AssertionError("no lock")


def test_a_second_run_in_the_same_folder_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path, "print('locked', flush=True); time.sleep(60)")
    try:
        assert proc.stdout.readline() == b"locked\n"
        with pytest.raises(ConfigError) as err:
            acquire_run_lock(tmp_path)
        assert str(err.value) == (
            f"--output_dir {tmp_path} is in use by another run (process {proc.pid} on host "
            f"{socket.gethostname()}); wait for it to end or choose another --output_dir"
        )
    finally:
        proc.kill()
        proc.wait()
    # the holder was SIGKILLed: the kernel dropped its lock, and the next run takes it over with a notice
    assert acquire_run_lock(tmp_path) == [
        f"took over the lock of a run that is gone (process {proc.pid} on {socket.gethostname()})"
    ]
    assert acquire_run_lock(tmp_path) == []  # again in the same process: already held
    release_run_lock(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == ""


def test_a_clean_exit_leaves_no_holder_and_stale_temporaries_are_removed(tmp_path):
    proc = _holder(tmp_path, "pass")
    assert proc.wait() == 0
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released at exit
    # a kill in the marker-write window of write_atomic leaves `.NAME.tmp-PID`
    (tmp_path / ".chatsft-final.json.tmp-123").write_text("{")
    (tmp_path / ".keep.tmp-notapid").write_text("mine")
    assert acquire_run_lock(tmp_path) == [
        "removed 1 half-written file(s) of a killed run: .chatsft-final.json.tmp-123"
    ]
    assert (
        not (tmp_path / ".chatsft-final.json.tmp-123").exists() and (tmp_path / ".keep.tmp-notapid").exists()
    )
    release_run_lock(tmp_path)


def test_other_ranks_take_no_lock(tmp_path):
    assert acquire_run_lock(tmp_path, writer=False) == []
    assert not (tmp_path / LOCK_NAME).exists()
