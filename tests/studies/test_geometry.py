"""Geometry: cosines, the random baseline, principal angles, norm percentiles and the permutation test behave as
their definitions say on crafted inputs."""

import math

import pytest
import torch

from workbench.methods.probes.linear import RidgeProbe
from workbench.methods.readout import covector_cosines, random_covector_band
from workbench.studies.counting_readout.geometry import (
    cosine_summary,
    digit_row_cosines,
    geometry_table,
    permutation_test,
    principal_angles,
    random_baseline,
    row_norm_percentiles,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cosine_with_itself_is_one():
    W = _rand(30, 16)
    ids = list(range(10, 19))
    cos = digit_row_cosines(-3 * W[12], W, ids)
    assert cos.shape == (9,) and cos.dtype == torch.float64
    assert cos[2].item() == pytest.approx(1.0, abs=1e-12)
    assert bool((cos <= 1 + 1e-12).all())
    s = cosine_summary(cos)
    assert s["max"] == pytest.approx(1.0) and s["argmax"] == 2 and s["min"] <= s["mean"] <= s["max"]
    # float32 W_U and a float32 direction work the same
    assert digit_row_cosines(W[12].float(), W.float(), [12]).item() == pytest.approx(1.0, abs=1e-6)


def test_random_baseline_matches_empirical_for_large_d():
    d = 2000
    assert random_baseline(d) == pytest.approx(math.sqrt(2 / (math.pi * d)))
    rand = random_covector_band(_rand(9, d), n=2000, seed=1)
    assert abs(rand["random_mean"] / random_baseline(d) - 1) < 0.05
    assert rand["random_lo"] < rand["random_mean"] < rand["random_hi"]
    assert random_covector_band(_rand(9, d), n=2000, seed=1) == rand


def test_principal_angles():
    A = _rand(30, 4)
    B = A @ _rand(4, 4, seed=1)  # same span, different basis
    ang = principal_angles(A, B)
    assert ang.shape == (4,) and float(ang.abs().max()) < 1e-6
    E = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(principal_angles(E[:, :3], E[:, 3:5]), torch.full((2,), 90.0, dtype=torch.float64))
    t = math.radians(30)
    v = math.cos(t) * E[:, 0] + math.sin(t) * E[:, 3]
    ang = principal_angles(E[:, :2], torch.stack([v, E[:, 1]], 1))
    torch.testing.assert_close(ang, torch.tensor([0.0, 30.0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(principal_angles(torch.stack([v, E[:, 1]], 1), E[:, :3]), ang, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="full column rank"):
        principal_angles(torch.stack([E[:, 0], 2 * E[:, 0]], 1), E[:, :2])
    with pytest.raises(ValueError, match="same number of rows"):
        principal_angles(E[:, :2], torch.eye(5, dtype=torch.float64)[:, :2])


def test_row_norm_percentiles_on_crafted_matrix():
    W = torch.zeros(10, 3)
    W[:, 0] = torch.arange(1, 11).float()  # norms 1..10
    ids = [0, 4, 9]
    assert row_norm_percentiles(W, ids, kind="strict").tolist() == [0.0, 40.0, 90.0]
    assert row_norm_percentiles(W, ids, kind="weak").tolist() == [10.0, 50.0, 100.0]
    assert row_norm_percentiles(W, ids).tolist() == [5.0, 45.0, 95.0]
    W[5, 0] = 5.0  # a tie with row 4
    assert row_norm_percentiles(W, [4], kind="strict").tolist() == [40.0]
    assert row_norm_percentiles(W, [4], kind="weak").tolist() == [60.0]
    with pytest.raises(ValueError, match="kind"):
        row_norm_percentiles(W, ids, kind="rank")


def _data(direction, n=200, seed=3):
    X = _rand(n, direction.shape[0], seed=seed)
    y = 3 * X @ direction + 0.1 * _rand(n, seed=seed + 1)
    return X, y


def test_permutation_test_detects_planted_alignment():
    d, ids = 32, list(range(9))
    W = _rand(50, d, seed=5)
    planted = W[ids].sum(0)
    planted = planted / planted.norm()
    X, y = _data(planted)
    res = permutation_test(X, y, W, ids, n_perm=200, seed=0)
    assert res.null.shape == (200,)
    assert res.p_value < 0.02 and res.observed > float(res.null.max())
    probe = RidgeProbe(alpha=res.alpha).fit(X, y)
    assert res.observed == pytest.approx(float(digit_row_cosines(probe.direction_raw, W, ids).mean()), abs=1e-10)

    Q, _ = torch.linalg.qr(W[ids].T)  # span of the digit rows
    away = _rand(d, seed=9)
    away = away - Q @ (Q.T @ away)
    X2, y2 = _data(away / away.norm())
    res2 = permutation_test(X2, y2, W, ids, n_perm=200, seed=0)
    assert res2.p_value > 0.5 and res2.p_less < 0.05


def test_geometry_table():
    W = _rand(40, 16, seed=6)
    ids = list(range(1, 10))
    dirs = {3: W[1].clone(), 1: _rand(16, seed=7)}
    table = geometry_table(dirs, W, ids, n_random=500)
    assert list(table.layer) == [1, 3] and set(table.basis) == {"raw"}
    row = table.set_index("layer").loc[3]
    assert row.cos_max == pytest.approx(1.0) and row.cos_argmax == 0
    assert row.random_baseline == pytest.approx(random_baseline(16))
    assert row.random_lo < row.random_mean < row.random_hi
    cos1 = digit_row_cosines(dirs[1], W, ids)
    assert table.set_index("layer").loc[1, "cos_mean"] == pytest.approx(float(cos1.mean()))
    X, y = _data(W[2] / W[2].norm(), n=100)
    probe = RidgeProbe().fit(X, y)
    t2 = geometry_table({0: probe}, W, ids, n_random=100)
    assert t2.loc[0, "cos_max"] > 0.99 and t2.loc[0, "cos_argmax"] == 1


def test_bad_inputs():
    W = _rand(20, 8)
    with pytest.raises(ValueError, match="length d = 8"):
        digit_row_cosines(torch.ones(7), W, [1])
    with pytest.raises(ValueError, match=r"digit_ids \[25\]"):
        digit_row_cosines(torch.ones(8), W, [1, 25])
    with pytest.raises(ValueError, match="non-zero"):
        digit_row_cosines(torch.zeros(8), W, [1])
    with pytest.raises(ValueError, match="d must be a positive int"):
        random_baseline(0)
    with pytest.raises(ValueError, match="width 8"):
        permutation_test(_rand(30, 6), _rand(30), W, [1])
    with pytest.raises(ValueError, match="n_perm"):
        permutation_test(_rand(30, 8), _rand(30), W, [1], n_perm=0)
    with pytest.raises(ValueError, match="non-empty dict"):
        geometry_table({}, W, [1])


def test_geometry_bases_gain_and_whitened():
    """With covectors and a covariance, each layer gets raw, gain and gain_whitened rows; the whitened cosine is
    the cosine of Σ^{1/2} w and Σ^{1/2} u, and a direction aligned only through a dominant coordinate loses its
    alignment once whitened."""
    W = _rand(40, 16, seed=6)
    ids = list(range(1, 10))
    U = W[ids] * torch.linspace(0.5, 2.0, 16, dtype=torch.float64)  # a gain
    A = _rand(16, 16, seed=3)
    S = A @ A.T + 0.1 * torch.eye(16, dtype=torch.float64)
    w = _rand(16, seed=8)
    t = geometry_table({2: w}, W, ids, n_random=300, covectors_by_layer={2: U}, sigma_by_layer={2: S})
    assert list(t.basis) == ["raw", "gain", "gain_whitened"]
    ev, V = torch.linalg.eigh(S)
    half = V @ torch.diag(ev.sqrt()) @ V.T
    wh, Uh = half @ w, U @ half
    ref = ((Uh @ wh) / (Uh.norm(dim=1) * wh.norm())).abs()
    assert t.set_index("basis").loc["gain_whitened", "cos_mean"] == pytest.approx(float(ref.mean()))
    torch.testing.assert_close(covector_cosines(w, U, S), ref)
    assert t.set_index("basis").loc["gain", "cos_mean"] == pytest.approx(float(covector_cosines(w, U).mean()))
    # whitening: the readout u = e0 and a direction w = e0 + e1 where coordinate 0 has huge variance
    S2 = torch.diag(torch.tensor([100.0, 1.0], dtype=torch.float64))
    u, w2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64) + 0.1
    assert covector_cosines(w2, u, S2).item() > covector_cosines(w2, u).item()


def test_permutation_groups_keep_identical_prompts_identical():
    W = _rand(20, 8, seed=2)
    X = _rand(20, 8, seed=4).repeat(3, 1)
    y = torch.arange(20, dtype=torch.float64).repeat(3)
    res = permutation_test(X, y, W, [1, 2], n_perm=50, seed=0, groups=[i % 20 for i in range(60)])
    assert res.null.shape == (50,)


def test_whitened_permutation_test_matches_covector_cosines():
    """With sigma, the observed statistic is the mean whitened |cos| of the real probe's direction."""
    W = _rand(20, 8, seed=2)
    X = _rand(60, 8, seed=4)
    y = X[:, 0] * 2 + 0.1 * _rand(60, seed=5)
    A = _rand(8, 8, seed=3)
    S = A @ A.T + 0.1 * torch.eye(8, dtype=torch.float64)
    res = permutation_test(X, y, W, [1, 2, 3], n_perm=30, seed=0, sigma=S)
    probe = RidgeProbe(seed=0).fit(X, y)
    assert res.alpha == probe.alpha
    want = float(covector_cosines(probe.direction_raw, W[[1, 2, 3]], S).mean())
    assert res.observed == pytest.approx(want, rel=1e-6)
