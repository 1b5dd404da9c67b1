"""The SAE study's links without a model: the grouped split of the count probes, feature selection on the training
half only, intervals and seed summaries, the data-selection baselines (centred / uncentred cosine, lexical), the
prose corpus, the study's tables and figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import workbench.studies.sae_features.links as links
from workbench.data.tasks import make_task, split_indices
from workbench.studies.sae_features import plots
from workbench.studies.sae_features.prose import prose_corpus, python_reference_prose
from workbench.studies.sae_features.study import (
    SAEStudyConfig,
    count_probes_summary,
    selection_summary,
)


def _probes(task: str, n: int, seed: int, d: int = 12, **kw) -> links.CountFeatures:
    ts = make_task(task, n, seed=seed)
    rng = np.random.default_rng(seed)
    codes = np.abs(rng.normal(size=(n, d)))
    resid = rng.normal(size=(n, 8)) + ts.counts[:, None] * 0.3
    return links.count_probes(codes, resid, ts.counts, ts.prompts, task=task, seed=seed, top=3, n_resamples=100,
                              **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_prompt_lands_on_both_sides_of_the_split(seed):
    cf = _probes("addition", 200, seed)  # ~55 distinct addition prompts: a random split would leak most of them
    train, test = {cf.prompts[i] for i in cf.train}, {cf.prompts[i] for i in cf.test}
    assert not train & test
    assert len(cf.train) + len(cf.test) == 200 and sorted(np.concatenate([cf.train, cf.test])) == list(range(200))
    row = cf.probes.iloc[0]
    assert row.n_test_prompts == len(test) < row.n_test  # the interval's unit is the distinct prompt
    assert (cf.probes.r2_test_n == len(test)).all()


def test_feature_selection_uses_the_training_labels_only():
    """Feature 3 tracks the count on the test half only (a leak would select it: over all prompts it is the most
    correlated feature); feature 7 tracks it, less tightly, on the training half only. The selection must keep 7."""
    ts = make_task("entity", 240, seed=0)
    y = ts.counts.astype(float)
    train, test = (np.sort(i) for i in split_indices(ts.counts, [0.5, 0.5], seed=0, groups=ts.prompts))
    rng = np.random.default_rng(1)
    codes = np.abs(rng.normal(size=(240, 10))) * 0.1
    codes[test, 3] = y[test]  # test-only signal
    codes[train, 7] = y[train] + rng.normal(scale=2.0, size=len(train)).clip(-y[train] + 0.1)  # train-only
    r_all = links.pearson_r(codes, y)
    assert int(np.argmax(np.abs(r_all))) == 3  # the plant: ranking on every label would pick feature 3
    resid = rng.normal(size=(240, 4))
    cf = links.count_probes(codes, resid, ts.counts, ts.prompts, task="entity", seed=0, top=1, n_resamples=100)
    np.testing.assert_array_equal(cf.train, train)
    assert list(cf.selected) == [7] and 3 not in cf.selected
    assert cf.table.feature[0] == 7 and cf.table["corr"][0] == pytest.approx(links.pearson_r(codes[train], y[train])[7])
    assert cf.table.set_index("feature").loc[3, "corr_test"] == pytest.approx(1.0)
    top1 = cf.probes.set_index("features").loc["sae_top1"]
    assert top1.r2_test < 0.2  # feature 7 carries nothing on the test half: no test label reached the selection


def test_probe_rows_carry_intervals_and_seed_summaries():
    frames = [_probes("entity", 120, s).probes for s in (0, 1, 2)]
    probes = pd.concat(frames, ignore_index=True)
    assert set(probes.seed) == {0, 1, 2} and len(probes) == 9  # one row per seed x feature set
    for v in ("r2_test", "round_acc_test"):
        assert {f"{v}_lo", f"{v}_hi", f"{v}_n", f"{v}_method"} <= set(probes.columns)
        assert ((probes[f"{v}_lo"] <= probes[v] + 1e-9) & (probes[v] <= probes[f"{v}_hi"] + 1e-9)).all()
    summary = count_probes_summary(probes)
    assert len(summary) == 3 and (summary.n_seeds == 3).all()
    assert {"r2_test_mean", "r2_test_sd", "r2_test_lo", "r2_test_hi", "n_test_prompts_mean"} <= set(summary.columns)
    fig = plots.sae_count_probes(probes)
    assert any(t.error_y is not None and t.error_y.array is not None for t in fig.data)


def test_the_ridge_penalty_is_chosen_on_grouped_training_prompts():
    ts = make_task("addition", 150, seed=0)
    X = torch.randn(150, 6)
    probe = links.fit_ridge_grouped(X, ts.counts.astype(float), ts.prompts, seed=0)
    assert probe.alpha in links.ALPHAS and probe.n_train == 150


def test_centred_cosine_removes_a_shared_offset_and_the_lexical_baseline_reads_words():
    offset = torch.full((6,), 10.0)
    pool = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0, 0]]) + offset
    target = torch.tensor([[1.0, 0, 0, 0, 0, 0]]) + offset
    raw = links.similarity(pool, target, "cosine")
    assert (raw > 0.98).all()  # the offset dominates: every candidate looks alike
    centred = links.similarity(pool, target, "cosine", center=offset)
    torch.testing.assert_close(centred, torch.tensor([1.0, 0.0, -1.0]))
    with pytest.raises(links.SAEError, match="centring applies"):
        links.similarity(pool.abs(), target, "jaccard", center=offset)
    P, T = links.lexical_vectors(["How many cats are there?", "2+3=", "the weather today"],
                                 ["How many dogs are there?"])
    s = links.similarity(P, T, "cosine")
    assert int(s.argmax()) == 0 and float(s[2]) == 0.0


def test_auroc_interval_is_over_distinct_pool_texts():
    rng = np.random.default_rng(0)
    texts = [f"t{i}" for i in range(30)] + ["t0"] * 10  # a repeated positive text is one unit
    labels = np.array([i % 2 == 0 for i in range(30)] + [True] * 10)
    scores = labels + rng.normal(size=40)
    scores[30:] = scores[0]
    iv = links.robust_ci(links.auroc, scores, labels, groups=texts, n_resamples=200)
    assert iv.n == 30 and iv.lo <= iv.estimate <= iv.hi and iv.method.startswith("bootstrap")
    assert iv.estimate == pytest.approx(links.auroc(scores, labels))


def test_selection_frames_summarise_and_plot():
    rows = []
    for seed in (0, 1, 2):
        for rep, kind, centring in links.SELECTION_METHODS:
            a = 0.5 + 0.1 * seed
            rows.append({"seed": seed, "method": f"{rep}_{kind}_{centring}", "representation": rep,
                         "similarity": kind, "centring": centring, "auroc": a, "auroc_lo": a - 0.1,
                         "auroc_hi": a + 0.1, "auroc_n": 50, "precision_at_n_pos": 0.5})
    selection = pd.DataFrame(rows)
    summary = selection_summary(selection)
    assert len(summary) == len(links.SELECTION_METHODS) and (summary.n_seeds == 3).all()
    assert summary.auroc_mean.iloc[0] == pytest.approx(0.6) and summary.auroc_lo.iloc[0] < 0.6
    fig = plots.sae_data_selection(selection)
    assert len(fig.data) == 3 + 1  # a trace per seed and the mean


def test_the_quality_figure_has_one_bar_group_per_distribution():
    metrics = pd.DataFrame([
        {"distribution": "sharegpt-en:fresh", "fvu": 0.05, "fvu_from_pos2": 0.19, "l0": 32.0, "ce_clean": 2.8,
         "ce_sae": 3.1, "ce_sae_with_error": 2.8, "ce_zero_ablation": 12.0, "ce_loss_recovered": 0.97},
        {"distribution": "python-reference:prose", "fvu": 0.2, "fvu_from_pos2": 0.22, "l0": 32.0, "ce_clean": 2.5,
         "ce_sae": 3.0, "ce_sae_with_error": np.nan, "ce_zero_ablation": 11.0, "ce_loss_recovered": 0.94},
        {"distribution": "sharegpt-en:heldout-shard", "fvu": 0.09, "fvu_from_pos2": np.nan, "l0": 32.0,
         "ce_clean": np.nan, "ce_sae": np.nan, "ce_sae_with_error": np.nan, "ce_zero_ablation": np.nan,
         "ce_loss_recovered": np.nan},
    ])
    fig = plots.sae_ce(metrics)
    assert len(fig.data) == 2 and "prose" in fig.data[1].name and len(fig.data[1].x) == 3


def test_the_prose_corpus_is_running_text_outside_the_training_corpus():
    docs = python_reference_prose()
    assert len(docs) >= 30 and sum(map(len, docs)) > 100_000
    for d in docs:
        assert ">>>" not in d and not any(line[:1].isspace() for line in d.splitlines() if line)
    assert next(iter(prose_corpus().documents())) == docs[0]
    with pytest.raises(ValueError, match="unknown prose corpus"):
        prose_corpus("wikipedia")


def test_config_seeds_and_prose_defaults():
    cfg = SAEStudyConfig(bench_architectures=())
    assert cfg.seeds == (0, 1, 2) and cfg.prose_corpus == "python-reference"
    smoke = SAEStudyConfig.smoke_config(bench_architectures=())
    assert len(smoke.seeds) >= 2 and smoke.n_prose_tokens <= 1024 and smoke.n_resamples <= 500
    with pytest.raises(ValueError):
        SAEStudyConfig(bench_architectures=(), seeds=())
