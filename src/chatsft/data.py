"""Conversations -> the train and eval datasets the Trainer reads: eager (parallel, cached) or lazy.

Eager: accepted conversations are encoded in worker processes, chunk by chunk, and streamed to an Arrow file that
is memory-mapped back (`datasets.Dataset.from_file`), so resident memory does not grow with the data. The file is
a cache keyed by everything that changes the result (data file contents, tokenizer, template, loss mode,
`model_max_length`, split, encoder version): a second launch with the same inputs maps it in milliseconds
(`Split.cache_hit` says which happened); the data files are still read and validated, as the split and the rejects
file need them (about 0.1 s per 5,000 ShareGPT records; see benchmarks/README.md). We stream Arrow batches
ourselves rather than use `datasets.map` because the audit must see every record's outcome (rejections and drops
produce no rows), and because `map` would keep the conversations in a second table.

Lazy: examples are encoded on access inside DataLoader workers; nothing is cached per process. An example that
cannot be used (rejected, or nothing left to train after truncation) is known only when it is reached: it is
replaced by the next usable one and reported on the log with its id.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path

from chatsft import __version__
from chatsft.audit import Audit
from chatsft.encode import Encoded, Encoder
from chatsft.errors import ConfigError, DataError
from chatsft.parallel import run_in_order
from chatsft.records import Conversation, ReadPolicy, read_conversations
from chatsft.templates import RenderError

logger = logging.getLogger(__name__)

ENCODER_VERSION = "1"  # bump when encoding changes its output for the same inputs
CHUNK = 256  # conversations per worker task: large enough to amortise pickling, small enough to stream


@dataclass
class Split:
    """The datasets of one run and their audits; `eval` is None when there is no eval set."""

    train: object
    eval: object | None
    train_audit: Audit | None
    eval_audit: Audit | None
    notices: list[str]
    sample: Conversation | None = None  # one training conversation, to check the saved chat template against
    cache_hit: bool | None = None  # eager: True when every encoded set was loaded from the cache; lazy: None
    cache_paths: list[Path] = field(default_factory=list)  # eager: the cache folder of each encoded set

    def audits(self) -> dict[str, Audit]:
        return {
            name: a for name, a in (("train", self.train_audit), ("eval", self.eval_audit)) if a is not None
        }

    def audit_notices(self) -> list[str]:
        return [f"{name} audit:\n{audit.format()}" for name, audit in self.audits().items()]

    def audit_json(self) -> str:
        return (
            json.dumps({k: a.to_dict() for k, a in self.audits().items()}, indent=2, ensure_ascii=False)
            + "\n"
        )


def default_cache_dir() -> Path:
    root = os.environ.get("CHATSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "chatsft"
    )
    return Path(root).expanduser()


def build_datasets(
    encoder: Encoder,
    data_path: list[str],
    *,
    eval_data_path: list[str] | None = None,
    train_ratio: float = 1.0,
    seed: int = 42,
    lazy: bool = False,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    policy: ReadPolicy | None = None,
    main_process_first=None,
    progress: bool = False,
) -> Split:
    """Read, validate, split and encode. `main_process_first` is `training_args.main_process_first` under torchrun:
    the main process encodes and writes the cache, the others then read it."""
    if not 0.0 < train_ratio <= 1.0:
        raise ConfigError(f"--train_ratio must be in (0, 1], got {train_ratio}")
    if eval_data_path and train_ratio < 1.0:
        raise ConfigError("give either --eval_data_path or --train_ratio below 1, not both")
    policy = policy or ReadPolicy()
    conversations, report = read_conversations(data_path, policy)
    notices = [
        f"read {report.records_read} records from {len(data_path)} file(s): {report.accepted} accepted, "
        f"{report.rejected_total} rejected"
        + (f" (written to {policy.rejects_path})" if report.rejected_total and policy.rejects_path else "")
    ]
    eval_conversations: list[Conversation] = []
    if eval_data_path:
        eval_conversations, eval_report = read_conversations(eval_data_path, policy.for_eval())
        notices.append(f"eval: {eval_report.accepted} of {eval_report.records_read} records accepted")
    elif train_ratio < 1.0:
        conversations, eval_conversations = split_conversations(conversations, train_ratio, seed)
        notices.append(
            f"split {len(conversations) + len(eval_conversations)} conversations (seed {seed}): "
            f"{len(conversations)} train, {len(eval_conversations)} eval"
        )
    if not conversations:
        raise ConfigError("no training conversation is left after validation")

    if lazy:
        return Split(
            LazyDataset(conversations, encoder),
            LazyDataset(eval_conversations, encoder) if eval_conversations else None,
            None,
            None,
            notices,
            conversations[0],
        )

    files = [*data_path, *(eval_data_path or [])]
    base_key = cache_key(encoder, files, train_ratio, seed)
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    train_dir, eval_dir = cache_root / f"{base_key}-train", cache_root / f"{base_key}-eval"
    guard = main_process_first(desc="encoding") if main_process_first else contextlib.nullcontext()
    with guard:
        train, train_audit, hit = encode_cached(
            conversations, encoder, train_dir, num_workers, progress and "train"
        )
        notices.append(
            f"training examples {'loaded from cache' if hit else 'encoded and cached'}: {len(train)} "
            f"({train_dir})"
        )
        evaluation, eval_audit, paths = None, None, [train_dir]
        if eval_conversations:
            evaluation, eval_audit, eval_hit = encode_cached(
                eval_conversations, encoder, eval_dir, num_workers, progress and "eval"
            )
            notices.append(
                f"eval examples {'loaded from cache' if eval_hit else 'encoded and cached'}: "
                f"{len(evaluation)} ({eval_dir})"
            )
            hit, paths = hit and eval_hit, [train_dir, eval_dir]
    if len(train) == 0:
        raise ConfigError("no training example is left after encoding: see the audit")
    # only one conversation outlives this call (the datasets are memory-mapped files)
    return Split(train, evaluation, train_audit, eval_audit, notices, conversations[0], hit, paths)


def split_conversations(conversations: list[Conversation], train_ratio: float, seed: int):
    """Seeded split by conversation (so one conversation's split examples never land on both sides), input order kept."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_train = max(1, round(len(order) * train_ratio))
    chosen = set(order[:n_train])
    train = [c for i, c in enumerate(conversations) if i in chosen]
    evaluation = [c for i, c in enumerate(conversations) if i not in chosen]
    return train, evaluation


def cache_key(encoder: Encoder, files: list[str], train_ratio: float, seed: int) -> str:
    """A hash of everything that changes the encoded examples."""
    h = hashlib.sha256()
    for part in (
        ENCODER_VERSION,
        __version__,
        encoder.loss_mode,
        str(encoder.max_length),
        repr(encoder.template),
        tokenizer_fingerprint(encoder.tokenizer),
        f"{train_ratio}:{seed}",
    ):
        h.update(part.encode("utf-8") + b"\0")
    for path in files:
        h.update(file_digest(path).encode() + b"\0")
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.__getstate__())  # its JSON, as bytes (to_str() is slower)
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_cached(
    conversations: list[Conversation],
    encoder: Encoder,
    folder: Path,
    num_workers: int | None,
    progress: str | None = None,
):
    """Load the encoded dataset from `folder`, or encode it there (with a progress bar named `progress`, if
    given). Returns (dataset, audit, cache_hit)."""
    import datasets

    arrow, audit_file = folder / "examples.arrow", folder / "audit.json"
    if arrow.is_file() and audit_file.is_file():
        return (
            datasets.Dataset.from_file(str(arrow)),
            Audit.from_dict(json.loads(audit_file.read_text())),
            True,
        )
    _remove_stale_tmp(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        audit = write_examples(conversations, encoder, tmp / "examples.arrow", num_workers, progress)
    except BaseException as err:
        _rmtree(tmp)  # an error or Ctrl-C mid-encoding: no half-written folder left behind
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DataError(
                f"no space left on the device of the preprocessing cache ({folder.parent}): free some, "
                "or point --cache_dir at a larger disk"
            ) from None
        raise
    (tmp / "audit.json").write_text(json.dumps(audit.to_dict()))
    try:
        os.replace(tmp, folder)  # atomic: a crash mid-encoding leaves only a tmp folder, never a half cache
    except OSError:  # another process won the race: use its cache
        _rmtree(tmp)
    return datasets.Dataset.from_file(str(arrow)), audit, False


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("length", pa.int32()),
        ]
    )


def write_examples(
    conversations: list[Conversation],
    encoder: Encoder,
    path: Path,
    num_workers: int | None,
    progress: str | None = None,
) -> Audit:
    """Encode chunk by chunk with `num_workers` processes (this one and helpers, see `parallel.py`) and stream
    the examples, in input order, to an Arrow stream file. Each chunk is written to a file of its own by whoever
    encoded it (the helpers inherit the conversations under `fork`): nothing large goes through a pipe either way."""
    import pyarrow as pa
    from tqdm import tqdm

    ranges = [(i, min(i + CHUNK, len(conversations))) for i in range(0, len(conversations), CHUNK)]
    workers = num_workers or usable_cpus()
    stop_ids = encoder.stop_ids
    audit = Audit(stop_ids=stop_ids)
    task = functools.partial(_encode_chunk, encoder, stop_ids, conversations, ranges, path)
    bar = tqdm(
        total=len(conversations), desc=f"encoding {progress}", unit=" conversations", disable=not progress
    )
    with bar, pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, _schema()) as writer:
        for chunk_file, partial in run_in_order(task, len(ranges), helpers=workers - 1):
            with pa.memory_map(chunk_file) as source:
                for batch in pa.ipc.open_stream(source):
                    writer.write_batch(batch)
            os.unlink(chunk_file)
            audit.merge(partial)
            bar.update(partial.records)
    return audit


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (SLURM, taskset and container
    cpusets narrow it; `os.cpu_count()` would count the whole machine and oversubscribe it), else the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _encode_chunk(
    encoder: Encoder,
    stop_ids: tuple[int, ...],
    conversations: list[Conversation],
    ranges: list[tuple[int, int]],
    path: Path,
    k: int,
) -> tuple[str, Audit]:
    """Encode chunk `k` into an Arrow file beside `path`; returns (that file, the chunk's audit)."""
    import pyarrow as pa

    audit = Audit(stop_ids=stop_ids)
    ids, input_ids, labels = [], [], []
    for conv in conversations[ranges[k][0] : ranges[k][1]]:
        result = encoder.encode(conv)
        audit.add(result)
        for ex in result.examples:
            ids.append(ex.id)
            input_ids.append(ex.input_ids)
            labels.append(ex.labels)
    batch = pa.record_batch([ids, input_ids, labels, list(map(len, input_ids))], schema=_schema())
    chunk_file = str(path.with_name(f"{path.name}.chunk{k}"))
    with pa.OSFile(chunk_file, "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return chunk_file, audit


class LazyDataset:
    """Encodes on access (FastChat's --lazy_preprocess), holding only the conversations. Map-style, so the
    Trainer's samplers, resume and DataLoader workers work unchanged; no per-process cache grows."""

    def __init__(self, conversations: list[Conversation], encoder: Encoder):
        self.conversations, self.encoder = conversations, encoder
        self.index: list[tuple[int, str]] = []  # (conversation, example id) without tokenizing anything
        for c, conv in enumerate(conversations):
            try:
                views = encoder.views(conv)
            except RenderError as err:  # the records layer rejects these first; say so if one slips through
                logger.warning("lazy preprocessing skips record %s: %s: %s", conv.id, err.reason, err.detail)
                continue
            for example_id, _, _ in views:
                self.index.append((c, example_id))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        for step in range(len(self.index)):
            c, example_id = self.index[(i + step) % len(self.index)]
            result: Encoded = self.encoder.encode(self.conversations[c])
            for ex in result.examples:
                if ex.id == example_id:
                    return {"id": ex.id, "input_ids": ex.input_ids, "labels": ex.labels}
            why = (
                f"rejected: {result.rejected}: {result.detail}"
                if result.rejected
                else "nothing left to train after truncation"
            )
            logger.warning("lazy preprocessing skips example %s (%s); using the next one", example_id, why)
        raise ConfigError("lazy preprocessing found no usable example")


def _remove_stale_tmp(folder: Path) -> None:
    """Remove the half-written folders of this cache entry left by processes of this host that were killed
    mid-encoding (SIGKILL, the out-of-memory killer). Another host's, or a live process's, are left alone."""
    for tmp in folder.parent.glob(f"{glob.escape(folder.name)}.tmp-{glob.escape(socket.gethostname())}-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            _rmtree(tmp)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: assume alive, remove nothing
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
