"""Parameter grids of notebook runs: ``{notebook: {parameter: values}}`` -> one run per cell, each into its own
folder, one after another here or on Dask (a local cluster or a running scheduler).

    workbench run --grid notebooks/studies.yaml          # cells already completed are skipped; --force reruns
"""

from __future__ import annotations

import itertools
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import yaml

from workbench.batch.runner import (
    Result,
    available_notebooks,
    check_kernel,
    check_parameters,
    output_dir_for,
    relative_to_root,
    resolve_figures_dir,
    resolve_names,
    run_notebooks,
    write_run_record,
)
from workbench.io.gallery import write_gallery


def expand_grid(grid: dict) -> list[tuple[str, dict]]:
    """``{notebook: {param: value or [values...]}}`` -> one (notebook, parameters) per cell of the product.

    A list means "one cell per element"; to pass a list as ONE value, nest it (``layers: [[0, 10, 20]]``). A
    notebook mapped to nothing (``01_logit_lens:``) is one cell with its defaults; a notebook mapped to a list of
    mappings gets the cells of each (different settings per model, say).
    """
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
    validated (notebook, parameter names and types, the study config's constraints) before any kernel starts.
    ``dask``/``workers``: run the cells on Dask, see :func:`run_cells`."""
    if not isinstance(grid, dict):
        grid = load_grid(grid)
    return run_cells(expand_grid(grid), skip_completed=not force, dask=dask, workers=workers, **kwargs)


DASK_LOCAL = "local"
DEFAULT_DASK_WORKERS = 2
DASK_CONNECT_TIMEOUT_S = 30


def run_cells(cells: Sequence[tuple[str, dict]], *, skip_completed: bool = False, dask: str | None = None,
              workers: int | None = None, **kwargs) -> list[Result]:
    """Run (notebook, parameters) cells, each into its own folder; one :class:`Result` per cell, in order.

    Every cell is checked (notebook, parameter names and types, the study config's constraints, kernel) before
    any kernel or cluster starts.
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
        check_parameters(resolved, available[resolved], params, smoke=bool(kwargs.get("smoke", False)))
        checked.append((resolved, dict(params)))
    check_kernel(kwargs.get("kernel"))
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
    figures_root = resolve_figures_dir(kwargs.get("figures_dir", "figures"))
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
    full = {"smoke": smoke, "output_dir": relative_to_root(out_dir), **params}
    result = Result(stem, available_notebooks(notebooks)[stem], out_dir / f"{stem}.ipynb", out_dir, smoke, full,
                    error=f"Dask task failed: {type(error).__name__}: {error}")
    write_run_record(result)
    return result


