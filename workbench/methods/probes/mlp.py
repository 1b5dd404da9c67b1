"""A supervised MLP probe (3 layers: d -> h -> h -> classes, ReLU) and its per-layer fit.

Like :class:`~workbench.methods.probes.linear.LogisticProbe` it standardises features with training statistics, is seeded, and
saves through :func:`~workbench.methods.probes.base.save_probe` (safetensors + card; ``load_probe`` picks it by ``probe_type``).
Training: full-batch AdamW on cross-entropy, early stopping on a seeded validation split (the weights of the
best validation loss are kept), float32. The class labels are strings (e.g. colour names) kept in the card.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import nn

from workbench.methods.probes.base import Probe, as_features, register_probe_type, standardise_stats, val_split


@register_probe_type
class MLPProbe(Probe):
    probe_type: ClassVar[str] = "mlp"

    def __init__(self, *, hidden: int = 128, lr: float = 3e-3, weight_decay: float = 1e-2, max_epochs: int = 300,
                 patience: int = 20, val_fraction: float = 0.2, seed: int = 0):
        for name, v, lo in (("hidden", hidden, 1), ("max_epochs", max_epochs, 1), ("patience", patience, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.hidden, self.lr, self.weight_decay = hidden, float(lr), float(weight_decay)
        self.max_epochs, self.patience, self.val_fraction, self.seed = max_epochs, patience, val_fraction, seed
        self.classes: list[str] | None = None
        self.net: nn.Sequential | None = None
        self.mean = self.std = None
        self.best_epoch: int | None = None
        self.n_train: int | None = None

    def __repr__(self) -> str:
        return "MLPProbe(unfitted)" if self.net is None else f"MLPProbe(d={self.mean.shape[0]}, classes={self.classes})"

    def _build(self, d: int, k: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, k))

    def fit(self, X: Float[torch.Tensor, "n d"], y: Sequence[str]) -> MLPProbe:
        X = as_features(X).float()
        labels = [str(v) for v in y]
        if len(labels) != X.shape[0]:
            raise ValueError(f"y has {len(labels)} labels for {X.shape[0]} rows of X")
        self.classes = sorted(set(labels))
        if len(self.classes) < 2:
            raise ValueError(f"y has a single class {self.classes}; a classifier needs at least two")
        target = torch.tensor([self.classes.index(v) for v in labels])
        fit_idx, val_idx = (torch.as_tensor(i) for i in val_split(X.shape[0], self.val_fraction, self.seed))
        self.mean, self.std = (t.float() for t in standardise_stats(X[fit_idx]))
        Xs = (X - self.mean) / self.std
        torch.manual_seed(self.seed)
        net = self._build(X.shape[1], len(self.classes))
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, best_epoch, bad = float("inf"), None, 0, 0
        for epoch in range(self.max_epochs):
            net.train()
            loss = nn.functional.cross_entropy(net(Xs[fit_idx]), target[fit_idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            net.eval()
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(net(Xs[val_idx]), target[val_idx]))
            if val < best - 1e-6:
                best, best_epoch, bad = val, epoch, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= self.patience:
                    break
        net.load_state_dict(best_state)
        self.net, self.best_epoch, self.n_train = net.eval(), best_epoch, int(X.shape[0])
        return self

    def _check(self, X) -> torch.Tensor:
        if self.net is None:
            raise ValueError("this MLPProbe is not fitted; call fit(X, y) or load_probe(folder) first")
        X = as_features(X).float()
        if X.shape[1] != self.mean.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features, the probe was fitted on {self.mean.shape[0]}")
        return X

    def predict_proba(self, X) -> Float[torch.Tensor, "n k"]:
        X = self._check(X)
        with torch.no_grad():
            return torch.softmax(self.net((X - self.mean) / self.std), -1)

    def prob_of(self, X, labels: Sequence[str]) -> np.ndarray:
        """Probability of each row's label (0 for a label the probe never saw)."""
        p = self.predict_proba(X)
        idx = [self.classes.index(v) if v in self.classes else -1 for v in labels]
        return np.array([float(p[i, j]) if j >= 0 else 0.0 for i, j in enumerate(idx)])

    def predict(self, X) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(X).argmax(-1).tolist()]

    def score(self, X, y: Sequence[str]) -> float:
        """Accuracy on ``(X, y)`` (the :class:`~workbench.methods.probes.base.Probe` score of a classifier)."""
        return self.accuracy(X, y)

    def accuracy(self, X, y: Sequence[str]) -> float:
        return float(np.mean([a == str(b) for a, b in zip(self.predict(X), y)]))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check(torch.zeros(1, self.mean.shape[0]))
        return {f"net.{k}": v for k, v in self.net.state_dict().items()} | {"mean": self.mean, "std": self.std}

    def hyperparams(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "lr": self.lr, "weight_decay": self.weight_decay,
                "max_epochs": self.max_epochs, "patience": self.patience, "val_fraction": self.val_fraction,
                "seed": self.seed, "classes": self.classes, "best_epoch": self.best_epoch, "n_train": self.n_train,
                "architecture": "Linear(d,h) ReLU Linear(h,h) ReLU Linear(h,k); full-batch AdamW, early stop"}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], hyper: Mapping[str, Any]) -> MLPProbe:
        probe = cls(hidden=hyper["hidden"], lr=hyper["lr"], weight_decay=hyper["weight_decay"],
                    max_epochs=hyper["max_epochs"], patience=hyper["patience"], val_fraction=hyper["val_fraction"],
                    seed=hyper["seed"])
        probe.classes = list(hyper["classes"])
        probe.mean, probe.std = tensors["mean"], tensors["std"]
        net = probe._build(probe.mean.shape[0], len(probe.classes))
        state = {k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")}
        for k, v in net.state_dict().items():
            if not (state[k].shape == v.shape):
                raise ValueError(f"{k}: saved {tuple(state[k].shape)} vs {tuple(v.shape)}")
        net.load_state_dict(state, strict=True)
        probe.net, probe.best_epoch, probe.n_train = net.eval(), hyper.get("best_epoch"), hyper.get("n_train")
        return probe


@dataclass
class LayerwiseMLP:
    table: pd.DataFrame  # layer, target, accuracy_test, p_target_test, best_epoch
    probes: dict[tuple[str, int], MLPProbe]  # (target name, layer) -> probe


def layerwise_mlp(
    features: Mapping[int, torch.Tensor],
    targets: Mapping[str, Sequence[str]],
    train_idx: Sequence[int],
    test_idx: Sequence[int],
    *,
    seed: int = 0,
    **probe_kwargs,
) -> LayerwiseMLP:
    """Fit one :class:`MLPProbe` per (target, layer) on ``train_idx``; score it on ``test_idx``.

    ``p_target_test`` is the mean probability the probe gives the row's own label of that target on the test rows.
    """
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    if len(np.intersect1d(train_idx, test_idx)):
        raise ValueError("train and test rows overlap: probes must be scored on rows they were not fitted on")
    rows, probes = [], {}
    for name, y in targets.items():
        y = [str(v) for v in y]
        for layer in sorted(features):
            X = features[layer]
            if X.shape[0] != len(y):
                raise ValueError(f"layer {layer}: {X.shape[0]} rows of features for {len(y)} labels of {name!r}")
            probe = MLPProbe(seed=seed, **probe_kwargs).fit(X[train_idx], [y[i] for i in train_idx])
            yt = [y[i] for i in test_idx]
            rows.append({"target": name, "layer": layer, "accuracy_test": probe.accuracy(X[test_idx], yt),
                         "p_target_test": float(probe.prob_of(X[test_idx], yt).mean()),
                         "best_epoch": probe.best_epoch})
            probes[(name, layer)] = probe
    return LayerwiseMLP(pd.DataFrame(rows), probes)
