"""Checks that run before the model is loaded, so a run that cannot finish fails in seconds, not hours in.

Each failure is one line (`ConfigError` or `DataError`): the output folder cannot be written, the disk cannot
hold two checkpoints, a data file is missing or unreadable, or a control token of the template is not one
token of the tokenizer and will not be added. The checkpoint size comes from the safetensors headers of the
model folder (exact parameter count and stored dtype, no tensor data read), else from config.json fields (an
estimate). Record-level validation is `chatsft.records`' job; this module only opens the files. (Over 300
lines: one short check per thing that can be wrong before the model loads, each with its own message.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from chatsft.errors import ConfigError, DataError

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
ADAM_BYTES_PER_PARAM = 8  # two fp32 moments per parameter
# bytes per element of the training dtype (chatsft.training.model: None means fp32 master weights)
DTYPE_BYTES = {None: 4, "fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
_SAFETENSORS_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ---- output folder -----------------------------------------------------------------------------------------


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` if needed and prove it writable by writing and deleting a probe file."""
    path = Path(os.path.expanduser(os.fspath(output_dir)))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"--output_dir {path}: exists and is not a folder") from None
    except OSError as err:
        raise ConfigError(f"--output_dir {path}: cannot create it: {err.strerror or err}") from None
    # host and pid in the name: ranks on several nodes may probe one shared folder at once
    probe = path / f".chatsft-write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"chatsft")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--output_dir {path}: not writable: {err.strerror or err}") from None
    return path


# ---- disk space --------------------------------------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        return [folder / s for s in shards]
    return sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))


def _read_safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > path.stat().st_size - 8:
            raise ValueError("header longer than the file")
        return json.loads(f.read(length))


def count_parameters(model_path: str | os.PathLike) -> tuple[int, int | None, str]:
    """(parameters, bytes as stored or None, how they were found) for a local model folder; no weights loaded.

    Exact from the safetensors headers (tensor shapes and dtypes); else estimated from config.json
    (vocabulary, hidden size, layers, MLP width). Raises ValueError when neither is possible.
    """
    folder = Path(os.path.expanduser(os.fspath(model_path)))
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a local folder")
    files = _safetensors_files(folder)
    if files and all(f.is_file() for f in files):
        params = stored = 0
        try:
            for f in files:
                for name, info in _read_safetensors_header(f).items():
                    if name == "__metadata__":
                        continue
                    numel = 1
                    for dim in info["shape"]:
                        numel *= int(dim)
                    params += numel
                    stored += numel * _SAFETENSORS_BYTES.get(info["dtype"], 4)
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            pass  # an unreadable header: fall back to config.json (loading will report the file)
        else:
            return params, stored, "from the safetensors headers"
    return _estimate_from_config(folder), None, "estimated from config.json"


def _first(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _estimate_from_config(folder: Path) -> int:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"no safetensors weights and no readable config.json in {folder}: {err}") from None
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    vocab = _first(config, "vocab_size")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    if not (vocab and hidden and layers):
        raise ValueError(f"config.json in {folder} lacks vocab_size, hidden_size or num_hidden_layers")
    inter = _first(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    heads = _first(config, "num_attention_heads", "n_head", default=1)
    head_dim = _first(config, "head_dim", default=hidden // heads)
    kv_heads = _first(config, "num_key_value_heads", default=heads)
    tied = bool(config.get("tie_word_embeddings", False))
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    mlp = 3 * hidden * inter  # gated MLP (gate, up, down): an upper bound for a plain 2-matrix MLP
    norms = 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * (attention + mlp + norms) + hidden


def checkpoint_bytes(
    params: int, *, dtype: str | None = None, stored_bytes: int | None = None, save_only_model: bool = False
) -> int:
    """Bytes of one Trainer checkpoint: weights in the training dtype, plus fp32 Adam states if saved.

    `dtype` as chatsft takes it (None = fp32, bf16, fp16, fp32, auto); "auto" keeps the stored dtype, so
    `stored_bytes` (from the safetensors headers) is used, else 2 bytes per parameter. Adam states are counted
    as fp32 (8 bytes per parameter): exact for fp32 master weights, an upper bound for a model kept in bf16.
    """
    if dtype == "auto":
        weights = stored_bytes if stored_bytes is not None else 2 * params
    elif dtype in DTYPE_BYTES:
        weights = DTYPE_BYTES[dtype] * params
    else:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of bf16, fp16, fp32, auto")
    return weights + (0 if save_only_model else ADAM_BYTES_PER_PARAM * params)


def check_disk_space(output_dir: str | os.PathLike, need: int, *, what: str) -> int:
    """Raise `ConfigError` unless the disk of `output_dir` has `need` bytes free; return the free bytes."""
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise ConfigError(
            f"--output_dir {output_dir}: {human_bytes(free)} free on its disk, about {human_bytes(need)} "
            f"needed for {what}; free space, choose another --output_dir, or save less (--save_only_model, "
            "--save_total_limit)"
        )
    return free


# ---- data files --------------------------------------------------------------------------------------------


def check_data_files(paths: Iterable[str | os.PathLike], *, flag: str = "--data_path") -> None:
    """Each path is an existing, readable, non-empty .json/.jsonl/.parquet file, a folder of such shards or
    saved by `datasets`, or a Hub dataset name (tried when the data is read; records come later)."""
    from chatsft.sources import FileError, is_hub_name, shards

    for raw in paths:
        path = Path(os.fspath(raw))
        if is_hub_name(os.fspath(raw)):
            continue
        if not path.exists():
            raise DataError(f"{flag} {path}: no such file")
        if path.is_dir():
            try:
                shards(str(path))
            except FileError as e:
                raise DataError(f"{flag} {path}: {e.detail}") from None
            continue
        if not path.is_file():  # a FIFO or a device: reading a byte would block, or never end
            raise DataError(
                f"{flag} {path}: not a regular file (a pipe or a device); give a .json, .jsonl or .parquet "
                "file"
            )
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError(
                f"{flag} {path}: expected .json, .jsonl or .parquet, got {path.suffix or 'no extension'!r}"
            )
        try:
            with open(path, "rb") as f:
                first = f.read(1)
        except OSError as err:
            raise DataError(f"{flag} {path}: cannot be read: {err.strerror or err}") from None
        if not first:
            raise DataError(f"{flag} {path}: the file is empty")


# ---- model weights ----------------------------------------------------------------------------------------


def check_model_weights(model_path: str | os.PathLike) -> None:
    """A local model folder's safetensors files are whole (headers read, no tensor data): a truncated or empty
    download fails here, before the data is encoded, instead of inside `from_pretrained` minutes later."""
    from chatsft.training.checkpoint import safetensors_problem

    folder = Path(os.path.expanduser(os.fspath(model_path)))
    if not folder.is_dir():
        return
    for path in _safetensors_files(folder):
        if not path.is_file():
            raise ConfigError(f"--model_name_or_path {folder}: {path.name} is missing (named in its index)")
        if (problem := safetensors_problem(path)) is not None:
            raise ConfigError(f"--model_name_or_path {folder}: {problem}; download or save the model again")


# ---- template and tokenizer --------------------------------------------------------------------------------


def _resolve_marker(marker: str, tokenizer) -> str | None:
    """`{bos}`/`{eos}` (a template's placeholders) -> the tokenizer's token; other markers as they are."""
    if marker in ("{bos}", "{eos}"):
        return getattr(tokenizer, f"{marker[1:-1]}_token", None) if tokenizer is not None else None
    return marker


def check_template_tokens(
    markers: Sequence[str],
    tokenizer=None,
    *,
    vocab: Collection[str] | None = None,
    to_add: Collection[str] = (),
    template: str = "the template",
) -> None:
    """Every control token of the template is one token of the tokenizer, or is in `to_add`.

    `markers` are plain strings (a template's control tokens; `{bos}`/`{eos}` stand for the tokenizer's own).
    With `tokenizer`, a marker passes when it encodes to exactly one id, the id of that token; with only
    `vocab` (a set of token strings), when it is in it. A marker that fails would be split into ordinary text
    pieces and the model would never see its control token.
    """
    if tokenizer is None and vocab is None:
        raise ValueError("check_template_tokens needs a tokenizer or a vocab")
    added = set(to_add)
    known = tokenizer.get_vocab() if tokenizer is not None else None
    for marker in markers:
        token = _resolve_marker(marker, tokenizer)
        if token is None:
            what = "BOS" if marker == "{bos}" else "EOS"
            raise ConfigError(
                f"{template} writes the {what} token, but the tokenizer has none: set it in "
                "tokenizer_config.json or choose another --conv_template"
            )
        if token in added:
            continue
        if tokenizer is None:
            if token in vocab:
                continue
            problem = "is not in its vocabulary"
        else:
            ids = tokenizer.encode(token, add_special_tokens=False)
            if token in known and ids == [known[token]]:
                continue
            problem = (
                f"is in its vocabulary but text encodes it as {len(ids)} tokens (it is not a special token)"
                if token in known
                else f"is not in its vocabulary (it would be {len(ids)} ordinary tokens)"
            )
        raise ConfigError(
            f"{template} uses the control token {token!r}, which {problem} and will not be added: pass "
            f"--add_special_tokens {token} (the embeddings grow), --model_family for this model, or another "
            "--conv_template"
        )


# ---- all of it ---------------------------------------------------------------------------------------------


def run_preflight(
    *,
    output_dir: str | os.PathLike,
    data_paths: Sequence[str | os.PathLike],
    eval_data_paths: Sequence[str | os.PathLike] = (),
    model_path: str | os.PathLike | None = None,
    dtype: str | None = None,
    save_only_model: bool = False,
    lora: bool = False,
    checkpoints: int = 2,
    markers: Sequence[str] = (),
    tokenizer=None,
    vocab: Collection[str] | None = None,
    tokens_to_add: Collection[str] = (),
    template: str = "the template",
) -> list[str]:
    """Run every check in order (data files, output folder, disk, template tokens); return notices.

    Raises the first failure. The disk check needs a local `model_path` and is skipped, with a notice, for a
    hub id or for LoRA (its checkpoints hold only the adapter). The token check runs when `markers` and a
    `tokenizer` (or `vocab`) are given.
    """
    notices: list[str] = []
    # first: a mistyped data path should not leave an output folder behind
    check_data_files(data_paths, flag="--data_path")
    check_data_files(eval_data_paths or (), flag="--eval_data_path")
    if model_path is not None:
        check_model_weights(model_path)
    out = check_output_dir(output_dir)
    if lora:
        notices.append("disk check skipped: LoRA checkpoints hold only the adapter")
    elif model_path is not None:
        try:
            params, stored, how = count_parameters(model_path)
        except ValueError as err:
            notices.append(f"disk check skipped: cannot count the model's parameters ({err})")
        else:
            each = checkpoint_bytes(params, dtype=dtype, stored_bytes=stored, save_only_model=save_only_model)
            kind = "weights" if save_only_model else "weights + Adam states"
            what = f"{checkpoints} checkpoints of {human_bytes(each)} ({params:,} parameters {how}, {kind})"
            free = check_disk_space(out, checkpoints * each, what=what)
            notices.append(f"disk: {human_bytes(free)} free in {out}, {what}")
    if markers and (tokenizer is not None or vocab is not None):
        check_template_tokens(markers, tokenizer, vocab=vocab, to_add=tokens_to_add, template=template)
    return notices
