"""``workbench doctor`` / ``workbench verify``: find every artifact under some folders and say what is wrong with
each. Artifacts: converted models in the cache (their recorded weights files), activation stores, the artifact kinds
registered with :mod:`workbench.io.artifact` (probe, tuned-lens and SAE folders: each checked by its card and the
kind's own check, with no format known here), figure folders (every file their manifest records), counting
checkpoints, and temporaries left by a crash.

``doctor`` is cheap: a file whose size and mtime are unchanged since it was last hashed is not read again.
``verify`` re-hashes every byte. Neither changes anything.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import workbench.methods.circuits.transcoder  # noqa: F401 - importing a kind's module registers it with io.artifact
import workbench.methods.probes.base  # noqa: F401
import workbench.methods.reasoner  # noqa: F401
import workbench.methods.sae.handle  # noqa: F401
import workbench.methods.tuned_lens  # noqa: F401
from workbench.core.store import FORMAT as STORE_FORMAT
from workbench.core.store import MANIFEST as STORE_MANIFEST
from workbench.core.store import ActivationStore, StoreError
from workbench.io.artifact import ArtifactKind, kind_of, read_artifact, recorded_files
from workbench.io.atomic import COMPLETE_MARKER, IntegrityError, sha256_file, sha256_file_cached, verify_files
from workbench.io.manifest import MANIFEST_NAME
from workbench.io.owned import OWNER_FILE, folder_kind
from workbench.io.paths import cache_root, repo_root


@dataclass
class Finding:
    path: Path
    kind: str
    problem: str | None  # None: fine

    def __str__(self) -> str:
        return f"{'OK ' if self.problem is None else 'BAD'} {self.kind:<20} {self.path}" + (
            f"\n      {self.problem}" if self.problem else "")


def default_roots() -> list[Path]:
    """The user cache, and the checkout's saes/, probes/ and figures/ when the package runs from one."""
    roots = [cache_root()]
    roots += [repo_root() / d for d in ("saes", "probes", "figures") if (repo_root() / d).is_dir()]
    return roots


def _files_ok(folder: Path, files: dict, full: bool) -> str | None:
    try:
        verify_files(folder, files, full=full)
    except IntegrityError as e:
        return str(e)
    private = [n for n in files if (folder / n).is_file() and not (folder / n).stat().st_mode & stat.S_IROTH]
    if private and os.name == "posix":
        return f"files readable by their owner only (mode 0600): {private[:3]}"
    return None


def _artifact_problem(folder: Path, kind: ArtifactKind, full: bool) -> str | None:
    """What is wrong with an artifact folder of a registered kind: its card and the sha256 of every file it records
    (:func:`workbench.io.artifact.read_artifact`), the kind's own deeper check, files readable by their owner only."""
    try:
        card = read_artifact(folder, kind, full=full)
        if not card:  # a kind whose folders may come from elsewhere without our card (SAELens)
            return "no workbench card: its files cannot be checked" if full else None
        if kind.check is not None:
            kind.check(folder)
        files = recorded_files(kind, card)
    except (ValueError, KeyError, OSError) as e:  # ArtifactError, and whatever a damaged file makes a loader raise
        return str(e)
    private = [n for n in files if (folder / n).is_file() and not (folder / n).stat().st_mode & stat.S_IROTH]
    if private and os.name == "posix":
        return f"files readable by their owner only (mode 0600): {private[:3]}"
    return None


def _check(folder: Path, full: bool) -> Finding | None:
    names = {p.name for p in folder.iterdir()}
    if COMPLETE_MARKER in names:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
        if "weights_files" in marker:
            return Finding(folder, "converted model", _files_ok(folder, marker["weights_files"], full))
        return Finding(folder, "cache folder", None)
    if STORE_MANIFEST in names and json.loads((folder / STORE_MANIFEST).read_text()).get("format") == STORE_FORMAT:
        try:
            store = ActivationStore(folder, allow_partial=True)
            if full:
                store.verify()
            status = store.manifest.get("status")
            return Finding(folder, "activation store", None if status == "complete" else
                           f"incomplete (status {status!r}): run the harvest again to resume it")
        except (StoreError, FileNotFoundError) as e:
            return Finding(folder, "activation store", str(e))
    kind = kind_of(folder)
    if kind is not None:
        return Finding(folder, kind.label or kind.name, _artifact_problem(folder, kind, full))
    if MANIFEST_NAME in names:
        try:
            records = json.loads((folder / MANIFEST_NAME).read_text()).get("records", {})
        except ValueError as e:
            return Finding(folder, "figure folder", f"{MANIFEST_NAME} is not valid JSON: {e}")
        bad = []
        for key, rec in records.items():
            for fname, info in rec.get("files", {}).items():
                f = folder / fname
                if not f.is_file():
                    bad.append(f"{fname} (record {key}): missing")
                elif (sha256_file(f) if full else sha256_file_cached(f)) != info.get("sha256"):
                    bad.append(f"{fname} (record {key}): sha256 differs from the manifest's")
        return Finding(folder, "figure folder", "; ".join(bad[:5]) or None)
    if OWNER_FILE in names:
        return Finding(folder, folder_kind(folder) or "workbench folder", None)
    return None


def doctor(roots: Iterable[str | os.PathLike] | None = None, *, full: bool = False) -> list[Finding]:
    """Every artifact under ``roots`` (default :func:`default_roots`) with what is wrong with it (``None``: fine),
    and every temporary a crash left behind. ``full``: re-hash every byte."""
    findings = []
    for root in [Path(r).expanduser() for r in (roots or default_roots())]:
        if not root.exists():
            findings.append(Finding(root, "path", "does not exist"))
            continue
        for folder, dirs, files in os.walk(root):
            folder = Path(folder)
            dirs[:] = sorted(d for d in dirs if d not in (".git", "__pycache__", ".ipynb_checkpoints"))
            for name in files + dirs:
                if name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp")):
                    findings.append(Finding(folder / name, "temporary", "left by an interrupted write; delete it"))
            found = _check(folder, full)
            if found is not None:
                findings.append(found)
    return findings
