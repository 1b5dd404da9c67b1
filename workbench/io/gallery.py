"""The figure gallery: ``figures/index.html`` from every manifest under ``figures/`` (smoke runs: their own).

One section per figure folder, and in it one block per notebook run (records stamped with the same run, commit and
notebook): the run's status, notebook, model, commit and parameters once, then its figures as a grid of thumbnails
and its tables as a few preview rows. A figure whose parameters differ from the rest of its run lists only the
differences.
"""

from __future__ import annotations

import csv
import html as _html
import json
import os
from pathlib import Path

from workbench.io.atomic import atomic_write_bytes
from workbench.io.manifest import read_manifest
from workbench.io.provenance import now

PREVIEW_ROWS = 5  # rows of a table shown in the gallery
PREVIEW_COLUMNS = 8  # columns shown; the rest are counted
PREVIEW_CHARS = 40  # a longer cell is cut

_GALLERY_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2.2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin: 1.2em 0 0.4em; }
.run { margin: 0.6em 0 1.2em; }
.meta { font-size: 0.85em; margin: 0.3em 0; } .meta td { padding: 1px 10px 1px 0; vertical-align: top; }
.params { font-size: 0.8em; border-collapse: collapse; margin: 0.3em 0 0.8em; }
.params td { padding: 1px 10px 1px 0; vertical-align: top; } .params code { word-break: break-word; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1.2em; }
.card { border: 1px solid #ddd; padding: 0.5em; font-size: 0.85em; }
.card img { width: 100%; height: 200px; object-fit: contain; display: block; }
.card .noimg { height: 200px; border: 1px dashed #bbb; color: #888; display: flex; align-items: center;
               justify-content: center; }
.card .name { font-weight: bold; margin-top: 0.4em; }
.tables { display: flex; flex-direction: column; gap: 1em; margin-top: 1.2em; }
.table { font-size: 0.8em; overflow-x: auto; }
.table table { border-collapse: collapse; } .table th, .table td { border: 1px solid #ddd; padding: 2px 6px; }
.table th { background: #f4f4f4; text-align: left; } .table td { font-family: monospace; white-space: nowrap; }
.warn { color: #b00; } .dim { color: #777; }
"""


def _run_key(record: dict) -> str:
    """Records of one notebook run: the same run stamp, commit and notebook."""
    return json.dumps([record.get("run"), (record.get("git") or {}).get("commit"), record.get("notebook")],
                      sort_keys=True, default=str)


def _common_params(records: list[dict]) -> dict:
    """The parameters every record of a run shares (in the first record's order)."""
    dicts = [r.get("params") or {} for r in records]
    first = dicts[0] if dicts else {}
    return {k: v for k, v in first.items() if all(k in d and d[k] == v for d in dicts[1:])}


def _value(v) -> str:
    return json.dumps(v, default=str, ensure_ascii=False)


def _params_table(params: dict, e) -> str:
    if not params:
        return "<p class='meta dim'>no parameters recorded</p>"
    rows = "".join(f"<tr><td><b>{e(str(k))}</b></td><td><code>{e(_value(v))}</code></td></tr>"
                   for k, v in params.items())
    return f"<table class='params'>{rows}</table>"


def _cut(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def _table_preview(path: Path, shape, e) -> str:
    """The header and first rows of a CSV as an HTML table, with its size."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            rows = [row for _, row in zip(range(PREVIEW_ROWS + 1), reader)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return f"<p class='warn'>cannot read {e(path.name)}: {e(str(err))}</p>"
    if not rows:
        return "<p class='dim'>empty file</p>"
    header, body = rows[0], rows[1:]
    n_cols = len(header)
    more = n_cols - PREVIEW_COLUMNS
    head = "".join(f"<th>{e(_cut(c))}</th>" for c in header[:PREVIEW_COLUMNS])
    if more > 0:
        head += f"<th class='dim'>+{more} columns</th>"
    lines = []
    for row in body:
        cells = "".join(f"<td>{e(_cut(c))}</td>" for c in row[:PREVIEW_COLUMNS])
        lines.append(f"<tr>{cells}{'<td></td>' if more > 0 else ''}</tr>")
    if isinstance(shape, (list, tuple)) and len(shape) == 2:
        size = f"{shape[0]} rows × {shape[1]} columns"
    else:
        size = f"{n_cols} columns"
    shown = f", first {len(body)} shown" if body else ", no rows"
    return f"<p class='dim'>{e(size + shown)}</p><table><tr>{head}</tr>{''.join(lines)}</table>"


def _run_section(records: list[tuple[str, dict]], folder: Path, manifest: Path, rel, e) -> list[str]:
    """The block of one notebook run: what it shares once, then a grid of figures and the table previews."""
    recs = [r for _, r in records]
    first = recs[0]
    run = first.get("run") or {}
    git = first.get("git") or {}
    meta = []
    nb = run.get("executed_notebook")
    nb_files = [folder / nb] if nb and (folder / nb).is_file() else sorted(
        p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if nb_files:
        meta.append(("executed notebook", ", ".join(f"<a href='{e(rel(p))}'>{e(p.name)}</a>" for p in nb_files)))
    elif first.get("notebook"):
        meta.append(("notebook", e(str(first["notebook"]))))
    status = first.get("status")
    if status is not None:
        cls = "" if status == "ok" else " class='warn'"
        detail = f", {run['wall_time_s']:.1f} s" if isinstance(run.get("wall_time_s"), (int, float)) else ""
        err = f": {run['error']}" if run.get("error") else ""
        meta.append(("run status", f"<span{cls}>{e(status + err + detail)}</span>"))
    models = {}
    for r in recs:
        m = r.get("model") or {}
        if m.get("name"):
            sha = m.get("weights_sha256")
            models[m["name"]] = f"{m['name']}" + (f" (weights sha256 {str(sha)[:12]})" if sha else "")
    if models:
        meta.append(("model", e(", ".join(models.values()))))
    seeds = sorted({str(r.get("seed")) for r in recs if r.get("seed") is not None})
    if seeds:
        meta.append(("seed", e(", ".join(seeds))))
    if git.get("commit"):
        meta.append(("commit", e(f"{str(git['commit'])[:12]}{' (dirty)' if git.get('dirty') else ''}")))
    walls = {r.get("wall_time_s") for r in recs if isinstance(r.get("wall_time_s"), (int, float))}
    shared_wall = len(walls) == 1 and all(isinstance(r.get("wall_time_s"), (int, float)) for r in recs)
    if shared_wall:  # the notebook passed one wall time (its study's) to every record: say it once
        meta.append(("wall time", e(f"{walls.pop():.1f} s (the computation behind these figures)")))
    stamps = sorted(str(r["timestamp"]) for r in recs if r.get("timestamp"))
    if stamps:
        meta.append(("written", e(stamps[-1])))
    meta.append(("provenance", f"<a href='{e(rel(manifest))}'>{e(manifest.name)}</a> (every record in full)"))
    common = _common_params(recs)
    out = ["<div class='run'><table class='meta'>"
           + "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in meta) + "</table>",
           "<div class='meta'><b>parameters</b></div>", _params_table(common, e)]

    def extra(r: dict) -> str:
        diff = {k: v for k, v in (r.get("params") or {}).items() if k not in common}
        return "".join(f"<div><b>{e(str(k))}</b> <code>{e(_cut(_value(v)))}</code></div>" for k, v in diff.items())

    def links(files: dict) -> str:
        return " · ".join(f"<a href='{e(rel(folder / f))}'>{e(Path(f).suffix.lstrip('.'))}</a>" for f in sorted(files))

    figures = [(k, r) for k, r in records if r.get("kind") == "figure"]
    tables = [(k, r) for k, r in records if r.get("kind") != "figure"]
    if figures:
        out.append("<div class='grid'>")
        for key, r in figures:
            files = r.get("files", {})
            png = next((f for f in files if f.endswith(".png")), None)
            html_file = next((f for f in files if f.endswith(".html")), None)
            thumb = (f"<a href='{e(rel(folder / (html_file or png)))}'><img src='{e(rel(folder / png))}' "
                     f"alt='{e(key)}' loading='lazy'></a>") if png else "<div class='noimg'>no PNG</div>"
            notes = []
            if not shared_wall and isinstance(r.get("wall_time_s"), (int, float)):
                notes.append(f"wall time {r['wall_time_s']:.1f} s")
            static = r.get("static_export")
            note = "".join(f"<div class='dim'>{e(n)}</div>" for n in notes)
            if static is not None and static != "ok":
                note += f"<div class='warn'>static export {e(static)}</div>"
            out.append(f"<div class='card'>{thumb}<div class='name'>{e(key)}</div><div>{links(files)}</div>"
                       f"{note}{extra(r)}</div>")
        out.append("</div>")
    if tables:
        out.append("<div class='tables'>")
        for key, r in tables:
            files = r.get("files", {})
            csv_file = next((f for f in files if f.endswith(".csv")), None)
            preview = (_table_preview(folder / csv_file, r.get("shape"), e) if csv_file
                       else "<p class='dim'>no CSV recorded</p>")
            out.append(f"<div class='table'><div class='name'><b>{e(key)}</b> ({links(files)})</div>{extra(r)}"
                       f"{preview}</div>")
        out.append("</div>")
    out.append("</div>")
    return out


def write_gallery(figures_dir: str | os.PathLike, *, smoke: bool = False) -> Path:
    """Write an HTML gallery of every figure and table recorded under ``figures_dir`` and return its path.

    Real runs: ``<figures_dir>/index.html`` from ``<figures_dir>/*/manifest.json`` and the parameter-setting
    subfolders ``<figures_dir>/*/*/manifest.json``. Smoke runs:
    ``<figures_dir>/_smoke/index.html`` from ``<figures_dir>/*/_smoke/manifest.json`` (git-ignored).
    """
    root = Path(figures_dir)
    index = root / "_smoke" / "index.html" if smoke else root / "index.html"
    pattern = "_smoke/manifest.json" if smoke else "manifest.json"
    manifests = sorted(root.glob(f"*/{pattern}")) + sorted(  # default settings, then parameter-setting subfolders
        m for m in root.glob(f"*/*/{pattern}") if smoke or m.parent.name != "_smoke")
    manifests.sort(key=lambda m: (m.relative_to(root).parts[0], len(m.parts), m))  # each notebook's folders together
    e = _html.escape

    def rel(p: Path) -> str:
        return os.path.relpath(p, index.parent).replace(os.sep, "/")

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>workbench figures</title>",
        f"<style>{_GALLERY_CSS}</style></head><body>",
        f"<h1>workbench figures{' (smoke run)' if smoke else ''}</h1>",
        f"<p>Generated {e(now())}. One section per figure folder, one block per notebook run: its parameters and "
        "provenance once, its figures (click for the interactive HTML) and the first rows of its tables. Each "
        "folder's <code>manifest.json</code> holds every record in full.</p>",
    ]
    if not manifests:
        parts.append("<p>No figures yet. Run <code>workbench run</code>.</p>")
    for m in manifests:
        folder = m.parent
        title = str((folder.parent if smoke else folder).relative_to(root)).replace(os.sep, "/")
        try:
            records = read_manifest(m)["records"]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            parts.append(f"<h2>{e(title)}</h2><p class='warn'>unreadable manifest: {e(str(err))}</p>")
            continue
        parts.append(f"<h2>{e(title)}</h2>")
        runs: dict[str, list[tuple[str, dict]]] = {}
        for key, r in sorted(records.items()):
            runs.setdefault(_run_key(r), []).append((key, r))
        ordered = sorted(runs.values(), key=lambda rs: max(str(r.get("timestamp")) for _, r in rs), reverse=True)
        for i, recs in enumerate(ordered):
            if len(ordered) > 1:
                parts.append(f"<h3>run {i + 1} of {len(ordered)}{' (latest)' if i == 0 else ''}</h3>")
            parts.extend(_run_section(recs, folder, m, rel, e))
    parts.append("</body></html>")
    atomic_write_bytes(index, ("\n".join(parts) + "\n").encode())
    return index
