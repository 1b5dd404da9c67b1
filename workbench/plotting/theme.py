"""The paper theme every figure carries: a colour-blind-safe colourway, Helvetica/Arial, white background."""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio

# Okabe-Ito: distinguishable with the common colour-vision deficiencies and in greyscale print.
PAPER_COLORWAY = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
PAPER_FONT = "Helvetica, Arial, sans-serif"

_axis = dict(
    showline=True, linecolor="#333", linewidth=1, ticks="outside", tickcolor="#333", ticklen=4,
    showgrid=False, zeroline=False, title=dict(font=dict(size=14)), tickfont=dict(size=12), automargin=True,
)

PAPER_TEMPLATE = go.layout.Template(
    layout=dict(
        font=dict(family=PAPER_FONT, size=13, color="#222"),
        title=dict(font=dict(size=15), x=0.0, xanchor="left", xref="paper"),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=PAPER_COLORWAY,
        xaxis=_axis,
        yaxis=_axis | dict(showgrid=True, gridcolor="#e6e6e6", gridwidth=1),
        legend=dict(font=dict(size=12), bgcolor="rgba(255,255,255,0.8)", borderwidth=0),
        margin=dict(l=70, r=30, t=60, b=60),
        hoverlabel=dict(font=dict(family=PAPER_FONT, size=12)),
        annotationdefaults=dict(font=dict(size=13)),
        colorscale=dict(sequential="Viridis"),
    ),
    data=dict(
        heatmap=[go.Heatmap(colorscale="Viridis", colorbar=dict(outlinewidth=0, ticks="outside", thickness=14))],
        scatter=[go.Scatter(line=dict(width=1.75))],
    ),
)
pio.templates["workbench_paper"] = PAPER_TEMPLATE


def apply_theme(fig: go.Figure) -> go.Figure:
    """Give ``fig`` the shared paper theme (``pio.templates["workbench_paper"]``); returns the same figure."""
    if not isinstance(fig, go.Figure):
        raise TypeError(f"apply_theme needs a plotly.graph_objects.Figure, got {type(fig).__name__}")
    fig.update_layout(template=PAPER_TEMPLATE)
    return fig

