"""Latent reasoning: tasks with gold intermediates, the four loops (checked against plain HF forwards and generate),
Soft Thinking's filters, Cold Stop, determinism, no hook left after a failure, and the drift metrics."""

import numpy as np
import pytest
import torch

import workbench as wb
import workbench.methods.latent as latent
from workbench.data.reasoning import arithmetic_chains, gold_step_token_ids, graph_reachability, make_reasoning_task
from workbench.methods.latent import LatentConfig, embedding_scale, input_embeddings, run_latent, soft_weights
from workbench.studies.latent_drift.metrics import fact_retention, lens_metrics, manifold_metrics, step_summary
from workbench.testing.tiny import tiny_model


# -- tasks -------------------------------------------------------------------------------------------------------
def test_arithmetic_chains_have_single_digit_gold_steps():
    rs = arithmetic_chains(200, n_hops=4, seed=3)
    assert rs.prompts == arithmetic_chains(200, n_hops=4, seed=3).prompts  # seeded
    assert rs.prompts[0].count("=") == 6 and rs.prompts[0].endswith("e=?")
    for prompt, steps, answer in zip(rs.prompts, rs.steps, rs.answers):
        env = {}
        for part in prompt.split("; ")[:-1]:
            var, expr = part.split("=")
            env[var] = eval(expr, {}, dict(env))  # the chain really computes the gold steps
        assert [str(env[v]) for v in "bcde"] == steps and steps[-1] == answer
        assert all(0 <= int(s) <= 9 for s in steps)


def test_graph_task_answer_is_reachable_and_parsed():
    rs = graph_reachability(50, n_hops=3, seed=1)
    for i, prompt in enumerate(rs.prompts):
        assert rs.answers[i] in rs.candidates[i] and len(set(rs.candidates[i])) == 2
        chain = [prompt.split(" is a ")[1].split(".")[0]] + rs.steps[i]
        for a, b in zip(chain, chain[1:]):
            assert f"Every {a} is a {b}." in prompt
        other = [c for c in rs.candidates[i] if c != rs.answers[i]][0]
        assert rs.parse(i, f" {rs.answers[i].upper()}, not a {other}") == rs.answers[i]
        assert rs.parse(i, f" a {other}.") == other and rs.parse(i, " neither") is None


def test_task_bad_input():
    with pytest.raises(ValueError, match="unknown reasoning task 'sudoku'"):
        make_reasoning_task("sudoku", 3)
    with pytest.raises(ValueError, match="n_hops must be an int in 1..8, got 0"):
        arithmetic_chains(3, n_hops=0)
    with pytest.raises(ValueError, match="concepts"):
        graph_reachability(3, n_hops=8, n_distractors=10)


def test_gold_tokens_skip_a_split_off_space():
    m = tiny_model("llama")  # byte tokenizer: " 7" is [" ", "7"]
    rs = arithmetic_chains(5, n_hops=2, seed=0)
    ids = gold_step_token_ids(m.tokenizer, rs)
    assert [[m.tokenizer.decode([t]) for t in row] for row in ids] == rs.steps


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="telepathy"), "unknown mode 'telepathy'"),
    (dict(n_steps=0), "needs n_steps >= 1"),
    (dict(n_steps=-2), "n_steps must be an int in 0..64, got -2"),
    (dict(n_steps=65), "0..64"),
    (dict(mode="direct", n_steps=3), "must be 0"),
    (dict(mode="soft", temperature=0), "temperature must be > 0"),
    (dict(mode="soft", top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(mode="soft", top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(hidden="middle"), "hidden must be"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentConfig(**kwargs)


def test_unparseable_answers_fail_before_any_forward():
    m = tiny_model("llama")
    rs = arithmetic_chains(3, seed=0)
    rs.answers[1] = "seven"
    calls = []
    handle = m.hf.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="cannot be parsed"):
            run_latent(m, rs, LatentConfig(mode="cot", n_steps=2))
    finally:
        handle.remove()
    assert calls == []


# -- loops -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_cot_is_greedy_decoding(family):
    m = tiny_model(family)
    rs = arithmetic_chains(3, n_hops=2, seed=0)
    run = run_latent(m, rs, LatentConfig(mode="cot", n_steps=5, answer_tokens=3))
    enc = m.encode([p + rs.cot_cue for p in rs.prompts])
    out = m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=5,
                        do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    assert torch.equal(run.tokens, out[:, enc["input_ids"].shape[1]:])
    assert run.valid.all() and (run.items.n_latent == 5).all()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("hidden, rescale", [("post_norm", False), ("pre_norm", True)])
def test_coconut_matches_a_forward_without_cache(family, hidden, rescale):
    m = tiny_model(family)
    rs = arithmetic_chains(3, n_hops=2, seed=1)
    cfg = LatentConfig(mode="coconut", n_steps=3, hidden=hidden, rescale=rescale)
    run = run_latent(m, rs, cfg)
    L = m.n_layers
    for i, prompt in enumerate(rs.prompts):
        ids = m.encode([prompt + cfg.bot])["input_ids"]
        with torch.no_grad():
            hs = m.hf(input_ids=ids, output_hidden_states=True).hidden_states
            if hidden == "post_norm":  # HF's last hidden state is after the final norm
                torch.testing.assert_close(run.inputs[i, 0] / run.inputs[i, 0].norm(),
                                           hs[-1][0, -1] / hs[-1][0, -1].norm())
            # replay the thoughts as plain inputs_embeds without any cache: same residuals at every layer
            emb = torch.cat([input_embeddings(m, ids[0]), run.inputs[i]], 0)[None]
            full = m.hf(inputs_embeds=emb, output_hidden_states=True).hidden_states
        T = ids.shape[1]
        for k in range(1, 3):
            for layer in range(L):  # hidden_states[L] is post-norm in HF; our layer L is the block output
                torch.testing.assert_close(run.states[i, k, layer], full[layer][0, T + k - 1], rtol=1e-4, atol=1e-5)
    if rescale:
        target = latent.mean_embedding_norm(m)
        assert torch.allclose(run.inputs.norm(dim=-1).double(), torch.full((3, 3), target, dtype=torch.float64),
                              rtol=1e-5)


def test_batching_does_not_change_results():
    m = tiny_model("llama")
    rs = arithmetic_chains(5, n_hops=2, seed=2)
    a = run_latent(m, rs, LatentConfig(mode="coconut", n_steps=3, batch_size=1))
    b = run_latent(m, rs, LatentConfig(mode="coconut", n_steps=3, batch_size=4))
    torch.testing.assert_close(a.states, b.states, rtol=1e-4, atol=1e-5)
    assert a.items.answer_text.tolist() == b.items.answer_text.tolist()


def test_soft_weights_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04], [0.9999, 1e-4, 0, 0, 0]]) + 1e-30)
    cfg = LatentConfig(mode="soft", temperature=1.0, top_k=4, top_p=0.85, min_p=0.1, keep_top_n=3)
    ids, w = soft_weights(logits, cfg)
    assert ids[0].tolist() == [0, 1, 2] and torch.allclose(w[0], torch.tensor([0.5, 0.3, 0.1]).double() / 0.9)
    assert w[1].tolist() == [1.0, 0.0, 0.0]  # min-p drops 1e-4 < 0.1 x 0.9999
    cfg = LatentConfig(mode="soft", temperature=1.0, top_k=5, top_p=1.0, min_p=0.0, keep_top_n=2)
    assert soft_weights(logits, cfg)[1][0].tolist() == pytest.approx([0.625, 0.375])
    noisy = LatentConfig(mode="soft", gumbel_tau=0.5)
    w1 = soft_weights(logits, noisy, torch.Generator().manual_seed(0))[1]
    w2 = soft_weights(logits, noisy, torch.Generator().manual_seed(0))[1]
    assert torch.equal(w1, w2) and torch.allclose(w1.sum(-1), torch.ones(2, dtype=torch.float64))


def test_soft_thinking_feeds_the_mixture_and_cold_stop_ends_early():
    m = tiny_model("gemma3_text")
    rs = arithmetic_chains(3, n_hops=2, seed=0)
    run = run_latent(m, rs, LatentConfig(mode="soft", n_steps=4, gumbel_tau=0.5, seed=7))
    again = run_latent(m, rs, LatentConfig(mode="soft", n_steps=4, gumbel_tau=0.5, seed=7))
    assert torch.equal(run.inputs, again.inputs)  # deterministic for a seed
    assert torch.isfinite(run.mixture_entropy).all() and (run.mixture_entropy >= 0).all()
    stopped = run_latent(m, rs, LatentConfig(mode="soft", n_steps=4, cold_stop_entropy=100.0, cold_stop_patience=2))
    assert (stopped.items.n_latent == 2).all() and not stopped.valid[:, 2:].any()
    assert torch.isnan(stopped.inputs[:, 2:]).all()


def test_a_failing_loop_leaves_no_hook(monkeypatch):
    m = tiny_model("llama")
    rs = arithmetic_chains(2, seed=0)
    real = latent._next_input
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom at step 2")
        return real(*args)

    monkeypatch.setattr(latent, "_next_input", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        run_latent(m, rs, LatentConfig(mode="coconut", n_steps=4))
    assert wb.active_hooks() == []


def test_direct_answers_without_steps():
    m = tiny_model("llama")
    rs = arithmetic_chains(3, seed=0)
    run = run_latent(m, rs, LatentConfig(mode="direct", n_steps=0, answer_tokens=2))
    assert run.states.shape[1] == 0 and (run.items.n_latent == 0).all()
    enc = m.encode([p + rs.answer_cue for p in rs.prompts])
    out = m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=2,
                        do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    texts = m.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:])
    assert run.items.answer_text.tolist() == texts


# -- drift -------------------------------------------------------------------------------------------------------
def test_drift_metrics_on_discrete_thoughts_sit_on_the_manifold():
    m = tiny_model("gemma3_text")  # scaled embeddings: the effective rows are W_E * sqrt(d)
    assert embedding_scale(m) == pytest.approx(m.d_model ** 0.5, rel=1e-3)
    rs = arithmetic_chains(4, n_hops=2, seed=0)
    run = run_latent(m, rs, LatentConfig(mode="cot", n_steps=3))
    man = manifold_metrics(m, run)
    assert len(man) == 12 and np.allclose(man.max_cos, 1.0, atol=1e-6)
    fed = [m.tokenizer.convert_ids_to_tokens(int(t)) for t in run.tokens.reshape(-1)]
    assert [s.split("|")[0] for s in man.sort_values(["item", "step"]).nearest] == fed
    norms = (m.W_E.detach().double().norm(dim=-1) * embedding_scale(m))
    assert np.allclose(man.norm_ratio, norms[run.tokens.reshape(-1)] / norms.mean(), rtol=1e-5)
    assert np.isnan(man[man.step == 1].prev_cos).all() and np.isfinite(man[man.step > 1].prev_cos).all()

    lens = lens_metrics(m, run, rs)
    L = m.n_layers
    assert len(lens) == 4 * 3 * (L + 1)
    final = lens[(lens.layer == L) & (lens.step == 3)]
    assert np.allclose(final.kl_to_final, 0, atol=1e-9)
    assert lens[lens.layer < L].kl_to_final.isna().all()
    # one entry by hand: gold of step 2 is the second intermediate
    gold = gold_step_token_ids(m.tokenizer, rs)[1][1]
    with torch.no_grad():
        logits = m.lens_logits(run.states[1, 1, 2][None]).double()[0]
    row = lens[(lens.item == 1) & (lens.step == 2) & (lens.layer == 2)].iloc[0]
    assert row.gold_rank == int((logits > logits[gold]).sum()) + 1
    assert row.gold_prob == pytest.approx(float(torch.softmax(logits, -1)[gold]), rel=1e-6)
    summary = step_summary(man, lens, run)
    assert summary.step.tolist() == [1, 2, 3] and (summary.n_items == 4).all()


def test_fact_retention_table():
    m = tiny_model("llama")
    rs = arithmetic_chains(24, n_hops=3, seed=0)
    run = run_latent(m, rs, LatentConfig(mode="coconut", n_steps=3))
    ret = fact_retention(run, rs, layer=1)
    assert set(ret.gap) == {0, 1, 2} and (ret.eval_step >= ret.fact_step).all()
    assert ret.round_acc.between(0, 1).all() and ret.round_acc_refit.between(0, 1).all()
    same = ret[ret.gap == 0]  # at the fact's own step the refit IS the probe
    assert np.allclose(same.r2, same.r2_refit) and np.allclose(same.round_acc, same.round_acc_refit)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        fact_retention(run, rs, layer=9)
    with pytest.raises(ValueError, match="numeric"):
        fact_retention(run, graph_reachability(4), layer=1)


# -- study and figures -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["arithmetic", "graph"])
def test_drift_study_smoke_and_figures(task, tmp_path):
    import workbench.studies.latent_drift.plots as plots
    from workbench.studies.latent_drift.study import DriftConfig, accuracy_table, run_drift_study, save_drift_result

    m = tiny_model("llama")
    cfg = DriftConfig.smoke_config(model="tiny", task=task, soft={"gumbel_tau": 0.5})
    res = run_drift_study(cfg, model=m)
    acc = accuracy_table(res)
    assert acc.loc["direct", 0] == res.items[res.items["mode"] == "direct"].correct.mean()
    assert set(acc.columns) == {0, 1, 2, 3} and set(acc.index) == {"coconut", "soft", "cot", "direct"}
    assert set(res.steps["mode"]) == {"coconut", "soft", "cot"} and res.steps.step.max() == 3
    assert (res.retention.empty) == (task == "graph")
    figs = [plots.drift_by_step(res.steps), plots.lens_step_layer(res.lens), plots.accuracy_by_steps(res.accuracy)]
    if task == "arithmetic":
        figs.append(plots.retention_by_gap(res.retention))
    assert all(f.data for f in figs)
    paths = save_drift_result(res, tmp_path)
    assert all(p.exists() for p in paths.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="sudoku"), "task='sudoku' .*one of"),
    (dict(modes=("cot", "dream")), r"modes=\('cot', 'dream'\)"),
    (dict(n_steps=0), "n_steps=0 .*1..64"),
    (dict(steps_grid=(1, 99)), "steps_grid=\\(1, 99\\)"),
    (dict(soft={"top_p": 2.0}), "top_p"),
    (dict(soft={"temperature": -1}), "temperature"),
])
def test_drift_config_bad_input(kwargs, match):
    from workbench.studies.latent_drift.study import DriftConfig

    with pytest.raises(ValueError, match=match):
        DriftConfig(**kwargs)


# -- the real default model --------------------------------------------------------------------------------------
def test_real_model_loops(smollm2):
    m = smollm2
    rs = arithmetic_chains(4, n_hops=2, seed=0)
    assert [len(ids) for ids in gold_step_token_ids(m.tokenizer, rs)] == [2] * 4
    cot = run_latent(m, rs, LatentConfig(mode="cot", n_steps=4, answer_tokens=2))
    enc = m.encode([p + rs.cot_cue for p in rs.prompts])
    out = m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=4,
                        do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    assert torch.equal(cot.tokens, out[:, enc["input_ids"].shape[1]:])
    coco = run_latent(m, rs.subset([0]), LatentConfig(mode="coconut", n_steps=2, answer_tokens=1))
    ids = m.encode([rs.prompts[0] + " <bot>"])["input_ids"]
    with torch.no_grad():
        emb = torch.cat([input_embeddings(m, ids[0]), coco.inputs[0]], 0)[None]
        full = m.hf(inputs_embeds=emb, output_hidden_states=True).hidden_states
    torch.testing.assert_close(coco.states[0, 1, 15], full[15][0, ids.shape[1]], rtol=1e-4, atol=1e-4)
    assert wb.active_hooks() == []
