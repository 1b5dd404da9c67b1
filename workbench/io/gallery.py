"""The figure gallery: ``figures/index.html`` from every manifest under ``figures/`` (smoke runs: their own)."""

from __future__ import annotations

import html as _html
import json
import os
from pathlib import Path

from workbench.io.atomic import atomic_write_bytes
from workbench.io.manifest import read_manifest
from workbench.io.provenance import now

_GALLERY_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.fig { display: flex; gap: 1.5em; margin: 1em 0 2em; }
.fig img { width: 420px; border: 1px solid #ddd; }
.fig .noimg { width: 420px; height: 120px; border: 1px dashed #bbb; color: #888; display: flex;
              align-items: center; justify-content: center; }
table { border-collapse: collapse; font-size: 0.85em; } td { padding: 1px 8px 1px 0; vertical-align: top; }
code, pre { font-size: 0.85em; } pre { white-space: pre-wrap; margin: 0; }
.warn { color: #b00; }
"""


def write_gallery(figures_dir: str | os.PathLike, *, smoke: bool = False) -> Path:
    """Write a simple HTML gallery of every figure recorded under ``figures_dir`` and return its path.

    Real runs: ``<figures_dir>/index.html`` from ``<figures_dir>/*/manifest.json`` and the parameter-setting
    subfolders ``<figures_dir>/*/*/manifest.json``. Smoke runs:
    ``<figures_dir>/_smoke/index.html`` from ``<figures_dir>/*/_smoke/manifest.json`` (git-ignored).
    """
    root = Path(figures_dir)
    index = root / "_smoke" / "index.html" if smoke else root / "index.html"
    pattern = "_smoke/manifest.json" if smoke else "manifest.json"
    manifests = sorted(root.glob(f"*/{pattern}")) + sorted(  # default settings, then parameter-setting subfolders
        m for m in root.glob(f"*/*/{pattern}") if smoke or m.parent.name != "_smoke")
    e = _html.escape

    def rel(p: Path) -> str:
        return os.path.relpath(p, index.parent).replace(os.sep, "/")

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>workbench figures</title>",
        f"<style>{_GALLERY_CSS}</style></head><body>",
        f"<h1>workbench figures{' (smoke run)' if smoke else ''}</h1>",
        f"<p>Generated {e(now())}. Each figure links its interactive HTML, PNG, SVG, the executed notebook "
        "that made it and its provenance record.</p>",
    ]
    if not manifests:
        parts.append("<p>No figures yet. Run <code>workbench run</code>.</p>")
    for m in manifests:
        folder = m.parent
        try:
            records = read_manifest(m)["records"]
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            parts.append(f"<h2>{e(str(folder.relative_to(root)))}</h2><p class='warn'>unreadable manifest: "
                         f"{e(str(err))}</p>")
            continue
        title = folder.parent.name if smoke else folder.name
        parts.append(f"<h2>{e(title)}</h2>")
        nb_files = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
        if nb_files:
            parts.append("<p>Executed notebook: " + ", ".join(
                f"<a href='{e(rel(p))}'>{e(p.name)}</a>" for p in nb_files) + "</p>")
        for key, r in sorted(records.items(), key=lambda kv: (kv[1].get("kind") != "figure", kv[0])):
            files = r.get("files", {})
            links = " · ".join(f"<a href='{e(rel(folder / f))}'>{e(Path(f).suffix.lstrip('.'))}</a>"
                               for f in sorted(files))
            png = next((f for f in files if f.endswith(".png")), None)
            html_file = next((f for f in files if f.endswith(".html")), None)
            if r.get("kind") == "figure":
                thumb = (f"<a href='{e(rel(folder / (html_file or png)))}'><img src='{e(rel(folder / png))}' "
                         f"alt='{e(key)}'></a>") if png else "<div class='noimg'>no PNG</div>"
            else:
                thumb = "<div class='noimg'>table</div>"
            git = r.get("git") or {}
            model = r.get("model") or {}
            static = r.get("static_export")
            rows = [
                ("files", links),
                ("notebook", e(str(r.get("notebook")))),
                ("model", e(f"{model.get('name')} (weights sha256 {str(model.get('weights_sha256'))[:12]})")
                 if model else "-"),
                ("commit", e(f"{str(git.get('commit'))[:12]}{' (dirty)' if git.get('dirty') else ''}")),
                ("seed", e(str(r.get("seed")))),
                ("wall time", e(f"{r.get('wall_time_s')} s")),
                ("written", e(str(r.get("timestamp")))),
            ]
            if static is not None:
                cls = "" if static == "ok" else " class='warn'"
                rows.append(("static export", f"<span{cls}>{e(static)}</span>"))
            if r.get("status") is not None:
                run = r.get("run") or {}
                cls = "" if r["status"] == "ok" else " class='warn'"
                detail = f"; run {run.get('wall_time_s')} s" if run.get("wall_time_s") is not None else ""
                err = f": {run.get('error')}" if run.get("error") else ""
                rows.append(("run status", f"<span{cls}>{e(r['status'] + err + detail)}</span>"))
            rows.append(("parameters", f"<pre>{e(json.dumps(r.get('params', {}), indent=1, default=str))}</pre>"))
            table = "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows)
            parts.append(f"<div class='fig'>{thumb}<div><b>{e(key)}</b><table>{table}</table>"
                         f"<p>provenance: <a href='{e(rel(m))}'>{e(m.name)}</a></p></div></div>")
    parts.append("</body></html>")
    atomic_write_bytes(index, ("\n".join(parts) + "\n").encode())
    return index


