"""Provenance, once: the package version, the versions of the libraries that shape a result, the git state of the
checkout, the clock, and the one JSON cleaner every card, manifest and record goes through."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

from workbench.io.paths import repo_root

__version__ = "0.1.0"  # the single source: pyproject.toml reads it (tests/test_packaging.py checks they agree)

# The libraries whose version changes a number: recorded in every card, manifest and store.
VERSION_PACKAGES = (
    "torch", "transformers", "safetensors", "numpy", "pandas", "scikit-learn", "plotly", "kaleido", "sae-lens",
)


def package_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    """{"python", "workbench", and each of :data:`VERSION_PACKAGES` + ``extra``: installed version or None}."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "workbench": __version__}
    for name in (*VERSION_PACKAGES, *extra):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the workbench package's Python sources (relative path and bytes, sorted): what a resumable run
    records, so that units written by other code are never resumed into a result."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def now() -> str:
    """UTC time, ISO 8601 to the second: the one clock of every record."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def jsonable(obj, *, strict: bool = False):
    """``obj`` as plain JSON values: containers kept (tuples and sets as lists, keys as str), numpy/torch scalars
    and arrays unwrapped, paths as str. Anything else becomes ``str(obj)``, or raises ``ValueError`` naming the
    type with ``strict=True`` (cards, where a value that cannot round-trip must fail before anything is written)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v, strict=strict) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars/arrays, torch tensors
        return jsonable(obj.tolist(), strict=strict)
    if strict:
        raise ValueError(f"{type(obj).__name__} value {obj!r:.80} is not JSON-serialisable")
    return str(obj)


def json_roundtrip(obj, *, strict: bool = True):
    """:func:`jsonable`, then through ``json`` once, so what is returned is exactly what a file will hold."""
    return json.loads(json.dumps(jsonable(obj, strict=strict), allow_nan=True))


def git_info(root: str | os.PathLike | None = None, *, exclude: tuple[str, ...] = ("figures",)) -> dict:
    """Commit of the repository and whether the working tree differs from it.

    ``dirty`` is conservative: modified tracked files *or* untracked, non-ignored files (new code that is not
    committed yet) make it true. Paths under ``exclude`` are ignored, since a run rewrites its own figures.
    ``{"commit": None, "error": ...}`` outside a git checkout.
    """
    root = Path(root or repo_root())
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        spec = ["."] + [f":(exclude){p}" for p in exclude]
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=normal", "--", *spec],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        return {"commit": None, "dirty": None, "error": f"not a git checkout or git unavailable: {detail.strip()}"}
    changed = [line[3:] for line in status if line.strip() and not line.startswith("??")]
    untracked = [line[3:] for line in status if line.startswith("??")]
    return {
        "commit": commit,
        "dirty": bool(changed or untracked),
        "changed_files": changed[:50],
        "untracked_files": untracked[:50],
    }


def model_info(model) -> dict | None:
    """Provenance of a :class:`workbench.Model` (name, weights sha256, source) or of a plain model name."""
    if model is None:
        return None
    if isinstance(model, str):
        return {"name": model, "weights_sha256": None}
    if isinstance(model, dict):
        return dict(model)
    src = dict(getattr(model, "source", {}) or {})
    info = {"name": getattr(model, "name", None), "weights_sha256": getattr(model, "weights_hash", None)}
    for key in ("registry", "hub_id", "source_sha256"):
        if src.get(key):
            info[key] = src[key]
    if getattr(model, "n_layers", None) is not None:
        info["n_layers"] = model.n_layers
    return info
