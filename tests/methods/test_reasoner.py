"""Training the latent thread's models (workbench.methods.reasoner): the Coconut curriculum's layout, gradients
through the thoughts, resume after an interruption, the adapter artifact; Soft Thinking's reliance test on
hand-built cases; the operand-controlled retention probes on planted states."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from workbench.batch.cli import main as cli_main
from workbench.data.reasoning import arithmetic_chains, arithmetic_operands
from workbench.methods import reasoner as R
from workbench.methods.latent import LatentConfig, LatentRun, reliance_weights, run_latent
from workbench.studies.latent_drift.metrics import (
    mirror_values,
    operand_controlled_retention,
    retention_beyond_operands,
)
from workbench.testing.tiny import tiny_model


def _cfg(**kw):
    return R.ReasonerConfig(**({"n_train": 8, "batch_size": 4, "lr": 1e-2, "lora_r": 2, "lora_alpha": 4,
                                "checkpoint_every": 1} | kw))


# -- the curriculum --------------------------------------------------------------------------------------------
def test_stage_layout_replaces_the_first_k_steps_by_k_times_c_thoughts():
    coconut = _cfg(mode="coconut", thoughts_per_step=2)
    assert [R.stage_layout(coconut, 3, k) for k in range(4)] == [(0, 3), (2, 2), (4, 1), (6, 0)]
    assert R.stage_layout(coconut, 1, 3) == (6, 0)  # fewer steps than the stage: all latent, K x c thoughts anyway
    assert R.stage_layout(_cfg(mode="cot"), 3, 0) == (0, 3) and R.stage_layout(_cfg(mode="direct"), 3, 0) == (0, 0)
    assert coconut.stage_list() == [1, 2, 3] and _cfg(mode="cot").stage_list() == [0]
    assert coconut.latent_config().n_steps == 6  # the last stage's thoughts are what inference feeds


def test_examples_put_thoughts_where_the_steps_were():
    rs = arithmetic_chains(3, n_hops=3, seed=5)
    m = tiny_model("llama")
    tok = m.tokenizer
    cfg = _cfg(mode="coconut")
    for stage in range(4):
        for i, ex in enumerate(R.build_examples(tok, cfg, rs, stage)):
            pre, n_th, post, answer = R.example_pieces(cfg, rs, i, stage)
            steps = rs.step_texts(i)
            if stage == 0:  # the CoT sequence
                assert pre == rs.prompts[i] + rs.cot_cue and post == "".join(steps) + rs.answer_cue
                assert ex.n_thoughts == 0 and ex.loss_from == 0
            else:
                assert pre == rs.prompts[i] + " <bot>" and n_th == stage == ex.n_thoughts
                assert post == " <eot>" + "".join(steps[stage:]) + rs.answer_cue
                assert ex.loss_from == len(tok(" <eot>", add_special_tokens=False)["input_ids"])
            assert answer == " " + rs.answers[i]
            assert tok.decode(ex.pre) == pre and tok.decode(ex.post) == post + answer
    assert rs.step_texts(0) == [f" {v}={x}." for v, x in zip("bcd", rs.steps[0])]


def test_sequence_loss_feeds_the_last_hidden_state_and_gradients_flow_through_the_thoughts():
    torch.manual_seed(0)
    m = tiny_model("llama")
    rs = arithmetic_chains(4, n_hops=2, seed=1)
    cfg = _cfg(mode="coconut")
    batch = R.build_examples(m.tokenizer, cfg, rs, 2)
    body = m.hf.model
    seen = []

    def grab(module, args, kwargs):
        e = kwargs.get("inputs_embeds")
        if e is not None and e.shape[1] == 1:  # a thought
            e.retain_grad()
            seen.append(e)

    h = body.register_forward_pre_hook(grab, with_kwargs=True)
    outs = []
    h2 = body.register_forward_hook(lambda mod, a, out: outs.append(out.last_hidden_state))
    try:
        loss = R.sequence_loss(m, batch, autocast=False)
        loss.backward()
    finally:
        h.remove()
        h2.remove()
    assert len(seen) == 2
    # thought 1 is the prompt's last position's last hidden state (after the final norm), thought 2 thought 1's
    torch.testing.assert_close(seen[0][:, 0], outs[0][:, -1], rtol=0, atol=0)
    torch.testing.assert_close(seen[1][:, 0], outs[1][:, -1], rtol=0, atol=0)
    for e in seen:  # the loss reaches back through every thought
        assert e.grad is not None and e.grad.abs().sum() > 0
    # and the loss equals a hand-rolled sequence: prompt, thoughts as embeddings, post tokens
    ex = batch[0]
    with torch.no_grad():
        emb = body.embed_tokens(torch.tensor([ex.pre]))
        for _ in range(2):
            h = body(inputs_embeds=emb).last_hidden_state[:, -1:]
            emb = torch.cat([emb, h], 1)
        full = torch.cat([emb, body.embed_tokens(torch.tensor([ex.post]))], 1)
        logits = m.hf.lm_head(body(inputs_embeds=full).last_hidden_state)[0]
        P = len(ex.pre) + 2
        pred = logits[P - 1 + ex.loss_from: P - 1 + len(ex.post)]
        ref = torch.nn.functional.cross_entropy(pred, torch.tensor(ex.post[ex.loss_from:]))
        mine = R.sequence_loss(m, [ex], autocast=False)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_training_lowers_the_loss_and_resumes_to_the_same_adapter(tmp_path):
    cfg = _cfg(mode="cot", n_train=12, seed=3)
    full = R.train_reasoner(tiny_model("llama"), cfg, progress=False)
    assert full.log[-1].loss < full.log[0].loss and len(full.log) == 3
    ckpt = tmp_path / "ckpt"
    part = R.train_reasoner(tiny_model("llama"), cfg, checkpoint=ckpt, progress=False, max_steps=2)
    assert len(part.log) == 2  # interrupted after two steps
    resumed = R.train_reasoner(tiny_model("llama"), cfg, checkpoint=ckpt, progress=False)
    assert resumed.resumed_from == 2 and len(resumed.log) == 3
    a, b = full.adapter_state(torch.float32), resumed.adapter_state(torch.float32)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="another run"):  # a checkpoint is never continued by another recipe
        R.train_reasoner(tiny_model("llama"), _cfg(mode="cot", n_train=12, seed=4), checkpoint=ckpt, progress=False)
    R.remove_checkpoint(ckpt)
    assert not ckpt.exists()


def test_coconut_needs_its_cot_init_and_continues_from_it():
    with pytest.raises(ValueError, match="CoT adapter"):
        R.train_reasoner(tiny_model("llama"), _cfg(mode="coconut"), progress=False)
    cot = R.train_reasoner(tiny_model("llama"), _cfg(mode="cot"), progress=False)
    init = cot.adapter_state(torch.float32)
    stages = []
    run = R.train_reasoner(tiny_model("llama"), _cfg(mode="coconut", train_hops=(1, 2)), init=init, progress=False,
                           on_stage=lambda k, model: stages.append(k))
    assert stages == [1, 2] and {r.stage for r in run.log} == {1, 2}


def test_adapter_round_trip_is_checked(tmp_path):
    base = tiny_model("llama")
    run = R.train_reasoner(tiny_model("llama"), _cfg(mode="direct"), progress=False)
    folder = R.save_reasoner(run, tmp_path / "direct-s0", base_name="tiny-llama", base_weights_sha256=base.weights_hash,
                             card={"accuracy": []})
    loaded = R.load_reasoner(folder, model=tiny_model("llama"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = run.model.hf(input_ids=ids).logits
        got = loaded.hf(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)  # the stored factors are float16
    assert json.loads((folder / R.ADAPTER_CONFIG_FILE).read_text())["r"] == 2  # peft's own layout
    with pytest.raises(R.ReasonerError, match="trained on weights"):
        R.load_reasoner(folder, model=tiny_model("llama", seed=1))
    data = (folder / R.ADAPTER_FILE).read_bytes()
    (folder / R.ADAPTER_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(R.ReasonerError):
        R.load_reasoner(folder, model=tiny_model("llama"))


def test_training_and_evaluation_data_never_share_a_prompt():
    evals = R.evaluation_set("arithmetic", 30, 1)  # one hop: few distinct chains exist
    cfg = _cfg(mode="cot", n_train=30, train_hops=(1,))
    train = R.training_set(cfg, 0, exclude=evals.prompts)
    assert not set(train.prompts) & set(evals.prompts)
    with pytest.raises(ValueError, match="evaluation seeds"):
        R.evaluation_set("arithmetic", 5, 2, seed=R.TRAIN_SEED_OFFSET)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="dream"), "unknown training mode 'dream'"),
    (dict(train_hops=(0,)), "train_hops"),
    (dict(lr=0), "lr"),
    (dict(stages=99), "stages"),
    (dict(n_train=0), "n_train"),
])
def test_reasoner_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.ReasonerConfig(**kwargs)


def test_cli_trains_the_smoke_recipe_and_refuses_bad_input(tmp_path, capsys):
    assert cli_main(["train-reasoner", "--model", "tiny-smollm2", "--recipe", "smoke", "--modes", "direct",
                     "--root", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "probes" / "tiny-smollm2" / "reasoning" / "direct-s0" / "card.json").read_text())
    assert {r["hops"] for r in card["accuracy"]} == {2, 4} and card["training_seconds"] > 0
    assert cli_main(["train-reasoner", "--model", "tiny-smollm2", "--recipe", "smoke", "--modes", "coconut",
                     "--root", str(tmp_path)]) == 2
    assert "CoT adapter of the same seed" in capsys.readouterr().err
    assert cli_main(["train-reasoner", "--model", "tiny-smollm2", "--recipe", "smoke", "--modes", "direct",
                     "--root", str(tmp_path)]) == 2  # never replaced without --overwrite
    assert "exists; pass overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: an unknown recipe
        cli_main(["train-reasoner", "--model", "tiny-smollm2", "--recipe", "nope"])


# -- Soft Thinking's reliance test -------------------------------------------------------------------------------
def test_reliance_weights_on_a_hand_built_mixture():
    w = torch.tensor([[0.5, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    top1, ok = reliance_weights(w, "top1")
    assert torch.equal(top1, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]], dtype=torch.float64)) and ok.all()
    top2, _ = reliance_weights(w, "top2")
    torch.testing.assert_close(top2[0], torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64))
    drop, ok = reliance_weights(w, "drop1")
    torch.testing.assert_close(drop[0], torch.tensor([0, 0.6, 0.4, 0], dtype=torch.float64))
    assert ok.tolist() == [True, False] and torch.equal(drop[1], w[1])  # nothing left: flagged, not invented
    g, ok = reliance_weights(w, "gumbel0.5", torch.Generator().manual_seed(0))
    torch.testing.assert_close(g.sum(-1), torch.ones(2, dtype=torch.float64)) and ok.all()
    assert g[1, 1:].abs().max() == 0  # zero weights stay zero under the noise
    for bad in ("top0", "drop1.5", "gumbel0", "nucleus"):
        with pytest.raises(ValueError, match="unknown reliance variant"):
            reliance_weights(w, bad)


def test_reliance_in_the_loop_has_known_answers_and_leaves_the_loop_alone():
    m = tiny_model("llama")
    rs = arithmetic_chains(5, n_hops=2, seed=2)
    cfg = LatentConfig(mode="soft", n_steps=3, keep_top_n=3, top_p=1.0, min_p=0.0, temperature=5.0)
    plain = run_latent(m, rs, cfg)
    run = run_latent(m, rs, cfg, reliance=["top3", "top1", "drop1"])
    assert torch.equal(plain.states, run.states) and plain.items.equals(run.items)  # the loop is unchanged
    r = run.reliance
    assert len(r) == 5 * 3 * 3 and set(r.variant) == {"top3", "top1", "drop1"}
    same = r[r.variant == "top3"]  # keeping every component IS the mixture: zero change, full agreement
    assert np.allclose(same.kl, 0, atol=1e-12) and same.argmax_agree.all()
    assert (r[r.variant == "top1"].kl > 0).all()  # a flat mixture (T = 5) differs from its top token
    # a one-token mixture: top1 is the mixture itself, drop1 is undefined
    one = run_latent(m, rs, LatentConfig(mode="soft", n_steps=2, keep_top_n=1), reliance=["top1", "drop1"]).reliance
    assert np.allclose(one[one.variant == "top1"].kl, 0, atol=1e-12)
    assert not one[one.variant == "drop1"].defined.any() and one[one.variant == "drop1"].kl.isna().all()
    with pytest.raises(ValueError, match="mode must be 'soft'"):
        run_latent(m, rs, LatentConfig(mode="cot", n_steps=2), reliance=["top1"])


def test_text_tokens_decode_the_remaining_steps_before_the_answer_cue():
    m = tiny_model("llama")
    rs = arithmetic_chains(4, n_hops=2, seed=2)
    run = run_latent(m, rs, LatentConfig(mode="coconut", n_steps=1, text_tokens=5, answer_tokens=3))
    assert all(len(m.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 5 for t in run.items.text_after_thoughts)
    with pytest.raises(ValueError, match="text_tokens"):
        LatentConfig(mode="cot", n_steps=2, text_tokens=3)


# -- fact retention with the operand control ---------------------------------------------------------------------
def test_mirror_chain_swaps_plus_and_minus():
    rs = arithmetic_chains(50, n_hops=3, seed=4)
    starts, ops, consts = arithmetic_operands(rs)
    mirror = mirror_values(rs)
    for i in range(len(rs)):
        v = starts[i]
        for h, (o, c) in enumerate(zip(ops[i], consts[i])):
            v = {"+": v - c, "-": v + c, "*": 2 * v}[o]
            assert mirror[i, h] == v


def _planted_run(rs, states_of):
    n = len(rs)
    X = torch.stack([states_of(i) for i in range(n)])[:, None, None, :]  # [n, 1 step, 1 layer, d]
    return LatentRun(config={}, items=pd.DataFrame(), inputs=torch.zeros(n, 1, X.shape[-1]), states=X.float(),
                     valid=torch.ones(n, 1, dtype=torch.bool), mixture_entropy=torch.zeros(n, 1),
                     top_weight=torch.zeros(n, 1), tokens=torch.zeros(n, 1, dtype=torch.long))


def test_operand_control_on_planted_states():
    rs = arithmetic_chains(400, n_hops=1, seed=7)
    rs = rs.subset([i for i, p in enumerate(rs.prompts) if "*" not in p and p not in rs.prompts[:i]])
    starts, ops, consts = arithmetic_operands(rs)
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.05 * torch.randn(16, generator=g)  # noqa: E731
    # (a) the state only carries the operands (linearly): the "intermediate" is readable, but nothing beyond them
    operands_only = _planted_run(rs, lambda i: torch.cat([torch.tensor(
        [starts[i], consts[i][0] * (1 if ops[i][0] == "+" else -1)], dtype=torch.float32), noise()[:14]]))
    res_a = retention_beyond_operands(operand_controlled_retention(operands_only, rs, 0))
    assert res_a.probe_acc.iloc[0] > 0.8 and res_a.r2.iloc[0] > 0.95 and res_a.r2_mirror.iloc[0] > 0.95
    assert abs(res_a.beyond.iloc[0]) < 0.05 and res_a.r2_operands.iloc[0] > 0.95
    # (b) the state carries the computed value (as a code no linear map of the operand readings gives) and no operand
    codes = torch.randn(10, 16, generator=g)
    value_only = _planted_run(rs, lambda i: codes[int(rs.steps[i][0])] + noise())
    res_b = retention_beyond_operands(operand_controlled_retention(value_only, rs, 0))
    assert res_b.r2.iloc[0] > 0.8 and res_b.beyond_lo.iloc[0] > 0.2  # read beyond the operands' linear span
    assert set(res_b.n_splits) == {3} and 0.7 * len(rs) < res_b.n_prompts.iloc[0] <= len(rs)  # test halves only


# -- the drift study on trained models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapter_root(tmp_path_factory):
    from workbench.studies.latent_drift.training import suite_config, train_suite

    root = tmp_path_factory.mktemp("adapters")
    result = train_suite(suite_config("smoke", model="tiny-smollm2", root=str(root)), progress=False)
    assert set(result.folders) == {"cot-s0", "coconut-s0", "direct-s0"}
    stages = result.accuracy[result.accuracy["mode"] == "coconut"]
    assert sorted(stages.stage.dropna().unique()) == [1, 2]  # by stage, then the last stage (stage NaN)
    assert set(stages[stages.thoughts == "hops"].hops) == {4}  # beyond the trained hops: one thought per hop
    return root


def test_drift_study_compares_base_and_trained_models(tiny_adapter_root, tmp_path):
    from workbench.studies.latent_drift.study import DriftConfig, run_drift_study, save_drift_result

    cfg = DriftConfig.smoke_config(model="tiny-smollm2", trained=("cot", "coconut", "direct"),
                                   adapters_root=str(tiny_adapter_root), reliance=("top1", "drop1"),
                                   gumbel_taus=(1.0,))
    res = run_drift_study(cfg, progress=False)
    assert {"coconut", "soft", "cot", "coconut-trained", "cot-trained", "soft-on-cot"} <= set(res.steps["mode"])
    acc = res.trained_accuracy
    assert set(acc.model) == {"cot-s0", "coconut-s0", "direct-s0"}
    assert set(acc[acc["mode"] == "soft"].variant) == {"mixture", "top1", "gumbel1"}
    assert ((acc.ci_low <= acc.accuracy) & (acc.accuracy <= acc.ci_high)).all()
    rel = res.reliance
    assert set(rel["run"]) == {"soft (base model)", "soft-on-cot", "soft-on-cot (wide)"}
    assert all(list(g.variant) == ["top1", "drop1"] for _, g in rel.groupby("run"))
    assert (rel[rel.variant == "top1"].n_items == cfg.n_items).all()
    wide = rel[rel["run"] == "soft-on-cot (wide)"].set_index("variant")  # no top-p: every mixture has a second token
    assert wide.loc["drop1", "defined_share"] == 1.0 and wide.loc["top1", "kl_mean"] > 0
    assert {"cot-trained", "soft-on-cot", "coconut-trained"} <= set(res.retention_operands["mode"])
    assert set(res.adapter_accuracy.adapter) == {"cot-s0", "coconut-s0", "direct-s0", "base", "heuristic"}
    floor = res.adapter_accuracy[res.adapter_accuracy.adapter == "heuristic"]
    assert set(floor["mode"]) == {"majority", "last constant"} and (floor.accuracy >= 0.1).all()
    base = res.adapter_accuracy[res.adapter_accuracy.adapter == "base"]
    assert set(base["mode"]) == {"cot", "direct"} and set(base.hops) == {2, 4}  # the cards' held-out sets
    figs = res.figures()
    assert {"soft_reliance", "retention_beyond_operands", "trained_accuracy_by_hops"} <= set(figs)
    paths = save_drift_result(res, tmp_path)
    assert (tmp_path / "reliance.csv").exists() and all(p.exists() for p in paths.values())
    with pytest.raises(ValueError, match="no cot adapter"):
        DriftConfig.smoke_config(model="tiny-smollm2", trained=("cot",), adapters_root=str(tmp_path))
