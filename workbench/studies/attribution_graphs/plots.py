"""Notebook 08's figures beyond the graphs themselves: ablations against predictions, the graphs against patching."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.plotting.theme import apply_theme


def ablation_figure(frame: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for g, sub in frame.groupby("graph", sort=False):
        fig.add_trace(go.Scatter(x=sub["predicted"], y=sub["measured"], mode="markers", name=str(g),
                                 text=[f"L{a}/F{b}@{c}" for a, b, c in zip(sub["layer"], sub["feature"], sub["pos"])]))
    lim = float(np.nanmax(np.abs(frame[["predicted", "measured"]].to_numpy()))) if len(frame) else 1.0
    fig.add_trace(go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", name="measured = predicted",
                             line={"dash": "dot", "color": "#888"}))
    fig.update_layout(title="feature ablations in the real model: measured change of the target vs the graph's "
                            "prediction", xaxis_title="predicted (graph total effect)",
                      yaxis_title="measured (real model)")
    return apply_theme(fig)


def patching_figure(merged: pd.DataFrame, stats: dict) -> go.Figure:
    fig = go.Figure(go.Scatter(x=merged["score"].abs(), y=merged["graph_effect"].abs(), mode="markers",
                               text=[f"pair {p} L{l}@{q}" for p, l, q in
                                     zip(merged["pair"], merged["layer"], merged["position"])]))
    fig.update_layout(title=f"MLP output per (layer, position): |exact patching| vs |graph effect| "
                            f"(Spearman {stats.get('spearman_abs', float('nan')):.2f}, n {stats.get('n', 0)})",
                      xaxis_title="|exact patching score| (logit difference)",
                      yaxis_title="|graph total effect| (logit difference)")
    return apply_theme(fig)
