"""The readout study's config, statistics, figures and explorer, on results made from the tiny SmolLM2 (its real
tokenizer, random weights; the notebook's smoke run covers run_tuned_lens_patching_study end to end)."""

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench.methods.tuned_lens import TunedLens
from workbench.studies.tuned_lens_patching.explorer import PatchingExplorer, explorer_figure, patching_explorer
from workbench.studies.tuned_lens_patching.plots import role_map_figure
from workbench.studies.tuned_lens_patching.study import (
    TunedLensPatchingConfig,
    TunedLensPatchingResult,
    compare_lenses,
    ioi_pairs,
    patching_statistics,
    run_patching,
)
from workbench.methods.stats import sign_flip_null
from workbench.studies.tuned_lens_patching.uncertainty import best_against_null, spread
from workbench.testing.tiny import tiny_model
from workbench.ui.base import StaticFigure

N_PAIRS = 6
CFG = dict(model="tiny-smollm2", n_pairs=N_PAIRS, site_types=("resid", "attn"), positions=("IO", "S2", "END"),
           block_stride=1, head_positions=(-1,), heldout=3, n_counting=9, n_boot=200, n_permutations=199)


@pytest.fixture(scope="module")
def tiny_smollm2():
    import workbench

    return workbench.load_model("tiny-smollm2")


@pytest.fixture(scope="module")
def result(tiny_smollm2):
    m = tiny_smollm2
    cfg = TunedLensPatchingConfig(**CFG)
    pairs = ioi_pairs(m, cfg.n_pairs, seed=cfg.seed)
    patching, agreement = run_patching(m, cfg, pairs, progress=False)
    stats = patching_statistics(pairs, patching, n_boot=cfg.n_boot, n_permutations=cfg.n_permutations)
    kl, kl_windows, kl_ratio, counting = compare_lenses(m, cfg, TunedLens.for_model(m))
    return TunedLensPatchingResult(config=vars(cfg), model={"name": m.name}, lens_source="test", lens_card={}, kl=kl,
                                   counting=counting, pairs=pairs, patching=patching, agreement=agreement,
                                   kl_windows=kl_windows, kl_ratio=kl_ratio, stats=stats)


def test_pairs_carry_role_positions_and_where_each_corruption_starts(result, tiny_smollm2):
    p = result.pairs
    assert len(p) == N_PAIRS and {"corrupt", "corrupt_abc", "pos_IO", "pos_S1", "pos_S2", "pos_END"} <= set(p.columns)
    assert (p.first_diff_name_swap == p.pos_S2).all()  # the name swap changes S2 alone
    assert (p.first_diff_abc == p.pos_IO).all()  # ABC changes the context names, from the IO on
    assert (p.pos_END == p.n_tokens - 1).all()
    tok = tiny_smollm2.tokenizer
    for r in p.itertuples():
        ids = tiny_smollm2.encode([r.clean])["input_ids"][0].tolist()
        assert ids[r.pos_IO] == tok.encode(r.answer, add_special_tokens=False)[0]
        assert ids[r.pos_S2] == ids[r.pos_S1] == tok.encode(r.wrong, add_special_tokens=False)[0]


def test_per_pair_scores_cover_every_unit_of_every_pair(result, tiny_smollm2):
    scores = result.scores()
    L, heads = tiny_smollm2.n_layers, 4  # tiny-smollm2: 4 blocks of 4 heads
    # the name swap skips the IO (before S2 the prompts are identical); ABC patches IO, S2 and END
    per_pair = {"name_swap": 2 * L * 2 + L * heads, "abc": 2 * L * 3 + L * heads}
    assert set(scores.corruption) == {"name_swap", "abc"} and set(scores.method) == {"exact", "atp", "ig"}
    for (c, m), g in scores.groupby(["corruption", "method"]):
        assert len(g) == N_PAIRS * per_pair[c], (c, m)
        assert g.groupby("pair").size().eq(per_pair[c]).all()
    assert set(scores[scores.corruption == "name_swap"].role) == {"S2", "END"}
    assert set(scores[scores.corruption == "abc"].role) == {"IO", "S2", "END"}
    # a unit whose clean and corrupt activations coincide scores exactly 0: the residual entering block 0 at S2
    # under ABC (the same S2 token) and at END under both
    exact = scores[(scores.method == "exact") & (scores.site_type == "resid") & (scores.layer == 0)]
    assert (exact[exact.role.isin(["END"]) | ((exact.corruption == "abc") & (exact.role == "S2"))].score == 0).all()
    summary = result.stats["patching_summary"]
    n_units = sum(per_pair.values()) * 3
    assert len(summary) == n_units and (summary.n_pairs == N_PAIRS).all()


def test_intervals_are_present_and_contain_the_mean(result):
    summary = result.stats["patching_summary"]
    for col in ("recovery_mean", "recovery_lo", "recovery_hi", "recovery_sd", "recovery_q25", "recovery_q75"):
        assert col in summary
    ok = summary.recovery_lo.notna()
    assert ok.mean() > 0.9
    s = summary[ok]
    assert (s.recovery_lo <= s.recovery_mean + 1e-9).all() and (s.recovery_mean <= s.recovery_hi + 1e-9).all()
    assert (s.recovery_q25 <= s.recovery_median + 1e-12).all() and (s.recovery_median <= s.recovery_q75 + 1e-12).all()
    base = result.stats["patching_baseline_summary"]
    assert set(base.quantity) == {"clean_metric", "corrupt_metric", "gap"} and set(base.corruption) == {"name_swap",
                                                                                                         "abc"}
    assert ((base["lo"] <= base["mean"]) & (base["mean"] <= base["hi"])).all()
    per_pair = result.stats["patching_baselines"]
    assert len(per_pair) == 2 * N_PAIRS and np.allclose(per_pair.gap, per_pair.clean_metric - per_pair.corrupt_metric)
    agree = result.agreement
    for col in ("spearman", "pearson", "spearman_large"):
        assert {f"{col}_lo", f"{col}_hi"} <= set(agree.columns)
    a = agree[agree.spearman_lo.notna()]
    assert len(a) and ((a.spearman_lo <= a.spearman + 1e-9) & (a.spearman <= a.spearman_hi + 1e-9)).all()
    kl = result.kl
    k = kl[kl.kl_bits > 0]
    assert ((k.kl_bits_lo <= k.kl_bits + 1e-12) & (k.kl_bits <= k.kl_bits_hi + 1e-12)).all()
    assert (kl.n_windows == 3).all() and len(result.kl_windows) == 3 * len(kl)
    # the per-window KL averages to the pooled one (every window has the same number of tokens)
    pooled = result.kl_windows.groupby(["lens", "layer"]).kl_bits.mean().to_numpy()
    assert np.allclose(pooled, kl.sort_values(["lens", "layer"]).kl_bits)
    r = result.kl_ratio.dropna(subset=["ratio"])
    assert len(r) == tiny_model_layers(result) and ((r.ratio_lo <= r.ratio) & (r.ratio <= r.ratio_hi)).all()
    assert np.allclose(r.ratio, r.kl_bits_logit / r.kl_bits_tuned)


def tiny_model_layers(result):
    return int(result.kl.layer.max())  # the last layer (the output) has no ratio


def test_winners_have_a_max_null_p(result):
    w = result.stats["patching_winners"]
    assert set(w.method) == {"exact", "atp", "ig"} and set(w.site_type) == {"resid", "attn", "head"}
    assert (w.p_max_null >= w.p_floor).all() and (w.p_max_null <= 1).all()
    assert (w.p_at_floor == (w.p_max_null <= w.p_floor)).all()
    assert (w.n_permutations == 199).all() and np.allclose(w.p_floor, 1 / 200)
    heads = w[w.site_type == "head"]
    assert (heads.n_candidates == 16).all() and (heads.best_head >= 0).all()
    resid = w[(w.site_type == "resid") & (w.method == "exact")]
    summary = result.stats["patching_summary"]
    for r in resid.itertuples():
        s = summary[(summary.corruption == r.corruption) & (summary.method == "exact") & (summary.site_type == "resid")
                    & (summary.role == r.role)]
        assert r.best_mean == pytest.approx(s.recovery_mean.max())
        assert r.best_layer == s.loc[s.recovery_mean.idxmax(), "layer"]


def test_the_sign_flip_null_finds_a_planted_effect_and_not_a_zero_one():
    rng = np.random.default_rng(0)
    n, k = 40, 12
    noise = rng.normal(size=(n, k))
    groups = [f"prompt {i}" for i in range(n)]
    planted = noise.copy()
    planted[:, 5] += 1.0  # one real effect of one sd
    hit = best_against_null(planted, groups, n_permutations=999, seed=1)
    assert hit["best"] == 5 and hit["p_max_null"] == pytest.approx(1 / 1000) and hit["p_at_floor"]
    assert hit["n_above_threshold"] >= 1 and hit["n_candidates"] == k
    null = best_against_null(noise - noise.mean(0), groups, n_permutations=999, seed=1)  # every mean exactly 0
    assert null["p_max_null"] > 0.5 and not null["p_at_floor"] and null["n_above_threshold"] == 0
    pure = best_against_null(rng.normal(size=(n, k)), groups, n_permutations=999, seed=2)  # no effect, by chance
    assert pure["p_max_null"] > 0.05
    # a duplicated prompt is one unit: its items always flip together
    flips = sign_flip_null(np.eye(3), ["a", "a", "b"], n_permutations=50, seed=0)
    assert flips.shape == (50, 3) and np.allclose(flips[:, 0], flips[:, 1])
    with pytest.raises(ValueError, match="n_items, n_candidates"):
        sign_flip_null(np.zeros(3), ["a"] * 3)


def test_spread_summarises_per_item_values_over_distinct_units():
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    s = spread(x, ["a", "b", "c", "c", "d"], n_boot=200)
    assert s["mean"] == 2.5 and s["n_units"] == 3 and s["lo"] <= 2.5 <= s["hi"]
    assert s["q25"] == pytest.approx(1.75) and s["q75"] == pytest.approx(3.25)
    assert s["sd"] == pytest.approx(np.std(x[:4], ddof=1))
    one = spread([1.0, 1.0], ["a", "a"])
    assert math.isnan(one["lo"]) and one["mean"] == 1.0  # one unit: no interval


def test_figures_and_tables(result):
    figs = result.figures()
    assert set(figs) == {"heldout_kl", "kl_ratio", "counting_digit_accuracy", "patching_agreement",
                         "patching_recovery", "patching_map_exact", "patching_map_atp"}
    assert all(isinstance(f, go.Figure) and f.data for f in figs.values())
    tables = result.tables()
    assert {"lens_kl_by_layer", "lens_kl_by_window", "lens_kl_ratio_by_layer", "patching_scores", "patching_summary",
            "patching_winners", "patching_baselines", "patching_baseline_summary",
            "agreement_by_site_type"} <= set(tables)
    assert set(tables["patching_scores"].method) == {"exact", "atp", "ig"}
    assert not set(figs) & set(tables)  # save_figures refuses a name that is both
    assert {"kl_bits_logit", "kl_bits_tuned", "digit_acc_logit", "digit_acc_tuned", "ratio", "ratio_lo",
            "kl_bits_tuned_lo"} <= set(result.summary().columns)
    bands = [t for t in figs["patching_recovery"].data if t.fill == "toself"]
    assert bands  # CI bands
    assert figs["heldout_kl"].data[0].error_y.array is not None
    per_pair = role_map_figure(result.scores(), method="exact", corruption="abc", pair=1)
    assert len(per_pair.data) == 3  # resid, attn, head panels
    with pytest.raises(ValueError, match="pair 70"):
        role_map_figure(result.scores(), method="exact", pair=70)


def test_explorer_static_and_widget(result):
    fig = patching_explorer(result, display="static")
    assert isinstance(fig, StaticFigure) and fig.data
    ex = patching_explorer(result, display="widget", method="atp", pair=1, corruption="abc")
    p = result.pairs.iloc[1]
    assert isinstance(ex, PatchingExplorer) and p.corrupt_abc in ex.prompts.value and p.corrupt not in ex.prompts.value
    ex.corruption.value = "name_swap"
    assert p.corrupt in ex.prompts.value and ex.status.value == ""
    ex.pair.value = -1
    assert f"{N_PAIRS} IOI pairs" in ex.prompts.value and ex.status.value == ""
    ex.method.value = "ig"
    assert ex.status.value == ""
    with pytest.raises(ValueError, match="method must be one of"):
        explorer_figure(result, "gradient", 0)
    with pytest.raises(ValueError, match="corruption must be one of"):
        explorer_figure(result, "exact", 0, "shuffle")
    with pytest.raises(ValueError, match="pair must be an int"):
        patching_explorer(result, pair=50, display="static")


def test_config_checks_before_any_work(tiny_smollm2):
    for bad, match in [({"lens": "hub"}, "lens must be"), ({"lens_recipe": "tpu"}, "lens_recipe"),
                       ({"site_types": ("resid", "head")}, "head_positions"), ({"n_pairs": 0}, "n_pairs"),
                       ({"counting_task": "sheep"}, "counting_task"), ({"corruptions": ("shuffle",)}, "corruptions"),
                       ({"positions": ("S3",)}, "positions"), ({"block_stride": 0}, "block_stride"),
                       ({"n_permutations": 10}, "n_permutations"),
                       ({"site_types": (), "head_positions": ()}, "nothing to patch")]:
        with pytest.raises(ValueError, match=match):
            TunedLensPatchingConfig(**bad)
    smoke = TunedLensPatchingConfig.smoke_config()
    assert smoke.smoke and smoke.n_pairs < TunedLensPatchingConfig().n_pairs
    # the name swap changes nothing before S2: patching only the IO there is refused before any forward
    cfg = TunedLensPatchingConfig(model="tiny-smollm2", n_pairs=2, corruptions=("abc", "name_swap"), positions=("IO",))
    with pytest.raises(ValueError, match="nothing to patch under the name_swap corruption"):
        run_patching(tiny_smollm2, cfg, ioi_pairs(tiny_smollm2, 2), progress=False)


def test_the_default_run_is_sized_for_the_cpu_budget():
    """64+ pairs x both corruptions, and at most ~64 exact units per pair and corruption on SmolLM2 (30 blocks):
    the sweep's cost (one ~40 ms row per unit on 2 cores) stays near 5 minutes (docs/results/tuned-lens-patching.md)."""
    cfg = TunedLensPatchingConfig()
    assert cfg.n_pairs >= 64 and set(cfg.corruptions) == {"name_swap", "abc"}
    blocks = len(range(0, 30, cfg.block_stride))
    units = len(cfg.site_types) * blocks * len(cfg.positions) + 9 * blocks * len(cfg.head_positions)
    assert units <= 64
    assert cfg.n_pairs * len(cfg.corruptions) * units * 0.040 < 6 * 60
    assert cfg.n_boot >= 1000 and cfg.n_permutations >= 999


def test_counting_by_layer_last_layer_is_the_models_own_digit_choice(smollm2):
    import numpy as np
    import torch

    from workbench.data.tasks import digit_token_ids, make_task
    from workbench.studies.tuned_lens_patching.study import counting_by_layer

    table = counting_by_layer(smollm2, None, "entity", 18, seed=3)
    ts = make_task("entity", 18, seed=3, answer_prefix="")
    prompts = [p + " " for p in ts.prompts]  # SmolLM2 splits " 3": the prompt ends with the space, as in counting
    digits = digit_token_ids(smollm2.tokenizer, "", context=prompts[0])
    with torch.no_grad():
        logits = smollm2.hf(**smollm2.encode(prompts)).logits[:, -1, digits].float()
    want = float((logits.argmax(-1).numpy() == np.asarray(ts.counts) - 1).mean())
    last = table[table.layer == smollm2.n_layers]
    assert last.digit_accuracy.item() == pytest.approx(want)
    assert table.layer.tolist() == list(range(smollm2.n_layers + 1))
    assert table.gold_prob_digits.between(0, 1).all()


def test_the_smoke_recipe_is_sized_by_cost():
    """The smoke lens shrinks with layers x vocabulary x width instead of running a fixed recipe."""
    from workbench.methods.tuned_lens import SMOKE_BUDGET, SMOKE_LOGIT_OPS, TunedLensTrainConfig

    small = TunedLensTrainConfig.smoke(tiny_model("llama"))
    assert (small.steps, small.batch_size, small.heldout_windows) == (10, 4, 4)  # cheap: the cap
    big = _deep_wide_model()
    cfg = TunedLensTrainConfig.smoke(big)
    per_token = big.n_layers * big.W_U.shape[0] * (big.d_model + SMOKE_LOGIT_OPS)
    tokens = (cfg.steps * cfg.batch_size + cfg.heldout_windows) * cfg.context_length
    assert tokens * per_token <= SMOKE_BUDGET or (cfg.steps, cfg.batch_size, cfg.heldout_windows) == (1, 1, 1)
    assert cfg.steps * cfg.batch_size < small.steps * small.batch_size
    assert TunedLensTrainConfig.smoke(big, steps=7).steps == 7  # overrides win


def _deep_wide_model(tokenizer=None):
    """Random weights with Qwen2.5-1.5B's depth and vocabulary (28 layers, 151,936 tokens) at width 64: larger than
    every registry model where the smoke cost grows (layers x vocabulary)."""
    import torch
    import transformers as T

    from workbench.core.models import from_hf
    from workbench.testing.tiny import byte_tokenizer

    cfg = T.Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return from_hf(hf, tokenizer or byte_tokenizer(), name="deep-wide")


@pytest.mark.integration
@pytest.mark.notebook
def test_notebook_06_smoke_on_a_model_larger_than_the_registrys(tmp_path, monkeypatch):
    """`workbench run 06 --smoke -p model=<folder>` on a 28-layer, 152k-vocabulary model finishes (it trained the
    cost-sized smoke lens, not the 15-minute CPU recipe)."""
    from transformers import AutoTokenizer

    import workbench.batch.runner as nbs
    from workbench.io.figures import STATIC_EXPORT_ENV
    from workbench.testbed.tiny import ensure_tiny_lm

    tok = AutoTokenizer.from_pretrained(ensure_tiny_lm())  # SmolLM2's tokenizer: IOI names are single tokens
    folder = tmp_path / "deep-wide"
    m = _deep_wide_model(tok)
    m.hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setenv(STATIC_EXPORT_ENV, "0")
    (result,) = nbs.run_notebooks(["06_tuned_lens_patching"], smoke=True, figures_dir=tmp_path / "figures",
                                  parameters={"model": str(folder)})
    assert result.ok, result.error
    text = (result.output_dir / "06_tuned_lens_patching.ipynb").read_text()
    assert "tuned lens: trained here" in text
