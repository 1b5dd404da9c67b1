"""Run the paper notebooks headless with papermill: ``run_notebooks()`` / ``workbench run``.

Layout
    Notebooks are ``<repo>/notebooks/NN_name.ipynb``. Running one writes its figures, tables and ``manifest.json``
    to ``<figures_dir>/<stem>/`` and stores the executed notebook next to them as ``<figures_dir>/<stem>/<stem>.ipynb``.
    Smoke runs (``smoke=True``: few prompts/layers, seconds) use ``<figures_dir>/<stem>/_smoke/`` instead, which is
    git-ignored, so they never overwrite real figures. After a run the gallery ``<figures_dir>/index.html``
    (``<figures_dir>/_smoke/index.html`` for smoke runs) is rewritten.

Parameters
    The runner passes ``smoke`` and ``output_dir`` (plus the user's ``parameters``) into the notebook's cell tagged
    ``parameters``. Everything is checked before any kernel starts: an unknown notebook name, a notebook without
    a ``parameters`` cell (or one that lacks ``smoke``/``output_dir``), or a user parameter the cell does not
    define raises ``ValueError`` naming it and the allowed ones; a study notebook's config is built from its
    defaults and the user's values (full size, and with ``smoke`` the smoke config too), so a value outside its
    declared constraints (a range, a choice, a relation between fields) raises ``ValueError`` naming it.

Kernel and imports
    Unless ``kernel`` names another kernelspec, every notebook runs on a private copy of the kernelspec named in
    its metadata (``python3``) whose argv is the runner's own ``sys.executable``, so the kernel is always the same
    interpreter (and virtual environment) as the runner, whatever user-level kernelspecs exist. The kernel's
    working directory is the repository root, and ``PYTHONPATH`` starts with the repository root, so
    ``import workbench`` works without ``pip install -e``. ``output_dir`` is passed relative to the repository
    root when inside it (as in the committed notebook defaults), else absolute; ``$WORKBENCH_NOTEBOOK`` holds the
    notebook stem (recorded by :func:`workbench.io.figures.save_figure`), and progress-bar widgets are switched off
    (``HF_HUB_DISABLE_PROGRESS_BARS=1``) so executed notebooks stay readable.

A failing notebook does not stop the others: its :class:`Result` carries the error, and its executed copy (with
the failing cell's traceback) is still written. The executed copy of a full run that succeeded is stored without
outputs and execution counts (it is committed; the results are the figures and tables beside it).
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import papermill
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from workbench.core.models import check_model_name
from workbench.io.atomic import atomic_write_json, atomic_write_text
from workbench.io.figures import FIGURES_ROOT_ENV, HEADLESS_ENV, NOTEBOOK_ENV
from workbench.io.gallery import write_gallery
from workbench.io.manifest import annotate_records, read_manifest
from workbench.io.paths import SMOKE_DIR, repo_root
from workbench.io.provenance import git_info, json_roundtrip
from workbench.studies.registry import notebook_config

RUNNER_PARAMETERS = ("smoke", "output_dir")  # set by the runner; every notebook's parameters cell must define them
_NOTEBOOK_RE = re.compile(r"^\d+_.+\.ipynb$")


@dataclass
class Result:
    """The outcome of one notebook run."""

    name: str  # notebook stem, e.g. "01_logit_lens"
    notebook: Path  # the source notebook
    executed: Path  # the executed copy (<output_dir>/<stem>.ipynb)
    output_dir: Path
    smoke: bool
    parameters: dict
    ok: bool = False
    error: str | None = None
    wall_time_s: float = 0.0
    records: list[str] = field(default_factory=list)  # manifest records (figures/tables) written by this run
    skipped: bool = False  # a completed run with the same parameters was found (grids skip those)

    def __str__(self) -> str:
        status = "skipped (already completed)" if self.skipped else "ok" if self.ok else f"FAILED: {self.error}"
        return f"{self.name}: {status} ({self.wall_time_s:.1f} s; executed notebook {self.executed})"


# --------------------------------------------------------------------------------------------------------------
# Discovery and validation (no kernel)
# --------------------------------------------------------------------------------------------------------------

def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def available_notebooks(directory: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{stem: path}`` of the ``NN_name.ipynb`` notebooks, in order."""
    directory = Path(directory) if directory is not None else notebooks_dir()
    if not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.glob("*.ipynb")) if _NOTEBOOK_RE.match(p.name)}


def resolve_names(names: Sequence[str] | str | None, available: dict[str, Path]) -> list[str]:
    """Notebook stems for ``names``: a stem, a file name, the ``NN`` prefix or the name without it."""
    if not available:
        raise ValueError("no notebooks found (expected notebooks/NN_name.ipynb)")
    if names is None or (not isinstance(names, str) and len(names) == 0):
        return list(available)
    if isinstance(names, str):
        names = [names]
    chosen: list[str] = []
    for raw in names:
        key = Path(str(raw)).name.removesuffix(".ipynb")
        matches = [s for s in available if key in (s, s.split("_", 1)[0], s.split("_", 1)[-1])]
        if len(matches) != 1:
            why = "unknown notebook" if not matches else f"ambiguous notebook name (matches {matches})"
            raise ValueError(f"{why} {raw!r}; available notebooks: {', '.join(available)}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return chosen


MODEL_PARAMETERS = ("model", "donor", "base_lm")  # checked as model names before any kernel starts
_BASE_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}


def _inspect(path: Path) -> dict[str, dict]:
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"notebook {path.name} has no code cell tagged 'parameters'; the runner needs one "
                         f"defining {list(RUNNER_PARAMETERS)}")
    try:
        inspected = papermill.inspect_notebook(str(path))
    except Exception as e:  # noqa: BLE001 - papermill's parse errors carry no file name
        raise ValueError(f"notebook {path.name}: papermill cannot read its parameters cell: {e}") from e
    try:  # papermill skips a line it cannot parse (e.g. a `list[int] | None` annotation): say so
        assigned = [t.id for node in ast.parse(cells[0].source).body
                    for t in (node.targets if isinstance(node, ast.Assign) else
                              [node.target] if isinstance(node, ast.AnnAssign) else [])
                    if isinstance(t, ast.Name)]
    except SyntaxError as e:
        raise ValueError(f"notebook {path.name}: its parameters cell is not valid Python: {e}") from e
    missed = [n for n in assigned if n not in inspected]
    if missed:
        raise ValueError(f"notebook {path.name}: papermill cannot read the parameter line(s) of {missed}; write "
                         "annotations papermill parses, e.g. `layers: Optional[list[int]] = None`")
    return inspected


def notebook_parameters(path: str | os.PathLike) -> dict[str, object]:
    """The parameters a notebook defines: ``{name: default}`` from its cell tagged ``parameters``.

    Read by papermill's own ``inspect_notebook`` (no kernel); each default is evaluated as a Python literal, and one
    that is not a literal is kept as its source text (an :class:`Expression`).
    """
    params: dict[str, object] = {}
    for name, spec in _inspect(Path(path)).items():
        source = spec["default"]
        try:
            params[name] = ast.literal_eval(source)
        except (ValueError, SyntaxError):
            params[name] = Expression(source)
    return params


def notebook_parameter_types(path: str | os.PathLike) -> dict[str, str | None]:
    """``{name: annotation}`` of a notebook's parameters (``None`` where the line has no annotation)."""
    return {name: (None if spec["inferred_type_name"] in ("None", "", None) else spec["inferred_type_name"])
            for name, spec in _inspect(Path(path)).items()}


class Expression(str):
    """A parameter default that is not a literal (kept as its source text); its type is not checked."""


def _type_check(text: str):
    """A predicate for an annotation the runner understands: str, int, float, bool, dict, list, list[T],
    Optional[T] (nested). Anything else raises ValueError naming the annotation."""
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"parameter annotation {text!r} is not a type the runner checks") from None

    def build(n):
        if isinstance(n, ast.Name) and n.id in _BASE_TYPES:
            base = _BASE_TYPES[n.id]
            if base is int:
                return lambda v: isinstance(v, int) and not isinstance(v, bool)
            if base is float:
                return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            if base is list:
                return lambda v: isinstance(v, (list, tuple))
            return lambda v, base=base: isinstance(v, base)
        if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name):
            inner = build(n.slice)
            if n.value.id == "Optional":
                return lambda v: v is None or inner(v)
            if n.value.id == "list":
                return lambda v: isinstance(v, (list, tuple)) and all(inner(x) for x in v)
        raise ValueError(f"parameter annotation {text!r} is not one the runner checks (str, int, float, bool, "
                         "dict, list, list[T], Optional[T])")

    return build(node)


def _type_ok(default, value) -> bool:
    """For a parameter without annotation: does ``value`` have the kind of type the notebook's default has?"""
    if isinstance(default, Expression):
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_parameters(stem: str, path: Path, user: dict, *, smoke: bool = False) -> dict[str, object]:
    """Check ``user`` parameters against the notebook's parameters cell before any kernel starts: names, types
    (the cell's annotations, or the default's type; a ``None`` default must be annotated, e.g.
    ``layers: Optional[list[int]] = None``), model names (:data:`MODEL_PARAMETERS`: a registry name, an
    existing folder or a hub id), and, for a study notebook (:data:`workbench.studies.registry.NOTEBOOK_CONFIGS`),
    the values against its config's declared constraints (:func:`check_config`). Returns ``{name: default}``."""
    defined = notebook_parameters(path)
    types = notebook_parameter_types(path)
    lacking = [p for p in RUNNER_PARAMETERS if p not in defined]
    if lacking:
        raise ValueError(f"notebook {stem}: its parameters cell does not define {lacking}, which the runner passes; "
                         f"it defines {sorted(defined)}")
    untyped = [k for k, v in defined.items() if v is None and types.get(k) is None]
    if untyped:
        raise ValueError(f"notebook {stem}: parameter(s) {untyped} default to None without a type annotation; "
                         "annotate them (e.g. `layers: Optional[list[int]] = None`) so values can be checked")
    reserved = [p for p in user if p in RUNNER_PARAMETERS]
    if reserved:
        raise ValueError(f"parameter(s) {reserved} are set by the runner: use smoke=True/--smoke and "
                         "figures_dir/--figures-dir instead")
    unknown = [p for p in user if p not in defined]
    if unknown:
        allowed = [p for p in defined if p not in RUNNER_PARAMETERS]
        raise ValueError(f"unknown parameter(s) {unknown} for notebook {stem}; its parameters cell defines: "
                         f"{', '.join(allowed)} (and runner-set {', '.join(RUNNER_PARAMETERS)})")
    for k, v in user.items():
        if types.get(k) is not None:
            if not _type_check(types[k])(v):
                raise ValueError(f"notebook {stem}: parameter {k}={v!r} is a {type(v).__name__}, but the notebook "
                                 f"declares {k}: {types[k]}")
        elif not _type_ok(defined[k], v):
            raise ValueError(f"notebook {stem}: parameter {k}={v!r} is a {type(v).__name__}, but its default "
                             f"{defined[k]!r} is a {type(defined[k]).__name__}")
    for k in MODEL_PARAMETERS:
        value = user.get(k, defined.get(k))
        if k in defined and isinstance(value, str):
            try:
                check_model_name(value)
            except ValueError as e:
                raise ValueError(f"notebook {stem}: parameter {k}: {e}") from None
    check_config(stem, defined, user, smoke=smoke)
    return defined


def check_config(stem: str, defined: dict, user: dict, *, smoke: bool = False) -> None:
    """Build the config of study notebook ``stem`` from its defaults and ``user``'s values, without a kernel: the
    full-size config always (so a value that smoke would replace is still checked) and, with ``smoke``, the smoke
    config too. A value (or a combination) the config does not allow raises ``ValueError`` naming the parameter.
    Nothing happens for a notebook without a registered config, or one whose defaults are not all literals."""
    cls = notebook_config(stem)
    if cls is None:
        return
    namespace = {**defined, **user}
    missing = [n for n in cls.NOTEBOOK if n not in namespace]
    if missing:
        raise ValueError(f"notebook {stem}: its config {cls.__name__} reads parameter(s) {missing}, which its "
                         "parameters cell does not define")
    if any(isinstance(namespace[n], Expression) for n in cls.NOTEBOOK):
        return  # a default the runner cannot evaluate: the kernel's from_notebook checks it
    try:
        cls.check_notebook(namespace, smoke=smoke)
    except ValueError as e:
        raise ValueError(f"notebook {stem}: {e}") from None


def output_dir_for(stem: str, figures_dir: str | os.PathLike, smoke: bool, parameters: dict | None = None) -> Path:
    """``<figures>/<stem>/`` for the notebook's defaults; ``<figures>/<stem>/<k>-<v>_.../`` when parameters are set
    (e.g. ``-p model=gemma-3-270m`` -> ``02_counting_readout/model-gemma-3-270m``), so other settings never
    overwrite the default figures; ``_smoke/`` below that for smoke runs."""
    out = Path(figures_dir) / stem
    if parameters:
        out = out / parameter_slug(parameters)
    return out / SMOKE_DIR if smoke else out


def parameter_slug(parameters: dict) -> str:
    """The folder name of a parameter setting: a readable prefix (``key-value`` pairs, model first, then by name,
    joined by ``__``; lists joined by ``+``; made filesystem-safe and cut to 80 characters), then ``__`` and the
    first 10 hex digits of the sha256 of the canonical parameters (JSON, keys sorted). The prefix may lose
    distinctions (``org/name`` and ``org.name``, ``[0, 10]`` and ``"0+10"``, ``[]`` and ``"none"``); the hash does
    not, so two settings never share a folder."""

    def fmt(v) -> str:
        if isinstance(v, (list, tuple)):
            return "+".join(fmt(x) for x in v) or "none"
        return json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)

    keys = sorted(parameters, key=lambda k: (k != "model", k))
    readable = re.sub(r"[^A-Za-z0-9._+-]+", ".", "__".join(f"{k}-{fmt(parameters[k])}" for k in keys)).strip(".")
    canonical = json.dumps(json_roundtrip(parameters, strict=True), sort_keys=True, separators=(",", ":"))
    return f"{readable[:80].rstrip('._-')}__{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"


def resolve_figures_dir(figures_dir) -> Path:
    p = Path(figures_dir).expanduser()
    return p if p.is_absolute() else repo_root() / p


def relative_to_root(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(repo_root().resolve()))
    except ValueError:
        return str(p.resolve())


# --------------------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _kernel_environment(stem: str, kernel_name: str | None, figures_root: Path) -> Iterator[None]:
    """Environment for the kernel: repo on PYTHONPATH, the notebook stem, and (if ``kernel_name``) a private
    kernelspec of that name running this interpreter, found first through ``JUPYTER_PATH``."""
    root = str(repo_root())
    # headless: no progress-bar widgets, and the explorers of workbench.ui render static figures
    quiet = {"PYDEVD_DISABLE_FILE_VALIDATION": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", HEADLESS_ENV: "1",
             FIGURES_ROOT_ENV: str(figures_root)}  # one shared plotly.min.js at the root of the figures tree
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", NOTEBOOK_ENV, "JUPYTER_PATH", *quiet)}
    with tempfile.TemporaryDirectory(prefix="workbench-kernel-") as tmp:
        pythonpath = os.pathsep.join([root] + ([saved["PYTHONPATH"]] if saved["PYTHONPATH"] else []))
        os.environ["PYTHONPATH"] = pythonpath
        os.environ[NOTEBOOK_ENV] = stem
        os.environ.update(quiet)
        if kernel_name:
            spec_dir = Path(tmp) / "kernels" / kernel_name
            spec_dir.mkdir(parents=True)
            spec = {
                "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"workbench ({Path(sys.executable).name})",
                "language": "python",
                "env": {"PYTHONPATH": pythonpath, NOTEBOOK_ENV: stem, **quiet},
                "metadata": {"debugger": False},
            }
            (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
            os.environ["JUPYTER_PATH"] = os.pathsep.join([tmp] + ([saved["JUPYTER_PATH"]] if saved["JUPYTER_PATH"] else []))
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _describe_error(e: BaseException) -> str:
    ename, evalue = getattr(e, "ename", None), getattr(e, "evalue", None)
    if ename:
        cell = getattr(e, "exec_count", None)
        return f"{ename}: {evalue}" + (f" (in cell [{cell}])" if cell is not None else "")
    return f"{type(e).__name__}: {e}"


def _finalise_executed(tmp: Path, final: Path, *, strip: bool = False) -> None:
    """Move papermill's output into place, pointing its recorded output path at the final name. ``strip``: drop the
    cells' outputs and execution counts (a full run that succeeded: its results are the figures and tables beside
    it, and the executed copy is committed); a failed or smoke run keeps them (the traceback, the explorers)."""
    if not tmp.exists():
        return
    try:
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata.setdefault("papermill", {})["output_path"] = relative_to_root(final)
        if strip:
            for cell in nb.cells:
                if cell.cell_type == "code":
                    cell.outputs, cell.execution_count = [], None
        atomic_write_text(final, nbformat.writes(nb))
        os.chmod(final, 0o644)
    finally:
        tmp.unlink(missing_ok=True)


def check_kernel(kernel: str | None) -> None:
    if kernel is None:
        return

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        known = sorted(KernelSpecManager().find_kernel_specs())
        raise ValueError(f"no kernelspec named {kernel!r}; available: {', '.join(known)}") from None


def run_notebooks(
    names: Sequence[str] | str | None = None,
    *,
    smoke: bool = False,
    figures_dir: str | os.PathLike = "figures",
    parameters: dict | None = None,
    kernel: str | None = None,
    notebooks: str | os.PathLike | None = None,
    timeout: int | None = None,
    verbose: bool = False,
    skip_completed: bool = False,
) -> list[Result]:
    """Execute notebooks (all, or ``names``) with papermill and return one :class:`Result` each.

    figures_dir: where figure folders go (relative paths are relative to the repository root). parameters: extra
    notebook parameters, each of which every selected notebook must define. kernel: a kernelspec name to use as is
    (default: the notebook's own kernel name, run on this interpreter). notebooks: the notebooks folder (default
    ``<repo>/notebooks``). timeout: per-cell limit in seconds (default none). All checks happen before any kernel
    starts; a failing notebook is recorded in its Result and the rest still run. Every run leaves
    ``<output_dir>/run.json`` (parameters, status, error, wall time, commit); ``skip_completed`` skips a notebook
    whose folder holds a successful run with the same parameters.
    """

    parameters = dict(parameters or {})
    available = available_notebooks(notebooks)
    stems = resolve_names(names, available)
    figures_root = resolve_figures_dir(figures_dir)

    check_kernel(kernel)

    plans = []
    for stem in stems:  # validate everything first
        path = available[stem]
        check_parameters(stem, path, parameters, smoke=bool(smoke))
        nb = nbformat.read(path, as_version=4)
        spec = nb.metadata.get("kernelspec", {})
        if kernel is None and not spec.get("name"):
            raise ValueError(f"notebook {stem} has no kernelspec in its metadata; pass kernel=...")
        if kernel is None and spec.get("language", "python") != "python":
            raise ValueError(f"notebook {stem} is a {spec.get('language')!r} notebook; only python is supported")
        out_dir = output_dir_for(stem, figures_root, smoke, parameters)
        plans.append((stem, path, out_dir, spec.get("name")))

    results: list[Result] = []
    for n, (stem, path, out_dir, spec_name) in enumerate(plans, 1):
        out_dir.mkdir(parents=True, exist_ok=True)
        executed = out_dir / f"{stem}.ipynb"
        params = {"smoke": bool(smoke), "output_dir": relative_to_root(out_dir), **parameters}
        result = Result(stem, path, executed, out_dir, bool(smoke), params)
        if skip_completed and _completed(out_dir, params):
            result.ok = result.skipped = True
            if verbose:
                print(f"[{n}/{len(plans)}] {stem}: {result}", file=sys.stderr, flush=True)
            results.append(result)
            continue
        if verbose:
            print(f"[{n}/{len(plans)}] {stem}{' (smoke)' if smoke else ''} -> {relative_to_root(out_dir)}",
                  file=sys.stderr, flush=True)
        tmp = out_dir / f".{stem}.{uuid.uuid4().hex[:8]}.tmp.ipynb"
        started_wall = time.time()
        t0 = time.perf_counter()
        try:
            with _kernel_environment(stem, None if kernel else spec_name, figures_root):
                papermill.execute_notebook(
                    str(path),
                    str(tmp),
                    parameters=params,
                    kernel_name=kernel or spec_name,
                    cwd=str(repo_root()),
                    progress_bar=False,
                    log_output=False,
                    request_save_on_cell_execute=True,
                    execution_timeout=timeout,
                )
            result.ok = True
        except Exception as e:  # noqa: BLE001 - one failing notebook must not stop the others
            result.error = _describe_error(e)
        finally:
            result.wall_time_s = time.perf_counter() - t0
            _finalise_executed(tmp, executed, strip=result.ok and not smoke)
            write_run_record(result)
        with contextlib.suppress(Exception):
            records = read_manifest(out_dir)["records"]
            result.records = sorted(
                k for k, r in records.items() if _timestamp(r.get("timestamp")) >= int(started_wall) - 1
            )
        if result.records:  # every figure and table of this run gets the run's status and details
            annotate_records(out_dir, result.records, {"status": "ok" if result.ok else "failed", "run": {
                "error": result.error, "wall_time_s": round(result.wall_time_s, 2), "smoke": result.smoke,
                "parameters": result.parameters, "executed_notebook": executed.name}})
        if verbose:
            print(f"    {result}", file=sys.stderr, flush=True)
        results.append(result)

    write_gallery(figures_root, smoke=smoke)
    return results


RUN_RECORD = "run.json"


def write_run_record(result: Result) -> None:

    git = git_info()
    atomic_write_json(result.output_dir / RUN_RECORD, {
        "notebook": result.name, "parameters": result.parameters, "smoke": result.smoke,
        "status": "ok" if result.ok else "failed", "error": result.error,
        "wall_time_s": round(result.wall_time_s, 2), "commit": git.get("commit"), "dirty": git.get("dirty"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def _completed(out_dir: Path, params: dict) -> bool:
    try:
        record = json.loads((out_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("status") == "ok" and record.get("parameters") == json_roundtrip(params, strict=False)


def _timestamp(iso: str | None) -> int:

    if not iso:
        return 0
    try:
        return int(dt.datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0
