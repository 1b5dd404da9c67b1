"""Uncertainty for every number a study reports: intervals, seed aggregation and nulls for "best of N" claims.

The unit of resampling is the *distinct prompt*: identical prompts (addition has about 55 distinct ones) are one
unit, so a bootstrap never treats a repeated prompt as independent evidence. The work is done by scipy and
statsmodels; this module only fixes the conventions:

- :func:`bootstrap_ci`: ``scipy.stats.bootstrap`` over distinct units (BCa by default) for any statistic of
  per-item arrays (accuracy, R², a mean gain, ...).
- :func:`wilson_ci`: the Wilson score interval of a proportion (``statsmodels`` ``proportion_confint``).
- :func:`accuracy_ci`: the interval of an accuracy: Wilson when every item is its own unit, the grouped bootstrap
  when items repeat (the method is named in the result).
- :func:`seed_summary`: mean, sd and the t interval over seeds.
- :func:`max_null_p`: the p-value of a winner picked from N candidates against the max over the N nulls of each
  permutation (the family-wise correction for "best layer" claims), and :func:`permutation_p`.
- :func:`sign_flip_null`: the sign-flip null of per-item effects (no effect: each unit's sign is a coin flip).
- :func:`resample_weights` / :func:`percentile_interval`: the grouped bootstrap in matrix form (how often each
  distinct unit is drawn in each resample), for statistics computed from per-unit sums over many candidates at once
  (e.g. the held-out R² of every layer's probe); the percentile interval of its draws.
- :func:`group_codes`: distinct-unit codes of any key sequence.

Every interval is a small :class:`Interval` (estimate, lo, hi, n units, confidence, method) with ``to_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint

CONFIDENCE = 0.95
N_RESAMPLES = 2000
METHODS = ("auto", "BCa", "percentile", "basic")


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval; ``n`` is the number of independent units (distinct prompts,
    seeds, ...) it rests on."""

    estimate: float
    lo: float
    hi: float
    n: int
    confidence: float = CONFIDENCE
    method: str = ""

    def to_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.lo:.3g}, {self.hi:.3g}] (n={self.n})"


def _confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    return float(confidence)


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def group_codes(groups: Sequence[Hashable] | np.ndarray) -> np.ndarray:
    """Integer codes 0..k-1 of the distinct keys of ``groups``, in order of first appearance."""
    keys = list(groups.tolist() if isinstance(groups, np.ndarray) else groups)
    seen: dict = {}
    return np.array([seen.setdefault(k, len(seen)) for k in keys], dtype=np.int64)


def _arrays(arrays: Sequence) -> list[np.ndarray]:
    if not arrays:
        raise ValueError("give at least one per-item array")
    out = [np.asarray(a) for a in arrays]
    n = len(out[0])
    if n == 0:
        raise ValueError("the per-item arrays are empty: nothing to estimate")
    bad = [len(a) for a in out if len(a) != n]
    if bad:
        raise ValueError(f"per-item arrays must have one entry per item; got lengths {[len(a) for a in out]}")
    return out


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays,
    groups: Sequence[Hashable] | None = None,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    method: str = "BCa",
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of ``statistic(*arrays)`` resampling distinct units (``groups``; None: each item is one).

    ``statistic`` takes the per-item arrays (subset to the resampled items, units drawn with replacement and all of
    a unit's items kept together) and returns a float. A statistic that is constant under resampling gets the
    point interval (estimate, estimate, estimate): that is its exact bootstrap distribution. ``method="auto"``:
    BCa, and the percentile interval where BCa is undefined (a degenerate jackknife, e.g. a minimum or a
    statistic that is constant on most resamples); ``Interval.method`` records which one was used.
    """
    data = _arrays(arrays)
    confidence = _confidence(confidence)
    n_resamples = _positive_int("n_resamples", n_resamples, 2)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = len(data[0])
    codes = np.arange(n) if groups is None else group_codes(groups)
    if len(codes) != n:
        raise ValueError(f"groups has {len(codes)} keys for {n} items; give one key per item")
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)  # the items of each unit 0..k-1
    k = len(members)
    estimate = float(statistic(*data))

    def on_units(units):
        idx = np.concatenate([members[int(u)] for u in units])
        return statistic(*(a[idx] for a in data))

    if k < 2:
        raise ValueError(f"a bootstrap needs at least 2 distinct units, got {k}")
    rng = np.random.default_rng(seed)
    draws = np.array([on_units(rng.integers(0, k, k)) for _ in range(min(n_resamples, 200))], dtype=np.float64)
    if np.all(draws == estimate):  # e.g. every answer right: the bootstrap distribution is a point
        return Interval(estimate, estimate, estimate, k, confidence, f"bootstrap-{method}")
    for m in (("BCa", "percentile") if method == "auto" else (method,)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sps.DegenerateDataWarning)  # an undefined BCa shows as NaN below
            res = sps.bootstrap((np.arange(k),), lambda u: on_units(u), vectorized=False, paired=False,
                                confidence_level=confidence, n_resamples=n_resamples, method=m,
                                random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return Interval(estimate, lo, hi, k, confidence, f"bootstrap-{m}")
    raise ValueError(f"the {method} bootstrap interval is undefined for this statistic (got [{lo}, {hi}]); "
                     "use method='auto' or 'percentile'")


def mean_ci(values, *, groups=None, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
            seed: int = 0) -> Interval:
    """Bootstrap interval of the mean of ``values`` over distinct units."""
    return bootstrap_ci(lambda v: float(np.mean(v)), np.asarray(values, dtype=np.float64), groups=groups,
                        confidence=confidence, n_resamples=n_resamples, seed=seed)


def wilson_ci(k: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of ``k`` successes in ``n`` independent trials."""
    n = _positive_int("n", n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in 0..n={n}, got {k!r}")
    confidence = _confidence(confidence)
    lo, hi = proportion_confint(int(k), n, alpha=1 - confidence, method="wilson")
    lo, hi = (0.0 if k == 0 else float(lo)), (1.0 if k == n else float(hi))  # exact ends, not 1 - 1e-16
    return Interval(k / n, lo, hi, n, confidence, "wilson")


def accuracy_ci(correct, *, groups=None, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                seed: int = 0) -> Interval:
    """Interval of an accuracy from per-item 0/1 ``correct``: Wilson when every item is its own unit (no
    ``groups`` or all keys distinct); otherwise the bootstrap over distinct units (repeated prompts are not
    independent trials). ``method`` of the result says which."""
    c = np.asarray(correct)
    if c.ndim != 1 or len(c) == 0 or not np.isin(c, (0, 1)).all():
        raise ValueError("correct must be a non-empty 1-d array of 0/1 (or bools)")
    c = c.astype(np.float64)
    if groups is None or len(set(groups)) == len(c):
        return wilson_ci(int(c.sum()), len(c), confidence)
    return mean_ci(c, groups=groups, confidence=confidence, n_resamples=n_resamples, seed=seed)


def seed_summary(frame: pd.DataFrame, value: str | Sequence[str], by: Sequence[str] = (), *, seed_col: str = "seed",
                 confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Per group of ``by``: mean, sd, n_seeds and the t interval (``<value>_lo`` / ``_hi``) of ``value`` over seeds.

    One seed gives sd and interval NaN (there is no spread to estimate from one run); the row says n_seeds = 1.
    """
    values = [value] if isinstance(value, str) else list(value)
    missing = sorted({*values, *by, seed_col} - set(frame.columns))
    if missing:
        raise ValueError(f"frame lacks column(s) {missing}; it has {list(frame.columns)}")
    confidence = _confidence(confidence)
    rows = []
    groups = frame.groupby(list(by), sort=False) if by else [((), frame)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        row["n_seeds"] = int(g[seed_col].nunique())
        for v in values:
            x = g[v].to_numpy(dtype=np.float64)
            x = x[np.isfinite(x)]
            m = float(x.mean()) if len(x) else math.nan
            sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
            half = float(sps.t.ppf(0.5 + confidence / 2, len(x) - 1) * sd / math.sqrt(len(x))) if len(x) > 1 \
                else math.nan
            row |= {f"{v}_mean": m, f"{v}_sd": sd, f"{v}_lo": m - half, f"{v}_hi": m + half}
        rows.append(row)
    return pd.DataFrame(rows)


def permutation_p(observed: float, null, *, greater: bool = True) -> float:
    """(1 + #{null >= observed}) / (1 + n): the permutation p-value, never below its floor 1 / (1 + n)."""
    null = np.asarray(null, dtype=np.float64).reshape(-1)
    if len(null) == 0:
        raise ValueError("the null is empty")
    hits = (null >= observed) if greater else (null <= observed)
    return float((1 + int(hits.sum())) / (1 + len(null)))


@dataclass(frozen=True)
class MaxNull:
    """A winner picked from N candidates against the permutation distribution of the max over N.

    observed: the winner's score. null_max: [n_perm] max over candidates of each permutation's scores. p: its
    p-value (floor 1 / (1 + n_perm)). threshold: the (1 - alpha) quantile of null_max, the score a winner must
    beat. n_candidates, n_permutations: the sizes."""

    observed: float
    p: float
    threshold: float
    null_max: np.ndarray
    n_candidates: int
    n_permutations: int

    def to_dict(self) -> dict:
        return {"observed": self.observed, "p": self.p, "threshold": self.threshold,
                "null_max_mean": float(self.null_max.mean()), "n_candidates": self.n_candidates,
                "n_permutations": self.n_permutations}


def max_null_p(observed_scores, null_scores, *, alpha: float = 0.05) -> MaxNull:
    """The best of ``observed_scores`` [N] against ``null_scores`` [n_perm, N] (each row: the same N candidates
    scored under one permutation of the labels): p = (1 + #{max_j null[i, j] >= max_j observed[j]}) / (1 + n_perm).
    """
    obs = np.asarray(observed_scores, dtype=np.float64).reshape(-1)
    null = np.asarray(null_scores, dtype=np.float64)
    if null.ndim != 2 or null.shape[1] != len(obs) or null.shape[0] < 1:
        raise ValueError(f"null_scores must be [n_permutations, N={len(obs)}], got shape {null.shape}")
    if not np.isfinite(obs).any():
        raise ValueError("observed_scores has no finite score")
    best = float(np.nanmax(obs))
    null_max = np.nanmax(np.where(np.isfinite(null), null, -np.inf), axis=1)
    return MaxNull(observed=best, p=permutation_p(best, null_max), threshold=float(np.quantile(null_max, 1 - alpha)),
                   null_max=null_max, n_candidates=len(obs), n_permutations=null.shape[0])


def permute_within_units(labels, groups=None, *, seed: int) -> np.ndarray:
    """A permutation of ``labels`` that keeps identical units identical: the distinct units' labels are shuffled
    among the units (every item of a unit gets its unit's new label). Labels must be constant within a unit."""
    y = np.asarray(labels)
    if groups is None:
        return y[np.random.default_rng(seed).permutation(len(y))]
    codes = group_codes(groups)
    if len(codes) != len(y):
        raise ValueError(f"groups has {len(codes)} keys for {len(y)} labels")
    k = int(codes.max()) + 1
    _, first = np.unique(codes, return_index=True)  # codes are 0..k-1: the first item of each unit, in order
    unit_y = y[first]
    if not np.array_equal(unit_y[codes], y):
        raise ValueError("labels differ within a unit (identical prompts with different labels)")
    return unit_y[np.random.default_rng(seed).permutation(k)][codes]


def sign_flip_null(effects, groups=None, *, n_permutations: int = 999, seed: int = 0) -> np.ndarray:
    """[n_permutations, N] means over items of ``effects`` [n_items, N] with each unit's sign flipped at random
    (all items of a unit, and all N candidates of an item, flip together): the null of no effect for a per-item
    effect that is symmetric about 0 under that null. Feed it to :func:`max_null_p` for a "best of N" claim."""
    x = np.asarray(effects, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"effects must be [n_items, n_candidates], got shape {x.shape}")
    codes = np.arange(len(x)) if groups is None else group_codes(list(groups))
    if len(codes) != len(x):
        raise ValueError(f"groups has {len(codes)} keys for {len(x)} items")
    n_permutations = _positive_int("n_permutations", n_permutations)
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_permutations, int(codes.max()) + 1))
    return signs[:, codes] @ x / len(x)


def resample_weights(groups, n_items: int, *, n_resamples: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(codes [n_items], W [n_resamples, k]): the distinct-unit code of each item, and for each bootstrap resample
    how many times each of the k units is drawn (k draws with replacement). A statistic that is a function of
    per-unit sums is then evaluated on every resample at once: ``W @ np.bincount(codes, x)``."""
    codes = np.arange(n_items) if groups is None else group_codes(groups)
    if len(codes) != n_items:
        raise ValueError(f"groups has {len(codes)} keys for {n_items} items; give one key per item")
    n_resamples = _positive_int("n_resamples", n_resamples, 2)
    k = int(codes.max()) + 1
    draws = np.random.default_rng(seed).integers(0, k, (n_resamples, k))
    W = np.zeros((n_resamples, k))
    np.add.at(W, (np.repeat(np.arange(n_resamples), k), draws.ravel()), 1.0)
    return codes, W


def percentile_interval(draws, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of bootstrap ``draws``; NaN when any draw is undefined (NaN)."""
    d = np.asarray(draws, dtype=np.float64).reshape(-1)
    if not np.isfinite(d).all():
        return math.nan, math.nan
    a = (1 - _confidence(confidence)) / 2
    lo, hi = np.quantile(d, [a, 1 - a])
    return float(lo), float(hi)
