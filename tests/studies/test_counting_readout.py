"""Counting study pieces: answer evaluation, digit-row repair, LoRA, steering, module swap, the study itself."""

import contextlib
import re

import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.core.swap import swap_modules
from workbench.data.tasks import DEFAULT_ANSWER_PREFIX
from workbench.methods.activations import PrefixCache
from workbench.methods.probes.base import load_probe
from workbench.studies.counting_readout.evaluation import evaluate_answers, parse_answer
from workbench.studies.counting_readout.interventions import DigitRowHead, steering_edit, train_digit_rows, train_lora_qv
from workbench.studies.counting_readout.study import CountingConfig, run_counting_study, save_counting_result
from workbench.testing.tiny import tiny_model

DIGITS = [ord(str(d)) for d in range(1, 10)]  # the byte tokenizer: token id == byte value
PROMPTS = ["cat dog cat How many cat are there? Answer: ", "1+2=", "Items: fig, kiwi. Count: "]
COUNTS = [2, 3, 2]


@pytest.mark.parametrize("text, value", [(" 3 apples", 3), ("\n\nThe answer is 12.", 12), (" three", None), ("", None)])
def test_parse_rule(text, value):
    assert parse_answer(text) == value


def test_evaluation_matches_direct_computation():
    m = tiny_model("qwen2")
    ev = evaluate_answers(m, PROMPTS, COUNTS, DIGITS, gen_tokens=3)
    enc = m.encode(PROMPTS)
    with torch.no_grad():
        logits = m.hf(**enc).logits[:, -1]
        out = m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=3,
                            do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    assert ev.items.digit_pred.tolist() == (logits[:, DIGITS].argmax(-1) + 1).tolist()
    assert ev.items.full_correct.tolist() == [int(logits[i].argmax()) == DIGITS[c - 1] for i, c in enumerate(COUNTS)]
    texts = m.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ev.items.gen_text.tolist() == texts  # no answer decided early here: the whole greedy continuation
    last = ev.ranks[ev.ranks.layer == m.n_layers].sort_values("item")
    gold = torch.tensor([DIGITS[c - 1] for c in COUNTS])
    expected = (logits > logits.gather(1, gold[:, None])).sum(-1) + 1
    assert last["rank"].tolist() == expected.tolist()
    assert set(ev.ranks_by_layer().columns) == {"layer", "median_rank", "mean_prob", "lens_accuracy"}


def _hf_reference(m, prompts, gen_tokens, edits=None):
    """Next-token logits and greedy texts from plain HF calls (a full forward, then ``generate``)."""
    enc = m.encode(prompts)
    ctx = wb.trace(m, [], edits=edits) if edits else contextlib.nullcontext()
    with ctx, torch.no_grad():
        logits = m.hf(**enc).logits[:, -1]
        out = m.hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                            max_new_tokens=gen_tokens, do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    return logits, m.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox"])
def test_shared_prompt_cache_equals_fresh_runs_for_baseline_head_swap_and_steering(family):
    """One PrefixCache serves the baseline, a swapped head and steering; each equals plain HF runs (forward and
    generate), and equals an evaluation that runs the prompts itself."""
    m = tiny_model(family)
    prompts = PROMPTS + ["a b c d e f g h i j k l m n o p q r s t u v w x y z Count: "]  # past tiny sliding windows
    counts = COUNTS + [9]
    cache = PrefixCache.build(m, prompts, batch_size=2)
    torch.manual_seed(0)
    head = DigitRowHead(m.module(m.arch.unembed), DIGITS)
    with torch.no_grad():
        head.delta.normal_(0, 0.5)
    v = torch.randn(m.d_model)
    edits = {"blocks.1.hook_resid_post": steering_edit(v, 4.0)}
    cases = [(None, contextlib.nullcontext()), (edits, contextlib.nullcontext()),
             (None, swap_modules(m, {m.arch.unembed: head}))]
    for case_edits, ctx in cases:
        with ctx:
            ev = evaluate_answers(m, prompts, counts, DIGITS, gen_tokens=4, edits=case_edits, cache=cache)
            fresh = evaluate_answers(m, prompts, counts, DIGITS, gen_tokens=4, edits=case_edits, batch_size=3)
            logits, texts = _hf_reference(m, prompts, 4, case_edits)
        assert ev.items.digit_pred.tolist() == (logits[:, DIGITS].argmax(-1) + 1).tolist()
        assert ev.items.full_pred.tolist() == m.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for got, ref in zip(ev.items.gen_text, texts):
            assert ref.startswith(got) and parse_answer(got) == parse_answer(ref)
        assert ev.items.drop(columns="gen_text").equals(fresh.items.drop(columns="gen_text"))
        pd.testing.assert_series_equal(ev.ranks["rank"], fresh.ranks["rank"])
        pd.testing.assert_series_equal(ev.ranks["prob"], fresh.ranks["prob"], rtol=1e-4, atol=1e-7)
    # steering changes the answers (else the steering case above tests nothing)
    assert not evaluate_answers(m, prompts, counts, DIGITS, gen_tokens=4, edits=edits, cache=cache).ranks.equals(
        evaluate_answers(m, prompts, counts, DIGITS, gen_tokens=4, cache=cache).ranks)


def test_prompt_cache_features_equal_residual_features_and_refuse_other_prompts():
    from workbench.methods.probes.features import residual_features_many

    m = tiny_model("llama")
    mentions = [[1, 3], [0], [2, 4, 5]]
    cache = PrefixCache.build(m, PROMPTS, batch_size=2, positions={"mentions": mentions})
    ref = residual_features_many(m, PROMPTS, None, {"last": "last", "mentions": mentions}, batch_size=3)
    layers = list(range(m.n_layers + 1))
    for layer in layers:
        torch.testing.assert_close(cache.last_token(layers)[layer], ref["last"][layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.features["mentions"][layer], ref["mentions"][layer], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="other prompts or another model"):
        evaluate_answers(m, PROMPTS[:2], COUNTS[:2], DIGITS, cache=cache)
    with pytest.raises(ValueError, match="other prompts or another model"):
        evaluate_answers(tiny_model("llama"), PROMPTS, COUNTS, DIGITS, cache=cache)
    with pytest.raises(ValueError, match="reserved"):
        PrefixCache.build(m, PROMPTS, positions={"last": "last"})


def test_generation_stops_once_every_answer_is_decided(monkeypatch):
    import workbench.studies.counting_readout.evaluation as evaluation

    m = tiny_model("llama")
    calls = []
    handle = m.hf.register_forward_hook(lambda *a: calls.append(1))
    try:
        evaluate_answers(m, PROMPTS, COUNTS, DIGITS, gen_tokens=5)
        full = len(calls)
        calls.clear()
        monkeypatch.setattr(evaluation, "_DECIDED", re.compile(r""))  # every answer counts as decided at once
        ev = evaluate_answers(m, PROMPTS, COUNTS, DIGITS, gen_tokens=5)
    finally:
        handle.remove()
    assert full == 1 + 4 and len(calls) == 1  # the prompt pass, then 4 steps -- or none
    assert (ev.items.gen_text.str.len() <= 1).all()


def test_zero_delta_head_is_identical_and_swap_restores():
    m = tiny_model("llama")
    enc = m.encode(PROMPTS)
    with torch.no_grad():
        clean = m.hf(**enc).logits
    head = DigitRowHead(m.module(m.arch.unembed), DIGITS)
    original = m.module(m.arch.unembed)
    with swap_modules(m, {m.arch.unembed: head}), torch.no_grad():
        assert torch.equal(m.hf(**enc).logits, clean)
    assert m.module(m.arch.unembed) is original
    with pytest.raises(RuntimeError, match="inside"):
        with swap_modules(m, {m.arch.unembed: head}):
            raise RuntimeError("inside")
    assert m.module(m.arch.unembed) is original
    with pytest.raises(ValueError, match="unknown module path"):
        with swap_modules(m, {"model.nope": head}):
            pass


def test_digit_row_repair_trains_only_digit_rows_and_improves_the_objective():
    m = tiny_model("llama")  # tied head: the embedding must stay untouched
    embed_before = m.W_E.detach().clone()
    torch.manual_seed(0)
    h = torch.randn(90, m.d_model)
    gold = torch.arange(90) % 9
    repair = train_digit_rows(m, h, gold, DIGITS, steps=200, lr=0.1)
    assert repair.n_params == 9 * m.d_model
    assert repair.losses[-1] < 0.5 * repair.losses[0]
    with repair.applied(m), torch.no_grad():
        logits = m.module(m.arch.unembed)(h)
    digit_acc = float((logits[:, DIGITS].argmax(-1) == gold).float().mean())
    with torch.no_grad():
        base_acc = float((m.module(m.arch.unembed)(h)[:, DIGITS].argmax(-1) == gold).float().mean())
    assert digit_acc > base_acc and digit_acc > 0.5
    assert torch.equal(m.W_E, embed_before)
    nondigit = [i for i in range(m.arch.vocab_size) if i not in DIGITS]
    torch.testing.assert_close(repair.head.weight[nondigit], m.W_U[nondigit], rtol=0, atol=0)


def test_digit_rows_bad_input():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="features"):
        train_digit_rows(m, torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), DIGITS)
    with pytest.raises(ValueError, match="gold indices"):
        train_digit_rows(m, torch.zeros(4, m.d_model), torch.full((4,), 9), DIGITS)


def test_lora_trains_a_copy_and_leaves_the_model_alone():
    m = tiny_model("llama")
    before = m.weights_hash
    answers = [DIGITS[c - 1] for c in COUNTS]
    result = train_lora_qv(m, PROMPTS, answers, r=4, alpha=8, steps=30, batch_size=3, lr=1e-2, seed=0)
    assert result.losses[-1] < result.losses[0]
    # r x (d_in + d_out) per q_proj / v_proj per layer (GQA: v_proj outputs 2 heads x 16)
    d, kv = m.d_model, 2 * 16
    assert result.n_params == m.n_layers * 4 * ((d + d) + (d + kv))
    assert tiny_model("llama").weights_hash == before == tiny_model("llama").weights_hash
    assert m.weights_hash == before
    assert result.model.arch == m.arch  # merged: same module paths, plain HF model
    enc = m.encode(PROMPTS)
    with torch.no_grad():
        assert not torch.equal(result.model.hf(**enc).logits, m.hf(**enc).logits)


def test_steering_adds_unit_direction_at_last_position():
    m = tiny_model("llama")
    v = torch.randn(m.d_model)
    site = "blocks.1.hook_resid_post"
    with wb.trace(m, [site]) as clean, torch.no_grad():
        m.hf(**m.encode(PROMPTS))
    with wb.trace(m, [site], edits={site: steering_edit(v, 3.0)}) as steered, torch.no_grad():
        m.hf(**m.encode(PROMPTS))
    diff = steered[site] - clean[site]
    torch.testing.assert_close(diff[:, -1], (3.0 * v / v.norm()).expand(len(PROMPTS), -1), rtol=1e-5, atol=1e-5)
    assert diff[:, :-1].abs().max() == 0


def test_study_smoke_on_a_tiny_model(tmp_path):
    m = tiny_model("gpt2")
    cfg = CountingConfig.smoke_config(tasks=("entity", "addition"), n_train=45, n_test=18, logistic_probes=True,
                                      interventions=("digit_rows", "lora_qv", "steering"),
                                      probes_root=str(tmp_path))
    r = run_counting_study(cfg, model=m, progress=False)
    assert set(r.accuracy.method) == {"baseline", "probe_round", "digit_rows", "lora_qv"}
    assert set(r.probes.variant) == {"last_token", "mention_mean", "residual", "decoupled", "decoupled_residual"}
    # every probe row carries its interval over distinct held-out prompts, and the interval holds the estimate
    main = r.probes[r.probes.variant == "last_token"]
    assert (main.r2_lo <= main.r2_test + 1e-12).all() and (main.r2_test <= main.r2_hi + 1e-12).all()
    addition = main[main.task == "addition"]
    assert (addition.n_test_units < addition.n_test).all()  # addition repeats prompts: units, not rows
    # the controls: each task x variant has every control; the steering table has its nulls
    assert set(r.controls.control) >= {"probe", "control_task", "selectivity", "shuffled_labels",
                                       "nuisance_baseline", "residual_probe"}
    assert set(r.controls.variant) == {"plain", "decoupled"}
    assert set(r.steering.edit) == {"steer_probe", "steer_class_mean", "count_edit"}
    assert (r.steering.n_null == cfg.n_null).all() and {"null_lo", "null_hi", "p_greater"} <= set(r.steering.columns)
    assert set(r.geometry.basis) == {"raw", "gain", "gain_whitened"}
    ex = r.extras.set_index(["task", "key"]).value
    assert r.extras.key.str.startswith("decoupled_test_operand_").any()  # addition's held-out first operands
    assert float(ex["entity", "best_r2_max_null_p"]) >= 1 / (1 + cfg.n_layer_permutations)
    assert {"digit_restricted_lo", "digit_restricted_hi", "n_units"} <= set(r.accuracy.columns)
    assert r.lens.groupby(["task", "method"]).layer.nunique().eq(m.n_layers + 1).all()
    assert r.accuracy.digit_restricted.between(0, 1).all()
    assert (r.extras[r.extras.key == "digit_rows_params"].value == 9 * m.d_model).all()
    assert len(r.angles) == min(2, 9)
    saved = list((tmp_path / "probes").rglob("card.json"))
    assert len(saved) == 2
    probe = load_probe(saved[0].parent)
    assert probe.direction_raw.shape == (m.d_model,)
    summary = r.summary()
    assert {"digit_restricted_mean", "generation_sd", "digit_restricted_lo", "n_seeds"} <= set(summary.columns)
    assert set(r.control_summary().control) >= {"probe", "residual_probe"}
    peaks = r.lens_peaks()
    assert len(peaks) == r.lens.groupby(["task", "seed", "method"]).ngroups
    for row in peaks.itertuples():
        g = r.lens[(r.lens.task == row.task) & (r.lens.method == row.method)].set_index("layer")
        assert g.mean_prob.max() == row.peak_prob == g.mean_prob[row.peak_prob_layer]
        assert g.median_rank.min() == row.best_median_rank == g.median_rank[row.best_rank_layer]
        assert row.last_layer_median_rank == g.median_rank[m.n_layers]
    paths = save_counting_result(r, tmp_path / "out")
    assert (tmp_path / "out" / "lens_peaks.csv").exists() and "lens_peaks" in paths
    import workbench.studies.counting_readout.plots as plots

    lens_fig = plots.lens_rank_by_layer(r.lens)
    yaxes = list(lens_fig.select_yaxes())
    assert len(yaxes) == 2 and all(ax.type == "log" and ax.autorange == "reversed" for ax in yaxes)
    assert len(lens_fig.data) == 2 * 3  # tasks x the three methods with lens ranks (baseline, digit rows, LoRA)
    for fig in (plots.probe_r2_by_layer(r.probes), plots.cos_by_layer(r.geometry), plots.accuracy_bars(summary),
                plots.probe_controls_by_layer(r.probes)):
        assert len(fig.data) > 0
    with pytest.raises(ValueError, match="lacks column"):
        plots.cos_by_layer(r.probes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks=("counting_sheep",)), "tasks="),
        (dict(seeds=()), "seeds"),
        (dict(n_test=0), "n_test"),
        (dict(n_lora_train=700, interventions=("lora_qv",)), "n_lora_train"),
        (dict(interventions=("lora_qv", "prayer")), r"interventions=\('lora_qv', 'prayer'\).*list of \['digit_rows'"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CountingConfig(**kwargs)


def test_a_subset_of_interventions_runs_only_those():
    m = tiny_model("llama")
    r = run_counting_study(CountingConfig.smoke_config(tasks=("list_length",), interventions=("digit_rows",)),
                           model=m, progress=False)
    assert set(r.accuracy.method) == {"baseline", "probe_round", "digit_rows"}
    assert "train_lora" not in r.timings and "select_steering" not in r.timings
    assert set(r.lens.method) == {"baseline", "digit_rows"}


def test_bad_layers_fail_before_any_forward():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        run_counting_study(CountingConfig.smoke_config(layers=[0, 99]), model=m, progress=False)


def test_answers_that_are_not_single_tokens_are_refused(monkeypatch):
    m = tiny_model("llama")
    monkeypatch.setitem(DEFAULT_ANSWER_PREFIX, "addition", "= ")  # "= 3": two byte tokens, no fallback
    with pytest.raises(ValueError, match="one token|single"):
        run_counting_study(CountingConfig.smoke_config(tasks=("addition",)), model=m, progress=False)


def test_no_prompt_is_on_both_sides_of_any_counting_split():
    """The study's splits (plain, and each task's decoupled variant) never put a prompt string on both sides; the
    addition variant never shares a first operand."""
    from workbench.data.tasks import DECOUPLED_OPTIONS, make_task, split_groups, split_indices
    from workbench.studies.counting_readout.study import _make_sets

    m = tiny_model("gpt2")
    cfg = CountingConfig.smoke_config(n_train=120, n_test=60)
    for task in ("entity", "character", "addition", "list_length"):
        _, train, test, _ = _make_sets(m, task, 11, cfg)
        assert not set(train.prompts) & set(test.prompts), task
        ts = make_task(task, 180, seed=11, **DECOUPLED_OPTIONS[task])
        groups = split_groups(ts, task, decoupled=True)
        tr, te = split_indices(ts.counts, [120, 60], seed=11, groups=groups)
        assert not {groups[i] for i in tr} & {groups[i] for i in te}, task
        assert not {ts.prompts[i] for i in tr} & {ts.prompts[i] for i in te}, task
