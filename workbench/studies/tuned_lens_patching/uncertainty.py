"""Uncertainty of the readout study's numbers: per-pair spread, bootstrap intervals over pairs (or windows), the
agreement's interval, and the max-over-candidates sign-flip null for every "best layer / head" it names.

The resampling unit is the distinct clean prompt (an IOI pair; identical prompts are one unit) or, for the lens KL,
the held-out window (its tokens are not independent). Intervals come from :func:`workbench.methods.stats.bootstrap_ci`
(BCa; the percentile interval where BCa is undefined, NaN with fewer than two units); winners are tested with
:func:`workbench.methods.stats.max_null_p` against a sign-flip null built here with numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from workbench.methods.patching import PatchingResult
from workbench.methods.stats import bootstrap_ci, max_null_p, sign_flip_null

N_BOOT = 2000
AGREEMENT_N_BOOT = 1000  # the agreement's resamples re-rank thousands of units each: fewer, to keep the phase short
N_PERMUTATIONS = 999
AGREEMENT_KEYS = ["pair", "site_type", "layer", "head", "position"]


def interval(statistic: Callable[..., float], *arrays, groups: Sequence, n_boot: int = N_BOOT,
             seed: int = 0) -> tuple[float, float, str]:
    """(lo, hi, method) of the bootstrap interval of ``statistic(*arrays)`` over the distinct ``groups``: BCa, else
    the percentile interval (BCa is undefined for some statistics and samples), else NaN (fewer than two units, or a
    statistic undefined on the resamples)."""
    if len(set(groups)) < 2:
        return math.nan, math.nan, "none (fewer than 2 units)"
    if not math.isfinite(float(statistic(*(np.asarray(a) for a in arrays)))):
        return math.nan, math.nan, "undefined"
    try:
        iv = bootstrap_ci(statistic, *arrays, groups=list(groups), n_resamples=n_boot, method="auto", seed=seed)
    except ValueError:
        return math.nan, math.nan, "undefined"
    return iv.lo, iv.hi, iv.method


def spread(values, groups: Sequence, *, n_boot: int = N_BOOT, seed: int = 0, prefix: str = "") -> dict:
    """Mean with its bootstrap interval over the distinct ``groups``, and the per-item spread (sd, median, IQR) of
    the finite ``values``: keys ``{prefix}mean, _lo, _hi, _sd, _median, _q25, _q75`` and ``n_units``."""
    x = np.asarray(values, dtype=np.float64)
    g = np.asarray(list(groups), dtype=object)
    ok = np.isfinite(x)
    x, g = x[ok], g[ok]
    p = prefix
    if len(x) == 0:
        return {f"{p}mean": math.nan, f"{p}lo": math.nan, f"{p}hi": math.nan, f"{p}sd": math.nan,
                f"{p}median": math.nan, f"{p}q25": math.nan, f"{p}q75": math.nan, "n_units": 0}
    lo, hi, _ = interval(lambda v: float(np.mean(v)), x, groups=g.tolist(), n_boot=n_boot, seed=seed)
    q25, med, q75 = np.quantile(x, [0.25, 0.5, 0.75])
    return {f"{p}mean": float(x.mean()), f"{p}lo": lo, f"{p}hi": hi,
            f"{p}sd": float(x.std(ddof=1)) if len(x) > 1 else math.nan, f"{p}median": float(med),
            f"{p}q25": float(q25), f"{p}q75": float(q75), "n_units": len(set(g.tolist()))}


def unit_summary(scores: pd.DataFrame, groups: Sequence, *, by: Sequence[str], n_boot: int = N_BOOT,
                 seed: int = 0) -> pd.DataFrame:
    """Per group of ``by`` over the per-pair rows of ``scores`` (columns ``pair``, ``recovery``, ``score``): n_pairs,
    the mean recovery with its interval over pairs (recovery_mean, _lo, _hi), its per-pair sd, median and IQR
    (recovery_sd, _median, _q25, _q75), and the mean score (logit-difference change). ``groups[pair]``: the pair's
    resampling unit (its clean prompt)."""
    groups = np.asarray(list(groups), dtype=object)
    rows = []
    for key, g in scores.groupby(list(by), sort=False, observed=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        row["n_pairs"] = len(g)
        row |= spread(g["recovery"].to_numpy(), groups[g["pair"].to_numpy()], n_boot=n_boot, seed=seed,
                      prefix="recovery_")
        row["score_mean"] = float(g["score"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def best_against_null(effects: np.ndarray, groups: Sequence, *, n_permutations: int = N_PERMUTATIONS,
                      seed: int = 0) -> dict:
    """The best of N candidates (largest mean over items of ``effects`` [n_items, N]) against the max over the N
    candidates of the sign-flip null (:func:`sign_flip_null`, :func:`workbench.methods.stats.max_null_p`): its index,
    mean, p (never below its floor 1 / (1 + n_permutations); ``p_at_floor`` says when it sits there, i.e. p <=
    floor), the null threshold (95 % quantile of the null max) and how many candidates beat it."""
    x = np.asarray(effects, dtype=np.float64)
    keep = np.isfinite(x).all(axis=1)  # a pair whose clean and corrupt metric coincide has no recovery
    x, groups = x[keep], [g for g, k in zip(groups, keep, strict=True) if k]
    if len(x) == 0:
        raise ValueError("no item has a finite effect for every candidate")
    observed = x.mean(0)
    res = max_null_p(observed, sign_flip_null(x, groups, n_permutations=n_permutations, seed=seed))
    floor = 1 / (1 + n_permutations)
    return {"best": int(np.nanargmax(observed)), "best_mean": res.observed, "p_max_null": res.p, "p_floor": floor,
            "p_at_floor": bool(res.p <= floor), "null_threshold": res.threshold,
            "n_above_threshold": int((observed > res.threshold).sum()), "n_candidates": res.n_candidates,
            "n_permutations": res.n_permutations, "n_pairs": len(x)}


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks); NaN with fewer than 3 items or a constant input."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3:
        return math.nan
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def pearson(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def agreement_intervals(exact: PatchingResult, estimate: PatchingResult, groups: Sequence, *, large: float = 0.1,
                        n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Per site type (and ``all``): bootstrap intervals over pairs (``groups[pair]``: the pair's unit; all of a
    pair's units resampled together) of the Spearman and Pearson correlation of ``estimate``'s scores with the exact
    ones, and of the Spearman over the units with exact |recovery| >= ``large`` (the columns of
    :func:`workbench.methods.patching.patching_agreement`, with ``_lo`` / ``_hi``)."""
    groups = np.asarray(list(groups), dtype=object)
    merged = exact.frame[AGREEMENT_KEYS + ["score", "recovery"]].merge(
        estimate.frame[AGREEMENT_KEYS + ["score"]], on=AGREEMENT_KEYS, suffixes=("_exact", "_est"))
    rows = []
    for st, g in [*merged.groupby("site_type", observed=True), ("all", merged)]:
        if len(g) < 3:
            continue
        e, s = g["score_exact"].to_numpy(), g["score_est"].to_numpy()
        big = (g["recovery"].abs() >= large).to_numpy().astype(np.float64)
        units = groups[g["pair"].to_numpy()].tolist()
        row = {"method": estimate.method, "site_type": st}
        for name, stat in (("spearman", spearman), ("pearson", pearson)):
            row[f"{name}_lo"], row[f"{name}_hi"], _ = interval(stat, e, s, groups=units, n_boot=n_boot, seed=seed)

        def large_spearman(a, b, m):
            return spearman(a[m > 0], b[m > 0])

        row["spearman_large_lo"], row["spearman_large_hi"], _ = interval(large_spearman, e, s, big, groups=units,
                                                                         n_boot=n_boot, seed=seed)
        rows.append(row)
    return pd.DataFrame(rows)


def kl_intervals(per_window: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0) -> tuple[pd.DataFrame,
                                                                                                pd.DataFrame]:
    """From the per-window KL (columns lens, layer, window, kl_bits, kl_nats, top1_agreement, n_tokens): per lens and
    layer the mean over windows with its bootstrap interval over windows (``kl_bits_lo`` / ``_hi``; windows, not
    tokens, are the unit), and per layer the ratio logit / tuned of the mean KL with its interval (windows resampled
    in pairs: the same window under both lenses) and the share of windows where the tuned lens is lower."""
    rows = []
    for (lens, layer), g in per_window.groupby(["lens", "layer"], sort=False):
        lo, hi, _ = interval(lambda v: float(np.mean(v)), g["kl_bits"].to_numpy(), groups=g["window"].tolist(),
                             n_boot=n_boot, seed=seed)
        rows.append({"lens": lens, "layer": layer, "kl_nats": float(g["kl_nats"].mean()),
                     "kl_bits": float(g["kl_bits"].mean()), "kl_bits_lo": lo, "kl_bits_hi": hi,
                     "kl_bits_sd": float(g["kl_bits"].std(ddof=1)) if len(g) > 1 else math.nan,
                     "top1_agreement": float(g["top1_agreement"].mean()), "n_tokens": int(g["n_tokens"].sum()),
                     "n_windows": len(g)})
    kl = pd.DataFrame(rows).sort_values(["lens", "layer"], kind="stable").reset_index(drop=True)
    wide = per_window.pivot_table(index=["layer", "window"], columns="lens", values="kl_bits").reset_index()
    ratios = []
    if {"logit", "tuned"} <= set(wide.columns):
        for layer, g in wide.groupby("layer", sort=True):
            lg, tu = g["logit"].to_numpy(), g["tuned"].to_numpy()
            row = {"layer": int(layer), "kl_bits_logit": float(lg.mean()), "kl_bits_tuned": float(tu.mean()),
                   "ratio": math.nan, "ratio_lo": math.nan, "ratio_hi": math.nan,
                   "frac_windows_tuned_lower": float((tu < lg).mean()), "n_windows": len(g)}
            if tu.mean() > 0:  # the last layer is the model's output for both lenses: 0 / 0
                row["ratio"] = float(lg.mean() / tu.mean())
                row["ratio_lo"], row["ratio_hi"], _ = interval(
                    lambda a, b: float(np.mean(a) / np.mean(b)) if np.mean(b) > 0 else math.nan, lg, tu,
                    groups=g["window"].tolist(), n_boot=n_boot, seed=seed)
            ratios.append(row)
    return kl, pd.DataFrame(ratios)

