"""The gap explorer: pick a thread, a model and a task; see its encoded-vs-expressed panel.

    from workbench.studies.encoded_expressed.explorer import encoded_expressed_explorer
    encoded_expressed_explorer(result)

Every panel is computed already (the study ran them); the controls only re-render.
"""

from __future__ import annotations

import ipywidgets as w
import plotly.graph_objects as go

from workbench.plotting.curves import gap_figure
from workbench.plotting.theme import apply_theme
from workbench.studies.encoded_expressed.study import EncodedExpressedResult
from workbench.ui.base import Explorer, resolve_display, static


def _keys(result: EncodedExpressedResult) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys(zip(result.panel.thread, result.panel.model, result.panel.task)))


def explorer_figure(result: EncodedExpressedResult, thread: str, model: str, task: str) -> go.Figure:
    """The panel of one (thread, model, task)."""
    keys = _keys(result)
    if (thread, model, task) not in keys:
        raise ValueError(f"no panel for ({thread!r}, {model!r}, {task!r}); the result has {keys}")
    p = result.panel
    part = p[(p.thread == thread) & (p.model == model) & (p.task == task)]
    return apply_theme(gap_figure(part, title=f"Encoded vs expressed: {thread} · {model} · {task}"))


class GapExplorer(Explorer):
    """One dropdown over the (thread, model, task) panels of a result."""

    css_class = "workbench-gap-explorer"

    def __init__(self, result: EncodedExpressedResult, key: tuple[str, str, str]):
        self.result = result
        self.choice = w.Dropdown(options=[(" · ".join(k), k) for k in _keys(result)], value=key, description="panel")
        super().__init__(result, [self.choice], view=(self.choice,))

    @property
    def n_computations(self) -> int:
        return 0  # nothing is computed on interaction

    def render(self) -> go.Figure:
        return explorer_figure(self.result, *self.choice.value)


def encoded_expressed_explorer(result: EncodedExpressedResult, *, thread: str | None = None, display: str = "auto"):
    """The panel explorer of a :class:`EncodedExpressedResult`, starting at the first panel of ``thread`` (default: the first
    panel). Returns the widget, or a :class:`StaticFigure` when ``display`` resolves to static."""
    kind = resolve_display(display)
    if not isinstance(result, EncodedExpressedResult):
        raise ValueError(f"encoded_expressed_explorer needs a EncodedExpressedResult (run_encoded_expressed_study), got {type(result).__name__}")
    keys = _keys(result)
    if not keys:
        raise ValueError("the result has no panel rows")
    if thread is not None:
        keys = [k for k in keys if k[0] == thread]
        if not keys:
            raise ValueError(f"no panel for thread {thread!r}; threads: {sorted(set(result.panel.thread))}")
    fig = explorer_figure(result, *keys[0])
    if kind == "static":
        return static(fig)
    return GapExplorer(result, keys[0])
