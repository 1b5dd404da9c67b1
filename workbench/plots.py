"""Plots of workbench results: functions that take result DataFrames and RETURN plotly figures (never ``.show()``).

Every figure carries the shared paper theme (:func:`workbench.figures.apply_theme`); save one with
:func:`workbench.figures.save_figure`. Inputs are validated: a frame missing a needed column raises ``ValueError``
naming the missing and the required columns.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.figures import PAPER_COLORWAY, apply_theme

HEATMAP_COLUMNS = ("prompt_idx", "layer", "position", "input_token", "kind", "k", "token", "prob", "logit")
TARGET_COLUMNS = ("prompt_idx", "layer", "position", "kind", "token_id", "token", "prob", "rank")
HEATMAP_VALUES = ("prob", "logit")

# Byte-level BPE marks (GPT-2 style) -> readable text.
_BPE_MARKS = {"Ġ": "␣", "Ċ": "↵", "ĉ": "⇥", "▁": "␣"}


def display_token(token) -> str:
    """A token string as shown in figures: leading-space/newline marks made visible, HTML-escaped for plotly."""
    if token is None or (isinstance(token, float) and np.isnan(token)):
        return ""
    text = str(token)
    for mark, shown in _BPE_MARKS.items():
        text = text.replace(mark, shown)
    return html.escape(text, quote=False)


def _check_frame(df, required: Sequence[str], what: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} needs a pandas DataFrame (e.g. from workbench.logit_lens), got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what}: the frame lacks column(s) {missing}; it needs {list(required)} "
            f"(the columns of workbench.logit_lens), it has {list(df.columns)}"
        )
    if df.empty:
        raise ValueError(f"{what}: the frame is empty")
    return df


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
    _check_frame(df, HEATMAP_COLUMNS, what)
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
    _check_frame(df, TARGET_COLUMNS, what)
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


# -- counting readout ------------------------------------------------------------------------------------------
def _mean_sd(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    g = df.groupby(by, sort=True)[value]
    return pd.DataFrame({"mean": g.mean(), "sd": g.std(ddof=1).fillna(0.0)}).reset_index()


def _line_with_band(fig, x, mean, sd, name, color, dash="solid", row=None, col=None, showlegend=True):
    kw = {} if row is None else {"row": row, "col": col}
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=list(mean + sd) + list(mean - sd)[::-1], fill="toself",
                             fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                             showlegend=False, legendgroup=name), **kw)
    fig.add_trace(go.Scatter(x=list(x), y=list(mean), name=name, mode="lines+markers", legendgroup=name,
                             line=dict(color=color, dash=dash), marker=dict(size=4), showlegend=showlegend), **kw)


def probe_r2_by_layer(probes: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Held-out R² of the count probe by layer, one line per task (mean ± sd over seeds); dashed: mention mean."""
    _check_frame(probes, ("task", "seed", "variant", "layer", "r2_test"), "probe_r2_by_layer")
    fig = go.Figure()
    for i, task in enumerate(dict.fromkeys(probes.task)):
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        for variant, dash in (("last_token", "solid"), ("mention_mean", "dash")):
            sub = probes[(probes.task == task) & (probes.variant == variant)]
            if sub.empty:
                continue
            s = _mean_sd(sub, ["layer"], "r2_test")
            name = task if variant == "last_token" else f"{task} (mention mean)"
            _line_with_band(fig, s.layer, s["mean"], s["sd"], name, color, dash)
    fig.update_layout(title=title or "Count probes: held-out R² by layer", xaxis_title="layer (0 = embeddings)",
                      yaxis_title="held-out R²", yaxis_range=[-0.1, 1.02])
    return apply_theme(fig)


def cos_by_layer(geometry: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Mean |cos| between the probe direction and the digit rows by layer, against the random band."""
    _check_frame(geometry, ("task", "seed", "layer", "cos_mean", "random_lo", "random_hi", "random_baseline"),
                 "cos_by_layer")
    fig = go.Figure()
    band = geometry.groupby("layer")[["random_lo", "random_hi", "random_baseline"]].mean().reset_index()
    fig.add_trace(go.Scatter(x=list(band.layer) + list(band.layer)[::-1],
                             y=list(band.random_hi) + list(band.random_lo)[::-1], fill="toself",
                             fillcolor="gray", opacity=0.2, line=dict(width=0), name="random directions (95 %)"))
    fig.add_trace(go.Scatter(x=band.layer, y=band.random_baseline, name="√(2/(πd))", mode="lines",
                             line=dict(color="gray", dash="dot")))
    for i, task in enumerate(dict.fromkeys(geometry.task)):
        s = _mean_sd(geometry[geometry.task == task].dropna(subset=["cos_mean"]), ["layer"], "cos_mean")
        _line_with_band(fig, s.layer, s["mean"], s["sd"], task, PAPER_COLORWAY[i % len(PAPER_COLORWAY)])
    fig.update_layout(title=title or "Count direction vs digit rows of the output head",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="mean |cos| with digit rows")
    return apply_theme(fig)


def lens_rank_by_layer(lens: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Median logit-lens rank of the gold digit by layer, one panel per task, one line per method (log scale)."""
    _check_frame(lens, ("task", "seed", "method", "layer", "median_rank"), "lens_rank_by_layer")
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
    _check_frame(summary, ["task", "method"] + [f"{m}_mean" for m in metrics], "accuracy_bars")
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
    _check_frame(steps, ("mode", "step"), "drift_by_step")
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
    _check_frame(lens, ("mode", "step", "layer", value), "lens_step_layer")
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
    _check_frame(retention, ("mode", "gap", value), "retention_by_gap")
    fig = go.Figure()
    for mode, color in _mode_color(retention["mode"]).items():
        s = _mean_sd(retention[retention["mode"] == mode], ["gap"], value)
        _line_with_band(fig, s.gap, s["mean"], s["sd"], f"{mode} (probe from step j)", color)
        if f"{value}_refit" in retention.columns:  # dotted: a probe refitted at step k (the control)
            r = _mean_sd(retention[retention["mode"] == mode], ["gap"], f"{value}_refit")
            _line_with_band(fig, r.gap, r["mean"], r["sd"], f"{mode} (refitted at step k)", color, dash="dot")
    fig.update_layout(title=title or "Fact retention against the gap", xaxis_title="gap k - j (steps)",
                      yaxis_title={"round_acc": "probe-round accuracy", "r2": "held-out R²"}.get(value, value))
    return apply_theme(fig)


def accuracy_by_steps(accuracy: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Answer accuracy against the number of thinking steps, one line per mode; ``direct`` as a dashed level."""
    _check_frame(accuracy, ("mode", "n_steps", "accuracy"), "accuracy_by_steps")
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
def sae_density(density: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Histogram of log10 feature density (firing frequency); dead features counted in the title."""
    _check_frame(density, ("feature", "freq", "log10_freq", "dead"), "sae_density")
    alive = density[~density.dead]
    fig = go.Figure(go.Histogram(x=alive.log10_freq, nbinsx=60, marker_color=PAPER_COLORWAY[0], name="features"))
    fig.add_vline(x=-1, line_dash="dash", line_color="#666", annotation_text="dense (10 %)")
    n_dead = int(density.dead.sum())
    fig.update_layout(title=title or f"Feature density ({len(density)} features, {n_dead} never fired)",
                      xaxis_title="log10 firing frequency", yaxis_title="features", showlegend=False)
    return apply_theme(fig)


def sae_ce(metrics: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Next-token cross-entropy: clean, SAE spliced in, SAE + error term, site zero-ablated."""
    cols = {"ce_clean": "clean", "ce_sae": "SAE", "ce_sae_with_error": "SAE + error", "ce_zero_ablation": "zero"}
    _check_frame(metrics, tuple(cols) + ("fvu", "l0"), "sae_ce")
    row = metrics.iloc[0]
    fig = go.Figure(go.Bar(x=list(cols.values()), y=[row[c] for c in cols],
                           marker_color=[PAPER_COLORWAY[i] for i in (2, 0, 5, 1)],
                           text=[f"{row[c]:.3f}" for c in cols], textposition="outside"))
    sub = f"FVU {row.fvu:.3f}, L0 {row.l0:.1f}"
    if "ce_loss_recovered" in metrics:
        sub += f", CE loss recovered {row.ce_loss_recovered:.3f}"
    fig.update_layout(title=title or f"Cross-entropy with the SAE spliced in ({sub})", yaxis_title="CE (nats)",
                      xaxis_title="forward pass")
    return apply_theme(fig)


def sae_count_features(count_features: pd.DataFrame, top: int = 10, *, title: str | None = None) -> go.Figure:
    """The ``top`` features most correlated with the count, per task (signed Pearson r)."""
    _check_frame(count_features, ("task", "feature", "corr", "abs_corr"), "sae_count_features")
    tasks = list(dict.fromkeys(count_features.task))
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
    for j, task in enumerate(tasks, start=1):
        sub = count_features[count_features.task == task].nlargest(top, "abs_corr")
        fig.add_trace(go.Bar(x=[str(f) for f in sub.feature], y=sub["corr"], marker_color=PAPER_COLORWAY[0],
                             showlegend=False), row=1, col=j)
        fig.update_xaxes(type="category", title_text="feature", row=1, col=j)
    fig.update_yaxes(range=[-1, 1], title_text="Pearson r with the count", row=1, col=1)
    fig.update_layout(title=title or "SAE features that carry the count (last token)")
    return apply_theme(fig)


def sae_data_selection(selection: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """AUROC of ranking counting prompts above the rest of a mixed pool, per representation and similarity."""
    _check_frame(selection, ("representation", "similarity", "auroc", "precision_at_n_pos"), "sae_data_selection")
    labels = [f"{r} / {s}" for r, s in zip(selection.representation, selection.similarity)]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=labels, y=selection.auroc, name="AUROC", marker_color=PAPER_COLORWAY[0]))
    fig.add_trace(go.Bar(x=labels, y=selection.precision_at_n_pos, name="precision@n_pos",
                         marker_color=PAPER_COLORWAY[1]))
    fig.add_hline(y=0.5, line_dash="dot", line_color="#666")
    fig.update_layout(barmode="group", yaxis_range=[0, 1.05], yaxis_title="score",
                      title=title or "Data selection: counting prompts out of a mixed pool")
    return apply_theme(fig)


def sae_feature_histograms(scan, features: Sequence[int], *, title: str | None = None) -> go.Figure:
    """Activation histograms (non-zero activations) of ``features`` from a :class:`~workbench.sae_features.FeatureScan`."""
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


# -- visual-ignorance routing ------------------------------------------------------------------------------------
def vqa_accuracy_bars(accuracy: pd.DataFrame, value: str = "correct", *, title: str | None = None) -> go.Figure:
    """Accuracy per split: one bar group per split, one bar per (model, condition: image / blank / noise)."""
    _check_frame(accuracy, ("model", "condition", "split", value), "vqa_accuracy_bars")
    fig = go.Figure()
    i = 0
    for model in dict.fromkeys(accuracy.model):
        for condition, pattern in (("image", ""), ("blank", "/"), ("noise", ".")):
            sub = accuracy[(accuracy.model == model) & (accuracy.condition == condition)]
            if sub.empty:
                continue
            fig.add_trace(go.Bar(x=sub.split, y=sub[value], name=f"{model}, {condition}",
                                 marker=dict(color=PAPER_COLORWAY[list(dict.fromkeys(accuracy.model)).index(model)],
                                             pattern_shape=pattern, opacity=1.0 if condition == "image" else 0.55)))
            i += 1
    fig.update_layout(title=title or "VQA accuracy with the image and blind baselines", barmode="group",
                      yaxis_title=value.replace("_", " "), yaxis_range=[0, 1.02], xaxis_title="held-out split")
    return apply_theme(fig)


def visual_probe_curves(probes: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """P(ground truth) and P(prior) by layer from the MLP probes, on held-out conflict items, one colour per model."""
    _check_frame(probes, ("model", "layer", "p_gt", "p_prior"), "visual_probe_curves")
    fig = go.Figure()
    for i, model in enumerate(dict.fromkeys(probes.model)):
        sub = probes[probes.model == model].sort_values("layer")
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        fig.add_trace(go.Scatter(x=sub.layer, y=sub.p_gt, name=f"{model}: P(ground truth)", mode="lines+markers",
                                 line=dict(color=color)))
        fig.add_trace(go.Scatter(x=sub.layer, y=sub.p_prior, name=f"{model}: P(prior), prior probe",
                                 mode="lines+markers", line=dict(color=color, dash="dash")))
        if "p_prior_gt_probe" in sub:
            fig.add_trace(go.Scatter(x=sub.layer, y=sub.p_prior_gt_probe, name=f"{model}: P(prior), truth probe",
                                     mode="lines", line=dict(color=color, dash="dot")))
    fig.update_layout(title=title or "Layer-wise MLP probes on conflict items (truth ≠ prior)",
                      xaxis_title="layer (0 = embeddings)", yaxis_title="probe probability", yaxis_range=[0, 1.02])
    return apply_theme(fig)


def replacement_heatmap(replacement: pd.DataFrame, value: str = "prior_rate", *, title: str | None = None) -> go.Figure:
    """Counterfactual layer replacement: rows = (model <- donor) pairs, columns = swapped range, colour = value."""
    _check_frame(replacement, ("pair", "scheme", "start", "end", value), "replacement_heatmap")
    df = replacement[replacement.scheme != "none"].copy()
    order = {"first": 0, "window": 1, "last": 2}
    df["label"] = [f"{s} {a}-{b}" for s, a, b in zip(df.scheme, df.start, df.end)]
    df["key"] = [(order.get(s, 3), a, b) for s, a, b in zip(df.scheme, df.start, df.end)]
    labels = [lab for _, lab in sorted(set(zip(df.key, df.label)))]
    pairs = list(dict.fromkeys(df.pair))
    z = np.full((len(pairs), len(labels)), np.nan)
    for _, r in df.iterrows():
        z[pairs.index(r.pair), labels.index(r.label)] = r[value]
    base = replacement[replacement.scheme == "none"].drop_duplicates("pair").set_index("pair")[value].reindex(pairs)
    ylabels = [f"{p} (unswapped {b:.2f})" for p, b in zip(pairs, base)]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=ylabels, colorscale="Viridis", zmin=0, zmax=1,
                               colorbar=dict(title=value.replace("_", " ")),
                               hovertemplate="%{y}<br>layers %{x}<br>" + value + " %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title or f"Counterfactual layer replacement: {value.replace('_', ' ')}",
                      xaxis_title="decoder layers taken from the donor", height=220 + 60 * len(pairs))
    return apply_theme(fig)


def patching_curves(patching: pd.DataFrame, value: str = "agree_source", *, title: str | None = None) -> go.Figure:
    """Image-token (solid) and last-token (dotted) patching by layer; one panel per direction x corruption."""
    _check_frame(patching, ("model", "corruption", "direction", "positions", "layer", value), "patching_curves")
    panels = list(dict.fromkeys(zip(patching.direction, patching.corruption)))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"{d} ({c})" for d, c in panels],
                        horizontal_spacing=0.08)
    for k, (direction, corruption) in enumerate(panels):
        for i, model in enumerate(dict.fromkeys(patching.model)):
            for pos, dash in (("image", "solid"), ("last", "dot")):
                sub = patching[(patching.model == model) & (patching.direction == direction)
                               & (patching.corruption == corruption) & (patching.positions == pos)].sort_values("layer")
                if sub.empty:
                    continue
                fig.add_trace(go.Scatter(x=sub.layer, y=sub[value], name=f"{model}, {pos} tokens", mode="lines",
                                         legendgroup=f"{model}{pos}", showlegend=k == 0,
                                         line=dict(color=PAPER_COLORWAY[i % len(PAPER_COLORWAY)], dash=dash)),
                              row=1, col=k + 1)
    fig.update_xaxes(title_text="layer (0 = embeddings)")
    fig.update_yaxes(title_text="answers equal to the source run" if value == "agree_source"
                     else value.replace("_", " "), col=1)
    fig.update_layout(title=title or "Activation patching between clean and corrupted images",
                      width=max(720, 420 * len(panels)))
    fig = apply_theme(fig)
    fig.update_annotations(font_size=13)
    return fig


def decay_curve(decay: pd.DataFrame, summary: pd.DataFrame | None = None, *, title: str | None = None) -> go.Figure:
    """E_k (solid) and accuracy (dotted) against the blur kernel, one colour per (model, split); C in the legend."""
    _check_frame(decay, ("model", "split", "kernel", "E_k", "accuracy"), "decay_curve")
    fig = go.Figure()
    keys = list(dict.fromkeys(zip(decay.model, decay.split)))
    for i, (model, split) in enumerate(keys):
        sub = decay[(decay.model == model) & (decay.split == split)].sort_values("kernel")
        c = ""
        if summary is not None:
            s = summary[(summary.model == model) & (summary.split == split)]
            if not s.empty:
                c = f", C={float(s.C.iloc[0]):.2f}"
        color = PAPER_COLORWAY[i % len(PAPER_COLORWAY)]
        fig.add_trace(go.Scatter(x=sub.kernel, y=sub.E_k, name=f"{model} {split}: E_k{c}", mode="lines+markers",
                                 line=dict(color=color), legendgroup=f"{model}{split}"))
        fig.add_trace(go.Scatter(x=sub.kernel, y=sub.accuracy, name=f"{model} {split}: accuracy", mode="lines",
                                 line=dict(color=color, dash="dot"), legendgroup=f"{model}{split}"))
    fig.update_layout(title=title or "Progressive blur: answers unchanged (E_k) and accuracy",
                      xaxis_title="Gaussian kernel size (px)", yaxis_title="fraction of items", yaxis_range=[0, 1.02])
    return apply_theme(fig)
