"""Where things live: the user cache (converted models, corpora, hashes) and the repository root."""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_ENV = "WORKBENCH_CACHE"  # relocates the cache (converted models, corpora, hashes)


def safe_segment(part) -> str:
    """``part`` as one safe path segment: every run of characters other than letters, digits, ``.``, ``_`` and ``-``
    becomes ``_``, leading and trailing dots are stripped (no ``..``, no absolute path, no separator)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(part)).strip("._") or "_"


def model_key(model) -> str:
    """A cache folder name for a model: its name as a safe segment, plus the first 12 hex digits of its weights
    hash unless it is a registry model (whose name fixes its weights). A local model's name is the path as typed:
    this keeps an absolute path or ``..`` from steering a cache write out of the cache."""
    name = safe_segment(getattr(model, "name", model))
    source = getattr(model, "source", None) or {}
    return name if source.get("registry") == getattr(model, "name", None) else f"{name}-{model.weights_hash[:12]}"


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "workbench").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def repo_root() -> Path:
    """The folder that holds the ``workbench`` package (the repository when run from a checkout)."""
    return Path(__file__).resolve().parents[2]


SMOKE_DIR = "_smoke"  # a smoke run's outputs go to <output_dir>/_smoke/ (git-ignored), never into <output_dir>


def is_checkout(root: Path | None = None) -> bool:
    """Does the package run from a repository checkout (``pyproject.toml`` and ``notebooks/`` beside it)?"""
    root = root or repo_root()
    return (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir()


def resolve_output_path(path: str | os.PathLike) -> Path:
    """Where a relative output path points: against the repository root when the current directory is inside a
    checkout (a JupyterLab kernel runs in ``notebooks/``: ``figures/...`` must still mean the repository's
    ``figures/``), else against the current directory. Absolute paths stay as they are."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    root, cwd = repo_root(), Path.cwd().resolve()
    if is_checkout(root) and (cwd == root or root in cwd.parents):
        return root / p
    return cwd / p


def run_output_dir(output_dir: str | os.PathLike, smoke: bool) -> Path:
    """The folder a notebook run writes to: :func:`resolve_output_path` of ``output_dir``, and for a smoke run its
    ``_smoke/`` subfolder (the runner already passes one; it is not doubled). A full-size run never gets a
    ``_smoke`` folder and a smoke run never gets a full-size one."""
    if not isinstance(smoke, bool):
        raise ValueError(f"smoke must be True or False, got {smoke!r}")
    out = resolve_output_path(output_dir)
    if smoke:
        return out if out.name == SMOKE_DIR else out / SMOKE_DIR
    if SMOKE_DIR in out.parts:
        raise ValueError(f"output_dir {str(output_dir)!r} is a smoke folder ({SMOKE_DIR}/), but smoke is False: a "
                         "full-size run never writes there")
    return out
