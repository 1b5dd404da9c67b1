"""Saving figures with provenance: offline HTML, a PNG via kaleido, a manifest record (the theme the figures
carry is :mod:`workbench.plotting.theme`).

Where files go
    ``save_figure(fig, name, out_dir)`` writes ``<out_dir>/<name>.html`` (plotly.js from one shared
    ``plotly.min.js`` at the root of the figures tree, referenced by a relative path: no CDN, opens offline),
    and ``<out_dir>/<name>.png``, and records the figure in ``<out_dir>/manifest.json``
    (see :mod:`workbench.io.manifest`); :func:`workbench.io.gallery.write_gallery` builds ``figures/index.html``.

Static export (PNG only: one static format keeps the committed figures small; the HTML holds the vector figure,
and its camera button downloads an SVG)
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
import functools
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from PIL import Image

from workbench.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, file_lock, sha256_file
from workbench.io.manifest import MANIFEST_NAME, check_record, manifest_lock, update_manifest
from workbench.io.provenance import git_info, jsonable, model_info, now, package_versions

DEFAULT_BROWSER = "/usr/bin/chromium"
BROWSER_ENV = "BROWSER_PATH"  # choreographer's own override variable; honoured here first
REQUIRE_STATIC_ENV = "WORKBENCH_REQUIRE_STATIC"  # "1": a missing browser or failed export raises
STATIC_EXPORT_ENV = "WORKBENCH_STATIC_EXPORT"  # "0": HTML only, no browser started (the fast test tier)
NOTEBOOK_ENV = "WORKBENCH_NOTEBOOK"  # set by the notebook runner; the default ``notebook`` of a record
HEADLESS_ENV = "WORKBENCH_HEADLESS"  # set by the notebook runner: explorers render static figures
STATIC_FORMATS = ("png",)  # one static format; SVG on demand from the HTML (its camera button)
DEFAULT_WIDTH, DEFAULT_HEIGHT = 720, 450  # layout pixels of the static export when the figure sets none
PNG_SCALE = 2  # 720 px layout width -> 1440 px PNG, ~200 dpi at 7 inches
PLOTLYJS_NAME = "plotly.min.js"  # one shared copy per figures tree; every HTML file points at it
FIGURES_ROOT_ENV = "WORKBENCH_FIGURES_ROOT"  # set by the notebook runner: the tree whose root holds plotly.min.js
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StaticExportError(RuntimeError):
    """PNG export impossible or failed while ``WORKBENCH_REQUIRE_STATIC=1``."""


# --------------------------------------------------------------------------------------------------------------
# Browser and static export
# --------------------------------------------------------------------------------------------------------------

def _is_exe(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def find_browser() -> tuple[str | None, str]:
    """``(path, "")`` of the Chrome/Chromium kaleido should drive, or ``(None, reason)``. See the module doc.
    ``$WORKBENCH_STATIC_EXPORT=0`` turns static export off: ``(None, reason)`` without looking for a browser."""
    if os.environ.get(STATIC_EXPORT_ENV) == "0":
        return None, f"static export turned off (${STATIC_EXPORT_ENV}=0)"
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
    import kaleido  # optional (the `export` extra): only static export needs it

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

    out = _run_coroutine(render)
    if "png" in out:
        out["png"] = _recompress_png(out["png"])
    return out


def _recompress_png(data: bytes) -> bytes:
    """The same pixels, re-encoded by Pillow with ``optimize=True``: kaleido's PNGs shrink to about 0.7."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return buf.getvalue() if buf.tell() < len(data) else data


def _display_dir(path: Path) -> str:
    """A path relative to the current directory when inside it (what the notebook passed), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


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

def plotlyjs_root(out_dir: str | os.PathLike) -> Path:
    """Where the shared ``plotly.min.js`` of ``out_dir`` lives: ``$WORKBENCH_FIGURES_ROOT`` when ``out_dir`` is
    inside it (the notebook runner sets it to the figures tree), else ``out_dir`` itself."""
    out = Path(out_dir).resolve()
    root = os.environ.get(FIGURES_ROOT_ENV)
    if root:
        root_path = Path(root).resolve()
        if out == root_path or root_path in out.parents:
            return root_path
    return out


def ensure_plotlyjs(out_dir: str | os.PathLike) -> Path:
    """Write the plotly.js bundled with plotly as ``<root>/plotly.min.js`` (see :func:`plotlyjs_root`) unless an
    identical copy is there; returns its path. HTML figures reference it by a relative path, so a copied
    figures tree opens offline, and the 4-5 MB bundle is stored once instead of once per figure."""
    path = plotlyjs_root(out_dir) / PLOTLYJS_NAME
    data = get_plotlyjs().encode()
    digest = hashlib.sha256(data).hexdigest()
    if path.exists() and path.stat().st_size == len(data) and sha256_file(path) == digest:
        return path
    with file_lock(path.with_name(f".{PLOTLYJS_NAME}.lock")):
        if not (path.exists() and sha256_file(path) == digest):
            atomic_write_bytes(path, data)
    return path


def _record(kind, name, out_dir, model, params, seed, notebook, wall_time_s) -> dict:
    """The provenance every figure and table record carries."""
    return {
        "name": name,
        "kind": kind,
        "out_dir": _display_dir(out_dir),
        "notebook": notebook or os.environ.get(NOTEBOOK_ENV) or None,
        "model": model_info(model),
        "params": jsonable(params or {}),
        "seed": seed,
        "wall_time_s": None if wall_time_s is None else round(float(wall_time_s), 3),
        "git": git_info(),
        "versions": package_versions(),
        "python_executable": sys.executable,
        "files": {},
    }


def _commit(out_dir: Path, name: str, record: dict, payload: dict[str, bytes], stale=()) -> dict:
    """Under the manifest lock: refuse a record the folder may not take (before any file is replaced), remove
    ``stale`` files, write ``payload`` atomically with each file's sha256 in the record, then the record."""
    with manifest_lock(out_dir):
        check_record(out_dir, name, record)
        for fname in stale:
            (out_dir / fname).unlink(missing_ok=True)
        for fname, data in payload.items():
            atomic_write_bytes(out_dir / fname, data)
            record["files"][fname] = {"sha256": sha256_file(out_dir / fname), "bytes": len(data)}
        record["timestamp"] = now()
        update_manifest(out_dir, name, record)
    return record


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
    """Write ``<out_dir>/<name>.html|.png`` and record provenance in ``<out_dir>/manifest.json``.

    model: a :class:`workbench.Model` (name and weights hash recorded) or a model name. params: the parameters
    that produced the figure (JSON-able; other values are stored as ``str``). notebook: defaults to
    ``$WORKBENCH_NOTEBOOK`` (set by the notebook runner). Returns the manifest record, which lists every file
    written with its sha256 and says under ``static_export`` whether the PNG was made ("ok", "unavailable: ..."
    or "failed: ..."; the latter two also warn).
    """
    if not isinstance(fig, go.Figure):
        raise TypeError(f"save_figure needs a plotly.graph_objects.Figure, got {type(fig).__name__}")
    _check_name(name)
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict of parameter name -> value, got {type(params).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    plotlyjs = ensure_plotlyjs(out_dir)
    payload: dict[str, bytes] = {
        f"{name}.html": fig.to_html(
            include_plotlyjs=os.path.relpath(plotlyjs, out_dir).replace(os.sep, "/"), full_html=True,
            div_id=f"figure-{name}",
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
        msg = f"figure {name!r}: PNG not written, {static} (the HTML was written: {out_dir / (name + '.html')})"
        if _require_static():
            raise StaticExportError(msg + f"; ${REQUIRE_STATIC_ENV} is set")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    record = _record("figure", name, out_dir, model, params, seed, notebook, wall_time_s) | {
        "plotlyjs": {"path": os.path.relpath(plotlyjs, out_dir).replace(os.sep, "/"),
                     "sha256": sha256_file(plotlyjs)},
        "static_export": static,
        "static_export_s": round(static_s, 3),
        "browser": {"path": browser, "version": browser_version(browser) if browser else None},
    }
    # an old PNG (or an SVG from when SVG was exported too) would no longer match the HTML
    stale = [f"{name}.{fmt}" for fmt in (*STATIC_FORMATS, "svg") if f"{name}.{fmt}" not in payload]
    return _commit(out_dir, name, record, payload, stale)


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
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"save_table needs a pandas DataFrame, got {type(df).__name__}")
    _check_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = df.to_csv(index=False).encode()
    record = _record("table", name, out_dir, model, params, seed, notebook, wall_time_s) | {
        "shape": list(df.shape),
        "columns": [str(c) for c in df.columns],
    }
    return _commit(out_dir, name, record, {f"{name}.csv": data})


def save_figures(
    figures: Mapping[str, go.Figure],
    out_dir: str | os.PathLike,
    *,
    tables: Mapping[str, pd.DataFrame] | None = None,
    **provenance,
) -> dict[str, dict]:
    """:func:`save_figure` for each of ``figures`` and :func:`save_table` for each of ``tables`` (name -> object),
    with the same provenance (``model``, ``params``, ``seed``, ``notebook``, ``wall_time_s``). Every name is
    checked before anything is written. Returns ``{name: manifest record}``; prints one line per figure (its files
    and static-export status) so an executed notebook shows what it wrote."""
    tables = dict(tables or {})
    both = sorted(set(figures) & set(tables))
    if both:
        raise ValueError(f"names {both} are given as both a figure and a table")
    for name in [*figures, *tables]:
        _check_name(name)
    records = {}
    for name, df in tables.items():
        records[name] = save_table(df, name, out_dir, **provenance)
    for name, fig in figures.items():
        records[name] = save_figure(fig, name, out_dir, **provenance)
        print(f"{name}: {', '.join(sorted(records[name]['files']))} (static export: "
              f"{records[name]['static_export']})")
    return records


def write_result_tables(out_dir: str | os.PathLike, tables: dict, meta: dict) -> dict[str, Path]:
    """A study's tables as ``<name>.csv`` plus ``study.json`` (``meta``: model, config, timings, ...), written
    atomically into ``out_dir``; returns {name: path} with ``meta`` for the JSON file. A smoke study
    (``meta["config"]["smoke"]``) is refused in a folder whose manifest holds full-size records, and vice versa."""
    out = Path(out_dir)
    smoke = (meta.get("config") or {}).get("smoke") if isinstance(meta.get("config"), dict) else None
    if isinstance(smoke, bool):
        with manifest_lock(out):
            check_record(out, "study", {"params": {"smoke": smoke}})
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in tables.items():
        paths[name] = out / f"{name}.csv"
        atomic_write_text(paths[name], frame.to_csv(index=False))
    paths["meta"] = out / "study.json"
    atomic_write_json(paths["meta"], jsonable(meta))
    return paths
