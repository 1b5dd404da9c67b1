"""Geometry of a probe direction against the output head: can the digit logits read the count out?

The counting study's second claim (methods.md, thread 1) is geometric: the count direction found by a linear probe is
nearly orthogonal to the unembedding rows of the digit tokens, so ``W_U[digit] · h`` barely moves with the count.
This module measures that and the controls that make the number interpretable:

- :func:`digit_row_cosines`: |cos| between a raw-coordinate probe direction and each digit row of ``W_U``.
- :func:`random_baseline`: E|cos| of a random direction with a fixed vector in d dimensions, ≈ sqrt(2 / (π d)).
- the chance band of random directions in each basis: :func:`workbench.methods.readout.random_covector_band`.
- :func:`permutation_test`: refit the ridge probe on shuffled counts (one SVD for all permutations) and ask how
  often chance alone gives a mean |cos| at least as large as the observed one.
- :func:`principal_angles`: angles between two subspaces (e.g. the count directions of all tasks vs the digit rows).
- :func:`row_norm_percentiles`: where the digit rows' norms sit among all rows' norms.
- :func:`geometry_table`: the per-layer summary.

Everything runs in float64 on CPU; ``W_U`` may be any float tensor on any device (it is copied row-wise as needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from workbench.methods.encoded_expressed import random_baseline
from workbench.methods.probes.base import as_features, as_target, standardise_stats
from workbench.methods.probes.linear import ALPHAS, RidgeProbe
from workbench.methods.readout import covector_cosines, random_covector_band
from workbench.methods.stats import permute_within_units


# -- checks ----------------------------------------------------------------------------------------------------
def _matrix(W, name: str = "W_U") -> torch.Tensor:
    if isinstance(W, np.ndarray):
        W = torch.from_numpy(W)
    if not isinstance(W, torch.Tensor) or W.ndim != 2 or W.shape[0] < 1 or W.shape[1] < 1:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"{name} must be a 2-d [rows, d] tensor, got {got}")
    return W.detach()


def _ids(ids, n_rows: int) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    try:
        ids = list(ids)
    except TypeError:
        raise ValueError(f"digit_ids must be a list of token ids, got {ids!r}") from None
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n_rows]
    if not ids or bad:
        raise ValueError(f"digit_ids {bad or '(empty)'} not allowed: give token ids in 0..{n_rows - 1}")
    return [int(i) for i in ids]


def _vector(v, d: int, name: str = "direction") -> torch.Tensor:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, torch.Tensor) or v.ndim != 1 or v.shape[0] != d:
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a 1-d tensor of length d = {d} (the width of W_U), got {got}")
    v = v.detach().to("cpu", torch.float64)
    if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
        raise ValueError(f"{name} must be finite and non-zero")
    return v


def _rows(W_U: torch.Tensor, ids: list[int]) -> torch.Tensor:
    rows = W_U[torch.tensor(ids, device=W_U.device)].to("cpu", torch.float64)
    zero = [i for i, r in zip(ids, rows, strict=True) if float(r.norm()) == 0.0]
    if zero:
        raise ValueError(f"rows {zero} of W_U are zero; their cosine is undefined")
    return rows


def _abs_cos(D: Float[torch.Tensor, "m d"], R: Float[torch.Tensor, "k d"]) -> Float[torch.Tensor, "m k"]:
    Dn = D / D.norm(dim=-1, keepdim=True)
    Rn = R / R.norm(dim=-1, keepdim=True)
    return (Dn @ Rn.T).abs()


# -- cosines ---------------------------------------------------------------------------------------------------
def digit_row_cosines(
    direction_raw: Float[torch.Tensor, " d"], W_U: Float[torch.Tensor, "vocab d"], digit_ids: Sequence[int]
) -> Float[torch.Tensor, " k"]:
    """|cos| between ``direction_raw`` (raw residual coordinates) and each row ``W_U[digit_ids[i]]`` (float64)."""
    W_U = _matrix(W_U)
    ids = _ids(digit_ids, W_U.shape[0])
    v = _vector(direction_raw, W_U.shape[1], "direction_raw")
    return _abs_cos(v[None], _rows(W_U, ids))[0]


def cosine_summary(cosines: Float[torch.Tensor, " k"]) -> dict[str, float]:
    """mean / min / max of a vector of |cos| values, and the index of the largest."""
    c = torch.as_tensor(cosines, dtype=torch.float64).reshape(-1)
    if c.numel() == 0:
        raise ValueError("cosines is empty")
    return {"mean": float(c.mean()), "min": float(c.min()), "max": float(c.max()), "argmax": int(c.argmax())}


# -- permutation test ------------------------------------------------------------------------------------------
@dataclass
class PermutationResult:
    """observed: mean |cos| of the real probe. null: [n_perm] the same for probes fitted on shuffled targets.

    p_value: (1 + #{null >= observed}) / (1 + n_perm), small when the real direction is *more* aligned with the
    digit rows than chance. p_less: the same with <=, small when it is *less* aligned than shuffled-label probes.
    """

    observed: float
    null: torch.Tensor
    p_value: float
    p_less: float
    alpha: float


def permutation_test(
    X: Float[torch.Tensor, "n d"],
    y: Float[torch.Tensor, " n"],
    W_U: Float[torch.Tensor, "vocab d"],
    digit_ids: Sequence[int],
    n_perm: int = 200,
    seed: int = 0,
    alpha: float | None = None,
    *,
    alphas: Sequence[float] = ALPHAS,
    groups: Sequence | None = None,
    sigma: Float[torch.Tensor, "d d"] | None = None,
) -> PermutationResult:
    """Is the ridge probe's mean |cos| with the digit rows larger than what shuffled counts give?

    The probe is fitted as :class:`workbench.methods.probes.RidgeProbe` does on all of X (standardised, intercept free) with
    ``alpha`` (None: chosen once by :class:`RidgeProbe` on the real targets, then kept fixed for every permutation,
    so the null differs from the real fit only in the labels). One SVD serves all ``n_perm`` permutations.
    ``W_U`` may be any matrix of readout rows (e.g. the covectors through the final norm, with ``digit_ids``
    ``range(k)``). ``groups``: identical prompts keep identical labels under every permutation (the labels are
    shuffled among distinct units). ``sigma``: compare in the whitened coordinates of this residual covariance
    (:func:`workbench.methods.readout.covector_cosines`), so that the shuffled-count probes are the null of the
    whitened |cos| too. The p-value's floor is 1 / (1 + n_perm): use enough permutations to resolve the p-values
    you report.
    """
    Xt = as_features(X)
    yt = as_target(y, Xt.shape[0])
    W_U = _matrix(W_U)
    if Xt.shape[1] != W_U.shape[1]:
        raise ValueError(f"X has {Xt.shape[1]} features but W_U rows have width {W_U.shape[1]}")
    ids = _ids(digit_ids, W_U.shape[0])
    if isinstance(n_perm, bool) or not isinstance(n_perm, int) or n_perm < 1:
        raise ValueError(f"n_perm must be a positive int, got {n_perm!r}")
    if float(yt.std()) == 0.0:
        raise ValueError("y is constant; a probe direction is undefined")
    if alpha is None:
        alpha = RidgeProbe(alphas=alphas, seed=seed).fit(Xt, yt, groups=groups).alpha
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number or None, got {alpha!r}")
    mean, std = standardise_stats(Xt)
    Xs = (Xt - mean) / std
    U, S, Vh = torch.linalg.svd(Xs, full_matrices=False)
    y_np = yt.numpy()
    shuffled = np.stack([permute_within_units(y_np, groups, seed=seed * 100_003 + i) for i in range(n_perm)], 1)
    Y = torch.cat([yt[:, None], torch.from_numpy(shuffled).to(yt.dtype)], dim=1)  # [n, 1 + n_perm]
    Yc = Y - Y.mean(0)
    coef = Vh.T @ ((S / (S**2 + alpha))[:, None] * (U.T @ Yc))  # [d, 1 + n_perm]
    dirs = (coef / std[:, None]).T  # raw coordinates
    rows = _rows(W_U, ids)
    if sigma is None:
        stats = _abs_cos(dirs, rows).mean(1)
    else:
        G = torch.as_tensor(sigma).detach().to("cpu", torch.float64)
        num = (dirs @ G @ rows.T).abs()
        stats = (num / torch.sqrt(torch.einsum("nd,de,ne->n", dirs, G, dirs)[:, None]
                                  * torch.einsum("kd,de,ke->k", rows, G, rows)[None, :])).mean(1)
    observed, null = float(stats[0]), stats[1:].clone()
    p = (1 + int((null >= observed).sum())) / (1 + n_perm)
    p_less = (1 + int((null <= observed).sum())) / (1 + n_perm)
    return PermutationResult(observed=observed, null=null, p_value=p, p_less=p_less, alpha=float(alpha))


# -- subspaces and norms ---------------------------------------------------------------------------------------
def _orthonormal(A: torch.Tensor, name: str) -> torch.Tensor:
    Q, R = torch.linalg.qr(A)
    diag = R.diagonal().abs()
    tol = max(A.shape) * torch.finfo(torch.float64).eps * float(diag.max()) if diag.numel() else 0.0
    if diag.numel() == 0 or float(diag.min()) <= tol:
        raise ValueError(f"{name} [d={A.shape[0]}, k={A.shape[1]}] does not have full column rank; give independent "
                         "columns")
    return Q


def principal_angles(A: Float[torch.Tensor, "d k1"], B: Float[torch.Tensor, "d k2"]) -> Float[torch.Tensor, " k"]:
    """Principal angles (degrees, ascending, k = min(k1, k2)) between the column spans of A and B.

    Orthonormal bases by QR, then the singular values of Qa^T Qb are the cosines. Small angles are taken from the
    sines (singular values of Qb - Qa Qa^T Qb) instead, which keeps them accurate near 0 (Björck & Golub).
    """
    A = _matrix(A, "A").to("cpu", torch.float64)
    B = _matrix(B, "B").to("cpu", torch.float64)
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"A and B must have the same number of rows (the dimension d); got {A.shape[0]} and "
                         f"{B.shape[0]}")
    for name, M in (("A", A), ("B", B)):
        if M.shape[1] > M.shape[0]:
            raise ValueError(f"{name} has {M.shape[1]} columns in d = {M.shape[0]}; at most d independent columns")
    Qa, Qb = _orthonormal(A, "A"), _orthonormal(B, "B")
    if Qa.shape[1] < Qb.shape[1]:
        Qa, Qb = Qb, Qa  # angles are symmetric; let Qb be the smaller span
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(-1.0, 1.0)  # descending -> ascending angles
    sin = torch.linalg.svdvals(Qb - Qa @ (Qa.T @ Qb)).clamp(-1.0, 1.0).flip(0)  # ascending
    theta = torch.where(cos**2 < 0.5, torch.arccos(cos), torch.arcsin(sin))
    return torch.rad2deg(theta)


def row_norm_percentiles(
    W_U: Float[torch.Tensor, "vocab d"],
    ids: Sequence[int],
    kind: Literal["mean", "strict", "weak"] = "mean",
) -> Float[torch.Tensor, " k"]:
    """Percentile (0-100) of each row ``W_U[ids[i]]``'s L2 norm among the norms of all rows.

    kind: "strict" = % of rows with a smaller norm; "weak" = % with a smaller or equal norm (itself included);
    "mean" = their average (scipy's ``percentileofscore`` default).
    """
    W_U = _matrix(W_U)
    id_list = _ids(ids, W_U.shape[0])
    if kind not in ("mean", "strict", "weak"):
        raise ValueError(f"kind must be 'mean', 'strict' or 'weak', got {kind!r}")
    norms = W_U.to(torch.float64).norm(dim=1).cpu()
    sorted_norms = norms.sort().values
    q = norms[torch.tensor(id_list)]
    below = torch.searchsorted(sorted_norms, q, right=False).to(torch.float64)
    at_or_below = torch.searchsorted(sorted_norms, q, right=True).to(torch.float64)
    strict, weak = 100 * below / len(norms), 100 * at_or_below / len(norms)
    return {"strict": strict, "weak": weak, "mean": (strict + weak) / 2}[kind]


# -- per-layer summary -----------------------------------------------------------------------------------------
def _direction_of(obj, layer) -> torch.Tensor:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(obj)
    if hasattr(obj, "direction_raw"):
        return obj.direction_raw
    raise ValueError(f"layer {layer!r}: expected a probe with direction_raw or a direction tensor, got "
                     f"{type(obj).__name__}")


def geometry_table(
    probes_by_layer: Mapping[int, RidgeProbe | torch.Tensor],
    W_U: Float[torch.Tensor, "vocab d"],
    digit_ids: Sequence[int],
    *,
    n_random: int = 1000,
    seed: int = 0,
    covectors_by_layer: Mapping[int, torch.Tensor] | None = None,
    sigma_by_layer: Mapping[int, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Per layer and basis: mean/min/max |cos| of the probe direction with the digit readout, and the chance band.

    probes_by_layer: {layer: fitted RidgeProbe (its ``direction_raw``) or a raw direction [d]}. Bases (column
    ``basis``): ``raw``, the raw head rows ``W_U[digit]`` in raw residual coordinates (what the paper compares);
    ``gain``, the readout covectors through the final norm (``covectors_by_layer[layer]`` [k, d], from
    :func:`workbench.methods.readout.readout_covectors`); ``gain_whitened``, the same in the whitened coordinates
    of ``sigma_by_layer[layer]`` (the residual covariance there). The last two only where given. Columns: layer,
    basis, cos_mean, cos_min, cos_max, cos_argmax (index into digit_ids of the best-aligned row), random_baseline
    (sqrt(2/(π d))), random_mean (empirical, random directions isotropic in that basis), random_lo / random_hi
    (95 % band of a random direction's mean |cos| over the digit rows), d. A zero direction (constant features)
    gives NaN cosines.
    """
    if not isinstance(probes_by_layer, Mapping) or not probes_by_layer:
        raise ValueError("probes_by_layer must be a non-empty dict {layer: probe or direction}")
    W_U = _matrix(W_U)
    ids = _ids(digit_ids, W_U.shape[0])
    d = W_U.shape[1]
    raw_rows = _rows(W_U, ids)
    raw_band = random_covector_band(raw_rows, n=n_random, seed=seed)
    rows = []
    for layer in sorted(probes_by_layer):
        direction = torch.as_tensor(_direction_of(probes_by_layer[layer], layer)).detach().double().cpu()
        bases = [("raw", raw_rows, None, raw_band)]
        if covectors_by_layer is not None and layer in covectors_by_layer:
            U = torch.as_tensor(covectors_by_layer[layer]).double()
            bases.append(("gain", U, None, random_covector_band(U, n=n_random, seed=seed)))
            if sigma_by_layer is not None and layer in sigma_by_layer:
                S = sigma_by_layer[layer]
                bases.append(("gain_whitened", U, S, random_covector_band(U, S, n=n_random, seed=seed)))
        for basis, U, S, band in bases:
            if not bool(direction.abs().sum() > 0):
                # A layer whose features do not vary (e.g. the embedding of an always-identical last token) gets a
                # zero probe: it has no direction, so its cosines are undefined (NaN), not an error.
                s = {"mean": math.nan, "min": math.nan, "max": math.nan, "argmax": -1}
            else:
                s = cosine_summary(covector_cosines(direction, U, S))
            rows.append({
                "layer": layer,
                "basis": basis,
                "cos_mean": s["mean"],
                "cos_min": s["min"],
                "cos_max": s["max"],
                "cos_argmax": s["argmax"],
                "random_baseline": random_baseline(d),
                **band,
                "d": d,
            })
    return pd.DataFrame(rows)
