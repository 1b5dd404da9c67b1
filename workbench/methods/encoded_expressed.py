"""Encoded vs expressed: per layer (or latent step), does the model *have* the answer, and does its output *say* it?

All three research threads ask where information the model holds fails to reach its output. The gap panel puts the
measurements that answer it side by side, for any task with a known answer among a few candidate tokens:

- ``probe_acc``: a logistic probe of the answer class on the residual at that layer (held-out accuracy; ``chance``
  is the majority class share of the held-out rows): what is *encoded*;
- ``lens_acc``: the logit lens of the same residual, argmax over the candidate tokens; ``lens_top1``: the gold token
  is the lens's argmax over the whole vocabulary: what is *expressed*;
- ``tuned_acc`` / ``tuned_top1``: the same through a tuned lens (columns absent when none is given);
- ``probe_cos``: |cos| between each class's probe direction and the class's unembedding row, both as contrasts
  (minus their mean over the classes, which is what decides an argmax among them), averaged over the classes;
  ``cos_random`` is the expected |cos| of a random direction, sqrt(2 / (pi d));
- ``probe_acc_lo`` / ``_hi``, ``lens_acc_lo`` / ``_hi``: 95 % intervals over the held-out rows (Wilson, or the
  bootstrap over distinct units when ``GapTask.groups`` repeats a key), with ``n_test`` rows of ``n_units``
  distinct units; ``probe_max_p``: the best slice's probe against the maximum over all slices of the same
  probes scored on permuted held-out labels (the p of "the best layer reads the answer above chance", corrected for
  picking it among the slices), and ``probe_max_threshold``, the accuracy a best slice must beat;
- ``patch_recovery``: how much of the answer comes back when that layer's residual at the readout position is
  patched from a run where the model answers right (:func:`workbench.methods.patching.residual_patching`;
  ``patch_method`` "exact"), or its first-order estimate where no such run exists (``"atp"``). Computed by the
  caller, merged by axis value.

The input is a :class:`GapTask`: features ``[slices, n, d]`` (slices = hidden-state layers 0..L, or latent steps),
class labels, the candidate token of each class and a train/test split. :func:`gap_panel` returns one tidy frame;
:func:`workbench.plotting.curves.gap_figure` draws it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.core.models import Model
from workbench.methods.probes.base import standardise_stats
from workbench.methods.probes.linear import RidgeProbe, fit_softmax_regression
from workbench.methods.stats import accuracy_ci, max_null_p, permute_within_units
from workbench.methods.tuned_lens import TunedLens

AXES = ("layer", "step")


def random_baseline(d: int) -> float:
    """Expected |cos| between a uniformly random direction and a fixed vector in d dimensions, sqrt(2 / (π d)).

    (The exact value is Γ(d/2) / (√π Γ((d+1)/2)); the two agree to 1/(4d) relative.)
    """
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    return math.sqrt(2.0 / (math.pi * d))


@dataclass
class GapTask:
    """One task's features and answers, ready for :func:`gap_panel`.

    features: [slices, n, d] residuals at the readout position (float, any device; read on the model's device).
    labels: [n] class index of each row's answer (0..len(classes)-1).
    classes: the answer text of each class; candidate_ids: its token id (what the lens and the head must say).
    train_idx / test_idx: disjoint rows: probes train on the first, everything is scored on the second.
    axis: "layer" (slice s is hidden-state layer axis_values[s]) or "step" (latent step axis_values[s]).
    read_layers: the hidden-state layer each slice is read at by the (tuned) lens; default: axis_values for the
        layer axis (a step axis must say which layer its states come from).
    patching: optional frame with columns ``index`` (an axis value), ``patch_recovery``, ``patch_method``,
        ``n_pairs``: merged into the panel.
    labels_extra: constant columns added to every row (thread, model, variant, ...).
    """

    name: str
    features: torch.Tensor
    labels: np.ndarray
    classes: list[str]
    candidate_ids: list[int]
    train_idx: np.ndarray
    test_idx: np.ndarray
    axis: str = "layer"
    axis_values: list[int] | None = None
    read_layers: list[int] | None = None
    patching: pd.DataFrame | None = None
    labels_extra: dict = field(default_factory=dict)
    groups: Sequence | None = None  # one unit key per row (e.g. the prompt): identical rows are one unit in intervals

    def __post_init__(self):
        if self.axis not in AXES:
            raise ValueError(f"axis must be one of {list(AXES)}, got {self.axis!r}")
        if not isinstance(self.features, torch.Tensor) or self.features.ndim != 3:
            raise ValueError(f"features must be a [slices, n, d] tensor, got "
                             f"{getattr(self.features, 'shape', type(self.features).__name__)}")
        S, n, _ = self.features.shape
        self.labels = np.asarray(self.labels)
        if self.labels.shape != (n,) or not np.issubdtype(self.labels.dtype, np.integer):
            raise ValueError(f"labels must be {n} integer class indices, got shape {self.labels.shape} "
                             f"dtype {self.labels.dtype}")
        if len(self.classes) != len(self.candidate_ids) or len(self.classes) < 2:
            raise ValueError(f"give one candidate token per class and at least two classes; got {len(self.classes)} "
                             f"classes and {len(self.candidate_ids)} candidate ids")
        if len(set(self.candidate_ids)) != len(self.candidate_ids):
            raise ValueError(f"candidate_ids {self.candidate_ids} repeat a token: the classes must be distinct tokens")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}, got {sorted(set(self.labels.tolist()))}")
        self.train_idx, self.test_idx = np.asarray(self.train_idx, int), np.asarray(self.test_idx, int)
        for name, idx in (("train_idx", self.train_idx), ("test_idx", self.test_idx)):
            if idx.ndim != 1 or not len(idx) or idx.min() < 0 or idx.max() >= n:
                raise ValueError(f"{name} must be non-empty row indices in 0..{n - 1}")
        if np.intersect1d(self.train_idx, self.test_idx).size:
            raise ValueError("train_idx and test_idx overlap; the panel scores held-out rows only")
        self.axis_values = list(range(S)) if self.axis_values is None else [int(v) for v in self.axis_values]
        if len(self.axis_values) != S:
            raise ValueError(f"axis_values has {len(self.axis_values)} entries for {S} feature slices")
        if self.read_layers is None:
            if self.axis != "layer":
                raise ValueError("a step axis needs read_layers: the hidden-state layer its states were taken at")
            self.read_layers = list(self.axis_values)
        self.read_layers = [int(v) for v in self.read_layers]
        if len(self.read_layers) != S:
            raise ValueError(f"read_layers has {len(self.read_layers)} entries for {S} feature slices")
        if self.groups is not None:
            self.groups = list(self.groups)
            if len(self.groups) != n:
                raise ValueError(f"groups has {len(self.groups)} keys for {n} rows; give one key per row")
        if self.patching is not None:
            missing = {"index", "patch_recovery", "patch_method", "n_pairs"} - set(self.patching.columns)
            if missing:
                raise ValueError(f"patching frame lacks columns {sorted(missing)}")


def class_cosines(coef_raw: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """|cos| per class between probe weights [k, d] and unembedding rows [k, d], both as contrasts (minus their mean
    over the k classes: adding one vector to every class changes no argmax)."""
    if coef_raw.shape != rows.shape or coef_raw.shape[0] < 2:
        raise ValueError(f"need [k >= 2, d] weights and rows of the same shape, got {tuple(coef_raw.shape)} and "
                         f"{tuple(rows.shape)}")
    w = coef_raw.double() - coef_raw.double().mean(0)
    u = rows.double() - rows.double().mean(0)
    return (torch.nn.functional.cosine_similarity(w, u, dim=-1)).abs()


@torch.no_grad()
def lens_answers(model: Model, H: torch.Tensor, layer: int, candidate_ids: Sequence[int], *,
                 tuned_lens: TunedLens | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The lens's answer for residuals ``H`` [n, d] read at hidden-state ``layer`` (through ``tuned_lens`` when given):
    (class index [n]: argmax over the candidate tokens, token id [n]: argmax over the vocabulary), on the CPU. At the
    last layer the logit lens is the head, so these are the model's own answers."""
    ids = torch.as_tensor(list(candidate_ids))
    classes, tokens = [], []
    for s in range(0, H.shape[0], chunk):
        h = H[s: s + chunk].to(model.head_device, model.dtype)
        z = (tuned_lens.logits(model, h, layer) if tuned_lens is not None else model.lens_logits(h)).float()
        classes.append(z[:, ids.to(z.device)].argmax(-1).cpu())
        tokens.append(z.argmax(-1).cpu())
    return torch.cat(classes), torch.cat(tokens)


def gap_panel(model: Model, task: GapTask, *, tuned_lens: TunedLens | None = None, C: float = 1.0,
              tol: float = 1e-4, progress: bool = False, n_permutations: int = 999, seed: int = 0,
              ridge_round: bool = False) -> pd.DataFrame:
    """One row per slice of ``task`` (see the module docstring for the columns).

    The probes are :class:`~workbench.methods.probes.linear.LogisticProbe`'s objective (multinomial, L2 with inverse
    strength ``C`` on features standardised over the train rows), solved slice by slice, each warm-started from the
    previous slice's solution, to ``tol`` (scikit-learn's default, as :func:`layerwise_logistic`).

    ridge_round: for ordered classes (counts): also ``ridge_round_acc``, the held-out accuracy of a ridge regression
    of the class index (:class:`~workbench.methods.probes.linear.RidgeProbe`, alpha on a grouped validation split)
    rounded to the nearest class, the counting study's "probe-round" reading on the same rows. A single ordinal
    direction needs far fewer examples than a k-way classifier, so the two can differ widely."""
    if not isinstance(task, GapTask):
        raise ValueError(f"task must be a GapTask, got {type(task).__name__}")
    S, n, d = task.features.shape
    if d != model.d_model:
        raise ValueError(f"features have width {d}; {model.name} has d_model {model.d_model}")
    bad = [v for v in task.read_layers if not 0 <= v <= model.n_layers]
    if bad:
        raise ValueError(f"read_layers {bad} outside 0..{model.n_layers} for {model.name}")
    if tuned_lens is not None:
        tuned_lens.check_model(model)
    ids = torch.tensor(task.candidate_ids)
    if int(ids.max()) >= model.W_U.shape[0]:
        raise ValueError(f"candidate id {int(ids.max())} outside the vocabulary of {model.name} ({model.W_U.shape[0]})")
    W_U = model.W_U.detach().to("cpu", torch.float64)
    y = task.labels
    tr, te = task.train_idx, task.test_idx
    gold_te = torch.as_tensor(y[te])
    chance = float(np.bincount(y[te]).max() / len(te))
    present, target = torch.unique(torch.as_tensor(y[tr]), return_inverse=True)
    if len(present) < 2:
        raise ValueError(f"the train rows hold a single class {present.tolist()}; a probe needs at least two")
    y_te = torch.as_tensor(y[te])
    groups_te = None if task.groups is None else [task.groups[i] for i in te]
    rows, prev, preds, lens_right = [], None, [], []
    for s in tqdm(range(S), desc=f"gap panel {task.name}", disable=not progress):
        X = task.features[s].detach().to("cpu", torch.float64)
        mean, std = standardise_stats(X[tr])
        prev = fit_softmax_regression(((X[tr] - mean) / std)[None], target, len(present), C, tol=tol, init=prev)
        coef, icpt = prev[0][0], prev[1][0]
        pred = present[(((X[te] - mean) / std) @ coef.T + icpt).argmax(-1)]
        preds.append(pred.numpy())
        if ridge_round:
            groups_tr = None if task.groups is None else [task.groups[i] for i in tr]
            rp = RidgeProbe().fit(X[tr].numpy(), y[tr].astype(np.float64), groups=groups_tr)
            guess = np.clip(np.rint(np.asarray(rp.predict(X[te].numpy()), dtype=np.float64)), 0, len(task.classes) - 1)
            ridge_row = {"ridge_round_acc": float((guess == y[te]).mean())}
        else:
            ridge_row = {}
        row = {"task": task.name, "axis": task.axis, "index": task.axis_values[s], "read_layer": task.read_layers[s],
               "depth": task.read_layers[s] / model.n_layers if task.axis == "layer" else math.nan,
               "probe_acc": float((pred == y_te).double().mean()), "chance": chance} | ridge_row
        # the weights on raw residual coordinates, against the unembedding rows of the classes the probe knows
        row["probe_cos"] = float(class_cosines(coef / std, W_U[ids[present]]).mean())
        row["cos_random"] = random_baseline(d)
        H = task.features[s][te]
        for prefix, lens in (("lens", None), ("tuned", tuned_lens)):
            if prefix == "lens" or lens is not None:
                cls, tok = lens_answers(model, H, task.read_layers[s], task.candidate_ids, tuned_lens=lens)
                row[f"{prefix}_acc"] = float((cls == gold_te).double().mean())
                row[f"{prefix}_top1"] = float((tok == ids[gold_te]).double().mean())
                if prefix == "lens":
                    lens_right.append((cls == gold_te).numpy())
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame = frame.join(pd.DataFrame(_interval_columns(preds, lens_right, y[te], groups_te, n_permutations, seed)))
    if task.patching is not None:
        frame = frame.merge(task.patching[["index", "patch_recovery", "patch_method", "n_pairs"]], on="index",
                            how="left")
    for k, v in reversed(list(task.labels_extra.items())):
        frame.insert(0, k, v)
    return frame


def _interval_columns(preds, lens_right, y_te, groups, n_permutations: int, seed: int) -> list[dict]:
    """Per slice: intervals of the probe and lens accuracies; for every slice the max-over-slices permutation p of
    the best probe (the same permuted labels score every slice, so their dependence is kept)."""
    P = np.stack(preds)  # [S, n_te]
    right = P == y_te[None]
    out = []
    for s in range(len(P)):
        pi = accuracy_ci(right[s].astype(int), groups=groups, seed=seed)
        li = accuracy_ci(lens_right[s].astype(int), groups=groups, seed=seed)
        out.append({"n_test": len(y_te), "n_units": len(set(groups)) if groups is not None else len(y_te),
                    "probe_acc_lo": pi.lo, "probe_acc_hi": pi.hi, "lens_acc_lo": li.lo, "lens_acc_hi": li.hi})
    if n_permutations:
        null = np.stack([(P == permute_within_units(y_te, groups, seed=seed + 1 + i)[None]).mean(1)
                         for i in range(n_permutations)])  # [n_perm, S]
        mx = max_null_p(right.mean(1), null)
        for row in out:
            row |= {"probe_max_p": mx.p, "probe_max_threshold": mx.threshold}
    return out


# -- patching the readout position ---------------------------------------------------------------------------------
def make_pairs(labels: Sequence[int], right: Sequence[bool], *, n_pairs: int, seed: int = 0,
               require_right: bool = True) -> list[tuple[int, int]]:
    """(clean, corrupt) row pairs with different labels: the clean row is one the model answers right (unless
    ``require_right`` is False), each corrupt row is drawn among the rows of another class; at most ``n_pairs``."""
    labels, right = np.asarray(labels), np.asarray(right, bool)
    if labels.shape != right.shape:
        raise ValueError(f"labels {labels.shape} and right {right.shape} differ in shape")
    rng = np.random.default_rng(seed)
    clean_pool = np.flatnonzero(right) if require_right else np.arange(len(labels))
    clean_pool = rng.permutation(clean_pool)
    pairs = []
    for c in clean_pool:
        others = np.flatnonzero(labels != labels[c])
        if not len(others):
            continue
        pairs.append((int(c), int(rng.choice(others))))
        if len(pairs) >= n_pairs:
            break
    return pairs
