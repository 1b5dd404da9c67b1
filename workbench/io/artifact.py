"""Artifact folders: the one way a folder of tensors + card (a probe, a tuned lens, an SAE, or a kind a user adds)
is claimed, written and read back.

    KIND = register_kind(ArtifactKind("probe", card_file="card.json", signature=("card.json",), label="probe"))
    card = write_artifact(folder, KIND, card, files={"probe.safetensors": data}, overwrite=False)
    card = read_artifact(folder, KIND)     # the card, after every file it records matched its sha256

Writing (:func:`write_artifact`), one scheme for every kind:

1. claim: the folder must be new or empty, or (``overwrite=True``) a folder this package wrote for the same kind
   (:func:`workbench.io.owned.claim_folder`; folders written before owner markers are recognised by the kind's
   ``signature`` files). Anything else is refused untouched, before anything is written.
2. stage: the files are written into a temporary sibling ``.tmp-<kind>-<random>`` (bytes, or a ``fill`` function
   that writes files itself, e.g. sae-lens's ``save_inference_model``).
3. card: the card gets ``files`` (the sha256 of every file staged), ``versions`` (:func:`package_versions`) and
   ``created_at`` (:func:`now`) unless given, and is written last, then the owner marker; every file gets the
   usual permissions.
4. swap: the staged folder replaces the final one by renames (an old folder is moved aside first and deleted
   after), so the folder is complete under its name or absent; a crash leaves only a ``.tmp-*`` sibling, which
   ``workbench doctor`` reports.

Reading (:func:`read_artifact`): the card is read by :func:`read_card` (the one card-JSON reader: a missing file,
invalid JSON or anything but a JSON object is an error naming the file), every file the card records must be a
plain name inside the folder and match its sha256 (cheap: a file unchanged in size and mtime since it was last
hashed is not read again; ``full=True`` re-hashes). Every failure is an :class:`ArtifactError` (a ``ValueError``),
or the subclass the caller names (``SAEError``, ``TunedLensError``).

Kinds register themselves (:func:`register_kind`) where they are defined; ``workbench doctor`` iterates
:data:`KINDS` and knows no format of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from workbench.io.atomic import IntegrityError, atomic_write_json, sha256_file, usual_permissions, verify_files
from workbench.io.owned import OWNER_FILE, claim_folder, folder_kind, mark_owned
from workbench.io.provenance import json_roundtrip, now, package_versions


class ArtifactError(ValueError):
    """An artifact folder that cannot be read back as what it claims to be: missing, damaged, edited, foreign."""


def read_card(path: str | os.PathLike, *, error: type[ArtifactError] = ArtifactError) -> dict:
    """The JSON object in the card file ``path``; ``error`` (an :class:`ArtifactError`) naming the file when it is
    missing, not valid JSON, or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {path.name} in {path.parent}: not an artifact folder, or an incomplete one")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); the folder is damaged") from None
    if not isinstance(obj, dict):
        raise error(f"{path} holds a JSON {type(obj).__name__}, not an object; the folder is damaged")
    return obj


def _files_of(card: dict) -> dict:
    files = card.get("files")
    return dict(files) if isinstance(files, dict) else {}


@dataclass(frozen=True)
class ArtifactKind:
    """What the package needs to know about one kind of artifact folder.

    name: the owner marker's kind (``"probe"``, ``"sae"``, ``"tuned-lens"``). card_file: the card's file name.
    signature: files that mark a folder of this kind written before owner markers existed (or by another tool).
    recorded: card -> ``{file name: sha256}`` of the files the card vouches for (default: its ``files``; a kind
        whose older cards record hashes under other keys maps them here).
    required: files every card must record (a card that leaves one out is refused).
    card_optional: a folder of this kind may come from elsewhere without our card (SAELens folders); it is then
        read without a hash check.
    check: ``check(folder)`` the kind's own deeper check (tensor shapes against the card, ...), raising a
        ``ValueError``; ``workbench doctor`` runs it after the hashes.
    label: how ``workbench doctor`` names the kind.
    """

    name: str
    card_file: str
    signature: tuple[str, ...]
    recorded: Callable[[dict], dict] = _files_of
    required: tuple[str, ...] = ()
    card_optional: bool = False
    check: Callable[[Path], object] | None = None
    label: str = ""

    def is_legacy(self, folder: Path) -> bool:
        """A folder of this kind without an owner marker: all its signature files are there."""
        return all((Path(folder) / f).is_file() for f in self.signature)


KINDS: dict[str, ArtifactKind] = {}


def register_kind(kind: ArtifactKind) -> ArtifactKind:
    """Make ``kind`` known to :func:`kind_of` and ``workbench doctor``; returns it."""
    if not isinstance(kind, ArtifactKind) or not kind.name or not kind.signature:
        raise ValueError(f"register_kind takes an ArtifactKind with a name and signature files, got {kind!r}")
    KINDS[kind.name] = kind
    return kind


def kind_of(folder: str | os.PathLike) -> ArtifactKind | None:
    """The registered kind of ``folder``: the one its owner marker names, else (no marker) the kind whose signature
    files it holds (the most specific signature wins), else None."""
    folder = Path(folder)
    if (folder / OWNER_FILE).is_file():
        return KINDS.get(folder_kind(folder) or "")
    matches = [k for k in KINDS.values() if k.is_legacy(folder)]
    return max(matches, key=lambda k: len(k.signature)) if matches else None


def recorded_files(kind: ArtifactKind, card: dict, *, error: type[ArtifactError] = ArtifactError,
                   where: str = "the card") -> dict[str, str]:
    """``{name: sha256}`` the card records, checked: every name a plain file name inside the folder, every hash a
    string, every ``kind.required`` file present."""
    recorded = kind.recorded(card)
    missing = [n for n in kind.required if not isinstance(recorded.get(n), str)]
    if missing or not recorded:
        raise error(f"{where} records no sha256 of {missing or 'any file'}: a card must cover the {kind.name}'s "
                    "files; refusing to load an unchecked artifact")
    for name, digest in recorded.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise error(f"{where} names {name!r}: it must be a file name inside the artifact's folder")
        if not isinstance(digest, str):
            raise error(f"{where} records no sha256 of {name!r} (got {digest!r})")
    return recorded


def read_artifact(folder: str | os.PathLike, kind: ArtifactKind, *, full: bool = False,
                  error: type[ArtifactError] = ArtifactError) -> dict:
    """The card of the ``kind`` folder, after every file it records matched its sha256; ``{}`` for a folder of a
    ``card_optional`` kind that has no card. Raises ``error`` (an :class:`ArtifactError`) naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"no {kind.name} folder at {str(folder)!r}")
    path = folder / kind.card_file
    if kind.card_optional and not path.exists():
        return {}
    card = read_card(path, error=error)
    recorded = recorded_files(kind, card, error=error, where=str(path))
    try:
        verify_files(folder, recorded, full=full)
    except IntegrityError as e:
        raise error(f"refusing the {kind.name} in {folder}: {e}") from None
    return card


def write_artifact(
    folder: str | os.PathLike,
    kind: ArtifactKind,
    card: Mapping,
    *,
    files: Mapping[str, bytes] | None = None,
    fill: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a ``kind`` folder by the one scheme (claim, stage, card last, swap; see the module docstring); return
    the card as written (with ``files``, ``versions`` and ``created_at``). ``files``: ``{name: bytes}``; ``fill``:
    a function that writes more files into the staging folder it is given."""
    folder = Path(folder).expanduser()
    claim_folder(folder, kind.name, overwrite=overwrite, legacy=kind.is_legacy)
    for name in files or {}:
        if Path(name).name != name or name in ("", ".", "..", kind.card_file, OWNER_FILE):
            raise ValueError(f"artifact file name {name!r} must be a plain file name other than the card's")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".tmp-{kind.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name, data in (files or {}).items():
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if fill is not None:
            fill(staging)
        hashes = {p.name: sha256_file(p) for p in sorted(staging.iterdir())
                  if p.is_file() and p.name not in (kind.card_file, OWNER_FILE)}
        out = dict(card)
        out.setdefault("versions", package_versions())
        out.setdefault("created_at", now())
        out["files"] = hashes
        out = json_roundtrip(out, strict=False)
        atomic_write_json(staging / kind.card_file, out)
        mark_owned(staging, kind.name)
        usual_permissions(staging)
        old = None
        if folder.exists():
            old = folder.parent / f".tmp-{kind.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
        os.replace(staging, folder)
        staging = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out


__all__ = ["KINDS", "ArtifactError", "ArtifactKind", "kind_of", "read_artifact", "read_card", "recorded_files",
           "register_kind", "write_artifact"]
