"""Lens figures: the logit-lens heatmap, target probability / rank curves and their summary table, and the
held-out KL of a lens per layer. Functions take result frames and RETURN themed plotly figures (never ``.show()``).

Inputs are validated: a frame missing a needed column raises ``ValueError`` naming the missing and the required
columns.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.plotting.frames import check_frame, display_token
from workbench.plotting.theme import PAPER_COLORWAY, apply_theme

HEATMAP_COLUMNS = ("prompt_idx", "layer", "position", "input_token", "kind", "k", "token", "prob", "logit")
TARGET_COLUMNS = ("prompt_idx", "layer", "position", "kind", "token_id", "token", "prob", "rank")
HEATMAP_VALUES = ("prob", "logit")


def _check_kind(df: pd.DataFrame, kind: str, what: str, hint: str) -> pd.DataFrame:
    sub = df[df["kind"] == kind]
    if sub.empty:
        kinds = sorted(map(str, df["kind"].dropna().unique()))
        raise ValueError(f"{what}: no rows with kind == {kind!r} (kinds present: {kinds}); {hint}")
    return sub


# --------------------------------------------------------------------------------------------------------------
# Logit-lens heatmap
# --------------------------------------------------------------------------------------------------------------

def lens_heatmap(df: pd.DataFrame, prompt_idx: int = 0, value: str = "prob", *, title: str | None = None) -> go.Figure:
    """Layer x position heatmap of one prompt's top-1 lens token (the classic logit-lens picture).

    df: a :func:`workbench.logit_lens` frame with ``top_k >= 1`` (``positions="all"`` gives the full picture).
    Colour is the top-1 token's ``value`` ("prob" or "logit"); each cell is annotated with the top-1 token, and the
    hover also shows the input token at that position. Layer 0 (the embeddings) is at the bottom.
    """
    what = "lens_heatmap"
    check_frame(df, HEATMAP_COLUMNS, what)
    if value not in HEATMAP_VALUES:
        raise ValueError(f"{what}: value must be one of {list(HEATMAP_VALUES)}, got {value!r}")
    top = _check_kind(df, "top", what, "run logit_lens with top_k >= 1")
    available = sorted(int(p) for p in top["prompt_idx"].unique())
    if not isinstance(prompt_idx, (int, np.integer)) or int(prompt_idx) not in available:
        raise ValueError(f"{what}: prompt_idx {prompt_idx!r} is not in the frame; available: {available}")
    rows = top[(top["prompt_idx"] == prompt_idx) & (top["k"] == 1)]
    if rows.empty:
        raise ValueError(f"{what}: prompt {prompt_idx} has no top-1 rows (k == 1)")
    if rows.duplicated(["layer", "position"]).any():
        raise ValueError(f"{what}: several top-1 rows share a (layer, position) for prompt {prompt_idx}; "
                         "pass one logit_lens result, not a concatenation")

    layers = sorted(int(x) for x in rows["layer"].unique())
    positions = sorted(int(x) for x in rows["position"].unique())
    li = {l: i for i, l in enumerate(layers)}
    pi = {p: j for j, p in enumerate(positions)}
    z = np.full((len(layers), len(positions)), np.nan)
    text = np.full((len(layers), len(positions)), "", dtype=object)
    prob = np.full_like(z, np.nan)
    logit = np.full_like(z, np.nan)
    inputs = {}
    for r in rows.itertuples(index=False):
        i, j = li[int(r.layer)], pi[int(r.position)]
        z[i, j] = getattr(r, value)
        text[i, j] = display_token(r.token)
        prob[i, j], logit[i, j] = r.prob, r.logit
        inputs[int(r.position)] = display_token(r.input_token)
    input_labels = [inputs.get(p, "") for p in positions]
    custom = np.dstack([
        np.broadcast_to(np.array(input_labels, dtype=object), z.shape),
        prob,
        logit,
        np.broadcast_to(np.array(layers, dtype=object)[:, None], z.shape),
    ])

    colorbar_title = "P(top-1)" if value == "prob" else "top-1 logit"
    heat = go.Heatmap(
        x=list(range(len(positions))),
        y=list(range(len(layers))),  # categorical rows: evenly spaced whatever layers were picked
        z=z,
        text=text,
        texttemplate="%{text}",
        textfont=dict(size=10 if len(positions) <= 12 else 8),
        customdata=custom,
        hovertemplate=(
            "layer %{customdata[3]}, input token %{customdata[0]}<br>top-1 token: %{text}<br>"
            "prob %{customdata[1]:.3f}, logit %{customdata[2]:.2f}<extra></extra>"
        ),
        colorbar=dict(title=dict(text=colorbar_title, side="right")),
        zmin=0.0 if value == "prob" else None,
        zmax=1.0 if value == "prob" else None,
        xgap=1,
        ygap=1,
    )
    fig = go.Figure(heat)
    apply_theme(fig)
    fig.update_layout(
        title=title if title is not None else f"Logit lens: top-1 token by layer (prompt {prompt_idx})",
        width=max(520, 90 * len(positions) + 220),
        height=max(380, 20 * len(layers) + 170),
    )
    fig.update_xaxes(
        title_text="input token (position)",
        tickmode="array",
        tickvals=list(range(len(positions))),
        ticktext=[f"{lab}<br>({p})" for lab, p in zip(input_labels, positions, strict=True)],
        showgrid=False,
        showline=False,
        ticks="",
    )
    step = max(1, -(-len(layers) // 16))  # at most ~16 labelled rows
    fig.update_yaxes(
        title_text="layer (0 = embeddings)", showgrid=False, showline=False, ticks="",
        tickmode="array", tickvals=list(range(0, len(layers), step)), ticktext=[str(l) for l in layers[::step]],
    )
    return fig


# --------------------------------------------------------------------------------------------------------------
# Target probability / rank curves
# --------------------------------------------------------------------------------------------------------------

def _target_rows(df: pd.DataFrame, position, what: str) -> pd.DataFrame:
    check_frame(df, TARGET_COLUMNS, what)
    t = _check_kind(df, "target", what, "run logit_lens with targets=...")
    if position == "last":
        last = t.groupby("prompt_idx")["position"].transform("max")
        t = t[t["position"] == last]
    elif isinstance(position, (int, np.integer)):
        if position < 0:
            last = t.groupby("prompt_idx")["position"].transform("max")
            t = t[t["position"] == last + 1 + int(position)]
        else:
            t = t[t["position"] == int(position)]
        if t.empty:
            raise ValueError(f"{what}: no target rows at position {position}")
    else:
        raise ValueError(f"{what}: position must be 'last' or an int, got {position!r}")
    if t.duplicated(["prompt_idx", "token_id", "layer"]).any():
        raise ValueError(f"{what}: duplicate (prompt_idx, target, layer) rows; pass one logit_lens result")
    return t.sort_values(["prompt_idx", "token_id", "layer"])


def _label(prompt_idx: int, token, prompts: Sequence[str] | None) -> str:
    who = f"{prompt_idx}"
    if prompts is not None and 0 <= prompt_idx < len(prompts):
        p = prompts[prompt_idx]
        who = html.escape(p if len(p) <= 32 else "…" + p[-31:], quote=False)
    return f"{who} → {display_token(token)}"


def lens_target_curve(
    df: pd.DataFrame,
    *,
    position="last",
    prompts: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Target-token probability (top panel) and rank (bottom panel, log scale, rank 1 at the top) by layer.

    One thin line per (prompt, target) from the ``kind == "target"`` rows of a :func:`workbench.logit_lens` frame, at
    each prompt's last position (``position="last"``) or the given position (negative counts from each prompt's
    end); the median across lines is drawn bold in black. ``prompts`` (the prompt strings) only labels the lines.
    """
    what = "lens_target_curve"
    t = _target_rows(df, position, what)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.07, row_heights=[0.5, 0.5])
    groups = list(t.groupby(["prompt_idx", "token_id"], sort=True))
    for n, ((p_idx, _), g) in enumerate(groups):
        color = PAPER_COLORWAY[n % len(PAPER_COLORWAY)]
        label = _label(int(p_idx), g["token"].iloc[0], prompts)
        common = dict(
            x=g["layer"], mode="lines+markers", name=label, legendgroup=label, opacity=0.75,
            line=dict(color=color, width=1.5), marker=dict(size=4, color=color),
            customdata=np.stack([g["prob"], g["rank"]], axis=-1),
            hovertemplate=f"{label}<br>layer %{{x}}<br>prob %{{customdata[0]:.3g}}, rank %{{customdata[1]}}<extra></extra>",
        )
        fig.add_trace(go.Scatter(y=g["prob"], showlegend=True, **common), row=1, col=1)
        fig.add_trace(go.Scatter(y=g["rank"], showlegend=False, **common), row=2, col=1)
    if len(groups) > 1:
        med = t.groupby("layer").agg(prob=("prob", "median"), rank=("rank", "median")).reset_index()
        style = dict(x=med["layer"], mode="lines", name="median", legendgroup="median",
                     line=dict(color="black", width=3.5))
        fig.add_trace(go.Scatter(y=med["prob"], showlegend=True,
                                 hovertemplate="median<br>layer %{x}<br>prob %{y:.3g}<extra></extra>", **style),
                      row=1, col=1)
        fig.add_trace(go.Scatter(y=med["rank"], showlegend=False,
                                 hovertemplate="median<br>layer %{x}<br>rank %{y}<extra></extra>", **style),
                      row=2, col=1)
    apply_theme(fig)
    fig.update_layout(
        title=title if title is not None else "Logit lens: target token by layer",
        width=760,
        height=620,
        legend=dict(title=dict(text="prompt → target"), yanchor="top", y=1.0, x=1.02, xanchor="left"),
        hovermode="closest",
    )
    fig.update_yaxes(title_text="target probability", rangemode="tozero", row=1, col=1)
    max_rank = float(t["rank"].max())
    fig.update_yaxes(
        title_text="target rank (log)", type="log", autorange=False,
        range=[np.log10(max(max_rank, 10.0) * 1.5), np.log10(0.8)],  # reversed: rank 1 at the top
        row=2, col=1,
    )
    fig.update_xaxes(title_text="layer (0 = embeddings)", row=2, col=1)
    return fig


def lens_target_summary(df: pd.DataFrame, *, position="last") -> pd.DataFrame:
    """Per (prompt, target): the first layer where the target is the lens's top-1 token (rank 1; ``<NA>`` if
    never), its final-layer rank and probability, and the layer of its highest probability. Same row selection as
    :func:`lens_target_curve`."""
    t = _target_rows(df, position, "lens_target_summary")
    out = []
    for (p_idx, t_id), g in t.groupby(["prompt_idx", "token_id"], sort=True):
        first = g.loc[g["rank"] == 1, "layer"]
        last = g.loc[g["layer"].idxmax()]
        best = g.loc[g["prob"].idxmax()]
        out.append({
            "prompt_idx": int(p_idx),
            "position": int(g["position"].iloc[0]),
            "target": g["token"].iloc[0],
            "token_id": int(t_id),
            "first_rank1_layer": int(first.min()) if len(first) else pd.NA,
            "final_layer": int(last["layer"]),
            "final_rank": int(last["rank"]),
            "final_prob": float(last["prob"]),
            "max_prob": float(best["prob"]),
            "max_prob_layer": int(best["layer"]),
        })
    frame = pd.DataFrame(out)
    frame["first_rank1_layer"] = frame["first_rank1_layer"].astype("Int64")
    return frame


# --------------------------------------------------------------------------------------------------------------
# Held-out KL of a lens
# --------------------------------------------------------------------------------------------------------------

def kl_figure(kl: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Held-out KL per layer, one line per lens (a :func:`workbench.methods.tuned_lens.lens_kl` frame)."""
    need = {"lens", "layer", "kl_bits"}
    if not isinstance(kl, pd.DataFrame) or not need <= set(kl.columns):
        raise ValueError(f"kl must be a lens_kl frame with columns {sorted(need)}")
    fig = go.Figure()
    kl = kl[kl["kl_bits"] > 0]  # the last layer is the model's output for every lens: KL 0, off a log axis
    for name, g in kl.groupby("lens", sort=False):
        fig.add_scatter(x=g["layer"], y=g["kl_bits"], mode="lines+markers", name=f"{name} lens")
    fig.update_layout(title=title or "KL(model output || lens) per layer, held-out text",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="KL (bits per token)", yaxis_type="log")
    return apply_theme(fig)
