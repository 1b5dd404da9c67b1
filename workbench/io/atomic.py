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


def _memo_path(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return cache_root() / "hashes" / f"{key}.txt"


def sha256_file_cached(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a large unchanged file is hashed once; any write to
    the file changes its mtime (or size), so a changed file is always read again."""
    path = Path(path).resolve()
    memo = _memo_path(path)
    if memo.exists():
        return memo.read_text().strip()
    digest = sha256_file(path)
    atomic_write_text(memo, digest)
    return digest


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record the sha256 of a file this process just wrote (so :func:`sha256_file_cached` need not read it)."""
    atomic_write_text(_memo_path(Path(path).resolve()), digest)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_permissions(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` the permissions of a file this process creates (0666 less the umask):
    libraries that write through temporary files (save_pretrained, sae-lens) leave some 0600, unlike their
    siblings."""
    mode = 0o666 & ~_current_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file():
            os.chmod(f, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; a written artifact gets the usual permissions
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
            usual_permissions(tmp)  # builders (save_pretrained, ...) may create 0600 files
            atomic_write_json(tmp / COMPLETE_MARKER, meta)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def read_marker(folder: Path) -> dict:
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text())


class IntegrityError(ValueError):
    """A file is not what its record says (size or sha256): damaged, edited or replaced."""


def combined_sha256(files: dict[str, str]) -> str:
    """One sha256 for a set of files: the file's own when there is one, else the sha256 of their sorted
    ``name:sha256`` lines (so a folder of shards has one identity)."""
    if len(files) == 1:
        return next(iter(files.values()))
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def verify_files(folder: str | os.PathLike, recorded: dict[str, str], *, full: bool = False) -> None:
    """Check that each ``name -> sha256`` of ``recorded`` is in ``folder`` with that hash. Cheap by default: a file
    whose size and mtime are unchanged since it was last hashed is not read again (:func:`sha256_file_cached`);
    ``full=True`` re-hashes every byte (``workbench verify``). Raises :class:`IntegrityError` naming the files."""
    folder = Path(folder)
    bad = []
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            bad.append(f"{name}: not a file name inside the folder")
        elif not path.is_file():
            bad.append(f"{name}: missing")
        else:
            actual = sha256_file(path) if full else sha256_file_cached(path)
            if actual != expected:
                bad.append(f"{name}: sha256 {actual[:12]}… but the record says {expected[:12]}…")
    if bad:
        raise IntegrityError(f"{folder} does not match its record ({'; '.join(bad)}); it was damaged or edited: delete "
                             "it to rebuild it (`workbench doctor` lists what is wrong)")
