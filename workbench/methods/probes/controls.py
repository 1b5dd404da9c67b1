"""Controls for count probes: does a probe read the count, or a nuisance that goes with it (results audit D1)?

In the plain counting tasks the count is confounded with prompt length (``list_length``: count = word count;
``entity``: word count explains R² ≈ 0.77), so a high held-out R² alone does not show that a layer "knows the
count". :func:`probe_controls` puts, next to the probe on one layer's features, the comparisons that separate the
two readings:

==================  ============================================================================================
control             what it is
==================  ============================================================================================
probe               :class:`~workbench.methods.probes.linear.RidgeProbe` on the features ``X``, target the count.
control_task        the same probe class, target the Hewitt & Liang (2019) control task
                    (:func:`control_task_labels`): every *type* (by default the value of the first nuisance, e.g.
                    the token count) gets one random label; a probe that scores here reads the type, not the count.
selectivity         probe minus control task (R² and round accuracy); its interval bootstraps the paired difference
                    over test units.
shuffled_labels     the probe fitted on training counts permuted among distinct units
                    (:func:`workbench.methods.stats.permute_within_units`), scored on the true test counts: the
                    chance level of this pipeline (mean over ``n_shuffles`` permutations).
nuisance_baseline   the ridge on :func:`nuisance_design` of the nuisances alone (no activations): what length
                    predicts. A count probe has to beat it.
residual_probe      the ridge on ``X`` with the nuisance design regressed out (:func:`residualize`, fitted on the
                    training rows only): what is left of the count once length is removed (linearly, in the design
                    columns).
==================  ============================================================================================

Every number is scored on the held-out rows; R² is ``1 - SS_res / SS_tot`` around the test mean and round accuracy is
``clip(round(pred), 1, 9) == count`` (as :func:`workbench.methods.probes.base.probe_round_accuracy`). Intervals are
:func:`workbench.methods.stats.bootstrap_ci` over distinct test units (``groups``, e.g. the prompt strings: a repeated
prompt is one unit), BCa with a percentile fallback where BCa is undefined. Each ridge picks its own alpha by
RidgeProbe's validation split of the training rows.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from workbench.methods.probes.base import as_features, check_seed, probe_round_accuracy, r2_score
from workbench.methods.probes.linear import ALPHAS, RidgeProbe
from workbench.methods.stats import N_RESAMPLES, bootstrap_ci, group_codes, permute_within_units

CONTROLS = ("probe", "control_task", "selectivity", "shuffled_labels", "nuisance_baseline", "residual_probe")
COLUMNS = ("control", "r2", "r2_lo", "r2_hi", "round_acc", "round_acc_lo", "round_acc_hi", "n_test_units")
MAX_LEVELS = 30  # an integer-valued nuisance with at most this many levels also enters the design one-hot


# -- the control task ------------------------------------------------------------------------------------------
def control_task_labels(types: Sequence[Hashable] | np.ndarray, labels, *, seed: int) -> np.ndarray:
    """Hewitt & Liang (2019) control task: each distinct type gets one label drawn at random from the empirical
    distribution of ``labels`` (a uniform draw of one item's label, with replacement); items of the same type share
    it. Returns an array [n] of ``labels``' dtype.

    types: one key per item (e.g. the token count of each prompt, or the prompt string). A probe that predicts these
    labels on held-out items can only do so by reading the type from the features, so its score is what the probe's
    architecture gets from the type alone; selectivity = task score - control score.
    """
    y = np.asarray(labels)
    keys = types.tolist() if isinstance(types, np.ndarray) else list(types)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"labels must be a non-empty 1-d array, got shape {y.shape}")
    if len(keys) != len(y):
        raise ValueError(f"types has {len(keys)} entries for {len(y)} labels; give one type per item")
    if any(isinstance(k, float) and k != k for k in keys):
        raise ValueError("types contains NaN; every item needs a type")
    seed = check_seed(seed)
    codes = group_codes(keys)
    k = int(codes.max()) + 1
    drawn = y[np.random.default_rng(seed).integers(0, len(y), size=k)]
    return drawn[codes]


# -- nuisances -------------------------------------------------------------------------------------------------
def _nuisance_columns(nuisances: pd.DataFrame | np.ndarray) -> list[tuple[str, np.ndarray]]:
    if isinstance(nuisances, pd.DataFrame):
        cols = []
        for name in nuisances.columns:
            col = nuisances[name]
            if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
                raise ValueError(f"nuisance column {name!r} is not numeric (dtype {col.dtype}); give numbers")
            cols.append((str(name), col.to_numpy(dtype=np.float64)))
    else:
        arr = np.asarray(nuisances)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise ValueError(f"nuisances must be a DataFrame or an array [n] or [n, k], got shape {arr.shape}")
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"nuisances must be numeric, got dtype {arr.dtype}") from None
        cols = [(f"col{j}", arr[:, j]) for j in range(arr.shape[1])]
    if not cols:
        raise ValueError("nuisances has no columns")
    for name, v in cols:
        if len(v) == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"nuisance column {name!r} is empty or holds NaN / infinite values")
    return cols


def _design(nuisances: pd.DataFrame | np.ndarray) -> tuple[np.ndarray, list[str]]:
    parts: list[np.ndarray] = []
    names: list[str] = []
    cols = _nuisance_columns(nuisances)
    n = len(cols[0][1])
    for name, v in cols:
        sd = float(v.std())
        if sd == 0.0:  # a constant nuisance explains nothing beyond the intercept
            continue
        z = (v - v.mean()) / sd
        parts.append(z)
        names.append(name)
        z2 = z**2
        if float(z2.std()) > 0:
            parts.append(z2)
            names.append(f"{name}^2")
        levels = np.unique(v)
        if np.all(v == np.round(v)) and len(levels) <= MAX_LEVELS:
            for lev in levels:
                parts.append((v == lev).astype(np.float64))
                names.append(f"{name}=={lev:g}")
    design = np.stack(parts, axis=1) if parts else np.zeros((n, 0))
    return design, names


def nuisance_design(nuisances: pd.DataFrame | np.ndarray) -> np.ndarray:
    """The design matrix [n, p] (float64) that nuisances are regressed out with, and the nuisance baseline's input.

    Per nuisance column (a DataFrame's numeric columns, or an array's columns; a 1-d array is one column), in order:
    the column standardised (mean 0, population sd 1 over all rows), its square, and, when every value is an integer
    and it has at most 30 distinct values (:data:`MAX_LEVELS`), one 0/1 indicator per value (all levels: the
    indicators sum to the intercept, which the solvers here tolerate). So a small-range length such as the token
    count is matched as *any* function of its value, a wide one as a quadratic. Constant columns (and constant
    squares) are dropped; no column is left -> shape [n, 0]. No intercept column: :func:`residualize` and the ridge
    add it. The transform sees only the nuisance values, never a label, so building it on all rows leaks nothing.
    """
    return _design(nuisances)[0]


def _as_index(idx, n: int, name: str) -> np.ndarray:
    a = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    if a.dtype == bool:
        if a.shape != (n,):
            raise ValueError(f"{name} as a boolean mask must have shape [{n}], got {a.shape}")
        a = np.flatnonzero(a)
    a = a.reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer row indices or be a boolean mask, got dtype {a.dtype}")
    if a.min() < 0 or a.max() >= n:
        raise ValueError(f"{name} must index rows 0..{n - 1}; got min {a.min()}, max {a.max()}")
    if len(np.unique(a)) != len(a):
        raise ValueError(f"{name} repeats row indices")
    return a.astype(np.int64)


def residualize(X, design, train_idx) -> torch.Tensor:
    """``X`` minus its least-squares projection on ``[1, design]``, the projection fitted on the training rows only.

    X: features [n, d] (tensor or array). design: [n, p] (e.g. :func:`nuisance_design`; p may be 0, leaving only the
    intercept: X minus its training mean). train_idx: training row indices (or a boolean mask). The coefficients
    B = pinv([1, design][train]) @ X[train] (minimum-norm least squares, so collinear design columns are fine) are
    applied to every row: test rows never enter the fit. Computed in float64 on the CPU; returns a tensor of X's
    dtype on X's device.
    """
    out_dtype = X.dtype if isinstance(X, torch.Tensor) else torch.from_numpy(np.asarray(X)[:0]).dtype
    out_device = X.device if isinstance(X, torch.Tensor) else torch.device("cpu")
    Xf = as_features(X)
    n = Xf.shape[0]
    D = design.detach().cpu().numpy() if isinstance(design, torch.Tensor) else np.asarray(design, dtype=np.float64)
    if D.ndim == 1:
        D = D[:, None]
    if D.ndim != 2 or D.shape[0] != n:
        raise ValueError(f"design must have shape [{n}, p] (one row per row of X), got {D.shape}")
    if not np.all(np.isfinite(D)):
        raise ValueError("design contains NaN or infinite values")
    tr = _as_index(train_idx, n, "train_idx")
    full = torch.from_numpy(np.concatenate([np.ones((n, 1)), D.astype(np.float64)], axis=1))
    coef = torch.linalg.pinv(full[tr]) @ Xf[tr]  # [p + 1, d]
    return (Xf - full @ coef).to(device=out_device, dtype=out_dtype)


# -- scoring ---------------------------------------------------------------------------------------------------
def _mean_over_columns(metric: Callable) -> Callable:
    """metric(P[:, k], y) averaged over the columns of P (the shuffles)."""
    return lambda P, y: float(np.mean([metric(P[:, k], y) for k in range(P.shape[1])]))


def _interval(statistic: Callable, arrays: Sequence[np.ndarray], groups: np.ndarray, seed: int,
              n_resamples: int) -> tuple[float, float, float]:
    estimate = float(statistic(*arrays))
    if not np.isfinite(estimate):
        return estimate, float("nan"), float("nan")
    try:
        ci = bootstrap_ci(statistic, *arrays, groups=groups, seed=seed, n_resamples=n_resamples, method="auto")
    except ValueError:  # e.g. resamples with one count only, where R² is undefined: no interval, not a guess
        return estimate, float("nan"), float("nan")
    return ci.estimate, ci.lo, ci.hi


@dataclass
class ProbeControls:
    """The controls of one layer's count probe (see the module docstring); :meth:`to_frame` is the table.

    rows: one dict per control in :data:`CONTROLS` order, with the :data:`COLUMNS`. alpha: the ridge alpha each fit
    chose (shuffled_labels: per shuffle). types_from: where the control task's types came from (``"types"`` or the
    name of the first nuisance column). design_columns: the names of the :func:`nuisance_design` columns.
    """

    rows: list[dict[str, Any]]
    alpha: dict[str, Any] = field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0
    n_test_units: int = 0
    types_from: str = ""
    design_columns: list[str] = field(default_factory=list)
    seed: int = 0
    n_shuffles: int = 0
    control_seed: int | None = None  # the seed of the control-task labels actually used (None: undefined)

    def to_frame(self) -> pd.DataFrame:
        """One row per control: control, r2, r2_lo, r2_hi, round_acc, round_acc_lo, round_acc_hi, n_test_units."""
        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def __getitem__(self, control: str) -> dict[str, Any]:
        for row in self.rows:
            if row["control"] == control:
                return row
        raise KeyError(f"no control {control!r}; controls: {list(CONTROLS)}")


def probe_controls(
    X,
    y,
    nuisances: pd.DataFrame | np.ndarray,
    train_idx,
    test_idx,
    *,
    groups: Sequence[Hashable] | None = None,
    types: Sequence[Hashable] | None = None,
    seed: int = 0,
    n_shuffles: int = 5,
    alphas: Sequence[float] | None = None,
    n_resamples: int = N_RESAMPLES,
) -> ProbeControls:
    """Probe, control task, selectivity, shuffled labels, nuisance baseline and residual probe for one layer.

    X: features [n, d] of every prompt (one layer, e.g. the last-token residual). y: the counts [n]. nuisances:
    per-prompt nuisances [n, k] (e.g. :func:`workbench.data.tasks.nuisance_frame`; the count must not be among them).
    train_idx / test_idx: disjoint row indices (or boolean masks). groups: one unit key per row (the prompt strings):
    units are what the shuffles permute and the bootstrap resamples, and a unit on both sides of the split is an
    error; None: every row is its own unit. types: the control task's types; None: the first nuisance column
    that is not constant (the first column if all are).
    seed: seeds the probes' validation splits, the control labels, the shuffles and the bootstrap. alphas: the
    ridge grid (default :data:`~workbench.methods.probes.linear.ALPHAS`). n_resamples: bootstrap resamples.

    The control task's labels are redrawn (seed + 1, + 2, ...) while they are constant on the training rows; with a
    single type its row and selectivity are NaN. Reading: selectivity is about the *probe*: a layer that encodes the
    count linearly *and* the type in some other code also lets the probe fit the control task, so selectivity can
    be modest while the residual probe stays high; a count probe is length-free when it beats the nuisance baseline
    and the residual probe keeps its R².
    """
    Xf = as_features(X)
    n = Xf.shape[0]
    yv = (y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)).astype(np.float64).reshape(-1)
    if len(yv) != n or not np.all(np.isfinite(yv)):
        raise ValueError(f"y must hold {n} finite values (one count per row of X), got {len(yv)}")
    seed = check_seed(seed)
    if isinstance(n_shuffles, bool) or not isinstance(n_shuffles, (int, np.integer)) or n_shuffles < 1:
        raise ValueError(f"n_shuffles must be an int >= 1, got {n_shuffles!r}")
    grid = ALPHAS if alphas is None else tuple(alphas)
    tr = _as_index(train_idx, n, "train_idx")
    te = _as_index(test_idx, n, "test_idx")
    both = np.intersect1d(tr, te)
    if both.size:
        raise ValueError(f"train_idx and test_idx share {both.size} rows (e.g. {both[:5].tolist()}); give disjoint "
                         "splits")
    units = np.arange(n) if groups is None else group_codes(groups)
    if len(units) != n:
        raise ValueError(f"groups has {len(units)} keys for {n} rows; give one key per row")
    straddle = np.intersect1d(units[tr], units[te])
    if straddle.size:
        raise ValueError(f"{straddle.size} units (groups) have rows in both train and test; split by groups "
                         "(split_indices(..., groups=...)) so that no prompt is both trained on and evaluated")
    design, design_names = _design(nuisances)
    if design.shape[0] != n:
        raise ValueError(f"nuisances has {design.shape[0]} rows for {n} rows of X")
    if types is None:  # the first nuisance that varies (a length-decoupled task holds its word count constant)
        cols = _nuisance_columns(nuisances)
        first_name, first_col = next(((k, v) for k, v in cols if np.unique(v).size > 1), cols[0])
        type_keys: Any = first_col
        types_from = first_name
    else:
        type_keys = types.tolist() if isinstance(types, np.ndarray) else list(types)
        if len(type_keys) != n:
            raise ValueError(f"types has {len(type_keys)} entries for {n} rows; give one type per row")
        types_from = "types"
    y_tr, y_te = yv[tr], yv[te]
    g_te = units[te]
    n_units = len(np.unique(g_te))

    alpha: dict[str, Any] = {}

    def fit_predict(key: str, F: torch.Tensor, target: np.ndarray, fit_seed: int = seed) -> np.ndarray:
        probe = RidgeProbe(alphas=grid, seed=fit_seed).fit(F[tr], target[tr], groups=units[tr])
        alpha[key] = probe.alpha if key != "shuffled_labels" else [*alpha.get(key, []), probe.alpha]
        return probe.predict(F[te]).numpy()

    def row(control: str, statistic_r2: Callable, statistic_acc: Callable, arrays: Sequence[np.ndarray]) -> dict:
        r2, r2_lo, r2_hi = _interval(statistic_r2, arrays, g_te, seed, n_resamples)
        acc, acc_lo, acc_hi = _interval(statistic_acc, arrays, g_te, seed, n_resamples)
        return {"control": control, "r2": r2, "r2_lo": r2_lo, "r2_hi": r2_hi, "round_acc": acc,
                "round_acc_lo": acc_lo, "round_acc_hi": acc_hi, "n_test_units": n_units}

    nan_row = {"r2": np.nan, "r2_lo": np.nan, "r2_hi": np.nan, "round_acc": np.nan, "round_acc_lo": np.nan,
               "round_acc_hi": np.nan, "n_test_units": n_units}
    rows = []

    # the probe
    pred_p = fit_predict("probe", Xf, yv)
    rows.append(row("probe", r2_score, probe_round_accuracy, [pred_p, y_te]))

    # the control task (Hewitt & Liang), and selectivity
    control_seed, y_c = None, None
    for attempt in range(100):
        cand = control_task_labels(type_keys, yv, seed=seed + attempt).astype(np.float64)
        if np.unique(cand[tr]).size > 1:
            control_seed, y_c = seed + attempt, cand
            break
    if y_c is None:
        rows.append({"control": "control_task", **nan_row})
        rows.append({"control": "selectivity", **nan_row})
    else:
        pred_c = fit_predict("control_task", Xf, y_c)
        yc_te = y_c[te]
        rows.append(row("control_task", r2_score, probe_round_accuracy, [pred_c, yc_te]))
        rows.append(row(
            "selectivity",
            lambda p, t, pc, tc: r2_score(p, t) - r2_score(pc, tc),
            lambda p, t, pc, tc: probe_round_accuracy(p, t) - probe_round_accuracy(pc, tc),
            [pred_p, y_te, pred_c, yc_te],
        ))

    # shuffled training labels (permuted among distinct units), scored against the true test counts
    shuffled = []
    for k in range(int(n_shuffles)):
        y_perm = yv.copy()
        y_perm[tr] = permute_within_units(y_tr, units[tr], seed=seed + 1 + k)
        shuffled.append(fit_predict("shuffled_labels", Xf, y_perm, seed))
    P = np.stack(shuffled, axis=1)
    rows.append(row("shuffled_labels", _mean_over_columns(r2_score), _mean_over_columns(probe_round_accuracy),
                    [P, y_te]))

    # the nuisances alone
    if design.shape[1] == 0:
        alpha["nuisance_baseline"] = None
        pred_n = np.full(len(te), y_tr.mean())
    else:
        pred_n = fit_predict("nuisance_baseline", torch.from_numpy(design), yv)
    rows.append(row("nuisance_baseline", r2_score, probe_round_accuracy, [pred_n, y_te]))

    # the features with the nuisances regressed out (fitted on the training rows)
    R = residualize(Xf, design, tr)
    pred_r = fit_predict("residual_probe", R, yv)
    rows.append(row("residual_probe", r2_score, probe_round_accuracy, [pred_r, y_te]))

    return ProbeControls(rows=rows, alpha=alpha, n_train=len(tr), n_test=len(te), n_test_units=n_units,
                         types_from=types_from, design_columns=design_names, seed=seed, n_shuffles=int(n_shuffles),
                         control_seed=control_seed)
