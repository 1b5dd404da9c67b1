"""Linear probes (research thread 1, methods.md): the count is *linearly decodable* from intermediate layers.

- :class:`RidgeProbe`: closed-form ridge regression of the scalar count, on standardised features with an
  unpenalised intercept; alpha picked from {1e-3 ... 1e3} by R² on a seeded 20 % validation split of the training
  data, then refitted on all of it. One SVD per fit evaluates every alpha. ``direction_raw`` maps the weights back to
  raw residual coordinates (w / sigma), the direction the geometry of :mod:`workbench.studies.counting_readout.geometry` is measured on.
- :class:`LogisticProbe`: multinomial logistic classification of the count (scikit-learn's objective, solved by
  L-BFGS in torch; tests compare with scikit-learn).

Both implement :class:`workbench.methods.probes.base.Probe` (fit, predict, score, save, load).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float, Int

from workbench.methods.probes.base import (
    Array,
    Probe,
    as_features,
    as_target,
    check_fraction,
    check_grid,
    check_seed,
    probe_round_accuracy,
    r2_score,
    register_probe_type,
    standardise_stats,
    val_split,
)

ALPHAS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
CS: tuple[float, ...] = (1e-2, 1e-1, 1.0, 1e1)


def _ridge_path(
    Xs: Float[torch.Tensor, "n d"], yc: Float[torch.Tensor, " n"], alphas: Sequence[float]
) -> Float[torch.Tensor, "a d"]:
    """Ridge weights min ||yc - Xs w||² + alpha ||w||² for every alpha, from one thin SVD (primal or dual alike)."""
    U, S, Vh = torch.linalg.svd(Xs, full_matrices=False)
    Uty = U.T @ yc
    a = torch.tensor(alphas, dtype=torch.float64)[:, None]
    return ((S / (S**2 + a)) * Uty) @ Vh  # [a, d]


def _check_groups(groups, n: int):
    if groups is None:
        return None
    keys = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    if len(keys) != n:
        raise ValueError(f"groups has {len(keys)} keys for {n} rows of X; give one key per row")
    return keys


# -- ridge -----------------------------------------------------------------------------------------------------
@register_probe_type
class RidgeProbe(Probe):
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
        self.alphas = check_grid("alphas", alphas)
        if alpha is not None:
            alpha = check_grid("alpha", [alpha])[0]
        self.fixed_alpha = alpha
        self.val_fraction = check_fraction(val_fraction)
        self.seed = check_seed(seed)
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
    def fit(self, X: Float[Array, "n d"], y: Float[Array, " n"], groups=None) -> RidgeProbe:
        """Fit; alpha on a validation split of these rows that keeps rows with the same ``groups`` key (e.g. the
        prompt text) on one side, so a repeated prompt cannot choose its own alpha."""
        X = as_features(X)
        y = as_target(y, X.shape[0])
        if float(y.std()) == 0.0:
            raise ValueError(f"y is constant ({float(y[0])}); a probe needs at least two different target values")
        if self.fixed_alpha is not None:
            chosen = self.fixed_alpha
            self.alpha_scores = {}
        else:
            fit_idx, val_idx = val_split(X.shape[0], self.val_fraction, self.seed, _check_groups(groups, X.shape[0]))
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
        X = as_features(X)
        if X.shape[1] != self.coef_std.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features, the probe was fitted on {self.coef_std.shape[0]}")
        return ((X - self.mean) / self.std) @ self.coef_std + self.intercept

    def r2(self, X: Float[Array, "n d"], y: Float[Array, " n"]) -> float:
        return r2_score(self.predict(X), y)

    def score(self, X: Float[Array, "n d"], y: Float[Array, " n"]) -> float:
        """R² on ``(X, y)`` (the :class:`~workbench.methods.probes.base.Probe` score of a regressor)."""
        return self.r2(X, y)

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
    onehot = torch.nn.functional.one_hot(target.long().to(X.device), k).double()
    params = torch.zeros(b, d + 1, k, dtype=torch.float64, device=X.device)
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


@register_probe_type
class LogisticProbe(Probe):
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
        self.Cs = check_grid("Cs", Cs)
        self.fixed_C = None if C is None else check_grid("C", [C])[0]
        self.val_fraction = check_fraction(val_fraction)
        self.seed = check_seed(seed)
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
        y = as_target(y, n)
        if not torch.equal(y, y.round()):
            raise ValueError("LogisticProbe needs integer class labels (the counts), got non-integer values")
        return y.long()

    def _solve(self, Xs: torch.Tensor, y: torch.Tensor, C: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes, coef [k, d], intercept [k]) of the L2 multinomial fit on standardised ``Xs``."""
        classes, target = torch.unique(y, return_inverse=True)
        coef, icpt = fit_softmax_regression(Xs[None], target, len(classes), C, max_iter=self.max_iter)
        return classes, coef[0], icpt[0]

    def fit(self, X: Float[Array, "n d"], y: Int[Array, " n"], groups=None) -> LogisticProbe:
        """Fit; C on a validation split that keeps rows with the same ``groups`` key on one side."""
        X = as_features(X)
        y = self._labels(y, X.shape[0])
        classes = torch.unique(y)
        if len(classes) < 2:
            raise ValueError(f"y has a single class {classes.tolist()}; a classifier needs at least two")
        if self.fixed_C is not None:
            chosen = self.fixed_C
            self.C_scores = {}
        else:
            fit_idx, val_idx = val_split(X.shape[0], self.val_fraction, self.seed, _check_groups(groups, X.shape[0]))
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
        X = as_features(X)
        if X.shape[1] != self.coef.shape[1]:
            raise ValueError(f"X has {X.shape[1]} features, the probe was fitted on {self.coef.shape[1]}")
        return ((X - self.mean) / self.std) @ self.coef.T + self.intercept

    def predict_proba(self, X: Float[Array, "n d"]) -> Float[torch.Tensor, "n k"]:
        return torch.softmax(self.logits(X), dim=-1)

    def predict(self, X: Float[Array, "n d"]) -> Int[torch.Tensor, " n"]:
        return self.classes[self.logits(X).argmax(-1)]

    def score(self, X: Float[Array, "n d"], y: Int[Array, " n"]) -> float:
        """Accuracy on ``(X, y)`` (the :class:`~workbench.methods.probes.base.Probe` score of a classifier)."""
        return self.accuracy(X, y)

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



