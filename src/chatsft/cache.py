"""The encoded-data cache: its key, the fingerprints of what goes into it, each entry's manifest and its
verification, the lock that lets one process per cache folder encode while the others wait, and the cleanup
of stale folders.

An entry is a folder `<cache_dir>/<key>/` holding `train.arrow` (and `eval.arrow`), the rejected records, and
`manifest.json`, written last: the row count of every Arrow file, the byte size and xxh3-128 checksum of every
file in the entry, the audits, the read counts and notices, one sample conversation, and a checksum of the
manifest itself (a changed audit count or sample would otherwise be trusted). A folder is published by one
atomic rename, so a crash mid-encoding leaves only a `.tmp-HOST-PID` folder (removed by the next run on that
host once its process is gone). `verify` checks an entry against its own manifest before anything maps it
(a truncated, empty, swapped or altered file is a problem string, never a traceback; the caller encodes it
again with a notice). Hashing reads the whole file once (xxh3 runs at several GB/s, below the disk's own
speed), and the read also warms the page cache the memory map then uses.

One read per cache folder: `locked(entry)` takes an exclusive `flock` on `<key>.lock` beside the entry; the
first process in encodes, the others block in the kernel (no collective, so no NCCL timeout however long the
encoding takes) and then find the verified entry. A lock dies with its process, so a killed encoder never
blocks the next. On a node-local cache each node encodes once; on a shared file system with working locks
(NFSv4, Lustre mounted with `flock`, GPFS) one process in the whole job does; where the file system refuses
locks every process encodes into its own tmp folder and the first rename wins (what happened before locks).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from chatsft import __version__

logger = logging.getLogger(__name__)

ENCODER_VERSION = "3"  # bump when encoding changes its output for the same inputs
MANIFEST = "manifest.json"
MANIFEST_VERSION = 2
SELF_CHECKSUM = "manifest_xxh3_128"
HASH_NOTICE_BYTES = 1 << 30  # a data file this large gets a notice while it is hashed (2.6 s a GB here)


def default_cache_dir() -> Path:
    root = os.environ.get("CHATSFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "chatsft"
    )
    return Path(root).expanduser()


def cache_key(parts: list[str]) -> str:
    """A hash of everything that changes the encoded examples (the caller lists them)."""
    h = hashlib.sha256()
    for part in (ENCODER_VERSION, __version__, *parts):
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.__getstate__())  # its JSON, as bytes (to_str() is slower)
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike, root: Path) -> str:
    """The SHA-256 of a data file, remembered in `<root>/fingerprints.json` by (real path, size, mtime, ctime,
    inode): a re-run does not read a 50 GB file again to find its cache entry. ctime cannot be set back by a
    user, so a file rewritten in place (even with its old mtime restored) is hashed again. The memo carries a
    checksum: a damaged one is read as empty (the files are hashed again), since a flipped digest would give a
    wrong cache key, the data encoded again and a resume refused as "data files changed"."""
    st = os.stat(path)
    stamp = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    memo = root / "fingerprints.json"
    with locked(memo):  # one process hashes a new file, the others wait and read what it found
        known = _read_memo(memo)
        if stamp in known:
            return known[stamp]
        if st.st_size >= HASH_NOTICE_BYTES:  # else a long silent pause before anything is read
            logger.info(
                "hashing %s (%.1f GB) to find its cache entry; later runs remember it", path, st.st_size / 1e9
            )
        digest = file_digest(path)
        known = {k: v for k, v in known.items() if os.path.exists(k.split("|", 1)[0])}
        known[stamp] = digest
        _write_json_atomic(memo, {"fingerprints": known, SELF_CHECKSUM: manifest_checksum(known)})
    return digest


def _read_memo(memo: Path) -> dict[str, str]:
    value = _read_json(memo)
    known = value.get("fingerprints") if isinstance(value, dict) else None
    if isinstance(known, dict) and value.get(SELF_CHECKSUM) == manifest_checksum(known):
        return known
    return {}


def checksum(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
        if hasattr(os, "posix_fadvise"):
            # Drop what this read brought into the page cache: read in large folios, an entry mapped back
            # afterwards has them mapped whole into the process (a 310 MB entry's mapping added 19 MB of RSS
            # after this read, 2 MB without it; at 10M conversations ~600 MB).
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return h.hexdigest()


def describe(path: Path, rows: int) -> dict:
    """The manifest's record of one Arrow file."""
    return {"file": path.name, "rows": rows, "bytes": path.stat().st_size, "xxh3_128": checksum(path)}


def verify(entry: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) for an entry that matches its manifest; (None, None) when there is no entry;
    (None, why) for a damaged one."""
    if not entry.exists():
        return None, None
    manifest = _read_json(entry / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        return None, "its manifest is missing or unreadable"
    if manifest.pop(SELF_CHECKSUM, None) != manifest_checksum(manifest):
        return None, "its manifest does not match its own checksum"
    for name, info in manifest["files"].items():
        path = entry / name
        if not path.is_file():
            return None, f"{name} is missing"
        size = path.stat().st_size
        if size != info["bytes"]:
            return None, f"{name} has {size} bytes, its manifest says {info['bytes']}"
        if checksum(path) != info["xxh3_128"]:
            return None, f"{name} does not match its manifest's checksum"
    return manifest, None


def rows_match(dataset, info: dict) -> str | None:
    if len(dataset) == info["rows"]:
        return None
    return f"{info['file']} has {len(dataset)} rows, its manifest says {info['rows']}"


def publish(tmp: Path, entry: Path, manifest: dict) -> None:
    """Write the manifest (with the size and checksum of every file in `tmp`, and its own checksum), then
    rename the folder into place (atomic). A damaged entry that `verify` refused is moved aside first."""
    listed = {info["file"]: info for info in manifest["sets"].values()}  # the Arrow files, hashed already
    files = {
        p.name: listed.get(p.name) or {"bytes": p.stat().st_size, "xxh3_128": checksum(p)}
        for p in sorted(tmp.iterdir())
        if p.is_file()
    }
    body = {"manifest_version": MANIFEST_VERSION, **manifest, "files": files}
    body = json.loads(json.dumps(body, default=str))  # the checksum covers what a reader will parse
    _write_json_atomic(tmp / MANIFEST, {**body, SELF_CHECKSUM: manifest_checksum(body)})
    if entry.exists():
        discard(entry)
    os.replace(tmp, entry)


def discard(entry: Path) -> None:
    aside = entry.with_name(f"{entry.name}.bad-{socket.gethostname()}-{os.getpid()}")
    with contextlib.suppress(OSError):
        os.replace(entry, aside)
    rmtree(aside)
    rmtree(entry)


def tmp_folder(entry: Path) -> Path:
    remove_stale_tmp(entry)
    tmp = entry.with_name(f"{entry.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def locked(path: Path, wait_notice: str | None = None):
    """Hold an exclusive lock on `<path>.lock` (blocking; released when the process dies). Where the file
    system refuses locks, go on without one."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the atomic rename still keeps entries whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f"{path.name}.lock")
    with open(lock, "a+") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                if wait_notice:
                    logger.warning("%s: %s holds %s; waiting for it", wait_notice, holder, lock)
                start = time.monotonic()
                fcntl.flock(f, fcntl.LOCK_EX)
                if wait_notice:
                    logger.info("%s: waited %.1f s", wait_notice, time.monotonic() - start)
            f.seek(0)
            f.truncate()
            f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
            f.flush()
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            logger.warning("the file system of %s refuses locks: every process encodes its own copy", lock)
        yield


def remove_stale_tmp(entry: Path) -> None:
    """Remove the half-written folders of this cache entry left by processes of this host that were killed
    mid-encoding (SIGKILL, the out-of-memory killer). Another host's, or a live process's, are left alone."""
    for tmp in entry.parent.glob(f"{glob.escape(entry.name)}.tmp-{glob.escape(socket.gethostname())}-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            rmtree(tmp)


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


def rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def manifest_checksum(value) -> str:
    """The checksum a manifest carries of itself (over its canonical JSON, without that field)."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
