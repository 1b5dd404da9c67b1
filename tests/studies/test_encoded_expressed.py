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
from workbench.methods.answering import candidate_token_ids
from workbench.methods.controls import flattening_control
from workbench.studies.encoded_expressed.replications import (
    across_models,
    best_block_test,
    chain_of_embedding,
    digit_readout,
    integration_point,
    late_suppression,
    mlp_sweep,
    overwrite_layers,
    pool_suppression,
    soft_thinking_threads,
    suppression_verdict,
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


def _hand_logprob(m, prompts, labels, digits, hook_module=None, hook=None):
    enc = m.encode(prompts)
    handle = hook_module.register_forward_hook(hook) if hook_module is not None else None
    try:
        with torch.no_grad():
            z = m.hf(**enc).logits[:, -1].float()
    finally:
        if handle is not None:
            handle.remove()
    lp = torch.log_softmax(z[:, digits], -1)
    return lp, float(lp[torch.arange(len(labels)), torch.as_tensor(labels)].mean())


def test_readout_is_the_plain_forward_and_zero_ablation_matches_a_hand_hook(m):
    prompts, labels, digits = _counting(m)
    base = digit_readout(m, prompts, labels, digits, batch_size=8)
    lp, gold = _hand_logprob(m, prompts, labels, digits)
    assert base["digit_acc"] == pytest.approx(float((lp.argmax(-1).numpy() == labels).mean()))
    assert base["gold_logprob"] == pytest.approx(gold, abs=1e-5)
    ref, ev = prompts[:14], prompts[14:]
    sup, per_prompt = late_suppression(m, ev, labels[14:], digits, reference=ref, last=(1, 2), batch_size=8)
    assert [(a, k) for a, k in zip(sup.ablation, sup.n_last)] == [("zero", 1), ("mean", 1), ("zero", 2), ("mean", 2)]
    assert list(sup.base_logprob) == pytest.approx([_hand_logprob(m, ev, labels[14:], digits)[1]] * 4, abs=1e-5)
    # zero-ablate the last block's MLP by a forward hook on the MLP module itself (no workbench hook)
    L = m.n_layers
    _, want = _hand_logprob(m, ev, labels[14:], digits, m.hf.model.layers[L - 1].mlp,
                            lambda mod, args, out: torch.zeros_like(out))
    row = sup[(sup.ablation == "zero") & (sup.n_last == 1)].iloc[0]
    assert row.gold_logprob == pytest.approx(want, abs=1e-5)
    assert row.n == len(ev) and row.n_excluded == 0 and {"excess_gain_lo", "rank_change", "digit_acc_hi"} <= set(row.index)
    assert len(per_prompt) == 4 * len(ev)
    with pytest.raises(ValueError, match="last"):
        late_suppression(m, ev, labels[14:], digits, reference=ref, last=(L + 1,))
    with pytest.raises(ValueError, match="also in the reference set"):  # the reference set must be disjoint from the ablated prompts
        late_suppression(m, ev, labels[14:], digits, reference=ref + ev[:1], last=(1,))


def test_mean_ablation_writes_the_reference_sets_per_position_mean(m):
    """The mean row equals a hand hook that writes, at each position counted from the end, the mean MLP output of
    the reference prompts at that position (each reference prompt run alone: no padding)."""
    prompts, labels, digits = _counting(m)
    ref, ev = prompts[:14], prompts[14:]
    L = m.n_layers
    outs = []
    h = m.hf.model.layers[L - 1].mlp.register_forward_hook(lambda mod, args, out: outs.append(out.detach()[0]))
    try:
        for p in ref:
            with torch.no_grad():
                m.hf(**m.encode([p]))
    finally:
        h.remove()
    T = max(len(o) for o in outs)
    table = torch.zeros(T, m.d_model, dtype=torch.float64)
    count = torch.zeros(T, dtype=torch.float64)
    for o in outs:
        table[T - len(o):] += o.double()
        count[T - len(o):] += 1
    table = (table / count[:, None]).float()

    def write(mod, args, out):
        return table[T - out.shape[1]:].expand_as(out).to(out.dtype)

    _, want = _hand_logprob(m, ev, labels[14:], digits, m.hf.model.layers[L - 1].mlp, write)
    sup, _ = late_suppression(m, ev, labels[14:], digits, reference=ref, last=(1,), batch_size=8)
    assert sup[sup.ablation == "mean"].gold_logprob.iloc[0] == pytest.approx(want, abs=1e-4)


class _Scale(torch.nn.Module):
    """A planted MLP: its output is alpha times its input."""

    def __init__(self, alpha):
        super().__init__()
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * x


def test_an_ablation_that_only_flattens_shows_no_gain_after_the_flattening_control():
    """A tiny model whose last MLP only sharpens: with the norms made identities, the last block writes alpha times
    the residual, so zeroing that MLP divides every logit by 1 + alpha, a pure temperature change. The gold digit
    sits below uniform, so its log-prob rises, and the control must call all of it flattening."""
    tm = tiny_model("llama")
    L = tm.n_layers
    tm.hf.model.layers[L - 1].post_attention_layernorm = torch.nn.Identity()
    tm.hf.model.norm = torch.nn.Identity()
    tm.hf.model.layers[L - 1].mlp = _Scale(3.0)
    with torch.no_grad():  # the tiny model's residual is small without the final norm: spread the digits' logits
        tm.hf.lm_head.weight.mul_(30.0)
    prompts, _, digits = _counting(tm, n=40)
    lp, _ = _hand_logprob(tm, prompts, np.zeros(len(prompts), int), digits)
    labels = lp.argmin(-1).numpy()  # plant the gold at the least likely digit: far below uniform
    sup, _ = late_suppression(tm, prompts[20:], labels[20:], digits, reference=prompts[:20], last=(1,), batch_size=8)
    zero = sup[sup.ablation == "zero"].iloc[0]
    assert zero.logprob_change > 0.1  # the raw gain a reader would have reported
    assert abs(zero.excess_gain) < 1e-6 and zero.flattening_gain == pytest.approx(zero.logprob_change, abs=1e-6)
    assert zero.rank_change == 0 and zero.acc_change == 0
    assert suppression_verdict(zero).startswith("no: the gain is what flattening gives")


def test_a_planted_suppression_is_called_beyond_flattening():
    """Logits where the ablation moves the gold to the top (a real suppression removed) against a pure flattening,
    pooled over two seeds: the verdicts differ as they should."""
    rng = np.random.default_rng(0)
    n, k = 60, 9
    base = torch.as_tensor(rng.normal(size=(n, k)) * 2)
    gold = torch.as_tensor(rng.integers(0, k, n))
    base[torch.arange(n), gold] = base.min(1).values - 1  # suppressed: the gold is last
    up = base.clone()
    up[torch.arange(n), gold] = base.max(1).values + 1  # the ablation gives it back
    frames = []
    for name, z in (("planted", up), ("flat", base / 4)):
        flat = flattening_control(base, z, gold, list(range(k)))
        flat["base_correct"] = (base.argmax(-1) == gold).numpy()
        flat["ablated_correct"] = (z.argmax(-1) == gold).numpy()
        frames.append(flat.assign(task=name, ablation="mean", n_last=2, seed=np.arange(n) % 2,
                                  prompt=[f"p{i}" for i in range(n)]))
    pooled = pool_suppression(pd.concat(frames, ignore_index=True)).set_index("task")
    assert pooled.loc["planted", "verdict"].startswith("holds") and pooled.loc["planted", "seeds_up"] == 2
    assert pooled.loc["planted", "acc_change_lo"] > 0.9 and bool(pooled.loc["planted", "paper_condition"])
    assert pooled.loc["flat", "verdict"] == "no: the gain is what flattening gives"


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


def _sweep_frame(means, n=60, sd=1.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for b, mu in enumerate(means):
        x = rng.normal(mu, sd, n)
        rows += [{"block": b, "depth": (b + 1) / len(means), "unit": f"u{i}", "prompt": f"p{i}", "gain_ablation": v}
                 for i, v in enumerate(x)]
    return pd.DataFrame(rows)


def test_best_block_is_tested_against_the_max_over_blocks():
    planted = best_block_test(_sweep_frame([0, 0, 0.8, 0, 0, 0, 0, 0]))
    assert planted["block"] == 2 and planted["p_max"] < 0.01 and planted["gain_lo"] > 0
    # a strongly destructive block does not hide a helpful one (a sign-flip null would)
    assert best_block_test(_sweep_frame([-5, 0, 0.8, 0, 0, 0, 0, 0]))["p_max"] < 0.01
    # nothing helps: the winner of 30 noisy blocks is rarely significant once the max is accounted for, while its
    # own interval (the uncorrected reading) excludes 0 most of the time
    null = [best_block_test(_sweep_frame([0.0] * 30, seed=s), n_boot=500) for s in range(40)]
    assert np.mean([t["p_max"] < 0.05 for t in null]) <= 0.15
    assert np.mean([t["gain_lo"] > 0 for t in null]) >= 0.4
    assert best_block_test(_sweep_frame([0, 0, 0.8, 0]))["in_band_share"] == 0.0  # block 2 of 4 is at 75 %


def test_mlp_sweep_rows(m):
    prompts, labels, digits = _counting(m, n=9)
    sweep, per_prompt = mlp_sweep(m, prompts, labels, digits, blocks=[0, m.n_layers - 1])
    assert list(sweep.block) == [0, m.n_layers - 1]
    assert sweep.depth.iloc[-1] == 1.0
    assert len(per_prompt) == 2 * 9 and {"excess_gain", "acc_change", "prompt"} <= set(per_prompt.columns)


def test_integration_point_finds_the_planted_layer():
    """Vision-dependent items separate from vision-independent ones from layer 5 on: the VIP is 5 and TVI the mean
    distance from there; with no separation there is no VIP."""
    rng = np.random.default_rng(0)
    n, L = 60, 10
    dep = np.arange(n) < 30
    D = np.abs(rng.normal(0.05, 0.01, (n, L + 1)))
    D[:, 0] = 0
    D[dep, 5:] += 0.3
    out = integration_point(D, dep)
    assert out["vip"] == 5 and out["vip_depth"] == 0.5
    np.testing.assert_allclose(out["tvi_items"], D[:, 5:].mean(1))
    flat = integration_point(np.abs(rng.normal(0.05, 0.01, (n, L + 1))), dep)
    assert np.isnan(flat["vip"]) and "not above tau" in flat["reason"]
    assert "needs at least 2" in integration_point(D, np.arange(n) < 1)["reason"]
    with pytest.raises(ValueError, match="one row per item"):
        integration_point(D, dep[:-1])


def test_across_models_says_what_a_handful_of_points_give():
    f = pd.DataFrame({"tvi": [0.1, 0.2, 0.3, 0.4], "prior_rate": [0.8, 0.5, 0.6, 0.1]})
    out = across_models(f)
    assert out["n_models"] == 4 and -1 <= out["r_lo"] < out["r"] < out["r_hi"] <= 1
    assert out["r_hi"] - out["r_lo"] > 0.9  # four points: the interval spans most of [-1, 1]
    assert np.isnan(across_models(f.iloc[:2])["r"])


def test_chain_of_embedding_is_zero_at_the_embeddings_and_compares_the_same_tokens():
    vlm = tiny_vlm("llava", seed=0, processor=True)
    rng = random.Random(0)
    items = [vqa.VQAItem(Image.new("RGB", (32, 32), tuple(rng.randint(0, 255) for _ in range(3))),
                         q, "red", "colour", "circle", "red", None, f"t:{k}")
             for k, q in enumerate(["what color is the circle?", "what is the color of this shape?", "colour?"])]
    ids = candidate_token_ids(vlm.processor.tokenizer, ["red", "blue", "green"])
    last, text, answers = chain_of_embedding(vlm, items, ids, batch_size=2)
    assert last.shape == text.shape == (3, vlm.n_layers + 1)
    assert np.abs(last[:, 0]).max() < 1e-6 and np.abs(text[:, 0]).max() < 1e-6  # same token embeddings
    assert last[:, 1:].max() > 1e-4  # the image reaches the last token through attention
    assert list(answers.columns[:3]) == ["item", "answer_image", "answer_blind"]
    assert answers.changes.dtype == bool


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
                    n_delimiter=27, n_delimiter_train=18, ablate_last=(1,), batch_size=8, vip_vlms=(), extra_seeds=(1,))
    result = run_encoded_expressed_study(cfg, model=m, progress=False)
    # late suppression: one row per seed and condition, and the pooled rows with their verdicts
    assert set(result.suppression.seed) == {"0", "1", "all"}
    verdicts = result.suppression_verdicts()
    assert len(verdicts) == 2 and verdicts.n_seeds.eq(2).all() and verdicts.verdict.str.len().gt(0).all()
    assert (verdicts.n > 12).all()  # both seeds' held-out prompts
    # the delimiter sweep's winner is tested against the max over blocks, over both seeds' prompts
    d = result.delimiter_summary
    assert {"mlp_p_max", "mlp_logprob_gain_lo", "mlp_excess_gain", "accuracy_lo", "seed_winners"} <= set(d.columns)
    # the paper's delimiter (space) on both draws, the others on the first
    assert list(d.n_seeds) == [1, 2] and list(d.seed_winners.str.count(",")) == [0, 1]
    assert {"probe_acc_lo", "probe_max_p", "n_test"} <= set(result.panel.columns)
    assert result.summary().probe_max_p.between(0, 1).all()
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
    with pytest.raises(ValueError, match="extra_seeds"):
        run_encoded_expressed_study(EncodedExpressedConfig(extra_seeds=(0,)), model=m, progress=False)
    with pytest.raises(ValueError, match="seeded_delimiters"):
        run_encoded_expressed_study(EncodedExpressedConfig(delimiters=(", ",)), model=m, progress=False)
    with pytest.raises(ValueError, match="not a vision-language model"):  # before any forward of the text model
        run_encoded_expressed_study(EncodedExpressedConfig(vlms=("tiny",)), model=m, vlm_models={"tiny": tiny_model("gpt2")}, progress=False)


def test_visual_integration_on_two_tiny_vlms_gives_one_row_each_and_the_correlation_says_n(m):
    from workbench.core.models import load_model

    vlms = {name: load_model(name) for name in ("tiny-vlm", "tiny-vlm-s1")}  # the testbed's tokenizer and prompt
    cfg = EncodedExpressedConfig(tasks=(), latent_modes=(), vlms=(), vip_vlms=tuple(vlms), n_vlm_items=6,
                                 delimiters=(", ",), seeded_delimiters=(), n_delimiter=27, n_delimiter_train=18, n_latent_items=12,
                                 n_latent_train=8, n_steps=1, gumbel_taus=(), batch_size=8, layers=(0, 1, 2))
    result = run_encoded_expressed_study(cfg, model=m, vlm_models=vlms, progress=False)
    s = result.vip_summary
    assert list(s.model) == list(vlms) and s.n_items.eq(18).all()
    assert (s.n_dependent + s.n_independent).eq(18).all() and s.prior_rate.between(0, 1).all()
    assert s.fixed_vip.eq(2).all() and (s.tvi_fixed_lo <= s.tvi_fixed).all()  # half of 4 layers
    assert len(result.vip_items) == 36 and set(result.vip_items.split) == {"prior_violating", "prior_consistent",
                                                                             "colour"}
    corr = result.vip_correlation()
    assert corr.n_models.le(2).all() and corr.r.isna().all()  # two models: no correlation is reported
