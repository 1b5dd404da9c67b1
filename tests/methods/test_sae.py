"""SAEs: training through sae-lens on the activation store, the SAELens on-disk format plus our card, loading checks,
splicing (the error term reproduces the clean logits), evaluation metrics, feature browsing and the thread links."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import workbench
import workbench.methods.sae.features as sf
import workbench.studies.sae_features.links as links
from workbench.core.sites import SiteError
from workbench.core.store import harvest
from workbench.core.trace import trace
from workbench.data.corpus import Corpus
from workbench.methods.sae.evaluate import core_data, evaluate_sae, reconstruction_metrics
from workbench.methods.sae.handle import (
    CARD_FILE,
    SAE_CFG_FILE,
    SAE_WEIGHTS_FILE,
    SAEError,
    SAEHandle,
    load_sae,
    splice_sae,
)
from workbench.methods.sae.train import SAETrainConfig, train_sae
from workbench.testing.tiny import tiny_model

SITE = "blocks.1.hook_resid_post"
DOCS = [f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs and counts {i * 3} sheep." for i in range(300)]
SMALL = dict(expansion=4, k=8, batch_size=256, total_tokens=8192, dead_feature_window=20)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts")
    return harvest(model, Corpus(DOCS), [SITE, "blocks.0.hook_resid_post"], out / "store", context_length=32,
                   shard_tokens=4096, progress=False)


@pytest.fixture(scope="module")
def trained(model, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("saes") / "topk"
    return train_sae(store, SITE, SAETrainConfig(**SMALL), model=model, out_dir=out, corpus_name="test-docs")


def test_training_writes_the_saelens_format_and_our_card(trained, model, store):
    path = trained.path
    assert {p.name for p in path.iterdir()} >= {SAE_CFG_FILE, SAE_WEIGHTS_FILE, CARD_FILE}
    card = json.loads((path / CARD_FILE).read_text())
    assert card["site"] == SITE and card["model"]["weights_sha256"] == model.weights_hash
    assert card["corpus"]["name"] == "test-docs" and card["corpus"]["store_tokens"] == store.n_tokens
    assert card["d_in"] == model.d_model and card["d_sae"] == 4 * model.d_model
    assert card["train_config"]["k"] == 8 and card["versions"]["sae_lens"]
    assert 0 < card["metrics"]["heldout_fvu"] < 1.5 and card["metrics"]["heldout_l0"] == pytest.approx(8.0)
    # sae_lens reads the folder by itself, and it computes what our handle computes
    from sae_lens import SAE

    theirs = SAE.load_from_disk(str(path))
    assert theirs.cfg.architecture() == "topk" and theirs.cfg.metadata.hook_name == SITE
    ours = load_sae(path, model)
    x = store.load(SITE)[:100]
    torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=0, atol=0)


def test_training_is_seeded(model, store, tmp_path):
    a = train_sae(store, SITE, SAETrainConfig(**SMALL, seed=3), out_dir=tmp_path / "a")
    b = train_sae(store, SITE, SAETrainConfig(**SMALL, seed=3), out_dir=tmp_path / "b")
    c = train_sae(store, SITE, SAETrainConfig(**SMALL, seed=4), out_dir=tmp_path / "c")
    wa, wb, wc = (load_sae(r.path).sae.W_dec for r in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_standard_architecture_trains_too(model, store, tmp_path):
    cfg = SAETrainConfig(architecture="standard", expansion=2, l1_coefficient=1.0, batch_size=256, total_tokens=4096)
    result = train_sae(store, SITE, cfg, model=model, out_dir=tmp_path / "std")
    handle = load_sae(result.path, model)
    assert handle.architecture == "standard" and handle.d_sae == 2 * model.d_model
    assert result.metrics["heldout_l0"] > 0


@pytest.mark.parametrize("arch, extra, saved_as", [
    ("batchtopk", {}, "jumprelu"),  # sae-lens folds the learned threshold into a JumpReLU SAE for inference
    ("matryoshka_batchtopk", {}, "jumprelu"),
    ("matryoshka_batchtopk", {"matryoshka_widths": (32, 64, 128, 256)}, "jumprelu"),
    ("jumprelu", {"l0_coefficient": 0.1}, "jumprelu"),
    ("gated", {"l1_coefficient": 0.5}, "gated"),
])
def test_every_saelens_architecture_trains_saves_and_loads(model, store, tmp_path, arch, extra, saved_as):
    """Each architecture goes through sae-lens's own trainer; the card records what was trained, load_sae reads the
    saved SAE back, and the held-out reconstruction beats predicting the mean (FVU < 1)."""
    cfg = SAETrainConfig(architecture=arch, **(SMALL | dict(total_tokens=8192) | extra))
    result = train_sae(store, SITE, cfg, model=model, out_dir=tmp_path / arch)
    handle = load_sae(result.path, model)
    assert result.card["architecture"] == arch and handle.architecture == saved_as
    assert handle.d_sae == SMALL["expansion"] * model.d_model
    assert 0 < result.metrics["heldout_l0"] and result.metrics["heldout_fvu"] < 1.0
    x = store.load(SITE)[:64]
    with torch.no_grad():
        torch.testing.assert_close(handle.reconstruct(x), result.handle.reconstruct(x))


def test_training_reduces_reconstruction_error(model, store, tmp_path):
    short = train_sae(store, SITE, SAETrainConfig(**(SMALL | dict(total_tokens=256))), out_dir=tmp_path / "s")
    longer = train_sae(store, SITE, SAETrainConfig(**(SMALL | dict(total_tokens=16384))), out_dir=tmp_path / "l")
    assert longer.metrics["heldout_fvu"] < short.metrics["heldout_fvu"]


def test_reconstruction_metrics_match_a_direct_computation(trained, store):
    handle = trained.handle
    x = store.load(SITE)[:500]
    m = reconstruction_metrics(handle, x, batch=128)
    with torch.no_grad():
        f = handle.encode(x)
        rec = handle.decode(f)
    fvu = float(((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert m["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert m["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()))
    fires = (f != 0).sum(0)
    assert m["n_dead"] == int((fires == 0).sum()) and m["n_dense"] == int((fires / len(x) > 0.1).sum())
    with pytest.raises(SAEError, match="do not fit"):
        reconstruction_metrics(handle, x[:, :10])


def test_error_term_splice_reproduces_clean_logits_and_plain_splice_changes_them(trained, model):
    handle = load_sae(trained.path, model)
    enc = model.encode(["the quick brown fox", "jumps over"])
    with torch.no_grad():
        clean = model.hf(**enc).logits
        with splice_sae(model, handle, error_term=True):
            with_error = model.hf(**enc).logits
        with splice_sae(model, handle):
            spliced = model.hf(**enc).logits
        after = model.hf(**enc).logits
    torch.testing.assert_close(with_error, clean, rtol=0, atol=1e-5)
    assert (spliced - clean).abs().max() > 1e-3
    assert torch.equal(after, clean)  # the splice is gone
    assert workbench.active_hooks() == []


def test_splice_hooks_are_removed_when_the_forward_raises(trained, model):
    handle = load_sae(trained.path, model)
    with pytest.raises(RuntimeError, match="boom"):
        with splice_sae(model, handle):
            raise RuntimeError("boom")
    assert workbench.active_hooks() == []


def test_splice_reproduces_the_reconstruction_at_the_site(trained, model):
    handle = load_sae(trained.path, model)
    enc = model.encode(["counting sheep"])
    with torch.no_grad(), trace(model, SITE) as clean:
        model.hf(**enc)
    with torch.no_grad(), splice_sae(model, handle), trace(model, SITE) as spliced:
        model.hf(**enc)
    torch.testing.assert_close(spliced[SITE], handle.reconstruct(clean[SITE]), rtol=0, atol=1e-6)


def test_evaluate_reports_ce_against_clean_and_zero_ablation(trained, model):
    handle = load_sae(trained.path, model)
    m = evaluate_sae(model, handle, Corpus(DOCS), n_tokens=600, context_length=32)
    assert m["ce_sae_with_error"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["max_logit_diff_error_term"] < 1e-4
    assert m["ce_sae"] != m["ce_clean"] and m["ce_zero_ablation"] != m["ce_clean"]
    denom = m["ce_zero_ablation"] - m["ce_clean"]
    if denom > 0:
        assert m["ce_loss_recovered"] == pytest.approx((m["ce_zero_ablation"] - m["ce_sae"]) / denom)
    assert m["n_tokens"] == m["n_windows"] * 31 and 0 < m["fvu"] < 2


def test_fvu_from_position_two_and_what_the_pooled_fvu_rests_on(trained, model):
    """``fvu_from_pos2`` is the FVU of positions 2.. recomputed from scratch (their own mean and variance); the
    variance shares of position 1 and of massive residuals are reported beside it."""
    handle = load_sae(trained.path, model)
    m = evaluate_sae(model, handle, Corpus(DOCS), n_tokens=600, context_length=32, error_term=False, progress=False)
    assert "ce_sae_with_error" not in m and "max_logit_diff_error_term" not in m
    data = core_data(model, SITE, Corpus(DOCS), n_tokens=600, context_length=32, progress=False)
    pos = torch.arange(1, 32).repeat(len(data.ids))
    assert len(pos) == len(data.acts)
    want = reconstruction_metrics(handle, data.acts[pos >= 2])["fvu"]
    assert m["fvu_from_pos2"] == pytest.approx(want, rel=1e-6)
    x = data.acts.double()
    dev = (x - x.mean(0)).pow(2).sum(1)
    assert m["pos1_var_share"] == pytest.approx(float(dev[pos == 1].sum() / dev.sum()), rel=1e-6)
    assert m["n_massive"] >= 0 and 0 <= m["massive_var_share"] <= 1


# -- loading checks -----------------------------------------------------------------------------------------------
def test_a_corrupted_folder_is_refused(trained, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(trained.path, bad)
    data = bytearray((bad / SAE_WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (bad / SAE_WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(SAEError, match="does not match its record"):
        load_sae(bad)


def test_an_incomplete_folder_is_refused(trained, tmp_path):
    bad = tmp_path / "incomplete"
    shutil.copytree(trained.path, bad)
    (bad / SAE_WEIGHTS_FILE).unlink()
    with pytest.raises(SAEError, match="incomplete.*sae_weights.safetensors"):
        load_sae(bad)
    with pytest.raises(SAEError, match="no SAE folder"):
        load_sae(tmp_path / "nowhere")


def test_a_width_mismatch_and_an_unknown_site_are_refused(trained, tmp_path):
    other = tiny_model("gemma3_text")  # a different model
    with pytest.raises(SAEError, match="trained on weights"):
        load_sae(trained.path, other)
    with pytest.raises(SiteError):
        load_sae(trained.path, tiny_model("llama"), site="blocks.99.hook_resid_post")
    # an SAE of the wrong width for the site
    from sae_lens import TopKSAE, TopKSAEConfig

    narrow = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=4))
    narrow.save_model(str(tmp_path / "narrow"))
    with pytest.raises(SAEError, match="d_in=16 but site"):
        load_sae(tmp_path / "narrow", tiny_model("llama"), site=SITE)


def test_an_saelens_folder_from_elsewhere_loads_without_a_card(model, tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    theirs = StandardSAE(StandardSAEConfig(d_in=model.d_model, d_sae=96, metadata=SAEMetadata(hook_name=SITE)))
    theirs.save_model(str(tmp_path / "ext"))
    handle = load_sae(tmp_path / "ext", model)
    assert handle.site == SITE and handle.card == {} and handle.architecture == "standard"
    x = torch.randn(4, model.d_model)
    with torch.no_grad():
        torch.testing.assert_close(handle.encode(x), theirs.encode(x))


def test_bad_training_arguments_fail_before_training(store):
    for bad, match in [(dict(architecture="relu"), "architecture"), (dict(expansion=0), "expansion"),
                       (dict(matryoshka_widths=(8, 4)), "increasing"), (dict(matryoshka_widths=(8, 16)), "matryoshka"),
                       (dict(architecture="matryoshka_batchtopk", matryoshka_widths=(8, 16)), "end at d_sae"),
                       (dict(l0_coefficient=-1.0), "l0_coefficient"), (dict(jumprelu_bandwidth=0), "bandwidth"),
                       (dict(total_tokens=10, batch_size=256), "at least one batch"), (dict(lr=-1), "lr")]:
        with pytest.raises(SAEError, match=match):
            train_sae(store, SITE, SAETrainConfig(**(SMALL | bad)))
    with pytest.raises(SAEError, match="not in the store"):
        train_sae(store, "blocks.2.hook_resid_post", SAETrainConfig(**SMALL))
    with pytest.raises(SAEError, match="leaves no training shard"):
        train_sae(store, SITE, SAETrainConfig(**SMALL, holdout_shards=len(store.shards)))


# -- feature browsing ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scan(trained, model):
    return sf.scan_features(model, load_sae(trained.path, model), Corpus(DOCS), n_tokens=800, context_length=32,
                            batch_size=4, n_top=5)


def test_scan_keeps_each_features_true_top_activations(scan, trained, model):
    handle = load_sae(trained.path, model)
    with torch.no_grad(), trace(model, SITE) as tr:
        model.hf(input_ids=scan.windows)
    f = handle.encode(tr[SITE][:, 1:]).float()  # [windows, ctx-1, d_sae]
    flat = f.reshape(-1, handle.d_sae)
    want = flat.topk(5, dim=0).values.T
    torch.testing.assert_close(scan.top_values, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(scan.freq, (flat > 0).float().mean(0), rtol=0, atol=1e-6)
    # the recorded (window, position) holds the recorded value
    feat = int(scan.freq.argmax())
    w, p = int(scan.top_window[feat, 0]), int(scan.top_position[feat, 0])
    assert f[w, p - 1, feat] == pytest.approx(float(scan.top_values[feat, 0]), abs=1e-5)
    edges, counts = scan.histogram(feat)
    assert counts.sum() == int((flat[:, feat] > 0).sum()) and edges[-1] == pytest.approx(float(flat[:, feat].max()))


def test_contexts_logit_effects_and_the_offline_report(scan, trained, model, tmp_path):
    handle = load_sae(trained.path, model)
    feat = int(scan.freq.argmax())
    ctx = sf.feature_contexts(model, handle, scan, feat, n=3)
    assert len(ctx) == 3 and ctx[0]["acts"][ctx[0]["max_index"]] == pytest.approx(ctx[0]["value"], abs=1e-5)
    eff = sf.logit_effects(model, handle, feat, k=4)
    scores = model.W_U @ handle.W_dec[feat]
    assert eff["promoted"][0][1] == pytest.approx(float(scores.max()), rel=1e-5)
    assert eff["suppressed"][0][1] == pytest.approx(float(scores.min()), rel=1e-5)
    path = sf.write_feature_report(model, handle, scan, [feat, 0], tmp_path / "r.html")
    text = path.read_text()
    assert f'id="f{feat}"' in text and 'id="f0"' in text and "<svg" in text
    assert "http://" not in text and "https://" not in text and "<script" not in text  # works offline
    with pytest.raises(SAEError, match="feature must be an int"):
        sf.logit_effects(model, handle, handle.d_sae)


def test_count_features_and_data_selection_on_a_tiny_model(trained, model):
    handle = load_sae(trained.path, model)
    cf = links.count_features(model, handle, "entity", n=60, seed=0, top=5, n_resamples=100)
    assert list(cf.probes.features) == ["sae_code", "sae_top5", "residual"]
    assert cf.codes.shape == (60, handle.d_sae) and (cf.table.abs_corr.diff().dropna() <= 1e-12).all()
    top = int(cf.table.feature[0])
    r = np.corrcoef(cf.codes[cf.train, top].numpy(), cf.counts[cf.train])[0, 1]  # ranked on the training half
    assert cf.table["corr"][0] == pytest.approx(r, abs=1e-6)
    assert not {cf.prompts[i] for i in cf.train} & {cf.prompts[i] for i in cf.test}
    assert (cf.probes.n_test_prompts == len({cf.prompts[i] for i in cf.test})).all()
    for v in ("r2_test", "round_acc_test"):
        ok = cf.probes[f"{v}_lo"].notna()
        inside = (cf.probes[f"{v}_lo"] <= cf.probes[v] + 1e-9) & (cf.probes[v] <= cf.probes[f"{v}_hi"] + 1e-9)
        assert ok.any() and inside[ok].all()
    summary, scores = links.data_selection_benchmark(model, handle, n_target=8, n_per_source=6, corpus=DOCS,
                                                     n_resamples=100)
    assert list(summary.method) == ["sae_cosine", "sae_jaccard", "neurons_cosine", "neurons_cosine_centred",
                                    "lexical_tfidf_cosine"]
    assert set(summary.centring) == {"none", "pool mean"}
    assert len(scores) == 6 * 5 + 12 and scores.label.sum() == 18
    assert summary.auroc.between(0, 1).all() and (summary.auroc_lo <= summary.auroc + 1e-9).all()
    assert (summary.auroc_n == summary.n_pool_texts).all()


def test_auroc_and_similarity_are_right_on_toy_data():
    assert links.auroc(np.array([3, 2, 1, 0]), np.array([1, 1, 0, 0])) == 1.0
    assert links.auroc(np.array([0, 1, 2, 3]), np.array([1, 1, 0, 0])) == 0.0
    assert links.auroc(np.array([1, 1]), np.array([1, 0])) == 0.5
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([[2.0, 0.0]])
    torch.testing.assert_close(links.similarity(pool, target, "cosine"), torch.tensor([1.0, 0.0, 2 ** -0.5]))
    torch.testing.assert_close(links.similarity(pool, target, "jaccard"), torch.tensor([0.5, 0.0, 1 / 3]))
    with pytest.raises(SAEError, match="non-negative"):
        links.similarity(-pool, target, "jaccard")
    with pytest.raises(SAEError, match="similarity must be"):
        links.similarity(pool, target, "dot")


def test_the_study_runs_end_to_end_on_a_tiny_model(model, tmp_path):
    from workbench.studies.sae_features.study import SAEStudyConfig, run_sae_study, save_sae_result

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(DOCS))
    folder = tmp_path / "sae"
    train_sae(harvest(model, Corpus(DOCS), SITE, tmp_path / "st", context_length=32, shard_tokens=2048,
                      progress=False), SITE, SAETrainConfig(**SMALL), model=model, out_dir=folder)
    cfg = SAEStudyConfig.smoke_config(model="tiny", site=SITE, sae=str(folder), corpus=str(corpus), features=(0, 1),
                                      eval_skip_documents=0, bench_architectures=())  # the bench: test_sae_bench
    assert cfg.bench is None
    result = run_sae_study(cfg, model=model)
    paths = save_sae_result(result, tmp_path / "out")
    assert paths["report"].is_file() and (tmp_path / "out" / "metrics.csv").is_file()
    assert result.metrics.ce_sae_with_error[0] == pytest.approx(result.metrics.ce_clean[0], abs=1e-5)
    assert list(result.report_features.feature) == [0, 1]
    # quality on two distributions (the corpus's text, prose outside it), positions 1.. (BOS out)
    # and the card's held-out shard for reference (FVU / L0 as measured at training, no CE)
    measured = result.metrics.iloc[:2]
    assert list(measured.distribution) == [f"{cfg.corpus}:fresh", "python-reference:prose"]
    assert measured.fvu_from_pos2.notna().all() and measured.ce_loss_recovered.notna().all()
    card = result.metrics.iloc[2]
    assert card.distribution.endswith(":heldout-shard") and pd.isna(card.ce_clean)
    assert card.fvu == pytest.approx(result.handle.card["metrics"]["heldout_fvu"])
    # one row per seed x condition, intervals over distinct test prompts, seed summaries
    assert set(result.count_probes.seed) == set(cfg.seeds) == set(result.selection.seed)
    assert len(result.count_probes) == len(cfg.seeds) * 3 and len(result.count_probes_summary) == 3
    assert {"r2_test_lo", "r2_test_hi", "n_test_prompts"} <= set(result.count_probes.columns)
    assert {"auroc_lo", "auroc_hi", "auroc_n"} <= set(result.selection.columns)
    assert (result.selection_summary.n_seeds == len(cfg.seeds)).all()
    for name in ("count_probes_summary", "selection_summary", "selection"):
        assert (tmp_path / "out" / f"{name}.csv").is_file()
    assert {"sae_count_probes", "sae_data_selection", "sae_ce"} <= set(result.figures())
    with pytest.raises(SAEError, match="neither one of"):
        SAEStudyConfig(sae="no/such/folder")
    with pytest.raises(ValueError, match="count_tasks="):
        SAEStudyConfig(count_tasks=("nope",))
    with pytest.raises(SAEError, match="architectures must be"):
        SAEStudyConfig(bench_architectures=("topk", "nope"))
    assert SAEStudyConfig(site=SITE).bench.site == SITE  # the comparison runs on the study's site


def test_handle_checks_the_site_width_at_splice_time(model):
    from sae_lens import TopKSAE, TopKSAEConfig

    narrow = SAEHandle(TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2)), SITE)
    with pytest.raises(SAEError, match="width"):
        with torch.no_grad(), splice_sae(model, narrow):
            model.hf(**model.encode(["x"]))
    assert workbench.active_hooks() == []


@pytest.mark.integration
@pytest.mark.parametrize("site", ["blocks.14.hook_resid_post", "blocks.9.hook_resid_post"])
def test_the_shipped_saes_load_match_their_cards_and_reconstruct(smollm2, site):
    from sae_lens import SAE

    from workbench.studies.sae_features.study import SAES_DIR, SPECS

    folder = SAES_DIR / "smollm2-135m" / site / "topk-8x-k32"
    handle = load_sae(folder, smollm2)
    assert handle.site == site and handle.d_sae == 8 * smollm2.d_model and handle.card["stored_dtype"] == "float16"
    assert (folder / SAE_WEIGHTS_FILE).stat().st_size <= 20 * 10**6
    assert SAE.load_from_disk(str(folder)).cfg.d_sae == handle.d_sae
    # the artifact is what SPECS says it is, and the issue-17 target holds on the store's held-out shard
    (spec,) = [s for s in SPECS.values() if s.shipped and s.site == site and s.name == folder.name]
    assert handle.card["train_config"] == json.loads(json.dumps(dataclasses.asdict(spec.config)))
    assert handle.card["metrics"]["heldout_n_dead"] <= 0.1 * handle.d_sae
    m = evaluate_sae(smollm2, handle, ["The workbench measures what a sparse autoencoder keeps of the residual "
                                       "stream, token by token, on text it never saw during training."] * 4,
                     n_tokens=100, context_length=32)
    # TopK keeps at most k = 32 latents, fewer where fewer than 32 pre-activations are positive (a few tokens here)
    assert m["fvu"] < 0.5 and 31.0 < m["l0"] <= 32.0
    assert m["ce_sae_with_error"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["ce_sae"] < m["ce_zero_ablation"]
