"""Activation and attribution patching: exact scores equal hand-made patches, attribution equals autograd, IG is
complete, checkpoints resume, bad pairs fail before any forward. The residual patching of the last position (inputs
of any length, on a prefix cache) against whole forwards patched by hooks placed by hand."""

import random

import numpy as np
import pandas as pd
import pytest
import torch

import workbench
from workbench.core.sites import head_shape
from workbench.core.trace import trace
from workbench.data.ioi import make_ioi_pairs, single_token_names
from workbench.methods.patching import (
    activation_patching,
    attribution_patching,
    check_pairs,
    patching_agreement,
    residual_patching,
    site_of,
)
from workbench.testing.tiny import tiny_model, tiny_vlm

PAIRS = [
    {"clean": "abcdef", "corrupt": "abxdef", "answer": "a", "wrong": "b"},
    {"clean": "hello there", "corrupt": "jello there", "answer": "o", "wrong": "e"},
]
ALL = ("resid", "attn", "mlp", "head")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def exact(llama):
    return activation_patching(llama, PAIRS, site_types=ALL, progress=False, batch_size=16)


def _metric(model, logits, pair):
    a = model.tokenizer.encode(pair["answer"], add_special_tokens=False)[0]
    w = model.tokenizer.encode(pair["wrong"], add_special_tokens=False)[0]
    return float(logits[0, -1, a] - logits[0, -1, w])


def test_exact_scores_equal_hand_made_patches(llama, exact):
    d_head = head_shape(llama.hf.config)[1]
    for i, pair in enumerate(PAIRS):
        clean, corrupt = llama.encode([pair["clean"]]), llama.encode([pair["corrupt"]])
        with torch.no_grad():
            base = _metric(llama, llama.hf(**corrupt).logits, pair)
        for st, layer, head, pos in [("resid", 1, -1, 3), ("mlp", 2, -1, -1), ("attn", 0, -1, 2), ("head", 1, 2, -1)]:
            site = site_of(st, layer)
            with torch.no_grad(), trace(llama, [site]) as tr:
                llama.hf(**clean)
            src = tr[site]
            sl = slice(head * d_head, (head + 1) * d_head) if head >= 0 else slice(None)

            def edit(t, src=src, sl=sl, pos=pos):
                out = t.clone()
                out[:, pos, sl] = src[:, pos, sl]
                return out

            with torch.no_grad(), trace(llama, edits={site: edit}):
                want = _metric(llama, llama.hf(**corrupt).logits, pair) - base
            T = clean["input_ids"].shape[1]  # noqa: F841 - used by the query below
            row = exact.frame.query("pair == @i and site_type == @st and layer == @layer and head == @head "
                                    "and position == @pos % @T")
            assert len(row) == 1
            assert row.score.item() == pytest.approx(want, abs=1e-5)


def test_untouched_positions_score_exactly_zero_and_the_changed_token_recovers_all(llama, exact):
    f = exact.frame[(exact.frame.pair == 0) & (exact.frame.site_type == "resid") & (exact.frame.layer == 0)]
    changed = f.token == "c"  # "abcdef" vs "abxdef": only this position differs entering block 0
    assert (f.loc[~changed, "score"] == 0).all()
    assert f.loc[changed, "recovery"].item() == pytest.approx(1.0, abs=1e-4)
    assert set(exact.frame.columns) >= {"pair", "site_type", "layer", "head", "position", "from_end", "token", "score",
                                        "recovery", "method"}
    n_heads = head_shape(llama.hf.config)[0]
    T = 7  # <bos> a b c d e f
    assert len(exact.frame.query("pair == 0 and site_type == 'head'")) == 3 * T * n_heads


def test_atp_equals_the_gradient_from_plain_autograd(llama):
    """Independent AtP on HF hidden_states (retain_grad): resid_pre l = hidden_states[l]."""
    atp = attribution_patching(llama, PAIRS[:1], site_types="resid", progress=False)
    assert all(p.grad is None for p in llama.hf.parameters())  # no parameter gradient accumulated
    pair = PAIRS[0]
    clean, corrupt = llama.encode([pair["clean"]]), llama.encode([pair["corrupt"]])
    with torch.no_grad():
        hc = llama.hf(**clean, output_hidden_states=True).hidden_states
    with torch.enable_grad():
        out = llama.hf(**corrupt, output_hidden_states=True)
        hs = out.hidden_states
        for h in hs:
            h.retain_grad()
        a = llama.tokenizer.encode("a", add_special_tokens=False)[0]
        b = llama.tokenizer.encode("b", add_special_tokens=False)[0]
        (out.logits[0, -1, a] - out.logits[0, -1, b]).backward()
    for layer in range(llama.n_layers):
        want = ((hc[layer] - hs[layer].detach()) * hs[layer].grad)[0].sum(-1)
        got = atp.frame.query("site_type == 'resid' and layer == @layer").sort_values("position").score
        torch.testing.assert_close(torch.tensor(got.values, dtype=torch.float32), want, rtol=1e-4, atol=1e-6)
    llama.hf.zero_grad(set_to_none=True)  # this test's own backward


def test_ig_is_complete_at_the_embedding_site(llama):
    """Integrated gradients from the embedding: the layer-0 residual scores sum to metric(clean) - metric(corrupt)."""
    ig = attribution_patching(llama, PAIRS, method="ig", steps=64, site_types="resid", blocks=[0], progress=False)
    for i, b in ig.baselines.iterrows():
        total = ig.frame.query("pair == @i").score.sum()
        assert total == pytest.approx(b.clean_metric - b.corrupt_metric, rel=2e-3, abs=1e-4)


def test_agreement_and_timing(llama, exact):
    atp = attribution_patching(llama, PAIRS, site_types=ALL, progress=False)
    ig = attribution_patching(llama, PAIRS, method="ig", steps=4, site_types=ALL, progress=False)
    agree = patching_agreement(exact, atp, ig)
    assert set(agree.site_type) == {"resid", "attn", "mlp", "head", "all"}
    assert agree.spearman.between(-1, 1).all() and (agree.speedup > 0).all()
    # resid at block 0 is an exact linearisation target for IG: it ranks the changed position first
    assert agree.query("method == 'ig' and site_type == 'resid'").spearman.item() > 0.3
    with pytest.raises(ValueError, match="other units"):
        patching_agreement(exact, attribution_patching(llama, PAIRS, site_types="mlp", progress=False))
    with pytest.raises(ValueError, match="exact sweep"):
        patching_agreement(atp, ig)


def test_maps(exact):
    m = exact.mean_map("resid")
    assert m.index.tolist() == [0, 1, 2] and (m.columns < 0).all()
    assert exact.mean_map("head").shape[0] == 3
    with pytest.raises(ValueError, match="no 'x' units|no"):
        exact.mean_map("x")


def test_checkpoint_resumes_identically_and_refuses_another_run(tmp_path, llama):
    a = activation_patching(llama, PAIRS, site_types="mlp", checkpoint=tmp_path / "ck", progress=False)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "unit-pair-00000.json" in files and "unit-pair-00001.json" in files
    (tmp_path / "ck" / "unit-pair-00001.json").unlink()  # as if interrupted after the first pair
    b = activation_patching(llama, PAIRS, site_types="mlp", checkpoint=tmp_path / "ck", progress=False)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    with pytest.raises(ValueError, match="another run"):
        activation_patching(llama, PAIRS, site_types="attn", checkpoint=tmp_path / "ck", progress=False)


def test_bad_input_fails_before_any_forward(llama):
    def boom(*a, **k):
        raise AssertionError("a forward ran")

    hf_forward = llama.hf.forward
    llama.hf.forward = boom
    try:
        with pytest.raises(ValueError, match="same length"):
            activation_patching(llama, [{**PAIRS[0], "corrupt": "abxxdef"}], progress=False)
        with pytest.raises(ValueError, match="one token"):
            activation_patching(llama, [{**PAIRS[0], "answer": "ab"}], progress=False)
        with pytest.raises(ValueError, match="same token"):
            activation_patching(llama, [{**PAIRS[0], "wrong": "a"}], progress=False)
        with pytest.raises(ValueError, match="site_types"):
            activation_patching(llama, PAIRS, site_types=("resid", "neurons"), progress=False)
        with pytest.raises(ValueError, match=r"blocks \[7\] out of range"):
            activation_patching(llama, PAIRS, blocks=[7], progress=False)
        with pytest.raises(ValueError, match="positions"):
            activation_patching(llama, PAIRS, positions=[40], progress=False)
        with pytest.raises(ValueError, match="metric"):
            attribution_patching(llama, PAIRS, metric="accuracy", progress=False)
        with pytest.raises(ValueError, match="'atp' or 'ig'"):
            attribution_patching(llama, PAIRS, method="exact", progress=False)
        with pytest.raises(ValueError, match="lacks columns"):
            activation_patching(llama, pd.DataFrame({"clean": ["a"]}), progress=False)
        with pytest.raises(ValueError, match="empty"):
            activation_patching(llama, [], progress=False)
    finally:
        llama.hf.forward = hf_forward


def test_hooks_are_removed_when_the_metric_raises(llama):
    def bad_metric(logits, a, w):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        attribution_patching(llama, PAIRS, metric=bad_metric, progress=False)
    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(llama, PAIRS, metric=bad_metric, progress=False)
    assert workbench.active_hooks() == []


def test_ioi_pairs_line_up_for_the_real_tokenizer(smollm2):
    pairs = make_ioi_pairs(12, seed=1, tokenizer=smollm2.tokenizer)
    assert len(single_token_names(smollm2.tokenizer)) >= 10
    checked = check_pairs(smollm2, pairs)  # same length, single-token answers
    assert len(checked) == 12 and (pairs.answer != pairs.wrong).all()
    assert make_ioi_pairs(12, seed=1, tokenizer=smollm2.tokenizer).equals(pairs)
    with pytest.raises(ValueError, match="at least 2 names"):
        make_ioi_pairs(3, names=("Mary",))


# -- the residual at the last position (residual_patching) -----------------------------------------------------------
CLEAN = ["the cat sat on the mat", "a dog ran in the park", "one bird flew over the mat", "xy"]
CORRUPT = ["my fish swam in the mat", "two cows ate the park", "the frog sat on a log mat", "a long prompt here y"]


def _by_hand(m, enc_of, clean, corrupt, a, w, layers, method):
    """Recovery per hidden-state layer from whole forwards patched (exact) or differentiated (AtP) through hooks placed
    by hand on the decoder layers (layer v < L: the input of decoder layer v; v = L: the output of the last one)."""
    L = m.n_layers
    r = torch.arange(len(a))
    a, w = torch.tensor(a), torch.tensor(w)

    def run(enc, layer=None, fn=None):
        """Last-position logits of a whole forward whose residual at ``layer`` goes through ``fn``; and the input."""
        seen = {}
        if layer is None:
            handle = None
        elif layer < L:
            def pre(mod, args, kwargs):
                if args:
                    h = fn(args[0])
                    seen["h"] = h
                    return (h, *args[1:]), kwargs
                kwargs["hidden_states"] = seen["h"] = fn(kwargs["hidden_states"])
                return args, kwargs
            handle = m.module(m.arch.layer_path(layer)).register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(mod, args, out):
                h = fn(out[0] if isinstance(out, tuple) else out)
                seen["h"] = h
                return (h, *out[1:]) if isinstance(out, tuple) else h
            handle = m.module(m.arch.layer_path(L - 1)).register_forward_hook(post)
        try:
            z = m.hf(**enc).logits[:, -1].double()
        finally:
            if handle is not None:
                handle.remove()
        return z[r, a] - z[r, w], seen.get("h")

    cb, xb = enc_of(clean), enc_of(corrupt)
    rows = {}
    with torch.no_grad():
        mc, _ = run(cb)
        mx, _ = run(xb)
    for v in layers:
        with torch.no_grad():
            _, hc = run(cb, v, lambda h: h)
            _, hx = run(xb, v, lambda h: h)
        if method == "exact":
            def patch(h, src=hc[:, -1]):
                out = h.clone()
                out[:, -1] = src
                return out
            with torch.no_grad():
                mp, _ = run(xb, v, patch)
        else:
            delta = torch.zeros(len(a), m.d_model, requires_grad=True)

            def add(h, delta=delta):
                out = h.clone()
                out[:, -1] = out[:, -1] + delta.to(h.dtype)
                return out
            metric, _ = run(xb, v, add)
            (g,) = torch.autograd.grad(metric.sum(), delta)
            mp = mx + ((hc[:, -1] - hx[:, -1]).double() * g.double()).sum(-1)
        rows[v] = float((mp - mx).mean())  # the mean change of the logit difference (logit units)
    return rows, float(mc.mean()), float(mx.mean())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("method", ["exact", "atp"])
def test_residual_patching_equals_hand_patched_whole_forwards(family, method):
    m = tiny_model(family)
    a, w = [7, 8, 9, 10], [11, 12, 13, 14]
    layers = list(range(m.n_layers + 1))
    want, mc, mx = _by_hand(m, m.encode, CLEAN, CORRUPT, a, w, layers, method)
    for prefix_cache in ((True, False) if method == "exact" else (True,)):
        got = residual_patching(m, CLEAN, CORRUPT, a, w, m.encode, method=method, batch_size=3,
                                prefix_cache=prefix_cache)
        assert got["index"].tolist() == layers
        assert got.clean_metric.iloc[0] == pytest.approx(mc, abs=1e-5)
        assert got.corrupt_metric.iloc[0] == pytest.approx(mx, abs=1e-5)
        # compared in logit units (recovery x the clean - corrupt gap): a small gap would magnify float noise
        change = got.patch_recovery * (got.clean_metric - got.corrupt_metric)
        np.testing.assert_allclose(change, [want[v] for v in layers], rtol=1e-4, atol=2e-6)
    if method == "exact":
        assert got.patch_recovery.iloc[-1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", ["exact", "atp"])
def test_residual_patching_of_vlm_inputs_equals_hand_patched_whole_forwards(method):
    from PIL import Image

    from workbench.data.vqa import VQAItem
    from workbench.methods.answering import vqa_inputs

    vlm = tiny_vlm("llava", seed=0, processor=True)
    rng = random.Random(0)
    items = [VQAItem(Image.new("RGB", (32, 32), tuple(rng.randint(0, 255) for _ in range(3))), q, "red", "colour")
             for q in ["what color is the circle?", "what is the color of this shape?", "colour?", "which colour?"]]

    def encode(chunk):
        return vqa_inputs(vlm, [it.image for it in chunk], [it.question for it in chunk])

    a, w = [ord("r")] * 2, [ord("g")] * 2
    layers = [0, 1, vlm.n_layers]
    want, mc, mx = _by_hand(vlm, encode, items[:2], items[2:], a, w, layers, method)
    got = residual_patching(vlm, items[:2], items[2:], a, w, encode, layers=layers, method=method, batch_size=2)
    if method == "exact":  # the prefix-cache step equals whole patched forwards of the encoded items
        full = residual_patching(vlm, items[:2], items[2:], a, w, encode, layers=layers, batch_size=2,
                                 prefix_cache=False)
        np.testing.assert_allclose(got.patch_recovery, full.patch_recovery, rtol=1e-4, atol=1e-5)
    change = got.patch_recovery * (got.clean_metric - got.corrupt_metric)
    np.testing.assert_allclose(change, [want[v] for v in layers], rtol=1e-4, atol=2e-6)


def test_one_meaning_of_layers_and_blocks(llama):
    """``layers=`` is hidden-state layers (check_layers) wherever it appears; the patching of block units takes
    ``blocks=`` and refuses ``layers=``."""
    L = llama.n_layers
    frame = residual_patching(llama, CLEAN[:2], CORRUPT[:2], [7, 8], [9, 10], llama.encode, layers=[-1, 0])
    assert frame["index"].tolist() == [0, L]
    with pytest.raises(ValueError, match="layers"):
        residual_patching(llama, CLEAN[:2], CORRUPT[:2], [7, 8], [9, 10], llama.encode, layers=[L + 1])
    with pytest.raises(TypeError, match="layers"):
        activation_patching(llama, PAIRS, layers=[0], progress=False)
    res = activation_patching(llama, PAIRS, site_types="resid", blocks=[-1], positions=-1, progress=False)
    assert res.frame["layer"].unique().tolist() == [L - 1] and res.config["blocks"] == [L - 1]
