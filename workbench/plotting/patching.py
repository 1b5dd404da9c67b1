"""Patching figures: attribution-vs-exact agreement per site type and recovery maps by layer and position."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.frames import check_frame, display_token
from workbench.plotting.theme import apply_theme

AGREEMENT_COLUMNS = ("method", "site_type", "spearman", "speedup")
PATCH_COLUMNS = ("pair", "site_type", "layer", "head", "position", "from_end", "token", "recovery")


def agreement_figure(agreement: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Rank correlation (Spearman) of each attribution method with the exact sweep, per site type; the legend gives
    each method's wall-time speed-up over the sweep (a :func:`workbench.methods.patching.patching_agreement` frame)."""
    agreement = check_frame(agreement, AGREEMENT_COLUMNS, "patching agreement")
    fig = go.Figure()
    for method, g in agreement.groupby("method", sort=False):
        fig.add_bar(x=g["site_type"].astype(str), y=g["spearman"],
                    name=f"{method}, all units ({g['speedup'].iloc[0]:.0f}x faster than the sweep)")
        if "spearman_large" in g:  # the units that matter (exact |recovery| above the threshold)
            fig.add_bar(x=g["site_type"].astype(str), y=g["spearman_large"], marker_pattern_shape="/",
                        name=f"{method}, units with large exact effect",
                        customdata=g["n_large"] if "n_large" in g else None,
                        hovertemplate="%{x}: ρ %{y:.3f} over %{customdata} units<extra></extra>")
    fig.update_layout(barmode="group", title=title or "Attribution vs exact patching: rank correlation per site type",
                      xaxis_title="site type", yaxis_title="Spearman ρ with exact patching", yaxis_range=[-1, 1])
    return apply_theme(fig)


def patching_map_figure(result, *, pair: int | None = None, title: str | None = None) -> go.Figure:
    """Recovery (score / (clean - corrupt metric)) per layer x position, one panel per site type (heads: layer x
    head, summed over the patched positions); ``pair=None`` averages over pairs (positions counted from the end,
    labelled with the first pair's tokens)."""
    frame = check_frame(result.frame, PATCH_COLUMNS, "patching result")
    if pair is not None:
        if pair not in set(frame["pair"]):
            raise ValueError(f"pair {pair!r} is not in this result; it has pairs 0..{frame['pair'].max()}")
        frame = frame[frame["pair"] == pair]
    types = [t for t in frame["site_type"].cat.categories if t in set(frame["site_type"])] \
        if hasattr(frame["site_type"], "cat") else sorted(set(frame["site_type"]))
    fig = make_subplots(rows=1, cols=len(types), subplot_titles=types, horizontal_spacing=0.06)
    ref = frame[frame["pair"] == frame["pair"].min()]
    for i, st in enumerate(types, start=1):
        f = frame[frame["site_type"] == st]
        if st == "head":
            per = f.groupby(["pair", "layer", "head"]).recovery.sum().reset_index()
            table = per.pivot_table(index="layer", columns="head", values="recovery", aggfunc="mean")
            x = [f"h{h}" for h in table.columns]
        else:
            table = f.pivot_table(index="layer", columns="from_end", values="recovery", aggfunc="mean")
            tok = ref[ref["site_type"] == st].drop_duplicates("from_end").set_index("from_end")["token"]
            x = [f"{c}:{display_token(tok.get(c, ''))}" for c in table.columns]
        fig.add_heatmap(z=table.values, x=x, y=table.index, coloraxis="coloraxis",
                        hovertemplate="layer %{y}<br>%{x}<br>recovery %{z:.3f}<extra></extra>", row=1, col=i)
        fig.update_xaxes(tickangle=-60, row=1, col=i)
    fig.update_yaxes(title_text="layer (block)", row=1, col=1)
    which = f"pair {pair}" if pair is not None else f"mean over {frame['pair'].nunique()} pairs"
    fig.update_layout(title=title or f"{result.method} patching: recovery by layer and position ({which})",
                      coloraxis={"colorscale": "RdBu", "cmid": 0, "colorbar": {"title": "recovery"}})
    return apply_theme(fig)
