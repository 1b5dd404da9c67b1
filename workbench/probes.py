"""Linear probes on residual-stream features, and probe artifacts on disk (research thread 1, methods.md).

The counting study's first claim is that the count is *linearly decodable* from intermediate layers. This module
gives the pieces to measure that and to keep the result:

- :func:`residual_features`: residual-stream vectors of prompts at chosen layers, at the last token or averaged
  over chosen token positions (e.g. the entity mentions). Layer numbering follows Hugging Face ``hidden_states``
  and :mod:`workbench.lens`: layer 0 is the embedding output (site ``blocks.0.hook_resid_pre``), layer l >= 1 the
  output of block l-1 (``blocks.{l-1}.hook_resid_post``, before any final norm).
- :class:`RidgeProbe`: closed-form ridge regression of the scalar count, on standardised features with an
  unpenalised intercept; alpha picked from {1e-3 ... 1e3} by R² on a seeded 20 % validation split of the training
  data, then refitted on all of it. One SVD per fit evaluates every alpha. ``direction_raw`` maps the weights back to
  raw residual coordinates (w / sigma), the direction the geometry of :mod:`workbench.geometry` is measured on.
- :class:`LogisticProbe`: multinomial logistic classification of the count (scikit-learn's objective, solved by
  L-BFGS in torch; tests compare with scikit-learn).
- :func:`layerwise_ridge`: one ridge probe per layer with held-out R² and probe-round accuracy;
  :func:`layerwise_logistic`: a logistic probe per layer, each warm-started from its neighbour.
- :func:`save_probe` / :func:`load_probe`: a probe is a folder with ``probe.safetensors`` (tensors only, no pickles)
  and ``card.json`` (model, weights hash, site, task and generator parameters, metrics, hyper-parameters, library
  versions, and the sha256 of the tensors file). Loading recomputes that hash and refuses a mismatch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from workbench.cache import atomic_write_bytes, atomic_write_json, sha256_file
from workbench.sites import layer_site
from workbench.trace import trace

ALPHAS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
CS: tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1)
PROBE_WEIGHTS_FILE = "probe.safetensors"
PROBE_CARD_FILE = "card.json"
CARD_FORMAT = 1
_STD_FLOOR = 1e-12  # a feature whose training std is below this is constant: left unscaled (std := 1), weight 0

Array = np.ndarray | torch.Tensor


# -- input checks ----------------------------------------------------------------------------------------------
def _features(X, name: str = "X") -> torch.Tensor:
    """Any [n, d] array or tensor -> float64 CPU tensor, checked."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor of shape [n, d], got {type(X).__name__}")
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} must have shape [n, d] with n, d >= 1, got {tuple(X.shape)}")
    X = X.detach().to("cpu", torch.float64)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values ({int((~torch.isfinite(X)).sum())} entries)")
    return X


def _target(y, n: int, name: str = "y") -> torch.Tensor:
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a 1-d array, tensor or list of numbers, got {type(y).__name__}")
    y = y.detach().to("cpu", torch.float64).reshape(-1) if y.ndim <= 1 else y
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one value per row of X), got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return y


def _check_grid(name: str, grid) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-empty list of positive numbers, got {grid!r}") from None
    if not values or not all(math.isfinite(a) and a > 0 for a in values):
        raise ValueError(f"{name} must be a non-empty list of positive finite numbers, got {grid!r}")
    return tuple(sorted(set(values)))


def _check_fraction(val_fraction) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(val_fraction * n))
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"{n} training rows are too few for a {val_fraction:.0%} validation split (each part needs "
                         "at least 2 rows); give more data or a fixed alpha / C")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def standardise_stats(X: Float[torch.Tensor, "n d"]) -> tuple[Float[torch.Tensor, " d"], Float[torch.Tensor, " d"]]:
    """Per-feature mean and (population) std of X; constant features get std 1 so they standardise to 0."""
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    std = torch.where(std < _STD_FLOOR, torch.ones_like(std), std)
    return mean, std


def r2_score(pred: Array, y: Array) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (SS_tot around the mean of y); NaN when y is constant."""
    pred_t = _target(pred, len(pred), "pred")
    y_t = _target(y, len(pred_t), "y")
    ss_tot = float(((y_t - y_t.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(((y_t - pred_t) ** 2).sum()) / ss_tot


def probe_round_accuracy(pred: Array, y: Array, lo: int = 1, hi: int = 9) -> float:
    """Mean of ``clip(round(pred), lo, hi) == y``: the count a probe would answer, read as a digit."""
    pred_t = _target(pred, len(pred), "pred")
    y_t = _target(y, len(pred_t), "y")
    return float((torch.round(pred_t).clamp(lo, hi) == y_t).double().mean())


def _ridge_path(
    Xs: Float[torch.Tensor, "n d"], yc: Float[torch.Tensor, " n"], alphas: Sequence[float]
) -> Float[torch.Tensor, "a d"]:
    """Ridge weights min ||yc - Xs w||² + alpha ||w||² for every alpha, from one thin SVD (primal or dual alike)."""
    U, S, Vh = torch.linalg.svd(Xs, full_matrices=False)
    Uty = U.T @ yc
    a = torch.tensor(alphas, dtype=torch.float64)[:, None]
    return ((S / (S**2 + a)) * Uty) @ Vh  # [a, d]


# -- ridge -----------------------------------------------------------------------------------------------------
class RidgeProbe:
    """Ridge regression of a scalar target on standardised features, alpha chosen on a validation split.

    alpha: a fixed penalty (skips the selection), or None to choose from ``alphas`` by validation R² (ties go to the
    larger alpha). The objective is sklearn's ``Ridge``: ||y - ȳ - Xs w||² + alpha ||w||², Xs standardised with the
    training mean and population std; the intercept is not penalised.
    """

    probe_type: ClassVar[str] = "ridge"

    def __init__(
        self,
        *,
        alphas: Sequence[float] = ALPHAS,
        alpha: float | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
    ):
        self.alphas = _check_grid("alphas", alphas)
        if alpha is not None:
            alpha = _check_grid("alpha", [alpha])[0]
        self.fixed_alpha = alpha
        self.val_fraction = _check_fraction(val_fraction)
        self.seed = _check_seed(seed)
        self.alpha: float | None = None
        self.alpha_scores: dict[float, float] = {}  # alpha -> validation R² (empty when alpha was fixed)
        self.coef_std: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.intercept: float | None = None
        self.n_train: int | None = None

    def __repr__(self) -> str:
        if self.coef_std is None:
            return "RidgeProbe(unfitted)"
        return f"RidgeProbe(d={self.coef_std.shape[0]}, alpha={self.alpha:g}, n_train={self.n_train})"

    # -- fitting ---------------------------------------------------------------------------------------------
    def fit(self, X: Float[Array, "n d"], y: Float[Array, " n"]) -> RidgeProbe:
        X = _features(X)
        y = _target(y, X.shape[0])
        if float(y.std()) == 0.0:
            raise ValueError(f"y is constant ({float(y[0])}); a probe needs at least two different target values")
        if self.fixed_alpha is not None:
            chosen = self.fixed_alpha
            self.alpha_scores = {}
        else:
            fit_idx, val_idx = _val_split(X.shape[0], self.val_fraction, self.seed)
            mean, std = standardise_stats(X[fit_idx])
            y_fit = y[fit_idx]
            W = _ridge_path((X[fit_idx] - mean) / std, y_fit - y_fit.mean(), self.alphas)
            preds = ((X[val_idx] - mean) / std) @ W.T + y_fit.mean()  # [n_val, a]
            y_val = y[val_idx]
            ss_tot = float(((y_val - y_val.mean()) ** 2).sum())
            ss_res = ((preds - y_val[:, None]) ** 2).sum(0)
            scores = (1.0 - ss_res / ss_tot) if ss_tot > 0 else -ss_res  # constant val targets: rank by error
            self.alpha_scores = {a: float(s) for a, s in zip(self.alphas, scores.tolist(), strict=True)}
            best = max(range(len(self.alphas)), key=lambda i: (float(scores[i]), i))  # ties -> larger alpha
            chosen = self.alphas[best]
        self.mean, self.std = standardise_stats(X)
        self.coef_std = _ridge_path((X - self.mean) / self.std, y - y.mean(), [chosen])[0].contiguous()
        self.intercept = float(y.mean())
        self.alpha = chosen
        self.n_train = int(X.shape[0])
        return self

    def _check_fitted(self) -> None:
        if self.coef_std is None:
            raise ValueError("this RidgeProbe is not fitted; call fit(X, y) or load_probe(folder) first")

    # -- using -----------------------------------------------------------------------------------------------
    @property
    def direction_raw(self) -> Float[torch.Tensor, " d"]:
        """The weights in raw feature coordinates, w / sigma: pred = X @ direction_raw + const."""
        self._check_fitted()
        return self.coef_std / self.std

    def predict(self, X: Float[Array, "n d"]) -> Float[torch.Tensor, " n"]:
        self._check_fitted()
        X = _features(X)
        if X.shape[1] != self.coef_std.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features, the probe was fitted on {self.coef_std.shape[0]}")
        return ((X - self.mean) / self.std) @ self.coef_std + self.intercept

    def r2(self, X: Float[Array, "n d"], y: Float[Array, " n"]) -> float:
        return r2_score(self.predict(X), y)

    def round_accuracy(self, X: Float[Array, "n d"], y: Float[Array, " n"]) -> float:
        return probe_round_accuracy(self.predict(X), y)

    # -- persistence -----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {
            "coef_std": self.coef_std,
            "mean": self.mean,
            "std": self.std,
            "intercept": torch.tensor([self.intercept], dtype=torch.float64),
        }

    def hyperparams(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "alpha": self.alpha,
            "alphas": list(self.alphas),
            "fixed_alpha": self.fixed_alpha,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "alpha_scores": {repr(a): s for a, s in self.alpha_scores.items()},
            "n_train": self.n_train,
            "standardise": "train mean / population std",
            "fit_intercept": True,
        }

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], hyper: Mapping[str, Any]) -> RidgeProbe:
        probe = cls(alphas=hyper["alphas"], alpha=hyper["fixed_alpha"], val_fraction=hyper["val_fraction"],
                    seed=hyper["seed"])
        probe.coef_std, probe.mean, probe.std = tensors["coef_std"], tensors["mean"], tensors["std"]
        probe.intercept = float(tensors["intercept"][0])
        probe.alpha = float(hyper["alpha"])
        probe.alpha_scores = {float(a): float(s) for a, s in hyper.get("alpha_scores", {}).items()}
        probe.n_train = hyper.get("n_train")
        return probe


# -- logistic --------------------------------------------------------------------------------------------------
def fit_softmax_regression(
    X: Float[torch.Tensor, "b n d"],
    target: Int[torch.Tensor, " n"],
    k: int,
    C: float,
    *,
    max_iter: int = 2000,
    tol: float = 1e-5,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Float[torch.Tensor, "b k d"], Float[torch.Tensor, "b k"]]:
    """Minimise, independently for each of the ``b`` feature sets, C * sum_i CE(x_i W^T + c, t_i) + ||W||^2 / 2.

    That is sklearn's multinomial ``LogisticRegression`` objective (the intercept is not penalised). The ``b``
    problems share no parameters, so the sum of their objectives has each one's minimiser as its own: one L-BFGS
    run (strong-Wolfe line search, float64) can fit them together, though separate warm-started runs converge
    faster on residual features. ``tol`` bounds the largest gradient entry of the objective divided by n.
    """
    if X.ndim != 3:
        raise ValueError(f"X must be [b, n, d], got shape {tuple(X.shape)}")
    b, n, d = X.shape
    if target.shape != (n,):
        raise ValueError(f"target must be [n] = [{n}], got shape {tuple(target.shape)}")
    X = X.double()
    onehot = torch.nn.functional.one_hot(target.long(), k).double()
    params = torch.zeros(b, d + 1, k, dtype=torch.float64)
    if init is not None:  # warm start (coef [b, k, d], intercept [b, k]), e.g. from the neighbouring layer
        params[:, :d] = init[0].double().transpose(1, 2)
        params[:, d] = init[1].double()
    params.requires_grad_(True)
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=tol,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        W, c = params[:, :d], params[:, d]
        logits = X @ W + c[:, None, :]
        loss = (torch.logsumexp(logits, -1) - (logits * onehot).sum(-1)).sum() / n
        loss = loss + W.square().sum() / (2 * C * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W = params.detach()
    return W[:, :d].transpose(1, 2).contiguous(), W[:, d].contiguous()


class LogisticProbe:
    """Multinomial logistic regression of a class label (the count) on standardised features.

    C: inverse L2 strength (sklearn's convention), or None to choose from ``Cs`` by validation accuracy (ties go to
    the smaller C, the stronger penalty). The objective is sklearn's ``LogisticRegression`` (multinomial, L2 on the
    weights, intercept free), minimised by :func:`fit_softmax_regression`; ``coef`` [k, d], ``intercept`` [k],
    ``classes`` [k], ``mean`` and ``std`` are float64 tensors, and predictions are computed from them in torch.
    """

    probe_type: ClassVar[str] = "logistic"

    def __init__(
        self,
        *,
        C: float | None = None,
        Cs: Sequence[float] = CS,
        val_fraction: float = 0.2,
        seed: int = 0,
        max_iter: int = 2000,
    ):
        self.Cs = _check_grid("Cs", Cs)
        self.fixed_C = None if C is None else _check_grid("C", [C])[0]
        self.val_fraction = _check_fraction(val_fraction)
        self.seed = _check_seed(seed)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        self.max_iter = max_iter
        self.C: float | None = None
        self.C_scores: dict[float, float] = {}
        self.coef: torch.Tensor | None = None
        self.intercept: torch.Tensor | None = None
        self.classes: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.n_train: int | None = None

    def __repr__(self) -> str:
        if self.coef is None:
            return "LogisticProbe(unfitted)"
        return f"LogisticProbe(d={self.coef.shape[1]}, classes={self.classes.tolist()}, C={self.C:g})"

    @staticmethod
    def _labels(y, n: int) -> torch.Tensor:
        y = _target(y, n)
        if not torch.equal(y, y.round()):
            raise ValueError("LogisticProbe needs integer class labels (the counts), got non-integer values")
        return y.long()

    def _solve(self, Xs: torch.Tensor, y: torch.Tensor, C: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes, coef [k, d], intercept [k]) of the L2 multinomial fit on standardised ``Xs``."""
        classes, target = torch.unique(y, return_inverse=True)
        coef, icpt = fit_softmax_regression(Xs[None], target, len(classes), C, max_iter=self.max_iter)
        return classes, coef[0], icpt[0]

    def fit(self, X: Float[Array, "n d"], y: Int[Array, " n"]) -> LogisticProbe:
        X = _features(X)
        y = self._labels(y, X.shape[0])
        classes = torch.unique(y)
        if len(classes) < 2:
            raise ValueError(f"y has a single class {classes.tolist()}; a classifier needs at least two")
        if self.fixed_C is not None:
            chosen = self.fixed_C
            self.C_scores = {}
        else:
            fit_idx, val_idx = _val_split(X.shape[0], self.val_fraction, self.seed)
            if len(torch.unique(y[fit_idx])) < 2:
                raise ValueError("the training part of the validation split has a single class; give more data")
            mean, std = standardise_stats(X[fit_idx])
            scores = {}
            for C in self.Cs:
                classes, coef, icpt = self._solve((X[fit_idx] - mean) / std, y[fit_idx], C)
                pred = classes[(((X[val_idx] - mean) / std) @ coef.T + icpt).argmax(-1)]
                scores[C] = float((pred == y[val_idx]).double().mean())
            self.C_scores = scores
            chosen = max(self.Cs, key=lambda c: (scores[c], -c))  # ties -> smaller C (stronger penalty)
        self.mean, self.std = standardise_stats(X)
        self.classes, self.coef, self.intercept = self._solve((X - self.mean) / self.std, y, chosen)
        self.C = chosen
        self.n_train = int(X.shape[0])
        return self

    def _check_fitted(self) -> None:
        if self.coef is None:
            raise ValueError("this LogisticProbe is not fitted; call fit(X, y) or load_probe(folder) first")

    def logits(self, X: Float[Array, "n d"]) -> Float[torch.Tensor, "n k"]:
        self._check_fitted()
        X = _features(X)
        if X.shape[1] != self.coef.shape[1]:
            raise ValueError(f"X has {X.shape[1]} features, the probe was fitted on {self.coef.shape[1]}")
        return ((X - self.mean) / self.std) @ self.coef.T + self.intercept

    def predict_proba(self, X: Float[Array, "n d"]) -> Float[torch.Tensor, "n k"]:
        return torch.softmax(self.logits(X), dim=-1)

    def predict(self, X: Float[Array, "n d"]) -> Int[torch.Tensor, " n"]:
        return self.classes[self.logits(X).argmax(-1)]

    def accuracy(self, X: Float[Array, "n d"], y: Int[Array, " n"]) -> float:
        pred = self.predict(X)
        return float((pred == self._labels(y, len(pred))).double().mean())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {"coef": self.coef, "intercept": self.intercept, "classes": self.classes, "mean": self.mean,
                "std": self.std}

    def hyperparams(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "C": self.C,
            "Cs": list(self.Cs),
            "fixed_C": self.fixed_C,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "max_iter": self.max_iter,
            "C_scores": {repr(c): s for c, s in self.C_scores.items()},
            "n_train": self.n_train,
            "solver": "torch L-BFGS (strong Wolfe), multinomial, L2 on weights only, float64",
            "standardise": "train mean / population std",
        }

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], hyper: Mapping[str, Any]) -> LogisticProbe:
        probe = cls(C=hyper["fixed_C"], Cs=hyper["Cs"], val_fraction=hyper["val_fraction"], seed=hyper["seed"],
                    max_iter=hyper["max_iter"])
        for name in ("coef", "intercept", "classes", "mean", "std"):
            setattr(probe, name, tensors[name])
        probe.C = float(hyper["C"])
        probe.C_scores = {float(c): float(s) for c, s in hyper.get("C_scores", {}).items()}
        probe.n_train = hyper.get("n_train")
        return probe


PROBE_TYPES: dict[str, type] = {}


def register_probe_type(cls: type) -> type:
    """Make ``cls`` loadable by :func:`load_probe` under ``cls.probe_type`` (usable as a decorator)."""
    for attr in ("probe_type", "state_tensors", "hyperparams", "from_state"):
        if not hasattr(cls, attr):
            raise ValueError(f"{cls.__name__} cannot be registered: it lacks {attr!r}")
    PROBE_TYPES[cls.probe_type] = cls
    return cls


register_probe_type(RidgeProbe)
register_probe_type(LogisticProbe)


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
    feats = {layer: _features(X, f"features[{layer!r}]") for layer, X in features.items()}
    ns = {layer: X.shape[0] for layer, X in feats.items()}
    if len(set(ns.values())) != 1:
        raise ValueError(f"every layer must have the same number of rows; got {ns}")
    n = next(iter(ns.values()))
    y_t = _target(y, n)
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
    feats = [_features(features[layer], f"features[{layer!r}]") for layer in layers]
    n = feats[0].shape[0]
    if any(X.shape != feats[0].shape for X in feats):
        raise ValueError(f"every layer must have the same [n, d] shape; got {[tuple(X.shape) for X in feats]}")
    yt = LogisticProbe._labels(y, n)
    tr, te = _indices("train_idx", train_idx, n), _indices("test_idx", test_idx, n)
    if np.intersect1d(tr, te).size:
        raise ValueError("train_idx and test_idx overlap; evaluation rows must never be trained on")
    C = _check_grid("C", [C])[0]
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


# -- features from a model -------------------------------------------------------------------------------------
def _check_layers(layers, n_layers: int) -> list[int]:
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    if layers is None:
        return list(range(n_layers + 1))
    try:
        layers = list(layers)
    except TypeError:
        raise ValueError(f"layers must be an int, a list of ints or None (all), got {layers!r}") from None
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, (int, np.integer))
           or not -(n_layers + 1) <= l <= n_layers]
    if not layers or bad:
        raise ValueError(f"layers {bad or '(empty)'} not allowed: layers are ints in 0..{n_layers} (0 = embedding "
                         f"output, {n_layers} = last block; negative counts from the end)")
    return list(dict.fromkeys(int(l) % (n_layers + 1) for l in layers))


def _position_lists(positions, n: int) -> list[list[int]] | None:
    """None for "last"; else one non-empty list of ints per prompt."""
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(f"positions must be 'last', an int, or one list of token positions per prompt; "
                             f"got {positions!r}")
        return None
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        return [[int(positions)]] * n
    if not isinstance(positions, Sequence) or len(positions) != n:
        got = len(positions) if isinstance(positions, Sequence) else type(positions).__name__
        raise ValueError(f"positions must be 'last', an int, or one list of token positions per prompt ({n} lists); "
                         f"got {got}")
    out = []
    for i, p in enumerate(positions):
        plist = [p] if isinstance(p, (int, np.integer)) and not isinstance(p, bool) else p
        if (not isinstance(plist, (Sequence, np.ndarray)) or len(plist) == 0
                or not all(isinstance(q, (int, np.integer)) and not isinstance(q, bool) for q in plist)):
            raise ValueError(f"positions[{i}] must be a non-empty list of int token positions, got {p!r}")
        out.append([int(q) for q in plist])
    return out


@torch.no_grad()
def residual_features(
    model,
    prompts: Sequence[str],
    layers: int | Sequence[int] | None,
    *,
    positions: Literal["last"] | int | Sequence[Sequence[int]] = "last",
    batch_size: int = 64,
) -> dict[int, Float[torch.Tensor, "n d"]]:
    """Residual-stream features {layer: [n, d_model] float32 CPU tensor} of ``prompts``.

    layers: hidden-state indices 0..L (0 = embedding output, l = after block l-1; None = all; negative from the
        end). positions: "last" (the last real token), an int (that position in every prompt; negative from its
        end), or one list of token positions per prompt, averaged (e.g. the entity mentions from
        :meth:`workbench.tasks.TaskSet.mention_token_positions`). Positions index the unpadded tokenised prompt,
        special tokens included. The forward stops after the deepest requested layer; prompts are batched by
        length (the rows come back in the order of ``prompts``).
    """
    return residual_features_many(model, prompts, layers, {"features": positions}, batch_size=batch_size)["features"]


@torch.no_grad()
def residual_features_many(
    model,
    prompts: Sequence[str],
    layers: int | Sequence[int] | None,
    positions: Mapping[str, Literal["last"] | int | Sequence[Sequence[int]]],
    *,
    batch_size: int = 64,
) -> dict[str, dict[int, Float[torch.Tensor, "n d"]]]:
    """:func:`residual_features` for several position specs from ONE forward per batch: {name: {layer: [n, d]}}.

    E.g. ``{"last_token": "last", "mention_mean": mentions}`` gives both probe variants of the entity task at the
    cost of one pass.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    layer_list = _check_layers(layers, model.n_layers)
    batches = feature_batches(model, prompts, layer_list, positions, batch_size=batch_size)
    n, d = len(prompts), model.d_model
    out = {name: {layer: torch.empty(n, d) for layer in layer_list} for name in positions}
    for batch, _, values, _ in batches:
        rows_t = torch.as_tensor(batch)
        for name, by_layer in values.items():
            for layer, value in by_layer.items():
                out[name][layer][rows_t] = value.to("cpu", torch.float32)
    return out


def feature_batches(
    model,
    prompts: Sequence[str],
    layers: Sequence[int],
    positions: Mapping[str, Literal["last"] | int | Sequence[Sequence[int]]],
    *,
    batch_size: int = 64,
    keep_cache: bool = False,
):
    """The forward passes behind :func:`residual_features_many`, one length batch at a time.

    Yields ``(indices, enc, {name: {layer: [B, d]}}, cache)``: the prompt indices of the batch, its left-padded
    encoding, the features of each position spec (in the model's dtype and device), and with ``keep_cache`` the
    batch's key/value cache of every prompt token (``None`` otherwise) so that generation can go on from it without
    running the prompt again. The forward stops after the last requested layer unless the cache is kept.
    """
    from workbench.evaluation import length_batches

    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(positions, Mapping) or not positions:
        raise ValueError("positions must be a non-empty dict {name: position spec}")
    layer_list = _check_layers(layers, model.n_layers)
    specs = {name: _position_lists(spec, len(prompts)) for name, spec in positions.items()}
    sites = {layer: layer_site(layer) for layer in layer_list}
    batches = length_batches(model, prompts, batch_size)
    return _feature_batch_iter(model, prompts, batches, sites, specs, keep_cache)  # checked above, run lazily


@torch.no_grad()
def _feature_batch_iter(model, prompts, batches, sites, specs, keep_cache):
    for batch in batches:
        enc = model.encode([prompts[i] for i in batch])
        lengths = enc["attention_mask"].sum(-1).cpu()
        T = enc["input_ids"].shape[1]
        # One index tensor for all specs: each spec's positions (padded with a duplicate, masked) side by side.
        index_parts, masks = [], {}
        col = 0
        for name, plists in specs.items():
            if plists is None:
                index_parts.append(torch.full((len(batch), 1), T - 1, dtype=torch.long))
                masks[name] = (col, torch.ones(len(batch), 1, dtype=torch.bool))
                col += 1
                continue
            rows = [plists[i] for i in batch]
            k = max(len(r) for r in rows)
            index = torch.empty(len(batch), k, dtype=torch.long)
            mask = torch.zeros(len(batch), k, dtype=torch.bool)
            for b, r in enumerate(rows):
                Lb = int(lengths[b])
                pos = [q + Lb if q < 0 else q for q in r]
                if any(not 0 <= q < Lb for q in pos):
                    raise ValueError(f"prompt {int(batch[b])}: positions {r} fall outside its {Lb} tokens "
                                     f"(0..{Lb - 1})")
                pos = pos + [pos[0]] * (k - len(pos))  # pad with a duplicate, masked out below
                index[b] = torch.tensor(pos) + (T - Lb)
                mask[b, : len(r)] = True
            index_parts.append(index)
            masks[name] = (col, mask)
            col += k
        index = torch.cat(index_parts, dim=1)
        cache = None
        with trace(model, list(sites.values()), positions=index.to(enc["input_ids"].device),
                   stop=not keep_cache) as tr:
            if keep_cache:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.hf.config)
                cache.activate_past_recording()  # sliding-window layers keep every position, so crop() can cut one
                model.hf(**enc, past_key_values=cache, use_cache=True, logits_to_keep=1)
            else:
                model.hf(**enc)
        values: dict[str, dict[int, torch.Tensor]] = {name: {} for name in specs}
        for layer, site in sites.items():
            h = tr[site]  # [B, K, d]
            for name, (c0, mask) in masks.items():
                part = h[:, c0 : c0 + mask.shape[1]]
                if specs[name] is None:
                    values[name][layer] = part[:, 0]
                else:
                    m = mask[..., None].to(h.device, h.dtype)
                    values[name][layer] = (part * m).sum(1) / m.sum(1)
        yield batch, enc, values, cache


# -- artifacts -------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "numpy", "scikit-learn", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    import workbench

    out["workbench"] = workbench.__version__
    return out


def _safe_name(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(part)).strip("._") or "_"


def probe_dir(model: str, task: str, site_or_layer: str | int, root: str | Path = ".") -> Path:
    """The default folder ``<root>/probes/<model>/<task>/<site or layer_NN>/`` (names made path-safe)."""
    name = f"layer_{site_or_layer:02d}" if isinstance(site_or_layer, int) else _safe_name(site_or_layer)
    return Path(root) / "probes" / _safe_name(model) / _safe_name(task) / name


def _model_card(model) -> dict[str, Any]:
    if isinstance(model, Mapping):
        missing = [k for k in ("name", "weights_hash") if k not in model]
        if missing:
            raise ValueError(f"model mapping lacks {missing}; give a workbench Model or {{'name', 'weights_hash'}}")
        return dict(model)
    if not hasattr(model, "name") or not hasattr(model, "weights_hash"):
        raise ValueError(f"model must be a workbench Model or a mapping with name and weights_hash, got "
                         f"{type(model).__name__}")
    card = {"name": model.name, "weights_hash": model.weights_hash}
    arch = getattr(model, "arch", None)
    if arch is not None:
        card.update(family=arch.family, tied_head=arch.tied, n_layers=arch.n_layers, d_model=arch.d_model,
                    vocab_size=arch.vocab_size)
    source = getattr(model, "source", None) or {}
    for key in ("registry", "hub_id", "source_sha256"):
        if source.get(key):
            card[key] = source[key]
    return card


def _json_safe(obj):
    """Round-trip through JSON now, so a value the card cannot hold fails before anything is written."""
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, (np.ndarray, torch.Tensor)):
            return o.tolist()
        if isinstance(o, (set, frozenset, tuple)):
            return list(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    try:
        return json.loads(json.dumps(obj, default=default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"card fields must be JSON-serialisable: {e}") from e


def save_probe(
    probe,
    folder: str | Path,
    *,
    model,
    site: str,
    layer: int | None,
    task: str,
    generator_params: Mapping[str, Any] | None,
    seed: int | None,
    metrics: Mapping[str, Any],
) -> Path:
    """Write ``folder/probe.safetensors`` then ``folder/card.json``, each atomically; return the folder.

    model: the :class:`workbench.Model` the features came from (its name, weights hash, family, tied head), or a
    mapping with at least ``name`` and ``weights_hash``. The card records the sha256 of the tensors file; it is
    written last, so a crash between the two writes leaves a card whose hash does not match, which
    :func:`load_probe` refuses rather than mixing old and new.
    """
    from safetensors.torch import save

    if type(probe).probe_type not in PROBE_TYPES or PROBE_TYPES[type(probe).probe_type] is not type(probe):
        raise ValueError(f"probe type {type(probe).__name__} is not registered; registered: {sorted(PROBE_TYPES)}")
    if not isinstance(site, str) or not site:
        raise ValueError(f"site must be a non-empty site name, got {site!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"layer must be a non-negative int or None, got {layer!r}")
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in probe.state_tensors().items()}
    card = _json_safe({
        "format": CARD_FORMAT,
        "probe_type": probe.probe_type,
        "hyperparams": probe.hyperparams(),
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()
        },
        "model": _model_card(model),
        "site": site,
        "layer": layer,
        "task": task,
        "generator_params": dict(generator_params) if generator_params is not None else None,
        "seed": seed,
        "metrics": dict(metrics),
        "versions": _versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    data = save(tensors, metadata={"probe_type": probe.probe_type, "format": "pt"})
    card["weights_file"] = PROBE_WEIGHTS_FILE
    card["weights_sha256"] = hashlib.sha256(data).hexdigest()
    folder = Path(folder)
    atomic_write_bytes(folder / PROBE_WEIGHTS_FILE, data)
    atomic_write_json(folder / PROBE_CARD_FILE, card)
    return folder


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card of a saved probe (no hash check; :func:`load_probe` checks)."""
    path = Path(folder) / PROBE_CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no probe card {PROBE_CARD_FILE} in {folder}")
    return json.loads(path.read_text())


def load_probe(folder: str | Path):
    """Load a probe saved by :func:`save_probe`; the card is attached as ``probe.card``.

    Recomputes the sha256 of the tensors file and raises ValueError (naming both hashes) when it differs from the
    card's; the card's ``probe_type`` picks the class from :data:`PROBE_TYPES`.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    card = read_card(folder)
    weights = folder / card.get("weights_file", PROBE_WEIGHTS_FILE)
    if not weights.is_file():
        raise FileNotFoundError(f"probe card in {folder} names {weights.name}, which does not exist")
    expected = card.get("weights_sha256")
    actual = sha256_file(weights)
    if actual != expected:
        raise ValueError(f"refusing probe in {folder}: {weights.name} has sha256 {actual} but the card records "
                         f"{expected}; the weights were changed or the card belongs to other weights")
    ptype = card.get("probe_type")
    if ptype not in PROBE_TYPES:
        raise ValueError(f"probe card in {folder} has probe_type {ptype!r}; known types: {sorted(PROBE_TYPES)}")
    tensors = load_file(str(weights))
    declared = set(card.get("tensors", {}))
    if declared and declared != set(tensors):
        raise ValueError(f"{weights.name} holds tensors {sorted(tensors)} but the card lists {sorted(declared)}")
    probe = PROBE_TYPES[ptype].from_state(tensors, card["hyperparams"])
    probe.card = card
    return probe
