"""Which checkpoint to resume from: checkpoints are complete (marked), adopted by name, or ignored.

The HF Trainer writes `checkpoint-N` in place (no staging folder, no rename): model, then optimizer/scheduler/
scaler, then each rank's RNG state, then `trainer_state.json`, then it rotates old checkpoints, then it calls
the callbacks' `on_save`. A run killed on the way leaves a folder that looks like a checkpoint but is not one,
and FastChat resumes from it. `CheckpointMarker` writes the run manifest and then `chatsft-complete.json` at
`on_save`, after all of that and after every rank has finished; a checkpoint counts as complete only with that
marker, a matching `trainer_state.json` step, every listed file present at its recorded size and whole-file
SHA-256 (markers of format /1 carry the hash of the first 64 KiB only), and whole safetensors files. A
checkpoint another tool wrote (FastChat's) has no marker: one whose files look whole is resumed from when
named with --resume_from_checkpoint, and stops an automatic fresh start that would otherwise overwrite it.
The final save lives in `chatsft.training.final`. (Over 300 lines: marking, checking and choosing are one
protocol, kept in one place.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from chatsft.errors import ConfigError

MARKER_NAME = "chatsft-complete.json"
RUN_FILE = "chatsft-run.json"  # the run manifest (chatsft.training.manifest), inside each checkpoint
_MARKER_FORMAT = "chatsft-checkpoint/2"  # files with whole-file SHA-256
_MARKER_FORMATS = (_MARKER_FORMAT, "chatsft-checkpoint/1")  # /1: SHA-256 of the first 64 KiB only
_HEAD_BYTES = 1 << 16
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Top-level files of an earlier final model that must go when a new one lands (stale shards would be loaded).
WEIGHT_FILE_RE = re.compile(
    r"^(model.*\.safetensors|pytorch_model.*\.bin|.*\.index\.json|adapter_model\..*)$"
)


# ---- files, written so that a crash leaves either the old or the new version -------------------------------


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories cannot be fsynced on some systems
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _head_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of the whole file, streamed (right after a save the file is in the page cache: ~1-2 GB/s)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def list_files(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name not in skip
    )


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, from its header alone (no tensor data is read)."""
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is {size} bytes, shorter than a safetensors header"
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            return f"{path.name} is cut off inside its header"
        try:
            header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, AttributeError, KeyError, TypeError, IndexError):
            return f"{path.name} has an unreadable header"
    if 8 + header_len + end != size:
        return f"{path.name} is {size} bytes but its header describes {8 + header_len + end}"
    return None


def _trainer_state_problem(folder: Path, step: int | None, source: str) -> str | None:
    """Why `trainer_state.json` (written by the Trainer after everything else) does not vouch for `step`,
    which `source` gives (None: any step)."""
    try:
        state_step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    if step is not None and state_step != step:
        return f"trainer_state.json is at step {state_step}, {source} at step {step}"
    return None


def _weights_problem(folder: Path) -> str | None:
    """Why the weights in `folder` cannot be loaded: a cut-off safetensors file, a missing shard, or none at
    all."""
    for path in sorted(folder.rglob("*.safetensors")):
        if (problem := safetensors_problem(path)) is not None:
            return problem
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError):
            return f"{index.name} is unreadable"
        if missing := sorted(s for s in shards if not (index.parent / s).is_file()):
            return f"{index.name} names missing shard {missing[0]}"
    has_weights = (
        any(folder.glob("*.safetensors"))
        or any(folder.glob("pytorch_model*.bin"))
        or any(
            p.is_dir() for p in list(folder.glob("global_step*")) + list(folder.glob("pytorch_model_fsdp*"))
        )
    )
    return None if has_weights else "it holds no model weights"


# ---- resuming ----------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def write_marker(checkpoint_dir: str | os.PathLike, step: int) -> Path:
    """Declare `checkpoint_dir` complete at `step`: fsync every file in it, then write the marker atomically.

    The marker lists each file with its size and the SHA-256 of its whole content, so a file that is later cut
    off, removed, rewritten or damaged anywhere (a half-finished rotation, a re-save over a stale folder, a
    flipped byte in the optimizer state) voids the checkpoint. Stale temporary files of a killed marker write
    are removed, not listed.
    """
    folder = Path(checkpoint_dir)
    for stale in folder.glob(f".{MARKER_NAME}.tmp-*"):
        stale.unlink(missing_ok=True)
    files = {}
    for rel in list_files(folder, skip=(MARKER_NAME,)):
        path = folder / rel
        fsync_path(path)
        files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    marker = {"format": _MARKER_FORMAT, "step": int(step), "files": files}
    write_atomic(folder / MARKER_NAME, json.dumps(marker, indent=1).encode())
    return folder / MARKER_NAME


def checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """None when `checkpoint_dir` is a complete checkpoint, else why not (one phrase, for a notice)."""
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        return "it is not a folder"
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except FileNotFoundError:
        return f"it has no {MARKER_NAME} (the save was cut off, or chatsft did not write it)"
    except ValueError:
        return f"its {MARKER_NAME} is unreadable"
    if not isinstance(marker, dict) or marker.get("format") not in _MARKER_FORMATS:
        return f"its {MARKER_NAME} has an unknown format"
    step = marker.get("step")
    if (name_step := checkpoint_step(folder)) is not None and name_step != step:
        return f"its marker says step {step}, its name step {name_step}"
    if (problem := _trainer_state_problem(folder, step, "the marker")) is not None:
        return problem
    whole = marker["format"] == _MARKER_FORMAT
    try:
        files = {
            str(rel): (int(meta["size"]), str(meta["sha256" if whole else "head_sha256"]))
            for rel, meta in marker["files"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"its {MARKER_NAME} is unreadable"
    for rel, (size, digest) in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} is {path.stat().st_size} bytes, {size} when it was saved"
        if (file_sha256(path) if whole else _head_sha256(path)) != digest:
            return f"{rel} changed after it was saved (its SHA-256 differs)"
    return _weights_problem(folder)


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    return sorted(
        ((step, p) for p in output_dir.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None),
        reverse=True,
    )


def find_resume_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest complete `checkpoint-N` in `output_dir` (numeric order), and a notice per newer one skipped.

    Returns (None, notices) when there is none; starting fresh is then the caller's decision.
    """
    notices = []
    for _, path in _checkpoints(Path(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notices
        notices.append(f"skipping incomplete checkpoint {path}: {problem}")
    return None, notices


def unmarked_checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """For a checkpoint with no marker (FastChat's, or any HF Trainer's): None when its files look whole, else
    why not. Whole: `trainer_state.json` at the folder's step (the Trainer writes it after the weights,
    optimizer and RNG state), loadable weights, and every torch file (`.pt`, `.pth`, `.bin`) a whole zip
    archive (`torch.save`'s format; a cut-off one has no central directory at its end)."""
    folder = Path(checkpoint_dir)
    if (problem := _trainer_state_problem(folder, checkpoint_step(folder), "its name")) is not None:
        return problem
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".pt", ".pth", ".bin") and path.is_file() and not zipfile.is_zipfile(path):
            return f"{path.relative_to(folder).as_posix()} is not a whole torch file (cut off?)"
    return _weights_problem(folder)


def validate_checkpoint(path: str | os.PathLike) -> tuple[Path, list[str]]:
    """`path` if it is a complete checkpoint (or, with a notice, an unmarked one whose files look whole:
    asking for it by name adopts it), else a ConfigError saying why (for an explicit
    --resume_from_checkpoint)."""
    folder = Path(path)
    problem = checkpoint_problem(folder)
    if problem is None:
        return folder, []
    if _unmarked(folder):
        if (unmarked := unmarked_checkpoint_problem(folder)) is None:
            return folder, [
                f"resuming from {path}, which chatsft did not mark complete (another tool wrote it, "
                "or a save was cut off at its very end): its files look whole"
            ]
        problem = f"it has no {MARKER_NAME} and {unmarked}"
    raise ConfigError(
        f"cannot resume from {path}: {problem}. Choose a complete checkpoint, or leave "
        "--resume_from_checkpoint out to resume from the newest complete one."
    )


def _unmarked(folder: Path) -> bool:
    """A checkpoint folder chatsft never marked (another tool's, or a save cut off before its marker)."""
    return folder.is_dir() and not (folder / MARKER_NAME).exists()


def choose_resume(
    output_dir: str | os.PathLike,
    resume_from_checkpoint: str | bool | None = None,
    overwrite_output_dir: bool = False,
) -> tuple[str | None, list[str]]:
    """What to pass to `trainer.train(resume_from_checkpoint=...)`, and notices to print.

    An explicit path is validated (ConfigError if incomplete). Otherwise, like FastChat, the newest complete
    checkpoint in `output_dir` is resumed from, unless `overwrite_output_dir` asks for a fresh start or
    `resume_from_checkpoint` is False. When no checkpoint is complete but an unmarked one without chatsft's
    run manifest looks whole (a FastChat run's, continued with chatsft), this stops with a ConfigError rather
    than start over: a fresh start would rotate that progress away, or save over it.
    """
    auto = ("", "true", "last", "latest")
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() not in auto:
        path, notices = validate_checkpoint(resume_from_checkpoint)
        return str(path), notices
    if overwrite_output_dir or resume_from_checkpoint is False:
        return None, []
    path, notices = find_resume_checkpoint(output_dir)
    if path is None:
        for _, candidate in _checkpoints(Path(output_dir)):
            # one holding chatsft's run manifest is this tool's own save, cut off before its marker: skipped
            # (and written again) like any incomplete one, not mistaken for another tool's
            foreign = not (candidate / RUN_FILE).exists()
            if _unmarked(candidate) and foreign and unmarked_checkpoint_problem(candidate) is None:
                raise ConfigError(
                    f"{output_dir} holds {candidate.name}, which chatsft did not mark complete (FastChat or "
                    "another HF Trainer tool wrote it, or a chatsft save was cut off at its very end), and "
                    f"its files look whole. To continue from it: --resume_from_checkpoint {candidate}. To "
                    "start over (new checkpoints will replace it): --overwrite_output_dir."
                )
        if notices:
            notices.append("no complete checkpoint found: training starts from the beginning")
    return (str(path) if path else None), notices


def _step_folder(args, state) -> Path:
    """The folder the Trainer saves this step's checkpoint in."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it, and rotates old ones.

    Rotation lives here rather than in the Trainer because the Trainer deletes old checkpoints *before*
    `on_save`, i.e. before the new one is marked: with `save_total_limit=1` a crash in that window leaves
    nothing to resume from. So at `on_train_begin` this callback takes `args.save_total_limit` over (sets it
    to None) unless `save_total_limit` was given here. It keeps the newest `save_total_limit` complete
    checkpoints plus `state.best_model_checkpoint`; with a limit of 1 and a best checkpoint, both stay (the
    Trainer would delete the last one at the end of training).
    """

    def __init__(self, save_total_limit: int | None = None, manifest: dict | None = None):
        self.save_total_limit = save_total_limit
        self.manifest = manifest  # the run manifest, written into each checkpoint before its marker
        self._marked_step: int | None = None
        self._training = False  # an evaluation outside `train` saves nothing

    def on_train_begin(self, args, state, control, **kwargs):
        self._training = True
        if args.save_total_limit is not None:
            if self.save_total_limit is None:
                self.save_total_limit = args.save_total_limit
            args.save_total_limit = None

    def _clear_stale_marker(self, args, state, control):
        # A folder for this step left by an earlier run is about to be overwritten in place: void it first.
        # (With save_strategy "best" the decision comes after evaluation, so any folder for this step is
        # voided; `on_evaluate` writes the manifest of a best save.) A save that is certain gets the run
        # manifest before the Trainer writes anything: a save cut off at any point is then recognisably this
        # run's own, never taken for another tool's.
        if state.global_step == self._marked_step or not args.should_save:
            return
        if control.should_save or args.save_strategy == "best":
            folder = _step_folder(args, state)
            (folder / MARKER_NAME).unlink(missing_ok=True)
            if control.should_save and self.manifest is not None:
                folder.mkdir(parents=True, exist_ok=True)
                self._write_run_file(folder)

    def on_step_end(self, args, state, control, **kwargs):
        self._clear_stale_marker(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._clear_stale_marker(args, state, control)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # save_strategy "best": the Trainer saves after this evaluation if the metric improved, by the
        # comparison of transformers' `Trainer._determine_best_metric` (run after this callback, before the
        # save); that save gets the run manifest first too. A wrong guess leaves a folder holding only the
        # manifest, which resume skips and rotation removes.
        if self.manifest is None or args.save_strategy != "best" or not (self._training and args.should_save):
            return
        name = args.metric_for_best_model
        value = (metrics or {}).get(name if name.startswith("eval_") else f"eval_{name}")
        best = state.best_metric
        if best is None:
            best = -math.inf if args.greater_is_better else math.inf
        if value is not None and (value > best if args.greater_is_better else value < best):
            folder = _step_folder(args, state)
            folder.mkdir(parents=True, exist_ok=True)
            self._write_run_file(folder)

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        # Every rank writes its own RNG state (and under FSDP/DeepSpeed its shards) with no barrier after it.
        PartialState().wait_for_everyone()
        if args.should_save:
            folder = _step_folder(args, state)
            if folder.is_dir():
                self._write_run_file(folder)  # a "best" save that `on_evaluate` did not foresee has none
                write_marker(folder, state.global_step)
                self._marked_step = state.global_step
                self._rotate(Path(args.output_dir), state)
        PartialState().wait_for_everyone()

    def _write_run_file(self, folder: Path) -> None:
        if self.manifest is not None:
            write_atomic(folder / RUN_FILE, json.dumps(self.manifest, indent=1).encode())

    def _rotate(self, output_dir: Path, state) -> None:
        """Keep the newest `save_total_limit` complete checkpoints (and the best one); drop older folders."""
        if not self.save_total_limit or self.save_total_limit <= 0:
            return
        folders = sorted(
            (s, p) for p in output_dir.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None
        )
        complete = [(s, p) for s, p in folders if (p / MARKER_NAME).is_file()]
        keep = {p.resolve() for _, p in complete[-self.save_total_limit :]}
        if state.best_model_checkpoint:
            keep.add(Path(state.best_model_checkpoint).resolve())
        newest = complete[-1][0] if complete else None
        for step, path in folders:
            # Folders newer than the newest complete one may be a save in progress (or the next to be
            # overwritten).
            if path.resolve() not in keep and newest is not None and step < newest:
                # Marker first: a deletion cut short must not leave a folder that still claims to be complete.
                (path / MARKER_NAME).unlink(missing_ok=True)
                fsync_path(path)
                shutil.rmtree(path, ignore_errors=True)
