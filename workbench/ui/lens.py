"""The logit-lens explorer: prompt box, model choice, layer and position ranges, heatmap with hover.

    from workbench.ui.lens import lens_explorer
    lens_explorer(model, "The capital of France is")   # JupyterLab: a widget; under `workbench run`: a figure

One lens computation per (model, prompt); changing only the view re-renders from the cache.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import ipywidgets as w
import pandas as pd
import plotly.graph_objects as go

from workbench.core.models import Model, load_model
from workbench.data.checks import check_range
from workbench.methods.lens import logit_lens
from workbench.plotting.lens import lens_heatmap
from workbench.ui.base import Explorer, resolve_display, short, static

LENS_VALUES = ("prob", "logit")


class LensData:
    """The lens explorer's models and its cache of lens frames keyed on (model name, prompt)."""

    def __init__(self, models, *, top_k: int = 5):
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
            self._loaded[name] = load_model(self.models[name])
        return self._loaded[name]

    def frame(self, name: str, prompt: str) -> pd.DataFrame:
        """The lens of ``prompt`` on model ``name``: every layer, every position, top-k (cached)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"the prompt must be a non-empty string, got {prompt!r}")
        key = (name, prompt)
        if key not in self._frames:
            self._frames[key] = logit_lens(self.model(name), [prompt], layers=None, positions="all",
                                           top_k=self.top_k)
            self.n_computations += 1
        return self._frames[key]


def lens_figure(frame: pd.DataFrame, *, model_name: str, prompt: str, layers: tuple[int, int],
                positions: tuple[int, int], value: str = "prob") -> go.Figure:
    """The explorer's view: :func:`workbench.plotting.lens.lens_heatmap` of the chosen layer and position ranges."""
    sub = frame[frame.layer.between(*layers) & frame.position.between(*positions)]
    if sub.empty:
        raise ValueError(f"no lens rows for layers {layers} and positions {positions}")
    title = (f"{html.escape(model_name)} · “{html.escape(short(prompt))}” · layers {layers[0]}–{layers[1]}, "
             f"positions {positions[0]}–{positions[1]}")
    return lens_heatmap(sub, prompt_idx=0, value=value, title=title)


def _n_positions(frame: pd.DataFrame) -> int:
    return int(frame.position.max()) + 1


class LensExplorer(Explorer):
    """The logit-lens explorer widget (made by :func:`lens_explorer`): controls ``model_choice``, ``prompt``,
    ``layers``, ``positions``, ``colour``; ``figure`` (a FigureWidget) and ``status`` (errors, progress)."""

    css_class = "workbench-lens-explorer"
    busy_message = "computing the lens …"

    def __init__(self, data: LensData, model_name: str, prompt: str, layers, positions, value: str):
        self.data = data
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
        super().__init__(data, [w.HBox([self.model_choice, self.colour]), self.prompt,
                                w.HBox([self.layers, self.positions])],
                         view=(self.layers, self.positions, self.colour), inputs=(self.prompt, self.model_choice))

    def render(self) -> go.Figure:
        frame = self.data.frame(self.model_choice.value, self.prompt.value)
        return lens_figure(frame, model_name=self.model_choice.value, prompt=self.prompt.value,
                           layers=tuple(self.layers.value), positions=tuple(self.positions.value),
                           value=self.colour.value)

    def on_input(self) -> None:
        name = self.model_choice.value
        frame = self.data.frame(name, self.prompt.value)
        L = self.data.model(name).n_layers
        with self.quiet():
            n = _n_positions(frame)
            lo, hi = self.layers.value
            self.layers.max = L
            self.layers.value = (min(lo, L), min(hi, L))
            self.positions.max = n - 1
            self.positions.value = (0, n - 1)


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
    layers = check_range("layers", layers, 0, L)
    frame = data.frame(name, prompt)
    positions = check_range("positions", positions, 0, _n_positions(frame) - 1)
    if kind == "static":
        return static(lens_figure(frame, model_name=name, prompt=prompt, layers=layers, positions=positions,
                                   value=value))
    return LensExplorer(data, name, prompt, layers, positions, value)


