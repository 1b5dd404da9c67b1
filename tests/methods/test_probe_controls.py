"""Probe controls (results audit D1) on planted data: a length-only code has no selectivity and no residual, a
planted count direction keeps both; control-task labels follow the types; residualize fits on train rows only."""

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.methods.probes.controls import (
    COLUMNS,
    CONTROLS,
    ProbeControls,
    control_task_labels,
    nuisance_design,
    probe_controls,
    residualize,
)

N, D = 360, 24
FAST = dict(n_resamples=300, n_shuffles=3)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    count = np.repeat(np.arange(1, 10), N // 9)
    rng.shuffle(count)
    perm = rng.permutation(N)
    return rng, count, perm[:240], perm[240:]


def test_length_only_features_have_no_selectivity(planted):
    """count == length and X = f(length) + noise: everything the probe reads, the nuisance explains."""
    rng, count, tr, te = planted
    length = count + 6  # e.g. the word count of a list_length prompt
    emb = rng.normal(size=(20, D))  # f: an arbitrary (non-linear) code of the length
    X = emb[length] + 0.1 * rng.normal(size=(N, D))
    res = probe_controls(X, count, pd.DataFrame({"n_words": length}), tr, te, seed=0, **FAST)
    assert isinstance(res, ProbeControls)
    frame = res.to_frame()
    assert list(frame.columns) == list(COLUMNS) and list(frame["control"]) == list(CONTROLS)
    assert (frame["n_test_units"] == len(te)).all()
    probe, sel = res["probe"], res["selectivity"]
    assert probe["r2"] > 0.9
    assert abs(sel["r2"]) < 0.15
    assert sel["r2_lo"] <= sel["r2"] <= sel["r2_hi"]
    assert abs(res["nuisance_baseline"]["r2"] - probe["r2"]) < 0.1
    assert res["residual_probe"]["r2"] < 0.1
    assert res["shuffled_labels"]["r2"] < 0.1
    assert res.types_from == "n_words"


def test_planted_count_direction_survives_the_controls(planted):
    """X = count * v + noise with the length drawn independently: the probe reads the count itself."""
    rng, count, tr, te = planted
    length = rng.integers(8, 20, N)
    v = rng.normal(size=D)
    X = torch.from_numpy(np.outer(count, v) + rng.normal(size=(N, D))).float()
    res = probe_controls(X, torch.from_numpy(count), pd.DataFrame({"n_words": length, "n_chars": 5 * length}),
                         tr, te, seed=1, **FAST)
    assert res["probe"]["r2"] > 0.9
    assert res["residual_probe"]["r2"] > 0.8
    assert res["selectivity"]["r2"] > 0.5 and res["selectivity"]["r2_lo"] > 0.3
    assert res["nuisance_baseline"]["r2"] < 0.15
    assert res["shuffled_labels"]["r2"] < 0.1
    assert set(res.alpha) == {"probe", "control_task", "shuffled_labels", "nuisance_baseline", "residual_probe"}
    assert len(res.alpha["shuffled_labels"]) == FAST["n_shuffles"]


def test_groups_are_the_units(planted):
    """Repeated prompts are one unit: n_test_units counts distinct ones, and a unit on both sides is refused."""
    rng, count, tr, te = planted
    groups = [f"p{i // 2}" for i in range(N)]  # pairs of rows share a prompt
    y = np.array([count[(i // 2) * 2] for i in range(N)])
    X = np.outer(y, rng.normal(size=D)) + 0.5 * rng.normal(size=(N, D))
    units = np.arange(N // 2)
    rng.shuffle(units)
    tr_g = np.flatnonzero(np.isin(np.arange(N) // 2, units[:120]))
    te_g = np.flatnonzero(np.isin(np.arange(N) // 2, units[120:]))
    res = probe_controls(X, y, np.arange(N) % 7, tr_g, te_g, groups=groups, seed=0, **FAST)
    assert res.n_test_units == 60 and res.n_test == 120
    assert res.types_from == "col0"
    with pytest.raises(ValueError, match="both train and test"):
        probe_controls(X, y, np.arange(N) % 7, np.arange(0, 201), np.arange(201, N), groups=groups, **FAST)
    with pytest.raises(ValueError, match="share 1 rows"):
        probe_controls(X, y, np.arange(N) % 7, np.arange(0, 200), np.arange(199, N), **FAST)


def test_control_task_labels_follow_types():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(1, 10), 400)
    types = rng.integers(0, 2000, len(labels))
    ctrl = control_task_labels(types, labels, seed=0)
    assert ctrl.shape == labels.shape and ctrl.dtype == labels.dtype
    by_type: dict = {}
    for t, c in zip(types.tolist(), ctrl.tolist(), strict=True):
        assert by_type.setdefault(t, c) == c  # one label per type
    # the labels of the distinct types follow the empirical (here uniform) label distribution
    freq = Counter(by_type.values())
    assert set(freq) <= set(range(1, 10))
    share = np.array([freq[k] for k in range(1, 10)]) / len(by_type)
    assert np.abs(share - 1 / 9).max() < 0.04
    np.testing.assert_array_equal(ctrl, control_task_labels(types, labels, seed=0))
    assert not np.array_equal(ctrl, control_task_labels(types, labels, seed=1))
    # string types too
    words = ["a", "b", "a", "c", "b"]
    c2 = control_task_labels(words, np.array([1, 2, 3, 4, 5]), seed=0)
    assert c2[0] == c2[2] and c2[1] == c2[4]
    with pytest.raises(ValueError, match="one type per item"):
        control_task_labels(words[:3], np.arange(5), seed=0)


def test_nuisance_design_columns():
    n_tok = np.array([3, 4, 5, 3, 4, 5, 6, 6])
    wide = np.arange(8) * 10.0 + 0.5  # not integer-valued: standardised + square only
    const = np.ones(8)
    D = nuisance_design(pd.DataFrame({"n_tokens": n_tok, "wide": wide, "const": const}))
    assert D.shape == (8, 2 + 4 + 2)  # n_tokens: z, z^2, 4 indicators; wide: z, z^2; const dropped
    np.testing.assert_allclose(D[:, 0], (n_tok - n_tok.mean()) / n_tok.std())
    np.testing.assert_allclose(D[:, 1], D[:, 0] ** 2)
    np.testing.assert_array_equal(D[:, 2:6].sum(1), np.ones(8))
    many = np.arange(40)  # more than 30 levels: no indicators
    assert nuisance_design(many).shape == (40, 2)
    assert nuisance_design(const).shape == (8, 0)
    with pytest.raises(ValueError, match="NaN"):
        nuisance_design(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="not numeric"):
        nuisance_design(pd.DataFrame({"s": ["a", "b"]}))


def test_residualize_fits_on_train_rows_only():
    rng = np.random.default_rng(0)
    n, d = 60, 5
    length = rng.integers(3, 9, n)
    design = nuisance_design(length)
    X = torch.from_numpy(np.outer(length, rng.normal(size=d)) + rng.normal(size=(n, d))).float()
    tr, te = np.arange(40), np.arange(40, 60)
    R = residualize(X, design, tr)
    assert R.dtype == torch.float32 and R.shape == X.shape
    # the training residuals are orthogonal to [1, design] on the training rows
    full = np.concatenate([np.ones((n, 1)), design], 1)
    assert np.abs(full[tr].T @ R[tr].double().numpy()).max() < 1e-3
    # changing the test rows of X (or of the design) changes nothing fitted: train residuals are the same ...
    X2 = X.clone()
    X2[te] = 100 * torch.randn(len(te), d)
    design2 = design.copy()
    design2[te] = 7.0
    R2 = residualize(X2, design2, tr)
    torch.testing.assert_close(R2[tr], R[tr])
    # ... and a test row's residual is its own value minus the train-fitted projection
    coef = np.linalg.lstsq(full[tr], X[tr].double().numpy(), rcond=None)[0]
    np.testing.assert_allclose(R[te].double().numpy(), X[te].double().numpy() - full[te] @ coef, atol=1e-4)
    # numpy in, float64 tensor out; boolean masks; an empty design removes the training mean
    R3 = residualize(X.double().numpy(), np.zeros((n, 0)), np.arange(n) < 40)
    assert R3.dtype == torch.float64
    torch.testing.assert_close(R3, X.double() - X[tr].double().mean(0))
    with pytest.raises(ValueError, match="design must have shape"):
        residualize(X, design[:10], tr)


def test_default_types_skip_a_constant_nuisance(planted):
    """A length-decoupled task holds n_words constant: the control task's types come from the next nuisance."""
    rng, count, tr, te = planted
    X = np.outer(count, rng.normal(size=D)) + rng.normal(size=(N, D))
    nu = pd.DataFrame({"n_words": np.full(N, 18), "n_tokens": rng.integers(20, 26, N)})
    res = probe_controls(X, count, nu, tr, te, seed=0, **FAST)
    assert res.types_from == "n_tokens" and res.control_seed is not None
    assert res.design_columns[:2] == ["n_tokens", "n_tokens^2"]
    assert np.isfinite(res.to_frame()[["r2", "round_acc"]].to_numpy()).all()
    # a single type: the control task is undefined, so it and selectivity are NaN
    one = probe_controls(X, count, nu[["n_words"]], tr, te, seed=0, **FAST)
    assert np.isnan(one["control_task"]["r2"]) and np.isnan(one["selectivity"]["round_acc"])
    assert one["nuisance_baseline"]["r2"] <= 0.0 and one["residual_probe"]["r2"] > 0.8


def test_the_probe_row_is_the_layerwise_probe_with_repeated_prompts():
    """Same rows, split, groups and seed: the controls' probe is the study's probe (alpha chosen on a grouped
    validation split in both). With every prompt repeated four times, an ungrouped validation split lets a prompt
    choose its own alpha, and the two disagree."""
    from workbench.methods.probes.linear import RidgeProbe
    from workbench.methods.probes.layerwise import layerwise_ridge

    rng = np.random.default_rng(3)
    n_units = 90
    y_u = rng.integers(1, 10, n_units)
    X_u = np.outer(y_u, rng.normal(size=D)) + 3.0 * rng.normal(size=(n_units, D))
    rows = np.repeat(np.arange(n_units), 4)
    X = torch.from_numpy(X_u[rows] + 0.05 * rng.normal(size=(len(rows), D))).float()
    y, groups = y_u[rows], [f"p{u}" for u in rows]
    tr, te = np.flatnonzero(rows < 60), np.flatnonzero(rows >= 60)
    res = probe_controls(X, y, pd.DataFrame({"n_words": rows % 5}), tr, te, groups=groups, seed=4, **FAST)
    lw = layerwise_ridge({0: X}, y.astype(float), tr, te, seed=4, groups=groups)
    assert res.alpha["probe"] == lw.probes[0].alpha
    assert res["probe"]["r2"] == pytest.approx(float(lw.table.r2_test.iloc[0]), abs=1e-6)
    g_tr = [groups[i] for i in tr]
    grouped = RidgeProbe(seed=4).fit(X[tr], y[tr], groups=g_tr)
    leaky = RidgeProbe(seed=4).fit(X[tr], y[tr])
    assert grouped.alpha == lw.probes[0].alpha and leaky.alpha < grouped.alpha  # duplicates favour a weak penalty
    with pytest.raises(ValueError, match="one key per row"):
        RidgeProbe(seed=4).fit(X[tr], y[tr], groups=g_tr[:-1])
