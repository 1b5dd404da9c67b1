"""Where things live: the user cache (converted models, corpora, hashes) and the repository root."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "WORKBENCH_CACHE"  # relocates the cache (converted models, corpora, hashes)


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "workbench").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def repo_root() -> Path:
    """The folder that holds the ``workbench`` package (the repository when run from a checkout)."""
    return Path(__file__).resolve().parents[2]
