"""Intervention controls (workbench.methods.controls) on synthetic tensors with planted structure and on a tiny
random model: norm-matched random directions and their null (which covers 0), the class-mean direction, the
count-dependent probe edit, position-matched mean ablation against hand-computed means, and the flattening control
against exact temperature changes."""

import math

import numpy as np
import pytest
import torch

from workbench.core.trace import trace
from workbench.methods.controls import (
    N_NULL,
    NullResult,
    check_disjoint,
    class_mean_direction,
    direction_null,
    flattening_control,
    mean_ablation_edit,
    position_means,
    probe_target_edit,
    random_directions,
    scaled_edit,
)
from workbench.methods.stats import permutation_p
from workbench.testing.tiny import tiny_model

SITE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# -- random directions ---------------------------------------------------------------------------------------------
def test_random_directions_are_norm_matched_seeded_and_typed():
    like = torch.randn(32, dtype=torch.float64) * 3
    r = random_directions(32, 7, seed=3, like=like)
    assert r.shape == (7, 32) and r.dtype == torch.float64
    assert torch.allclose(r.norm(dim=1), like.norm().expand(7), rtol=1e-12)
    assert torch.equal(r, random_directions(32, 7, seed=3, like=like))
    assert not torch.equal(r, random_directions(32, 7, seed=4, like=like))
    assert torch.equal(r[:3], random_directions(32, 3, seed=3, like=like))  # a larger null extends a smaller one
    u = random_directions(16, 5, seed=0)
    assert u.dtype == torch.float32 and torch.allclose(u.norm(dim=1), torch.ones(5))
    r32 = random_directions(32, 7, seed=3, like=like.float())
    assert r32.dtype == torch.float32 and torch.allclose(r32.double(), r, atol=1e-6)
    # roughly isotropic: pairwise cosines of many draws centre on 0
    many = random_directions(64, 200, seed=1)
    cos = (many @ many.T)[~torch.eye(200, dtype=torch.bool)]
    assert abs(float(cos.mean())) < 0.01
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be"):
            random_directions(8, bad, seed=0)
    with pytest.raises(ValueError, match="like must be"):
        random_directions(8, 2, seed=0, like=torch.ones(9))
    with pytest.raises(ValueError, match="norm"):
        random_directions(8, 2, seed=0, like=torch.zeros(8))


# -- class-mean direction ------------------------------------------------------------------------------------------
def test_class_mean_direction_recovers_a_planted_count_direction():
    g = torch.Generator().manual_seed(0)
    d, n = 48, 600
    v = torch.randn(d, generator=g)
    c = torch.randint(1, 10, (n,), generator=g)
    X = c[:, None].float() * v + 2.0 * torch.randn(n, d, generator=g) + 5.0  # noise and an offset
    u = class_mean_direction(X, c)
    assert u.shape == (d,) and u.dtype == torch.float32
    assert float(torch.cosine_similarity(u, v, dim=0)) > 0.95
    assert torch.allclose(u.norm(), v.norm(), rtol=0.05)  # per unit of count: the slope, not a unit vector
    # the weighted slope of the class means is the least-squares slope of X on the count
    Xd, cd = X.double(), c.double()
    ols = ((cd - cd.mean())[:, None] * (Xd - Xd.mean(0))).sum(0) / ((cd - cd.mean()) ** 2).sum()
    assert torch.allclose(u.double(), ols, atol=1e-5)


def test_class_mean_direction_two_classes_and_checks():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([2] * 10 + [5] * 20)
    want = (X[y == 5].mean(0) - X[y == 2].mean(0)) / 3
    got = class_mean_direction(X, y)
    assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(class_mean_direction(X.numpy(), (y == 5).numpy()), X[y == 5].mean(0) - X[y == 2].mean(0))
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_mean_direction(X, torch.ones(30))
    with pytest.raises(ValueError, match="one label per row"):
        class_mean_direction(X, torch.ones(29))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        class_mean_direction(X[0], torch.ones(8))


# -- edits ---------------------------------------------------------------------------------------------------------
def test_probe_target_edit_hits_each_target_and_touches_nothing_else():
    g = torch.Generator().manual_seed(2)
    B, T, d = 5, 7, 16
    t = torch.randn(B, T, d, generator=g)
    w, b = torch.randn(d, generator=g), 0.7
    targets = torch.arange(B, dtype=torch.float32) * 2 - 3
    out = probe_target_edit(w, b, targets)(t)
    assert out.shape == t.shape and out.dtype == t.dtype
    assert torch.allclose(out[:, -1] @ w + b, targets, atol=1e-5)
    assert torch.equal(out[:, :-1], t[:, :-1])
    # the move is along w only: the component orthogonal to w is unchanged
    delta = (out - t)[:, -1]
    assert torch.allclose(delta - (delta @ w)[:, None] * w / (w @ w), torch.zeros(B, d), atol=1e-6)
    # a list of positions: each moved to its row's target, the rest untouched
    out2 = probe_target_edit(w, torch.tensor(b), targets, positions=[1, 3])(t)
    assert torch.allclose(out2[:, [1, 3]] @ w + b, targets[:, None].expand(B, 2), atol=1e-5)
    assert torch.equal(out2[:, [0, 2, 4, 5, 6]], t[:, [0, 2, 4, 5, 6]])
    with pytest.raises(ValueError, match=r"\[B=5\]"):
        probe_target_edit(w, b, targets[:3])(t)
    with pytest.raises(ValueError, match="zero"):
        probe_target_edit(torch.zeros(d), b, targets)


def test_probe_target_edit_in_a_tiny_model_forward(model):
    prompts = ["one two", "three four five six", "x"]
    enc = model.encode(prompts)
    with trace(model, [SITE], positions=-1) as tr:
        model.hf(**enc)
    h0 = tr[SITE]
    g = torch.Generator().manual_seed(5)
    w = torch.randn(h0.shape[-1], generator=g)
    targets = torch.tensor([1.0, 2.0, 3.0])
    with trace(model, [SITE], edits={SITE: probe_target_edit(w, -0.5, targets)}) as tr:
        model.hf(**enc)
    h = tr[SITE]  # the capture at the edited site sees the edited value
    assert torch.allclose(h[:, -1] @ w - 0.5, targets, atol=1e-4)
    with trace(model, [SITE]) as tr0:
        model.hf(**enc)
    assert torch.equal(h[:, :-1], tr0[SITE][:, :-1])


def test_scaled_edit_adds_per_row_amounts_along_the_unit_direction():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(3, 4, 8, generator=g)
    v = torch.randn(8, generator=g) * 5
    amounts = torch.tensor([0.0, 1.0, -2.0])
    out = scaled_edit(v, amounts)(t)
    assert torch.allclose(out[:, -1] - t[:, -1], amounts[:, None] * v / v.norm(), atol=1e-6)
    assert torch.equal(out[:, :-1], t[:, :-1])
    assert torch.allclose((scaled_edit(v, 2.0, positions=None)(t) - t).norm(dim=-1), torch.full((3, 4), 2.0))
    # matched to the probe edit: the same per-row displacement norms along another direction
    w = torch.randn(8, generator=g)
    targets = torch.tensor([1.0, -1.0, 4.0])
    moved = probe_target_edit(w, 0.0, targets)(t)
    amounts = (targets - t[:, -1] @ w) / w.norm()
    assert torch.allclose(scaled_edit(w, amounts)(t), moved, atol=1e-5)
    r = random_directions(8, 1, seed=0)[0]
    assert torch.allclose((scaled_edit(r, amounts)(t) - t)[:, -1].norm(dim=-1), (moved - t)[:, -1].norm(dim=-1),
                          atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B=3\]"):
        scaled_edit(v, torch.ones(2))(t)


# -- the random-direction null ---------------------------------------------------------------------------------------
def test_direction_null_covers_zero_and_flags_the_planted_direction():
    g = torch.Generator().manual_seed(4)
    d = 64
    planted = torch.randn(d, generator=g)

    def score(v):  # the projection of a fixed planted vector on the direction: ~0 for random directions
        return float(planted @ v / v.norm())

    res = direction_null(score, planted * 3, seed=0)
    assert isinstance(res, NullResult) and res.n == N_NULL == 50 and res.null.shape == (50,)
    assert res.null_lo < 0 < res.null_hi  # a random direction's null covers 0
    assert abs(res.null.mean()) < 3 * res.null.std() / math.sqrt(50)
    assert res.observed == pytest.approx(float(planted.norm()))
    assert res.p_greater == pytest.approx(1 / 51) and res.p_less == 1.0
    assert res.p_greater == permutation_p(res.observed, res.null)
    assert not res.covers
    assert res.null_lo == pytest.approx(np.percentile(res.null, 2.5))
    # random directions as the observed one: the null's 95 % range holds about 95 % of them (calibration), and
    # their one-sided p-values are roughly uniform
    others = [direction_null(score, r, seed=1000 + i) for i, r in enumerate(random_directions(d, 200, seed=99))]
    assert all(o.null_lo < 0 < o.null_hi for o in others)
    outside = np.mean([not o.covers for o in others])
    assert 0.0 < outside < 0.12
    assert 0.4 < np.mean([o.p_greater for o in others]) < 0.6
    row = res.to_dict("steer_")
    assert set(row) == {"steer_observed", "steer_p_greater", "steer_p_less", "steer_null_lo", "steer_null_hi",
                        "steer_null_mean", "steer_null_sd", "steer_n_null"}
    # seeded: the same null again; every null direction has the direction's norm
    assert np.array_equal(direction_null(score, planted * 3, seed=0).null, res.null)
    norms = []
    direction_null(lambda v: norms.append(float(v.norm())) or 0.0, planted, n=5, seed=0)
    assert np.allclose(norms, float(planted.norm()), rtol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        direction_null(lambda v: math.nan, planted, n=3, seed=0)


def test_steering_null_on_a_tiny_model_covers_zero(model):
    """Steering the last position along random directions moves a logit both ways: the null covers 0."""
    enc = model.encode(["the cat sat", "a dog ran far"])
    with torch.no_grad():
        base = model.hf(**enc).logits[:, -1, 65]

    def score(v):
        with torch.no_grad(), trace(model, edits={SITE: scaled_edit(v, float(v.norm()))}):
            return float((model.hf(**enc).logits[:, -1, 65] - base).mean())

    res = direction_null(score, torch.ones(64) * 0.5, n=50, seed=0)
    assert res.null_lo < 0 < res.null_hi
    assert np.isfinite(res.null).all() and res.null.std() > 0


# -- position-matched mean ablation ----------------------------------------------------------------------------------
REF = ["a cat", "the dog ran", "one bird flew by", "fish", "a b c d e f g"]


def _alone(model, prompt, site):
    with trace(model, [site]) as tr:
        model.hf(**model.encode([prompt]))
    return tr[site][0].double()  # [len, d], unpadded


def test_position_means_equal_hand_computed_means_from_the_end(model):
    sites = [SITE, "blocks.0.hook_mlp_out"]
    means = position_means(model, REF, sites, batch_size=2)
    caps = {s: [_alone(model, p, s) for p in REF] for s in sites}
    L = max(len(c) for c in caps[SITE])
    for s in sites:
        assert means[s].shape == (L, 64) and means[s].dtype == torch.float32
        for k in range(1, L + 1):  # k-th token from the end
            rows = [c[-k] for c in caps[s] if len(c) >= k]
            assert torch.allclose(means[s][-k].double(), torch.stack(rows).mean(0), atol=1e-5), (s, k)
    # min_count: only the positions that at least that many prompts reach
    lengths = sorted(len(c) for c in caps[SITE])
    m3 = position_means(model, REF, SITE, min_count=3)
    assert m3[SITE].shape[0] == lengths[-3]
    assert torch.allclose(m3[SITE], means[SITE][-lengths[-3]:])
    # layers by int, keyed by the int
    assert torch.allclose(position_means(model, REF, [2])[2], means[SITE], atol=1e-6)


def test_mean_ablation_with_the_evaluated_set_as_reference_gives_the_mean(model):
    prompts = ["abcd", "efgh", "ijkl", "mnop"]  # identical token lengths: no padding
    means = position_means(model, prompts, SITE)[SITE]
    with trace(model, [SITE]) as tr:
        model.hf(**model.encode(prompts))
    clean = tr[SITE]
    assert torch.allclose(clean.mean(0), means, atol=1e-5)
    with trace(model, [SITE], edits={SITE: mean_ablation_edit(means)}) as tr:
        model.hf(**model.encode(prompts))
    assert torch.allclose(tr[SITE], means.expand(4, -1, -1))
    with trace(model, [SITE], edits={SITE: mean_ablation_edit(means, [-1, -3])}) as tr:
        model.hf(**model.encode(prompts))
    got = tr[SITE]
    assert torch.allclose(got[:, [-1, -3]], means[[-1, -3]].expand(4, -1, -1))
    assert torch.equal(got[:, [0, 1, 3]], clean[:, [0, 1, 3]])


def test_mean_ablation_is_position_matched_under_left_padding(model):
    check_disjoint(["hi", "a longer one"], REF)
    means = position_means(model, REF, SITE)[SITE]
    enc = model.encode(["hi", "a longer one"])
    assert not enc["attention_mask"][0, 0]  # left padded
    edit = mean_ablation_edit(means, attention_mask=enc["attention_mask"])
    with trace(model, [SITE], edits={SITE: edit}) as tr:
        model.hf(**enc)
    with trace(model, [SITE]) as tr0:
        model.hf(**enc)
    got, clean = tr[SITE], tr0[SITE]
    for b in range(2):
        n = int(enc["attention_mask"][b].sum())
        assert torch.allclose(got[b, -n:], means[-n:])  # each real token gets the mean at its distance from the end
        assert torch.equal(got[b, :-n], clean[b, :-n])  # padding untouched
    # without the mask the padding gets means too, and the real tokens the same values
    with trace(model, [SITE], edits={SITE: mean_ablation_edit(means)}) as tr:
        model.hf(**enc)
    assert torch.allclose(tr[SITE], means[-enc["input_ids"].shape[1]:].expand(2, -1, -1))
    # an evaluated prompt longer than the reference covers
    with pytest.raises(ValueError, match="longer than the reference"), \
            trace(model, edits={SITE: mean_ablation_edit(means)}):
        model.hf(**model.encode(["this prompt is much longer than any reference prompt"]))
    assert torch.equal(mean_ablation_edit(means, -1)(clean)[:, :-1], clean[:, :-1])  # last position alone: fine
    with pytest.raises(ValueError, match="negative"):
        mean_ablation_edit(means, [0])
    with pytest.raises(ValueError, match="beyond"):
        mean_ablation_edit(means, [-(len(means) + 1)])


def test_check_disjoint_names_an_overlapping_prompt():
    check_disjoint(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="'the dog ran'"):
        check_disjoint(["x", "the dog ran"], REF)


# -- the flattening control ------------------------------------------------------------------------------------------
CANDS = list(range(48, 57))  # nine "digits"


def test_a_pure_temperature_change_is_all_flattening():
    g = torch.Generator().manual_seed(6)
    n = 12
    base = torch.randn(n, 100, generator=g, dtype=torch.float64) * 3
    gold = torch.tensor([CANDS[i % 9] for i in range(n)])
    T_true = torch.linspace(0.5, 4.0, n, dtype=torch.float64)
    fr = flattening_control(base, base / T_true[:, None], gold, CANDS)
    assert len(fr) == n and (fr["k"] == 9).all()
    assert np.allclose(fr["temperature"], T_true.numpy(), rtol=1e-6)
    assert np.allclose(fr["excess_gain"], 0, atol=1e-8)
    assert np.allclose(fr["gain_flattening"], fr["gain_ablation"], atol=1e-8)
    assert np.allclose(fr["uniform_logp"], -math.log(9))
    assert (fr["base_rank"] == fr["ablated_rank"]).all()  # a temperature never changes a rank
    assert not fr["temperature_clipped"].any()
    # restricted softmax: only the candidates' logits matter
    other = base.clone()
    other[:, :48] += 100
    assert np.allclose(flattening_control(other, base / T_true[:, None], gold, CANDS)["excess_gain"], 0, atol=1e-8)


def test_entropy_rises_with_temperature_and_the_solver_follows():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, 20, generator=g, dtype=torch.float64).expand(8, -1) * 2
    Ts = torch.tensor([0.2, 0.5, 0.9, 1.0, 1.5, 3.0, 10.0, 100.0], dtype=torch.float64)
    fr = flattening_control(base, base / Ts[:, None], torch.full((8,), 3), list(range(20)))
    assert np.all(np.diff(fr["ablated_entropy"]) > 0)
    assert np.all(np.diff(fr["temperature"]) > 0)
    assert np.allclose(fr["temperature"], Ts.numpy(), rtol=1e-5)
    assert fr["ablated_entropy"].iloc[-1] < math.log(20)


def test_gold_rank_and_a_gain_beyond_flattening():
    base = torch.zeros(3, 10)
    base[:, 0:4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    abl = base.clone()
    abl[0, 2] = 5.0  # row 0: the gold (token 2) promoted to the top: not a temperature change
    abl[1] = 0.0  # row 1: flat -> uniform entropy is out of the temperature range's reach, clipped
    gold = torch.tensor([2, 3, 0])
    fr = flattening_control(base, abl, gold, [0, 1, 2, 3])
    assert fr["base_rank"].tolist() == [3, 4, 1]
    assert fr["ablated_rank"].tolist() == [1, 1, 1]  # ties count in the gold's favour
    assert fr["excess_gain"].iloc[0] > 1 and fr["raises_gold"].iloc[0]
    # row 1: gold below uniform is raised to uniform, and a temperature to the same entropy does (almost) as much
    assert fr["ablated_logp"].iloc[1] == pytest.approx(-math.log(4))
    assert fr["temperature_clipped"].iloc[1] and fr["temperature"].iloc[1] == 1e3
    assert abs(fr["excess_gain"].iloc[1]) < 0.01 and fr["gain_ablation"].iloc[1] > 1
    # row 2: nothing changed
    assert fr["gain_ablation"].iloc[2] == pytest.approx(0, abs=1e-12) and fr["temperature"].iloc[2] == \
        pytest.approx(1.0, rel=1e-6)
    # equal base logits: no temperature changes them
    flat = flattening_control(torch.zeros(1, 5), torch.tensor([[1.0, 0, 0, 0, 0]]), [0], [0, 1, 2])
    assert math.isnan(flat["temperature"].iloc[0]) and flat["gain_flattening"].iloc[0] == 0
    with pytest.raises(ValueError, match="not among its candidates"):
        flattening_control(base, abl, torch.tensor([2, 3, 7]), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="repeat"):
        flattening_control(base, abl, gold, [0, 1, 1, 3])
    with pytest.raises(ValueError, match="rows"):
        flattening_control(base, abl[:2], gold, [0, 1, 2, 3])
