"""Plots of the latent-drift study: functions that take the study's result frames and RETURN plotly figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.curves import line_with_band, mean_sd
from workbench.plotting.frames import check_frame
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme

DRIFT_METRICS = {  # short panel titles: three panels share a row
    "max_cos": "max cos to an embedding",
    "norm_ratio": "norm / mean emb. norm",
    "knn_dist": "10-NN dist. / mean emb. norm",
    "prev_cos": "cos with previous step",
    "entropy": "lens entropy (nats)",
    "top1_prob": "lens top-1 prob.",
    "gold_rank": "lens rank of the gold step",
    "kl_to_final": "KL(step ‖ final step)",
    "mixture_entropy": "mixture entropy (soft)",
}


def _mode_color(modes: Sequence[str]) -> dict[str, str]:
    return {m: PAPER_COLORWAY[i % len(PAPER_COLORWAY)] for i, m in enumerate(dict.fromkeys(modes))}


def drift_by_step(steps: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Every drift metric against the latent step, one line per mode (medians over items)."""
    check_frame(steps, ("mode", "step"), "drift_by_step")
    metrics = [m for m in DRIFT_METRICS if m in steps.columns and steps[m].notna().any()]
    if not metrics:
        raise ValueError(f"drift_by_step: none of the metric columns {list(DRIFT_METRICS)} has values")
    cols = 3
    rows = -(-len(metrics) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[DRIFT_METRICS[m] for m in metrics],
                        horizontal_spacing=0.1, vertical_spacing=0.12)
    colors = _mode_color(steps["mode"])
    for k, metric in enumerate(metrics):
        r, c = k // cols + 1, k % cols + 1
        for mode, color in colors.items():
            sub = steps[(steps["mode"] == mode) & steps[metric].notna()]
            if sub.empty:
                continue
            fig.add_trace(go.Scatter(x=sub.step, y=sub[metric], mode="lines+markers", name=mode, legendgroup=mode,
                                     line=dict(color=color), showlegend=k == 0), row=r, col=c)
        if metric == "gold_rank":
            fig.update_yaxes(type="log", autorange="reversed", row=r, col=c)
    fig.update_xaxes(title_text="latent step", row=rows)
    fig.update_layout(title=title or "Latent drift by step (last layer; medians over items)", height=300 * rows)
    fig = apply_theme(fig)
    fig.update_annotations(font_size=14)  # the panel titles
    return fig


def lens_step_layer(lens: pd.DataFrame, value: str = "mean_gold_prob", *, title: str | None = None) -> go.Figure:
    """Lens readability as a step x layer heatmap, one panel per mode."""
    check_frame(lens, ("mode", "step", "layer", value), "lens_step_layer")
    modes = list(dict.fromkeys(lens["mode"]))
    fig = make_subplots(rows=1, cols=len(modes), subplot_titles=modes, shared_yaxes=True, horizontal_spacing=0.04)
    zmax = float(lens[value].max())
    for i, mode in enumerate(modes):
        grid = lens[lens["mode"] == mode].pivot_table(index="layer", columns="step", values=value)
        fig.add_trace(go.Heatmap(z=grid.values, x=grid.columns, y=grid.index, zmin=0, zmax=zmax or 1,
                                 colorscale="Viridis", showscale=i == len(modes) - 1,
                                 colorbar=dict(title=value.replace("_", " ")),
                                 hovertemplate="step %{x}<br>layer %{y}<br>%{z:.3f}<extra>" + mode + "</extra>"),
                      row=1, col=i + 1)
        fig.update_xaxes(title_text="latent step", row=1, col=i + 1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=title or f"Logit-lens readability of the gold intermediate ({value.replace('_', ' ')})")
    return apply_theme(fig)


def retention_by_gap(retention: pd.DataFrame, value: str = "round_acc", *, title: str | None = None) -> go.Figure:
    """Fact retention: a probe trained where a fact is computed, scored k - j steps later (mean over facts)."""
    check_frame(retention, ("mode", "gap", value), "retention_by_gap")
    fig = go.Figure()
    for mode, color in _mode_color(retention["mode"]).items():
        s = mean_sd(retention[retention["mode"] == mode], ["gap"], value)
        line_with_band(fig, s.gap, s["mean"], s["sd"], f"{mode} (probe from step j)", color)
        if f"{value}_refit" in retention.columns:  # dotted: a probe refitted at step k (the control)
            r = mean_sd(retention[retention["mode"] == mode], ["gap"], f"{value}_refit")
            line_with_band(fig, r.gap, r["mean"], r["sd"], f"{mode} (refitted at step k)", color, dash="dot")
    fig.update_layout(title=title or "Fact retention against the gap", xaxis_title="gap k - j (steps)",
                      yaxis_title={"round_acc": "probe-round accuracy", "r2": "held-out R²"}.get(value, value))
    return apply_theme(fig)


def retention_beyond_operands(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """What an intermediate probe reads beyond a linear read of the prompt's operands, by step: (MSE(mirror chain)
    - MSE(value)) / Var(value) with its interval (solid, bars) and R²(value) (dotted), one colour per run, one
    panel per fact."""
    check_frame(frame, ("mode", "step", "fact", "r2", "beyond", "beyond_lo", "beyond_hi"), "retention_beyond_operands")
    facts = sorted(frame.fact.unique())
    fig = make_subplots(rows=1, cols=len(facts), subplot_titles=[f"intermediate {f}" for f in facts],
                        shared_yaxes=True, horizontal_spacing=0.05)
    for i, fact in enumerate(facts):
        for mode, color in _mode_color(frame["mode"]).items():
            sub = frame[(frame["mode"] == mode) & (frame.fact == fact)].sort_values("step")
            if sub.empty:
                continue
            fig.add_trace(go.Scatter(
                x=sub.step, y=sub.beyond, mode="lines+markers", name=f"{mode}: beyond operands", legendgroup=mode,
                line=dict(color=color), showlegend=i == 0,
                error_y=dict(type="data", symmetric=False, array=sub.beyond_hi - sub.beyond,
                             arrayminus=sub.beyond - sub.beyond_lo)), row=1, col=i + 1)
            fig.add_trace(go.Scatter(x=sub.step, y=sub.r2, mode="lines", name=f"{mode}: R² of the value",
                                     legendgroup=mode, line=dict(color=color, dash="dot"), showlegend=i == 0),
                          row=1, col=i + 1)
        fig.add_hline(y=0, line=dict(color="grey", width=1), row=1, col=i + 1)
        fig.update_xaxes(title_text="loop step", row=1, col=i + 1)
    fig.update_yaxes(title_text="R²; (MSE mirror − MSE value) / Var value", row=1, col=1)
    fig.update_layout(title=title or "Read beyond the operands: mirror chain's error minus the value's, 95 % CI")
    return apply_theme(fig)


def soft_reliance(frame: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Soft Thinking's reliance test: per variant, the mean KL of the next-step distribution from the loop's
    (with its interval) and the argmax agreement."""
    check_frame(frame, ("variant", "kl_mean", "kl_lo", "kl_hi", "argmax_agree"), "soft_reliance")
    fig = make_subplots(rows=1, cols=2, subplot_titles=["KL(mixture ‖ variant), nats", "argmax agreement"])
    runs = frame["run"] if "run" in frame.columns else pd.Series("soft", index=frame.index)
    for name, color in _mode_color(runs).items():
        sub = frame[runs == name]
        fig.add_trace(go.Bar(x=sub.variant, y=sub.kl_mean, name=name, marker_color=color, legendgroup=name,
                             error_y=dict(type="data", symmetric=False, array=sub.kl_hi - sub.kl_mean,
                                          arrayminus=sub.kl_mean - sub.kl_lo)), row=1, col=1)
        fig.add_trace(go.Bar(x=sub.variant, y=sub.argmax_agree, name=name, marker_color=color, legendgroup=name,
                             showlegend=False,
                             error_y=dict(type="data", symmetric=False, array=sub.agree_hi - sub.argmax_agree,
                                          arrayminus=sub.argmax_agree - sub.agree_lo)), row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title or "Soft Thinking's reliance on the top token (95 % CI over items)",
                      barmode="group")
    return apply_theme(fig)


def accuracy_by_hops(adapters: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """The trained models' held-out accuracy against the chain's hop count: mean over training seeds with the
    range of the seeds (bars), one line per model (Coconut at its trained number of thoughts, and with one thought
    per hop beyond the trained range); a dotted line at the largest trained hop count."""
    check_frame(adapters, ("mode", "seed", "hops", "accuracy", "stage", "thoughts", "in_training_range"),
                "accuracy_by_hops")
    final = adapters[adapters.stage.isna()]
    kind = final.get("adapter", pd.Series("", index=final.index))
    label = (np.where(kind.eq("base"), "base model, ", np.where(kind.eq("heuristic"), "no computing: ", ""))
             + final["mode"] + np.where(final.thoughts.eq("hops"), " (thoughts = hops)", ""))
    label = pd.Series(label, index=final.index)
    fig = go.Figure()
    for name, color in _mode_color(label).items():
        sub = final[label == name].groupby("hops").accuracy.agg(["mean", "min", "max", "count"]).reset_index()
        fixed = name.startswith(("base", "no computing"))
        seeds = "" if fixed else f" ({int(sub['count'].max())} seeds)"
        fig.add_trace(go.Scatter(x=sub.hops, y=sub["mean"], mode="lines+markers", name=f"{name}{seeds}",
                                 line=dict(color=color, dash="dot" if name.startswith("no computing") else
                                           "dash" if fixed else "solid"),
                                 error_y=dict(type="data", symmetric=False, array=sub["max"] - sub["mean"],
                                              arrayminus=sub["mean"] - sub["min"])))
    trained = final[final.in_training_range.eq(True)].hops
    if len(trained):
        fig.add_vline(x=float(trained.max()) + 0.5, line=dict(color="grey", dash="dot"))
    fig.update_layout(title=title or "Held-out accuracy of the trained models by hops (mean, seed range)",
                      xaxis_title="hops in the chain", yaxis_title="accuracy", yaxis_range=[-0.02, 1.02])
    return apply_theme(fig)


def accuracy_by_steps(accuracy: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Answer accuracy against the number of thinking steps, one line per mode; ``direct`` as a dashed level."""
    check_frame(accuracy, ("mode", "n_steps", "accuracy"), "accuracy_by_steps")
    fig = go.Figure()
    colors = _mode_color(accuracy["mode"])
    xmax = max(1, int(accuracy.n_steps.max()))
    for mode, color in colors.items():
        sub = accuracy[accuracy["mode"] == mode].sort_values("n_steps")
        if mode == "direct":
            fig.add_trace(go.Scatter(x=[0, xmax], y=[sub.accuracy.iloc[0]] * 2, mode="lines", name="direct",
                                     line=dict(color=color, dash="dash")))
        else:
            fig.add_trace(go.Scatter(x=sub.n_steps, y=sub.accuracy, mode="lines+markers", name=mode,
                                     line=dict(color=color)))
    fig.update_layout(title=title or "Accuracy against thinking steps", xaxis_title="thinking steps",
                      yaxis_title="accuracy", yaxis_range=[-0.02, 1.02])
    return apply_theme(fig)


# -- sparse autoencoders ------------------------------------------------------------------------------------------
