"""The probe explorer of the counting study: task and seed choice, layer slider, held-out R² and |cos| curves,
predicted against true counts.

    from workbench.studies.counting_readout.explorer import probe_explorer
    probe_explorer(counting_result, model=model)

Probes are fitted once per (task, seed) (one feature pass); the layer slider only re-renders.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

import ipywidgets as w
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.core.models import Model, load_model
from workbench.core.sites import check_layers
from workbench.data.tasks import TASKS
from workbench.plotting.curves import band
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme
from workbench.studies.counting_readout.study import CountingConfig, CountingResult, task_probes
from workbench.ui.base import Explorer, resolve_display, static


class ProbeData:
    """Curves (held-out R², |cos| with the digit rows) per task and seed, and held-out predictions per layer.

    Saved results give the curves; the predictions need the model (one feature pass per task and seed, cached).
    A live source computes both with :func:`workbench.studies.counting_readout.study.task_probes`.
    """

    def __init__(self, *, model, cfg, tables: dict | None, weights_hash: str | None):
        self.cfg = cfg
        self.model = model  # a workbench Model or None
        self._saved = tables  # {"probes": df, "geometry": df} or None (live)
        self._live: dict[tuple[str, int], object] = {}
        self.n_computations = 0
        if model is not None and weights_hash is not None and model.weights_hash != weights_hash:
            raise ValueError(f"the results were made with weights {weights_hash[:12]}…, but the model given "
                             f"({model.name}) has weights {model.weights_hash[:12]}…: pass the same model")
        if tables is not None:
            probes = tables["probes"]
            self.tasks = list(dict.fromkeys(probes.task))
            self.seeds = sorted({int(s) for s in probes.seed})
            self.layers = sorted({int(x) for x in probes.layer})
        else:
            self.tasks = list(cfg.tasks)
            self.seeds = list(cfg.seeds)
            L = model.n_layers
            self.layers = check_layers(cfg.layers, L)

    @property
    def has_predictions(self) -> bool:
        return self.model is not None

    def _check(self, task: str, seed: int) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this explorer has {self.tasks}")
        if seed not in self.seeds:
            raise ValueError(f"unknown seed {seed!r}; this explorer has {self.seeds}")

    def live(self, task: str, seed: int):
        """:class:`workbench.studies.counting_readout.study.TaskProbes` of (task, seed), computed once."""

        self._check(task, seed)
        if self.model is None:
            raise ValueError("predictions need the model: pass model=...")
        key = (task, seed)
        if key not in self._live:
            self._live[key] = task_probes(self.model, task, seed, self.cfg, self.layers)
            self.n_computations += 1
        return self._live[key]

    def curves(self, task: str, seed: int) -> pd.DataFrame:
        """layer, r2_test, round_acc_test, cos_mean, random_lo, random_hi, random_baseline for (task, seed)."""
        self._check(task, seed)
        if self._saved is not None:
            p = self._saved["probes"]
            p = p[(p.task == task) & (p.seed == seed) & (p.get("variant", "last_token") == "last_token")]
            g = self._saved["geometry"]
            g = g[(g.task == task) & (g.seed == seed) & (g.get("basis", "raw") == "raw")]  # the live view's basis
        else:
            tp = self.live(task, seed)
            p, g = tp.table, tp.geometry
        cols = ["layer", "cos_mean", "random_lo", "random_hi", "random_baseline"]
        out = p[["layer", "r2_test", "round_acc_test"]].merge(g[cols], on="layer", how="left")
        return out.sort_values("layer").reset_index(drop=True)


def probe_figure(curves: pd.DataFrame, layer: int, *, task: str, seed: int, model_name: str,
                 y_true: np.ndarray | None = None, y_pred: np.ndarray | None = None) -> go.Figure:
    """Held-out R² and |cos| with the digit rows by layer (marker at ``layer``), and predicted against true
    counts at ``layer`` (or, without predictions, that panel's title says how to get them)."""
    if layer not in set(curves.layer):
        raise ValueError(f"layer {layer} not among the probed layers {sorted(curves.layer)}")
    row = curves.set_index("layer").loc[layer]
    has_pred = y_true is not None and y_pred is not None
    third = (f"predicted vs true, layer {layer}" if has_pred
             else "predicted vs true: needs the model (model=...)")
    fig = make_subplots(rows=1, cols=3, subplot_titles=["held-out R² by layer", "|cos| with the digit rows",
                                                        third], horizontal_spacing=0.09)
    blue, orange, green = PAPER_COLORWAY[0], PAPER_COLORWAY[1], PAPER_COLORWAY[2]
    x = curves.layer
    fig.add_trace(go.Scatter(x=x, y=curves.r2_test, mode="lines+markers", name="held-out R²",
                             line=dict(color=blue), marker=dict(size=4)), row=1, col=1)
    fig.add_trace(go.Scatter(x=[layer], y=[row.r2_test], mode="markers", name=f"layer {layer}",
                             marker=dict(size=12, color=orange, symbol="diamond"), showlegend=False), row=1, col=1)
    rnd = curves.dropna(subset=["random_lo"])
    band(fig, rnd.layer, rnd.random_lo, rnd.random_hi, color="gray", opacity=0.2, name="random directions (95 %)",
         showlegend=True, mode="lines", row=1, col=2)
    fig.add_trace(go.Scatter(x=rnd.layer, y=rnd.random_baseline, mode="lines", name="√(2/(πd))",
                             line=dict(color="gray", dash="dot")), row=1, col=2)
    fig.add_trace(go.Scatter(x=x, y=curves.cos_mean, mode="lines+markers", name="mean |cos|",
                             line=dict(color=green), marker=dict(size=4)), row=1, col=2)
    fig.add_trace(go.Scatter(x=[layer], y=[row.cos_mean], mode="markers", showlegend=False,
                             marker=dict(size=12, color=orange, symbol="diamond")), row=1, col=2)
    if has_pred:
        y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
        lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    else:
        y_true = y_pred = np.array([])
        lo, hi = 1.0, 9.0
    fig.add_trace(go.Scatter(x=y_true, y=y_pred, mode="markers", name="held-out prompts",
                             marker=dict(size=6, color=blue, opacity=0.5),
                             hovertemplate="true %{x}<br>predicted %{y:.2f}<extra></extra>"), row=1, col=3)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="predicted = true",
                             line=dict(color="black", dash="dash", width=1)), row=1, col=3)
    acc = "" if pd.isna(row.round_acc_test) else f", round acc {row.round_acc_test:.0%}"
    cos = "" if pd.isna(row.cos_mean) else f", |cos| {row.cos_mean:.3f}"
    apply_theme(fig)
    fig.update_layout(title=f"{html.escape(model_name)} · {task} (seed {seed}) · layer {layer}: "
                            f"R² {row.r2_test:.3f}{acc}{cos}", width=1150, height=420,
                      legend=dict(orientation="h", y=-0.22, x=0))
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=2)
    fig.update_xaxes(title_text="true count", row=1, col=3)
    fig.update_yaxes(title_text="R²", range=[min(-0.1, float(curves.r2_test.min()) - 0.05), 1.02], row=1, col=1)
    fig.update_yaxes(title_text="predicted count", row=1, col=3)
    return fig


def _counting_source(source, model):
    """(ProbeData, model name) for a CountingResult, a results folder, or a model (live)."""

    def as_model(m):
        return m if (m is None or isinstance(m, Model)) else load_model(m)

    def config_of(config: dict) -> CountingConfig:
        known = CountingConfig.__dataclass_fields__
        return CountingConfig(**{k: v for k, v in config.items() if k in known})

    if isinstance(source, CountingResult):
        cfg = config_of(source.config)
        tables = {"probes": source.probes, "geometry": source.geometry}
        return ProbeData(model=as_model(model), cfg=cfg, tables=tables, weights_hash=source.weights_hash), source.model
    if isinstance(source, (str, os.PathLike)) and (Path(source) / "probes.csv").is_file():
        folder = Path(source)
        missing = [f for f in ("geometry.csv", "study.json") if not (folder / f).is_file()]
        if missing:
            raise ValueError(f"{folder} has probes.csv but lacks {missing}: not a counting-study results folder "
                             "(save_counting_result writes all three)")
        meta = json.loads((folder / "study.json").read_text())
        tables = {"probes": pd.read_csv(folder / "probes.csv"), "geometry": pd.read_csv(folder / "geometry.csv")}
        return (ProbeData(model=as_model(model), cfg=config_of(meta["config"]), tables=tables,
                          weights_hash=meta.get("weights_hash")), meta.get("model", folder.name))
    if isinstance(source, (Model, str)):
        if model is not None:
            raise ValueError("a live probe explorer takes the model as its source; drop model=")
        return None, as_model(source)
    raise TypeError(f"probe_explorer needs a CountingResult, a counting results folder (with probes.csv) or a "
                    f"model / model name; got {type(source).__name__} {source!r}")


class ProbeExplorer(Explorer):
    """The probe explorer widget (made by :func:`probe_explorer`): controls ``task``, ``seed``, ``layer``;
    ``figure`` (a FigureWidget) and ``status``."""

    css_class = "workbench-probe-explorer"
    busy_message = "fitting probes …"

    def __init__(self, data: ProbeData, model_name: str, task: str, seed: int, layer: int):
        self.data = data
        self.model_name = model_name
        self.task = w.Dropdown(options=data.tasks, value=task, description="task")
        self.seed = w.Dropdown(options=data.seeds, value=seed, description="seed")
        self.layer = w.SelectionSlider(options=data.layers, value=layer, description="layer",
                                       continuous_update=False)
        super().__init__(data, [w.HBox([self.task, self.seed]), self.layer], view=(self.layer,),
                         inputs=(self.task, self.seed))

    def render(self) -> go.Figure:
        return _probe_view(self.data, self.model_name, self.task.value, self.seed.value, self.layer.value)


def _probe_view(data: ProbeData, model_name: str, task: str, seed: int, layer: int) -> go.Figure:
    curves = data.curves(task, seed)
    y_true = y_pred = None
    if data.has_predictions:
        tp = data.live(task, seed)
        y_true, y_pred = tp.y_test, tp.predictions[layer]
    return probe_figure(curves, layer, task=task, seed=seed, model_name=model_name, y_true=y_true, y_pred=y_pred)


def probe_explorer(source, *, model=None, task: str | None = None, seed: int | None = None,
                   layer: int | None = None, tasks: Sequence[str] | None = None, n_train: int = 120,
                   n_test: int = 60, display: str = "auto"):
    """Probe explorer: task and seed choice, layer slider, held-out R² and |cos| curves, predicted against true.

    source: a :class:`workbench.studies.counting_readout.study.CountingResult`, a folder written by ``save_counting_result`` (e.g.
    ``figures/02_counting_readout``), or a model / model name for a live run (``tasks``, one ``seed`` (default 11),
    ``n_train`` + ``n_test`` prompts per task). For saved results, ``model`` (the same weights) adds the
    predicted-against-true panel; its probes are refitted on the study's own prompts and split, so they equal the
    study's. Probes are fitted once per (task, seed) (one feature pass); the layer slider only re-renders.
    """

    kind = resolve_display(display)
    data, name = _counting_source(source, model)
    if data is None:  # live
        live_model = name
        tasks = tuple(tasks) if tasks is not None else tuple(TASKS)
        cfg = CountingConfig(model=live_model.name, tasks=tasks, seeds=(11 if seed is None else seed,),
                             n_train=n_train, n_test=n_test, probes_root=None, interventions=())
        data = ProbeData(model=live_model, cfg=cfg, tables=None, weights_hash=None)
        name = live_model.name
    elif tasks is not None:
        raise ValueError("tasks= chooses the tasks of a live run; saved results show the tasks they hold")
    task = data.tasks[0] if task is None else task
    seed = data.seeds[0] if seed is None else seed
    data._check(task, seed)
    if layer is None:
        curves = data.curves(task, seed)
        layer = int(curves.loc[curves.r2_test.idxmax(), "layer"])
    elif layer not in data.layers:
        raise ValueError(f"layer {layer!r} was not probed; probed layers: {data.layers}")
    if kind == "static":
        return static(_probe_view(data, name, task, seed, layer))
    return ProbeExplorer(data, name, task, seed, layer)


