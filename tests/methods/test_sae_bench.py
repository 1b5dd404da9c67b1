"""The SAEBench-style suite: absorption, sparse probing and stability on hand-built SAEs whose answers are known,
the decoder-bias start of the training recipe, the shared core data, and the architecture comparison end to end on a
tiny model (every architecture trained by sae-lens, results cached by settings)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

import workbench.studies.sae_features.bench as study_bench
from workbench.core.store import harvest
from workbench.core.trace import trace
from workbench.data.corpus import Corpus
from workbench.methods.sae import bench as sb
from workbench.methods.sae.evaluate import core_data, core_metrics, evaluate_sae
from workbench.methods.sae.handle import SAE_WEIGHTS_FILE, SAEError, SAEHandle, load_sae, splice_sae, zero_ablate
from workbench.methods.sae.train import SAETrainConfig, train_sae
from workbench.testing.tiny import tiny_model

SITE = "blocks.1.hook_resid_post"
DOCS = [f"Note {i}: {i % 9} red boxes, {i * 7 % 13} blue cups and the word {chr(97 + i % 26)}." for i in range(300)]


def _standard_sae(W_enc: torch.Tensor, W_dec: torch.Tensor) -> SAEHandle:
    import sae_lens

    d_in, d_sae = W_enc.shape
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return SAEHandle(sae, "synthetic")


def _absorbing_sae() -> SAEHandle:
    """Latent 0: the letter-a latent (fires on e0 unless e1 is present); latent 1: an "apple" latent that fires on e1
    and writes (e0 + e1) / sqrt(2), absorbing the letter on those words; latent 2: the letter-b latent."""
    e = torch.eye(4)
    W_enc = torch.stack([e[0] - 2 * e[1], e[1], e[2]], dim=1)
    W_dec = torch.stack([e[0], (e[0] + e[1]) / math.sqrt(2), e[2]])
    return _standard_sae(W_enc, W_dec)


def _letter_data() -> sb.LetterData:
    e = torch.eye(4)
    acts = [2 * e[0]] * 80 + [2 * e[0] + 2 * e[1]] * 2 + [2 * e[2]] * 40
    letters = np.array([0] * 82 + [1] * 40)
    # halves: 40 generic a-words + 1 apple word on each side
    train = np.array(list(range(0, 40)) + [80] + list(range(82, 102)))
    test = np.array(list(range(40, 80)) + [81] + list(range(102, 122)))
    directions = torch.zeros(26, 4)
    directions[0], directions[1] = e[0], e[2]
    f1 = np.full(26, np.nan)
    f1[:2] = 1.0
    return sb.LetterData([f" w{i}" for i in range(len(letters))], letters, torch.stack(acts), train, test,
                         directions, np.ones(len(letters), bool), f1, [0, 1])


def test_absorption_finds_the_absorbed_word_and_only_it():
    table = sb.absorption(_absorbing_sae(), _letter_data()).set_index("letter")
    assert table.loc["a", "main_latents"] == "0"  # the apple latent adds too little F1 to count as a main latent
    assert table.loc["a", "n_words"] == 41
    assert table.loc["a", "absorption_fraction"] == pytest.approx(1 / 41)
    assert table.loc["a", "full_absorption"] == pytest.approx(1 / 41)
    assert table.loc["b", "main_latents"] == "2"
    assert table.loc["b", "absorption_fraction"] == 0 and table.loc["b", "full_absorption"] == 0


def test_absorption_is_partial_when_the_main_latent_still_fires_weakly():
    handle = _absorbing_sae()
    with torch.no_grad():  # latent 0 now fires at 1 on the apple words (2 - 2 * 0.5) instead of 0
        handle.sae.W_enc[:, 0] = torch.tensor([1.0, -0.5, 0, 0])
    row = sb.absorption(handle, _letter_data()).set_index("letter").loc["a"]
    # apple word: probe projection 2, main latents 1 * 1 = 1; the apple latent 2 * 0.707 = 1.41 >= 40 % of 2;
    # absorbed = min(1.41, 2 - 1) = 1 -> fraction 1 / (1 + 1) = 0.5; no full absorption (the main latent fires)
    assert row.absorption_fraction == pytest.approx(0.5 / 41)
    assert row.full_absorption == 0


def test_sparse_probing_reads_a_single_latent_and_matches_the_residual():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    acts = torch.tensor(rng.normal(size=(300, 6)), dtype=torch.float32) * 0.1
    acts[:, :3] += torch.nn.functional.one_hot(torch.as_tensor(labels), 3).float()
    ps = sb.probing_set("synthetic", acts, labels, seed=0)
    assert [t["positive"] for t in ps.tasks] == ["0", "1", "2"]
    for t in ps.tasks:  # balanced: as many negatives as positives
        assert t["target"].sum() * 2 == len(t["target"])
    handle = _standard_sae(torch.eye(6), torch.eye(6))
    table = sb.sparse_probing(handle, [ps], ks=(1, 2))
    assert len(table) == 3 * 2
    assert (table.sae_acc == 1.0).all() and (table.residual_acc == 1.0).all()


def test_probing_halves_keep_a_repeated_prompt_on_one_side():
    """Addition-like sets repeat prompts: with ``groups`` (the prompt texts) no prompt is both trained on and scored,
    and every accuracy comes with its interval over distinct test prompts."""
    rng = np.random.default_rng(0)
    prompts = [f"{a}+{b}=" for a, b in rng.integers(0, 5, size=(240, 2))]
    labels = np.array([int(p[0]) + int(p[2]) for p in prompts]) % 2
    acts = torch.tensor(rng.normal(size=(240, 5)), dtype=torch.float32)
    acts[:, 0] += torch.as_tensor(labels, dtype=torch.float32) * 3
    ps = sb.probing_set("addition", acts, labels, groups=prompts, seed=0, min_positives=4)
    for t in ps.tasks:
        units = [prompts[i] for i in t["idx"]]
        assert not {units[i] for i in t["train"]} & {units[i] for i in t["test"]}
    table = sb.sparse_probing(_standard_sae(torch.eye(5), torch.eye(5)), [ps], ks=(1,))
    assert (table.sae_acc_lo <= table.sae_acc).all() and (table.sae_acc <= table.sae_acc_hi).all()
    assert (table.residual_acc_lo <= table.residual_acc).all()
    assert (table.n_test_units <= 25).all() and (table.n_test_units < table.n_test).all()  # 25 distinct prompts
    ungrouped = sb.probing_set("addition", acts, labels, seed=0, min_positives=4)
    leaks = [bool({prompts[t["idx"][i]] for i in t["train"]} & {prompts[t["idx"][i]] for i in t["test"]})
             for t in ungrouped.tasks]
    assert any(leaks)  # without groups the repeated prompts land on both sides


def test_probing_set_refuses_a_set_without_a_task():
    with pytest.raises(SAEError, match="no class with 16"):
        sb.probing_set("tiny", torch.zeros(10, 3), [0] * 5 + [1] * 5)


def test_stability_is_one_for_a_permuted_copy_and_lower_for_another_basis():
    torch.manual_seed(0)
    W = torch.randn(32, 8)  # decoder rows
    a = _standard_sae(W.T.clone(), W)
    perm = torch.randperm(32)
    b = _standard_sae(W.T[:, perm].clone(), W[perm] * 3.0)  # same directions, other order and scale
    c = _standard_sae(torch.randn(8, 32), torch.randn(32, 8))
    table = sb.stability({"a": a, "b": b, "c": c})
    ab = table[(table.a == "a") & (table.b == "b")].iloc[0]
    assert ab.best_cos_mean == pytest.approx(1.0, abs=1e-6) and ab.frac_matched == 1.0
    ac = table[(table.a == "a") & (table.b == "c")].iloc[0]
    assert ac.best_cos_mean < 0.95
    freqs = {"a": torch.zeros(32), "b": torch.ones(32), "c": torch.ones(32)}
    freqs["a"][:5] = 1
    assert (sb.stability({"a": a, "b": b}, freqs).set_index("a").loc["a", "n_alive"]) == 5
    with pytest.raises(SAEError, match="at least two"):
        sb.stability({"a": a})


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    return harvest(model, Corpus(DOCS), SITE, tmp_path_factory.mktemp("acts") / "store", context_length=32,
                   shard_tokens=2048, progress=False)


def _training_mean(store) -> torch.Tensor:
    xs = []
    for p in store.shard_paths[:-1]:  # the last shard is held out
        with safe_open(str(p), framework="pt") as f:
            x, pos = f.get_tensor(SITE), f.get_tensor("position")
        xs.append(x[pos != 0].double())
    return torch.cat(xs).mean(0)


@pytest.mark.parametrize("init", ["mean", "zeros"])
def test_b_dec_starts_at_the_training_mean_or_at_zero(model, store, tmp_path, init):
    # one step at a negligible rate: the saved decoder bias is where training started (scaling folded back out)
    cfg = SAETrainConfig(architecture="topk", expansion=2, k=4, batch_size=256, total_tokens=256, lr=1e-12,
                         b_dec_init=init, n_batches_for_norm_estimate=6)
    train_sae(store, SITE, cfg, model=model, out_dir=tmp_path / "sae")
    with safe_open(str(tmp_path / "sae" / SAE_WEIGHTS_FILE), framework="pt") as f:
        b_dec = f.get_tensor("b_dec").double()
    mean = _training_mean(store)
    if init == "zeros":
        assert b_dec.abs().max() < 1e-6
    else:  # a 1,536-token sample of the training tokens
        assert torch.nn.functional.cosine_similarity(b_dec, mean, dim=0) > 0.99
        assert (b_dec - mean).norm() / mean.norm() < 0.1


def test_b_dec_init_is_checked():
    with pytest.raises(SAEError, match="b_dec_init must be one of"):
        SAETrainConfig(b_dec_init="median").validate()


def test_core_data_is_shared_and_matches_evaluate_sae(model, store, tmp_path):
    trained = train_sae(store, SITE, SAETrainConfig(expansion=2, k=8, batch_size=256, total_tokens=2048),
                        model=model, out_dir=tmp_path / "sae")
    handle = load_sae(trained.path, model)
    data = core_data(model, SITE, Corpus(DOCS), n_tokens=600, context_length=32, progress=False)
    got = core_metrics(model, handle, data, progress=False)
    want = evaluate_sae(model, handle, Corpus(DOCS), n_tokens=600, context_length=32, progress=False)
    for key in ("fvu", "l0", "n_dead", "n_dense", "ce_clean", "ce_sae", "ce_zero_ablation", "ce_loss_recovered"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9, nan_ok=True), key
    assert want["ce_sae_with_error"] == pytest.approx(want["ce_clean"], abs=1e-4)
    with pytest.raises(SAEError, match="the data were taken at"):
        core_metrics(model, handle, core_data(model, "blocks.0.hook_resid_post", Corpus(DOCS), n_tokens=100,
                                              context_length=32, progress=False), progress=False)


def test_position_zero_keeps_its_clean_residual_unless_asked(model, store, tmp_path):
    trained = train_sae(store, SITE, SAETrainConfig(expansion=2, k=8, batch_size=256, total_tokens=1024),
                        model=model, out_dir=tmp_path / "sae")
    handle = load_sae(trained.path, model)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad(), trace(model, SITE) as clean:
        model.hf(input_ids=ids)
    with torch.no_grad(), splice_sae(model, handle, positions=slice(1, None)), trace(model, SITE) as spliced:
        model.hf(input_ids=ids)
    with torch.no_grad(), zero_ablate(model, SITE, positions=slice(1, None)), trace(model, SITE) as zeroed:
        model.hf(input_ids=ids)
    torch.testing.assert_close(spliced[SITE][:, 0], clean[SITE][:, 0], rtol=0, atol=0)
    torch.testing.assert_close(spliced[SITE][:, 1:], handle.reconstruct(clean[SITE][:, 1:]))
    assert torch.equal(zeroed[SITE][:, 0], clean[SITE][:, 0]) and zeroed[SITE][:, 1:].abs().max() == 0
    kept = core_data(model, SITE, Corpus(DOCS), n_tokens=300, context_length=32, progress=False)
    every = core_data(model, SITE, Corpus(DOCS), n_tokens=300, context_length=32, first_position=0, progress=False)
    assert kept.ce_clean == every.ce_clean and kept.ce_zero_ablation != every.ce_zero_ablation
    a, b = core_metrics(model, handle, kept, progress=False), core_metrics(model, handle, every, progress=False)
    assert a["fvu"] == b["fvu"] and a["ce_sae"] != b["ce_sae"]  # FVU never includes position 0
    assert (a["first_position"], b["first_position"]) == (1, 0)
    part = core_data(model, SITE, Corpus(DOCS), n_tokens=300, context_length=32, ce_tokens=62, batch_size=4,
                     progress=False)  # 62 tokens = 2 of the 10 windows (31 predicted tokens each) carry the CE
    assert part.n_ce_windows == 2 and part.n_pred == 62
    torch.testing.assert_close(part.acts, kept.acts)
    assert core_metrics(model, handle, part, progress=False)["n_ce_windows"] == 2
    with pytest.raises(SAEError, match="first_position must be 0"):
        core_data(model, SITE, Corpus(DOCS), n_tokens=300, context_length=32, first_position=2, progress=False)


def test_first_letter_task_needs_word_tokens(model):
    with pytest.raises(SAEError, match="no single-token lowercase words"):
        sb.letter_data(model, SITE, per_letter=4)


def test_bench_config_is_checked_before_any_work():
    with pytest.raises(SAEError, match="architectures must be"):
        study_bench.BenchConfig(architectures=("topk", "relu"))
    with pytest.raises(SAEError, match="seeds must be distinct"):
        study_bench.BenchConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="unknown counting task"):
        study_bench.BenchConfig(count_tasks=("sheep",))


def test_architecture_comparison_end_to_end_and_cached(model, store, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    cfg = study_bench.BenchConfig(
        site=SITE, architectures=("topk", "jumprelu"), seeds=(0, 1),
        train=SAETrainConfig(expansion=2, total_tokens=1024, batch_size=256, b_dec_init="mean",
                             n_batches_for_norm_estimate=2, dead_feature_window=4),
        n_eval_tokens=256, eval_skip_documents=100, words_per_letter=0, count_tasks=("entity",), n_count_prompts=80,
        testbed=None, min_positives=4)
    res = study_bench.run_bench(model, cfg, store=store, corpus=Corpus(DOCS), progress=False)
    assert list(res.runs.architecture) == ["topk", "topk", "jumprelu", "jumprelu"]
    assert set(res.summary.architecture) == {"topk", "jumprelu"} and (res.summary.n_seeds == 2).all()
    for m in ("fvu", "l0", "dead_frac", "sparse_acc_k1", "best_cos_mean"):  # (a random model's CE recovered: nan)
        assert res.summary[f"{m}_mean"].notna().all() and res.summary[f"{m}_std"].notna().all(), m
    topk = res.runs[res.runs.architecture == "topk"]
    assert ((topk.l0 > 0) & (topk.l0 <= 32 + 1e-6)).all()  # ARCH_SETTINGS' k = 32
    assert len(res.stability) == 2 * 2
    assert set(res.probing.k) == set(sb.SPARSE_KS)
    # a second run with the same settings loads every SAE instead of training it
    calls = []
    monkeypatch.setattr(study_bench, "train_sae", lambda *a, **k: calls.append(a))
    again = study_bench.run_bench(model, cfg, store=store, corpus=Corpus(DOCS), progress=False)
    assert calls == []
    assert np.allclose(again.runs.fvu, res.runs.fvu)
