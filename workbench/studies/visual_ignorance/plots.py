"""Plots of the visual-ignorance study: functions that take the study's result frames and RETURN plotly figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.frames import check_frame
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme


def vqa_accuracy_bars(accuracy: pd.DataFrame, value: str = "correct", *, title: str | None = None) -> go.Figure:
    """Accuracy per split: one bar group per split, one bar per (model, condition: image / blank / noise), with the
    95 % interval where the frame has ``<value>_lo`` / ``_hi``."""
    check_frame(accuracy, ("model", "condition", "split", value), "vqa_accuracy_bars")
    fig = go.Figure()
    i = 0
    for model in dict.fromkeys(accuracy.model):
        for condition, pattern in (("image", ""), ("blank", "/"), ("noise", ".")):
            sub = accuracy[(accuracy.model == model) & (accuracy.condition == condition)]
            if sub.empty:
                continue
            err = ({"type": "data", "symmetric": False, "array": sub[f"{value}_hi"] - sub[value],
                    "arrayminus": sub[value] - sub[f"{value}_lo"]} if f"{value}_lo" in sub else None)
            models = list(dict.fromkeys(accuracy.model))
            fig.add_trace(go.Bar(x=sub.split, y=sub[value], name=f"{model}, {condition}", error_y=err,
                                 marker=dict(color=PAPER_COLORWAY[models.index(model) % len(PAPER_COLORWAY)],
                                             pattern_shape=pattern, opacity=1.0 if condition == "image" else 0.55)))
            i += 1
    fig.update_layout(title=title or "VQA accuracy with the image and blind baselines", barmode="group",
                      yaxis_title=value.replace("_", " "), yaxis_range=[0, 1.02], xaxis_title="held-out split")
    return apply_theme(fig)


def visual_probe_curves(probes: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """P(ground truth) and P(prior) by layer from the MLP probes, on held-out conflict items, one colour per model."""
    check_frame(probes, ("model", "layer", "p_gt", "p_prior"), "visual_probe_curves")
    fig = go.Figure()
    for i, model in enumerate(dict.fromkeys(probes.model)):
        sub = probes[probes.model == model].sort_values("layer")
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        fig.add_trace(go.Scatter(x=sub.layer, y=sub.p_gt, name=f"{model}: P(ground truth)", mode="lines+markers",
                                 line=dict(color=color)))
        fig.add_trace(go.Scatter(x=sub.layer, y=sub.p_prior, name=f"{model}: P(prior), prior probe",
                                 mode="lines+markers", line=dict(color=color, dash="dash")))
        if "p_prior_gt_probe" in sub:
            fig.add_trace(go.Scatter(x=sub.layer, y=sub.p_prior_gt_probe, name=f"{model}: P(prior), truth probe",
                                     mode="lines", line=dict(color=color, dash="dot")))
    fig.update_layout(title=title or "Layer-wise MLP probes on conflict items (truth ≠ prior)",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="probe probability", yaxis_range=[0, 1.02])
    return apply_theme(fig)


def replacement_heatmap(replacement: pd.DataFrame, value: str = "prior_rate", *, title: str | None = None) -> go.Figure:
    """Counterfactual layer replacement: rows = (model <- donor) pairs, columns = swapped range, colour = value."""
    check_frame(replacement, ("pair", "scheme", "start", "end", value), "replacement_heatmap")
    if "control" in replacement:  # the random-layer control has no window: its own figure
        replacement = replacement[replacement.control != "random layers"]
    df = replacement[replacement.scheme != "none"].copy()
    order = {"first": 0, "window": 1, "last": 2}
    df["label"] = [f"{s} {a}-{b}" for s, a, b in zip(df.scheme, df.start, df.end)]
    df["key"] = [(order.get(s, 3), a, b) for s, a, b in zip(df.scheme, df.start, df.end)]
    labels = [lab for _, lab in sorted(set(zip(df.key, df.label)))]
    pairs = list(dict.fromkeys(df.pair))
    z = np.full((len(pairs), len(labels)), np.nan)
    for _, r in df.iterrows():
        z[pairs.index(r.pair), labels.index(r.label)] = r[value]
    base = replacement[replacement.scheme == "none"].drop_duplicates("pair").set_index("pair")[value].reindex(pairs)
    ylabels = [f"{p} (unswapped {b:.2f})" for p, b in zip(pairs, base)]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=ylabels, colorscale="Viridis", zmin=0, zmax=1,
                               colorbar=dict(title=value.replace("_", " ")),
                               hovertemplate="%{y}<br>layers %{x}<br>" + value + " %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"Counterfactual layer replacement: {value.replace('_', ' ')}",
                      xaxis_title="decoder layers taken from the donor", height=220 + 60 * len(pairs))
    return apply_theme(fig)


def replacement_controls_figure(controls: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per window taken from the donor: the prior rate (95 % Wilson interval), the same window from the same-prior
    donor, and the random-layer control's draws (grey points at the windows of their size), baseline dashed."""
    check_frame(controls, ("scheme", "start", "end", "prior_rate", "prior_rate_lo", "prior_rate_hi", "baseline"),
                "replacement_controls_figure")
    labels = [f"{s} {a}-{b}" for s, a, b in zip(controls.scheme, controls.start, controls.end)]
    fig = go.Figure()
    fig.add_scatter(x=labels, y=controls.prior_rate, mode="markers", name="from the donor (other prior)",
                    error_y={"type": "data", "symmetric": False, "array": controls.prior_rate_hi - controls.prior_rate,
                             "arrayminus": controls.prior_rate - controls.prior_rate_lo}, marker={"size": 10})
    if "same_prior" in controls:
        fig.add_scatter(x=labels, y=controls.same_prior, mode="markers", name="from the same-prior donor",
                        error_y={"type": "data", "symmetric": False,
                                 "array": controls.same_prior_hi - controls.same_prior,
                                 "arrayminus": controls.same_prior - controls.same_prior_lo},
                        marker={"size": 10, "symbol": "square"})
    if "random_mean" in controls:
        sub = controls.dropna(subset=["random_mean"])
        fig.add_scatter(x=[f"{s} {a}-{b}" for s, a, b in zip(sub.scheme, sub.start, sub.end)], y=sub.random_min,
                        mode="markers", name="random donor layers: lowest of the draws",
                        marker={"color": "#7f7f7f", "symbol": "triangle-down", "size": 9})
        fig.add_scatter(x=[f"{s} {a}-{b}" for s, a, b in zip(sub.scheme, sub.start, sub.end)], y=sub.random_mean,
                        mode="markers", name="random donor layers: mean", marker={"color": "#7f7f7f", "size": 9})
    fig.add_hline(y=float(controls.baseline.iloc[0]), line_dash="dash", annotation_text="no replacement")
    fig.update_layout(title=title or "Layer replacement with its controls: prior rate on prior-violating items",
                      xaxis_title="decoder layers replaced", yaxis_title="answers the prior (red)", yaxis_range=[0, 1])
    return apply_theme(fig)


def patching_curves(patching: pd.DataFrame, value: str = "agree_source", *, title: str | None = None) -> go.Figure:
    """Image-token (solid) and last-token (dotted) patching by layer; one panel per direction x corruption."""
    check_frame(patching, ("model", "corruption", "direction", "positions", "layer", value), "patching_curves")
    panels = list(dict.fromkeys(zip(patching.direction, patching.corruption)))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"{d} ({c})" for d, c in panels],
                        horizontal_spacing=0.08)
    for k, (direction, corruption) in enumerate(panels):
        for i, model in enumerate(dict.fromkeys(patching.model)):
            for pos, dash in (("image", "solid"), ("last", "dot")):
                sub = patching[(patching.model == model) & (patching.direction == direction)
                               & (patching.corruption == corruption) & (patching.positions == pos)].sort_values("layer")
                if sub.empty:
                    continue
                fig.add_trace(go.Scatter(x=sub.layer, y=sub[value], name=f"{model}, {pos} tokens", mode="lines",
                                         legendgroup=f"{model}{pos}", showlegend=k == 0,
                                         line=dict(color=PAPER_COLORWAY[i % len(PAPER_COLORWAY)], dash=dash)),
                              row=1, col=k + 1)
    fig.update_xaxes(title_text="layer (0 = embeddings)")
    fig.update_yaxes(title_text="answers equal to the source run" if value == "agree_source"
                     else value.replace("_", " "), col=1)
    fig.update_layout(title=title or "Activation patching between clean and corrupted images",
                      width=max(720, 420 * len(panels)))
    fig = apply_theme(fig)
    fig.update_annotations(font_size=13)
    return fig


def decay_curve(decay: pd.DataFrame, summary: pd.DataFrame | None = None, *, title: str | None = None) -> go.Figure:
    """E_k (solid) and accuracy (dotted) against the blur kernel, one colour per (model, split); C in the legend."""
    check_frame(decay, ("model", "split", "kernel", "E_k", "accuracy"), "decay_curve")
    fig = go.Figure()
    keys = list(dict.fromkeys(zip(decay.model, decay.split)))
    for i, (model, split) in enumerate(keys):
        sub = decay[(decay.model == model) & (decay.split == split)].sort_values("kernel")
        c = ""
        if summary is not None:
            s = summary[(summary.model == model) & (summary.split == split)]
            if not s.empty:
                c = f", C={float(s.C.iloc[0]):.2f}"
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        fig.add_trace(go.Scatter(x=sub.kernel, y=sub.E_k, name=f"{model} {split}: E_k{c}", mode="lines+markers",
                                 line=dict(color=color), legendgroup=f"{model}{split}"))
        fig.add_trace(go.Scatter(x=sub.kernel, y=sub.accuracy, name=f"{model} {split}: accuracy", mode="lines",
                                 line=dict(color=color, dash="dot"), legendgroup=f"{model}{split}"))
    fig.update_layout(title=title or "Progressive blur: answers unchanged (E_k) and accuracy",
                      xaxis_title="Gaussian kernel size (px)", yaxis_title="fraction of items", yaxis_range=[0, 1.02])
    return apply_theme(fig)
