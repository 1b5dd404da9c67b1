"""Resumable runs: a folder of finished units, refused when it belongs to another run.

    store = UnitCheckpoint(folder, spec={"config": ..., "weights": model.weights_hash}, kind="patching-checkpoint")
    unit = store.load("pair-00003")          # None when that unit has not finished (or its file is damaged)
    store.save("pair-00003", {"scores": [...]})

``spec`` (anything JSON can hold) is written once as ``spec.json``, with the fingerprint of the workbench code that
wrote it (:func:`~workbench.io.provenance.code_fingerprint`); opening the folder again with another spec, or from
other code, raises, so a resume can only ever continue the same run of the same code. Units are JSON files written atomically; the folder is marked as
owned (``kind``), so a checkpoint is never opened inside a folder the workbench did not create.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.io.atomic import atomic_write_json
from workbench.io.owned import FolderOwnershipError, claim_folder, folder_kind, mark_owned
from workbench.io.paths import safe_segment
from workbench.io.provenance import code_fingerprint, json_roundtrip

SPEC_FILE = "spec.json"


class UnitCheckpoint:
    """One JSON file per finished unit in ``folder``; ``spec`` must match the folder's or the folder is refused."""

    def __init__(self, folder: str | Path, spec: dict, *, kind: str):
        self.folder, self.kind = Path(folder), kind
        self.spec = json_roundtrip({"spec": spec, "code_sha256": code_fingerprint()}, strict=False)
        spec_file = self.folder / SPEC_FILE
        if spec_file.is_file():
            if folder_kind(self.folder) != kind:
                raise FolderOwnershipError(f"{self.folder} is not a workbench {kind}")
            saved = json.loads(spec_file.read_text())
            if saved != self.spec:
                what = ("other workbench code: its units would mix two versions of the computation"
                        if isinstance(saved, dict) and saved.get("spec") == self.spec["spec"]
                        else "other config, inputs or weights")
                raise ValueError(f"the checkpoint in {self.folder} belongs to another study or another run ({what}); choose another "
                                 "checkpoint folder or delete this one")
        else:
            claim_folder(self.folder, kind, overwrite=False)
            self.folder.mkdir(parents=True, exist_ok=True)
            mark_owned(self.folder, kind)
            atomic_write_json(spec_file, self.spec)

    def path(self, unit: str, suffix: str = ".json") -> Path:
        return self.folder / f"unit-{safe_segment(unit)}{suffix}"

    def load(self, unit: str) -> dict | None:
        """The saved unit, or None when it is missing or unreadable (it then runs again)."""
        path = self.path(unit)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def save(self, unit: str, data: dict) -> None:
        atomic_write_json(self.path(unit), data)
