"""Re-running and resuming as a user does: a finished run is recognised, a changed one is refused by name, and
--overwrite_output_dir leaves nothing of the earlier run to resume from (chatsft.training.manifest).

Each case is the command line (`chatsft.commands.train.cli`, in this process), its exit code, the line it
prints and the files it leaves. One 4-step run (checkpoints at 2 and 4) is trained once and copied per
case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from chatsft_runs import make_setup, train_flags

from chatsft.commands.train import cli
from chatsft.training.checkpoint import RUN_FILE, checkpoint_problem
from chatsft.training.final import FINAL_MARKER_NAME
from chatsft.training.manifest import changes

pytestmark = pytest.mark.slow


def flags(setup, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return train_flags(
        setup, out, cache=setup.root / "cache", max_steps=steps, accumulation=1, save_steps=2, extra=extra
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("manifest"), dropout=0.0, n=16)


@pytest.fixture(scope="module")
def finished(setup):
    out = setup.root / "finished"
    assert cli(flags(setup, out)) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines)
    return lines[-1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_every_checkpoint_and_the_final_model_carry_the_run_manifest(finished):
    final = json.loads((finished / RUN_FILE).read_text())
    assert final["arguments"]["learning_rate"] == 0.01 and final["loss mode"] == "assistant_turns"
    assert final["template"].startswith("vicuna_v1.1 ")
    for step in (2, 4):
        ck = finished / f"checkpoint-{step}"
        assert json.loads((ck / RUN_FILE).read_text()) == final
        assert (
            RUN_FILE in json.loads((ck / "chatsft-complete.json").read_text())["files"]
        )  # hashed with the rest
    assert RUN_FILE in json.loads((finished / FINAL_MARKER_NAME).read_text())["files"]


def test_rerunning_a_finished_run_says_so_and_exits_0(setup, run_copy, capsys):
    before = _snapshot(run_copy)
    assert cli(flags(setup, run_copy)) == 0
    assert (
        f"{run_copy} already holds the final model of this same run: nothing to train"
        in capsys.readouterr().out
    )
    after = _snapshot(run_copy)
    after.pop(".chatsft-lock"), before.pop(".chatsft-lock", None)
    assert after == before  # no step trained, nothing rewritten


def test_rerunning_a_finished_run_with_other_settings_names_the_change(setup, run_copy, capsys):
    before = _snapshot(run_copy)
    assert cli(flags(setup, run_copy, "--learning_rate", "2e-2")) == 2
    assert _error(capsys) == (
        f"chatsft train: error: {run_copy} already holds a finished run made differently (learning_rate "
        "0.01 -> 0.02): choose another --output_dir, or pass --overwrite_output_dir to train again into it"
    )
    after = _snapshot(run_copy)
    after.pop(".chatsft-lock"), before.pop(".chatsft-lock", None)
    assert after == before


def test_resuming_with_changed_data_is_refused_then_allowed_by_name(setup, run_copy, tmp_path, capsys):
    (run_copy / FINAL_MARKER_NAME).unlink()  # as if killed after checkpoint-4, before the final save
    other = tmp_path / "data.json"
    records = json.loads(setup.data.read_text())
    records[0]["conversations"][1]["value"] = "Lyon."
    other.write_text(json.dumps(records))
    argv = flags(setup, run_copy, steps=6)
    argv[argv.index("--data_path") + 1] = str(other)
    assert cli(argv) == 2
    ck4 = run_copy / "checkpoint-4"
    assert _error(capsys) == (
        f"chatsft train: error: cannot resume from {ck4}: it was trained differently (the data files; "
        "max_steps 4 -> 6). Restore those settings, pass --resume_anyway True to continue with the new ones, "
        "or --overwrite_output_dir to start over"
    )
    assert cli([*argv, "--resume_anyway", "True"]) == 0
    printed = capsys.readouterr().out
    assert f"--resume_anyway: resuming from {ck4} although the data files; max_steps 4 -> 6" in printed
    assert json.loads((run_copy / "trainer_state.json").read_text())["global_step"] == 6


def test_overwrite_removes_the_earlier_run_and_the_flagless_relaunch_resumes_this_one(
    setup, run_copy, capsys
):
    argv = flags(setup, run_copy, "--overwrite_output_dir", "True", "--save_steps", "1", steps=1)
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert (
        f"--overwrite_output_dir: removed the earlier run's checkpoint-2, checkpoint-4, the final model from "
        f"{run_copy}" in printed
    )
    assert sorted(p.name for p in run_copy.glob("checkpoint-*")) == ["checkpoint-1"]
    assert checkpoint_problem(run_copy / "checkpoint-1") is None
    assert json.loads((run_copy / "trainer_state.json").read_text())["global_step"] == 1
    # the same command without the flag: this run (1 step) is finished, the old one (4 steps) is gone
    assert (
        cli(argv[: argv.index("--overwrite_output_dir")] + argv[argv.index("--overwrite_output_dir") + 2 :])
        == 0
    )
    assert "already holds the final model of this same run" in capsys.readouterr().out


def test_changes_names_each_difference():
    old = {
        "format": "f",
        "data files": ["a"],
        "model": "m",
        "loss mode": "assistant_turns",
        "arguments": {"x": 1},
    }
    new = {**old, "model": "n", "loss mode": "last_response", "arguments": {"x": 2, "y": True}}
    assert changes(old, new) == [
        "loss mode assistant_turns -> last_response",
        "the model",
        "x 1 -> 2",
        "y None -> True",
    ]
    assert changes(old, {**old, "data cache key": "k"}) == [
        "the encoded data (its cache key: another chatsft version or model_max_length)"
    ]
