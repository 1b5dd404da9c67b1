"""The gap panel and readout-position patching (workbench.methods.encoded_expressed) on tiny random models, checked against
Hugging Face's own outputs and hand-computed gradients; the latent loop's patch option and top-weight record."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.data.reasoning import arithmetic_chains
from workbench.methods.encoded_expressed import (
    GapTask,
    class_cosines,
    gap_panel,
    make_pairs,
    random_baseline,
)
from workbench.methods.latent import LatentConfig, run_latent
from workbench.methods.patching import residual_patching
from workbench.methods.tuned_lens import TunedLens
from workbench.plotting.curves import gap_figure
from workbench.testing.tiny import tiny_model

PROMPTS = [f"{a} {b}" for a in ("the cat sat", "a dog ran", "one bird flew", "my fish swam")
           for b in ("on", "in", "by", "up", "at", "to")]


@pytest.fixture(scope="module")
def m():
    return tiny_model("llama")


def _hf_last(m, prompts):
    """Last-position hidden states of every layer and the logits, from HF's output_hidden_states (no trace)."""
    enc = m.encode(prompts)
    with torch.no_grad():
        out = m.hf(**enc, output_hidden_states=True)
    return torch.stack([h[:, -1] for h in out.hidden_states]).float(), out.logits[:, -1].float()


def _task(m, labels, ids, **kw):
    H, _ = _hf_last(m, PROMPTS)
    # HF's last hidden state is after the final norm; the panel reads residuals, so layer L is re-captured pre-norm
    H = H[:-1]
    n = len(PROMPTS)
    return GapTask(name="t", features=H, labels=np.asarray(labels), classes=[str(i) for i in ids], candidate_ids=ids,
                   train_idx=np.arange(0, n, 2), test_idx=np.arange(1, n, 2), axis_values=list(range(H.shape[0])),
                   **kw)


def test_last_layer_lens_is_the_model_and_the_tuned_identity_is_the_logit_lens(m):
    _, logits = _hf_last(m, PROMPTS)
    ids = list(dict.fromkeys(logits.argmax(-1).tolist()))[:3]  # tokens the model itself says, so classes vary
    assert len(ids) >= 2
    labels = logits[:, ids].argmax(-1).numpy()  # the model's own answer: it "answers right" on every row
    from workbench.core.sites import layer_site
    from workbench.core.trace import trace
    sites = [layer_site(v) for v in range(m.n_layers + 1)]
    with torch.no_grad(), trace(m, sites, positions=-1) as tr:
        m.hf(**m.encode(PROMPTS))
    feats = torch.stack([tr[s] for s in sites]).float()
    n = len(PROMPTS)
    task = GapTask(name="own", features=feats, labels=labels, classes=[str(i) for i in ids], candidate_ids=ids,
                   train_idx=np.arange(0, n, 2), test_idx=np.arange(1, n, 2))
    panel = gap_panel(m, task)
    last = panel[panel["index"] == m.n_layers].iloc[0]
    assert last.lens_acc == 1.0
    te = np.arange(1, n, 2)
    top1 = (logits[te].argmax(-1) == torch.tensor(ids)[labels[te]]).double().mean()
    assert last.lens_top1 == pytest.approx(float(top1))
    assert "tuned_acc" not in panel
    tuned = gap_panel(m, task, tuned_lens=TunedLens.for_model(m))  # zero translators: the logit lens itself
    assert (tuned.tuned_acc == tuned.lens_acc).all() and (tuned.tuned_top1 == tuned.lens_top1).all()
    # the layer-L features equal HF's pre-norm input to the head: HF's last hidden state is their final norm
    H, _ = _hf_last(m, PROMPTS)
    torch.testing.assert_close(m.final_norm(feats[-1]), H[-1], rtol=1e-5, atol=1e-5)


def test_probe_reads_a_planted_class_and_cosines_follow_the_rows(m):
    torch.manual_seed(0)
    n, d = 90, m.d_model
    labels = np.arange(n) % 3
    ids = [5, 9, 17]
    rows = m.W_U.detach()[ids].double()
    X = torch.randn(2, n, d) * 0.1
    X[1] += 3 * rows[labels].float()  # slice 1 encodes the class along its unembedding row
    task = GapTask(name="planted", features=X, labels=labels, classes=["a", "b", "c"], candidate_ids=ids,
                   train_idx=np.arange(60), test_idx=np.arange(60, 90), axis_values=[0, m.n_layers])
    panel = gap_panel(m, task)
    assert panel.probe_acc.iloc[1] == 1.0 and panel.probe_acc.iloc[0] < 0.7
    assert panel.probe_cos.iloc[1] > 5 * panel.cos_random.iloc[1]
    assert panel.cos_random.iloc[0] == pytest.approx(math.sqrt(2 / (math.pi * d)))
    # intervals over the 30 held-out rows; the best slice is tested against the max over both slices
    assert panel.n_test.eq(30).all() and panel.probe_acc_lo.iloc[1] > 0.85 and panel.probe_acc_hi.iloc[1] == 1.0
    assert panel.probe_max_p.iloc[0] < 0.01 and (panel.probe_acc_lo <= panel.probe_acc).all()
    noise = gap_panel(m, GapTask(name="noise", features=torch.randn(4, n, d), labels=labels, classes=["a", "b", "c"],
                                 candidate_ids=ids, train_idx=np.arange(60), test_idx=np.arange(60, 90)))
    assert noise.probe_max_p.iloc[0] > 0.05 and noise.probe_max_threshold.iloc[0] > 1 / 3  # the max of 4 is higher
    # identical rows are one unit: with every held-out row repeated, the interval is the grouped bootstrap
    grouped = gap_panel(m, GapTask(name="planted", features=X, labels=labels, classes=["a", "b", "c"],
                                   candidate_ids=ids, train_idx=np.arange(60), test_idx=np.arange(60, 90),
                                   axis_values=[0, m.n_layers], groups=[(i // 6, i % 3) for i in range(n)]))
    assert grouped.n_units.iloc[0] == 15 and grouped.n_test.iloc[0] == 30
    # the ordinal reading: a count written along one direction is read by a ridge regression rounded to a class
    ordinal = torch.randn(2, n, d) * 0.1
    ordinal[1] += torch.as_tensor(labels, dtype=torch.float32)[:, None] * torch.randn(d) / d ** 0.5
    op = gap_panel(m, GapTask(name="ordinal", features=ordinal, labels=labels, classes=["1", "2", "3"],
                              candidate_ids=ids, train_idx=np.arange(60), test_idx=np.arange(60, 90),
                              axis_values=[0, m.n_layers]), ridge_round=True)
    assert op.ridge_round_acc.iloc[1] > 0.9 and op.ridge_round_acc.iloc[0] < 0.7
    assert "ridge_round_acc" not in panel
    # contrasts: adding one vector to every class changes nothing
    shift = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(class_cosines(rows * 2 + shift, rows), torch.ones(3, dtype=torch.float64))


def test_gap_task_rejects_bad_input(m):
    X = torch.zeros(2, 6, m.d_model)
    ok = dict(name="t", features=X, labels=np.array([0, 1, 0, 1, 0, 1]), classes=["a", "b"], candidate_ids=[1, 2],
              train_idx=[0, 1, 2], test_idx=[3, 4, 5])
    GapTask(**ok)
    with pytest.raises(ValueError, match="overlap"):
        GapTask(**ok | {"test_idx": [2, 3]})
    with pytest.raises(ValueError, match="labels must lie"):
        GapTask(**ok | {"labels": np.array([0, 1, 2, 0, 1, 0])})
    with pytest.raises(ValueError, match="repeat a token"):
        GapTask(**ok | {"candidate_ids": [1, 1]})
    with pytest.raises(ValueError, match="axis must be"):
        GapTask(**ok | {"axis": "depth"})
    with pytest.raises(ValueError, match="read_layers"):
        GapTask(**ok | {"axis": "step"})
    with pytest.raises(ValueError, match="lacks columns"):
        GapTask(**ok | {"patching": pd.DataFrame({"index": [0]})})
    with pytest.raises(ValueError, match="width"):
        gap_panel(m, GapTask(**ok | {"features": torch.zeros(2, 6, 3)}))
    with pytest.raises(ValueError, match="d must be"):
        random_baseline(0)


def test_make_pairs_cleans_are_right_and_classes_differ():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    right = np.array([1, 0, 1, 0, 0, 1, 0, 0], bool)
    pairs = make_pairs(labels, right, n_pairs=10, seed=0)
    assert sorted(c for c, _ in pairs) == [0, 2, 5]
    assert all(labels[c] != labels[x] for c, x in pairs)
    assert len(make_pairs(labels, right, n_pairs=10, seed=0, require_right=False)) == 8


def _pair_setup(m):
    clean = ["the cat sat on the mat", "a dog ran in the park", "one bird flew over the mat"]
    corrupt = ["my fish swam in the mat", "two cows ate the park", "the frog sat on a log mat"]  # same last tokens
    return clean, corrupt, [7, 8, 9], [10, 11, 12]


def test_exact_residual_patching_is_one_at_the_last_layer_and_zero_at_an_equal_embedding(m):
    clean, corrupt, a, w = _pair_setup(m)
    frame = residual_patching(m, clean, corrupt, a, w, m.encode, batch_size=2)
    assert list(frame["index"]) == list(range(m.n_layers + 1))
    assert frame.patch_recovery.iloc[-1] == pytest.approx(1.0, abs=1e-5)
    assert frame.patch_recovery.iloc[0] == pytest.approx(0.0, abs=1e-6)  # the last tokens' embeddings are equal
    # clean and corrupt metrics are the HF logits' differences
    def metric(prompts, ids_a, ids_w):
        enc = m.encode(prompts)
        with torch.no_grad():
            z = m.hf(**enc).logits[:, -1].double()
        return (z[torch.arange(len(prompts)), ids_a] - z[torch.arange(len(prompts)), ids_w]).mean()
    assert frame.clean_metric.iloc[0] == pytest.approx(float(metric(clean, a, w)), abs=1e-4)
    assert frame.corrupt_metric.iloc[0] == pytest.approx(float(metric(corrupt, a, w)), abs=1e-4)


def test_attribution_patching_is_the_first_order_estimate(m):
    clean, corrupt, a, w = _pair_setup(m)
    L = m.n_layers
    atp = residual_patching(m, clean, corrupt, a, w, m.encode, method="atp", layers=[L], batch_size=8)
    # by hand at the last layer: the metric is a function of the last residual through norm + head only
    from workbench.core.sites import layer_site
    from workbench.core.trace import trace
    with torch.no_grad(), trace(m, [layer_site(L)], positions=-1) as tc:
        m.hf(**m.encode(clean))
    with torch.no_grad(), trace(m, [layer_site(L)], positions=-1) as tx:
        m.hf(**m.encode(corrupt))
    hc, hx = tc[layer_site(L)].double(), tx[layer_site(L)].double().requires_grad_(True)
    z = m.lens_logits(hx.to(m.dtype)).double()
    r = torch.arange(3)
    mx = z[r, a] - z[r, w]
    (g,) = torch.autograd.grad(mx.sum(), hx)
    zc = m.lens_logits(hc.to(m.dtype)).double()
    mc = zc[r, a] - zc[r, w]
    want = float(((hc - hx) * g).sum(-1).mean() / (mc - mx.detach()).mean())
    assert atp.patch_recovery.iloc[0] == pytest.approx(want, rel=1e-3, abs=1e-5)
    with pytest.raises(ValueError, match="method"):
        residual_patching(m, clean, corrupt, a, w, m.encode, method="ig")
    with pytest.raises(ValueError, match="same answer"):
        residual_patching(m, clean, corrupt, a, a, m.encode)
    with pytest.raises(ValueError, match="layers"):
        residual_patching(m, clean, corrupt, a, w, m.encode, layers=[L + 1])


def test_latent_patch_with_own_inputs_changes_nothing_and_others_change_the_states(m):
    rs = arithmetic_chains(4, seed=0)
    cfg = LatentConfig(mode="coconut", n_steps=3, batch_size=2)
    run = run_latent(m, rs, cfg)
    same = run_latent(m, rs, cfg, patch={1: run.inputs[:, 1]})
    assert torch.equal(same.states, run.states) and (same.items.answer_text == run.items.answer_text).all()
    other = run_latent(m, rs, cfg, patch={1: run.inputs[[1, 0, 3, 2], 1]})
    assert torch.equal(other.states[:, :2], run.states[:, :2])  # steps up to the patched input are untouched
    assert not torch.equal(other.states[:, 2], run.states[:, 2])
    with pytest.raises(ValueError, match="patch step"):
        run_latent(m, rs, cfg, patch={3: run.inputs[:, 0]})
    with pytest.raises(ValueError, match="patch\\[0\\]"):
        run_latent(m, rs, cfg, patch={0: run.inputs[:2, 0]})


def test_soft_runs_record_the_top_weight(m):
    rs = arithmetic_chains(3, seed=1)
    soft = run_latent(m, rs, LatentConfig(mode="soft", n_steps=2, keep_top_n=4))
    top = soft.top_weight
    assert ((top > 0.25 - 1e-9) & (top <= 1 + 1e-9)).all()  # the largest of 4 renormalised weights
    noisy = run_latent(m, rs, LatentConfig(mode="soft", n_steps=2, keep_top_n=4, gumbel_tau=0.5))
    assert ((noisy.top_weight >= 0.25 - 1e-9) & (noisy.top_weight <= 1 + 1e-9)).all()
    assert torch.isnan(run_latent(m, rs, LatentConfig(mode="coconut", n_steps=2)).top_weight).all()


def test_gap_figure_leaves_out_missing_columns(m):
    panel = pd.DataFrame({"task": "t", "axis": "layer", "index": [0, 1, 2], "probe_acc": [0.1, 0.5, 0.9],
                          "chance": 0.1, "lens_acc": [0.1, 0.1, 0.2], "lens_top1": 0.0, "probe_cos": 0.05,
                          "cos_random": 0.03})
    fig = gap_figure(panel)
    names = {t.name for t in fig.data}
    assert "tuned lens among answers" not in names and "patch recovery" not in names
    assert "probe (encoded)" in names
    with pytest.raises(ValueError, match="empty"):
        gap_figure(panel.iloc[:0])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefix_cache_patching_equals_full_forwards(family):
    mm = tiny_model(family)
    clean, corrupt, a, w = _pair_setup(mm)
    fast = residual_patching(mm, clean, corrupt, a, w, mm.encode, batch_size=2)
    full = residual_patching(mm, clean, corrupt, a, w, mm.encode, batch_size=2, prefix_cache=False)
    np.testing.assert_allclose(fast.patch_recovery, full.patch_recovery, rtol=1e-4, atol=1e-5)
