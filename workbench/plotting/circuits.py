"""An attribution graph (circuit-tracer's JSON: nodes, links) as a plotly figure: positions across, layers up."""

from __future__ import annotations

import plotly.graph_objects as go

from workbench.plotting.theme import apply_theme

COLORS = {"cross layer transcoder": "#4c72b0", "mlp reconstruction error": "#999999", "embedding": "#55a868",
          "logit": "#dd8452"}


def _row(node: dict) -> float:
    return -1.0 if node["layer"] == "E" else float(node["layer"])


def node_positions(data: dict) -> dict[str, tuple[float, float]]:
    """x = position (nodes sharing a cell spread across it), y = layer (tokens -1, targets n_layers + 1)."""
    cells: dict[tuple, list[str]] = {}
    for n in data["nodes"]:
        cells.setdefault((n["ctx_idx"], _row(n)), []).append(n["node_id"])
    out = {}
    for (ctx, row), ids in cells.items():
        for k, node_id in enumerate(ids):
            out[node_id] = (ctx + (k + 1) / (len(ids) + 1) - 0.5, row)
    return out


def graph_figure(data: dict, *, title: str = "", max_links: int = 400) -> go.Figure:
    """The pruned graph: nodes coloured by kind (features, errors, tokens, targets), the ``max_links`` strongest
    links drawn with width by |weight| (red positive, blue negative)."""
    pos = node_positions(data)
    links = sorted(data["links"], key=lambda x: -abs(x["weight"]))[:max_links]
    top = max([abs(x["weight"]) for x in links] + [1e-12])
    fig = go.Figure()
    for sign, color in ((1, "rgba(200,60,60,0.45)"), (-1, "rgba(60,90,200,0.45)")):
        for link in links:
            if (link["weight"] >= 0) != (sign > 0):
                continue
            (x0, y0), (x1, y1) = pos[link["source"]], pos[link["target"]]
            fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                                     line={"color": color, "width": 0.5 + 4 * abs(link["weight"]) / top}))
    for kind, color in COLORS.items():
        nodes = [n for n in data["nodes"] if n["feature_type"] == kind]
        if not nodes:
            continue
        fig.add_trace(go.Scatter(
            x=[pos[n["node_id"]][0] for n in nodes], y=[pos[n["node_id"]][1] for n in nodes], mode="markers",
            name=kind, marker={"color": color, "size": 9, "symbol": "square" if "error" in kind else "circle"},
            text=[f"{n['node_id']}<br>{n['clerp']}<br>act {n['activation']}" for n in nodes], hoverinfo="text"))
    toks = data["metadata"]["prompt_tokens"]
    fig.update_xaxes(tickvals=list(range(len(toks))), ticktext=[t.replace("\n", "\\n") for t in toks], tickangle=-45)
    fig.update_yaxes(title="layer (tokens -1, targets on top)")
    fig.update_layout(title=title or f"attribution graph: {data['metadata']['prompt'][:60]!r}")
    return apply_theme(fig)
