"""The encoded-vs-expressed study on tiny random models: the replications' measurements against hand-made hooks and
plain forwards, the repeated-item task, VIP/TVI, the study's config checks, tables, figures and explorer."""

import random

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import workbench.data.vqa as vqa
from workbench.data.reasoning import arithmetic_chains
from workbench.data.tasks import make_task
from workbench.methods.latent import LatentConfig
from workbench.studies.encoded_expressed.explorer import encoded_expressed_explorer
from workbench.studies.encoded_expressed.replications import (
    digit_readout,
    integration_curve,
    late_suppression,
    mlp_means,
    mlp_sweep,
    overwrite_layers,
    soft_thinking_threads,
    vip_tvi,
)
from workbench.studies.encoded_expressed.study import EncodedExpressedConfig, run_encoded_expressed_study, shipped_tuned_lens
from workbench.studies.encoded_expressed.tasks import counting_task, latent_task
from workbench.testing.tiny import tiny_model, tiny_vlm


@pytest.fixture(scope="module")
def m():
    return tiny_model("llama")


def _counting(m, n=27):
    ts = make_task("list_length", n, seed=0, answer_prefix="")
    prompts = [p + " " for p in ts.prompts]
    digits = [m.tokenizer.encode(str(c), add_special_tokens=False)[0] for c in range(1, 10)]
    return prompts, np.asarray(ts.counts) - 1, digits


def test_repeated_items_and_delimiters():
    ts = make_task("list_length", 18, seed=0, repeat=True, distinct=False, delimiter="\n")
    for p, c, meta, spans in zip(ts.prompts, ts.counts, ts.meta, ts.mention_char_spans):
        items = meta["items"]
        assert len(items) == c and len(set(items)) == 1
        assert p == "Items: " + "\n".join(items) + ". Count:"
        assert [p[a:b] for a, b in spans] == items
    plain = make_task("list_length", 9, seed=3)
    assert all(", " in p or c == 1 for p, c in zip(plain.prompts, plain.counts))
    with pytest.raises(ValueError, match="contradict"):
        make_task("list_length", 9, seed=0, repeat=True)
    with pytest.raises(ValueError, match="delimiter"):
        make_task("list_length", 9, seed=0, delimiter="")


def test_no_ablation_is_the_plain_forward_and_zero_ablation_matches_a_hand_hook(m):
    prompts, labels, digits = _counting(m)
    base = digit_readout(m, prompts, labels, digits, batch_size=8)
    enc = m.encode(prompts)
    with torch.no_grad():
        z = m.hf(**enc).logits[:, -1].float()
    lp = torch.log_softmax(z[:, digits], -1)
    assert base["digit_acc"] == pytest.approx(float((lp.argmax(-1).numpy() == labels).mean()))
    assert base["gold_logprob"] == pytest.approx(float(lp[torch.arange(len(labels)), labels].mean()), abs=1e-5)
    sup = late_suppression(m, prompts, labels, digits, last=(1, 2), batch_size=8)
    assert list(sup.ablation) == ["none", "zero", "mean", "zero", "mean"]
    # zero-ablate the last block's MLP by a forward hook on the MLP module itself (no workbench hook)
    L = m.n_layers
    handle = m.hf.model.layers[L - 1].mlp.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            zz = m.hf(**enc).logits[:, -1].float()
    finally:
        handle.remove()
    lpz = torch.log_softmax(zz[:, digits], -1)
    row = sup[(sup.ablation == "zero") & (sup.n_last == 1)].iloc[0]
    assert row.gold_logprob == pytest.approx(float(lpz[torch.arange(len(labels)), labels].mean()), abs=1e-5)
    with pytest.raises(ValueError, match="last"):
        late_suppression(m, prompts, labels, digits, last=(L + 1,))


def test_mlp_means_average_every_real_position(m):
    prompts, _, _ = _counting(m, n=9)
    means = mlp_means(m, prompts, [0, 1], batch_size=4)
    outs = []
    handle = m.hf.model.layers[1].mlp.register_forward_hook(lambda mod, args, out: outs.append(out.detach()))
    try:
        for p in prompts:  # one prompt at a time: no padding at all
            with torch.no_grad():
                m.hf(**m.encode([p]))
    finally:
        handle.remove()
    want = torch.cat([o[0] for o in outs]).double().mean(0).float()
    torch.testing.assert_close(means[1], want, rtol=1e-4, atol=1e-5)


def test_overwrite_layers_reads_the_drop_and_the_best_ablation():
    curve = pd.DataFrame({"layer": [0, 1, 2, 3, 4], "lens_gold_logprob": [-2.0, -1.0, -0.5, -1.5, -1.6]})
    sweep = pd.DataFrame({"block": [0, 1, 2, 3], "depth": [0.25, 0.5, 0.75, 1.0], "logprob_change": [0, 0.1, 0.9, 0.2],
                          "acc_change": [0, 0, 0.2, 0]})
    panel = pd.DataFrame({"index": [0, 1, 2, 3, 4], "probe_acc": [0.1, 0.8, 0.9, 0.4, 0.2], "chance": 0.1})
    out = overwrite_layers(curve, sweep, 4, panel)
    assert out["lens_peak_layer"] == 2 and out["lens_drop_block"] == 2 and out["lens_drop_depth"] == 0.75
    assert out["mlp_block"] == 2 and out["mlp_depth"] == 0.75
    assert out["probe_peak_layer"] == 2 and out["probe_drop_layer"] == 3  # 0.4 <= 0.1 + (0.9 - 0.1) / 2
    # the largest drop anywhere, also before the curve's highest point
    early = overwrite_layers(curve.assign(lens_gold_logprob=[-2.0, -0.5, -3.0, -2.0, -0.1]), sweep, 4)
    assert early["lens_peak_layer"] == 4 and early["lens_drop_block"] == 1


def test_mlp_sweep_rows(m):
    prompts, labels, digits = _counting(m, n=9)
    sweep = mlp_sweep(m, prompts, labels, digits, blocks=[0, m.n_layers - 1])
    assert list(sweep.block) == [0, m.n_layers - 1]
    assert sweep.depth.iloc[-1] == 1.0


def test_vip_tvi_definition():
    c = pd.Series([0.0, 0.01, 0.02, 0.2, 0.3, 0.4], index=range(6))
    out = vip_tvi(c)
    assert out["vip"] == 3 and out["vip_depth"] == 0.6 and out["tvi"] == pytest.approx(0.9 / 5)  # 0.2 = half of 0.4
    assert np.isnan(vip_tvi(pd.Series([0.0, 0.0]))["vip"])
    with pytest.raises(ValueError, match="fraction"):
        vip_tvi(c, fraction=1.5)


def test_integration_curve_is_zero_at_the_embeddings_and_compares_the_same_tokens():
    vlm = tiny_vlm("llava", seed=0, processor=True)
    rng = random.Random(0)
    items = [vqa.VQAItem(Image.new("RGB", (32, 32), tuple(rng.randint(0, 255) for _ in range(3))),
                         q, "red", "colour", "circle", "red", None, f"t:{k}")
             for k, q in enumerate(["what color is the circle?", "what is the color of this shape?", "colour?"])]
    curve = integration_curve(vlm, items, batch_size=2)
    assert set(curve.layer) == set(range(vlm.n_layers + 1)) and len(curve) == 3 * (vlm.n_layers + 1)
    assert curve[curve.layer == 0].dist_text.abs().max() < 1e-6  # same token embeddings with and without image
    assert curve[curve.layer > 0].dist_text.max() > 1e-4  # the image reaches the text through attention


def test_latent_task_and_soft_threads(m):
    rs = arithmetic_chains(12, seed=0)
    cfg = LatentConfig(mode="coconut", n_steps=2, batch_size=6)
    gt, extra = latent_task(m, rs, cfg, n_train=8, min_pairs=1, n_pairs=4)
    assert gt.features.shape == (2, 12, m.d_model) and gt.read_layers == [m.n_layers] * 2
    torch.testing.assert_close(gt.features[1], extra["run"].states[:, 1, m.n_layers])
    with pytest.raises(ValueError, match="Cold Stop"):
        latent_task(m, rs, LatentConfig(mode="soft", n_steps=2, cold_stop_entropy=0.1), n_train=8)
    with pytest.raises(ValueError, match="plain was run"):
        soft_thinking_threads(m, rs, n_steps=2, taus=(), batch_size=6, plain=extra["run"])  # a coconut run
    steps, summary = soft_thinking_threads(m, rs, n_steps=2, taus=(0.5,), batch_size=6)
    assert list(summary.gumbel_tau) == ["none", "0.5"] and len(steps) == 4
    assert ((steps.top_share > 0) & (steps.top_share <= 1)).all()


def test_counting_task_patches_exactly_when_rows_are_right(m):
    gt, extra = counting_task(m, "list_length", n=36, n_train=24, seed=0, layers=[0, 2, m.n_layers], n_pairs=4,
                              min_pairs=1, batch_size=8)
    assert gt.axis_values == [0, 2, m.n_layers]
    method = gt.patching.patch_method.iloc[0]
    assert method == ("exact" if extra["accuracy"] > 0 else "atp")
    if method == "exact":
        assert gt.patching.patch_recovery.iloc[-1] == pytest.approx(1.0, abs=1e-4)


def test_gap_config_checks_before_any_forward():
    with pytest.raises(ValueError, match="tasks=\\('nope',\\)"):
        EncodedExpressedConfig(tasks=("nope",))
    with pytest.raises(ValueError, match="latent_modes"):
        EncodedExpressedConfig(latent_modes=("direct",))
    with pytest.raises(ValueError, match="n_train < n_prompts"):
        EncodedExpressedConfig(n_prompts=10, n_train=10)
    with pytest.raises(ValueError, match="tuned_lens"):
        EncodedExpressedConfig(tuned_lens="maybe")
    with pytest.raises(ValueError, match="gumbel"):
        EncodedExpressedConfig(gumbel_taus=(0.0,))
    with pytest.raises(ValueError, match="delimiters"):
        EncodedExpressedConfig(delimiters=("",))
    with pytest.raises(ValueError, match="latent_task"):
        EncodedExpressedConfig(latent_task="graph")


def test_study_on_a_tiny_model_tables_figures_explorer(m, tmp_path, monkeypatch):
    cfg = EncodedExpressedConfig(tasks=("list_length",), vlms=(), n_prompts=36, n_train=24, n_pairs=3, min_pairs=1,
                    n_latent_items=12, n_latent_train=8, n_steps=2, gumbel_taus=(0.5,), delimiters=(", ", " "),
                    n_delimiter=27, n_delimiter_train=18, ablate_last=(1,), batch_size=8)
    result = run_encoded_expressed_study(cfg, model=m, progress=False)
    assert set(result.panel.thread) == {"counting", "latent"}
    assert "tuned_acc" not in result.panel  # no tuned lens for a tiny model: the column is left out
    assert set(result.summary().thread) == {"counting", "latent"}
    assert set(result.figures()) == {"panel_counting", "panel_latent", "late_suppression", "delimiter_sweep",
                                     "soft_single_threaded"}
    assert list(result.delimiter_summary.delimiter) == ["comma", "space"]
    monkeypatch.setenv("WORKBENCH_HEADLESS", "1")
    fig = encoded_expressed_explorer(result, thread="latent")
    assert "latent" in fig.layout.title.text
    with pytest.raises(ValueError, match="thread"):
        encoded_expressed_explorer(result, thread="visual")
    assert shipped_tuned_lens(m, "none") is None
    with pytest.raises(ValueError, match="ablate_last"):
        run_encoded_expressed_study(EncodedExpressedConfig(ablate_last=(m.n_layers + 1,)), model=m, progress=False)
    with pytest.raises(ValueError, match="not a vision-language model"):  # before any forward of the text model
        run_encoded_expressed_study(EncodedExpressedConfig(vlms=("tiny",)), model=m, vlm_models={"tiny": tiny_model("gpt2")}, progress=False)
