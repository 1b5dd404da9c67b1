"""Per-layer probe intervals and the best-layer null: a planted layer wins against the max over layers of the
permutations; pure-noise layers do not; identical prompts never cross the validation split."""

import numpy as np
import pytest
import torch

from workbench.methods.probes.base import val_split
from workbench.methods.probes.layerwise import layerwise_max_null, layerwise_ridge


def _layers(n=240, d=12, signal_layer=2, strength=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(np.random.default_rng(seed).integers(1, 10, n), dtype=torch.float64)
    feats = {layer: torch.randn(n, d, generator=g, dtype=torch.float64) for layer in range(5)}
    v = torch.randn(d, generator=g, dtype=torch.float64)
    feats[signal_layer] = feats[signal_layer] + strength * y[:, None] * v / v.norm()
    return feats, y


def test_planted_layer_beats_the_max_null_and_noise_does_not():
    feats, y = _layers()
    tr, te = np.arange(160), np.arange(160, 240)
    lw = layerwise_ridge(feats, y, tr, te, ci=True)
    row = lw.table.set_index("layer").loc[2]
    assert row.r2_lo < row.r2_test < row.r2_hi and row.n_test_units == 80
    assert row.round_acc_lo <= row.round_acc_test <= row.round_acc_hi
    res = layerwise_max_null(feats, y, tr, te, lw.probes, n_permutations=199)
    assert res.observed == pytest.approx(lw.table.r2_test.max()) and res.p == pytest.approx(1 / 200)
    assert res.n_candidates == 5 and res.threshold < 0.2
    noise, y2 = _layers(strength=0.0, seed=1)
    lw2 = layerwise_ridge(noise, y2, tr, te)
    res2 = layerwise_max_null(noise, y2, tr, te, lw2.probes, n_permutations=199)
    assert res2.p > 0.05


def test_grouped_validation_split_keeps_prompts_together():
    groups = [f"p{i % 30}" for i in range(120)]
    fit, val = val_split(120, 0.2, 0, groups)
    assert not {groups[i] for i in fit} & {groups[i] for i in val}
    feats, y = _layers(n=120)
    y = torch.tensor([float(1 + i % 9) for i in range(30)] * 4, dtype=torch.float64)
    lw = layerwise_ridge(feats, y, np.arange(90), np.arange(90, 120), groups=groups, ci=True)
    assert (lw.table.n_test_units == 30).all()
    with pytest.raises(ValueError, match="one key per row"):
        layerwise_ridge(feats, y, np.arange(90), np.arange(90, 120), groups=groups[:5])


def test_matrix_bootstrap_equals_the_loop_over_resamples():
    """The per-layer intervals' matrix form gives, resample by resample, the R² and accuracy that concatenating the
    drawn units' items gives."""
    from workbench.methods.probes.base import probe_round_accuracy, r2_score
    from workbench.methods.probes.layerwise import _intervals
    from workbench.methods.stats import percentile_interval, resample_weights

    rng = np.random.default_rng(3)
    t = rng.integers(1, 10, 60).astype(float)
    p = t + rng.normal(scale=1.0, size=60)
    groups = [f"u{i % 25}" for i in range(60)]
    t = np.array([t[int(g[1:])] for g in groups])  # a unit's items share a label, as identical prompts do
    codes, W = resample_weights(groups, 60, n_resamples=200, seed=1)
    members = [np.flatnonzero(codes == u) for u in range(W.shape[1])]
    r2, acc = [], []
    for w in W:
        idx = np.concatenate([np.tile(members[u], int(c)) for u, c in enumerate(w) if c])
        r2.append(r2_score(p[idx], t[idx]))
        acc.append(probe_round_accuracy(p[idx], t[idx]))
    got = _intervals(p, t, codes, W)
    assert (got["r2_lo"], got["r2_hi"]) == pytest.approx(percentile_interval(r2))
    assert (got["round_acc_lo"], got["round_acc_hi"]) == pytest.approx(percentile_interval(acc))
    assert got["n_test_units"] == 25 and W.sum(1).tolist() == [25] * 200
