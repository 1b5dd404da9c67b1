"""The latent-drift study: every mode on the same items, drift metrics per step, accuracy against n_steps.

:func:`run_drift_study` runs, for one model and task:

1. every mode of :mod:`workbench.methods.latent` at ``n_steps`` (``direct`` with none), instrumented at every layer;
2. the drift metrics of :mod:`workbench.studies.latent_drift.metrics` per step, the lens as a step x layer table, fact retention;
3. accuracy against the number of steps, for each thinking mode at every value of ``steps_grid``.

Results are small dataframes in :class:`DriftResult`; :func:`save_drift_result` writes them as CSV.
"""

from __future__ import annotations

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
from workbench.studies.notebook import NotebookConfig, Phases, choice, each_in, each_int, int_range, positive_int


@dataclass
class DriftConfig(NotebookConfig):
    # notebook 04's parameters -> fields (see workbench.studies.notebook); a smoke run sizes the last three itself
    NOTEBOOK = {"model": "model", "modes": "modes", "task": "task", "n_hops": "n_hops", "soft": "soft",
                "seed": "seed", "n_steps": "n_steps", "steps_grid": "steps_grid", "n_items": "n_items"}
    SMOKE_SIZED = ("n_steps", "steps_grid", "n_items")

    model: str = DEFAULT_MODEL
    task: str = choice("arithmetic", REASONING_TASKS)
    modes: tuple[str, ...] = each_in(MODES, MODES, non_empty=True)
    n_steps: int = int_range(6, 1, MAX_STEPS)  # thinking steps of the instrumented runs
    n_hops: int = 2  # reasoning steps the task needs (arithmetic operations / graph edges): a=3; b=a+4; c=b*2
    n_items: int = positive_int(100, minimum=8)  # >= 8: fact retention splits them
    # accuracy against n_steps (uninstrumented metrics only)
    steps_grid: tuple[int, ...] = each_int((1, 2, 4, 6, 8), lo=1, hi=MAX_STEPS)
    retention_layer: int | None = None  # None: the middle layer
    seed: int = 0
    soft: dict = field(default_factory=dict)  # LatentConfig overrides for mode "soft" (e.g. gumbel_tau=0.5)
    batch_size: int = 50  # decoding is bound by reading the weights: big batches cut the number of passes
    smoke: bool = False

    def __post_init__(self):
        super().__post_init__()
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

    def save(self, out_dir: str | Path, model: Model | None = None) -> dict[str, Path]:
        """Every table as CSV plus ``study.json`` (:func:`save_drift_result`; ``model`` is not needed)."""
        return save_drift_result(self, out_dir)


def _loop_config(cfg: DriftConfig, mode: str, n: int) -> LatentConfig:
    extra = cfg.soft if mode == "soft" else {}
    return LatentConfig(mode=mode, n_steps=0 if mode == "direct" else n, seed=cfg.seed, batch_size=cfg.batch_size,
                        **extra)


def instrumented_mode(model: Model, rs, cfg: DriftConfig, mode: str, layer: int) -> dict:
    """Phase ``run_<mode>``: one mode at ``n_steps``, instrumented: its accuracy row, items, and (thinking modes)
    the drift metrics per step, the lens by step and layer and, on arithmetic, fact retention at ``layer``."""
    run = run_latent(model, rs, _loop_config(cfg, mode, cfg.n_steps))
    n = 0 if mode == "direct" else cfg.n_steps
    out = {"accuracy": {"mode": mode, "n_steps": n, "accuracy": run.accuracy, "n_items": len(rs)},
           "items": run.items.assign(mode=mode)}
    if mode != "direct":
        man = manifold_metrics(model, run)
        lz = lens_metrics(model, run, rs)
        out |= {"steps": step_summary(man, lz, run).assign(mode=mode), "manifold": man.assign(mode=mode),
                "lens": lens_by_step_layer(lz).assign(mode=mode)}
        if cfg.task == "arithmetic":
            out["retention"] = fact_retention(run, rs, layer, seed=cfg.seed).assign(mode=mode)
    return out


def steps_grid_accuracy(model: Model, rs, cfg: DriftConfig, grid: list[tuple[str, int]], bar=None) -> list[dict]:
    """Phase ``steps_grid``: accuracy of each (thinking mode, step count) of ``grid`` (uninstrumented)."""
    rows = []
    for mode, n in grid:  # n_steps itself was measured by the instrumented runs
        if bar is not None:
            bar.set_postfix_str(f"{mode}, {n} steps")
        run = run_latent(model, rs, _loop_config(cfg, mode, n))
        rows.append({"mode": mode, "n_steps": n, "accuracy": run.accuracy, "n_items": len(rs)})
        if bar is not None:
            bar.update()
    return rows


def run_drift_study(cfg: DriftConfig | None = None, *, model: Model | None = None, progress: bool = True) -> DriftResult:
    """Every loop mode on the same items, instrumented at ``n_steps`` (phase ``run_<mode>`` each,
    :func:`instrumented_mode`), then accuracy over ``steps_grid`` (phase ``steps_grid``).
    ``progress``: a tqdm bar over the runs (one per mode, then one per extra step count)."""
    cfg = cfg or DriftConfig()
    phases = Phases()
    model = model or load_model(cfg.model)
    rs = make_reasoning_task(cfg.task, cfg.n_items, n_hops=cfg.n_hops, seed=cfg.seed)
    layer = model.n_layers // 2 if cfg.retention_layer is None else cfg.retention_layer
    if not 0 <= layer <= model.n_layers:
        raise ValueError(f"retention_layer {layer} out of range: 0..{model.n_layers}")
    parts: dict[str, list] = {k: [] for k in ("steps", "manifold", "lens", "retention", "accuracy", "items")}

    grid = [(mode, n) for mode in cfg.modes if mode != "direct" for n in cfg.steps_grid if n != cfg.n_steps]
    bar = tqdm(total=len(cfg.modes) + len(grid), desc=f"drift {model.name}", unit="run", disable=not progress)
    for mode in cfg.modes:
        bar.set_postfix_str(f"{mode}, {cfg.n_steps} steps, instrumented")
        for name, value in phases.run(f"run_{mode}", instrumented_mode, model, rs, cfg, mode, layer).items():
            parts[name].append(value)
        bar.update()
    parts["accuracy"] += phases.run("steps_grid", steps_grid_accuracy, model, rs, cfg, grid, bar)
    bar.close()
    timings = phases.finish()

    def cat(frames, first=("mode",)):
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True)
        return df[list(first) + [c for c in df.columns if c not in first]]

    return DriftResult(
        config=asdict(cfg) | {"retention_layer": layer},
        model=model.name,
        weights_hash=model.weights_hash,
        steps=cat(parts["steps"]),
        manifold=cat(parts["manifold"]),
        lens=cat(parts["lens"]),
        retention=cat(parts["retention"]),
        accuracy=cat([pd.DataFrame(parts["accuracy"]).sort_values(["mode", "n_steps"])]),
        items=cat(parts["items"]),
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
