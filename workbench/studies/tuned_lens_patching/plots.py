"""Plots of the readout study: functions that take the study's result frames and RETURN plotly figures.

Every mean carries its 95 % bootstrap interval (error bars or a band): over held-out windows for the lens KL, over
IOI pairs for patching and agreement.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.data.ioi import ROLES
from workbench.plotting.curves import band
from workbench.plotting.frames import check_frame
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme

METHOD_NAMES = {"exact": "exact sweep", "atp": "AtP", "ig": "EAP-IG"}
CORRUPTION_NAMES = {"name_swap": "name swap (ABB → ABA)", "abc": "ABC (fresh context names)"}


def _errors(g: pd.DataFrame, mean: str, lo: str, hi: str) -> dict:
    return {"type": "data", "symmetric": False, "array": (g[hi] - g[mean]).tolist(),
            "arrayminus": (g[mean] - g[lo]).tolist(), "thickness": 1}


def _role_order(roles) -> list[str]:
    roles = list(dict.fromkeys(roles))
    return [r for r in ROLES if r in roles] + sorted(r for r in roles if r not in ROLES)


def kl_ci_figure(kl: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Held-out KL per layer, one line per lens, with the 95 % interval over windows as error bars (log axis; the
    last layer, the model's output, is 0 for every lens and left out)."""
    check_frame(kl, ("lens", "layer", "kl_bits", "kl_bits_lo", "kl_bits_hi"), "kl_ci_figure")
    fig = go.Figure()
    kl = kl[kl["kl_bits"] > 0]
    for name, g in kl.groupby("lens", sort=False):
        fig.add_scatter(x=g["layer"], y=g["kl_bits"], mode="lines+markers", name=f"{name} lens",
                        error_y=_errors(g, "kl_bits", "kl_bits_lo", "kl_bits_hi"))
    n = int(kl["n_windows"].iloc[0]) if "n_windows" in kl else None
    fig.update_layout(title=title or "KL(model output || lens) per layer, held-out text"
                      + (f" (95 % CI over {n} windows)" if n else ""),
                      xaxis_title="layer (0 = embeddings)", yaxis_title="KL (bits per token)", yaxis_type="log")
    return apply_theme(fig)


def kl_ratio_figure(ratio: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per layer: mean KL of the logit lens / mean KL of the tuned lens, with its 95 % interval over windows."""
    check_frame(ratio, ("layer", "ratio", "ratio_lo", "ratio_hi"), "kl_ratio_figure")
    g = ratio[ratio["ratio"].notna()]
    fig = go.Figure()
    fig.add_scatter(x=g["layer"], y=g["ratio"], mode="lines+markers", name="logit / tuned",
                    error_y=_errors(g, "ratio", "ratio_lo", "ratio_hi"))
    fig.add_hline(y=1, line_dash="dot")  # equal KL (no annotation: plotly misplaces it on a log axis)
    fig.update_layout(title=title or "How much closer the tuned lens is: KL(logit lens) / KL(tuned lens) per layer",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="KL ratio (95 % CI over windows)",
                      yaxis_type="log")
    return apply_theme(fig)


def recovery_figure(summary: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Mean recovery by layer with its 95 % interval over pairs (bands), one panel per corruption (rows) and
    patched site type x role (columns), one line per method. Heads are left out (see the maps)."""
    check_frame(summary, ("corruption", "method", "site_type", "layer", "role", "recovery_mean", "recovery_lo",
                          "recovery_hi"), "recovery_figure")
    s = summary[summary["site_type"].astype(str) != "head"]
    if s.empty:
        raise ValueError("recovery_figure: no resid / attn / mlp units in the summary (heads are drawn as maps)")
    corruptions = list(dict.fromkeys(s["corruption"]))
    panels = [(st, r) for st in dict.fromkeys(s["site_type"].astype(str))
              for r in _role_order(s.loc[s["site_type"].astype(str) == st, "role"])]
    titles = [f"{st} at {r}" for st, r in panels]  # columns; the rows (corruptions) are named on the y axes
    fig = make_subplots(rows=len(corruptions), cols=len(panels), subplot_titles=titles, shared_xaxes=True,
                        shared_yaxes=True, horizontal_spacing=0.03, vertical_spacing=0.08)
    methods = list(dict.fromkeys(s["method"]))
    shown: set[str] = set()
    for i, c in enumerate(corruptions, start=1):
        for j, (st, role) in enumerate(panels, start=1):
            part = s[(s["corruption"] == c) & (s["site_type"].astype(str) == st) & (s["role"] == role)]
            for k, method in enumerate(methods):
                g = part[part["method"] == method].sort_values("layer")
                if g.empty:
                    continue
                color = PAPER_COLORWAY[k % len(PAPER_COLORWAY)]
                name = METHOD_NAMES.get(method, method)
                band(fig, g["layer"], g["recovery_lo"], g["recovery_hi"], color=color, opacity=0.2, legendgroup=name,
                     row=i, col=j)
                fig.add_scatter(x=g["layer"], y=g["recovery_mean"], mode="lines+markers", name=name,
                                legendgroup=name, showlegend=name not in shown, line={"color": color},
                                marker={"size": 4}, row=i, col=j,
                                customdata=g[["recovery_lo", "recovery_hi"]].to_numpy(),
                                hovertemplate="block %{x}: %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                                              "<extra>" + name + "</extra>")
                shown.add(name)
            fig.add_hline(y=0, line_width=0.5, line_color="gray", row=i, col=j)
    for i, c in enumerate(corruptions, start=1):
        fig.update_yaxes(title_text=f"{CORRUPTION_NAMES.get(c, c)}<br>recovery (95 % CI)", row=i, col=1)
    for j in range(1, len(panels) + 1):
        fig.update_xaxes(title_text="block", row=len(corruptions), col=j)
    n = int(s["n_pairs"].max()) if "n_pairs" in s else None
    fig.update_layout(title=title or "Patching recovery by block, mean and 95 % CI over pairs"
                      + (f" ({n} IOI pairs)" if n else ""),
                      height=300 * len(corruptions) + 140, width=max(700, 260 * len(panels) + 200))
    return apply_theme(fig)


def role_map_figure(scores: pd.DataFrame, *, method: str, corruption: str | None = None, pair: int | None = None,
                    title: str | None = None) -> go.Figure:
    """Mean recovery per block x role (heads: block x head, summed over the patched positions) for ``method``, one
    panel per site type and one row per corruption (``corruption`` picks one); ``pair`` shows one pair alone."""
    check_frame(scores, ("corruption", "method", "pair", "site_type", "layer", "head", "role", "recovery"),
                "role_map_figure")
    f = scores[scores["method"] == method]
    if f.empty:
        raise ValueError(f"no {method!r} scores; methods here: {sorted(set(scores['method']))}")
    if corruption is not None:
        if corruption not in set(f["corruption"]):
            raise ValueError(f"corruption {corruption!r} is not in these scores; they have "
                             f"{sorted(set(f['corruption']))}")
        f = f[f["corruption"] == corruption]
    if pair is not None:
        if pair not in set(f["pair"]):
            raise ValueError(f"pair {pair!r} is not in this result; it has pairs 0..{f['pair'].max()}")
        f = f[f["pair"] == pair]
    corruptions = list(dict.fromkeys(f["corruption"]))
    types = [t for t in ("resid", "attn", "mlp", "head") if t in set(f["site_type"].astype(str))]
    fig = make_subplots(rows=len(corruptions), cols=len(types), subplot_titles=types, horizontal_spacing=0.06,
                        vertical_spacing=0.1)
    for i, c in enumerate(corruptions, start=1):
        for j, st in enumerate(types, start=1):
            g = f[(f["corruption"] == c) & (f["site_type"].astype(str) == st)]
            if st == "head":
                per = g.groupby(["pair", "layer", "head"], observed=True).recovery.sum().reset_index()
                table = per.pivot_table(index="layer", columns="head", values="recovery", aggfunc="mean")
                x = [f"h{h}" for h in table.columns]
            else:
                table = g.pivot_table(index="layer", columns="role", values="recovery", aggfunc="mean")
                table = table[_role_order(table.columns)]
                x = list(table.columns)
            fig.add_heatmap(z=table.values, x=x, y=table.index, coloraxis="coloraxis", row=i, col=j,
                            hovertemplate="block %{y}<br>%{x}<br>recovery %{z:.3f}<extra></extra>")
        fig.update_yaxes(title_text=f"{CORRUPTION_NAMES.get(c, c)}<br>block", row=i, col=1)
    which = f"pair {pair}" if pair is not None else f"mean over {f['pair'].nunique()} pairs"
    fig.update_layout(title=title or f"{METHOD_NAMES.get(method, method)}: recovery by block and position ({which})"
                                     "<br><sup>IO, S1, S2: the names' mentions; END: the last token</sup>",
                      coloraxis={"colorscale": "RdBu", "cmid": 0, "colorbar": {"title": "recovery"}},
                      height=300 * len(corruptions) + 180, width=max(600, 280 * len(types) + 220),
                      margin={"t": 110})
    return apply_theme(fig)


def agreement_ci_figure(agreement: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Spearman correlation of each attribution method with the exact sweep per site type, with its 95 % interval
    over pairs; hatched: over the units with a large exact effect. One panel per corruption."""
    check_frame(agreement, ("corruption", "method", "site_type", "spearman", "spearman_lo", "spearman_hi",
                            "speedup"), "agreement_ci_figure")
    corruptions = list(dict.fromkeys(agreement["corruption"]))
    fig = make_subplots(rows=1, cols=len(corruptions), shared_yaxes=True,
                        subplot_titles=[CORRUPTION_NAMES.get(c, c) for c in corruptions])
    for j, c in enumerate(corruptions, start=1):
        part = agreement[agreement["corruption"] == c]
        for k, (method, g) in enumerate(part.groupby("method", sort=False)):
            color = PAPER_COLORWAY[k % len(PAPER_COLORWAY)]
            name = METHOD_NAMES.get(method, method)
            fig.add_bar(x=g["site_type"].astype(str), y=g["spearman"], marker_color=color, legendgroup=name,
                        name=f"{name}, all units ({g['speedup'].iloc[0]:.0f}x faster)", showlegend=j == 1,
                        error_y=_errors(g, "spearman", "spearman_lo", "spearman_hi"), row=1, col=j)
            if "spearman_large" in g:
                fig.add_bar(x=g["site_type"].astype(str), y=g["spearman_large"], marker_color=color,
                            marker_pattern_shape="/", legendgroup=name, name=f"{name}, units with large exact effect",
                            showlegend=j == 1,
                            error_y=_errors(g, "spearman_large", "spearman_large_lo", "spearman_large_hi"),
                            row=1, col=j)
    fig.update_yaxes(title_text="Spearman ρ with exact patching (95 % CI over pairs)", range=[-1, 1], row=1, col=1)
    fig.update_layout(barmode="group", title=title or "Attribution vs exact patching: rank correlation per site type",
                      width=max(700, 520 * len(corruptions)))
    return apply_theme(fig)
