"""Plots of the encoded-vs-expressed study: functions that take the study's result frames and RETURN plotly figures."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.curves import gap_figure
from workbench.plotting.frames import check_frame
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme


def panel_figure(panel: pd.DataFrame, thread: str, *, title: str | None = None) -> go.Figure:
    """The gap panel of one thread, one column per (model, task)."""
    check_frame(panel, ("thread", "model", "task", "index", "probe_acc", "lens_acc", "probe_cos"), "panel_figure")
    part = panel[panel.thread == thread]
    if part.empty:
        raise ValueError(f"no panel rows for thread {thread!r}; threads: {sorted(panel.thread.unique())}")
    part = part.assign(facet=part.model + "<br>" + part.task)
    return apply_theme(gap_figure(part, facet="facet", title=title or f"Encoded vs expressed: {thread}"))


def suppression_figure(suppression: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per task and ablation (the pooled rows over seeds): the accuracy change and the gold log-prob gain beyond
    flattening (the flattening control), each with its 95 % interval."""
    check_frame(suppression, ("task", "ablation", "n_last", "acc_change", "excess_gain", "seed"), "suppression_figure")
    pooled = suppression[suppression.seed == "all"]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=["accuracy change (digit-restricted)",
                                        "gold log-prob gain beyond flattening (nats)"])
    for i, (mode, k) in enumerate(sorted({(a, int(n)) for a, n in zip(pooled.ablation, pooled.n_last)})):
        sub = pooled[(pooled.ablation == mode) & (pooled.n_last == k)]
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        for c, col in enumerate(("acc_change", "excess_gain"), start=1):
            fig.add_bar(x=sub.task, y=sub[col], name=f"{mode}-ablate last {k}", legendgroup=f"{mode}{k}",
                        showlegend=c == 1, marker_color=color,
                        error_y={"type": "data", "symmetric": False, "array": sub[f"{col}_hi"] - sub[col],
                                 "arrayminus": sub[col] - sub[f"{col}_lo"]}, row=1, col=c)
    fig.update_layout(barmode="group", width=1200,
                      title=title or "Late suppression: ablating the last MLPs (pooled over seeds, 95 % intervals)")
    return apply_theme(fig)


def delimiter_figure(panel: pd.DataFrame, curves: pd.DataFrame, sweeps: pd.DataFrame, summary: pd.DataFrame, *,
                     title: str | None = None) -> go.Figure:
    """Per layer and delimiter: the count probe's held-out accuracy, the lens's gold log-probability (softmax over
    the digits), and the change of the answer's gold log-probability when one block's MLP is zero-ablated (stars:
    the MLP whose ablation helps most)."""
    check_frame(curves, ("delimiter", "layer", "lens_gold_logprob"), "delimiter_figure")
    check_frame(sweeps, ("delimiter", "block", "logprob_change"), "delimiter_figure")
    check_frame(panel, ("delimiter", "index", "probe_acc"), "delimiter_figure")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=["count probe: held-out accuracy", "lens: gold log-prob (digits)",
                                        "one MLP zero-ablated: Δ gold log-prob"])
    if "seed" in sweeps:
        sweeps = sweeps[sweeps.seed == "all"]  # the pooled sweep the winner was picked from
    for i, delim in enumerate(dict.fromkeys(curves.delimiter)):
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        c, s = curves[curves.delimiter == delim], sweeps[sweeps.delimiter == delim]
        p = panel[panel.delimiter == delim]
        fig.add_scatter(x=p["index"], y=p.probe_acc, name=delim, legendgroup=delim, line={"color": color},
                        row=1, col=1)
        fig.add_scatter(x=c.layer, y=c.lens_gold_logprob, name=delim, legendgroup=delim, showlegend=False,
                        line={"color": color}, row=1, col=2)
        fig.add_scatter(x=s.block + 1, y=s.logprob_change, name=delim, legendgroup=delim, showlegend=False,
                        line={"color": color}, row=1, col=3)
        row = summary[summary.delimiter == delim]
        if not row.empty and pd.notna(row.mlp_block.iloc[0]):
            b = int(row.mlp_block.iloc[0])
            fig.add_scatter(x=[b + 1], y=s[s.block == b].logprob_change, mode="markers", showlegend=False,
                            marker={"color": color, "size": 12, "symbol": "star"}, row=1, col=3)
    fig.update_xaxes(title_text="hidden-state layer", row=1, col=1)
    fig.update_xaxes(title_text="hidden-state layer", row=1, col=2)
    fig.update_xaxes(title_text="block + 1 (its output layer)", row=1, col=3)
    fig.update_layout(title=title or "Repeated-item counting: where the count is overwritten, by delimiter",
                      width=1350, margin={"t": 110})
    return apply_theme(fig)


def soft_threads_figure(steps: pd.DataFrame, summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per latent step: the top token's share of the soft mixture, the mixture entropy and max |cos| to the
    embeddings, one line per Gumbel temperature; accuracy per temperature in the legend."""
    check_frame(steps, ("gumbel_tau", "step", "top_share", "entropy", "max_cos"), "soft_threads_figure")
    acc = dict(zip(summary.gumbel_tau, summary.accuracy)) if "accuracy" in summary else {}
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.08,
                        subplot_titles=["top token's share", "mixture entropy (nats)", "max |cos| to an embedding"])
    for i, tau in enumerate(dict.fromkeys(steps.gumbel_tau)):
        sub = steps[steps.gumbel_tau == tau]
        name = f"Gumbel τ={tau}" if tau != "none" else "plain Soft Thinking"
        if tau in acc:
            name += f" (acc {acc[tau]:.2f})"
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        for c, col in enumerate(("top_share", "entropy", "max_cos"), start=1):
            fig.add_scatter(x=sub.step, y=sub[col], name=name, legendgroup=tau, showlegend=c == 1,
                            line={"color": color}, row=1, col=c)
    fig.update_xaxes(title_text="latent step")
    fig.update_layout(title=title or "Is Soft Thinking single-threaded?", width=1350, margin={"t": 110})
    return apply_theme(fig)


def integration_figure(curves: pd.DataFrame, summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per model: the gap per layer between the last-token distances of vision-dependent and vision-independent
    items (the paper's contrast), its threshold tau (dotted) and the VIP (diamond)."""
    check_frame(curves, ("model", "layer", "gap", "tau"), "integration_figure")
    fig = go.Figure()
    for i, m in enumerate(dict.fromkeys(curves.model)):
        sub = curves[curves.model == m]
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        fig.add_scatter(x=sub.layer, y=sub.gap, name=m, legendgroup=m, line={"color": color})
        fig.add_scatter(x=sub.layer, y=sub.tau, name=f"{m}: tau", legendgroup=m, showlegend=False,
                        line={"color": color, "dash": "dot"})
        row = summary[summary.model == m]
        if not row.empty and pd.notna(row.vip.iloc[0]):
            v = int(row.vip.iloc[0])
            fig.add_scatter(x=[v], y=sub[sub.layer == v].gap, mode="markers", showlegend=False, legendgroup=m,
                            marker={"color": color, "size": 11, "symbol": "diamond"})
    fig.update_layout(title=title or "Visual integration point: D(vision-dependent) - D(vision-independent), last "
                      "token (◆ = VIP, dotted = tau)", xaxis_title="hidden-state layer",
                      yaxis_title="gap in 1 - cos (last token)")
    return apply_theme(fig)
