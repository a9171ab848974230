"""What a run is made of, written beside each checkpoint and the final model, and checked before going on.

A run manifest (`chatsft-run.json`) records what decides the training trajectory: the contents of the data
files and the data cache key, the template, the loss mode, fingerprints of the base model and the
tokenizer, and the arguments that change the weights (learning rate and schedule, batch shape, seeds,
steps, precision, LoRA, packing). `CheckpointMarker` writes it into every checkpoint before the completion
marker (so the marker's hashes cover it), and the final save puts it beside the weights. Before training,
`resolve_run` decides:
- a final model made by this same configuration is there: nothing to do (the command says so and exits 0);
  one made by another configuration: stop, naming what changed (`--overwrite_output_dir` trains again);
- the checkpoint to resume from was made by another configuration: stop, naming what changed and how to
  override (`--resume_anyway True` continues with the new settings, `--overwrite_output_dir` starts over);
- `--overwrite_output_dir`: the earlier run's checkpoints and final model files are removed first, so that
  a later relaunch without the flag cannot resume from them.
The model fingerprint covers config.json, each weight file's size, its safetensors header and its first MiB
of tensor data (reading every weight at each launch would cost a minute for a 7B model); the data is hashed
whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from chatsft.errors import ConfigError
from chatsft.training.checkpoint import MARKER_NAME, RUN_FILE, checkpoint_step, choose_resume, fsync_path

FORMAT = "chatsft-run/1"
_SAMPLE = 1 << 20
# TrainingArguments fields that change the weights a run ends with (logging, saving and paths do not).
TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "optim",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "seed",
    "data_seed",
    "max_steps",
    "num_train_epochs",
    "bf16",
    "fp16",
    "model_max_length",
    "group_by_length",
    "label_smoothing_factor",
)
MODEL_FIELDS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_bias",
    "add_special_tokens",
)
DATA_FIELDS = ("train_ratio", "packing", "padding_free", "pad_to_multiple_of", "lazy_preprocess")
_FINAL_MARKER = "chatsft-final.json"  # chatsft.training.final.FINAL_MARKER_NAME (final imports this module)


def model_fingerprint(model_path: str | os.PathLike) -> str:
    """config.json, each weight file's size, safetensors header and first MiB of data; a hub id as given."""
    folder = Path(os.path.expanduser(os.fspath(model_path)))
    if not folder.is_dir():
        return f"name:{model_path}"
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
            with open(path, "rb") as f:
                if path.suffix == ".safetensors":
                    head = f.read(8)
                    length = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                    h.update(head + f.read(min(length, path.stat().st_size)))
                h.update(f.read(_SAMPLE))
    return h.hexdigest()[:32]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def run_manifest(model_args, data_args, args, encoder, plan) -> dict:
    """The manifest of the run these arguments and this data plan describe (every rank computes the same)."""
    from chatsft.cache import tokenizer_fingerprint

    arguments = {name: getattr(args, name, None) for name in TRAINING_FIELDS}
    arguments |= {name: getattr(model_args, name) for name in MODEL_FIELDS}
    arguments |= {name: getattr(data_args, name) for name in DATA_FIELDS}
    return _plain(
        {
            "format": FORMAT,
            "data files": [p[:32] for group in plan.fingerprints for p in group],
            "data cache key": plan.key,
            "template": f"{encoder.template.name} {_sha(repr(encoder.template))}",
            "loss mode": encoder.loss_mode,
            "model": model_fingerprint(model_args.model_name_or_path),
            "tokenizer": tokenizer_fingerprint(encoder.tokenizer)[:32],
            "arguments": arguments,
        }
    )


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two manifests, one phrase each (`learning_rate 0.01 -> 0.02`, `the model`)."""
    out = []
    for key in sorted((set(old) | set(new)) - {"format", "arguments", "data cache key"}):
        if old.get(key) != new.get(key):
            out.append(f"loss mode {old.get(key)} -> {new.get(key)}" if key == "loss mode" else f"the {key}")
    if not out and old.get("data cache key") != new.get("data cache key"):
        out.append("the encoded data (its cache key: another chatsft version or model_max_length)")
    a, b = old.get("arguments") or {}, new.get("arguments") or {}
    out += [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def clear_earlier_run(output_dir: Path) -> list[str]:
    """`--overwrite_output_dir`: remove the earlier run's checkpoints and final model (markers first)."""
    removed = []
    if not output_dir.is_dir():
        return []
    for path in sorted(p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None):
        # the marker first: a removal cut short leaves nothing that claims completeness
        (path / MARKER_NAME).unlink(missing_ok=True)
        fsync_path(path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    marker = output_dir / _FINAL_MARKER
    try:
        final_files = list(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        final_files = None
    if final_files is not None:
        marker.unlink()
        fsync_path(output_dir)
        for rel in final_files:
            if ".." not in Path(rel).parts:
                (output_dir / rel).unlink(missing_ok=True)
        removed.append("the final model")
    if not removed:
        return []
    return [f"--overwrite_output_dir: removed the earlier run's {', '.join(removed)} from {output_dir}"]


def attach_manifest(trainer, manifest: dict) -> None:
    """Have the trainer's `CheckpointMarker` write `manifest` into every checkpoint."""
    from chatsft.training.checkpoint import CheckpointMarker

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, CheckpointMarker):
            callback.manifest = manifest


def resolve_run(
    output_dir: str | os.PathLike,
    manifest: dict,
    *,
    args=None,
    resume_from_checkpoint: str | bool | None = None,
    overwrite: bool = False,
    resume_anyway: bool = False,
    writer: bool = True,
) -> tuple[str | None, list[str], bool]:
    """(checkpoint to resume from or None, notices, finished): `finished` means a final model of this very
    configuration is already in `output_dir` and nothing is left to do. ConfigError for a mismatch. `args`
    (the TrainingArguments) gives the three choices at once."""
    if args is not None:
        resume_from_checkpoint = args.resume_from_checkpoint
        overwrite, resume_anyway = args.overwrite_output_dir, args.resume_anyway
    out = Path(output_dir)
    if overwrite:
        return None, (clear_earlier_run(out) if writer else []), False
    explicit = isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() not in (
        "",
        "true",
        "last",
        "latest",
    )
    if (out / _FINAL_MARKER).is_file() and not explicit:
        final = read_manifest(out)
        if final == manifest:
            return None, [f"{out} already holds the final model of this same run: nothing to train"], True
        what = (
            "; ".join(changes(final, manifest))
            if final
            else "no record of its configuration (chatsft-run.json)"
        )
        raise ConfigError(
            f"{out} already holds a finished run made differently ({what}): choose another --output_dir, or "
            "pass --overwrite_output_dir to train again into it"
        )
    resume, notices = choose_resume(out, resume_from_checkpoint, False)
    if resume is None:
        return None, notices, False
    saved = read_manifest(Path(resume))
    if saved is None:
        return (
            resume,
            [*notices, f"{resume} has no {RUN_FILE}: resuming without checking its configuration"],
            False,
        )
    if saved != manifest:
        what = "; ".join(changes(saved, manifest))
        if not resume_anyway:
            raise ConfigError(
                f"cannot resume from {resume}: it was trained differently ({what}). Restore those "
                "settings, pass --resume_anyway True to continue with the new ones, or "
                "--overwrite_output_dir to start over"
            )
        notices.append(f"--resume_anyway: resuming from {resume} although {what}")
    return resume, notices, False
