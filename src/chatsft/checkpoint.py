"""Which checkpoint to resume from, and the final save that is checked before it replaces anything.

The HF Trainer writes `checkpoint-N` in place (no staging folder, no rename): model, then optimizer/scheduler/
scaler, then each rank's RNG state, then `trainer_state.json`, then it rotates old checkpoints, then it calls the
callbacks' `on_save`. A run killed on the way leaves a folder that looks like a checkpoint but is not one, and
FastChat resumes from it. `CheckpointMarker` writes `chatsft-complete.json` at `on_save`, after all of that and
after every rank has finished; a checkpoint counts as complete only with that marker, a matching
`trainer_state.json` step, every listed file present at its recorded size and head hash, and whole safetensors
files. The final model is written to a hidden sibling folder, reloaded and compared with the in-memory model,
and only then moved file by file into `output_dir`, under its own marker `chatsft-final.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

from transformers import TrainerCallback

from chatsft.errors import ChatsftError, ConfigError

MARKER_NAME = "chatsft-complete.json"
FINAL_MARKER_NAME = "chatsft-final.json"
FINAL_TMP_NAME = ".chatsft-final-tmp"
MERGED_SUBDIR = "merged"
_MARKER_FORMAT = "chatsft-checkpoint/1"
_HEAD_BYTES = 1 << 16
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Top-level files of an earlier final model that must go when a new one lands (stale shards would be loaded).
_WEIGHT_FILE_RE = re.compile(
    r"^(model.*\.safetensors|pytorch_model.*\.bin|.*\.index\.json|adapter_model\..*)$"
)


# ---- files, written so that a crash leaves either the old or the new version -------------------------------


def _fsync_path(path: Path) -> None:
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _head_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()


def _list_files(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name not in skip
    )


def _safetensors_problem(path: Path) -> str | None:
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


def _weights_problem(folder: Path) -> str | None:
    """Why the weights in `folder` cannot be loaded: a cut-off safetensors file, a missing shard, or none at all."""
    for path in sorted(folder.rglob("*.safetensors")):
        if (problem := _safetensors_problem(path)) is not None:
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

    The marker lists each file with its size and the SHA-256 of its first 64 KiB, so a file that is later cut
    off, removed or rewritten (a half-finished rotation, a re-save over a stale folder) voids the checkpoint.
    """
    folder = Path(checkpoint_dir)
    files = {}
    for rel in _list_files(folder, skip=(MARKER_NAME,)):
        path = folder / rel
        _fsync_path(path)
        files[rel] = {"size": path.stat().st_size, "head_sha256": _head_sha256(path)}
    marker = {"format": _MARKER_FORMAT, "step": int(step), "files": files}
    _write_atomic(folder / MARKER_NAME, json.dumps(marker, indent=1).encode())
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
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return f"its {MARKER_NAME} has an unknown format"
    step = marker.get("step")
    if (name_step := checkpoint_step(folder)) is not None and name_step != step:
        return f"its marker says step {step}, its name step {name_step}"
    try:
        state_step = json.loads((folder / "trainer_state.json").read_text())["global_step"]
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable"
    if state_step != step:
        return f"trainer_state.json is at step {state_step}, the marker at step {step}"
    try:
        files = {
            str(rel): (int(meta["size"]), str(meta["head_sha256"])) for rel, meta in marker["files"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        return f"its {MARKER_NAME} is unreadable"
    for rel, (size, head) in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} is {path.stat().st_size} bytes, {size} when it was saved"
        if _head_sha256(path) != head:
            return f"{rel} changed after it was saved"
    return _weights_problem(folder)


def find_resume_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest complete `checkpoint-N` in `output_dir` (numeric order), and a notice per newer one skipped.

    Returns (None, notices) when there is none; starting fresh is then the caller's decision.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None, []
    candidates = sorted(
        ((step, p) for p in folder.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None),
        reverse=True,
    )
    notices = []
    for _, path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, notices
        notices.append(f"skipping incomplete checkpoint {path}: {problem}")
    return None, notices


def validate_checkpoint(path: str | os.PathLike) -> Path:
    """`path` if it is a complete checkpoint, else a ConfigError saying why (for an explicit --resume_from_checkpoint)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(
            f"cannot resume from {path}: {problem}. Choose a complete checkpoint, or leave --resume_from_checkpoint "
            "out to resume from the newest complete one."
        )
    return Path(path)


def choose_resume(
    output_dir: str | os.PathLike,
    resume_from_checkpoint: str | bool | None = None,
    overwrite_output_dir: bool = False,
) -> tuple[str | None, list[str]]:
    """What to pass to `trainer.train(resume_from_checkpoint=...)`, and notices to print.

    An explicit path is validated (ConfigError if incomplete). Otherwise, like FastChat, the newest complete
    checkpoint in `output_dir` is resumed from, unless `overwrite_output_dir` asks for a fresh start or
    `resume_from_checkpoint` is False.
    """
    auto = ("", "true", "last", "latest")
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() not in auto:
        return str(validate_checkpoint(resume_from_checkpoint)), []
    if overwrite_output_dir or resume_from_checkpoint is False:
        return None, []
    path, notices = find_resume_checkpoint(output_dir)
    if path is None and notices:
        notices.append("no complete checkpoint found: training starts from the beginning")
    return (str(path) if path else None), notices


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once the Trainer has written all of it, and rotates old ones.

    Rotation lives here rather than in the Trainer because the Trainer deletes old checkpoints *before*
    `on_save`, i.e. before the new one is marked: with `save_total_limit=1` a crash in that window leaves nothing
    to resume from. So at `on_train_begin` this callback takes `args.save_total_limit` over (sets it to None)
    unless `save_total_limit` was given here. It keeps the newest `save_total_limit` complete checkpoints plus
    `state.best_model_checkpoint`; with a limit of 1 and a best checkpoint, both stay (the Trainer would delete
    the last one at the end of training).
    """

    def __init__(self, save_total_limit: int | None = None):
        self.save_total_limit = save_total_limit
        self._marked_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if args.save_total_limit is not None:
            if self.save_total_limit is None:
                self.save_total_limit = args.save_total_limit
            args.save_total_limit = None

    def _clear_stale_marker(self, args, state, control):
        # A folder for this step left by an earlier run is about to be overwritten in place: void it first.
        # (With save_strategy "best" the decision comes after evaluation, so any folder for this step is voided.)
        if state.global_step == self._marked_step or not args.should_save:
            return
        if control.should_save or args.save_strategy == "best":
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / MARKER_NAME).unlink(missing_ok=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._clear_stale_marker(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._clear_stale_marker(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        # Every rank writes its own RNG state (and under FSDP/DeepSpeed its shards) with no barrier after it.
        PartialState().wait_for_everyone()
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_marker(folder, state.global_step)
                self._marked_step = state.global_step
                self._rotate(Path(args.output_dir), state)
        PartialState().wait_for_everyone()

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
            # Folders newer than the newest complete one may be a save in progress (or the next to be overwritten).
            if path.resolve() not in keep and newest is not None and step < newest:
                # Marker first: a deletion cut short must not leave a folder that still claims to be complete.
                (path / MARKER_NAME).unlink(missing_ok=True)
                _fsync_path(path)
                shutil.rmtree(path, ignore_errors=True)


# ---- the final save ----------------------------------------------------------------------------------------


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _finish_model_folder(
    folder: Path, model, tokenizer, chat_template: str, stop_token_ids: Sequence[int]
) -> None:
    """Tokenizer with the training chat template, generation config that stops at end of turn, use_cache on."""
    import copy

    from transformers import GenerationConfig

    old_template = tokenizer.chat_template
    tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = old_template

    base = getattr(model, "get_base_model", lambda: model)()
    gen = copy.deepcopy(
        getattr(base, "generation_config", None) or GenerationConfig.from_model_config(base.config)
    )
    eos = []
    for i in [*_as_id_list(gen.eos_token_id), *_as_id_list(tokenizer.eos_token_id), *stop_token_ids]:
        if i not in eos:
            eos.append(int(i))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(folder)

    config_path = folder / "config.json"
    if config_path.is_file():  # an adapter folder has no config.json
        config = json.loads(config_path.read_text())
        config["use_cache"] = True  # training turns it off for gradient checkpointing; inference wants it
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["use_cache"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _compare_state_dicts(saved: Mapping, expected: Mapping, where: Path) -> None:
    import torch

    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise RuntimeError(
            f"final model in {where}: tensors missing on reload {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in expected.items():
        got = saved[name].detach().cpu()
        want = tensor.detach().cpu()
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            raise RuntimeError(
                f"final model in {where}: tensor {name} differs from the trained model after reload"
            )


def _verify_folder(
    folder: Path,
    expected_state: Mapping | None,
    is_adapter: bool,
    chat_template: str,
    stop_token_ids: Sequence[int],
    check_text,
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if expected_state is not None:
        if is_adapter:
            from safetensors.torch import load_file

            _compare_state_dicts(load_file(folder / "adapter_model.safetensors"), expected_state, folder)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="cpu")
            _compare_state_dicts(reloaded.state_dict(), expected_state, folder)
            if reloaded.config.use_cache is not True:
                raise RuntimeError(f"final model in {folder}: config.use_cache is not True")
            del reloaded
    eos = _as_id_list(GenerationConfig.from_pretrained(folder).eos_token_id)
    if not set(stop_token_ids) <= set(eos):
        raise RuntimeError(
            f"final model in {folder}: generation_config eos_token_id {eos} lacks {list(stop_token_ids)}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template != chat_template:
        raise RuntimeError(f"final model in {folder}: the saved tokenizer lost the chat template")
    if check_text is not None:
        messages, text = check_text
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        if rendered != text:
            at = next(
                (i for i, (a, b) in enumerate(zip(rendered, text)) if a != b), min(len(rendered), len(text))
            )
            raise ConfigError(
                f"the chat template saved with the model renders a sample differently from training, from character "
                f"{at}: {rendered[at : at + 40]!r} instead of {text[at : at + 40]!r}"
            )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Replace the final model in `out` by the files in `tmp`, one os.replace each, under a final marker."""
    marker = out / FINAL_MARKER_NAME
    try:
        old_files = set(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        old_files = set()
    new_files = _list_files(tmp)
    marker.unlink(missing_ok=True)  # from here until the new marker lands, the folder says it is incomplete
    _fsync_path(out)
    for rel in new_files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
    stale = old_files | {p.name for p in out.iterdir() if p.is_file() and _WEIGHT_FILE_RE.match(p.name)}
    for rel in sorted(stale - set(new_files)):
        (out / rel).unlink(missing_ok=True)
    files = {rel: {"size": (out / rel).stat().st_size} for rel in new_files}
    _write_atomic(marker, json.dumps({"format": "chatsft-final/1", "files": files}, indent=1).encode())
    shutil.rmtree(tmp, ignore_errors=True)


def _all_ranks_ok(ok: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, ok)
    return all(flags)


def _save_full_model(trainer, folder: Path) -> None:
    """`trainer.save_model`, which gathers FSDP and ZeRO-3 weights, with FSDP switched to a full state dict."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        trainer.save_model(str(folder))
        return
    from torch.distributed.fsdp import StateDictType

    # FSDP2 defaults to SHARDED_STATE_DICT, under which save_model writes no weights at all.
    old, plugin.state_dict_type = plugin.state_dict_type, StateDictType.FULL_STATE_DICT
    try:
        trainer.save_model(str(folder))
    finally:
        plugin.state_dict_type = old


def _reference_state_dict(trainer) -> Mapping:
    """The trained weights to compare the saved ones with: gathered (a collective) when they are sharded."""
    accelerator = trainer.accelerator
    zero3 = (
        trainer.is_deepspeed_enabled and accelerator.deepspeed_config["zero_optimization"].get("stage") == 3
    )
    if trainer.is_fsdp_enabled or zero3:
        try:
            return accelerator.get_state_dict(trainer.deepspeed if zero3 else trainer.model)
        except ValueError as exc:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
            raise ConfigError(f"cannot gather the final weights: {exc}") from exc
    return accelerator.unwrap_model(trainer.model).state_dict() if trainer.args.should_save else {}


def save_final(
    trainer,
    tokenizer,
    output_dir: str | os.PathLike | None = None,
    *,
    chat_template: str,
    stop_token_ids: Sequence[int],
    extra_files: Mapping[str, bytes | str] | None = None,
    check_text: tuple[list[dict], str] | None = None,
    merge: bool = False,
) -> Path:
    """Save the trained model into `output_dir` (default `trainer.args.output_dir`), checked, and return that path.

    Call on every rank (the weights are gathered collectively). The writer rank (`args.should_save`) builds the
    model in `output_dir/.chatsft-final-tmp` with `trainer.save_model` (which gathers FSDP full state dicts and
    DeepSpeed ZeRO-3 16-bit weights), adds the tokenizer with `chat_template`, a generation config whose
    eos_token_id includes `stop_token_ids`, `use_cache=True`, `trainer_state.json` and `extra_files`
    (name -> content); reloads it with AutoModelForCausalLM/AutoTokenizer, checks every tensor equals the trained
    one exactly and that `apply_chat_template(check_text[0], tokenize=False) == check_text[1]`; then moves the
    files into `output_dir` one `os.replace` at a time, deletes the previous final model's leftover weight files,
    and writes `chatsft-final.json`. Any failure leaves `output_dir` as it was and raises on every rank.

    A peft model is saved as its adapter; with `merge=True` a merged full model also goes to `output_dir/merged`.
    """
    out = Path(output_dir if output_dir is not None else trainer.args.output_dir)
    tmp = out / FINAL_TMP_NAME
    accelerator = trainer.accelerator
    writer = trainer.args.should_save
    model = accelerator.unwrap_model(trainer.model)
    is_adapter = hasattr(model, "peft_config")
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if merge and is_adapter and sharded:
        raise ConfigError(
            "--merge cannot run under FSDP/DeepSpeed: merge the saved adapter in a separate step"
        )
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    error: BaseException | None = None
    try:
        _save_full_model(trainer, tmp)
        state = _reference_state_dict(trainer)
        if writer:
            if is_adapter:
                from peft import get_peft_model_state_dict

                state = get_peft_model_state_dict(model, state_dict=state)
            _finish_model_folder(tmp, model, tokenizer, chat_template, stop_token_ids)
            trainer.state.save_to_json(str(tmp / "trainer_state.json"))
            for name, content in (extra_files or {}).items():
                if Path(name).name != name or name.startswith("."):
                    raise ValueError(f"extra file name {name!r} must be a plain file name")
                (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
            _verify_folder(tmp, state, is_adapter, chat_template, stop_token_ids, check_text)
            del state
            if merge and is_adapter:
                import copy

                merged = copy.deepcopy(model).merge_and_unload()  # the trained model keeps its adapter
                merged.save_pretrained(tmp / MERGED_SUBDIR)
                _finish_model_folder(tmp / MERGED_SUBDIR, merged, tokenizer, chat_template, stop_token_ids)
                _verify_folder(
                    tmp / MERGED_SUBDIR, merged.state_dict(), False, chat_template, stop_token_ids, check_text
                )
                del merged
    except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
        error = exc
    if not _all_ranks_ok(error is None):
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise ChatsftError(
            "the final save failed on another process (see its message); the output folder is unchanged"
        )
    if writer:
        _move_into_place(tmp, out)
    accelerator.wait_for_everyone()
    return out
