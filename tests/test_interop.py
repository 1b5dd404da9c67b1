"""Captures agree with two independent hook implementations: nnsight and TransformerLens's bridge.

Tolerances: nnsight hooks the very same modules, so it must agree bit for bit. The TransformerLens bridge switches
its own copy of the model to eager attention; on fp32 that reorders a few kernel ops, so it is compared at 1e-5.
The bridge is fed unpadded prompts of equal length: it does not derive position ids from an attention mask.
"""

import copy

import pytest
import torch

import workbench as wb
from tests.conftest import FAMILIES

PADDED = ["hello world, this is a test", "hi", "the cat sat on the mat"]
EQUAL = ["hello world", "howdy folks", "abcdefghijk"]


def _ours(model, enc, sites):
    with wb.trace(model, sites) as tr, torch.no_grad():
        model.hf(**enc)
    return {s: tr[s] for s in sites}


def _nnsight(model, enc, layers):
    import nnsight  # imported lazily: it patches torch on import

    nm = nnsight.TransformersModel(model.hf, tokenizer=model.tokenizer)
    layer_list = model.module(model.arch.layers)
    with torch.no_grad(), nm.trace(enc["input_ids"], attention_mask=enc["attention_mask"],
                                   position_ids=enc["position_ids"]):
        saved = nnsight.save([_nn_get(nm, model.arch.layer_path(i)).output for i in layers])
    assert len(layer_list) == model.n_layers
    return [s[0] if isinstance(s, tuple) else s for s in saved]


def _nn_get(nm, path):
    node = nm
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _bridge(model, tmp_path, input_ids, sites):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(
        str(folder), hf_model=copy.deepcopy(model.hf), tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu"
    )
    with torch.no_grad():
        _, cache = bridge.run_with_cache(input_ids, names_filter=lambda n: n in sites)
    return {s: cache[s] for s in sites}


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_post_equals_nnsight(family):
    from workbench.testing.tiny import tiny_model

    m = tiny_model(family)
    enc = m.encode(PADDED)
    layers = list(range(m.n_layers))
    ours = _ours(m, enc, [f"blocks.{i}.hook_resid_post" for i in layers])
    theirs = _nnsight(m, enc, layers)
    for i in layers:
        torch.testing.assert_close(ours[f"blocks.{i}.hook_resid_post"], theirs[i], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_post_equals_transformer_lens_bridge(family, tmp_path):
    from workbench.testing.tiny import tiny_model

    m = tiny_model(family)
    enc = m.encode(EQUAL)
    assert bool(enc["attention_mask"].all()), "prompts must be unpadded for the bridge"
    sites = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(m.n_layers)]
    ours = _ours(m, {"input_ids": enc["input_ids"]}, sites)
    theirs = _bridge(m, tmp_path, enc["input_ids"], sites)
    for s in sites:
        torch.testing.assert_close(ours[s], theirs[s], rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_real_model_agrees_with_nnsight_and_bridge(smollm2, tmp_path):
    m = smollm2
    layers = [0, m.n_layers // 2, m.n_layers - 1]
    sites = [f"blocks.{i}.hook_resid_post" for i in layers]
    enc = m.encode(["The capital of France is", "Two plus two equals"])
    ours = _ours(m, enc, sites)
    nn = _nnsight(m, enc, layers)
    for s, t in zip(sites, nn):
        torch.testing.assert_close(ours[s], t, rtol=0, atol=0)
    enc = m.encode(["The capital of France is"])
    ours = _ours(m, {"input_ids": enc["input_ids"]}, sites)
    br = _bridge(m, tmp_path, enc["input_ids"], sites)
    for s in sites:
        torch.testing.assert_close(ours[s], br[s], rtol=1e-4, atol=1e-4)
