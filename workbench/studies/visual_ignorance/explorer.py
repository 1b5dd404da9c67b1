"""The blur explorer of the visual study: pick an item, move the blur; the blurred image, the answer's
probabilities over the candidates and the MLP probes' P(ground truth) and P(prior) by layer update.

    from workbench.studies.visual_ignorance.explorer import blur_explorer
    blur_explorer(vlm, visual_result)

One forward per (item, blur level), cached: moving back to a level already seen runs nothing.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from workbench.core.sites import layer_site
from workbench.core.trace import trace
from workbench.data.vqa import ANSWERS, evaluation_set
from workbench.methods.answering import candidate_token_ids, vqa_inputs
from workbench.methods.blur import KERNELS, check_kernels, gaussian_blur, opencv_sigma
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme
from workbench.ui.base import Explorer, resolve_display, short, static


class BlurData:
    """Per (item, blur level): the answer probabilities over the candidates and the MLP probes' P(ground truth) and
    P(prior answer) at every probed layer; one forward each, cached."""

    def __init__(self, model, probes: Mapping, items, kernels, candidates):

        self.model, self.items, self.kernels = model, list(items), tuple(kernels)
        self.candidates = list(candidates)
        self.cand_ids = candidate_token_ids(model.processor.tokenizer, self.candidates)
        self.probes = dict(probes)  # (target, layer) -> MLPProbe
        self.layers = sorted({layer for _, layer in self.probes})
        self._cache: dict[tuple[int, int], dict] = {}
        self._images: dict[tuple[int, int], object] = {}
        self.n_computations = 0

    def image(self, item: int, kernel: int):

        key = (item, kernel)
        if key not in self._images:
            self._images[key] = gaussian_blur(self.items[item].image, kernel)
        return self._images[key]

    def get(self, item: int, kernel: int) -> dict:


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


class BlurExplorer(Explorer):
    """The blur explorer widget (made by :func:`blur_explorer`): controls ``item`` and ``kernel``; ``figure``."""

    css_class = "workbench-blur-explorer"

    def __init__(self, data: BlurData, item: int, kernel: int):
        self.data = data
        labels = [(f"{k}: {short(it.question, 40)} ({it.answer})", k) for k, it in enumerate(data.items)]
        self.item = w.Dropdown(options=labels, value=item, description="item")
        self.kernel = w.SelectionSlider(options=list(data.kernels), value=kernel, description="blur",
                                        continuous_update=False)
        super().__init__(data, [w.HBox([self.item, self.kernel])], view=(self.item, self.kernel))

    def render(self) -> go.Figure:
        return blur_figure(self.data, self.item.value, self.kernel.value)


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

    model: a VLM :class:`workbench.core.models.Model`. probes: a :class:`workbench.studies.visual_ignorance.study.VisualResult` (its probes
    of this model) or a ``{(target, layer): MLPProbe}`` mapping, or None (no probe panel). items: VQA items (default:
    four prior-violating and four prior-consistent held-out items). kernels: blur levels (default
    ``workbench.methods.blur.KERNELS``). One forward per (item, level), cached. Returns the widget, or a
    :class:`StaticFigure` when ``display`` resolves to static.
    """

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
        return static(fig)
    return BlurExplorer(data, item, kernel)
