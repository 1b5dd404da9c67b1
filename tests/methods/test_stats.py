"""The statistics against scipy / statsmodels and hand-computed references."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from workbench.methods import stats


def test_wilson_matches_the_formula():
    k, n, z = 7, 20, sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    ci = stats.wilson_ci(k, n)
    assert ci.estimate == p and ci.n == n and ci.method == "wilson"
    assert ci.lo == pytest.approx(centre - half, abs=1e-12) and ci.hi == pytest.approx(centre + half, abs=1e-12)


def test_bootstrap_ci_equals_scipy_when_every_item_is_a_unit():
    x = np.random.default_rng(0).normal(1.0, 2.0, size=60)
    ours = stats.mean_ci(x, seed=3)
    ref = sps.bootstrap((np.arange(60),), lambda u: x[u].mean(), vectorized=False, n_resamples=stats.N_RESAMPLES,
                        method="BCa", random_state=np.random.default_rng(3)).confidence_interval
    assert (ours.lo, ours.hi) == pytest.approx((ref.low, ref.high))
    assert ours.lo < x.mean() < ours.hi and ours.n == 60


def test_grouped_bootstrap_counts_distinct_units_and_is_wider():
    # 10 distinct prompts, each repeated 12 times: the evidence is 10 units, not 120 items
    rng = np.random.default_rng(1)
    unit_values = rng.normal(size=10)
    x = np.repeat(unit_values, 12)
    groups = np.repeat([f"p{i}" for i in range(10)], 12)
    grouped = stats.mean_ci(x, groups=groups)
    naive = stats.mean_ci(x)
    assert grouped.n == 10 and naive.n == 120
    assert (grouped.hi - grouped.lo) > 2 * (naive.hi - naive.lo)
    # the grouped interval equals the bootstrap of the 10 unit means (equal unit sizes)
    ref = stats.mean_ci(unit_values)
    assert (grouped.lo, grouped.hi) == pytest.approx((ref.lo, ref.hi))


def test_accuracy_ci_picks_wilson_or_bootstrap_and_says_so():
    c = np.array([1, 0, 1, 1] * 10)
    assert stats.accuracy_ci(c).method == "wilson"
    assert stats.accuracy_ci(c, groups=[str(i) for i in range(40)]).method == "wilson"
    g = stats.accuracy_ci(c, groups=[i % 4 for i in range(40)])
    assert g.method.startswith("bootstrap") and g.n == 4
    assert stats.accuracy_ci(np.ones(30)).hi == 1.0  # all right: Wilson's upper end is 1, lower end below 1
    with pytest.raises(ValueError, match="0/1"):
        stats.accuracy_ci([0.5, 1])


def test_constant_statistic_gives_a_point_interval():
    ci = stats.mean_ci(np.ones(20), groups=np.arange(20) % 5)
    assert (ci.estimate, ci.lo, ci.hi) == (1.0, 1.0, 1.0)


def test_bootstrap_of_a_paired_statistic():
    rng = np.random.default_rng(2)
    y = rng.normal(size=80)
    pred = y + rng.normal(scale=0.3, size=80)

    def r2(p, t):
        return 1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()

    ci = stats.bootstrap_ci(r2, pred, y)
    assert ci.lo < r2(pred, y) < ci.hi < 1
    with pytest.raises(ValueError, match="one entry per item"):
        stats.bootstrap_ci(r2, pred, y[:-1])
    with pytest.raises(ValueError, match="2 distinct units"):
        stats.mean_ci(y, groups=["a"] * 80)


def test_seed_summary_is_the_t_interval():
    f = pd.DataFrame({"seed": [1, 2, 3, 1, 2, 3], "task": list("aaabbb"), "acc": [0.1, 0.2, 0.4, 1, 1, 1]})
    s = stats.seed_summary(f, "acc", ["task"]).set_index("task")
    x = np.array([0.1, 0.2, 0.4])
    half = sps.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3)
    assert s.loc["a", "acc_mean"] == pytest.approx(x.mean())
    assert s.loc["a", "acc_lo"] == pytest.approx(x.mean() - half) and s.loc["a", "n_seeds"] == 3
    assert s.loc["b", "acc_sd"] == 0 and s.loc["b", "acc_lo"] == 1
    one = stats.seed_summary(f[f.seed == 1], "acc", ["task"])
    assert one.acc_sd.isna().all() and (one.n_seeds == 1).all()


def test_max_null_compares_the_winner_with_the_max_of_each_permutation():
    obs = np.array([0.1, 0.3, 0.2])
    null = np.array([[0.0, 0.35, 0.1], [0.2, 0.1, 0.0], [0.1, 0.1, 0.29], [0.31, 0.0, 0.0]])
    r = stats.max_null_p(obs, null)
    # maxima 0.35, 0.2, 0.29, 0.31: two of four reach 0.3
    assert r.observed == 0.3 and r.p == pytest.approx(3 / 5) and r.n_candidates == 3
    # against each candidate's own null the winner would look better than it is
    assert stats.permutation_p(0.3, null[:, 1]) < r.p
    assert stats.permutation_p(5.0, np.zeros(99)) == pytest.approx(0.01)  # the floor 1 / (1 + n)
    with pytest.raises(ValueError, match="n_permutations"):
        stats.max_null_p(obs, null[:, :2])


def test_permute_within_units_keeps_identical_prompts_together():
    groups = ["a", "b", "a", "c", "b", "d"]
    y = np.array([1, 2, 1, 3, 2, 4])
    for seed in range(5):
        p = stats.permute_within_units(y, groups, seed=seed)
        assert p[0] == p[2] and p[1] == p[4] and sorted(set(p)) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="differ within a unit"):
        stats.permute_within_units([1, 2, 3, 3, 2, 4], groups, seed=0)
