"""The artifact rules: atomic writes, content hashes, file locks, one builder at a time.

Everything the workbench writes to disk goes through here, so that "nothing is lost" holds everywhere:
a file or folder appears complete under its final name or not at all (write to a temporary sibling, fsync,
``os.replace``), and a folder that two processes want to build is built once, under an exclusive lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock

from workbench.io.paths import cache_root

COMPLETE_MARKER = "workbench.json"  # written last inside a built folder; its presence means "complete"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file_cached(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a large unchanged file is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_root() / "hashes" / f"{key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = sha256_file(path)
    atomic_write_text(memo, digest)
    return digest


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written artifact gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` held for the block; other processes wait (``filelock``: works on
    POSIX and Windows). Not re-entrant across threads of one process holding different FileLock objects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path)):
        yield


def build_once(final: Path, build: Callable[[Path], dict]) -> Path:
    """Return ``final``, building it first if it is not complete.

    ``build(tmp_dir)`` fills a fresh temporary sibling folder and returns metadata; the metadata is written as the
    completion marker, then the folder is renamed into place. Concurrent callers wait on a lock and reuse the
    result; a crash mid-build leaves only a ``.tmp-*`` folder that is never mistaken for a complete one.
    """
    final = Path(final)
    if (final / COMPLETE_MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if (final / COMPLETE_MARKER).exists():
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a crashed build; we hold the lock, so nobody is writing it
        if final.exists():
            shutil.rmtree(final)  # incomplete (no marker)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = build(tmp)
            atomic_write_json(tmp / COMPLETE_MARKER, meta)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def read_marker(folder: Path) -> dict:
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text())
