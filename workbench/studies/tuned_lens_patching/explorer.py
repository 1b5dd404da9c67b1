"""The patching explorer of the readout study: pick a prompt pair, a corruption and a method, see its block x role
map.

    from workbench.studies.tuned_lens_patching.explorer import patching_explorer
    patching_explorer(readout_result)

Every map is computed already (the study ran all three methods on every pair under every corruption); the controls
only re-render.
"""

from __future__ import annotations

import html

import ipywidgets as w
import plotly.graph_objects as go

from workbench.data.ioi import CORRUPTIONS
from workbench.studies.tuned_lens_patching.plots import CORRUPTION_NAMES, role_map_figure
from workbench.studies.tuned_lens_patching.study import TunedLensPatchingResult
from workbench.ui.base import Explorer, resolve_display, short, static

MEAN = -1  # the "mean over pairs" entry of the pair dropdown


def explorer_figure(result: TunedLensPatchingResult, method: str, pair: int, corruption: str | None = None
                    ) -> go.Figure:
    """The map the explorer shows: ``method`` (exact / atp / ig) under ``corruption`` (None: the first the study ran)
    for ``pair`` (``-1`` = mean over pairs)."""
    corruption = corruption if corruption is not None else next(iter(result.patching))
    if corruption not in result.patching:
        raise ValueError(f"corruption must be one of {list(result.patching)}, got {corruption!r}")
    if method not in result.patching[corruption]:
        raise ValueError(f"method must be one of {list(result.patching[corruption])}, got {method!r}")
    n = len(result.pairs)
    if isinstance(pair, bool) or not isinstance(pair, int) or not -1 <= pair < n:
        raise ValueError(f"pair must be an int in 0..{n - 1} (or -1 for the mean over pairs), got {pair!r}")
    frame = result.patching[corruption][method].frame
    return role_map_figure(frame, method=method, corruption=corruption, pair=None if pair == MEAN else pair)


class PatchingExplorer(Explorer):
    """Controls ``pair``, ``corruption`` and ``method``; the pair's clean/corrupt prompts and metrics above the map."""

    css_class = "workbench-patching-explorer"

    def __init__(self, result: TunedLensPatchingResult, method: str, pair: int, corruption: str):
        self.result = result
        options = [("mean over pairs", MEAN)] + [(f"{i}: {short(p)}", i) for i, p in enumerate(result.pairs.clean)]
        self.pair = w.Dropdown(options=options, value=pair, description="pair")
        self.corruption = w.ToggleButtons(options=[(CORRUPTION_NAMES.get(c, c), c) for c in result.patching],
                                          value=corruption, description="corruption")
        self.method = w.ToggleButtons(options=list(result.patching[corruption]), value=method, description="method")
        self.prompts = w.HTML(value=self._describe())
        super().__init__(result, [w.HBox([self.pair, self.method]), self.corruption, self.prompts],
                         view=(self.method,), inputs=(self.pair, self.corruption))

    @property
    def n_computations(self) -> int:
        return 0  # nothing is computed on interaction

    def _describe(self) -> str:
        i, c = self.pair.value, self.corruption.value
        if i == MEAN:
            return (f"{len(self.result.pairs)} IOI pairs, {CORRUPTION_NAMES.get(c, c)}; metric: logit(answer) - "
                    "logit(wrong) at the last token")
        p = self.result.pairs.iloc[i]
        corrupt = p[CORRUPTIONS[c]] if CORRUPTIONS.get(c) in p.index else p.corrupt
        base = self.result.patching[c]["exact"].baselines
        b = base[base["pair"] == i].iloc[0]
        return (f"clean: <code>{html.escape(p.clean)}</code> → {html.escape(p.answer)} "
                f"(metric {b.clean_metric:.2f})<br>corrupt: <code>{html.escape(corrupt)}</code> "
                f"(metric {b.corrupt_metric:.2f})")

    def on_input(self) -> None:
        self.prompts.value = self._describe()

    def render(self) -> go.Figure:
        return explorer_figure(self.result, self.method.value, self.pair.value, self.corruption.value)


def patching_explorer(result: TunedLensPatchingResult, *, method: str = "exact", pair: int = 0,
                      corruption: str | None = None, display: str = "auto"):
    """Pick a prompt pair (or the mean over pairs), a corruption (name swap / ABC) and a method (exact / atp / ig):
    its recovery map by block and position role, per site type. Returns the widget, or a :class:`StaticFigure`
    when ``display`` resolves to static."""
    kind = resolve_display(display)
    if not isinstance(result, TunedLensPatchingResult):
        raise ValueError(f"patching_explorer needs a TunedLensPatchingResult (run_tuned_lens_patching_study), got {type(result).__name__}")
    corruption = corruption if corruption is not None else next(iter(result.patching))
    fig = explorer_figure(result, method, pair, corruption)  # checks everything before any widget exists
    if kind == "static":
        return static(fig)
    return PatchingExplorer(result, method, pair, corruption)
