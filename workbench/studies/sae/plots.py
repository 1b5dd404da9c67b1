"""Plots of the SAE study: functions that take the study's result frames and RETURN plotly figures."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.io.figures import PAPER_COLORWAY, apply_theme
from workbench.methods.plots import check_frame


def sae_density(density: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Histogram of log10 feature density (firing frequency); dead features counted in the title."""
    check_frame(density, ("feature", "freq", "log10_freq", "dead"), "sae_density")
    alive = density[~density.dead]
    fig = go.Figure(go.Histogram(x=alive.log10_freq, nbinsx=60, marker_color=PAPER_COLORWAY[0], name="features"))
    fig.add_vline(x=-1, line_dash="dash", line_color="#666", annotation_text="dense (10 %)")
    n_dead = int(density.dead.sum())
    fig.update_layout(title=title or f"Feature density ({len(density)} features, {n_dead} never fired)",
                      xaxis_title="log10 firing frequency", yaxis_title="features", showlegend=False)
    return apply_theme(fig)


def sae_ce(metrics: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Next-token cross-entropy: clean, SAE spliced in, SAE + error term, site zero-ablated."""
    cols = {"ce_clean": "clean", "ce_sae": "SAE", "ce_sae_with_error": "SAE + error", "ce_zero_ablation": "zero"}
    check_frame(metrics, tuple(cols) + ("fvu", "l0"), "sae_ce")
    row = metrics.iloc[0]
    fig = go.Figure(go.Bar(x=list(cols.values()), y=[row[c] for c in cols],
                           marker_color=[PAPER_COLORWAY[i] for i in (2, 0, 5, 1)],
                           text=[f"{row[c]:.3f}" for c in cols], textposition="outside"))
    sub = f"FVU {row.fvu:.3f}, L0 {row.l0:.1f}"
    if "ce_loss_recovered" in metrics:
        sub += f", CE loss recovered {row.ce_loss_recovered:.3f}"
    fig.update_layout(title=title or f"Cross-entropy with the SAE spliced in ({sub})", yaxis_title="CE (nats)",
                      xaxis_title="forward pass")
    return apply_theme(fig)


def sae_count_features(count_features: pd.DataFrame, top: int = 10, *, title: str | None = None) -> go.Figure:
    """The ``top`` features most correlated with the count, per task (signed Pearson r)."""
    check_frame(count_features, ("task", "feature", "corr", "abs_corr"), "sae_count_features")
    tasks = list(dict.fromkeys(count_features.task))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for j, task in enumerate(tasks, start=1):
        sub = count_features[count_features.task == task].nlargest(top, "abs_corr")
        fig.add_trace(go.Bar(x=[str(f) for f in sub.feature], y=sub["corr"], marker_color=PAPER_COLORWAY[0],
                             showlegend=False), row=1, col=j)
        fig.update_xaxes(type="category", title_text="feature", row=1, col=j)
    fig.update_yaxes(range=[-1, 1], title_text="Pearson r with the count", row=1, col=1)
    fig.update_layout(title=title or "SAE features that carry the count (last token)")
    return apply_theme(fig)


def sae_data_selection(selection: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """AUROC of ranking counting prompts above the rest of a mixed pool, per representation and similarity."""
    check_frame(selection, ("representation", "similarity", "auroc", "precision_at_n_pos"), "sae_data_selection")
    labels = [f"{r} / {s}" for r, s in zip(selection.representation, selection.similarity)]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=selection.auroc, name="AUROC", marker_color=PAPER_COLORWAY[0]))
    fig.add_trace(go.Bar(x=labels, y=selection.precision_at_n_pos, name="precision@n_pos",
                         marker_color=PAPER_COLORWAY[1]))
    fig.add_hline(y=0.5, line_dash="dot", line_color="#666")
    fig.update_layout(barmode="group", yaxis_range=[0, 1.05], yaxis_title="score",
                      title=title or "Data selection: counting prompts out of a mixed pool")
    return apply_theme(fig)


def sae_feature_histograms(scan, features: Sequence[int], *, title: str | None = None) -> go.Figure:
    """Activation histograms (non-zero activations) of ``features`` from a :class:`~workbench.methods.sae.features.FeatureScan`."""
    features = list(features)
    if not features:
        raise ValueError("sae_feature_histograms needs at least one feature")
    cols = min(3, len(features))
    rows = -(-len(features) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"feature {f}" for f in features])
    for i, f in enumerate(features):
        edges, counts = scan.histogram(f)
        centres = (edges[:-1] + edges[1:]) / 2
        fig.add_trace(go.Bar(x=centres, y=counts, marker_color=PAPER_COLORWAY[0], showlegend=False),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title=title or "Activation histograms", bargap=0.05, height=260 * rows)
    return apply_theme(fig)


# -- visual-ignorance routing ------------------------------------------------------------------------------------
