"""Interactive explorers for JupyterLab: ipywidgets + plotly ``FigureWidget``, one function each.

    from workbench.widgets import blur_explorer, lens_explorer, probe_explorer, latent_scrubber
    lens_explorer(model, "The capital of France is")   # JupyterLab: a widget; under `workbench run`: a figure
    probe_explorer(counting_result, model=model)        # task, layer slider, R² and |cos| curves, predicted vs true
    latent_scrubber(drift_result)                       # latent step slider: lens and drift metrics at that step

Display rule (:func:`resolve_display`)
    ``display="widget"``: the widget; ``display="static"``: a static figure; ``display="auto"`` (the default):
    static when ``$WORKBENCH_HEADLESS`` is ``1``/``true``/``yes`` (``workbench run`` sets it for every kernel it
    starts, so papermill runs never hold a widget), or when the code does not run in an IPython kernel (a script);
    the widget otherwise. papermill started by hand runs in a kernel it cannot be told from JupyterLab's: set
    ``WORKBENCH_HEADLESS=1`` (or pass ``display="static"``) there.

Static figures are :class:`StaticFigure`, a plotly ``go.Figure`` whose notebook output carries the plotly JSON
(interactive when the executed notebook is opened in JupyterLab), a PNG rendered by the same Chromium as the saved
figures (viewable anywhere; without a browser it is left out and the text output says why) and a text line.

Caching
    Each explorer keeps every model computation it made, keyed on what it depends on: (model, prompt) for the lens,
    (task, seed) for the probes; the latent scrubber computes its metrics once, from runs already made. Moving a
    slider or picking another view only re-renders the figure from the cache; ``n_computations`` counts the model
    computations. The widget is the explorer itself (an ``ipywidgets.VBox``); ``explorer.figure`` is its
    ``FigureWidget`` and ``explorer.render()`` the ``go.Figure`` of the current view.

    blur_explorer(vlm, visual_result)                   # item, blur slider: the image, the answer, probe curves

The blur explorer caches one forward per (item, blur level): moving back to a level already seen runs nothing.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import ipywidgets as w
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.figures import HEADLESS_ENV, PAPER_COLORWAY, apply_theme

DISPLAYS = ("auto", "widget", "static")
LENS_VALUES = ("prob", "logit")
SCRUB_LENS_VALUES = ("mean_gold_prob", "median_gold_rank", "median_entropy", "readable")
SCRUB_METRICS = {  # drift metric -> panel title (per step, medians over items, last layer for the lens ones)
    "max_cos": "max cos to an embedding",
    "norm_ratio": "norm / mean emb. norm",
    "prev_cos": "cos with previous step",
    "top1_prob": "lens top-1 prob. (last layer)",
    "kl_to_final": "KL(step ‖ final step)",
}


# --------------------------------------------------------------------------------------------------------------
# Display rule and static figures
# --------------------------------------------------------------------------------------------------------------

def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def resolve_display(display: str = "auto") -> str:
    """``"widget"`` or ``"static"`` for a ``display`` argument, by the rule in the module docstring."""
    if display not in DISPLAYS:
        raise ValueError(f"display must be one of {list(DISPLAYS)}, got {display!r}")
    if display != "auto":
        return display
    if os.environ.get(HEADLESS_ENV, "").strip().lower() in {"1", "true", "yes"}:
        return "static"
    return "widget" if _in_kernel() else "static"


class StaticFigure(go.Figure):
    """A ``go.Figure`` whose notebook output is plotly JSON + a PNG + a text line (see the module docstring)."""

    def _repr_mimebundle_(self, include=None, exclude=None, **kwargs):
        from workbench.figures import export_static, find_browser

        fig_json = json.loads(self.to_json())
        bundle = {"application/vnd.plotly.v1+json": {"data": fig_json.get("data", []),
                                                     "layout": fig_json.get("layout", {}),
                                                     "config": {"displaylogo": False}}}
        title = self.layout.title.text or "figure"
        note = ""
        browser, reason = find_browser()
        if browser is None:
            note = f" (no PNG: {reason})"
        else:
            try:
                png = export_static(self, browser, ("png",), png_scale=1)["png"]
                bundle["image/png"] = base64.b64encode(png).decode()
            except Exception as e:  # noqa: BLE001 - reported in the output and as a warning
                note = f" (PNG export failed: {type(e).__name__}: {e})"
                warnings.warn(f"static explorer figure: PNG export failed: {e}", RuntimeWarning, stacklevel=2)
        bundle["text/plain"] = f"<static figure: {html.unescape(_strip_tags(title))}>{note}"
        return bundle

    def _ipython_display_(self):  # plotly's own display hook would bypass the bundle above
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)


def _strip_tags(text: str) -> str:
    return re.sub(r"<[^>]+>", " ", str(text)).strip()


def _static(fig: go.Figure) -> StaticFigure:
    return StaticFigure(fig)


def _fit(fig: go.Figure) -> go.Figure:
    """In a widget the figure takes the width of the notebook's output area (the paper figures' fixed width
    would be cut off); heights stay."""
    return fig.update_layout(width=None, autosize=True)


def _figure_widget(fig: go.Figure):
    return go.FigureWidget(_fit(fig))


def _sync(fw, fig: go.Figure) -> None:
    """Make FigureWidget ``fw`` show ``fig``: traces updated in place when their types match, else replaced."""
    fig = _fit(fig)
    new = [t.to_plotly_json() for t in fig.data]
    if [t.type for t in fw.data] != [t["type"] for t in new]:
        fw.data = ()
        fw.add_traces(list(fig.data))
        new = None
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)  # the same theme every time; not worth sending again
    stale_layout = {k: None for k in fw.layout.to_plotly_json() if k not in layout and k != "template"}
    with fw.batch_update():
        if new is not None:
            for old, spec in zip(fw.data, new, strict=True):
                spec = {k: v for k, v in spec.items() if k not in ("type", "uid")}
                stale = {k: None for k in old.to_plotly_json() if k not in spec and k not in ("type", "uid")}
                old.update(stale | spec, overwrite=True)  # a property the new view does not set is cleared
        fw.layout.update(stale_layout | layout, overwrite=True)


def _rerender(explorer) -> None:
    """Show ``explorer.render()`` in its FigureWidget; an error goes to its status line and the figure keeps the
    last good view."""
    try:
        _sync(explorer.figure, explorer.render())
        explorer.status.value = ""
    except Exception as e:  # noqa: BLE001 - shown in the widget
        explorer.status.value = f"<span style='color:#b00'>{html.escape(f'{type(e).__name__}: {e}')}</span>"


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# --------------------------------------------------------------------------------------------------------------
# Logit-lens explorer
# --------------------------------------------------------------------------------------------------------------

class LensData:
    """The lens explorer's models and its cache of lens frames keyed on (model name, prompt)."""

    def __init__(self, models, *, top_k: int = 5):
        from workbench.models import Model

        if isinstance(models, (Model, str)):
            models = [models]
        if isinstance(models, Mapping):
            entries = dict(models)
        elif isinstance(models, Sequence) and models:
            entries = {}
            for m in models:
                if not isinstance(m, (Model, str)):
                    raise TypeError(f"each model must be a workbench Model or a model name, got {type(m).__name__}")
                entries[m if isinstance(m, str) else m.name] = m
        else:
            raise ValueError(f"models must be a Model, a model name, or a non-empty list/dict of them; got {models!r}")
        if not entries:
            raise ValueError("models is empty: give at least one Model or model name")
        bad = {k: type(v).__name__ for k, v in entries.items() if not isinstance(v, (Model, str))}
        if bad:
            raise TypeError(f"models must map names to workbench Models or model names; bad entries: {bad}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        self.models = entries
        self.top_k = top_k
        self._loaded: dict[str, Model] = {k: v for k, v in entries.items() if isinstance(v, Model)}
        self._frames: dict[tuple[str, str], pd.DataFrame] = {}
        self.n_computations = 0

    def model(self, name: str):
        if name not in self.models:
            raise ValueError(f"unknown model {name!r}; this explorer has {list(self.models)}")
        if name not in self._loaded:
            from workbench.models import load_model

            self._loaded[name] = load_model(self.models[name])
        return self._loaded[name]

    def frame(self, name: str, prompt: str) -> pd.DataFrame:
        """The lens of ``prompt`` on model ``name``: every layer, every position, top-k (cached)."""
        from workbench.lens import logit_lens

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}")
        key = (name, prompt)
        if key not in self._frames:
            self._frames[key] = logit_lens(self.model(name), [prompt], layers=None, positions="all",
                                           top_k=self.top_k)
            self.n_computations += 1
        return self._frames[key]


def _check_range(name: str, value, lo: int, hi: int) -> tuple[int, int]:
    if value is None:
        return lo, hi
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value))
    if not ok or not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name} must be a (first, last) pair of ints with {lo} <= first <= last <= {hi}, "
                         f"got {value!r}")
    return int(value[0]), int(value[1])


def lens_figure(frame: pd.DataFrame, *, model_name: str, prompt: str, layers: tuple[int, int],
                positions: tuple[int, int], value: str = "prob") -> go.Figure:
    """The explorer's view: :func:`workbench.plots.lens_heatmap` of the chosen layer and position ranges."""
    from workbench.plots import lens_heatmap

    sub = frame[frame.layer.between(*layers) & frame.position.between(*positions)]
    if sub.empty:
        raise ValueError(f"no lens rows for layers {layers} and positions {positions}")
    title = (f"{html.escape(model_name)} · “{html.escape(_short(prompt))}” · layers {layers[0]}–{layers[1]}, "
             f"positions {positions[0]}–{positions[1]}")
    return lens_heatmap(sub, prompt_idx=0, value=value, title=title)


def _n_positions(frame: pd.DataFrame) -> int:
    return int(frame.position.max()) + 1


class LensExplorer(w.VBox):
    """The logit-lens explorer widget (made by :func:`lens_explorer`): controls ``model_choice``, ``prompt``,
    ``layers``, ``positions``, ``colour``; ``figure`` (a FigureWidget) and ``status`` (errors, progress)."""

    def __init__(self, data: LensData, model_name: str, prompt: str, layers, positions, value: str):
        self.data = data
        self._busy = False
        frame = data.frame(model_name, prompt)
        L = data.model(model_name).n_layers
        n = _n_positions(frame)
        self.model_choice = w.Dropdown(options=list(data.models), value=model_name, description="model")
        self.prompt = w.Text(value=prompt, description="prompt", continuous_update=False,
                             layout=w.Layout(width="70%"))
        self.layers = w.IntRangeSlider(value=layers, min=0, max=L, description="layers",
                                       continuous_update=False)
        self.positions = w.IntRangeSlider(value=positions, min=0, max=n - 1, description="positions",
                                          continuous_update=False)
        self.colour = w.ToggleButtons(options=list(LENS_VALUES), value=value, description="colour")
        self.status = w.HTML(value="")
        self.figure = _figure_widget(self.render())
        for control in (self.layers, self.positions, self.colour):
            control.observe(self._on_view, names="value")
        self.prompt.observe(self._on_input, names="value")
        self.model_choice.observe(self._on_input, names="value")
        super().__init__([w.HBox([self.model_choice, self.colour]), self.prompt,
                          w.HBox([self.layers, self.positions]), self.status, self.figure])
        self.add_class("workbench-lens-explorer")

    @property
    def n_computations(self) -> int:
        return self.data.n_computations

    def render(self) -> go.Figure:
        frame = self.data.frame(self.model_choice.value, self.prompt.value)
        return lens_figure(frame, model_name=self.model_choice.value, prompt=self.prompt.value,
                           layers=tuple(self.layers.value), positions=tuple(self.positions.value),
                           value=self.colour.value)

    def _show(self) -> None:
        _rerender(self)

    def _on_view(self, change) -> None:
        if not self._busy:
            self._show()

    def _on_input(self, change) -> None:
        name, prompt = self.model_choice.value, self.prompt.value
        self.status.value = "computing the lens …"
        try:
            frame = self.data.frame(name, prompt)
            L = self.data.model(name).n_layers
        except Exception as e:  # noqa: BLE001 - a bad prompt is reported in the widget, not raised
            self.status.value = f"<span style='color:#b00'>{html.escape(f'{type(e).__name__}: {e}')}</span>"
            return
        self._busy = True
        try:
            n = _n_positions(frame)
            lo, hi = self.layers.value
            self.layers.max = L
            self.layers.value = (min(lo, L), min(hi, L))
            self.positions.max = n - 1
            self.positions.value = (0, n - 1)
        finally:
            self._busy = False
        self._show()


def lens_explorer(models, prompt: str = "The capital of France is", *, layers=None, positions=None,
                  value: str = "prob", top_k: int = 5, display: str = "auto"):
    """Logit-lens explorer: prompt box, model choice, layer and position ranges, heatmap with hover.

    models: a workbench ``Model``, a model name (loaded on first use), or a list / ``{label: model}`` dict of them
    (the model dropdown). prompt: the first prompt. layers / positions: ``(first, last)`` to show (default all).
    value: the colour, ``"prob"`` or ``"logit"`` of the top-1 token. Returns the widget, or a :class:`StaticFigure`
    of that view when ``display`` resolves to static (:func:`resolve_display`). One lens computation per
    (model, prompt); changing only the view re-renders from the cache.
    """
    kind = resolve_display(display)
    if value not in LENS_VALUES:
        raise ValueError(f"value must be one of {list(LENS_VALUES)}, got {value!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    data = LensData(models, top_k=top_k)
    name = next(iter(data.models))
    L = data.model(name).n_layers
    layers = _check_range("layers", layers, 0, L)
    frame = data.frame(name, prompt)
    positions = _check_range("positions", positions, 0, _n_positions(frame) - 1)
    if kind == "static":
        return _static(lens_figure(frame, model_name=name, prompt=prompt, layers=layers, positions=positions,
                                   value=value))
    return LensExplorer(data, name, prompt, layers, positions, value)


# --------------------------------------------------------------------------------------------------------------
# Probe explorer
# --------------------------------------------------------------------------------------------------------------

class ProbeData:
    """Curves (held-out R², |cos| with the digit rows) per task and seed, and held-out predictions per layer.

    Saved results give the curves; the predictions need the model (one feature pass per task and seed, cached).
    A live source computes both with :func:`workbench.counting.task_probes`.
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
            self.layers = sorted({int(x) for x in cfg.layers}) if cfg.layers is not None else list(range(L + 1))

    @property
    def has_predictions(self) -> bool:
        return self.model is not None

    def _check(self, task: str, seed: int) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this explorer has {self.tasks}")
        if seed not in self.seeds:
            raise ValueError(f"unknown seed {seed!r}; this explorer has {self.seeds}")

    def live(self, task: str, seed: int):
        """:class:`workbench.counting.TaskProbes` of (task, seed), computed once."""
        from workbench.counting import task_probes

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
            g = g[(g.task == task) & (g.seed == seed)]
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
    band = curves.dropna(subset=["random_lo"])
    fig.add_trace(go.Scatter(x=list(band.layer) + list(band.layer)[::-1],
                             y=list(band.random_hi) + list(band.random_lo)[::-1], fill="toself", mode="lines",
                             fillcolor="gray", opacity=0.2, line=dict(width=0), name="random directions (95 %)",
                             hoverinfo="skip"), row=1, col=2)
    fig.add_trace(go.Scatter(x=band.layer, y=band.random_baseline, mode="lines", name="√(2/(πd))",
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
    from workbench.counting import CountingConfig, CountingResult
    from workbench.models import Model, load_model

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


class ProbeExplorer(w.VBox):
    """The probe explorer widget (made by :func:`probe_explorer`): controls ``task``, ``seed``, ``layer``;
    ``figure`` (a FigureWidget) and ``status``."""

    def __init__(self, data: ProbeData, model_name: str, task: str, seed: int, layer: int):
        self.data = data
        self.model_name = model_name
        self._busy = False
        self.task = w.Dropdown(options=data.tasks, value=task, description="task")
        self.seed = w.Dropdown(options=data.seeds, value=seed, description="seed")
        self.layer = w.SelectionSlider(options=data.layers, value=layer, description="layer",
                                       continuous_update=False)
        self.status = w.HTML(value="")
        self.figure = _figure_widget(self.render())
        self.layer.observe(self._on_view, names="value")
        self.task.observe(self._on_input, names="value")
        self.seed.observe(self._on_input, names="value")
        super().__init__([w.HBox([self.task, self.seed]), self.layer, self.status, self.figure])
        self.add_class("workbench-probe-explorer")

    @property
    def n_computations(self) -> int:
        return self.data.n_computations

    def render(self) -> go.Figure:
        return _probe_view(self.data, self.model_name, self.task.value, self.seed.value, self.layer.value)

    def _on_view(self, change) -> None:
        _rerender(self)

    def _on_input(self, change) -> None:
        self.status.value = "fitting probes …"
        self._on_view(change)


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

    source: a :class:`workbench.counting.CountingResult`, a folder written by ``save_counting_result`` (e.g.
    ``figures/02_counting_readout``), or a model / model name for a live run (``tasks``, one ``seed`` (default 11),
    ``n_train`` + ``n_test`` prompts per task). For saved results, ``model`` (the same weights) adds the
    predicted-against-true panel; its probes are refitted on the study's own prompts and split, so they equal the
    study's. Probes are fitted once per (task, seed) (one feature pass); the layer slider only re-renders.
    """
    from workbench.counting import CountingConfig
    from workbench.tasks import TASKS

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
        return _static(_probe_view(data, name, task, seed, layer))
    return ProbeExplorer(data, name, task, seed, layer)


# --------------------------------------------------------------------------------------------------------------
# Latent-step scrubber
# --------------------------------------------------------------------------------------------------------------

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
    from workbench.drift import lens_by_step_layer, lens_metrics, manifold_metrics, step_summary
    from workbench.drift_study import DriftResult
    from workbench.latent import LatentRun

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


class LatentScrubber(w.VBox):
    """The latent-step scrubber widget (made by :func:`latent_scrubber`): controls ``latent_mode``, ``step``,
    ``lens_value``; ``figure`` (a FigureWidget) and ``status``."""

    def __init__(self, tables: DriftTables, mode: str, step: int, lens_value: str):
        self.tables = tables
        self._busy = False
        self.latent_mode = w.Dropdown(options=tables.modes, value=mode, description="mode")
        self.lens_value = w.Dropdown(options=list(SCRUB_LENS_VALUES), value=lens_value, description="lens")
        self.step = w.IntSlider(value=step, min=1, max=tables.n_steps(mode), description="step",
                                continuous_update=False)
        self.status = w.HTML(value="")
        self.figure = _figure_widget(self.render())
        self.step.observe(self._on_view, names="value")
        self.lens_value.observe(self._on_view, names="value")
        self.latent_mode.observe(self._on_mode, names="value")
        super().__init__([w.HBox([self.latent_mode, self.lens_value]), self.step, self.status, self.figure])
        self.add_class("workbench-latent-scrubber")

    @property
    def n_computations(self) -> int:
        return self.tables.n_computations

    def render(self) -> go.Figure:
        return scrub_figure(self.tables, self.latent_mode.value, self.step.value, self.lens_value.value)

    def _on_view(self, change) -> None:
        if self._busy:
            return
        _rerender(self)

    def _on_mode(self, change) -> None:
        self._busy = True
        try:
            S = self.tables.n_steps(self.latent_mode.value)
            self.step.max = S
            self.step.value = min(self.step.value, S)
        finally:
            self._busy = False
        self._on_view(change)


def latent_scrubber(source, *, model=None, reasoning=None, latent_mode: str | None = None, step: int = 1,
                    lens_value: str = "mean_gold_prob", display: str = "auto"):
    """Latent-step scrubber: step slider; the lens at that step by layer and the drift metrics, marked at it.

    source: a :class:`workbench.drift_study.DriftResult`, a folder written by ``save_drift_result`` (e.g.
    ``figures/04_latent_drift``), a :class:`workbench.latent.LatentRun` or ``{mode: LatentRun}`` (then ``model``
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
        return _static(fig)
    return LatentScrubber(tables, latent_mode, step, lens_value)


# --------------------------------------------------------------------------------------------------------------
# Blur explorer
# --------------------------------------------------------------------------------------------------------------
class BlurData:
    """Per (item, blur level): the answer probabilities over the candidates and the MLP probes' P(ground truth) and
    P(prior answer) at every probed layer; one forward each, cached."""

    def __init__(self, model, probes: Mapping, items, kernels, candidates):
        from workbench.answering import candidate_token_ids

        self.model, self.items, self.kernels = model, list(items), tuple(kernels)
        self.candidates = list(candidates)
        self.cand_ids = candidate_token_ids(model.processor.tokenizer, self.candidates)
        self.probes = dict(probes)  # (target, layer) -> MLPProbe
        self.layers = sorted({layer for _, layer in self.probes})
        self._cache: dict[tuple[int, int], dict] = {}
        self._images: dict[tuple[int, int], object] = {}
        self.n_computations = 0

    def image(self, item: int, kernel: int):
        from workbench.blur import gaussian_blur

        key = (item, kernel)
        if key not in self._images:
            self._images[key] = gaussian_blur(self.items[item].image, kernel)
        return self._images[key]

    def get(self, item: int, kernel: int) -> dict:
        import torch

        from workbench.answering import vqa_inputs
        from workbench.sites import layer_site
        from workbench.trace import trace

        key = (item, kernel)
        if key in self._cache:
            return self._cache[key]
        it = self.items[item]
        batch = vqa_inputs(self.model, [self.image(item, kernel)], [it.question])
        sites = {layer_site(layer): layer for layer in self.layers}
        with torch.no_grad(), trace(self.model, list(sites), positions=-1) as tr:
            logits = self.model.hf(**batch, logits_to_keep=1).logits[0, -1].float().cpu()
        self.n_computations += 1
        probs = torch.softmax(logits, -1)[self.cand_ids].numpy()
        feats = {layer: tr[site].reshape(1, -1).float().cpu() for site, layer in sites.items()}
        curves = {}
        for (target, layer), probe in self.probes.items():
            p = probe.predict_proba(feats[layer])[0].numpy()
            curves[(target, layer)] = dict(zip(probe.classes, p.tolist()))
        self._cache[key] = {"probs": probs, "curves": curves}
        return self._cache[key]


def blur_figure(data: BlurData, item: int, kernel: int) -> go.Figure:
    """Three panels: the blurred image, the candidates' probabilities, the probe curves by layer."""
    from workbench.blur import opencv_sigma

    if not 0 <= item < len(data.items):
        raise ValueError(f"item {item} is out of range: 0..{len(data.items) - 1}")
    if kernel not in data.kernels:
        raise ValueError(f"blur level {kernel} is not one of the explorer's levels {list(data.kernels)}")
    it = data.items[item]
    res = data.get(item, kernel)
    prior = it.prior_answer
    fig = make_subplots(rows=1, cols=3, column_widths=[0.25, 0.35, 0.4], horizontal_spacing=0.08,
                        subplot_titles=["image", "answer probability", "probes on the last token"])
    fig.add_trace(go.Image(z=np.asarray(data.image(item, kernel)), hoverinfo="skip"), row=1, col=1)
    order = np.argsort(-res["probs"])[:8]
    colors = [PAPER_COLORWAY[2] if data.candidates[i] == it.answer else PAPER_COLORWAY[1]
              if data.candidates[i] == prior else "#999" for i in order]
    fig.add_trace(go.Bar(x=[data.candidates[i] for i in order], y=res["probs"][order], marker_color=colors,
                         name="answer", showlegend=False,
                         hovertemplate="%{x}: %{y:.3f}<extra></extra>"), row=1, col=2)
    for target, label, answer, color in (("ground_truth", "P(ground truth)", it.answer, PAPER_COLORWAY[2]),
                                         ("prior", "P(prior answer)", prior, PAPER_COLORWAY[1])):
        layers = [layer for (t, layer) in res["curves"] if t == target]
        if not layers or answer is None:
            continue
        if kernel != data.kernels[0]:
            ref = data.get(item, data.kernels[0])["curves"]
            fig.add_trace(go.Scatter(x=layers, y=[ref[(target, layer)].get(answer, 0.0) for layer in layers],
                                     mode="lines", line=dict(color=color, width=1, dash="dot"), opacity=0.5,
                                     name=f"{label}, unblurred"), row=1, col=3)
        fig.add_trace(go.Scatter(x=layers, y=[res["curves"][(target, layer)].get(answer, 0.0) for layer in layers],
                                 mode="lines+markers", line=dict(color=color), name=f"{label} ({answer})"),
                      row=1, col=3)
    pred = data.candidates[int(np.argmax(res["probs"]))]
    sigma = f", σ={opencv_sigma(kernel):.1f}" if kernel > 1 else ""
    apply_theme(fig)
    fig.update_layout(title=f"{html.escape(it.question)} · gold {it.answer} · blur {kernel}×{kernel}{sigma} · "
                            f"answer: {pred}", width=1150, height=400, legend=dict(orientation="h", y=-0.2, x=0.5))
    fig.update_xaxes(visible=False, row=1, col=1)
    fig.update_yaxes(visible=False, row=1, col=1)
    fig.update_yaxes(title_text="probability", range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="layer", row=1, col=3)
    fig.update_yaxes(range=[0, 1.02], row=1, col=3)
    return fig


class BlurExplorer(w.VBox):
    """The blur explorer widget (made by :func:`blur_explorer`): controls ``item`` and ``kernel``; ``figure``."""

    def __init__(self, data: BlurData, item: int, kernel: int):
        self.data = data
        labels = [(f"{k}: {_short(it.question, 40)} ({it.answer})", k) for k, it in enumerate(data.items)]
        self.item = w.Dropdown(options=labels, value=item, description="item")
        self.kernel = w.SelectionSlider(options=list(data.kernels), value=kernel, description="blur",
                                        continuous_update=False)
        self.status = w.HTML(value="")
        self.figure = _figure_widget(self.render())
        self.item.observe(self._on_change, names="value")
        self.kernel.observe(self._on_change, names="value")
        super().__init__([w.HBox([self.item, self.kernel]), self.status, self.figure])
        self.add_class("workbench-blur-explorer")

    @property
    def n_computations(self) -> int:
        return self.data.n_computations

    def render(self) -> go.Figure:
        return blur_figure(self.data, self.item.value, self.kernel.value)

    def _on_change(self, change) -> None:
        _rerender(self)


def _blur_probes(model, probes) -> dict:
    """{(target, layer): probe} from a VisualResult, its ``probe_objects`` or such a mapping already."""
    if probes is None:
        return {}
    probes = getattr(probes, "probe_objects", probes)
    if not isinstance(probes, Mapping):
        raise TypeError(f"probes must be a VisualResult or a mapping of probes, got {type(probes).__name__}")
    out = {}
    for key, probe in probes.items():
        if len(key) == 3:
            name, target, layer = key
            if name != model.name:
                continue
        else:
            target, layer = key
        out[(target, int(layer))] = probe
    if probes and not out:
        raise ValueError(f"none of the probes belongs to model {model.name!r}")
    return out


def blur_explorer(model, probes=None, *, items=None, kernels=None, item: int = 0, kernel: int = 1,
                  candidates=None, display: str = "auto"):
    """Blur explorer: pick an item, move the blur; the blurred image, the answer's probabilities over the
    candidates (gold green, prior orange) and the MLP probes' P(ground truth) and P(prior) by layer update.

    model: a VLM :class:`workbench.models.Model`. probes: a :class:`workbench.visual_study.VisualResult` (its probes
    of this model) or a ``{(target, layer): MLPProbe}`` mapping, or None (no probe panel). items: VQA items (default:
    four prior-violating and four prior-consistent held-out items). kernels: blur levels (default
    ``workbench.blur.KERNELS``). One forward per (item, level), cached. Returns the widget, or a
    :class:`StaticFigure` when ``display`` resolves to static.
    """
    from workbench.blur import KERNELS, check_kernels
    from workbench.vqa import ANSWERS, evaluation_set

    kind = resolve_display(display)
    if getattr(model, "processor", None) is None or not getattr(model.arch, "is_vlm", False):
        raise ValueError(f"blur_explorer needs a vision-language model with a processor, got {model.name!r}")
    kernels = check_kernels(KERNELS if kernels is None else kernels)
    if items is None:
        ev = evaluation_set(4, seed=0)
        items = ev["prior_violating"] + ev["prior_consistent"]
    items = list(items)
    if not items:
        raise ValueError("items is empty")
    data = BlurData(model, _blur_probes(model, probes), items, kernels, ANSWERS if candidates is None else candidates)
    fig = blur_figure(data, item, kernel)  # checks item and kernel before any widget exists
    if kind == "static":
        return _static(fig)
    return BlurExplorer(data, item, kernel)
