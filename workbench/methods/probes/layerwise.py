"""One probe per layer: held-out scores by layer, and the fitted probes (ridge and logistic; MLP in ``mlp``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from workbench.methods.probes.base import (
    Array,
    as_features,
    as_target,
    check_grid,
    probe_round_accuracy,
    r2_score,
    standardise_stats,
)
from workbench.methods.probes.linear import ALPHAS, LogisticProbe, RidgeProbe, fit_softmax_regression


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


def layerwise_ridge(
    features: Mapping[int, Float[Array, "n d"]],
    y: Float[Array, " n"],
    train_idx: Sequence[int] | np.ndarray,
    test_idx: Sequence[int] | np.ndarray,
    *,
    alphas: Sequence[float] = ALPHAS,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> LayerwiseProbes:
    """Fit a :class:`RidgeProbe` per layer on ``train_idx`` and score it on ``test_idx`` (which must not overlap).

    Table columns: layer, r2_test, round_acc_test (probe-round accuracy), r2_train, r2_val (validation R² of the
    chosen alpha), alpha, n_train, n_test, d.
    """
    if not isinstance(features, Mapping) or not features:
        raise ValueError("features must be a non-empty dict {layer: [n, d] features}")
    feats = {layer: as_features(X, f"features[{layer!r}]") for layer, X in features.items()}
    ns = {layer: X.shape[0] for layer, X in feats.items()}
    if len(set(ns.values())) != 1:
        raise ValueError(f"every layer must have the same number of rows; got {ns}")
    n = next(iter(ns.values()))
    y_t = as_target(y, n)
    tr, te = _indices("train_idx", train_idx, n), _indices("test_idx", test_idx, n)
    overlap = np.intersect1d(tr, te)
    if overlap.size:
        raise ValueError(f"train_idx and test_idx share {overlap.size} indices (e.g. {overlap[:5].tolist()}); "
                         "evaluation rows must never be trained on")
    rows, probes = [], {}
    for layer in sorted(feats):
        X = feats[layer]
        probe = RidgeProbe(alphas=alphas, val_fraction=val_fraction, seed=seed).fit(X[tr], y_t[tr])
        pred = probe.predict(X[te])
        probes[layer] = probe
        rows.append({
            "layer": layer,
            "r2_test": r2_score(pred, y_t[te]),
            "round_acc_test": probe_round_accuracy(pred, y_t[te]),
            "r2_train": probe.r2(X[tr], y_t[tr]),
            "r2_val": probe.alpha_scores.get(probe.alpha, float("nan")),
            "alpha": probe.alpha,
            "n_train": len(tr),
            "n_test": len(te),
            "d": X.shape[1],
        })
    return LayerwiseProbes(table=pd.DataFrame(rows), probes=probes)


def layerwise_logistic(
    features: Mapping[int, Float[Array, "n d"]],
    y: Int[Array, " n"],
    train_idx: Sequence[int] | np.ndarray,
    test_idx: Sequence[int] | np.ndarray,
    *,
    C: float = 1.0,
    max_iter: int = 2000,
    tol: float = 1e-4,
) -> pd.DataFrame:
    """A logistic probe per layer with a fixed ``C`` (test accuracy only; the probes are not kept).

    Each layer gets the :class:`LogisticProbe` it would get alone (same standardisation, same objective). The
    default ``tol`` is scikit-learn's: predictions agree with a tight solve, probabilities to about 1e-2. Table
    columns: layer, logistic_acc (test), logistic_acc_train.
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
    acc_te, acc_tr, prev = [], [], None
    for X in feats:  # layer by layer, each warm-started from its neighbour's solution (a third fewer iterations)
        mean, std = standardise_stats(X[tr])
        Xtr, Xte = (X[tr] - mean) / std, (X[te] - mean) / std
        coef, icpt = fit_softmax_regression(Xtr[None], target, len(classes), C, max_iter=max_iter, tol=tol,
                                            init=prev)
        prev = (coef, icpt)
        acc_te.append(float((classes[(Xte @ coef[0].T + icpt[0]).argmax(-1)] == yt[te]).double().mean()))
        acc_tr.append(float((classes[(Xtr @ coef[0].T + icpt[0]).argmax(-1)] == yt[tr]).double().mean()))
    return pd.DataFrame({
        "layer": layers,
        "logistic_acc": acc_te,
        "logistic_acc_train": acc_tr,
    })


