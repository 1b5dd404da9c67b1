"""Plots of the counting study: functions that take the study's result frames and RETURN plotly figures."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.curves import band, line_with_band, mean_sd
from workbench.plotting.frames import check_frame
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme


def probe_r2_by_layer(probes: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Held-out R² of the count probe by layer, one line per task (mean ± sd over seeds); dashed: mention mean."""
    check_frame(probes, ("task", "seed", "variant", "layer", "r2_test"), "probe_r2_by_layer")
    fig = go.Figure()
    for i, task in enumerate(dict.fromkeys(probes.task)):
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        for variant, dash in (("last_token", "solid"), ("mention_mean", "dash")):
            sub = probes[(probes.task == task) & (probes.variant == variant)]
            if sub.empty:
                continue
            s = mean_sd(sub, ["layer"], "r2_test")
            name = task if variant == "last_token" else f"{task} (mention mean)"
            line_with_band(fig, s.layer, s["mean"], s["sd"], name, color, dash)
    fig.update_layout(title=title or "Count probes: held-out R² by layer", xaxis_title="layer (0 = embeddings)",
                      yaxis_title="held-out R²", yaxis_range=[-0.1, 1.02])
    return apply_theme(fig)


def cos_by_layer(geometry: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Mean |cos| between the probe direction and the digit rows by layer, against the random band."""
    check_frame(geometry, ("task", "seed", "layer", "cos_mean", "random_lo", "random_hi", "random_baseline"),
                 "cos_by_layer")
    fig = go.Figure()
    rnd = geometry.groupby("layer")[["random_lo", "random_hi", "random_baseline"]].mean().reset_index()
    band(fig, rnd.layer, rnd.random_lo, rnd.random_hi, color="gray", opacity=0.2, name="random directions (95 %)",
         showlegend=True)
    fig.add_trace(go.Scatter(x=rnd.layer, y=rnd.random_baseline, name="√(2/(πd))", mode="lines",
                             line=dict(color="gray", dash="dot")))
    for i, task in enumerate(dict.fromkeys(geometry.task)):
        s = mean_sd(geometry[geometry.task == task].dropna(subset=["cos_mean"]), ["layer"], "cos_mean")
        line_with_band(fig, s.layer, s["mean"], s["sd"], task, PAPER_COLORWAY[i % len(PAPER_COLORWAY)])
    fig.update_layout(title=title or "Count direction vs digit rows of the output head",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="mean |cos| with digit rows")
    return apply_theme(fig)


def lens_rank_by_layer(lens: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Median logit-lens rank of the gold digit by layer, one panel per task, one line per method (log scale)."""
    check_frame(lens, ("task", "seed", "method", "layer", "median_rank"), "lens_rank_by_layer")
    tasks = list(dict.fromkeys(lens.task))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for j, task in enumerate(tasks, start=1):
        for i, method in enumerate(dict.fromkeys(lens.method)):
            sub = lens[(lens.task == task) & (lens.method == method)]
            if sub.empty:
                continue
            s = sub.groupby("layer")["median_rank"].median().reset_index()
            fig.add_trace(go.Scatter(x=s.layer, y=s.median_rank, name=method, legendgroup=method,
                                     showlegend=j == 1, mode="lines",
                                     line=dict(color=PAPER_COLORWAY[i % len(PAPER_COLORWAY)])), row=1, col=j)
        fig.update_xaxes(title_text="layer", row=1, col=j)
    fig.update_yaxes(type="log", autorange="reversed")  # every panel: rank 1 on top, log scale
    fig.update_yaxes(title_text="median rank of gold digit", row=1, col=1)
    fig.update_layout(title=title or "Logit lens: gold digit rank by layer, before and after each intervention")
    return apply_theme(fig)


def accuracy_bars(summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Accuracy per task and method (mean ± sd over seeds), one panel per metric."""
    metrics = ["digit_restricted", "full_vocab", "generation"]
    check_frame(summary, ["task", "method"] + [f"{m}_mean" for m in metrics], "accuracy_bars")
    fig = make_subplots(rows=1, cols=3, subplot_titles=["digit-restricted", "full vocabulary", "greedy generation"],
                        shared_yaxes=True)
    for i, method in enumerate(dict.fromkeys(summary.method)):
        sub = summary[summary.method == method]
        for j, metric in enumerate(metrics, start=1):
            fig.add_trace(go.Bar(x=sub.task, y=sub[f"{metric}_mean"], name=method, legendgroup=method,
                                 showlegend=j == 1, marker_color=PAPER_COLORWAY[i % len(PAPER_COLORWAY)],
                                 error_y=dict(type="data", array=sub.get(f"{metric}_sd"))), row=1, col=j)
    fig.update_yaxes(range=[0, 1.05], title_text="accuracy", row=1, col=1)
    fig.update_layout(barmode="group", title=title or "Counting accuracy by method")
    return apply_theme(fig)


# -- latent-reasoning drift (thread 3) ---------------------------------------------------------------------------
