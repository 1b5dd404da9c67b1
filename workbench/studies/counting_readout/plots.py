"""Plots of the counting study: functions that take the study's result frames and RETURN plotly figures."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.curves import band, line_with_band, mean_sd
from workbench.plotting.frames import check_frame
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme


def _ci_band(sub: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per layer: the mean over seeds of ``value`` and of its per-seed 95 % interval (``<value>_lo`` / ``_hi``;
    without them, mean ± sd over seeds)."""
    lo, hi = f"{value.removesuffix('_test')}_lo", f"{value.removesuffix('_test')}_hi"
    if {lo, hi} <= set(sub.columns):
        g = sub.groupby("layer")[[value, lo, hi]].mean().reset_index()
        return pd.DataFrame({"layer": g.layer, "mean": g[value], "lo": g[lo], "hi": g[hi]})
    s = mean_sd(sub, ["layer"], value)
    return pd.DataFrame({"layer": s.layer, "mean": s["mean"], "lo": s["mean"] - s["sd"], "hi": s["mean"] + s["sd"]})


def _line_ci(fig, s: pd.DataFrame, name: str, color: str, dash: str = "solid", showlegend: bool = True,
             **where) -> None:
    band(fig, s.layer, s.lo, s.hi, color=color, opacity=0.15, legendgroup=name, **where)
    fig.add_trace(go.Scatter(x=list(s.layer), y=list(s["mean"]), name=name, mode="lines", legendgroup=name,
                             showlegend=showlegend, line=dict(color=color, dash=dash)), **where)


def probe_r2_by_layer(probes: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Held-out R² of the count probe by layer, one line per task (mean over seeds, band: the mean of the per-seed
    95 % bootstrap intervals over distinct held-out prompts); dashed: mention mean."""
    check_frame(probes, ("task", "seed", "variant", "layer", "r2_test"), "probe_r2_by_layer")
    fig = go.Figure()
    for i, task in enumerate(dict.fromkeys(probes.task)):
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        for variant, dash in (("last_token", "solid"), ("mention_mean", "dash")):
            sub = probes[(probes.task == task) & (probes.variant == variant)]
            if sub.empty:
                continue
            name = task if variant == "last_token" else f"{task} (mention mean)"
            _line_ci(fig, _ci_band(sub, "r2_test"), name, color, dash)
    fig.update_layout(title=title or "Count probes: held-out R² by layer", xaxis_title="layer (0 = embeddings)",
                      yaxis_title="held-out R²", yaxis_range=[-0.1, 1.02])
    return apply_theme(fig)


CONTROL_VARIANTS = (("last_token", "probe", "solid"), ("residual", "nuisances regressed out", "dash"),
                    ("decoupled", "length-decoupled task", "dot"),
                    ("decoupled_residual", "decoupled, nuisances regressed out", "dashdot"))


def probe_controls_by_layer(probes: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per task: the probe's held-out R² by layer beside the residual probe (nuisances regressed out), the probe on
    the length-decoupled variant and its residual probe (mean over seeds, 95 % interval bands)."""
    check_frame(probes, ("task", "seed", "variant", "layer", "r2_test"), "probe_controls_by_layer")
    tasks = list(dict.fromkeys(probes.task))
    cols = min(2, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=tasks, shared_yaxes=True)
    for t, task in enumerate(tasks):
        where = dict(row=t // cols + 1, col=t % cols + 1)
        for i, (variant, label, dash) in enumerate(CONTROL_VARIANTS):
            sub = probes[(probes.task == task) & (probes.variant == variant)]
            if sub.empty:
                continue
            _line_ci(fig, _ci_band(sub, "r2_test"), label, PAPER_COLORWAY[i % len(PAPER_COLORWAY)], dash,
                     showlegend=t == 0, **where)
    fig.update_yaxes(range=[-0.3, 1.02], title_text="held-out R²", col=1)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=title or "Does the count survive its nuisances? Held-out R² by layer")
    return apply_theme(fig)


BASES = (("raw", "raw head rows"), ("gain", "final-norm gain"), ("gain_whitened", "gain, whitened"))


def cos_by_layer(geometry: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Mean |cos| between the probe direction and the digit readout by layer, one panel per basis (raw head rows;
    covectors through the final norm; those in whitened coordinates), against the random band of that basis."""
    check_frame(geometry, ("task", "seed", "layer", "cos_mean", "random_lo", "random_hi", "random_baseline"),
                 "cos_by_layer")
    geometry = geometry if "basis" in geometry.columns else geometry.assign(basis="raw")
    bases = [(b, label) for b, label in BASES if (geometry.basis == b).any()]
    fig = make_subplots(rows=1, cols=len(bases), subplot_titles=[label for _, label in bases], shared_yaxes=True)
    for j, (basis, _) in enumerate(bases):
        where = dict(row=1, col=j + 1)
        geo = geometry[geometry.basis == basis]
        rnd = geo.groupby("layer")[["random_lo", "random_hi", "random_baseline"]].mean().reset_index()
        band(fig, rnd.layer, rnd.random_lo, rnd.random_hi, color="gray", opacity=0.2,
             name="random directions (95 %)", showlegend=j == 0, **where)
        fig.add_trace(go.Scatter(x=rnd.layer, y=rnd.random_baseline, name="√(2/(πd))", mode="lines",
                                 line=dict(color="gray", dash="dot"), showlegend=j == 0), **where)
        for i, task in enumerate(dict.fromkeys(geometry.task)):
            s = mean_sd(geo[geo.task == task].dropna(subset=["cos_mean"]), ["layer"], "cos_mean")
            line_with_band(fig, s.layer, s["mean"], s["sd"], task, PAPER_COLORWAY[i % len(PAPER_COLORWAY)],
                           showlegend=j == 0, **where)
    fig.update_yaxes(title_text="mean |cos| with the digit readout", col=1)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=title or "Count direction vs the digit readout (mean ± sd over seeds)")
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
