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
    """Next-token cross-entropy per text distribution: clean, SAE spliced in, SAE + error term, site zero-ablated;
    each distribution's FVU, L0 and CE loss recovered in its legend entry (rows without a CE, such as the card's
    held-out shard, are left out of the bars)."""
    cols = {"ce_clean": "clean", "ce_sae": "SAE", "ce_sae_with_error": "SAE + error", "ce_zero_ablation": "zero"}
    check_frame(metrics, ("ce_clean", "ce_sae", "ce_zero_ablation", "fvu", "l0"), "sae_ce")
    rows = metrics[metrics["ce_clean"].notna()]
    fig = go.Figure()
    for i, (_, row) in enumerate(rows.iterrows()):
        name = str(row["distribution"]) if "distribution" in rows else "text"
        label = f"{name}: FVU {row.fvu:.3f}"
        if "fvu_from_pos2" in rows and pd.notna(row.get("fvu_from_pos2")):
            label += f" ({row.fvu_from_pos2:.3f} from position 2)"
        label += f", L0 {row.l0:.1f}"
        if "ce_loss_recovered" in rows:
            label += f", CE recovered {row.ce_loss_recovered:.3f}"
        present = [c for c in cols if c in rows and pd.notna(row.get(c))]
        fig.add_trace(go.Bar(x=[cols[c] for c in present], y=[row[c] for c in present], name=label,
                             marker_color=PAPER_COLORWAY[i % len(PAPER_COLORWAY)],
                             text=[f"{row[c]:.3f}" for c in present], textposition="outside"))
    fig.update_layout(title=title or "Cross-entropy with the SAE spliced in, per text distribution (positions 1..)",
                      yaxis_title="CE (nats)", xaxis_title="forward pass", barmode="group",
                      legend=dict(orientation="h", yanchor="top", y=-0.2))
    return apply_theme(fig)


def sae_count_features(count_features: pd.DataFrame, top: int = 10, *, title: str | None = None) -> go.Figure:
    """The ``top`` features most correlated with the count on the training half, per task (signed Pearson r; the
    first seed when the frame holds several): bars the training r, diamonds the same features' r on the test half."""
    check_frame(count_features, ("task", "feature", "corr", "abs_corr"), "sae_count_features")
    if "seed" in count_features:
        count_features = count_features[count_features.seed == count_features.seed.iloc[0]]
    tasks = list(dict.fromkeys(count_features.task))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for j, task in enumerate(tasks, start=1):
        sub = count_features[count_features.task == task].nlargest(top, "abs_corr")
        fig.add_trace(go.Bar(x=[str(f) for f in sub.feature], y=sub["corr"], marker_color=PAPER_COLORWAY[0],
                             name="r (train)", showlegend=j == 1), row=1, col=j)
        if "corr_test" in sub:
            fig.add_trace(go.Scatter(x=[str(f) for f in sub.feature], y=sub["corr_test"], mode="markers",
                                     marker=dict(symbol="diamond", size=8, color=PAPER_COLORWAY[1]),
                                     name="r (test)", showlegend=j == 1), row=1, col=j)
        fig.update_xaxes(type="category", title_text="feature", row=1, col=j)
    fig.update_yaxes(range=[-1, 1], title_text="Pearson r with the count", row=1, col=1)
    fig.update_layout(title=title or "SAE features that carry the count (last token; ranked on the training half)")
    return apply_theme(fig)


def _seed_points(fig, frame: pd.DataFrame, x: str, value: str, *, colour: str, name: str, row=None, col=None,
                 width: float = 0.25) -> None:
    """Each seed's estimate as a dot with its bootstrap interval (``value_lo`` / ``value_hi``), spread around its
    category, and the mean over seeds as a diamond."""
    cats = list(dict.fromkeys(frame[x]))
    seeds = list(dict.fromkeys(frame.seed)) if "seed" in frame else [None]
    for k, seed in enumerate(seeds):
        sub = frame if seed is None else frame[frame.seed == seed]
        off = (k - (len(seeds) - 1) / 2) * width / max(len(seeds), 1)
        xs = [cats.index(c) + off for c in sub[x]]
        err = {}
        if f"{value}_lo" in sub and f"{value}_hi" in sub:
            err = dict(error_y=dict(type="data", symmetric=False, array=(sub[f"{value}_hi"] - sub[value]).tolist(),
                                    arrayminus=(sub[value] - sub[f"{value}_lo"]).tolist(), visible=True,
                                    thickness=1, width=2))
        fig.add_trace(go.Scatter(x=xs, y=sub[value], mode="markers", marker=dict(size=6, color=colour),
                                 name=name, legendgroup=name, showlegend=k == 0 and (row in (None, 1) and
                                                                                       col in (None, 1)),
                                 hovertext=[f"seed {seed}: {v:.3f}" for v in sub[value]], **err),
                      **({} if row is None else dict(row=row, col=col)))
    mean = frame.groupby(x, sort=False)[value].mean().reindex(cats)
    fig.add_trace(go.Scatter(x=list(range(len(cats))), y=mean, mode="markers", name=f"{name}, mean over seeds",
                             legendgroup=name, marker=dict(symbol="diamond-open", size=12, color=colour),
                             showlegend=row in (None, 1) and col in (None, 1)),
                  **({} if row is None else dict(row=row, col=col)))
    axis = dict(tickmode="array", tickvals=list(range(len(cats))), ticktext=cats)
    if row is None:
        fig.update_xaxes(**axis)
    else:
        fig.update_xaxes(**axis, row=row, col=col)


def sae_count_probes(count_probes: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Held-out R2 of the count probes per task and feature set: one dot per seed with its bootstrap interval over
    distinct test prompts, the mean over seeds as a diamond."""
    check_frame(count_probes, ("task", "features", "r2_test"), "sae_count_probes")
    tasks = list(dict.fromkeys(count_probes.task))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for j, task in enumerate(tasks, start=1):
        _seed_points(fig, count_probes[count_probes.task == task], "features", "r2_test", colour=PAPER_COLORWAY[0],
                     name="held-out R²", row=1, col=j)
    n = count_probes.groupby("task")["n_test_prompts"].min() if "n_test_prompts" in count_probes else None
    sub = "" if n is None else f"; distinct test prompts per seed >= {int(n.min())}"
    fig.update_yaxes(title_text="held-out R²", row=1, col=1)
    fig.update_layout(title=title or f"Count probes on SAE codes vs the residual (95 % bootstrap CIs{sub})")
    return apply_theme(fig)


def sae_data_selection(selection: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """AUROC of ranking counting prompts above the rest of a mixed pool, per method (representation, similarity,
    centring): one dot per seed with its bootstrap interval over distinct pool texts, the mean over seeds as a
    diamond; 0.5 is chance."""
    check_frame(selection, ("representation", "similarity", "auroc"), "sae_data_selection")
    frame = selection.copy()
    if "method" not in frame:
        frame["method"] = [f"{r} / {s}" for r, s in zip(frame.representation, frame.similarity)]
    fig = go.Figure()
    _seed_points(fig, frame, "method", "auroc", colour=PAPER_COLORWAY[0], name="AUROC")
    fig.add_hline(y=0.5, line_dash="dot", line_color="#666")
    fig.update_layout(yaxis_range=[0, 1.05], yaxis_title="AUROC", xaxis_title="method",
                      title=title or "Data selection: counting prompts out of a mixed pool (95 % bootstrap CIs)")
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
