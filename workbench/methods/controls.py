"""Controls for interventions: what a steering or ablation effect must beat before it says anything.

A steering effect along a readout direction means little until the same edit along other directions is known, and
an ablation that *raises* the gold answer's probability may only have flattened the distribution. This module gives
the controls (pure torch / numpy, on any device):

- :func:`random_directions`: seeded Gaussian directions of a given norm, and :func:`direction_null`, the score of a
  direction against the scores of at least 50 norm-matched random directions (:class:`NullResult`: the null's
  2.5-97.5 % range and the permutation p-values of :func:`workbench.methods.stats.permutation_p`);
- :func:`class_mean_direction`: the class-mean-difference direction (for counts, the least-squares slope of the
  class means on the count: the change of the mean residual per unit of count);
- :func:`probe_target_edit`: the count-dependent edit, which moves each row's probe reading ``w·h + b`` to its own
  target (a constant shift along one direction cannot separate balanced counts; this edit can), and
  :func:`scaled_edit`, a per-row amount along any direction (the random-direction null of that edit, with each
  row's displacement norm matched);
- :func:`position_means` / :func:`mean_ablation_edit`: position-matched mean ablation, the reference means taken
  per position counted from the end of each prompt on a reference set disjoint from the evaluated prompts
  (:func:`check_disjoint`);
- :func:`flattening_control`: for an ablation that raises the gold answer's probability, the gain a mere
  temperature change to the same entropy would give, and the gold rank among the candidates.

    null = direction_null(lambda v: steer_score(v), w / w.norm() * alpha, n=50, seed=0)
    means = position_means(model, ref_prompts, ["blocks.10.hook_mlp_out"])   # ref disjoint from the test prompts
    with trace(model, edits={"blocks.10.hook_mlp_out": mean_ablation_edit(means["blocks.10.hook_mlp_out"])}):
        logits = model.hf(**model.encode(test_prompts)).logits[:, -1]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.core.sites import layer_site
from workbench.core.trace import Edit, seq_index, trace
from workbench.methods.activations import text_batches
from workbench.methods.stats import permutation_p

N_NULL = 50  # the smallest null the studies report (the "a null of at least 50 draws")
T_MIN, T_MAX = 1e-3, 1e3  # the temperature range of the flattening control


# -- directions --------------------------------------------------------------------------------------------------------
def _count(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor or an array, got {type(x).__name__}") from e


def random_directions(d: int, n: int, *, seed: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` seeded Gaussian directions [n, d], each scaled to the norm of ``like`` (a [d] vector) or to unit norm.

    The draws are made on the CPU in float64 (the same directions on every device and dtype), then returned in the
    dtype and on the device of ``like`` (float32 on the CPU without it). Direction i does not depend on ``n``: a
    larger null extends a smaller one with the same seed.
    """
    d, n = _count("d", d), _count("n", n)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    norm, dtype, device = 1.0, torch.float32, torch.device("cpu")
    if like is not None:
        like = _as_tensor(like, "like")
        if like.shape != (d,):
            raise ValueError(f"like must be a [d={d}] vector, got shape {tuple(like.shape)}")
        if not like.is_floating_point():
            raise ValueError(f"like must be a floating-point vector, got {like.dtype}")
        norm = float(like.double().norm())
        if not math.isfinite(norm) or norm == 0:
            raise ValueError(f"like has norm {norm}: random directions need a finite, non-zero norm to match")
        dtype, device = like.dtype, like.device
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    r = torch.randn(n, d, generator=g, dtype=torch.float64)
    r = r / r.norm(dim=1, keepdim=True) * norm
    return r.to(device=device, dtype=dtype)


def class_mean_direction(X, y) -> torch.Tensor:
    """The class-mean-difference direction [d] of features ``X`` [n, d] with numeric labels ``y`` [n].

    With classes c (n_c items, mean mu_c), cbar = sum n_c c / n and mubar the overall mean, the direction is the
    weighted least-squares slope of the class means on the label,

        sum_c n_c (c - cbar)(mu_c - mubar) / sum_c n_c (c - cbar)^2,

    the change of the mean feature per unit of label (for counts: per unit of count). For two classes it is
    (mu_1 - mu_0) / (c_1 - c_0). It is not normalised. Returned in the dtype and on the device of ``X`` (computed
    in float64).
    """
    X = _as_tensor(X, "X")
    y = _as_tensor(y, "y")
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be [n, d] with n >= 1, got shape {tuple(X.shape)}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must be [n={X.shape[0]}] (one label per row of X), got shape {tuple(y.shape)}")
    if y.dtype == torch.bool:
        y = y.long()
    if y.is_complex() or not (y.is_floating_point() or y.dtype in (torch.int8, torch.int16, torch.int32,
                                                                       torch.int64, torch.uint8)):
        raise ValueError(f"y must hold numeric labels (counts), got {y.dtype}")
    out_dtype = X.dtype if X.is_floating_point() else torch.float32
    Xd = X.to(torch.float64)
    yd = y.to(device=X.device, dtype=torch.float64)
    if not torch.isfinite(yd).all():
        raise ValueError("y has non-finite labels")
    classes, inverse, counts = torch.unique(yd, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"class_mean_direction needs at least 2 classes, got {classes.tolist()}")
    sums = torch.zeros(len(classes), Xd.shape[1], dtype=torch.float64, device=X.device).index_add_(0, inverse, Xd)
    mu = sums / counts[:, None]
    w = counts.to(torch.float64)
    cbar = (w * classes).sum() / w.sum()
    mubar = (w[:, None] * mu).sum(0) / w.sum()
    dc = classes - cbar
    slope = ((w * dc)[:, None] * (mu - mubar)).sum(0) / (w * dc**2).sum()
    return slope.to(out_dtype)


# -- edits -------------------------------------------------------------------------------------------------------------
def _row_values(values, name: str, B: int, device, dtype) -> torch.Tensor:
    v = _as_tensor(values, name).to(device=device, dtype=dtype)
    if v.ndim == 0:
        return v.expand(B)
    if v.shape != (B,):
        raise ValueError(f"{name} must be a scalar or [B={B}] (one per row of the batch), got shape {tuple(v.shape)}")
    return v


def _check_seq(t: torch.Tensor, d: int, what: str) -> None:
    if t.ndim != 3:
        raise ValueError(f"{what} edits a [batch, seq, d] tensor, got shape {tuple(t.shape)}")
    if t.shape[-1] != d:
        raise ValueError(f"{what}: the vector has width {d}, the site has width {t.shape[-1]}")


def probe_target_edit(w, b, targets, positions=-1) -> Edit:
    """The count-dependent edit: at ``positions`` of each row i, move the probe reading ``w·h + b`` to
    ``targets[i]`` along ``w``: ``h += (targets[i] - (w·h + b)) * w / |w|^2`` (the smallest change that does it).

    ``targets`` is a [B] tensor for one batch (build one edit per batch), or a scalar for every row. ``positions``:
    an int (default -1, the last token; under the package's left padding the last real token), a list of ints or
    None (every position, each moved to its row's target). Other positions are left untouched. The arithmetic is
    float64, the result in the site's dtype. Works in a full forward and in :meth:`PrefixCache.step` (whose tensor
    holds the last token alone: keep ``positions=-1`` there).
    """
    w = _as_tensor(w, "w")
    if w.ndim != 1 or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point [d] vector, got {w.dtype} {tuple(w.shape)}")
    w64 = w.to(torch.float64)
    ww = float(w64 @ w64)
    if not math.isfinite(ww) or ww == 0:
        raise ValueError("w has zero (or non-finite) norm: no reading to move")
    try:
        b = float(b)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"b must be a scalar bias, got {b!r}") from e
    targets = _as_tensor(targets, "targets")
    index = seq_index(positions)

    def edit(t: torch.Tensor) -> torch.Tensor:
        _check_seq(t, w.shape[0], "probe_target_edit")
        tg = _row_values(targets, "targets", t.shape[0], t.device, torch.float64)
        wd = w64.to(t.device)
        out = t.clone()
        h = out[:, index].to(torch.float64)  # [B, d] or [B, k, d]
        reading = h @ wd + b
        tg = tg.reshape(-1, *([1] * (reading.ndim - 1)))
        out[:, index] = (h + ((tg - reading) / ww)[..., None] * wd).to(t.dtype)
        return out

    return edit


def scaled_edit(direction, amounts, positions=-1) -> Edit:
    """Add ``amounts[i] * direction / |direction|`` to row i at ``positions`` (an int, default -1; a list; None for
    all). ``amounts`` is a [B] tensor (one per row of the batch) or a scalar. With amounts equal to each row's
    displacement norm under :func:`probe_target_edit` (``|target - reading| / |w|``, signed), a random direction
    gets the same per-row edit sizes: the null of the count-dependent edit."""
    direction = _as_tensor(direction, "direction")
    if direction.ndim != 1 or not direction.is_floating_point():
        raise ValueError(f"direction must be a floating-point [d] vector, got {direction.dtype} "
                         f"{tuple(direction.shape)}")
    norm = float(direction.double().norm())
    if not math.isfinite(norm) or norm == 0:
        raise ValueError("direction has zero (or non-finite) norm")
    unit = direction.to(torch.float64) / norm
    amounts = _as_tensor(amounts, "amounts")
    index = seq_index(positions)

    def edit(t: torch.Tensor) -> torch.Tensor:
        _check_seq(t, unit.shape[0], "scaled_edit")
        a = _row_values(amounts, "amounts", t.shape[0], t.device, torch.float64)
        out = t.clone()
        h = out[:, index].to(torch.float64)
        a = a.reshape(-1, *([1] * (h.ndim - 1)))
        out[:, index] = (h + a * unit.to(t.device)).to(t.dtype)
        return out

    return edit


# -- the random-direction null -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NullResult:
    """A direction's score against the scores of ``n`` norm-matched random directions.

    observed: the direction's score. null: [n] the random directions' scores. p_greater / p_less: the permutation
    p-values (1 + #{null >= observed}) / (1 + n) and (1 + #{null <= observed}) / (1 + n) (floor 1 / (1 + n)).
    null_lo / null_hi: the 2.5 and 97.5 percentiles of the null."""

    observed: float
    null: np.ndarray
    p_greater: float
    p_less: float
    null_lo: float
    null_hi: float
    n: int

    @classmethod
    def of(cls, observed: float, null) -> NullResult:
        null = np.asarray(null, dtype=np.float64).reshape(-1)
        if len(null) == 0:
            raise ValueError("the null is empty")
        if not math.isfinite(observed) or not np.isfinite(null).all():
            raise ValueError(f"scores must be finite; observed {observed}, {int((~np.isfinite(null)).sum())} "
                             "non-finite null score(s)")
        lo, hi = np.percentile(null, [2.5, 97.5])
        return cls(observed=float(observed), null=null, p_greater=permutation_p(observed, null, greater=True),
                   p_less=permutation_p(observed, null, greater=False), null_lo=float(lo), null_hi=float(hi),
                   n=len(null))

    @property
    def covers(self) -> bool:
        """Whether the observed score lies inside the null's 2.5-97.5 % range."""
        return self.null_lo <= self.observed <= self.null_hi

    def to_dict(self, prefix: str = "") -> dict:
        d = {"observed": self.observed, "p_greater": self.p_greater, "p_less": self.p_less,
             "null_lo": self.null_lo, "null_hi": self.null_hi, "null_mean": float(self.null.mean()),
             "null_sd": float(self.null.std(ddof=1)) if self.n > 1 else math.nan, "n_null": self.n}
        return {f"{prefix}{k}": v for k, v in d.items()}


def direction_null(score_fn: Callable[[torch.Tensor], float], direction, n: int = N_NULL, *, seed: int,
                   progress: bool = False) -> NullResult:
    """Score ``direction`` and ``n`` random directions of the same norm (:func:`random_directions`, same dtype and
    device) with ``score_fn(direction) -> float``.

    The studies use n >= 50 (:data:`N_NULL`, the default); smaller n is allowed for smoke tests, but its p-values
    cannot go below 1 / (1 + n). A score must be finite.
    """
    n = _count("n", n)
    direction = _as_tensor(direction, "direction")
    if direction.ndim != 1:
        raise ValueError(f"direction must be a [d] vector, got shape {tuple(direction.shape)}")
    observed = float(score_fn(direction))
    rand = random_directions(direction.shape[0], n, seed=seed, like=direction)
    null = [float(score_fn(r)) for r in tqdm(rand, desc="random-direction null", disable=not progress)]
    return NullResult.of(observed, null)


# -- position-matched mean ablation ------------------------------------------------------------------------------------
def check_disjoint(eval_prompts: Iterable[str], ref_prompts: Iterable[str]) -> None:
    """Raise ValueError (naming an overlapping prompt) when a prompt is in both sets (exact string match)."""
    ref = set(ref_prompts)
    overlap = [p for p in dict.fromkeys(eval_prompts) if p in ref]
    if overlap:
        raise ValueError(f"{len(overlap)} evaluated prompt(s) are also in the reference set, e.g. {overlap[0]!r}: "
                         "the ablation means must come from prompts that are not evaluated")


@torch.no_grad()
def position_means(model, prompts: Sequence[str], sites, *, batch_size: int = 32,
                   min_count: int = 1) -> dict:
    """The mean activation at each position counted from the end of the prompt, over the reference ``prompts``:
    ``{site: Tensor [L, d]}`` (float32, CPU), aligned at the end like a left-padded batch: row -1 is the mean over
    the prompts' last tokens, row -k the mean of their k-th token from the end (the prompts end at the answer
    position, so equal distance from the end means the same role).

    Row -k averages the prompts that have at least k tokens (with the BOS token); L is the largest k that
    ``min_count`` or more prompts reach (the longest prompt by default). ``sites``: site names or hidden-state
    layers (ints, keyed by the int), one name or a list. The reference set must be disjoint from the prompts to be
    ablated: check it with :func:`check_disjoint`. One forward per batch, stopped after the deepest site.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    min_count = _count("min_count", min_count)
    keys = [sites] if isinstance(sites, (str, int)) else list(sites)
    if not keys:
        raise ValueError("give at least one site")
    names = {k: (layer_site(k) if isinstance(k, (int, np.integer)) and not isinstance(k, bool) else k) for k in keys}
    sums: dict = {k: None for k in keys}
    counts = None
    for _, enc in text_batches(model, prompts, batch_size):
        mask = enc["attention_mask"].bool().cpu()
        T = mask.shape[1]
        # from_end[b, j] = how far token j of row b is from its row's last real token (0 = last); -1 on padding
        rank = mask.flip(1).cumsum(1).flip(1) - 1  # for a real token: the number of real tokens after it
        from_end = torch.where(mask, rank, torch.full_like(rank, -1))
        with trace(model, list(dict.fromkeys(names.values())), stop=True) as tr:
            model.hf(**enc)
        L_b = int(mask.sum(1).max())
        if counts is None or len(counts) < L_b:
            counts = _grow(counts, L_b)
        fe = from_end.reshape(-1)
        real = fe >= 0
        slot = (L_b - 1 - fe[real])  # row in an end-aligned [L_b, d] table
        counts[len(counts) - L_b:] += torch.bincount(slot, minlength=L_b).to(torch.float64)
        for k, name in names.items():
            h = tr[name]
            if h.ndim != 3 or h.shape[1] != T:
                raise ValueError(f"site {name!r} gave shape {tuple(h.shape)}; position means need [batch, seq={T}, d]")
            flat = h.to("cpu", torch.float64).reshape(-1, h.shape[-1])[real]
            table = torch.zeros(L_b, h.shape[-1], dtype=torch.float64).index_add_(0, slot, flat)
            if sums[k] is None or len(sums[k]) < L_b:
                sums[k] = _grow(sums[k], L_b, h.shape[-1])
            sums[k][len(sums[k]) - L_b:] += table
    keep = int((counts >= min_count).flip(0).long().cumprod(0).sum())  # end-aligned rows with enough prompts
    if keep == 0:
        raise ValueError(f"no position is reached by min_count={min_count} prompts (there are {len(prompts)})")
    return {k: (s[-keep:] / counts[-keep:, None]).to(torch.float32) for k, s in sums.items()}


def _grow(t: torch.Tensor | None, L: int, d: int | None = None) -> torch.Tensor:
    """An end-aligned table grown (at the front) to L rows."""
    shape = (L,) if d is None else (L, d)
    out = torch.zeros(shape, dtype=torch.float64)
    if t is not None:
        out[L - len(t):] = t
    return out


def mean_ablation_edit(means: torch.Tensor, positions_from_end=None, *, attention_mask=None) -> Edit:
    """An edit that replaces the activation at each position with the reference mean at the same position counted
    from the end (``means``: one site's table from :func:`position_means`, [L, d], end-aligned).

    positions_from_end: None (every position) or negative ints (-1 = the last token, -2 the one before, ...), one
    or a list. The edit reads a left-padded batch (the package's :meth:`Model.encode`): the tensor's last column is
    every row's last token. It raises when the batch is longer than the reference covers (a prompt longer than
    every reference prompt, or than ``min_count`` of them). Padding positions of shorter rows get means too, which
    no real token sees (they are masked); pass the batch's ``attention_mask`` to leave them untouched instead.
    Use it in a full forward of the prompts: a :meth:`PrefixCache.step` recomputes the last token alone, so there
    only ``positions_from_end=-1`` is the same ablation.
    """
    means = _as_tensor(means, "means")
    if means.ndim != 2 or not means.is_floating_point():
        raise ValueError(f"means must be a floating-point [L, d] table, got {means.dtype} {tuple(means.shape)}")
    L = means.shape[0]
    if positions_from_end is None:
        rel = None
    else:
        rel = [positions_from_end] if isinstance(positions_from_end, (int, np.integer)) else list(positions_from_end)
        if not rel or not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p < 0 for p in rel):
            raise ValueError(f"positions_from_end must be None or negative ints (-1 = last token), "
                             f"got {positions_from_end!r}")
        rel = sorted({int(p) for p in rel})
        if -rel[0] > L:
            raise ValueError(f"position {rel[0]} from the end is beyond the reference means ({L} positions)")
    mask = None if attention_mask is None else _as_tensor(attention_mask, "attention_mask").bool()
    if mask is not None and (mask.ndim != 2 or not mask[:, -1].all()):
        raise ValueError("attention_mask must be [B, seq] of a left-padded batch (every row's last token real)")

    def edit(t: torch.Tensor) -> torch.Tensor:
        _check_seq(t, means.shape[1], "mean_ablation_edit")
        T = t.shape[1]
        if mask is not None and mask.shape != t.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, the batch {tuple(t.shape[:2])}")
        if rel is None:
            if T > L:
                raise ValueError(f"the batch has {T} positions but the reference means cover {L}: an evaluated "
                                 "prompt is longer than the reference prompts")
            cols = list(range(T))
        else:
            cols = [T + p for p in rel if T + p >= 0]  # a position before the batch's start does not exist
        m = means.to(t.device, t.dtype)
        out = t.clone()
        idx = torch.tensor(cols, dtype=torch.long, device=t.device)
        new = m[L - T + idx].expand(t.shape[0], -1, -1)  # column c is T - c positions from the end
        if mask is not None:
            keep = mask.to(t.device)[:, idx][..., None]
            new = torch.where(keep, new, out[:, idx])
        out[:, idx] = new
        return out

    return edit


# -- the flattening control --------------------------------------------------------------------------------------------
def _entropy(logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def _candidate_logits(logits, candidates, n: int | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    z = _as_tensor(logits, name).to("cpu", torch.float64)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2:
        raise ValueError(f"{name} must be [n, vocab], got shape {tuple(z.shape)}")
    if n is not None and z.shape[0] != n:
        raise ValueError(f"{name} has {z.shape[0]} rows, expected {n}")
    cand = _as_tensor(candidates, "candidates").to("cpu", torch.long)
    if cand.ndim == 1:
        cand = cand.expand(z.shape[0], -1)
    if cand.ndim != 2 or cand.shape[0] != z.shape[0] or cand.shape[1] < 2:
        raise ValueError(f"candidates must be [k] or [n, k] token ids with k >= 2, got shape {tuple(cand.shape)}")
    if (cand < 0).any() or (cand >= z.shape[1]).any():
        raise ValueError(f"candidate ids must lie in 0..{z.shape[1] - 1}")
    if any(len(set(row.tolist())) != len(row) for row in cand):
        raise ValueError("candidates repeat a token id")
    return z.gather(1, cand), cand


def _temperature_to_entropy(z: torch.Tensor, target: torch.Tensor, iters: int = 200) -> tuple[torch.Tensor, ...]:
    """Per row, the T in [T_MIN, T_MAX] with entropy(softmax(z / T)) = target (bisection on log T; the entropy
    rises with T). Targets outside the reachable range give the nearest bound (clipped = True); a row of equal
    logits, whose entropy no temperature changes, gives NaN."""
    lo = torch.full_like(target, math.log(T_MIN))
    hi = torch.full_like(target, math.log(T_MAX))
    h_lo = _entropy(torch.log_softmax(z / T_MIN, -1))
    h_hi = _entropy(torch.log_softmax(z / T_MAX, -1))
    for _ in range(iters):
        mid = (lo + hi) / 2
        h = _entropy(torch.log_softmax(z / mid.exp()[:, None], -1))
        up = h < target
        lo = torch.where(up, mid, lo)
        hi = torch.where(up, hi, mid)
    T = ((lo + hi) / 2).exp()
    below, above = target <= h_lo, target >= h_hi
    T = torch.where(below, torch.full_like(T, T_MIN), torch.where(above, torch.full_like(T, T_MAX), T))
    flat = (z.max(-1).values - z.min(-1).values) == 0
    T = torch.where(flat, torch.full_like(T, math.nan), T)
    return T, (below | above) & ~flat


def flattening_control(base_logits, ablated_logits, gold, candidates) -> pd.DataFrame:
    """Is an ablation's gain on the gold answer more than flattening? One row per prompt.

    base_logits, ablated_logits: [n, vocab] next-token logits without and with the ablation. gold: [n] gold token
    ids. candidates: [k] token ids shared by every row (e.g. the digits) or [n, k]; every gold must be among its
    row's candidates. Everything is restricted to the candidates (softmax over them):

    - ``base_entropy`` / ``ablated_entropy`` (nats) and ``uniform_logp`` = log(1 / k), the gold log-prob of a flat
      distribution;
    - ``temperature``: the T with entropy(softmax(base / T)) = ablated entropy (bisection in [1e-3, 1e3]; entropy
      rises with T; ``temperature_clipped`` when the target lies outside that range; NaN for equal base logits);
    - ``base_logp``, ``ablated_logp``, ``temperature_logp``: the gold log-prob under base, ablation and the
      temperature change alone;
    - ``gain_ablation`` = ablated - base, ``gain_flattening`` = temperature - base, ``excess_gain`` = their
      difference;
    - ``base_rank`` / ``ablated_rank``: the gold's rank among the candidates (1 = top; ties count in the gold's
      favour: 1 + the number of candidates with a strictly larger logit); ``raises_gold``: gain_ablation > 0.

    A gain that a mere temperature change to the same entropy also gives is flattening, not recovered information:
    when the base puts the gold below uniform, any move towards uniform raises it. Only ``excess_gain`` > 0 (or a
    better gold rank, which no temperature change can give) says the ablation did more than flatten.
    """
    zb, cand = _candidate_logits(base_logits, candidates, None, "base_logits")
    za, _ = _candidate_logits(ablated_logits, cand, zb.shape[0], "ablated_logits")
    n, k = zb.shape
    g = _as_tensor(gold, "gold").to("cpu", torch.long).reshape(-1)
    if g.shape != (n,):
        raise ValueError(f"gold must be [n={n}] token ids, got shape {tuple(g.shape)}")
    hit = cand == g[:, None]
    missing = (~hit.any(1)).nonzero().reshape(-1)
    if len(missing):
        i = int(missing[0])
        raise ValueError(f"row {i}: gold token {int(g[i])} is not among its candidates {cand[i].tolist()}")
    gi = hit.long().argmax(1)
    lb, la = torch.log_softmax(zb, -1), torch.log_softmax(za, -1)
    hb, ha = _entropy(lb), _entropy(la)
    T, clipped = _temperature_to_entropy(zb, ha)
    lt = torch.log_softmax(zb / torch.nan_to_num(T, nan=1.0)[:, None], -1)
    pick = lambda lp: lp.gather(1, gi[:, None])[:, 0]  # noqa: E731
    base, abl, temp = pick(lb), pick(la), pick(lt)

    def rank(z):
        return 1 + (z > z.gather(1, gi[:, None])).sum(1)

    frame = pd.DataFrame({
        "row": np.arange(n), "gold": g.numpy(), "k": k,
        "base_entropy": hb.numpy(), "ablated_entropy": ha.numpy(),
        "temperature": T.numpy(), "temperature_clipped": clipped.numpy(),
        "base_logp": base.numpy(), "ablated_logp": abl.numpy(), "temperature_logp": temp.numpy(),
        "uniform_logp": -math.log(k),
        "gain_ablation": (abl - base).numpy(), "gain_flattening": (temp - base).numpy(),
        "excess_gain": (abl - temp).numpy(),
        "base_rank": rank(zb).numpy(), "ablated_rank": rank(za).numpy(),
    })
    frame["raises_gold"] = frame["gain_ablation"] > 0
    return frame
