"""Probes: ridge recovers a planted direction (in raw coordinates, whatever the feature scales), matches sklearn,
picks strong regularisation on noise; artifacts round-trip bit for bit and refuse tampered weights; residual
features equal a direct trace capture."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.core.sites import layer_site
from workbench.data.tasks import make_task
from workbench.io.artifact import ArtifactError
from workbench.io.atomic import sha256_file
from workbench.io.owned import OWNER_FILE
from workbench.methods.probes.base import (
    PROBE_CARD_FILE,
    PROBE_WEIGHTS_FILE,
    load_probe,
    probe_dir,
    probe_round_accuracy,
    save_probe,
)
from workbench.methods.probes.features import residual_features
from workbench.methods.probes.layerwise import layerwise_logistic, layerwise_ridge
from workbench.methods.probes.linear import ALPHAS, LogisticProbe, RidgeProbe, fit_softmax_regression
from workbench.testing.tiny import tiny_model


def _cos(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(a @ b / (a.norm() * b.norm()))


def planted(n=400, d=20, noise=0.01, seed=0):
    """Features with scales 1e-3..1e3 and a target built from equal contributions of every feature."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** torch.linspace(-3, 3, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * scales + 5 * scales
    w_raw = torch.randn(d, generator=g, dtype=torch.float64) / scales
    y = X @ w_raw + 2.0 + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y, w_raw


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model("llama")


def test_ridge_recovers_direction_across_scales():
    X, y, w_raw = planted()
    probe = RidgeProbe().fit(X[:300], y[:300])
    assert probe.r2(X[300:], y[300:]) > 0.999
    assert _cos(probe.direction_raw, w_raw) > 0.99
    assert abs(_cos(probe.coef_std, w_raw)) < 0.9  # the sigma mapping is what makes it right
    assert probe.alpha in ALPHAS and set(probe.alpha_scores) == set(ALPHAS)
    # predictions are affine in the raw direction
    const = probe.predict(X[:1]) - X[:1] @ probe.direction_raw
    torch.testing.assert_close(probe.predict(X[300:]), X[300:] @ probe.direction_raw + const)


@pytest.mark.parametrize("n, d", [(120, 30), (30, 80)])  # primal and dual (n < d) regimes
@pytest.mark.parametrize("alpha", [1e-2, 1.0, 100.0])
def test_closed_form_matches_sklearn_ridge(n, d, alpha):
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, d, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64) + X[:, 0]
    probe = RidgeProbe(alpha=alpha).fit(X, y)
    Xs = ((X - probe.mean) / probe.std).numpy()
    sk = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(Xs, y.numpy())
    np.testing.assert_allclose(probe.coef_std.numpy(), sk.coef_, rtol=0, atol=1e-8)
    assert probe.intercept == pytest.approx(float(sk.intercept_), abs=1e-8)
    np.testing.assert_allclose(probe.predict(X).numpy(), sk.predict(Xs), rtol=0, atol=1e-8)
    assert probe.alpha == alpha and probe.alpha_scores == {}


def test_alpha_selection_prefers_strong_penalty_on_noise():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(200, 50, generator=g, dtype=torch.float64)
    y = torch.randn(200, generator=g, dtype=torch.float64)
    probe = RidgeProbe(seed=0).fit(X, y)
    assert probe.alpha == max(ALPHAS)
    Xc, yc, _ = planted(noise=0.01)
    assert RidgeProbe().fit(Xc, yc).alpha < 1.0  # clean signal: little penalty


def test_probe_round_accuracy():
    pred = torch.tensor([0.4, 1.6, 9.7, 3.49, 6.2, 4.0])
    y = torch.tensor([1, 2, 9, 3, 6, 5])
    assert probe_round_accuracy(pred, y) == pytest.approx(5 / 6)
    assert probe_round_accuracy(np.array([-3.0, 12.0]), [1, 9]) == 1.0


def test_ridge_bad_inputs():
    X, y, _ = planted(n=50, d=5)
    with pytest.raises(ValueError, match="alphas"):
        RidgeProbe(alphas=[0.1, -1])
    with pytest.raises(ValueError, match="val_fraction"):
        RidgeProbe(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"shape \[50\]"):
        RidgeProbe().fit(X, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        RidgeProbe().fit(torch.full((50, 5), float("nan")), y)
    with pytest.raises(ValueError, match="constant"):
        RidgeProbe().fit(X, torch.ones(50))
    with pytest.raises(ValueError, match="not fitted"):
        RidgeProbe().predict(X)
    with pytest.raises(ValueError, match="X has 5 features, the probe was fitted on 4"):
        RidgeProbe().fit(X[:, :4], y).predict(X)


def test_logistic_probe_classifies():
    g = torch.Generator().manual_seed(3)
    centers = 4 * torch.randn(4, 10, generator=g, dtype=torch.float64)
    y = torch.arange(200) % 4 + 1
    X = centers[y - 1] + torch.randn(200, 10, generator=g, dtype=torch.float64)
    probe = LogisticProbe().fit(X[:150], y[:150])
    assert probe.accuracy(X[150:], y[150:]) > 0.95
    assert probe.classes.tolist() == [1, 2, 3, 4] and probe.coef.shape == (4, 10)
    assert torch.allclose(probe.predict_proba(X[:5]).sum(-1), torch.ones(5, dtype=torch.float64))
    binary = LogisticProbe(C=1.0).fit(X[y <= 2], y[y <= 2])
    assert binary.coef.shape == (2, 10) and binary.accuracy(X[y <= 2], y[y <= 2]) > 0.95


def _blobs(n=240, d=12, k=5, seed=4):
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % k + 1
    return centers[y - 1] + torch.randn(n, d, generator=g, dtype=torch.float64) * 3.0, y


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_logistic_probe_matches_sklearn(C):
    from sklearn.linear_model import LogisticRegression

    X, y = _blobs()
    probe = LogisticProbe(C=C).fit(X[:180], y[:180])
    Xs = ((X - probe.mean) / probe.std).numpy()
    clf = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(Xs[:180], y[:180].numpy())
    ref = torch.from_numpy(clf.predict_proba(Xs[180:]))
    assert torch.allclose(probe.predict_proba(X[180:]), ref, atol=1e-4)
    assert torch.equal(probe.predict(X[180:]), torch.from_numpy(clf.predict(Xs[180:])))


def test_batched_softmax_regression_equals_separate_fits():
    X1, y = _blobs(seed=5)
    X2, _ = _blobs(seed=6)
    Xb = torch.stack([X1, X2])
    t = y - 1
    W, c = fit_softmax_regression(Xb, t, 5, 0.5, tol=1e-10)
    for i in range(2):
        Wi, ci = fit_softmax_regression(Xb[i : i + 1], t, 5, 0.5, tol=1e-10)
        assert torch.allclose(W[i], Wi[0], atol=1e-5) and torch.allclose(c[i], ci[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"\[b, n, d\]"):
        fit_softmax_regression(X1, t, 5, 1.0)


def test_layerwise_logistic_equals_one_probe_per_layer():
    X1, y = _blobs(seed=7)
    X2 = X1 + 0.3 * _blobs(seed=8)[0]
    feats = {0: X1, 3: X2}
    tr, te = np.arange(0, 180), np.arange(180, 240)
    table = layerwise_logistic(feats, y, tr, te, C=0.5, tol=1e-8)
    assert table.layer.tolist() == [0, 3]
    for layer, X in feats.items():
        alone = LogisticProbe(C=0.5).fit(X[tr], y[tr])
        row = table.set_index("layer").loc[layer]
        assert row.logistic_acc == alone.accuracy(X[te], y[te])
        assert row.logistic_acc_train == alone.accuracy(X[tr], y[tr])
    batched = layerwise_logistic(feats, y, tr, te, C=0.5, tol=1e-8, batched=True)  # one L-BFGS run for all layers
    pd.testing.assert_frame_equal(batched, table)
    with pytest.raises(ValueError, match="overlap"):
        layerwise_logistic(feats, y, tr, np.arange(170, 200))
    with pytest.raises(ValueError, match="single class"):
        layerwise_logistic(feats, torch.ones(240), tr, te)


def test_save_load_roundtrip_bit_identical(tmp_path, model):
    X, y, _ = planted()
    probe = RidgeProbe().fit(X[:300], y[:300])
    folder = probe_dir(model.name, "entity", 2, root=tmp_path)
    assert folder == tmp_path / "probes" / "tiny-llama" / "entity" / "layer_02"
    ts = make_task("entity", 10, seed=0)
    save_probe(probe, folder, model=model, site=layer_site(2), layer=2, task="entity",
               generator_params=ts.params, seed=0, metrics={"r2_test": probe.r2(X[300:], y[300:])})
    assert sorted(p.name for p in folder.iterdir()) == sorted([PROBE_CARD_FILE, PROBE_WEIGHTS_FILE, OWNER_FILE])
    card = json.loads((folder / PROBE_CARD_FILE).read_text())
    assert card["weights_sha256"] == sha256_file(folder / PROBE_WEIGHTS_FILE)
    assert card["model"]["name"] == "tiny-llama" and card["model"]["weights_hash"] == model.weights_hash
    assert card["model"]["tied_head"] is True
    assert card["site"] == "blocks.1.hook_resid_post" and card["layer"] == 2 and card["task"] == "entity"
    assert card["generator_params"]["options"]["n_distractors"] == [0, 4]
    assert card["probe_type"] == "ridge" and card["hyperparams"]["alpha"] == probe.alpha
    assert {"torch", "transformers", "numpy", "scikit-learn", "workbench"} <= set(card["versions"])

    loaded = load_probe(folder)
    assert isinstance(loaded, RidgeProbe) and loaded.alpha == probe.alpha
    assert torch.equal(loaded.predict(X), probe.predict(X))
    assert torch.equal(loaded.direction_raw, probe.direction_raw)
    assert loaded.card["weights_sha256"] == card["weights_sha256"]

    clf = LogisticProbe(C=1.0).fit(X, (y > y.median()).long())
    save_probe(clf, tmp_path / "clf", model={"name": "m", "weights_hash": "abc"}, site="s", layer=None,
               task="entity", generator_params=None, seed=None, metrics={})
    clf2 = load_probe(tmp_path / "clf")
    assert torch.equal(clf2.logits(X), clf.logits(X)) and torch.equal(clf2.predict(X), clf.predict(X))


def test_tampered_weights_are_refused(tmp_path):
    X, y, _ = planted(n=60, d=6)
    save_probe(RidgeProbe().fit(X, y), tmp_path, model={"name": "m", "weights_hash": "h"}, site="s", layer=1,
               task="t", generator_params={}, seed=0, metrics={})
    recorded = json.loads((tmp_path / PROBE_CARD_FILE).read_text())["weights_sha256"]
    data = bytearray((tmp_path / PROBE_WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (tmp_path / PROBE_WEIGHTS_FILE).write_bytes(bytes(data))
    actual = sha256_file(tmp_path / PROBE_WEIGHTS_FILE)
    with pytest.raises(ValueError) as err:
        load_probe(tmp_path)
    assert recorded[:12] in str(err.value) and actual[:12] in str(err.value)  # both hashes named


def test_unknown_probe_type_and_missing_files(tmp_path):
    X, y, _ = planted(n=60, d=6)
    save_probe(RidgeProbe().fit(X, y), tmp_path, model={"name": "m", "weights_hash": "h"}, site="s", layer=1,
               task="t", generator_params={}, seed=0, metrics={})
    card = json.loads((tmp_path / PROBE_CARD_FILE).read_text())
    card["probe_type"] = "no_such_type"
    (tmp_path / PROBE_CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"probe_type 'no_such_type'.*known types"):
        load_probe(tmp_path)
    with pytest.raises(ArtifactError, match="no probe folder"):
        load_probe(tmp_path / "nothing")
    with pytest.raises(ValueError, match="not JSON"):
        save_probe(RidgeProbe().fit(X, y), tmp_path / "x", model={"name": "m", "weights_hash": "h"}, site="s",
                   layer=1, task="t", generator_params={"f": object()}, seed=0, metrics={})


def test_layerwise_ridge_batched_equals_one_probe_per_layer():
    """All layers fitted at once (batched SVDs) give each layer the probe RidgeProbe.fit gives it alone."""
    g = torch.Generator().manual_seed(9)
    y = torch.arange(1, 10).repeat(25).double()
    feats = {layer: torch.randn(225, 12, generator=g, dtype=torch.float64) + (layer / 3) * y[:, None]
             for layer in (0, 2, 5)}
    feats[2][:, 3] = 7.0  # a constant feature: std floored to 1 in both paths
    tr, te = np.arange(0, 170), np.arange(170, 225)
    res = layerwise_ridge(feats, y, tr, te, seed=3)
    for layer, X in feats.items():
        alone = RidgeProbe(seed=3).fit(X[tr], y[tr])
        got = res.probes[layer]
        assert got.alpha == alone.alpha and got.n_train == alone.n_train
        torch.testing.assert_close(got.coef_std, alone.coef_std, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got.mean, alone.mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(got.std, alone.std, rtol=0, atol=1e-12)
        assert got.intercept == pytest.approx(alone.intercept, abs=1e-12)
        for a in alone.alpha_scores:
            assert got.alpha_scores[a] == pytest.approx(alone.alpha_scores[a], abs=1e-9)


def test_layerwise_ridge_table():
    g = torch.Generator().manual_seed(4)
    y = torch.arange(1, 10).repeat(20).double()
    feats = {0: torch.randn(180, 8, generator=g, dtype=torch.float64)}
    feats[1] = feats[0].clone()
    feats[1][:, 0] += 50 * y
    res = layerwise_ridge(feats, y, np.arange(0, 140), np.arange(140, 180))
    assert list(res.table.layer) == [0, 1] and set(res.probes) == {0, 1}
    assert {"r2_test", "round_acc_test", "alpha", "r2_val", "r2_train"} <= set(res.table.columns)
    assert res.table.set_index("layer").loc[1, "r2_test"] > 0.99
    assert res.table.set_index("layer").loc[1, "round_acc_test"] == 1.0
    assert res.table.set_index("layer").loc[0, "r2_test"] < 0.2
    assert res.best_layer() == 1
    with pytest.raises(ValueError, match="share"):
        layerwise_ridge(feats, y, np.arange(0, 140), np.arange(130, 180))


def test_residual_features_last_position_equals_trace(model):
    prompts = make_task("list_length", 7, seed=0, answer_prefix="").prompts
    layers = [0, 1, model.n_layers]
    feats = residual_features(model, prompts, layers, batch_size=3)
    assert set(feats) == set(layers)
    for i, prompt in enumerate(prompts):  # rows come back in prompt order although batches are formed by length
        with wb.trace(model, [layer_site(l) for l in layers], positions=-1) as tr, torch.no_grad():
            model.hf(**model.encode([prompt]))
        for l in layers:
            torch.testing.assert_close(feats[l][i : i + 1], tr[layer_site(l)].float(), rtol=1e-5, atol=1e-6)
    # the same numbering as HF hidden_states (last block output is before the final norm)
    with torch.no_grad():
        hs = model.hf(**model.encode(prompts[:3]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats[0][:3], hs[0][:, -1])
    torch.testing.assert_close(feats[1][:3], hs[1][:, -1])
    last = residual_features(model, prompts, -1, batch_size=16)[model.n_layers]
    torch.testing.assert_close(last, feats[model.n_layers])


def test_residual_features_mention_mean(model):
    ts = make_task("entity", 6, seed=1, answer_prefix="")
    positions = ts.mention_token_positions(model.tokenizer)
    layers = [0, 2]
    feats = residual_features(model, ts.prompts, layers, positions=positions, batch_size=4)
    enc = model.encode(ts.prompts)
    T = enc["input_ids"].shape[1]
    lengths = enc["attention_mask"].sum(-1)
    with wb.trace(model, [layer_site(l) for l in layers]) as tr, torch.no_grad():
        model.hf(**enc)
    for l in layers:
        full = tr[layer_site(l)]
        for b, pos in enumerate(positions):
            idx = [T - int(lengths[b]) + p for p in pos]
            assert torch.equal(enc["input_ids"][b, idx], torch.tensor(model.tokenizer(ts.prompts[b])["input_ids"])[pos])
            torch.testing.assert_close(feats[l][b], full[b, idx].mean(0), rtol=1e-5, atol=1e-6)
    # a single position per prompt equals the plain capture at that position
    one = residual_features(model, ts.prompts, [2], positions=[[p[0]] for p in positions])
    for b, pos in enumerate(positions):
        torch.testing.assert_close(one[2][b], tr[layer_site(2)][b, T - int(lengths[b]) + pos[0]])


def test_residual_features_bad_inputs(model):
    with pytest.raises(ValueError, match="layers"):
        residual_features(model, ["abc"], [model.n_layers + 1])
    with pytest.raises(ValueError, match="outside its"):
        residual_features(model, ["abc"], [1], positions=[[0, 9]])
    with pytest.raises(ValueError, match="one list of token positions per prompt"):
        residual_features(model, ["abc", "de"], [1], positions=[[0]])
    with pytest.raises(ValueError, match="positions must be 'last'"):
        residual_features(model, ["abc"], [1], positions="first")
    with pytest.raises(ValueError, match="batch_size"):
        residual_features(model, ["abc"], [1], batch_size=0)


def test_residual_features_stops_after_deepest_layer(model):
    calls = []
    handle = model.module(model.arch.layer_path(model.n_layers - 1)).register_forward_hook(lambda *a: calls.append(1))
    try:
        residual_features(model, ["abc", "de"], [0, 1])
        assert calls == []  # the last block never ran
        residual_features(model, ["abc", "de"], [model.n_layers])
        assert calls == [1]
    finally:
        handle.remove()


def test_residual_features_many_is_one_pass_with_the_same_rows(model):
    from workbench.methods.probes.features import residual_features_many

    ts = make_task("entity", 9, seed=2, answer_prefix="")
    mentions = ts.mention_token_positions(model.tokenizer)
    both = residual_features_many(model, ts.prompts, [0, 2], {"last": "last", "mentions": mentions}, batch_size=4)
    assert torch.equal(both["last"][2], residual_features(model, ts.prompts, [2], batch_size=4)[2])
    assert torch.equal(both["mentions"][0],
                       residual_features(model, ts.prompts, [0], positions=mentions, batch_size=4)[0])
    with pytest.raises(ValueError, match="non-empty dict"):
        residual_features_many(model, ts.prompts, [0], {})
