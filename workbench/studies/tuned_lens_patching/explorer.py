"""The patching explorer of the readout study: pick a prompt pair and a method, see its site x position map.

    from workbench.studies.tuned_lens_patching.explorer import patching_explorer
    patching_explorer(readout_result)

Every map is computed already (the study ran all three methods on every pair); the controls only re-render.
"""

from __future__ import annotations

import html

import ipywidgets as w
import plotly.graph_objects as go

from workbench.plotting.patching import patching_map_figure
from workbench.studies.tuned_lens_patching.study import TunedLensPatchingResult
from workbench.ui.base import Explorer, resolve_display, short, static

MEAN = -1  # the "mean over pairs" entry of the pair dropdown


def explorer_figure(result: TunedLensPatchingResult, method: str, pair: int) -> go.Figure:
    """The map the explorer shows: ``method`` (exact / atp / ig) for ``pair`` (``-1`` = mean over pairs)."""
    if method not in result.patching:
        raise ValueError(f"method must be one of {list(result.patching)}, got {method!r}")
    n = len(result.pairs)
    if isinstance(pair, bool) or not isinstance(pair, int) or not -1 <= pair < n:
        raise ValueError(f"pair must be an int in 0..{n - 1} (or -1 for the mean over pairs), got {pair!r}")
    return patching_map_figure(result.patching[method], pair=None if pair == MEAN else pair)


class PatchingExplorer(Explorer):
    """Controls ``pair`` and ``method``; the pair's clean/corrupt prompts and metrics above the map."""

    css_class = "workbench-patching-explorer"

    def __init__(self, result: TunedLensPatchingResult, method: str, pair: int):
        self.result = result
        options = [("mean over pairs", MEAN)] + [(f"{i}: {short(p)}", i) for i, p in enumerate(result.pairs.clean)]
        self.pair = w.Dropdown(options=options, value=pair, description="pair")
        self.method = w.ToggleButtons(options=list(result.patching), value=method, description="method")
        self.prompts = w.HTML(value=self._describe())
        super().__init__(result, [w.HBox([self.pair, self.method]), self.prompts], view=(self.method,),
                         inputs=(self.pair,))

    @property
    def n_computations(self) -> int:
        return 0  # nothing is computed on interaction

    def _describe(self) -> str:
        i = self.pair.value
        if i == MEAN:
            return f"{len(self.result.pairs)} IOI pairs; metric: logit(answer) - logit(wrong) at the last token"
        p = self.result.pairs.iloc[i]
        b = self.result.patching["exact"].baselines.iloc[i]
        return (f"clean: <code>{html.escape(p.clean)}</code> → {html.escape(p.answer)} "
                f"(metric {b.clean_metric:.2f})<br>corrupt: <code>{html.escape(p.corrupt)}</code> "
                f"(metric {b.corrupt_metric:.2f})")

    def on_input(self) -> None:
        self.prompts.value = self._describe()

    def render(self) -> go.Figure:
        return explorer_figure(self.result, self.method.value, self.pair.value)


def patching_explorer(result: TunedLensPatchingResult, *, method: str = "exact", pair: int = 0, display: str = "auto"):
    """Pick a prompt pair (or the mean over pairs) and a method (exact / atp / ig): its recovery map by layer and
    position, per site type. Returns the widget, or a :class:`StaticFigure` when ``display`` resolves to static."""
    kind = resolve_display(display)
    if not isinstance(result, TunedLensPatchingResult):
        raise ValueError(f"patching_explorer needs a TunedLensPatchingResult (run_tuned_lens_patching_study), got {type(result).__name__}")
    fig = explorer_figure(result, method, pair)  # checks method and pair before any widget exists
    if kind == "static":
        return static(fig)
    return PatchingExplorer(result, method, pair)
