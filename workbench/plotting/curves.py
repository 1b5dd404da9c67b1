"""Curves by layer or step: mean and spread over seeds, shaded bands, a line with its +-1 sd band, and the
encoded-vs-expressed gap panel."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def mean_sd(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Mean and sample sd of ``value`` per group of ``by`` (sd 0 for a single row), as columns ``mean`` and ``sd``."""
    g = df.groupby(by, sort=True)[value]
    return pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1).fillna(0.0)}).reset_index()


def band(fig, x, lo, hi, *, color, opacity=0.15, name=None, showlegend=False, legendgroup=None, mode=None,
         row=None, col=None):
    """A shaded band between the curves ``lo`` and ``hi`` over ``x`` (no hover); returns ``fig``."""
    kw = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=list(hi) + list(lo)[::-1], fill="toself", mode=mode,
                             fillcolor=color, opacity=opacity, line=dict(width=0), hoverinfo="skip", name=name,
                             showlegend=showlegend, legendgroup=legendgroup), **kw)
    return fig


def line_with_band(fig, x, mean, sd, name, color, dash="solid", row=None, col=None, showlegend=True):
    """A line of ``mean`` over ``x`` with a +-``sd`` band in the same colour, sharing one legend entry."""
    band(fig, x, mean - sd, mean + sd, color=color, legendgroup=name, row=row, col=col)
    kw = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Scatter(x=list(x), y=list(mean), name=name, mode="lines+markers", legendgroup=name,
                             line=dict(color=color, dash=dash), marker=dict(size=4), showlegend=showlegend), **kw)


# -- encoded vs expressed ----------------------------------------------------------------------------------------------
_SERIES = (("probe_acc", "probe (encoded)", "#1f77b4", "solid"),
           ("lens_acc", "logit lens among answers (expressed)", "#d62728", "solid"),
           ("tuned_acc", "tuned lens among answers", "#ff7f0e", "dash"),
           ("lens_top1", "logit lens top-1 (vocabulary)", "#9467bd", "dot"),
           ("patch_recovery", "patch recovery", "#2ca02c", "solid"),
           ("chance", "chance (majority class)", "#7f7f7f", "dot"))


def gap_figure(panel: pd.DataFrame, *, facet: str = "task", title: str | None = None) -> go.Figure:
    """Per facet value (default: one subplot per task): the panel's curves against the axis, and |cos| on a second
    row with its random baseline. Columns a panel lacks (no tuned lens, no patching) are left out."""
    if panel.empty:
        raise ValueError("the panel is empty")
    if facet not in panel.columns:
        raise ValueError(f"facet column {facet!r} not in the panel; columns: {list(panel.columns)}")
    keys = list(dict.fromkeys(panel[facet]))
    fig = make_subplots(rows=2, cols=len(keys), shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06,
                        subplot_titles=[str(k) for k in keys])
    for c, key in enumerate(keys, start=1):
        part = panel[panel[facet] == key]
        x = part["index"]
        for col, name, colour, dash in _SERIES:
            if col in part and part[col].notna().any():
                fig.add_scatter(x=x, y=part[col], name=name, legendgroup=col, showlegend=c == 1, row=1, col=c,
                                line={"color": colour, "dash": dash}, mode="lines+markers", marker={"size": 4})
        fig.add_scatter(x=x, y=part["probe_cos"], name="|cos| probe vs answer rows", legendgroup="cos",
                        showlegend=c == 1, row=2, col=c, line={"color": "#8c564b"})
        fig.add_scatter(x=x, y=part["cos_random"], name="|cos| random", legendgroup="cosr", showlegend=c == 1,
                        row=2, col=c, line={"color": "#7f7f7f", "dash": "dot"})
        fig.update_xaxes(title_text=str(part["axis"].iloc[0]), row=2, col=c)
    fig.update_yaxes(title_text="accuracy / recovery", row=1, col=1)
    fig.update_yaxes(title_text="|cos|", row=2, col=1)
    fig.update_layout(title=title or "Encoded vs expressed", height=600, width=max(640, 380 * len(keys) + 300),
                      template="plotly_white", margin={"t": 120})  # room for the title above two-line facet titles
    return fig
