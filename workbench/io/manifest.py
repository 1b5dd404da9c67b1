"""The manifest of a figure folder: ``<out_dir>/manifest.json``, one record per figure or table, keyed by name.

Rule: **the manifest lives in the figure's own folder**. A notebook's figures, its executed copy and its manifest
sit together in ``figures/<notebook stem>/``; smoke runs keep their own manifest; two notebooks never contend for
one file. Every update happens under ``<out_dir>/.manifest.json.lock`` and is written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from workbench.io.atomic import atomic_write_json, file_lock
from workbench.io.provenance import jsonable

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1


def manifest_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / MANIFEST_NAME


@contextlib.contextmanager
def manifest_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Held while a figure's files and its record are replaced together."""
    with file_lock(Path(out_dir) / f".{MANIFEST_NAME}.lock"):
        yield


def read_manifest(out_dir_or_file: str | os.PathLike) -> dict:
    """The manifest of a figure folder (or the manifest file itself); an empty one if none exists yet."""
    p = Path(out_dir_or_file)
    p = p if p.suffix == ".json" else manifest_path(p)
    if not p.exists():
        return {"schema": MANIFEST_SCHEMA, "records": {}}
    data = json.loads(p.read_text())
    data.setdefault("records", {})
    return data


def _refuse_mixing(data: dict, folder: Path, key: str, record: dict) -> None:
    smoke = (record.get("params") or {}).get("smoke")
    if not isinstance(smoke, bool):
        return
    other = sorted(k for k, r in data["records"].items()
                   if isinstance((r.get("params") or {}).get("smoke"), bool) and r["params"]["smoke"] != smoke)
    if other:
        kind = "a smoke" if smoke else "a full-size"
        raise ValueError(f"refusing to write {kind} record {key!r} into {folder}: its manifest holds "
                         f"{'full-size' if smoke else 'smoke'} records ({other[:3]}); smoke runs write into "
                         "<output_dir>/_smoke/ (workbench.io.paths.run_output_dir)")


def check_record(out_dir: str | os.PathLike, key: str, record: dict) -> None:
    """Raise before anything is written if ``record`` may not join the manifest of ``out_dir``: a folder never
    mixes smoke and full-size records (``params["smoke"]``). The caller holds :func:`manifest_lock`."""
    path = manifest_path(out_dir)
    try:
        data = read_manifest(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # update_manifest sets a broken manifest aside
    _refuse_mixing(data, path.parent, key, record)


def update_manifest(out_dir: str | os.PathLike, key: str, record: dict) -> None:
    """Replace ``key`` in the manifest. The caller holds :func:`manifest_lock`."""
    path = manifest_path(out_dir)
    try:
        data = read_manifest(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        warnings.warn(f"manifest {path} was not valid JSON ({e}); moved it to {aside.name} and started a new one",
                      stacklevel=3)
        data = {"schema": MANIFEST_SCHEMA, "records": {}}
    _refuse_mixing(data, path.parent, key, record)
    data["schema"] = MANIFEST_SCHEMA
    data["records"][key] = record
    data["updated"] = record["timestamp"]
    atomic_write_json(path, data)


def annotate_records(out_dir: str | os.PathLike, names, fields: dict) -> None:
    """Add ``fields`` to the manifest records ``names`` of ``out_dir`` (under the manifest lock); the notebook
    runner stamps every record a run wrote with that run's ``status`` and ``run`` details."""
    out_dir = Path(out_dir)
    with manifest_lock(out_dir):
        data = read_manifest(out_dir)
        missing = [n for n in names if n not in data["records"]]
        if missing:
            raise KeyError(f"no manifest record(s) {missing} in {manifest_path(out_dir)}")
        for n in names:
            data["records"][n].update(jsonable(fields))
        atomic_write_json(manifest_path(out_dir), data)
