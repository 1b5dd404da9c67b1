"""Transcoders, the frozen linear model, attribution graphs, their validation and interchange (issue 31)."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from workbench.core.arch import ArchitectureError
from workbench.methods.circuits.attribution import (
    AttributionConfig,
    AttributionError,
    _setup,
    attribute,
    direction_target,
    graph_scores,
    logit_diff_target,
    logit_targets,
    node_influence,
    prune_graph,
    total_effects,
)
from workbench.methods.circuits.frozen import FROZEN_ATTENTION, frozen_model
from workbench.methods.circuits.graph_io import (
    GraphSchemaError,
    cantor,
    cantor_unpair,
    check_graph_json,
    feature_cards,
    graph_json,
    read_graph_json,
    write_graph_files,
)
from workbench.methods.circuits.train import (
    build_transcoders,
    evaluate_transcoders,
    heldout_windows,
    recipe,
    train_transcoders,
)
from workbench.methods.circuits.transcoder import (
    TranscoderError,
    load_transcoders,
    replaced_mlps,
    save_transcoders,
)
from workbench.methods.circuits.validate import ablation_check, mlp_effects, pruned_share, validate_graph
from workbench.testing.tiny import random_transcoders, tiny_model

IDS = torch.tensor([[1, 5, 9, 23, 7, 11, 40, 3, 17, 29]])
CORPUS = [f"the quick brown fox number {i} jumps over {i % 7} lazy dogs and {i % 3} cats" for i in range(400)]


def random_set(model, *, k=6, layers=None, seed=1, skip=True):
    return random_transcoders(model, k=k, layers=layers, seed=seed, skip=skip)


# -- transcoders ------------------------------------------------------------------------------------------------------
def test_transcoder_topk_encodes_k_features_and_reconstructs():
    tc = random_set(tiny_model("llama"), k=5)[0]
    x = torch.randn(7, tc.d_model)
    acts = tc.encode(x)
    assert ((acts > 0).sum(-1) <= 5).all() and ((acts != 0).sum(-1) >= 1).all()
    assert torch.allclose(tc(x), acts @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T, atol=1e-6)


def test_transcoder_folder_round_trip_in_circuit_tracer_layout(tmp_path):
    m = tiny_model("llama")
    tcs = random_set(m)
    folder = save_transcoders(tcs, tmp_path / "set", {"note": "test"}, dtype=torch.float32)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["activation"] == "topk" and cfg["k"] == 6
    assert cfg["feature_input_hook"] == "mlp.hook_in" and cfg["feature_output_hook"] == "mlp.hook_out"
    assert cfg["transcoders"] == [f"layer_{i}.safetensors" for i in range(m.n_layers)]
    back = load_transcoders(folder, model=m)
    x = torch.randn(4, m.d_model)
    for i in tcs.layers:
        assert torch.equal(back[i](x), tcs[i](x))
    # a flipped byte is refused by the card's hashes
    f = folder / "layer_1.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(TranscoderError, match="layer_1"):
        load_transcoders(folder)


def test_reads_a_circuit_tracer_set_without_our_card(tmp_path):
    m = tiny_model("llama")
    d, F = m.d_model, 3 * m.d_model
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "ct"
    folder.mkdir()
    ref = {}
    for i in range(m.n_layers):
        t = {"W_enc": torch.randn(F, d, generator=g), "W_dec": torch.randn(F, d, generator=g),
             "b_enc": torch.randn(F, generator=g) - 2, "b_dec": torch.randn(d, generator=g)}
        save_file(t, str(folder / f"layer_{i}.safetensors"))
        ref[i] = t
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "activation": "topk", "k": 4, "transcoders": [str(folder / f"layer_{i}.safetensors") for i in range(3)]}))
    tcs = load_transcoders(folder, model=m)
    x = torch.randn(5, d)
    pre = x @ ref[2]["W_enc"].T + ref[2]["b_enc"]
    top = pre.topk(4, -1)
    want = torch.zeros_like(pre).scatter(-1, top.indices, top.values)  # circuit-tracer's TopK: no ReLU
    assert torch.allclose(tcs[2].encode(x), want, atol=1e-5)
    assert not tcs[2].has_skip
    (folder / "config.yaml").write_text(yaml.safe_dump({"model_kind": "cross_layer_transcoder",
                                                        "transcoders": ["a"]}))
    with pytest.raises(TranscoderError, match="cross_layer_transcoder"):
        load_transcoders(folder)


def test_training_resumes_to_the_same_transcoders(tmp_path):
    m = tiny_model("llama")
    cfg = recipe("smoke", corpus=CORPUS)
    full = train_transcoders(m, cfg, progress=False)
    first = train_transcoders(m, cfg, checkpoint=tmp_path / "ck", progress=False, max_steps=5)
    assert len(first.log) == 5
    resumed = train_transcoders(m, cfg, checkpoint=tmp_path / "ck", progress=False)
    assert resumed.resumed_from == 5
    for i in full.transcoders.layers:
        for name, t in full.transcoders[i].tensors().items():
            assert torch.equal(t, resumed.transcoders[i].tensors()[name]), (i, name)
    with pytest.raises(ValueError, match="another"):
        train_transcoders(m, recipe("smoke", corpus=CORPUS, k=3), checkpoint=tmp_path / "ck", progress=False)


def test_training_lowers_heldout_fvu_and_build_writes_a_card(tmp_path):
    m = tiny_model("llama")
    cfg = recipe("smoke", corpus=CORPUS, total_tokens=4000, expansion=4, k=8)
    tcs, quality = build_transcoders(m, cfg, tmp_path / "tc", recipe_name="smoke", progress=False)
    ids = heldout_windows(m, cfg)
    untrained = train_transcoders(m, recipe("smoke", corpus=CORPUS, total_tokens=1, expansion=4, k=8),
                                  progress=False).transcoders
    before = evaluate_transcoders(m, untrained, ids, ce_windows=None, progress=False)
    layer_rows = quality[quality["layer"] != "all"]
    assert (layer_rows["fvu"].to_numpy() < before[before["layer"] != "all"]["fvu"].to_numpy()).all()
    assert {"fvu", "l0", "dead_fraction", "ce_recovered", "ce_recovered_lo", "ce_recovered_hi"} <= set(quality)
    assert (quality["l0"] <= 8 + 1e-6).all()
    card = json.loads((tmp_path / "tc" / "workbench_card.json").read_text())
    assert card["model"]["weights_sha256"] == m.weights_hash and card["recipe"] == "smoke"
    with pytest.raises(Exception, match="overwrite|exists|not empty"):
        build_transcoders(m, cfg, tmp_path / "tc", progress=False)


def test_replaced_mlps_restores_the_model_also_on_error():
    m = tiny_model("llama")
    tcs = random_set(m)
    clean = m.hf(input_ids=IDS).logits
    with replaced_mlps(m, tcs):
        replaced = m.hf(input_ids=IDS).logits
    assert not torch.allclose(clean, replaced)
    with pytest.raises(RuntimeError):
        with replaced_mlps(m, tcs):
            raise RuntimeError("boom")
    assert torch.equal(m.hf(input_ids=IDS).logits, clean)


# -- the frozen model -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"])
def test_pinned_forward_reproduces_the_model(family):
    m = tiny_model(family)
    ref = m.hf(input_ids=IDS).logits[0]
    impl = m.hf.config._attn_implementation
    with frozen_model(m, IDS, None) as fm:
        assert torch.allclose(fm.logits, ref, atol=1e-5)
        with torch.no_grad():
            fm.pinned_forward(fm.embeddings(), [mm.y for mm in fm.mlps])
        h = fm.final_norm.seen_out
        logits = m.hf.lm_head(h)[0]
        if m.arch.logit_softcap:
            logits = torch.tanh(logits / m.arch.logit_softcap) * m.arch.logit_softcap
        assert torch.allclose(logits, ref, atol=1e-5)
    assert m.hf.config._attn_implementation == impl != FROZEN_ATTENTION
    assert torch.equal(m.hf(input_ids=IDS).logits[0], ref)


def test_pinned_model_is_linear_in_its_sources():
    m = tiny_model("llama")
    with frozen_model(m, IDS, None) as fm:
        E = fm.embeddings()
        consts = [mm.y for mm in fm.mlps]
        with torch.no_grad():
            fm.pinned_forward(E, consts)
            a = fm.final_norm.seen_out.clone()
            fm.pinned_forward(2 * E, [2 * c for c in consts])
            b = fm.final_norm.seen_out.clone()
    assert torch.allclose(b, 2 * a, atol=1e-5)


def test_non_rms_norm_is_refused_by_name():
    m = tiny_model("gpt2")
    with pytest.raises(ArchitectureError, match="ln_1|ln_2|ln_f|norm"):
        with frozen_model(m, IDS, None):
            pass
    assert m.hf.config._attn_implementation != FROZEN_ATTENTION


# -- attribution ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gemma2"])
def test_graph_is_exact_on_every_row(family):
    m = tiny_model(family)
    tcs = random_set(m)
    targets = logit_targets(m, m.hf(input_ids=IDS).logits[0], max_n_logits=3)
    targets.append(direction_target(m, 1, torch.randn(m.d_model), pos=4))
    g = attribute(m, IDS, tcs, targets=targets, cfg=AttributionConfig(max_feature_nodes=30, batch_size=8),
                  progress=False)
    assert g.check_exact(1e-4) < 1e-4
    assert g.stats["n_rows"] == len(targets) + 30


def test_graph_with_missing_layers_is_exact():
    m = tiny_model("llama")
    g = attribute(m, IDS, random_set(m, layers=[1]), cfg=AttributionConfig(max_feature_nodes=10), progress=False)
    g.check_exact(1e-4)
    assert set(g.features[:, 0].tolist()) == {1}


def test_graph_edges_equal_brute_force_removal_in_the_frozen_model():
    """The frozen model's Jacobian: removing one source (feature decoder vector, error, token embedding) from the
    linear model changes each computed row by exactly minus its edge."""
    m = tiny_model("llama")
    tcs = random_set(m)
    torch.manual_seed(0)
    g = attribute(m, IDS, tcs, cfg=AttributionConfig(max_feature_nodes=25, batch_size=8), progress=False)
    rows = g.computed_rows()
    with frozen_model(m, IDS, tcs) as fm:
        s = _setup(m, fm, tcs)
        sel = {tuple(int(v) for v in f): i for i, f in enumerate(g.features)}
        active = {(int(a), int(b), int(c)): j for j, (a, b, c) in
                  enumerate(zip(s.feat_layer, s.feat_pos, s.feat_idx))}

        def values(embeds, consts):
            with torch.no_grad():
                fm.pinned_forward(embeds[None], consts)
            out = []
            for r in rows.tolist():
                kind = g.node_kind(r)
                if kind == "target":
                    t = g.targets[r - g.target_start]
                    out.append(float(fm.final_norm.seen_out[0, t.pos] @ t.vector))
                else:
                    layer, pos, feat = (int(v) for v in g.features[r])
                    out.append(float(fm.mlps[layer].seen_in[0, pos] @ tcs[layer].W_enc[feat]))
            return torch.tensor(out)

        base = values(s.embeds, s.consts)
        checked = 0
        for (layer, pos, feat), i in list(sel.items())[:6]:
            consts = [c.clone() for c in s.consts]
            consts[layer][0, pos] -= s.dec_vecs[active[(layer, pos, feat)]]
            assert torch.allclose(base - values(s.embeds, consts), g.adjacency[rows, i], atol=1e-4)
            checked += 1
        for layer, pos in [(0, 3), (2, 7), (1, 9)]:
            consts = [c.clone() for c in s.consts]
            consts[layer][0, pos] -= s.errors[layer, pos]
            i = g.error_start + layer * g.n_pos + pos
            assert torch.allclose(base - values(s.embeds, consts), g.adjacency[rows, i], atol=1e-4)
        for pos in (0, 5):
            embeds = s.embeds.clone()
            embeds[pos] = 0
            assert torch.allclose(base - values(embeds, s.consts), g.adjacency[rows, g.token_start + pos], atol=1e-4)
    assert checked == 6


def test_direction_target_agrees_with_hf_hidden_states():
    m = tiny_model("qwen2")
    v = torch.randn(m.d_model)
    t = direction_target(m, 1, v, pos=6, name="probe")  # HF's last hidden state has the final norm in: use layer 1
    g = attribute(m, IDS, random_set(m), targets=[t], cfg=AttributionConfig(max_feature_nodes=5), progress=False)
    hs = m.hf(input_ids=IDS, output_hidden_states=True).hidden_states[2][0, 6]
    assert abs(float(g.row_value[g.target_start]) - float(hs @ v)) < 1e-4
    g.check_exact()
    # nothing at a later position can reach a target at position 6
    assert (g.adjacency[g.target_start, g.token_start + 7:g.target_start] == 0).all()


def test_bad_targets_and_budgets_are_refused():
    m = tiny_model("llama")
    tcs = random_set(m)
    with pytest.raises(AttributionError, match="layer"):
        direction_target(m, 9, torch.randn(m.d_model))
    with pytest.raises(AttributionError, match="entries"):
        direction_target(m, 1, torch.randn(3))
    with pytest.raises(AttributionError, match="position 40"):
        attribute(m, IDS, tcs, targets=[direction_target(m, 1, torch.randn(m.d_model), pos=40)], progress=False)
    with pytest.raises(AttributionError, match="max_feature_nodes"):
        attribute(m, IDS, tcs, cfg=AttributionConfig(max_feature_nodes=-1), progress=False)
    with pytest.raises(AttributionError, match="vocabulary"):
        logit_diff_target(m, 10**6, 1)


def test_influence_pruning_and_scores_on_a_known_graph():
    # features 0 -> 1 -> target; token -> 0; error -> target.  node order: 2 features, errors (1 layer x 1 pos),
    # 1 token, 1 target
    from workbench.methods.circuits.attribution import AttributionGraph, Target
    A = torch.zeros(5, 5)
    A[1, 0] = 2.0
    A[4, 1] = 3.0
    A[4, 2] = 1.0
    A[0, 3] = 1.0
    g = AttributionGraph("m", "s", "p", [7], ["x"], 1, np.array([[0, 0, 1], [0, 0, 2]]), np.array([1.0, 1.0]),
                         [Target("t", "final", 0, torch.zeros(4))], A, torch.full((5,), float("nan")),
                         torch.zeros(5), torch.zeros(5), torch.zeros(5), 2)
    w = g.target_weights()
    infl = node_influence(A, w)
    assert torch.allclose(infl, torch.tensor([0.75, 0.75, 0.25, 0.75, 0.0]))
    assert torch.allclose(total_effects(A, w), torch.tensor([6.0, 3.0, 1.0, 6.0, 0.0]))
    rep, comp = graph_scores(g)
    assert rep == pytest.approx(0.75) and comp == pytest.approx((0.75 + 0.75 + 0.25 + 0.75 + 0.75 * 1) / 3.5)
    assert prune_graph(g, 1.0, 1.0).node_mask.all()


# -- interchange and cards --------------------------------------------------------------------------------------------
def test_graph_json_follows_the_schema_and_round_trips(tmp_path):
    m = tiny_model("llama")
    g = attribute(m, IDS, random_set(m), cfg=AttributionConfig(max_feature_nodes=20), progress=False)
    data = graph_json(g, "test", vocab_size=m.arch.vocab_size)
    check_graph_json(data)
    ids = {n["node_id"] for n in data["nodes"]}
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder":
            layer, feat, pos = (int(v) for v in n["node_id"].split("_"))
            assert n["feature"] == cantor(layer, feat) and cantor_unpair(n["feature"]) == (layer, feat)
            assert n["ctx_idx"] == pos and n["layer"] == str(layer)
    assert all(x["source"] in ids and x["target"] in ids for x in data["links"])
    path = write_graph_files(g, tmp_path, "test", vocab_size=m.arch.vocab_size)
    write_graph_files(g, tmp_path, "other", vocab_size=m.arch.vocab_size)
    back = read_graph_json(path)
    assert back == json.loads(json.dumps(data))
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [x["slug"] for x in index["graphs"]] == ["test", "other"]
    bad = json.loads(json.dumps(data))
    bad["links"].append({"source": "nope", "target": data["nodes"][0]["node_id"], "weight": 1.0})
    with pytest.raises(GraphSchemaError, match="nope"):
        check_graph_json(bad)
    del bad["nodes"][0]["feature"]
    with pytest.raises(GraphSchemaError, match="feature"):
        check_graph_json(bad)


def test_feature_cards_point_at_the_largest_activation():
    m = tiny_model("llama")
    tcs = random_set(m)
    ids = torch.randint(3, 100, (6, 12), generator=torch.Generator().manual_seed(0))
    feats = [(1, 3), (2, 7)]
    cards = feature_cards(m, tcs, feats, ids, n_examples=3, context=4, progress=False)
    assert set(cards) == {cantor(1, 3), cantor(2, 7)}
    for (layer, feat) in feats:
        card = cards[cantor(layer, feat)]
        ex = card["examples_quantiles"][0]["examples"]
        if ex:
            assert max(ex[0]["tokens_acts_list"]) == pytest.approx(card["act_max"], rel=1e-4)
            assert ex[0]["tokens_acts_list"][ex[0]["train_token_ind"]] == pytest.approx(card["act_max"], rel=1e-4)
        assert len(card["top_logits"]) == 10 and 0 <= card["activation_frequency"] <= 1


# -- validation -------------------------------------------------------------------------------------------------------
def test_ablations_respect_causality_and_the_replacement_reproduces_the_model():
    m = tiny_model("llama")
    tcs = random_set(m)
    t = direction_target(m, 2, torch.randn(m.d_model), pos=5)
    g = attribute(m, IDS, tcs, targets=[t], cfg=AttributionConfig(max_feature_nodes=40), progress=False)
    frame = ablation_check(m, g, tcs, top_n=40)
    later = frame[frame["pos"] > 5]  # causal: features after the target's position change nothing, predicted or real
    assert (later["measured"] == 0).all() and (later["predicted"] == 0).all()
    assert frame["measured"].abs().max() > 0 and frame["predicted"].abs().max() > 0
    pruned = prune_graph(g)
    share = pruned_share(m, g, tcs, pruned)
    assert share["replacement"] == pytest.approx(share["clean"], abs=1e-4)
    all_kept = prune_graph(g, 1.0, 1.0)
    all_kept.node_mask[: g.n_features] = True
    # every selected feature kept: the share counts only unselected features' absence
    assert np.isfinite(pruned_share(m, g, tcs, all_kept)["pruned_share"])
    v = validate_graph(m, g, tcs, top_n=5)
    assert v.max_rel_error < 1e-4 and v.ablation_stats["n"] == 5
    eff = mlp_effects(g)
    assert len(eff) == m.n_layers * g.n_pos
