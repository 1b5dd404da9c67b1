"""The one rule for every writer of an artifact folder: write into a new or empty folder, or replace a folder that
this package wrote for the same kind of artifact, and only when asked (``overwrite=True``). A folder that holds
anything else is never deleted or mixed into.

Each artifact folder carries ``.workbench-owner.json`` (``{"kind": ..., "workbench": version}``), written with
the artifact. Folders written before the marker existed are recognised by the caller's ``legacy`` test (their
card or config files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from workbench.io.atomic import atomic_write_json
from workbench.io.provenance import __version__

OWNER_FILE = ".workbench-owner.json"


class FolderOwnershipError(ValueError):
    """A writer was pointed at a folder it may not replace."""


def folder_kind(folder: str | os.PathLike, legacy: Callable[[Path], bool] | None = None,
                kind: str | None = None) -> str | None:
    """The kind of artifact this package wrote into ``folder`` (from its owner marker; ``kind`` when the
    ``legacy`` test recognises an older folder of that kind), else None."""
    folder = Path(folder)
    marker = folder / OWNER_FILE
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("kind")
        except (ValueError, UnicodeDecodeError):
            return None
    if legacy is not None and kind is not None and folder.is_dir() and legacy(folder):
        return kind
    return None


def claim_folder(folder: str | os.PathLike, kind: str, *, overwrite: bool,
                 legacy: Callable[[Path], bool] | None = None) -> bool:
    """Check, before anything is written, that a ``kind`` artifact may be written to ``folder``; returns whether a
    folder of that kind is there (to be replaced). Raises :class:`FolderOwnershipError` naming the folder and what
    it holds: for a non-empty folder this package did not write, for another kind of artifact, or for an artifact
    of this kind without ``overwrite=True``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderOwnershipError(f"{folder} is a file, not a folder: refusing to write a {kind} there")
    if not folder.exists() or not any(folder.iterdir()):
        return False
    found = folder_kind(folder, legacy, kind)
    if found is None:
        entries = sorted(p.name for p in folder.iterdir())[:5]
        raise FolderOwnershipError(f"{folder} is not empty and was not written by workbench (it holds {entries}); "
                                   f"refusing to replace it with a {kind}: choose a new or empty folder")
    if found != kind:
        raise FolderOwnershipError(f"{folder} holds a workbench {found}, not a {kind}: refusing to replace it")
    if not overwrite:
        raise FolderOwnershipError(f"{folder} already holds a {kind}; pass overwrite=True to replace it")
    return True


def mark_owned(folder: str | os.PathLike, kind: str) -> None:
    """Write the owner marker into ``folder`` (part of writing the artifact)."""
    atomic_write_json(Path(folder) / OWNER_FILE, {"kind": kind, "workbench": __version__})
