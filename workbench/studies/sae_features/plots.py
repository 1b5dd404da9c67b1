"""Plots of the SAE study: functions that take the study's result frames and RETURN plotly figures."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.frames import check_frame
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme


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


BENCH_PANELS = {  # metric -> panel title (higher is better unless the title says otherwise)
    "fvu": "FVU (lower is better)", "ce_loss_recovered": "CE loss recovered", "dead_frac": "dead fraction (lower)",
    "l0": "L0", "absorption_fraction": "absorption fraction (lower)", "full_absorption": "full absorption (lower)",
    "sparse_acc_k1": "sparse probing, k = 1", "sparse_acc_k5": "sparse probing, k = 5",
    "best_cos_mean": "stability: best-match cos",
}


def sae_bench(runs: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """One panel per metric: each seed's SAE as a small dot and the mean over seeds with +-1 std, per architecture;
    the full-residual probe's accuracy as a dotted line in the sparse-probing panels."""
    check_frame(runs, ("architecture", "seed", "fvu", "l0", "dead_frac", "ce_loss_recovered"), "sae_bench")
    panels = {m: t for m, t in BENCH_PANELS.items() if m in runs.columns and runs[m].notna().any()}
    cols = 3
    rows = -(-len(panels) // cols)
    archs = list(dict.fromkeys(runs.architecture))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(panels.values()), vertical_spacing=0.12)
    for i, metric in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        g = runs.groupby("architecture", sort=False)[metric]
        mean, std = g.mean().reindex(archs), g.std(ddof=1).reindex(archs).fillna(0)
        fig.add_trace(go.Scatter(x=runs.architecture, y=runs[metric], mode="markers", showlegend=False,
                                 marker=dict(size=5, color="#999"), hovertext=[f"seed {s}" for s in runs.seed]),
                      row=r, col=c)
        fig.add_trace(go.Scatter(x=archs, y=mean, mode="markers", showlegend=False,
                                 marker=dict(size=10, color=PAPER_COLORWAY[0], symbol="diamond"),
                                 error_y=dict(type="data", array=std, visible=True)), row=r, col=c)
        if metric.startswith("sparse_acc") and "residual_acc" in runs:
            fig.add_hline(y=float(runs.residual_acc.mean()), line_dash="dot", line_color="#666", row=r, col=c)
        fig.update_xaxes(type="category", tickangle=30, row=r, col=c)
    n_seeds = runs.groupby("architecture").size()
    seeds = f"{n_seeds.min()}" if n_seeds.min() == n_seeds.max() else f"{n_seeds.min()}-{n_seeds.max()}"
    fig.update_layout(title=title or f"SAE architectures compared (mean +- std over {seeds} seeds; dots: seeds)",
                      height=300 * rows + 80, margin=dict(t=110))
    return apply_theme(fig)


# -- visual-ignorance routing ------------------------------------------------------------------------------------
