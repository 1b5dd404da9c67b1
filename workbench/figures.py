"""Saving paper figures with provenance: one theme, self-contained HTML, PNG/SVG via kaleido, a manifest.

Where files go
    ``save_figure(fig, name, out_dir)`` writes ``<out_dir>/<name>.html`` (plotly.js inlined, no CDN),
    ``<out_dir>/<name>.png`` and ``<out_dir>/<name>.svg``, and records the figure in the manifest
    ``<out_dir>/manifest.json`` (rule: **the manifest lives in the figure's own folder**, keyed by figure name).
    A notebook's figures, its executed copy and its manifest therefore sit together in ``figures/<notebook stem>/``,
    smoke runs (``figures/<stem>/_smoke/``) keep their own manifest, and two notebooks never contend for one file.
    :func:`write_gallery` builds ``figures/index.html`` from every ``figures/*/manifest.json``.

Static export (PNG/SVG)
    plotly 7 exports through kaleido 1.x, which drives a Chrome/Chromium over choreographer. The browser is chosen
    by :func:`find_browser`: ``$BROWSER_PATH`` if set (choreographer's own override variable; an invalid value is
    an error, not a fallback), else ``/usr/bin/chromium`` (Debian's ``apt-get install -y chromium``), else other
    Chrome/Chromium names on ``PATH``, else a Chrome downloaded by ``plotly_get_chrome``. The chosen path is passed
    to kaleido explicitly and recorded in the manifest. MathJax is disabled and the plotly.js bundled with plotly
    is used, so export needs no network. Without a browser the HTML is still written, a warning is emitted and the
    manifest says ``static_export: "unavailable: <reason>"``; an export that starts but fails records
    ``"failed: <reason>"`` (also with a warning). Set ``WORKBENCH_REQUIRE_STATIC=1`` to make both an error.

Every write is atomic (temporary sibling + rename) and the files and manifest of one figure are replaced together
under a file lock (``<out_dir>/.manifest.json.lock``), so concurrent notebooks never leave a torn manifest.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import html as _html
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from workbench.cache import atomic_write_bytes, atomic_write_json, file_lock, sha256_file

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1
DEFAULT_BROWSER = "/usr/bin/chromium"
BROWSER_ENV = "BROWSER_PATH"  # choreographer's own override variable; honoured here first
REQUIRE_STATIC_ENV = "WORKBENCH_REQUIRE_STATIC"  # "1": a missing browser or failed export raises
NOTEBOOK_ENV = "WORKBENCH_NOTEBOOK"  # set by the notebook runner; the default ``notebook`` of a record
HEADLESS_ENV = "WORKBENCH_HEADLESS"  # set by the notebook runner: explorers render static figures
STATIC_FORMATS = ("png", "svg")
DEFAULT_WIDTH, DEFAULT_HEIGHT = 720, 450  # layout pixels of the static export when the figure sets none
PNG_SCALE = 3  # 720 px layout width -> 2160 px PNG, ~300 dpi at 7 inches
_VERSION_PACKAGES = ("torch", "transformers", "plotly", "kaleido", "choreographer", "numpy", "pandas")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StaticExportError(RuntimeError):
    """PNG/SVG export impossible or failed while ``WORKBENCH_REQUIRE_STATIC=1``."""


# --------------------------------------------------------------------------------------------------------------
# Theme
# --------------------------------------------------------------------------------------------------------------

# Okabe-Ito: distinguishable with the common colour-vision deficiencies and in greyscale print.
PAPER_COLORWAY = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
PAPER_FONT = "Helvetica, Arial, sans-serif"

_axis = dict(
    showline=True, linecolor="#333", linewidth=1, ticks="outside", tickcolor="#333", ticklen=4,
    showgrid=False, zeroline=False, title=dict(font=dict(size=14)), tickfont=dict(size=12), automargin=True,
)

PAPER_TEMPLATE = go.layout.Template(
    layout=dict(
        font=dict(family=PAPER_FONT, size=13, color="#222"),
        title=dict(font=dict(size=15), x=0.0, xanchor="left", xref="paper"),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=PAPER_COLORWAY,
        xaxis=_axis,
        yaxis=_axis | dict(showgrid=True, gridcolor="#e6e6e6", gridwidth=1),
        legend=dict(font=dict(size=12), bgcolor="rgba(255,255,255,0.8)", borderwidth=0),
        margin=dict(l=70, r=30, t=60, b=60),
        hoverlabel=dict(font=dict(family=PAPER_FONT, size=12)),
        annotationdefaults=dict(font=dict(size=13)),
        colorscale=dict(sequential="Viridis"),
    ),
    data=dict(
        heatmap=[go.Heatmap(colorscale="Viridis", colorbar=dict(outlinewidth=0, ticks="outside", thickness=14))],
        scatter=[go.Scatter(line=dict(width=1.75))],
    ),
)
pio.templates["workbench_paper"] = PAPER_TEMPLATE


def apply_theme(fig: go.Figure) -> go.Figure:
    """Give ``fig`` the shared paper theme (``pio.templates["workbench_paper"]``); returns the same figure."""
    if not isinstance(fig, go.Figure):
        raise TypeError(f"apply_theme needs a plotly.graph_objects.Figure, got {type(fig).__name__}")
    fig.update_layout(template=PAPER_TEMPLATE)
    return fig


# --------------------------------------------------------------------------------------------------------------
# Browser and static export
# --------------------------------------------------------------------------------------------------------------

def _is_exe(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def find_browser() -> tuple[str | None, str]:
    """``(path, "")`` of the Chrome/Chromium kaleido should drive, or ``(None, reason)``. See the module doc."""
    env = os.environ.get(BROWSER_ENV)
    if env:
        if _is_exe(env):
            return env, ""
        return None, f"${BROWSER_ENV}={env!r} is not an executable file"
    if _is_exe(DEFAULT_BROWSER):
        return DEFAULT_BROWSER, ""
    for exe in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(exe)
        if found and _is_exe(found):
            return found, ""
    try:  # a Chrome fetched by `plotly_get_chrome` / `choreo_get_chrome`
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
        if found and _is_exe(found):
            return str(found), ""
    except Exception:  # noqa: BLE001 - best effort; the reason below says what to do
        pass
    return None, (
        f"no Chrome/Chromium found ({DEFAULT_BROWSER} missing, none on PATH, ${BROWSER_ENV} unset); "
        "install one with `apt-get install -y chromium` or point $BROWSER_PATH at one"
    )


@functools.lru_cache(maxsize=8)
def browser_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _run_coroutine(make_coro):
    """Run ``make_coro()`` to completion in a fresh event loop on a thread (works inside Jupyter's running loop)."""
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(make_coro())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name="workbench-kaleido", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def export_static(fig: go.Figure, browser: str, formats=STATIC_FORMATS, *, width=None, height=None,
                  png_scale: int = PNG_SCALE) -> dict[str, bytes]:
    """Render ``fig`` to each of ``formats`` with one kaleido browser session; returns ``{format: bytes}``."""
    import kaleido

    fig_dict = fig.to_dict()
    layout = fig_dict.get("layout", {})
    width = width or layout.get("width") or DEFAULT_WIDTH
    height = height or layout.get("height") or DEFAULT_HEIGHT

    async def render():
        out = {}
        async with kaleido.Kaleido(n=1, mathjax=False, path=browser) as k:
            for fmt in formats:
                scale = png_scale if fmt == "png" else 1
                out[fmt] = await k.calc_fig(fig_dict, opts=dict(format=fmt, width=width, height=height, scale=scale))
        return out

    return _run_coroutine(render)


# --------------------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------------------

def repo_root() -> Path:
    """The folder that holds the ``workbench`` package (the repository when run from a checkout)."""
    return Path(__file__).resolve().parent.parent


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


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    from workbench import __version__

    versions["workbench"] = __version__
    return versions


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


def _jsonable(obj):
    """Parameters as JSON: containers kept, numpy scalars unwrapped, anything else by ``str``."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except Exception:  # noqa: BLE001
            pass
    return str(obj)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _public(path: Path) -> None:
    """The usual file permissions: atomic writes create their temporary file 0600, figures should be readable."""
    os.chmod(path, 0o666 & ~_UMASK)


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    _public(path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _display_dir(path: Path) -> str:
    """A path relative to the current directory when inside it (what the notebook passed), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def manifest_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / MANIFEST_NAME


def read_manifest(out_dir_or_file: str | os.PathLike) -> dict:
    """The manifest of a figure folder (or the manifest file itself); an empty one if none exists yet."""
    p = Path(out_dir_or_file)
    p = p if p.suffix == ".json" else manifest_path(p)
    if not p.exists():
        return {"schema": MANIFEST_SCHEMA, "records": {}}
    data = json.loads(p.read_text())
    data.setdefault("records", {})
    return data


def _update_manifest(out_dir: Path, key: str, record: dict) -> None:
    """Replace ``key`` in the manifest. Caller holds the lock."""
    path = manifest_path(out_dir)
    try:
        data = read_manifest(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        warnings.warn(f"manifest {path} was not valid JSON ({e}); moved it to {aside.name} and started a new one",
                      stacklevel=3)
        data = {"schema": MANIFEST_SCHEMA, "records": {}}
    data["schema"] = MANIFEST_SCHEMA
    data["records"][key] = record
    data["updated"] = record["timestamp"]
    atomic_write_json(path, data)
    _public(path)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == Path(MANIFEST_NAME).stem:
        raise ValueError(
            f"figure name {name!r} must be a plain file stem: letters, digits, '.', '_' or '-', not starting with "
            f"a dot, and not {Path(MANIFEST_NAME).stem!r}"
        )
    return name


def _require_static() -> bool:
    return os.environ.get(REQUIRE_STATIC_ENV, "").strip().lower() in {"1", "true", "yes"}


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------

def save_figure(
    fig: go.Figure,
    name: str,
    out_dir: str | os.PathLike,
    *,
    model=None,
    params: dict | None = None,
    seed: int | None = None,
    notebook: str | None = None,
    wall_time_s: float | None = None,
) -> dict:
    """Write ``<out_dir>/<name>.html|.png|.svg`` and record provenance in ``<out_dir>/manifest.json``.

    model: a :class:`workbench.Model` (name and weights hash recorded) or a model name. params: the parameters
    that produced the figure (JSON-able; other values are stored as ``str``). notebook: defaults to
    ``$WORKBENCH_NOTEBOOK`` (set by the notebook runner). Returns the manifest record, which lists every file
    written with its sha256 and says under ``static_export`` whether PNG/SVG were made ("ok", "unavailable: ..."
    or "failed: ..."; the latter two also warn).
    """
    if not isinstance(fig, go.Figure):
        raise TypeError(f"save_figure needs a plotly.graph_objects.Figure, got {type(fig).__name__}")
    _check_name(name)
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameter name -> value, got {type(params).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    payload: dict[str, bytes] = {
        f"{name}.html": fig.to_html(
            include_plotlyjs=True, full_html=True, div_id=f"figure-{name}",
            config={"displaylogo": False, "toImageButtonOptions": {"format": "svg", "filename": name}},
        ).encode()
    }
    browser, reason = find_browser()
    static_started = time.perf_counter()
    if browser is None:
        static = f"unavailable: {reason}"
    else:
        try:
            images = export_static(fig, browser)
            payload.update({f"{name}.{fmt}": data for fmt, data in images.items()})
            static = "ok"
        except Exception as e:  # noqa: BLE001 - reported below, never swallowed
            static = f"failed: {type(e).__name__}: {e}".strip()
    static_s = time.perf_counter() - static_started
    if static != "ok":
        msg = f"figure {name!r}: PNG/SVG not written, {static} (the HTML was written: {out_dir / (name + '.html')})"
        if _require_static():
            raise StaticExportError(msg + f"; ${REQUIRE_STATIC_ENV} is set")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    record = {
        "name": name,
        "kind": "figure",
        "out_dir": _display_dir(out_dir),
        "notebook": notebook or os.environ.get(NOTEBOOK_ENV) or None,
        "model": model_info(model),
        "params": _jsonable(params or {}),
        "seed": seed,
        "wall_time_s": None if wall_time_s is None else round(float(wall_time_s), 3),
        "static_export": static,
        "static_export_s": round(static_s, 3),
        "browser": {"path": browser, "version": browser_version(browser) if browser else None},
        "git": git_info(),
        "versions": package_versions(),
        "python_executable": sys.executable,
        "files": {},
    }
    with file_lock(out_dir / f".{MANIFEST_NAME}.lock"):
        stale = [f"{name}.{fmt}" for fmt in STATIC_FORMATS if f"{name}.{fmt}" not in payload]
        for fname in stale:  # an old PNG/SVG would no longer match the HTML
            (out_dir / fname).unlink(missing_ok=True)
        for fname, data in payload.items():
            _write(out_dir / fname, data)
            record["files"][fname] = {"sha256": sha256_file(out_dir / fname), "bytes": len(data)}
        record["timestamp"] = _now()
        _update_manifest(out_dir, name, record)
    return record


def save_table(
    df,
    name: str,
    out_dir: str | os.PathLike,
    *,
    model=None,
    params: dict | None = None,
    seed: int | None = None,
    notebook: str | None = None,
    wall_time_s: float | None = None,
) -> dict:
    """Write a DataFrame as ``<out_dir>/<name>.csv`` (atomically) and record it in the manifest (``kind: table``)."""
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table needs a pandas DataFrame, got {type(df).__name__}")
    _check_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fname = f"{name}.csv"
    data = df.to_csv(index=False).encode()
    record = {
        "name": name,
        "kind": "table",
        "out_dir": _display_dir(out_dir),
        "notebook": notebook or os.environ.get(NOTEBOOK_ENV) or None,
        "model": model_info(model),
        "params": _jsonable(params or {}),
        "seed": seed,
        "wall_time_s": None if wall_time_s is None else round(float(wall_time_s), 3),
        "shape": list(df.shape),
        "columns": [str(c) for c in df.columns],
        "git": git_info(),
        "versions": package_versions(),
        "python_executable": sys.executable,
        "files": {},
    }
    with file_lock(out_dir / f".{MANIFEST_NAME}.lock"):
        _write(out_dir / fname, data)
        record["files"][fname] = {"sha256": sha256_file(out_dir / fname), "bytes": len(data)}
        record["timestamp"] = _now()
        _update_manifest(out_dir, name, record)
    return record


def annotate_records(out_dir: str | os.PathLike, names, fields: dict) -> None:
    """Add ``fields`` to the manifest records ``names`` of ``out_dir`` (under the manifest lock); the notebook
    runner stamps every record a run wrote with that run's ``status`` and ``run`` details."""
    out_dir = Path(out_dir)
    with file_lock(out_dir / f".{MANIFEST_NAME}.lock"):
        data = read_manifest(out_dir)
        missing = [n for n in names if n not in data["records"]]
        if missing:
            raise KeyError(f"no manifest record(s) {missing} in {manifest_path(out_dir)}")
        for n in names:
            data["records"][n].update(_jsonable(fields))
        atomic_write_json(manifest_path(out_dir), data)
        _public(manifest_path(out_dir))


# --------------------------------------------------------------------------------------------------------------
# Gallery
# --------------------------------------------------------------------------------------------------------------

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
        f"<p>Generated {e(_now())}. Each figure links its interactive HTML, PNG, SVG, the executed notebook "
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
    _write(index, ("\n".join(parts) + "\n").encode())
    return index


def write_result_tables(out_dir: str | os.PathLike, tables: dict, meta: dict) -> dict[str, Path]:
    """A study's tables as ``<name>.csv`` plus ``study.json`` (``meta``: model, config, timings, ...), written
    atomically into ``out_dir``; returns {name: path} with ``meta`` for the JSON file."""
    from workbench.cache import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in tables.items():
        paths[name] = out / f"{name}.csv"
        atomic_write_text(paths[name], frame.to_csv(index=False))
    paths["meta"] = out / "study.json"
    atomic_write_json(paths["meta"], json.loads(json.dumps(meta, default=str)))
    return paths
