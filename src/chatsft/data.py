"""Sources -> the train and eval datasets the Trainer reads: eager (streamed into a cached Arrow file) or
lazy.

Eager: records are read, validated, sampled (`chatsft.mixture`), assigned to train or eval and handed in
chunks to worker processes as they are read (`parallel.run_streaming`); each chunk's examples go to an Arrow
file that the parent appends to the entry's `train.arrow`/`eval.arrow`, memory-mapped back
(`datasets.Dataset.from_file`). Nothing holds every record: the peak memory of preparing does not grow with
the data (the id set for duplicate ids excepted, see `records.SeenIds`). The entry is a cache
(`chatsft.cache`: key, manifest, verification, the lock that makes one process per cache folder encode): a
second launch with the same inputs reads no data at all, it maps the verified files and takes the audits,
notices and rejected records from the entry. We stream Arrow batches ourselves rather than use `datasets.map`
because the audit must see every record's outcome (rejections and drops produce no rows), and `map` would
need the records in a table first.

The train/eval split (`--train_ratio`) is by conversation, from a hash of (seed, source file name, id): the
same conversation always lands on the same side whatever else the files hold, and no list of records is
needed. The eval share is then binomial around 1 - ratio, not an exact count.

Lazy (FastChat's --lazy_preprocess): examples are encoded on access inside DataLoader workers from the
conversations held in memory. Its audit comes from the same streamed pass, encoding without writing examples
(cached like an eager entry): the audit's checks (a trained reply that does not end in a stop token, records
rejected by the template, truncation) must be known before training starts, not after it; the price is one
encoding pass up front, spread over the workers (then a second read keeps the conversations; a later lazy or
eager run with the same inputs takes the audit from the cache).

The module is longer than most because the streamed pass is one piece: the plan (sources, encoders, split),
the chunked encoding and the entry's manifest share their counts; the cache's own rules live in `cache`.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from chatsft import cache
from chatsft.audit import Audit
from chatsft.encode import Encoded, Encoder
from chatsft.errors import ConfigError, DataError
from chatsft.mixture import DataSource, uniform
from chatsft.parallel import run_streaming
from chatsft.records import Conversation, ReadPolicy, check_invalid_ratio, iter_conversations
from chatsft.report import ReadReport
from chatsft.sources import FileError, fingerprint_of, shards
from chatsft.templates import RenderError

logger = logging.getLogger(__name__)

CHUNK = 256  # conversations per worker task: large enough to amortise pickling, small enough to stream
BATCH_BYTES = 32 << 20  # rows per record batch of a cache entry's Arrow file, by size (see _Appender)
SIDES = ("train", "eval")


@dataclass
class Split:
    """The datasets of one run and their audits; `eval` is None when there is no eval set."""

    train: object
    eval: object | None
    train_audit: Audit | None
    eval_audit: Audit | None
    notices: list[str]
    sample: Conversation | None = None  # one training conversation, to check the saved chat template against
    cache_hit: bool | None = None  # True when the cache entry was loaded, False when it was written now
    cache_paths: list[Path] = field(default_factory=list)  # eager: the cache entry's folder
    sources: dict[str, dict] = field(default_factory=dict)  # side -> source name -> counts

    def audits(self) -> dict[str, Audit]:
        return {
            name: a for name, a in (("train", self.train_audit), ("eval", self.eval_audit)) if a is not None
        }

    def audit_notices(self) -> list[str]:
        return [f"{name} audit:\n{audit.format()}" for name, audit in self.audits().items()]

    def audit_json(self) -> str:
        body = {k: {**a.to_dict(), "sources": self.sources.get(k, {})} for k, a in self.audits().items()}
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


def plan_data(
    encoder: Encoder,
    data_path: list[str] | None = None,
    *,
    sources: list[DataSource] | None = None,
    eval_data_path: list[str] | None = None,
    train_ratio: float = 1.0,
    seed: int = 42,
    cache_dir=None,
) -> DataPlan:
    """What to read and how: `sources` (or one source per `data_path` entry), the split and the cache."""
    if not 0.0 < train_ratio <= 1.0:
        raise ConfigError(f"--train_ratio must be in (0, 1], got {train_ratio}")
    if eval_data_path and train_ratio < 1.0:
        raise ConfigError("give either --eval_data_path or --train_ratio below 1, not both")
    sources = sources or [DataSource(p) for p in data_path or []]
    root = Path(cache_dir) if cache_dir else cache.default_cache_dir()
    return DataPlan(encoder, sources, [DataSource(p) for p in eval_data_path or []], train_ratio, seed, root)


def build_datasets(
    encoder: Encoder,
    data_path: list[str] | None = None,
    *,
    lazy: bool = False,
    num_workers: int | None = None,
    policy: ReadPolicy | None = None,
    progress: bool = False,
    **plan_args,
) -> Split:
    """`build(plan_data(encoder, data_path, **plan_args), ...)`, in one call."""
    plan = plan_data(encoder, data_path, **plan_args)
    return build(plan, lazy=lazy, num_workers=num_workers, policy=policy, progress=progress)


def build(
    plan: DataPlan,
    *,
    lazy: bool = False,
    num_workers: int | None = None,
    policy: ReadPolicy | None = None,
    progress: bool = False,
) -> Split:
    """Read, validate, sample, split and encode what `plan` names. Under torchrun every process calls it:
    the first to lock the cache entry encodes, the others wait and map it."""
    policy = policy or ReadPolicy()
    root, key = plan.root, plan.key
    entry, notices = root / (f"{key}-audit" if lazy else key), []
    with cache.locked(entry, wait_notice="preprocessing"):
        manifest, bad = cache.verify(root / key) if lazy else (None, None)
        if manifest is None:
            manifest, bad = cache.verify(entry)
        datasets_, hit = (_load(entry, manifest, lazy) if manifest else (None, False)), manifest is not None
        if isinstance(datasets_, str):  # the files match their checksums but not their row counts
            bad, manifest, hit = datasets_, None, False
        if bad:
            notices.append(f"the cache entry {entry} is damaged ({bad}): encoding it again")
        if manifest is None:
            manifest = _encode_entry(plan, entry, policy, num_workers, progress, write=not lazy)
            datasets_ = None if lazy else _load(entry, manifest, lazy)
    for side, name in (("train", "rejected.jsonl"), ("eval", "rejected-eval.jsonl")):
        target = policy.rejects_path if side == "train" else policy.for_eval().rejects_path
        if target and (entry / name).is_file():
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            if os.path.islink(target):  # replace a link itself: never write through it to its target
                os.unlink(target)
            shutil.copyfile(entry / name, target)
    for side in SIDES:
        if side in manifest["reports"]:
            _check_policy(manifest["reports"][side], policy)
    audits = {side: Audit.from_dict(a) for side, a in manifest["audits"].items()}
    notices = [*manifest["notices"], *notices]
    if policy.rejects_path and manifest["reports"]["train"]["rejected"]:
        notices[0] += f" (written to {policy.rejects_path})"
    if lazy:
        train, evaluation = plan.lazy_datasets()
        return Split(train, evaluation, audits["train"], audits.get("eval"), notices,
                     _sample(manifest), hit, [], manifest["sources"])  # fmt: skip
    train, evaluation = datasets_
    verb = "loaded from cache" if hit else "encoded and cached"
    notices.append(f"training examples {verb}: {len(train)} ({entry})")
    if evaluation is not None:
        notices.append(f"eval examples {verb}: {len(evaluation)} ({entry})")
    if len(train) == 0:
        raise ConfigError("no training example is left after encoding: see the audit")
    return Split(train, evaluation, audits["train"], audits.get("eval"), notices, _sample(manifest), hit,
                 [entry], manifest["sources"])  # fmt: skip


class DataPlan:
    """What to read and how: the sources, their encoders, the split, the cache folder; and the stream of
    (side, source number, conversation, copies) it makes. The run manifest takes its identity (the shards'
    fingerprints, the cache key) from the same plan that `build` reads, so both are computed once."""

    def __init__(self, encoder, sources, eval_sources, train_ratio, seed, root: Path):
        if not sources:
            raise ConfigError("no training data: give --data_path or --datasets")
        self.encoder, self.sources, self.eval_sources = encoder, [*sources, *eval_sources], eval_sources
        self.n_train, self.train_ratio, self.seed, self.root = len(sources), train_ratio, seed, root
        self.encoders = [s.encoder(encoder) for s in self.sources]
        self.owner: list[dict[str, int]] = [{}, {}]  # per side: shard file -> source number
        for n, src in enumerate(self.sources):
            try:
                files = shards(src.path)
            except FileError as e:
                raise DataError(f"{src.path}: {e.reason}: {e.detail}") from None
            for f in files:
                if f in self.owner[0] or f in self.owner[1]:
                    raise ConfigError(f"{f} is given twice; give it once (with a weight to use it more)")
                self.owner[n >= self.n_train][f] = n

    @functools.cached_property
    def fingerprints(self) -> list[list[str]]:
        """Per source, the fingerprint of each of its shards (a file's SHA-256, a `datasets` fingerprint)."""
        return [
            [_fingerprint(f, self.root) for f, m in self.owner[n >= self.n_train].items() if m == n]
            for n in range(len(self.sources))
        ]

    @functools.cached_property
    def total_bytes(self) -> int | None:
        """The size of every file to read, or None when a source is not a local file (a `datasets` folder,
        a Hub name)."""
        files = [f for owner in self.owner for f in owner]
        if not all(os.path.isfile(f) for f in files):
            return None
        return sum(os.path.getsize(f) for f in files)

    @functools.cached_property
    def key(self) -> str:
        """The cache key: the tokenizer, the split, and per source its options, encoder and shards."""
        parts = [cache.tokenizer_fingerprint(self.encoder.tokenizer), f"{self.train_ratio}:{self.seed}"]
        every = zip(self.sources, self.encoders, self.fingerprints, strict=True)
        for n, (src, enc, prints) in enumerate(every):
            parts += [f"{'eval' if n >= self.n_train else 'train'} {src.key()}", enc.loss_mode]
            parts += [str(enc.max_length), repr(enc.template), *prints]
        return cache.cache_key(parts)

    def stream(self, reports, policy, counts, keep=None):
        """Yield (side, source number, conversation, copies) for every accepted conversation."""
        for is_eval, report in ((False, reports["train"]), (True, reports.get("eval"))):
            if report is None:
                continue
            owner = self.owner[is_eval]
            mappings = {f: self.sources[n].prepare() for f, n in owner.items()}

            def prepare(source, raw, mappings=mappings):
                mapping = mappings.get(source)
                return mapping(source, raw) if mapping else raw

            side_policy = policy.for_eval() if is_eval else policy
            for conv in iter_conversations(
                list(owner), side_policy, report, prepare=prepare, check_ratio=False
            ):
                n = owner[conv.source]
                src, c = self.sources[n], counts[n]
                c["accepted"] += 1
                if src.max_samples is not None and c["accepted"] > src.max_samples:
                    continue
                conv = src.with_system(conv)
                side = "eval" if is_eval or (self.train_ratio < 1 and self._held_out(conv)) else "train"
                copies = 1 if side == "eval" else src.copies(conv, self.seed)
                c[f"{side}_conversations"] += copies
                if copies:
                    if keep is not None:
                        keep[side].extend([(conv, n)] * copies)
                    yield side, n, conv, copies

    def _held_out(self, conv: Conversation) -> bool:
        return uniform(self.seed, "split", Path(conv.source).name, conv.id) >= self.train_ratio

    def lazy_datasets(self):
        keep = {"train": [], "eval": []}
        reports = {
            "train": ReadReport(keep=False),
            "eval": ReadReport(keep=False) if self.eval_sources else None,
        }
        counts = [_counts() for _ in self.sources]
        for _ in self.stream(reports, ReadPolicy(max_invalid_ratio=1.0), counts, keep):
            pass
        train = LazyDataset(
            [c for c, _ in keep["train"]], self.encoder, [self.encoders[n] for _, n in keep["train"]]
        )
        ev = keep["eval"]
        evaluation = (
            LazyDataset([c for c, _ in ev], self.encoder, [self.encoders[n] for _, n in ev]) if ev else None
        )
        return train, evaluation


def _fingerprint(source: str, root: Path) -> str:
    try:
        return fingerprint_of(source) or cache.file_fingerprint(source, root)
    except FileError as e:
        raise DataError(f"{source}: {e.reason}: {e.detail}") from None
    except FileNotFoundError:
        raise DataError(f"{source}: file_missing: no such file") from None
    except OSError as e:
        raise DataError(f"{source}: file_unreadable: {e.strerror or e}") from None


def _counts() -> dict:
    return {"accepted": 0, "train_conversations": 0, "eval_conversations": 0}


def _encode_entry(plan: DataPlan, entry: Path, policy: ReadPolicy, num_workers, progress, write) -> dict:
    tmp = cache.tmp_folder(entry)
    reports = {"train": ReadReport(keep=False), "eval": ReadReport(keep=False) if plan.eval_sources else None}
    rejects = policy.__class__(policy.max_invalid_ratio, policy.strict, str(tmp / "rejected.jsonl"))
    counts = [_counts() for _ in plan.sources]
    audits = {side: Audit(stop_ids=plan.encoder.stop_ids) for side in SIDES}
    per_source = {side: {} for side in SIDES}
    writers, rows, sample = {}, dict.fromkeys(SIDES, 0), []
    task = functools.partial(_encode_chunk, plan.encoders, plan.encoder.stop_ids, tmp, write)
    bar = _Bar(progress, plan.total_bytes, reports)
    try:
        with bar.bar:
            for chunk_files, chunk_audits in run_streaming(
                task,
                _chunks(plan.stream(reports, rejects, counts), sample),
                helpers=(num_workers or usable_cpus()) - 1,
            ):
                for side, (_, audit, by_source) in chunk_audits.items():
                    audits[side].merge(audit)
                    for n, a in by_source.items():
                        per_source[side].setdefault(n, Audit(stop_ids=audit.stop_ids)).merge(a)
                for side, chunk_file in chunk_files.items():
                    if side not in writers:
                        writers[side] = _Appender(tmp / f"{side}.arrow")
                    writers[side].add(chunk_file)
                bar.add(sum(audit.records for _, audit, _ in chunk_audits.values()))
        for side, writer in writers.items():
            rows[side] = writer.close()
        if write and "train" not in writers:  # no training row at all: an empty file keeps the entry whole
            writers["train"] = _Appender(tmp / "train.arrow")
            writers["train"].close()
        for side, report in reports.items():  # the records validation rejected: the audit counts them too
            if report is not None:
                audits[side].add_read(report)
        manifest = _manifest(plan, reports, counts, audits, per_source, sample, tmp, writers, rows)
        cache.publish(tmp, entry, manifest)
    except BaseException as err:
        for writer in writers.values():
            writer.abandon()
        cache.rmtree(tmp)  # an error or Ctrl-C mid-encoding: no half-written folder left behind
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise DataError(
                f"no space left on the device of the preprocessing cache ({entry.parent}): free some, "
                "or point --cache_dir at a larger disk"
            ) from None
        raise
    return manifest


class _Bar:
    """The encoding bar. When every source is a local file it counts the bytes read (a percentage and a time
    left for a preparation that may take hours), else the conversations; either way it names the
    conversations encoded and their rate."""

    def __init__(self, enabled: bool, total_bytes: int | None, reports: dict):
        from tqdm import tqdm

        self.reports, self.count = [r for r in reports.values() if r is not None], 0
        if total_bytes:
            form = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"
            self.bar = tqdm(desc="encoding", total=total_bytes, bar_format=form, disable=not enabled)
        else:
            self.bar = tqdm(desc="encoding", unit=" conversations", disable=not enabled)

    def add(self, conversations: int) -> None:
        self.count += conversations
        if self.bar.disable:
            return
        if self.bar.total is None:
            self.bar.update(conversations)
            return
        elapsed = self.bar.format_dict["elapsed"]
        rate = f", {self.count / elapsed:,.0f}/s" if elapsed > 0 else ""
        self.bar.set_postfix_str(f"{self.count:,} conversations{rate}", refresh=False)
        done = min(sum(r.bytes_read() for r in self.reports), self.bar.total)
        self.bar.update(done - self.bar.n)


class _Appender:
    """One Arrow stream file of the entry, appended chunk file by chunk file, in record batches of about
    BATCH_BYTES. Why not one batch per chunk: `datasets.Dataset.from_file` reads the stream's message headers
    through a memory map, and each header read maps the pages around it (64 KB here), so a million
    conversations in batches of 256 left 250 MB of the file resident in the process that loads it; in
    batches of ~32 MB, a few MB."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, _schema())
        self.pending, self.bytes, self.rows = [], 0, 0

    def add(self, chunk_file: str) -> None:
        import pyarrow as pa

        source = pa.memory_map(chunk_file)
        table = pa.ipc.open_stream(source).read_all()
        self.pending.append((source, table, chunk_file))
        self.bytes += table.nbytes
        if self.bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            table = pa.concat_tables([t for _, t, _ in self.pending]).combine_chunks()
            for batch in table.to_batches():
                self.writer.write_batch(batch)
            self.rows += table.num_rows
        for source, _, chunk_file in self.pending:
            source.close()
            Path(chunk_file).unlink()
        self.pending, self.bytes = [], 0

    def close(self) -> int:
        """Write what is pending, close the file; the number of rows written."""
        self._flush()
        self.writer.close()
        self.sink.close()
        return self.rows

    def abandon(self) -> None:
        for source, _, _ in self.pending:
            source.close()
        self.sink.close()


def _manifest(plan, reports, counts, audits, per_source, sample, tmp, writers, rows) -> dict:
    train_report = reports["train"]
    notices = [
        f"read {train_report.records_read} records from {len(train_report.files)} file(s): "
        f"{train_report.accepted} accepted, {train_report.rejected_total} rejected"
    ]
    if reports["eval"] is not None:
        notices.append(f"eval: {reports['eval'].accepted} of {reports['eval'].records_read} records accepted")
    elif plan.train_ratio < 1.0:
        n_train, n_eval = (sum(c[f"{s}_conversations"] for c in counts) for s in SIDES)
        notices.append(
            f"split {n_train + n_eval} conversations (seed {plan.seed}): {n_train} train, {n_eval} eval"
        )
    sources = {side: {} for side in SIDES}
    for n, src in enumerate(plan.sources):
        for side in SIDES:
            if side == "eval" and n < plan.n_train and plan.train_ratio == 1.0:
                continue
            if side == "train" and n >= plan.n_train:
                continue
            a = per_source[side].get(n, Audit())
            sources[side][src.name] = {
                "accepted": counts[n]["accepted"],
                "weight": src.weight,
                "max_samples": src.max_samples,
                "conversations": counts[n][f"{side}_conversations"],
                "examples": a.examples,
                "tokens": a.tokens,
                "trained_tokens": a.trained_tokens,
            }
    if len(plan.sources) > 1 or any(s.weight is not None or s.max_samples is not None for s in plan.sources):
        for name, c in sources["train"].items():
            notices.append(
                f"source {name}: {c['accepted']} accepted, {c['conversations']} conversations used, "
                f"{c['examples']} examples, {c['trained_tokens']} trained tokens"
            )
    sets = {side: cache.describe(tmp / f"{side}.arrow", rows[side]) for side in writers}
    return {
        "sets": sets,
        "audits": {s: audits[s].to_dict() for s in SIDES if s == "train" or _has_eval(plan)},
        "reports": {s: _report_counts(r) for s, r in reports.items() if r is not None},
        "notices": notices,
        "sources": {s: v for s, v in sources.items() if v},
        "sample": asdict(sample[0]) if sample else None,
    }


def _has_eval(plan) -> bool:
    return bool(plan.eval_sources) or plan.train_ratio < 1.0


def _report_counts(report: ReadReport) -> dict:
    return {
        "read": report.records_read,
        "rejected": report.rejected_total,
        "first_problem": str(report.first_problem) if report.first_problem else None,
    }


def _check_policy(counts: dict, policy: ReadPolicy) -> None:
    """The read policy, applied to the counts of an entry (the policy is not part of the cache key)."""
    if policy.strict and counts["rejected"]:
        raise DataError(f"{counts['first_problem']} (--strict stops at the first rejected record)")
    report = ReadReport(records_read=counts["read"])
    report.rejected["any"] = counts["rejected"]
    report.first_problem = counts["first_problem"]
    check_invalid_ratio(report, policy)


def _sample(manifest: dict) -> Conversation | None:
    return Conversation(**manifest["sample"]) if manifest.get("sample") else None


def _chunks(stream, sample: list):
    """(number, up to CHUNK items) from the stream; the first training conversation goes into `sample`."""
    chunk, k = [], 0
    for item in stream:
        if not sample and item[0] == "train":
            sample.append(item[2])
        chunk.append(item)
        if len(chunk) >= CHUNK:
            yield k, chunk
            chunk, k = [], k + 1
    if chunk:
        yield k, chunk


def _load(entry: Path, manifest: dict, lazy: bool):
    """The mapped (train, eval) datasets of a verified entry, or a problem string."""
    if lazy:
        return None
    import datasets

    loaded = {}
    for side, info in manifest["sets"].items():
        loaded[side] = datasets.Dataset.from_file(str(entry / info["file"]))
        problem = cache.rows_match(loaded[side], info)
        if problem:
            return problem
    return loaded["train"], loaded.get("eval")


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


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one (SLURM, taskset and
    container cpusets narrow it; `os.cpu_count()` would count the whole machine and oversubscribe it), else
    the CPU count."""
    import os

    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _encode_chunk(encoders: list[Encoder], stop_ids: tuple[int, ...], folder: Path, write: bool, job):
    """Encode one chunk of (side, source, conversation, copies) into an Arrow file per side in `folder`;
    returns ({side: file}, {side: (file, audit, {source: audit})})."""
    import pyarrow as pa

    k, items = job
    columns = {side: ([], [], []) for side in SIDES}
    audits = {side: Audit(stop_ids=stop_ids) for side in SIDES}
    by_source = {side: {} for side in SIDES}
    for side, n, conv, copies in items:
        result = encoders[n].encode(conv)
        mine = by_source[side].setdefault(n, Audit(stop_ids=stop_ids))
        for _ in range(copies):
            audits[side].add(result)
            mine.add(result)
            if write:
                for ex in result.examples:
                    columns[side][0].append(ex.id)
                    columns[side][1].append(ex.input_ids)
                    columns[side][2].append(ex.labels)
    files = {}
    for side, (ids, input_ids, labels) in columns.items():
        if not ids:
            continue
        batch = pa.record_batch([ids, input_ids, labels, list(map(len, input_ids))], schema=_schema())
        files[side] = str(folder / f"chunk{k}-{side}.arrow")
        with pa.OSFile(files[side], "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
    return files, {s: (files.get(s), audits[s], by_source[s]) for s in SIDES if audits[s].records}


class LazyDataset:
    """Encodes on access (FastChat's --lazy_preprocess), holding only the conversations. Map-style, so the
    Trainer's samplers, resume and DataLoader workers work unchanged; no per-process cache grows."""

    def __init__(
        self, conversations: list[Conversation], encoder: Encoder, encoders: list[Encoder] | None = None
    ):
        self.conversations, self.encoder = conversations, encoder
        self.encoders = encoders or [encoder] * len(conversations)
        self.index: list[tuple[int, str]] = []  # (conversation, example id) without tokenizing anything
        for c, conv in enumerate(conversations):
            try:
                views = self.encoders[c].views(conv)
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
            result: Encoded = self.encoders[c].encode(self.conversations[c])
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
