"""Reading SAE features: top-activating contexts, histograms, logit effects, an offline HTML report.

    scan = scan_features(model, handle, load_corpus("sharegpt-en"), n_tokens=100_000)   # one pass, all features
    contexts = feature_contexts(model, handle, scan, feature=123)       # top windows, per-token activations
    effects = logit_effects(model, handle, 123)                        # most promoted / suppressed tokens
    write_feature_report(model, handle, scan, [123, 456], "report.html")  # self-contained, no network

Position 0 (BOS / the attention sink) is left out of every scan, as in training. The links to the threads (which
features carry the count, data selection in SAE space) are study code: :mod:`workbench.studies.sae_features.links`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.trace import trace
from workbench.data.corpus import Corpus
from workbench.io.atomic import atomic_write_text
from workbench.methods.sae.evaluate import DENSE_FREQ, corpus_token_windows
from workbench.methods.sae.handle import SAEError, SAEHandle

N_BINS = 40  # activation histogram bins per feature (from 0 to the feature's max over the scan)


@dataclass
class FeatureScan:
    """One pass of a corpus through model + SAE: top activations of every feature, densities, histograms."""

    windows: Int[Tensor, "n_windows ctx"]  # the token ids that were scanned
    top_values: Float[Tensor, "d_sae n_top"]  # largest activations of each feature, descending (0 = unused slot)
    top_window: Int[Tensor, "d_sae n_top"]  # the window of each of them
    top_position: Int[Tensor, "d_sae n_top"]  # and the position inside the window
    freq: Float[Tensor, " d_sae"]  # firing frequency over the scanned tokens
    mean_active: Float[Tensor, " d_sae"]  # mean activation when firing
    hist_counts: Int[Tensor, "d_sae n_bins"]  # histogram of non-zero activations, bins [0, max] per feature
    hist_max: Float[Tensor, " d_sae"]  # upper edge of each feature's histogram
    n_tokens: int
    site: str

    def summary(self) -> pd.DataFrame:
        """One row per feature: id, frequency, log10 frequency, max and mean activation, dead / dense flags."""

        freq = self.freq.numpy()
        return pd.DataFrame({
            "feature": np.arange(len(freq)), "freq": freq,
            "log10_freq": np.log10(np.maximum(freq, 1e-10)), "max_act": self.top_values[:, 0].numpy(),
            "mean_active": self.mean_active.numpy(), "dead": freq == 0, "dense": freq > DENSE_FREQ,
        })

    def histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(bin edges [n_bins + 1], counts [n_bins]) of ``feature``'s non-zero activations."""
        _check_feature(feature, len(self.freq))
        edges = np.linspace(0.0, float(self.hist_max[feature]), N_BINS + 1)
        return edges, self.hist_counts[feature].numpy()


def _check_feature(feature, d_sae: int) -> int:
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < d_sae:
        raise SAEError(f"feature must be an int in 0..{d_sae - 1}, got {feature!r}")
    return int(feature)


def check_features(features, d_sae: int) -> list[int]:
    if isinstance(features, (int, np.integer)):
        features = [features]
    return [_check_feature(f, d_sae) for f in features]


@torch.no_grad()
def scan_features(
    model,
    handle: SAEHandle,
    corpus: Corpus | Sequence[str],
    *,
    n_tokens: int = 65_536,
    context_length: int = 128,
    batch_size: int = 8,
    n_top: int = 20,
    progress: bool = True,
) -> FeatureScan:
    """Run ``n_tokens`` of ``corpus`` (BOS + stream windows) through the model up to the SAE's site and keep, for
    every feature, its ``n_top`` largest activations with their (window, position), its firing frequency, mean
    activation and a histogram. Two passes over the activations: the first finds each feature's max (histogram
    range), the second bins; the model runs once (site activations of the scan are kept in memory, float32).
    ``progress``: a tqdm bar over the windows."""
    if not isinstance(n_top, int) or n_top < 1:
        raise SAEError(f"n_top must be a positive int, got {n_top!r}")
    ids = corpus_token_windows(model, corpus, n_tokens, context_length)
    d_sae = handle.d_sae
    top_v = torch.zeros(d_sae, n_top)
    top_w = torch.zeros(d_sae, n_top, dtype=torch.long)
    top_p = torch.zeros(d_sae, n_top, dtype=torch.long)
    fires = torch.zeros(d_sae, dtype=torch.float64)
    sums = torch.zeros(d_sae, dtype=torch.float64)
    acts_kept: list[Tensor] = []  # sparse (index, value) per batch for the histogram pass
    n = 0
    for s in tqdm(range(0, len(ids), batch_size), desc=f"scan {handle.site}", unit="batch", disable=not progress):
        batch = ids[s : s + batch_size]
        with trace(model, handle.site, stop=True) as tr:
            model.hf(input_ids=batch.to(model.device))
        x = tr[handle.site][:, 1:]  # drop position 0
        f = handle.encode(x.reshape(-1, handle.d_in)).float().cpu()  # [b * (ctx - 1), d_sae]
        n += len(f)
        active = f > 0
        fires += active.sum(0).double()
        sums += f.sum(0).double()
        k = min(n_top, len(f))
        v, i = f.topk(k, dim=0)  # [k, d_sae]
        win = s + torch.div(i, x.shape[1], rounding_mode="floor")
        pos = i % x.shape[1] + 1
        cat_v = torch.cat([top_v, v.T], 1)
        cat_w = torch.cat([top_w, win.T], 1)
        cat_p = torch.cat([top_p, pos.T], 1)
        order = cat_v.topk(n_top, dim=1).indices
        top_v, top_w, top_p = cat_v.gather(1, order), cat_w.gather(1, order), cat_p.gather(1, order)
        nz = f.nonzero(as_tuple=True)
        acts_kept.append(torch.stack([nz[1].float(), f[nz]]))
    hist_max = top_v[:, 0].clamp(min=1e-12)
    counts = torch.zeros(d_sae, N_BINS, dtype=torch.long)
    for kept in acts_kept:
        feat, val = kept[0].long(), kept[1]
        b = (val / hist_max[feat] * N_BINS).long().clamp(max=N_BINS - 1)
        counts.view(-1).index_add_(0, feat * N_BINS + b, torch.ones_like(b))
    freq = (fires / n).float()
    mean_active = torch.where(fires > 0, sums / fires.clamp(min=1), torch.zeros_like(sums)).float()
    return FeatureScan(ids, top_v, top_w, top_p, freq, mean_active, counts, hist_max, n, handle.site)


@torch.no_grad()
def feature_contexts(
    model, handle: SAEHandle, scan: FeatureScan, feature: int, *, n: int = 8, left: int = 16, right: int = 4
) -> list[dict]:
    """The ``n`` top-activating contexts of ``feature``: tokens ``left`` before to ``right`` after the max token,
    with the feature's activation at every token (recomputed on those windows), the max position marked."""
    feature = _check_feature(feature, handle.d_sae)
    rows = [(float(v), int(w), int(p)) for v, w, p in
            zip(scan.top_values[feature], scan.top_window[feature], scan.top_position[feature]) if v > 0][:n]
    if not rows:
        return []
    windows = torch.stack([scan.windows[w] for _, w, _ in rows])
    with trace(model, handle.site, stop=True) as tr:
        model.hf(input_ids=windows.to(model.device))
    acts = handle.encode(tr[handle.site])[..., feature].float().cpu()  # [n, ctx]
    acts[:, 0] = 0.0  # position 0 is outside the SAE's domain
    out = []
    tok = model.tokenizer
    for (value, w, p), a, ids in zip(rows, acts, windows):
        lo, hi = max(1, p - left), min(len(ids), p + right + 1)
        out.append({
            "window": w, "position": p, "value": value,
            "tokens": [tok.decode([t]) for t in ids[lo:hi].tolist()],
            "acts": a[lo:hi].tolist(), "max_index": p - lo,
        })
    return out


@torch.no_grad()
def logit_effects(model, handle: SAEHandle, feature: int, k: int = 10) -> dict[str, list[tuple[str, float]]]:
    """Direct logit effect of the feature's decoder direction: ``W_U @ W_dec[feature]`` (the unembedding applied to
    the direction itself, ignoring the final norm's scale, as SAELens/Neuronpedia dashboards do). Returns the ``k``
    most promoted and most suppressed tokens with their values."""
    feature = _check_feature(feature, handle.d_sae)
    direction = handle.W_dec[feature].detach().to(model.W_U.device, model.W_U.dtype)
    scores = (model.W_U @ direction).float().cpu()
    tok = model.tokenizer
    up = scores.topk(k)
    down = (-scores).topk(k)
    return {
        "promoted": [(tok.decode([int(i)]), float(v)) for v, i in zip(up.values, up.indices)],
        "suppressed": [(tok.decode([int(i)]), -float(v)) for v, i in zip(down.values, down.indices)],
    }


# -- HTML report --------------------------------------------------------------------------------------------------
def _svg_histogram(edges: np.ndarray, counts: np.ndarray, width: int = 320, height: int = 90) -> str:
    total = counts.max() if counts.size and counts.max() > 0 else 1
    bw = width / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 14 - (c / total) * (height - 20):.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{(c / total) * (height - 20):.1f}" fill="#0072B2"><title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): '
        f'{int(c)}</title></rect>'
        for i, c in enumerate(counts)
    )
    axis = (f'<text x="0" y="{height - 2}" font-size="10">0</text>'
            f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text>')
    return f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">{bars}{axis}</svg>'


def _context_html(ctx: dict, vmax: float) -> str:
    spans = []
    for i, (t, a) in enumerate(zip(ctx["tokens"], ctx["acts"])):
        alpha = 0.0 if vmax <= 0 else max(0.0, min(1.0, a / vmax))
        style = f"background: rgba(213, 94, 0, {alpha:.2f});"
        if i == ctx["max_index"]:
            style += " outline: 1px solid #222;"
        text = html.escape(t).replace("\n", "↵")
        spans.append(f'<span class="tok" style="{style}" title="{a:.3f}">{text}</span>')
    return f'<div class="ctx"><span class="val">{ctx["value"]:.2f}</span> {"".join(spans)}</div>'


def feature_report_html(model, handle: SAEHandle, scan: FeatureScan, features: Sequence[int], *,
                        n_contexts: int = 8, title: str | None = None) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, no network) describing ``features``."""
    features = check_features(features, handle.d_sae)
    summary = scan.summary()
    parts = []
    for f in features:
        row = summary.iloc[f]
        contexts = feature_contexts(model, handle, scan, f, n=n_contexts)
        effects = logit_effects(model, handle, f)
        edges, counts = scan.histogram(f)
        vmax = max((c["value"] for c in contexts), default=0.0)
        ctx_html = "".join(_context_html(c, vmax) for c in contexts) or "<p><em>never fired in the scan</em></p>"

        def tok_list(items):
            return "".join(f"<li><code>{html.escape(repr(t))}</code> {v:+.3f}</li>" for t, v in items)

        parts.append(f"""
<section id="f{f}">
<h2>Feature {f}</h2>
<p class="meta">density {row.freq:.3%} of tokens &middot; max {row.max_act:.3f} &middot; mean when active
{row.mean_active:.3f}{' &middot; <b>dead</b>' if row.dead else ''}{' &middot; <b>dense</b>' if row.dense else ''}</p>
<div class="grid"><div><h3>Activation histogram (non-zero)</h3>{_svg_histogram(edges, counts)}</div>
<div><h3>Promoted tokens</h3><ol>{tok_list(effects["promoted"])}</ol></div>
<div><h3>Suppressed tokens</h3><ol>{tok_list(effects["suppressed"])}</ol></div></div>
<h3>Top-activating contexts</h3>{ctx_html}
</section>""")
    card = handle.card or {}
    head = title or f"SAE features: {card.get('model', {}).get('name', '')} {handle.site}"
    meta = (f"{handle.architecture}, d_in={handle.d_in}, d_sae={handle.d_sae}, scan of {scan.n_tokens:,} tokens; "
            f"{int((scan.freq == 0).sum())} features never fired, median density {float(scan.freq.median()):.3%}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(head)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
.tok {{ white-space: pre; font-family: Menlo, Consolas, monospace; font-size: 13px; padding: 1px 0; }}
.ctx {{ margin: 3px 0; line-height: 1.7; }} .val {{ display: inline-block; width: 4em; color: #555; }}
.grid {{ display: flex; gap: 3em; flex-wrap: wrap; }} .meta {{ color: #555; }}
section {{ border-top: 1px solid #ddd; padding-top: .5em; margin-top: 1.5em; }} ol {{ padding-left: 1.5em; }}
nav a {{ margin-right: .6em; }}
</style></head><body>
<h1>{html.escape(head)}</h1><p class="meta">{html.escape(meta)}</p>
<nav>{''.join(f'<a href="#f{f}">{f}</a>' for f in features)}</nav>
{''.join(parts)}
</body></html>
"""


def write_feature_report(model, handle: SAEHandle, scan: FeatureScan, features: Sequence[int],
                         path: str | os.PathLike, **kwargs) -> Path:
    path = Path(path)
    atomic_write_text(path, feature_report_html(model, handle, scan, features, **kwargs))
    return path


def top_features_by_density(scan: FeatureScan, n: int = 6, *, min_freq: float = 1e-3, max_freq: float = 0.05,
                            seed: int = 0) -> list[int]:
    """A reproducible pick of ``n`` features for a report: random among features with density in
    [min_freq, max_freq] (neither rare nor dense)."""
    freq = scan.freq.numpy()
    ok = np.flatnonzero((freq >= min_freq) & (freq <= max_freq))
    if len(ok) == 0:
        ok = np.flatnonzero(freq > 0)
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(ok, size=min(n, len(ok)), replace=False))

