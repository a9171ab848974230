"""A full disk is one line (chatsft.training.space): each real writer of a save fails on a full tmpfs, and the
final save on a full disk leaves the earlier final model as it was and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from chatsft.training.space import DiskFullError, disk_full_is_one_line, is_disk_full


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs, filled to the last byte (root only: mount(2))."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk):
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def _writers(disk):
    import torch
    from safetensors.torch import save_file

    big = torch.zeros(1 << 16)
    return {
        "safetensors": lambda: save_file({"w": big}, str(disk / "model.safetensors")),
        "torch.save": lambda: torch.save({"w": big}, disk / "optimizer.pt"),
        "json": lambda: (disk / "trainer_state.json").write_text(json.dumps({"x": "y" * 300_000})),
    }


def test_every_writer_of_a_save_is_recognised_on_a_full_disk(full_disk):
    _fill(full_disk)
    seen = {}
    for name, write in _writers(full_disk).items():
        with pytest.raises(Exception) as err:
            write()
        seen[name] = is_disk_full(err.value, full_disk)
    assert seen == {"safetensors": True, "torch.save": True, "json": True}
    assert not is_disk_full(RuntimeError("file write failed"), "/")  # torch's words alone, with space free


def test_the_final_save_on_a_full_disk_is_one_line_and_keeps_the_earlier_model(full_disk):
    out = full_disk / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / ".chatsft-final-tmp").mkdir()  # the final save under way, as save_final leaves it while writing
    _fill(full_disk)
    with pytest.raises(DiskFullError) as err:
        with disk_full_is_one_line(out, rerun="run the same command without --overwrite_output_dir"):
            _writers(out / ".chatsft-final-tmp")["safetensors"]()
    free = shutil.disk_usage(out).free
    assert str(err.value) == (
        f"no space left on the disk of --output_dir {out} ({free} B free) while writing the final model: no "
        "checkpoint is complete yet; an earlier final model in it is unchanged. Free space (or lower "
        "--save_total_limit), then run the same command without --overwrite_output_dir to resume"
    )
    assert err.value.exit_code == 1


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(KeyError):
        with disk_full_is_one_line(tmp_path):
            raise KeyError("not a disk problem")
