"""The latent-drift study: every mode on the same items, drift metrics per step, accuracy against n_steps.

:func:`run_drift_study` runs, for one model and task:

1. every mode of :mod:`workbench.methods.latent` at ``n_steps`` (``direct`` with none), instrumented at every layer;
2. the drift metrics of :mod:`workbench.studies.latent_drift.metrics` per step, the lens as a step x layer table, fact retention;
3. accuracy against the number of steps, for each thinking mode at every value of ``steps_grid``.

Results are small dataframes in :class:`DriftResult`; :func:`save_drift_result` writes them as CSV.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.data.reasoning import REASONING_TASKS, make_reasoning_task
from workbench.io.figures import write_result_tables
from workbench.methods.latent import MAX_STEPS, MODES, LatentConfig, run_latent
from workbench.studies.latent_drift import plots
from workbench.studies.latent_drift.metrics import (
    fact_retention,
    lens_by_step_layer,
    lens_metrics,
    manifold_metrics,
    step_summary,
)
from workbench.studies.notebook import NotebookConfig


@dataclass
class DriftConfig(NotebookConfig):
    # notebook 04's parameters -> fields (see workbench.studies.notebook); a smoke run sizes the last three itself
    NOTEBOOK = {"model": "model", "modes": "modes", "task": "task", "n_hops": "n_hops", "soft": "soft",
                "seed": "seed", "n_steps": "n_steps", "steps_grid": "steps_grid", "n_items": "n_items"}
    SMOKE_SIZED = ("n_steps", "steps_grid", "n_items")

    model: str = DEFAULT_MODEL
    task: str = "arithmetic"
    modes: tuple[str, ...] = MODES
    n_steps: int = 6  # thinking steps of the instrumented runs
    n_hops: int = 2  # reasoning steps the task needs (arithmetic operations / graph edges): a=3; b=a+4; c=b*2
    n_items: int = 100
    steps_grid: tuple[int, ...] = (1, 2, 4, 6, 8)  # accuracy against n_steps (uninstrumented metrics only)
    retention_layer: int | None = None  # None: the middle layer
    seed: int = 0
    soft: dict = field(default_factory=dict)  # LatentConfig overrides for mode "soft" (e.g. gumbel_tau=0.5)
    batch_size: int = 50  # decoding is bound by reading the weights: big batches cut the number of passes
    smoke: bool = False

    def __post_init__(self):
        self.modes = tuple(self.modes)
        self.steps_grid = tuple(int(s) for s in self.steps_grid)
        if self.task not in REASONING_TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid tasks: {list(REASONING_TASKS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown mode(s) {bad or '(none given)'}; valid modes: {list(MODES)}")
        for name, values in (("n_steps", [self.n_steps]), ("steps_grid", self.steps_grid)):
            wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_STEPS]
            if wrong:
                raise ValueError(f"{name} values {wrong} not allowed: steps are ints in 1..{MAX_STEPS}")
        if isinstance(self.n_items, bool) or not isinstance(self.n_items, int) or self.n_items < 8:
            raise ValueError(f"n_items must be an int >= 8 (fact retention splits them), got {self.n_items!r}")
        LatentConfig(mode="soft", n_steps=1, **self.soft)  # bad Soft Thinking options fail here, before any forward

    @classmethod
    def smoke_config(cls, **overrides) -> DriftConfig:
        base = dict(n_items=8, n_steps=3, steps_grid=(1, 2), smoke=True)
        return cls(**(base | overrides))


@dataclass
class DriftResult:
    config: dict
    model: str
    weights_hash: str
    steps: pd.DataFrame  # mode, step, medians of the drift metrics, n_items
    manifold: pd.DataFrame  # mode, item, step, max_cos, nearest, norm_ratio, knn_dist, prev_cos
    lens: pd.DataFrame  # mode, step, layer, median gold rank, mean gold prob, median entropy, readable fraction
    retention: pd.DataFrame  # mode, fact_step, eval_step, gap, r2, round_acc
    accuracy: pd.DataFrame  # mode, n_steps, accuracy, n_items
    items: pd.DataFrame  # mode, item, answer text, parsed, correct, thought text
    timings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Accuracy as a mode x n_steps table (``direct`` in the 0 column)."""
        return accuracy_table(self)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables a notebook records in its manifest (all tables go to CSV by ``save_drift_result``)."""
        return {"accuracy_table": self.summary().reset_index(), "drift_by_step_table": self.steps}

    def figures(self) -> dict[str, go.Figure]:
        """Drift metrics by step, the lens by step and layer, accuracy by steps, and retention if measured."""
        figures = {
            "drift_by_step": plots.drift_by_step(self.steps),
            "lens_step_layer": plots.lens_step_layer(self.lens),
            "accuracy_by_steps": plots.accuracy_by_steps(self.accuracy),
        }
        if not self.retention.empty:
            figures["retention_by_gap"] = plots.retention_by_gap(self.retention)
        return figures


def run_drift_study(cfg: DriftConfig | None = None, *, model: Model | None = None, progress: bool = True) -> DriftResult:
    """Every loop mode on the same items, instrumented at ``n_steps``, then accuracy over ``steps_grid``.
    ``progress``: a tqdm bar over the runs (one per mode, then one per extra step count)."""
    cfg = cfg or DriftConfig()
    t_start = time.perf_counter()
    model = model or load_model(cfg.model)
    rs = make_reasoning_task(cfg.task, cfg.n_items, n_hops=cfg.n_hops, seed=cfg.seed)
    layer = model.n_layers // 2 if cfg.retention_layer is None else cfg.retention_layer
    if not 0 <= layer <= model.n_layers:
        raise ValueError(f"retention_layer {layer} out of range: 0..{model.n_layers}")
    steps, manifold, lens, retention, accuracy, items = [], [], [], [], [], []
    timings: dict[str, float] = {}

    def config(mode: str, n: int) -> LatentConfig:
        extra = cfg.soft if mode == "soft" else {}
        return LatentConfig(mode=mode, n_steps=0 if mode == "direct" else n, seed=cfg.seed,
                            batch_size=cfg.batch_size, **extra)

    grid = [(mode, n) for mode in cfg.modes if mode != "direct" for n in cfg.steps_grid if n != cfg.n_steps]
    bar = tqdm(total=len(cfg.modes) + len(grid), desc=f"drift {model.name}", unit="run", disable=not progress)
    for mode in cfg.modes:
        bar.set_postfix_str(f"{mode}, {cfg.n_steps} steps, instrumented")
        t0 = time.perf_counter()
        run = run_latent(model, rs, config(mode, cfg.n_steps))
        n = 0 if mode == "direct" else cfg.n_steps
        accuracy.append({"mode": mode, "n_steps": n, "accuracy": run.accuracy, "n_items": len(rs)})
        items.append(run.items.assign(mode=mode))
        if mode != "direct":
            man = manifold_metrics(model, run)
            lz = lens_metrics(model, run, rs)
            steps.append(step_summary(man, lz, run).assign(mode=mode))
            manifold.append(man.assign(mode=mode))
            lens.append(lens_by_step_layer(lz).assign(mode=mode))
            if cfg.task == "arithmetic":
                retention.append(fact_retention(run, rs, layer, seed=cfg.seed).assign(mode=mode))
        timings[f"run_{mode}"] = round(time.perf_counter() - t0, 2)
        bar.update()
    t0 = time.perf_counter()
    for mode, n in grid:  # n_steps itself was measured above
        bar.set_postfix_str(f"{mode}, {n} steps")
        run = run_latent(model, rs, config(mode, n))
        accuracy.append({"mode": mode, "n_steps": n, "accuracy": run.accuracy, "n_items": len(rs)})
        bar.update()
    bar.close()
    timings["steps_grid"] = round(time.perf_counter() - t0, 2)
    timings["total"] = round(time.perf_counter() - t_start, 2)

    def cat(frames, first=("mode",)):
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True)
        return df[list(first) + [c for c in df.columns if c not in first]]

    return DriftResult(
        config=asdict(cfg) | {"retention_layer": layer},
        model=model.name,
        weights_hash=model.weights_hash,
        steps=cat(steps),
        manifold=cat(manifold),
        lens=cat(lens),
        retention=cat(retention),
        accuracy=cat([pd.DataFrame(accuracy).sort_values(["mode", "n_steps"])]),
        items=cat(items),
        timings=timings,
    )


TABLES = ("steps", "manifold", "lens", "retention", "accuracy", "items")


def save_drift_result(result: DriftResult, out_dir: str | Path) -> dict[str, Path]:
    """Every table as CSV plus ``study.json`` (model, weights hash, config, timings) in ``out_dir``."""

    return write_result_tables(out_dir, {name: getattr(result, name) for name in TABLES}, {
        "model": result.model, "weights_hash": result.weights_hash, "config": result.config,
        "timings": result.timings})


def accuracy_table(result: DriftResult, modes: Sequence[str] | None = None) -> pd.DataFrame:
    """Accuracy as a mode x n_steps table (``direct`` in the 0 column)."""
    acc = result.accuracy if modes is None else result.accuracy[result.accuracy["mode"].isin(modes)]
    return acc.pivot_table(index="mode", columns="n_steps", values="accuracy")
