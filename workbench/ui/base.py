"""The skeleton every explorer shares: the display rule, static figures, and the :class:`Explorer` widget.

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
    Each explorer keeps every model computation it made, keyed on what it depends on; moving a slider or picking
    another view only re-renders the figure from the cache, and ``n_computations`` counts the model computations.
    The widget is the explorer itself (an :class:`Explorer`, an ``ipywidgets.VBox``): ``explorer.figure`` is its
    ``FigureWidget``, ``explorer.status`` its status line and ``explorer.render()`` the ``go.Figure`` of the
    current view.

The explorers: :func:`workbench.ui.lens.lens_explorer`, :func:`workbench.studies.counting_readout.explorer.probe_explorer`,
:func:`workbench.studies.latent_drift.explorer.latent_scrubber`, :func:`workbench.studies.visual_ignorance.explorer.blur_explorer`,
:func:`workbench.studies.tuned_lens_patching.explorer.patching_explorer`, :func:`workbench.studies.encoded_expressed.explorer.encoded_expressed_explorer`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import ClassVar

import ipywidgets as w
import plotly.graph_objects as go
from IPython import get_ipython
from IPython.display import display as ipython_display

from workbench.io.figures import HEADLESS_ENV, export_static, find_browser

DISPLAYS = ("auto", "widget", "static")


def _in_kernel() -> bool:
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
        ipython_display(self._repr_mimebundle_(), raw=True)


def _strip_tags(text: str) -> str:
    return re.sub(r"<[^>]+>", " ", str(text)).strip()


def static(fig: go.Figure) -> StaticFigure:
    return StaticFigure(fig)


def fit_width(fig: go.Figure) -> go.Figure:
    """In a widget the figure takes the width of the notebook's output area (the paper figures' fixed width
    would be cut off); heights stay."""
    return fig.update_layout(width=None, autosize=True)


def figure_widget(fig: go.Figure):
    return go.FigureWidget(fit_width(fig))


def sync_figure(fw, fig: go.Figure) -> None:
    """Make FigureWidget ``fw`` show ``fig``: traces updated in place when their types match, else replaced."""
    fig = fit_width(fig)
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


def short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class Explorer(w.VBox):
    """An explorer widget: rows of controls, a status line, and a ``FigureWidget`` showing :meth:`render`.

    A subclass defines ``render() -> go.Figure`` (the current view), builds its controls, then calls ``super().__init__(rows, view=..., inputs=...)``: a change of a
    ``view`` control re-renders from the cache; a change of an ``inputs`` control first runs :meth:`on_input`
    (which may compute and adjust other controls inside :meth:`quiet`), then re-renders. An error goes to the status
    line and the figure keeps the last good view. ``n_computations`` is ``source.n_computations``.
    """

    css_class: ClassVar[str] = "workbench-explorer"
    busy_message: ClassVar[str] = ""

    def __init__(self, source, rows: Sequence[w.Widget], *, view: Sequence[w.Widget] = (),
                 inputs: Sequence[w.Widget] = ()):
        self.source = source
        self._busy = False
        self.status = w.HTML(value="")
        self.figure = figure_widget(self.render())
        for control in view:
            control.observe(self._on_view, names="value")
        for control in inputs:
            control.observe(self._on_input, names="value")
        super().__init__([*rows, self.status, self.figure])
        self.add_class(self.css_class)

    @property
    def n_computations(self) -> int:
        return self.source.n_computations

    def on_input(self) -> None:
        """Hook for input controls (compute, then adjust view controls inside :meth:`quiet`); none by default."""

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Control changes made inside do not re-render (one re-render follows the whole adjustment)."""
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def show_error(self, e: BaseException) -> None:
        self.status.value = f"<span style='color:#b00'>{html.escape(f'{type(e).__name__}: {e}')}</span>"

    def rerender(self) -> None:
        """Show :meth:`render` in the FigureWidget; an error goes to the status line."""
        try:
            sync_figure(self.figure, self.render())
            self.status.value = ""
        except Exception as e:  # noqa: BLE001 - shown in the widget
            self.show_error(e)

    def _on_view(self, change) -> None:
        if not self._busy:
            self.rerender()

    def _on_input(self, change) -> None:
        if self._busy:
            return
        self.status.value = self.busy_message
        try:
            self.on_input()
        except Exception as e:  # noqa: BLE001 - a bad input is reported in the widget, not raised
            self.show_error(e)
            return
        self.rerender()
