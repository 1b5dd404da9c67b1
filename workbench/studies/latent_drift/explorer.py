"""The latent-step scrubber of the drift study: step slider; the lens at that step by layer and the drift
metrics, marked at it.

    from workbench.studies.latent_drift.explorer import latent_scrubber
    latent_scrubber(drift_result)

The metrics are computed once, from runs already made; moving the slider only re-renders.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path

import ipywidgets as w
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.methods.latent import LatentRun
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme
from workbench.studies.latent_drift.metrics import lens_by_step_layer, lens_metrics, manifold_metrics, step_summary
from workbench.studies.latent_drift.study import DriftResult
from workbench.ui.base import Explorer, resolve_display, static

SCRUB_LENS_VALUES = ("mean_gold_prob", "median_gold_rank", "median_entropy", "readable")
SCRUB_METRICS = {  # drift metric -> panel title (per step, medians over items, last layer for the lens ones)
    "max_cos": "max cos to an embedding",
    "norm_ratio": "norm / mean emb. norm",
    "prev_cos": "cos with previous step",
    "top1_prob": "lens top-1 prob. (last layer)",
    "kl_to_final": "KL(step ‖ final step)",
}


class DriftTables:
    """Per-step drift metrics (``steps``: mode, step, max_cos, ...) and the lens by step and layer (``lens``:
    mode, step, layer, mean_gold_prob, ...), from a DriftResult, its folder, or latent runs (computed once)."""

    def __init__(self, steps: pd.DataFrame, lens: pd.DataFrame, *, model_name: str, n_computations: int = 0):
        for name, frame, cols in (("steps", steps, ("mode", "step")), ("lens", lens, ("mode", "step", "layer"))):
            missing = [c for c in cols if c not in frame.columns]
            if missing or frame.empty:
                raise ValueError(f"the {name} table lacks {missing or 'rows'}; it needs columns {list(cols)}")
        self.steps, self.lens = steps, lens
        self.model_name = model_name
        self.modes = [m for m in dict.fromkeys(steps["mode"]) if m in set(lens["mode"])]
        if not self.modes:
            raise ValueError("no latent mode has both per-step metrics and lens rows (direct answers have no steps)")
        self.n_computations = n_computations

    def n_steps(self, mode: str) -> int:
        return int(self.steps.loc[self.steps["mode"] == mode, "step"].max())


def _drift_source(source, model, reasoning) -> DriftTables:

    if isinstance(source, DriftResult):
        return DriftTables(source.steps, source.lens, model_name=source.model)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source)
        missing = [f for f in ("steps.csv", "lens.csv") if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"{folder} lacks {missing}: not a latent-drift results folder (save_drift_result)")
        meta = json.loads((folder / "study.json").read_text()) if (folder / "study.json").is_file() else {}
        return DriftTables(pd.read_csv(folder / "steps.csv"), pd.read_csv(folder / "lens.csv"),
                           model_name=meta.get("model", folder.name))
    runs = {source.config["mode"]: source} if isinstance(source, LatentRun) else source
    if isinstance(runs, Mapping) and runs and all(isinstance(r, LatentRun) for r in runs.values()):
        if model is None or reasoning is None:
            raise ValueError("latent runs need model= (the model that ran them) and reasoning= (their ReasoningSet)")
        bad = {m: r.states.shape[0] for m, r in runs.items() if r.states.shape[0] != len(reasoning)}
        if bad:
            raise ValueError(f"runs {bad} have a different number of items than the ReasoningSet ({len(reasoning)})")
        steps, lens = [], []
        for mode, run in runs.items():
            if run.states.shape[1] == 0:
                continue  # direct: no latent steps to scrub
            man, lz = manifold_metrics(model, run), lens_metrics(model, run, reasoning)
            steps.append(step_summary(man, lz, run).assign(mode=mode))
            lens.append(lens_by_step_layer(lz).assign(mode=mode))
        if not steps:
            raise ValueError("every run given answered directly (0 steps): nothing to scrub")
        return DriftTables(pd.concat(steps, ignore_index=True), pd.concat(lens, ignore_index=True),
                           model_name=model.name, n_computations=len(steps))
    raise TypeError(f"latent_scrubber needs a DriftResult, a drift results folder, a LatentRun or a dict "
                    f"{{mode: LatentRun}}; got {type(source).__name__}")


def scrub_figure(tables: DriftTables, mode: str, step: int, lens_value: str = "mean_gold_prob") -> go.Figure:
    """The lens at latent ``step`` by layer (other steps faint) and the drift metrics by step, marked at ``step``."""
    if mode not in tables.modes:
        raise ValueError(f"unknown mode {mode!r}; these results have {tables.modes}")
    S = tables.n_steps(mode)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 1 <= step <= S:
        raise ValueError(f"step must be an int in 1..{S} for mode {mode!r}, got {step!r}")
    if lens_value not in SCRUB_LENS_VALUES:
        raise ValueError(f"lens_value must be one of {list(SCRUB_LENS_VALUES)}, got {lens_value!r}")
    steps = tables.steps[tables.steps["mode"] == mode].sort_values("step")
    lens = tables.lens[tables.lens["mode"] == mode]
    metrics = [m for m in SCRUB_METRICS if m in steps.columns]
    fig = make_subplots(rows=2, cols=3, horizontal_spacing=0.08, vertical_spacing=0.2,
                        subplot_titles=[f"lens {lens_value.replace('_', ' ')} at step {step}"]
                        + [SCRUB_METRICS[m] for m in metrics])
    for k in range(1, S + 1):  # every step faint, the chosen one bold
        sub = lens[lens.step == k].sort_values("layer")
        chosen = k == step
        fig.add_trace(go.Scatter(x=sub.layer, y=sub[lens_value], mode="lines+markers" if chosen else "lines",
                                 name=f"step {k}", showlegend=False,
                                 line=dict(color=PAPER_COLORWAY[1] if chosen else "#bbbbbb",
                                           width=3 if chosen else 1),
                                 hovertemplate=f"step {k}<br>layer %{{x}}<br>%{{y:.3g}}<extra></extra>"),
                      row=1, col=1)
    at = steps.set_index("step").loc[step]
    for i, metric in enumerate(metrics, start=1):
        r, c = divmod(i, 3)
        fig.add_trace(go.Scatter(x=steps.step, y=steps[metric], mode="lines+markers", showlegend=False,
                                 line=dict(color=PAPER_COLORWAY[0]), name=metric), row=r + 1, col=c + 1)
        fig.add_trace(go.Scatter(x=[step], y=[at[metric]], mode="markers", showlegend=False, name=f"step {step}",
                                 marker=dict(size=12, color=PAPER_COLORWAY[1], symbol="diamond")),
                      row=r + 1, col=c + 1)
        fig.update_xaxes(title_text="latent step", dtick=1, row=r + 1, col=c + 1)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    if lens_value == "median_gold_rank":
        fig.update_yaxes(type="log", autorange="reversed", row=1, col=1)

    def fmt(metric):
        v = at.get(metric, np.nan)
        return "–" if pd.isna(v) else f"{v:.3g}"

    apply_theme(fig)
    fig.update_layout(title=f"{html.escape(tables.model_name)} · {mode} · step {step} of {S}: max cos "
                            f"{fmt('max_cos')}, norm ×{fmt('norm_ratio')}, lens top-1 {fmt('top1_prob')}, "
                            f"gold rank {fmt('gold_rank')}", width=1100, height=620)
    fig.update_annotations(font_size=13)
    return fig


class LatentScrubber(Explorer):
    """The latent-step scrubber widget (made by :func:`latent_scrubber`): controls ``latent_mode``, ``step``,
    ``lens_value``; ``figure`` (a FigureWidget) and ``status``."""

    css_class = "workbench-latent-scrubber"

    def __init__(self, tables: DriftTables, mode: str, step: int, lens_value: str):
        self.tables = tables
        self.latent_mode = w.Dropdown(options=tables.modes, value=mode, description="mode")
        self.lens_value = w.Dropdown(options=list(SCRUB_LENS_VALUES), value=lens_value, description="lens")
        self.step = w.IntSlider(value=step, min=1, max=tables.n_steps(mode), description="step",
                                continuous_update=False)
        super().__init__(tables, [w.HBox([self.latent_mode, self.lens_value]), self.step],
                         view=(self.step, self.lens_value), inputs=(self.latent_mode,))

    def render(self) -> go.Figure:
        return scrub_figure(self.tables, self.latent_mode.value, self.step.value, self.lens_value.value)

    def on_input(self) -> None:
        with self.quiet():
            S = self.tables.n_steps(self.latent_mode.value)
            self.step.max = S
            self.step.value = min(self.step.value, S)


def latent_scrubber(source, *, model=None, reasoning=None, latent_mode: str | None = None, step: int = 1,
                    lens_value: str = "mean_gold_prob", display: str = "auto"):
    """Latent-step scrubber: step slider; the lens at that step by layer and the drift metrics, marked at it.

    source: a :class:`workbench.studies.latent_drift.study.DriftResult`, a folder written by ``save_drift_result`` (e.g.
    ``figures/04_latent_drift``), a :class:`workbench.methods.latent.LatentRun` or ``{mode: LatentRun}`` (then ``model``
    and ``reasoning``, the ReasoningSet the runs answered, are needed: the drift metrics are computed once here).
    latent_mode: the loop mode shown first (default: the first with latent steps). lens_value: one of
    ``SCRUB_LENS_VALUES``. Returns the widget, or a :class:`StaticFigure` when ``display`` resolves to static.
    """
    kind = resolve_display(display)
    if lens_value not in SCRUB_LENS_VALUES:
        raise ValueError(f"lens_value must be one of {list(SCRUB_LENS_VALUES)}, got {lens_value!r}")
    tables = _drift_source(source, model, reasoning)
    latent_mode = tables.modes[0] if latent_mode is None else latent_mode
    fig = scrub_figure(tables, latent_mode, step, lens_value)  # checks mode and step before any widget exists
    if kind == "static":
        return static(fig)
    return LatentScrubber(tables, latent_mode, step, lens_value)


