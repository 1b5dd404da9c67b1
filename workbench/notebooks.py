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
    define raises ``ValueError`` naming it and the allowed ones.

Kernel and imports
    Unless ``kernel`` names another kernelspec, every notebook runs on a private copy of the kernelspec named in
    its metadata (``python3``) whose argv is the runner's own ``sys.executable``, so the kernel is always the same
    interpreter (and virtual environment) as the runner, whatever user-level kernelspecs exist. The kernel's
    working directory is the repository root, and ``PYTHONPATH`` starts with the repository root, so
    ``import workbench`` works without ``pip install -e``. ``output_dir`` is passed relative to the repository
    root when inside it (as in the committed notebook defaults), else absolute; ``$WORKBENCH_NOTEBOOK`` holds the
    notebook stem (recorded by :func:`workbench.figures.save_figure`), and progress-bar widgets are switched off
    (``HF_HUB_DISABLE_PROGRESS_BARS=1``) so executed notebooks stay readable.

A failing notebook does not stop the others: its :class:`Result` carries the error, and its executed copy (with
the failing cell's traceback) is still written.
"""

from __future__ import annotations

import ast
import contextlib
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

from workbench.figures import HEADLESS_ENV, NOTEBOOK_ENV, annotate_records, read_manifest, repo_root, write_gallery

RUNNER_PARAMETERS = ("smoke", "output_dir")  # set by the runner; every notebook's parameters cell must define them
SMOKE_DIR = "_smoke"
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


def _parameters_cell(nb) -> tuple[int, str]:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return i, cell.source
    raise LookupError("no code cell tagged 'parameters'")


def notebook_parameters(path: str | os.PathLike) -> dict[str, object]:
    """The parameters a notebook defines: ``{name: default}`` from its cell tagged ``parameters``.

    Read with ``ast`` (no kernel): every top-level assignment is a parameter; a default that is not a literal is
    reported as its source text.
    """
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    try:
        _, source = _parameters_cell(nb)
    except LookupError as e:
        raise ValueError(f"notebook {path.name} has {e}; the runner needs one defining {list(RUNNER_PARAMETERS)}") from e
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise ValueError(f"notebook {path.name}: its parameters cell is not valid Python: {e}") from e
    params: dict[str, object] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    params[target.id] = ast.literal_eval(value) if value is not None else None
                except ValueError:
                    params[target.id] = Expression(ast.get_source_segment(source, value))
    return params


class Expression(str):
    """A parameter default that is not a literal (kept as its source text); its type is not checked."""


def _type_ok(default, value) -> bool:
    """Does ``value`` have the kind of type the notebook's default has? None on either side is always allowed."""
    if default is None or value is None or isinstance(default, Expression):
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


def _check_parameters(stem: str, path: Path, user: dict) -> dict[str, object]:
    defined = notebook_parameters(path)
    lacking = [p for p in RUNNER_PARAMETERS if p not in defined]
    if lacking:
        raise ValueError(f"notebook {stem}: its parameters cell does not define {lacking}, which the runner passes; "
                         f"it defines {sorted(defined)}")
    reserved = [p for p in user if p in RUNNER_PARAMETERS]
    if reserved:
        raise ValueError(f"parameter(s) {reserved} are set by the runner: use smoke=True/--smoke and "
                         "figures_dir/--figures-dir instead")
    unknown = [p for p in user if p not in defined]
    if unknown:
        allowed = [p for p in defined if p not in RUNNER_PARAMETERS]
        raise ValueError(f"unknown parameter(s) {unknown} for notebook {stem}; its parameters cell defines: "
                         f"{', '.join(allowed)} (and runner-set {', '.join(RUNNER_PARAMETERS)})")
    wrong = {k: v for k, v in user.items() if not _type_ok(defined[k], v)}
    if wrong:
        k, v = next(iter(wrong.items()))
        raise ValueError(f"notebook {stem}: parameter {k}={v!r} is a {type(v).__name__}, but its default "
                         f"{defined[k]!r} is a {type(defined[k]).__name__}")
    return defined


def output_dir_for(stem: str, figures_dir: str | os.PathLike, smoke: bool, parameters: dict | None = None) -> Path:
    """``<figures>/<stem>/`` for the notebook's defaults; ``<figures>/<stem>/<k>-<v>_.../`` when parameters are set
    (e.g. ``-p model=gemma-3-270m`` -> ``02_counting_readout/model-gemma-3-270m``), so other settings never
    overwrite the default figures; ``_smoke/`` below that for smoke runs."""
    out = Path(figures_dir) / stem
    if parameters:
        out = out / parameter_slug(parameters)
    return out / SMOKE_DIR if smoke else out


def parameter_slug(parameters: dict) -> str:
    """A folder name for a parameter setting: ``key-value`` pairs (model first, then by name) joined by ``__``;
    list values joined by ``+`` (an empty list is ``none``); filesystem-safe."""

    def fmt(v) -> str:
        if isinstance(v, (list, tuple)):
            return "+".join(fmt(x) for x in v) or "none"
        return json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)

    keys = sorted(parameters, key=lambda k: (k != "model", k))
    slug = "__".join(f"{k}-{fmt(parameters[k])}" for k in keys)
    return re.sub(r"[^A-Za-z0-9._+-]+", ".", slug).strip(".")[:150]


def _resolve_figures_dir(figures_dir) -> Path:
    p = Path(figures_dir).expanduser()
    return p if p.is_absolute() else repo_root() / p


def _relative_to_root(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(repo_root().resolve()))
    except ValueError:
        return str(p.resolve())


# --------------------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _kernel_environment(stem: str, kernel_name: str | None) -> Iterator[None]:
    """Environment for the kernel: repo on PYTHONPATH, the notebook stem, and (if ``kernel_name``) a private
    kernelspec of that name running this interpreter, found first through ``JUPYTER_PATH``."""
    root = str(repo_root())
    # headless: no progress-bar widgets, and the explorers of workbench.widgets render static figures
    quiet = {"PYDEVD_DISABLE_FILE_VALIDATION": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", HEADLESS_ENV: "1"}
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


def _finalise_executed(tmp: Path, final: Path) -> None:
    """Move papermill's output into place, pointing its recorded output path at the final name."""
    import nbformat

    from workbench.cache import atomic_write_text

    if not tmp.exists():
        return
    try:
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata.setdefault("papermill", {})["output_path"] = _relative_to_root(final)
        atomic_write_text(final, nbformat.writes(nb))
        os.chmod(final, 0o644)
    finally:
        tmp.unlink(missing_ok=True)


def _check_kernel(kernel: str | None) -> None:
    if kernel is None:
        return
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

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
    import nbformat
    import papermill

    parameters = dict(parameters or {})
    available = available_notebooks(notebooks)
    stems = resolve_names(names, available)
    figures_root = _resolve_figures_dir(figures_dir)

    _check_kernel(kernel)

    plans = []
    for stem in stems:  # validate everything first
        path = available[stem]
        _check_parameters(stem, path, parameters)
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
        params = {"smoke": bool(smoke), "output_dir": _relative_to_root(out_dir), **parameters}
        result = Result(stem, path, executed, out_dir, bool(smoke), params)
        if skip_completed and _completed(out_dir, params):
            result.ok = result.skipped = True
            if verbose:
                print(f"[{n}/{len(plans)}] {stem}: {result}", file=sys.stderr, flush=True)
            results.append(result)
            continue
        if verbose:
            print(f"[{n}/{len(plans)}] {stem}{' (smoke)' if smoke else ''} -> {_relative_to_root(out_dir)}",
                  file=sys.stderr, flush=True)
        tmp = out_dir / f".{stem}.{uuid.uuid4().hex[:8]}.tmp.ipynb"
        started_wall = time.time()
        t0 = time.perf_counter()
        try:
            with _kernel_environment(stem, None if kernel else spec_name):
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
            _finalise_executed(tmp, executed)
            _write_run_record(result)
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


def _write_run_record(result: Result) -> None:
    from workbench.cache import atomic_write_json
    from workbench.figures import git_info

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
    return record.get("status") == "ok" and record.get("parameters") == json.loads(json.dumps(params))


def expand_grid(grid: dict) -> list[tuple[str, dict]]:
    """``{notebook: {param: value or [values...]}}`` -> one (notebook, parameters) per cell of the product.

    A list means "one cell per element"; to pass a list as ONE value, nest it (``layers: [[0, 10, 20]]``). A
    notebook mapped to nothing (``01_logit_lens:``) is one cell with its defaults; a notebook mapped to a list of
    mappings gets the cells of each (different settings per model, say).
    """
    import itertools

    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"a grid must be a non-empty mapping {{notebook: {{parameter: values}}}}, got {grid!r}")
    cells = []
    for stem, spec in grid.items():
        blocks = spec if isinstance(spec, list) else [spec]  # a list of mappings: several sub-grids
        for axes in blocks:
            axes = axes or {}
            if not isinstance(axes, dict):
                raise ValueError(f"grid entry {stem!r} must map parameters to values (or be a list of such "
                                 f"mappings), got {axes!r}")
            keys = list(axes)
            values = [v if isinstance(v, list) else [v] for v in axes.values()]
            empty = [k for k, v in zip(keys, values) if not v]
            if empty:
                raise ValueError(f"grid entry {stem!r}: parameter(s) {empty} have no values")
            for combo in itertools.product(*values):
                cells.append((str(stem), dict(zip(keys, combo))))
    return cells


def load_grid(path: str | os.PathLike) -> dict:
    import yaml

    try:
        grid = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read grid file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"grid file {path} is not valid YAML: {e}") from None
    return grid


def run_grid(grid: dict | str | os.PathLike, *, force: bool = False, dask: str | None = None,
             workers: int | None = None, **kwargs) -> list[Result]:
    """Every cell of a parameter grid (a mapping or a YAML file, see :func:`expand_grid`), each into its own
    folder; cells already completed with the same parameters are skipped unless ``force``. Every cell is
    validated (notebook, parameter names and types) before any kernel starts. ``dask``/``workers``: run the cells
    on Dask, see :func:`run_cells`."""
    if not isinstance(grid, dict):
        grid = load_grid(grid)
    return run_cells(expand_grid(grid), skip_completed=not force, dask=dask, workers=workers, **kwargs)


DASK_LOCAL = "local"
DEFAULT_DASK_WORKERS = 2
DASK_CONNECT_TIMEOUT_S = 30


def run_cells(cells: Sequence[tuple[str, dict]], *, skip_completed: bool = False, dask: str | None = None,
              workers: int | None = None, **kwargs) -> list[Result]:
    """Run (notebook, parameters) cells, each into its own folder; one :class:`Result` per cell, in order.

    Every cell is checked (notebook, parameter names and types, kernel) before any kernel or cluster starts.
    dask: None runs the cells one after another here; ``"local"`` starts a Dask ``LocalCluster`` of ``workers``
    processes (default 2, one thread each) on this machine; any other value is the address of a running Dask
    scheduler (``tcp://host:8786``), whose workers need this repository at the same path (or a shared file
    system) and the same environment. A cell that fails, or whose Dask task dies, is a failed Result (its
    ``run.json`` says why); the other cells still run. kwargs: those of :func:`run_notebooks`.
    """
    available = available_notebooks(kwargs.get("notebooks"))
    checked = []
    for stem, params in cells:
        (resolved,) = resolve_names([stem], available)
        _check_parameters(resolved, available[resolved], params)
        checked.append((resolved, dict(params)))
    _check_kernel(kwargs.get("kernel"))
    if dask is None:
        if workers is not None:
            raise ValueError(f"workers={workers!r} sizes a local Dask cluster: pass dask='local' (--dask) too")
        results = []
        for stem, params in checked:
            results += run_notebooks([stem], parameters=params, skip_completed=skip_completed, **kwargs)
        return results
    return _run_cells_on_dask(checked, dask, workers, skip_completed, kwargs)


def _run_cell_task(stem: str, params: dict, skip_completed: bool, kwargs: dict) -> Result:
    """One grid cell on a Dask worker (a module-level function: workers import it by name)."""
    (result,) = run_notebooks([stem], parameters=params, skip_completed=skip_completed, **kwargs)
    return result


def _dask_client(address: str, workers: int | None):
    """(client, cluster or None) for ``"local"`` (a LocalCluster) or a scheduler address."""
    from distributed import Client, LocalCluster

    if address == DASK_LOCAL:
        n = DEFAULT_DASK_WORKERS if workers is None else workers
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        # processes, one thread each: every cell runs its own kernel; memory_limit=0: a worker is never paused or
        # restarted by Dask for the memory a model takes
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               memory_limit=0)
        return Client(cluster), cluster
    if workers is not None:
        raise ValueError(f"workers={workers!r} sizes a local cluster; the scheduler at {address} has its own workers")
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"dask must be 'local' or a scheduler address like tcp://host:8786, got {address!r}")
    try:
        return Client(address, timeout=DASK_CONNECT_TIMEOUT_S), None
    except (OSError, TimeoutError) as e:
        raise ValueError(f"cannot connect to the Dask scheduler at {address!r} within "
                         f"{DASK_CONNECT_TIMEOUT_S} s: {e}") from None


def _run_cells_on_dask(cells, address, workers, skip_completed, kwargs) -> list[Result]:
    smoke = bool(kwargs.get("smoke", False))
    figures_root = _resolve_figures_dir(kwargs.get("figures_dir", "figures"))
    kw = dict(kwargs, figures_dir=str(figures_root))  # absolute: the workers' current directory may differ
    if kw.get("notebooks") is not None:
        kw["notebooks"] = str(Path(kw["notebooks"]).resolve())
    verbose = bool(kw.get("verbose"))
    client, cluster = _dask_client(address, workers)
    try:
        if verbose:
            print(f"Dask: {len(cells)} cell(s) on {client.scheduler_info().get('address', address)} "
                  f"({len(client.scheduler_info().get('workers', {}))} workers)", file=sys.stderr, flush=True)
        futures = [client.submit(_run_cell_task, stem, params, skip_completed, kw, pure=False,
                                 key=f"workbench-{i}-{stem}-{uuid.uuid4().hex[:6]}")
                   for i, (stem, params) in enumerate(cells)]
        results = []
        for (stem, params), future in zip(cells, futures, strict=True):
            try:
                results.append(future.result())
            except Exception as e:  # noqa: BLE001 - a dead task is one failed cell, the others go on
                results.append(_failed_cell(stem, params, e, figures_root, smoke, kw.get("notebooks")))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    write_gallery(figures_root, smoke=smoke)
    return results


def _failed_cell(stem, params, error, figures_root, smoke, notebooks) -> Result:
    out_dir = output_dir_for(stem, figures_root, smoke, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = {"smoke": smoke, "output_dir": _relative_to_root(out_dir), **params}
    result = Result(stem, available_notebooks(notebooks)[stem], out_dir / f"{stem}.ipynb", out_dir, smoke, full,
                    error=f"Dask task failed: {type(error).__name__}: {error}")
    _write_run_record(result)
    return result


def _timestamp(iso: str | None) -> int:
    import datetime as dt

    if not iso:
        return 0
    try:
        return int(dt.datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0
