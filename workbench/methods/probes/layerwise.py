"""One probe per layer: held-out scores by layer, and the fitted probes (ridge and logistic; MLP in ``mlp``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from workbench.methods.probes.base import (
    STD_FLOOR,
    Array,
    as_features,
    as_target,
    check_fraction,
    check_grid,
    check_seed,
    probe_round_accuracy,
    r2_score,
    standardise_stats,
    val_split,
)
from workbench.methods.probes.linear import ALPHAS, LogisticProbe, RidgeProbe, fit_softmax_regression
from workbench.methods.stats import MaxNull, max_null_p, percentile_interval, permute_within_units, resample_weights


# -- per-layer probing -----------------------------------------------------------------------------------------
@dataclass
class LayerwiseProbes:
    """Result of :func:`layerwise_ridge`: the table (one row per layer) and the fitted probes by layer."""

    table: pd.DataFrame
    probes: dict[int, RidgeProbe]

    def best_layer(self, metric: str = "r2_test") -> int:
        return int(self.table.loc[self.table[metric].idxmax(), "layer"])


def _indices(name: str, idx, n: int) -> np.ndarray:
    arr = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a non-empty 1-d list of int indices, got {idx!r}")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{name} holds indices outside 0..{n - 1} (min {arr.min()}, max {arr.max()})")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} holds repeated indices")
    return arr.astype(np.int64)


def _fit_ridge_stack(
    X: Float[torch.Tensor, "L n d"], y: Float[torch.Tensor, " n"], alphas: tuple[float, ...], val_fraction: float,
    seed: int, groups=None,
) -> list[RidgeProbe]:
    """:meth:`RidgeProbe.fit` for every layer at once (batched SVDs on X's device, float64): the same validation
    split, standardisation, alpha choice (ties to the larger alpha) and final fit as a probe fitted alone."""
    L, n, _ = X.shape
    fit_idx, val_idx = val_split(n, val_fraction, seed, groups)
    fit_t, val_t = (torch.from_numpy(i).to(X.device) for i in (fit_idx, val_idx))
    a = torch.tensor(alphas, dtype=torch.float64, device=X.device)

    def stats(Z):  # standardise_stats over dim 1, batched
        mean, std = Z.mean(1), Z.std(1, unbiased=False)
        return mean, torch.where(std < STD_FLOOR, torch.ones_like(std), std)

    def path(Zs, yc, al):  # _ridge_path, batched: [L, a, d]
        U, S, Vh = torch.linalg.svd(Zs, full_matrices=False)
        Uty = (U.transpose(1, 2) @ yc[:, None])[..., 0]  # [L, r]
        return ((S[:, None, :] / (S[:, None, :] ** 2 + al[None, :, None])) * Uty[:, None, :]) @ Vh

    Xf, yf = X[:, fit_t], y[fit_t]
    mean, std = stats(Xf)
    W = path((Xf - mean[:, None]) / std[:, None], yf - yf.mean(), a)
    preds = ((X[:, val_t] - mean[:, None]) / std[:, None]) @ W.transpose(1, 2) + yf.mean()  # [L, n_val, a]
    y_val = y[val_t]
    ss_tot = ((y_val - y_val.mean()) ** 2).sum()
    ss_res = ((preds - y_val[None, :, None]) ** 2).sum(1)  # [L, a]
    scores = (1.0 - ss_res / ss_tot) if float(ss_tot) > 0 else -ss_res
    scores_cpu = scores.cpu()
    chosen = [max(range(len(alphas)), key=lambda i, r=r: (float(scores_cpu[r, i]), i)) for r in range(L)]
    mean_all, std_all = stats(X)
    Xs = (X - mean_all[:, None]) / std_all[:, None]
    coef = path(Xs, y - y.mean(), a)[torch.arange(L), torch.tensor(chosen)]  # [L, d]
    probes = []
    for r in range(L):
        probe = RidgeProbe(alphas=alphas, val_fraction=val_fraction, seed=seed)
        probe.alpha_scores = {al: float(sc) for al, sc in zip(alphas, scores_cpu[r].tolist(), strict=True)}
        probe.alpha = alphas[chosen[r]]
        probe.mean, probe.std = mean_all[r].cpu(), std_all[r].cpu()
        probe.coef_std = coef[r].cpu().contiguous()
        probe.intercept = float(y.mean())
        probe.n_train = n
        probes.append(probe)
    return probes


def layerwise_ridge(
    features: Mapping[int, Float[Array, "n d"]],
    y: Float[Array, " n"],
    train_idx: Sequence[int] | np.ndarray,
    test_idx: Sequence[int] | np.ndarray,
    *,
    alphas: Sequence[float] = ALPHAS,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str | torch.device | None = None,
    groups: Sequence | None = None,
    ci: bool = False,
) -> LayerwiseProbes:
    """Fit a :class:`RidgeProbe` per layer on ``train_idx`` and score it on ``test_idx`` (which must not overlap).

    groups: one key per row (e.g. the prompt text): identical prompts stay on one side of the validation split
    that picks alpha, and are one unit of the test interval. ci: add the 95 % bootstrap interval of the test R²
    and probe-round accuracy over distinct test units (``r2_lo``, ``r2_hi``, ``round_acc_lo``, ``round_acc_hi``,
    ``n_test_units``; :func:`workbench.methods.stats.bootstrap_ci`).

    device: where to fit (e.g. the model's device; None = the CPU). Every layer is fitted at once there, with
    batched SVDs in float64; each probe is the one :meth:`RidgeProbe.fit` gives alone (to float64 rounding).

    Table columns: layer, r2_test, round_acc_test (probe-round accuracy), r2_train, r2_val (validation R² of the
    chosen alpha), alpha, n_train, n_test, d.
    """
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty dict {layer: [n, d] features}")
    feats = {layer: as_features(X, f"features[{layer!r}]") for layer, X in features.items()}
    ns = {layer: X.shape for layer, X in feats.items()}
    if len(set(ns.values())) != 1:
        raise ValueError(f"every layer must have the same [n, d] shape; got {ns}")
    n = next(iter(ns.values()))[0]
    y_t = as_target(y, n)
    tr, te = _indices("train_idx", train_idx, n), _indices("test_idx", test_idx, n)
    overlap = np.intersect1d(tr, te)
    if overlap.size:
        raise ValueError(f"train_idx and test_idx share {overlap.size} indices (e.g. {overlap[:5].tolist()}); "
                         "evaluation rows must never be trained on")
    alphas = check_grid("alphas", alphas)
    check_fraction(val_fraction)
    check_seed(seed)
    if float(y_t[tr].std()) == 0.0:
        raise ValueError(f"y is constant on train_idx ({float(y_t[tr][0])}); a probe needs at least two values")
    dev = torch.device("cpu") if device is None else torch.device(device)
    layers = sorted(feats)
    X = torch.stack([feats[layer] for layer in layers]).to(dev)  # [L, n, d]
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} keys for {n} rows; give one key per row")
    keys = None if groups is None else np.asarray(list(groups), dtype=object)
    fitted = _fit_ridge_stack(X[:, torch.from_numpy(tr).to(dev)], y_t[tr].to(dev), alphas, val_fraction, seed,
                              None if keys is None else keys[tr].tolist())
    rows, probes = [], {}
    weights = resample_weights(None if keys is None else keys[te].tolist(), len(te)) if ci else None
    for layer, probe in zip(layers, fitted, strict=True):
        Xl = feats[layer]
        pred = probe.predict(Xl[te])
        probes[layer] = probe
        rows.append({
            "layer": layer,
            "r2_test": r2_score(pred, y_t[te]),
            "round_acc_test": probe_round_accuracy(pred, y_t[te]),
            "r2_train": probe.r2(Xl[tr], y_t[tr]),
            "r2_val": probe.alpha_scores.get(probe.alpha, float("nan")),
            "alpha": probe.alpha,
            "n_train": len(tr),
            "n_test": len(te),
            "d": Xl.shape[1],
        })
        if ci:
            rows[-1] |= _intervals(pred.double().numpy(), y_t[te].double().numpy(), *weights)
    return LayerwiseProbes(table=pd.DataFrame(rows), probes=probes)


def _intervals(p: np.ndarray, t: np.ndarray, codes: np.ndarray, W: np.ndarray) -> dict:
    """95 % percentile bootstrap intervals of the held-out R² and probe-round accuracy over distinct units: the
    resamples ``W`` (:func:`workbench.methods.stats.resample_weights`) applied to per-unit sums, every resample at
    once. NaN where a resample leaves R² undefined (one count only)."""
    n = W @ np.bincount(codes, minlength=W.shape[1])
    sy, syy = W @ np.bincount(codes, t, W.shape[1]), W @ np.bincount(codes, t * t, W.shape[1])
    ss_res = W @ np.bincount(codes, (p - t) ** 2, W.shape[1])
    ss_tot = syy - sy * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 1e-12 * np.maximum(syy, 1), 1 - ss_res / ss_tot, np.nan)
    right = (np.clip(np.rint(p), 1, 9) == t).astype(np.float64)
    acc = (W @ np.bincount(codes, right, W.shape[1])) / n
    r2_lo, r2_hi = percentile_interval(r2)
    acc_lo, acc_hi = percentile_interval(acc)
    return {"r2_lo": r2_lo, "r2_hi": r2_hi, "round_acc_lo": acc_lo, "round_acc_hi": acc_hi,
            "n_test_units": W.shape[1]}


def layerwise_max_null(
    features: Mapping[int, Float[Array, "n d"]],
    y: Float[Array, " n"],
    train_idx: Sequence[int] | np.ndarray,
    test_idx: Sequence[int] | np.ndarray,
    probes: Mapping[int, RidgeProbe],
    *,
    n_permutations: int = 999,
    groups: Sequence | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> MaxNull:
    """Is the best layer's test R² more than the best of ``len(probes)`` layers would give by chance?

    Each permutation shuffles the labels among distinct units (``groups``), refits every layer's ridge probe on the
    train rows at that layer's chosen alpha (one SVD per layer serves all permutations) and scores it on the test
    rows; the winner's observed R² is compared with the max over layers of each permutation
    (:func:`workbench.methods.stats.max_null_p`). The p-value's floor is 1 / (1 + n_permutations).
    """
    layers = sorted(probes)
    feats = {layer: as_features(features[layer], f"features[{layer!r}]") for layer in layers}
    n = feats[layers[0]].shape[0]
    y_np = as_target(y, n).double().numpy()
    tr, te = _indices("train_idx", train_idx, n), _indices("test_idx", test_idx, n)
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
    Y = np.stack([y_np] + [permute_within_units(y_np, groups, seed=seed * 1_000_003 + i)
                           for i in range(n_permutations)], 1)  # [n, 1 + P]
    dev = torch.device("cpu") if device is None else torch.device(device)
    Yt = torch.from_numpy(Y).to(dev)
    ytr, yte = Yt[torch.from_numpy(tr).to(dev)], Yt[torch.from_numpy(te).to(dev)]
    scores = np.empty((len(layers), 1 + n_permutations))
    for j, layer in enumerate(layers):
        X = feats[layer].to(dev)
        Xtr = X[torch.from_numpy(tr).to(dev)]
        mean, std = standardise_stats(Xtr)
        U, S, Vh = torch.linalg.svd((Xtr - mean) / std, full_matrices=False)
        a = probes[layer].alpha
        coef = Vh.T @ ((S / (S**2 + a))[:, None] * (U.T @ (ytr - ytr.mean(0))))  # [d, 1 + P]
        pred = ((X[torch.from_numpy(te).to(dev)] - mean) / std) @ coef + ytr.mean(0)
        ss_res = ((pred - yte) ** 2).sum(0)
        ss_tot = ((yte - yte.mean(0)) ** 2).sum(0)
        scores[j] = (1 - ss_res / ss_tot).cpu().numpy()
    return max_null_p(scores[:, 0], scores[:, 1:].T)


def layerwise_logistic(
    features: Mapping[int, Float[Array, "n d"]],
    y: Int[Array, " n"],
    train_idx: Sequence[int] | np.ndarray,
    test_idx: Sequence[int] | np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 2000,
    tol: float = 1e-4,
    device: str | torch.device | None = None,
    batched: bool = False,
) -> pd.DataFrame:
    """A logistic probe per layer with a fixed ``C`` (test accuracy only; the probes are not kept).

    Each layer gets the :class:`LogisticProbe` it would get alone (same standardisation, same objective). The
    default ``tol`` is scikit-learn's: predictions agree with a tight solve, probabilities to about 1e-2. Table
    columns: layer, logistic_acc (test), logistic_acc_train.

    device: where to fit (None = the CPU). batched: solve every layer in one L-BFGS run (the problems share no
    parameters, so each keeps its own minimiser) instead of layer by layer with warm starts. The shared line search
    follows the worst-conditioned layer: on 2 CPU cores (31 layers, 700 x 576) it took 72 s against 12-17 s layer
    by layer, so the default is layer by layer.
    """
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty dict {layer: [n, d] features}")
    layers = sorted(features)
    feats = [as_features(features[layer], f"features[{layer!r}]") for layer in layers]
    n = feats[0].shape[0]
    if any(X.shape != feats[0].shape for X in feats):
        raise ValueError(f"every layer must have the same [n, d] shape; got {[tuple(X.shape) for X in feats]}")
    yt = LogisticProbe._labels(y, n)
    tr, te = _indices("train_idx", train_idx, n), _indices("test_idx", test_idx, n)
    if np.intersect1d(tr, te).size:
        raise ValueError("train_idx and test_idx overlap; evaluation rows must never be trained on")
    C = check_grid("C", [C])[0]
    classes, target = torch.unique(yt[tr], return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"y has a single class {classes.tolist()} on train_idx; a classifier needs at least two")
    dev = torch.device("cpu") if device is None else torch.device(device)
    tr_t, te_t = torch.from_numpy(tr).to(dev), torch.from_numpy(te).to(dev)
    X = torch.stack(feats).to(dev)  # [L, n, d]
    mean, std = zip(*(standardise_stats(Xl[tr_t]) for Xl in X), strict=True)
    Xs = (X - torch.stack(mean)[:, None]) / torch.stack(std)[:, None]
    Xtr, Xte = Xs[:, tr_t], Xs[:, te_t]
    target, classes, ytr, yte = target.to(dev), classes.to(dev), yt[tr].to(dev), yt[te].to(dev)
    if batched:
        coef, icpt = fit_softmax_regression(Xtr, target, len(classes), C, max_iter=max_iter, tol=tol)
    else:
        parts, prev = [], None
        for Xl in Xtr:  # layer by layer, each warm-started from its neighbour's solution (a third fewer iterations)
            prev = fit_softmax_regression(Xl[None], target, len(classes), C, max_iter=max_iter, tol=tol, init=prev)
            parts.append(prev)
        coef, icpt = (torch.cat(p) for p in zip(*parts, strict=True))
    acc_te = (classes[(Xte @ coef.transpose(1, 2) + icpt[:, None]).argmax(-1)] == yte).double().mean(1).tolist()
    acc_tr = (classes[(Xtr @ coef.transpose(1, 2) + icpt[:, None]).argmax(-1)] == ytr).double().mean(1).tolist()
    return pd.DataFrame({
        "layer": layers,
        "logistic_acc": acc_te,
        "logistic_acc_train": acc_tr,
    })


