"""Models spread over devices by accelerate (``device_map``), here on CPU with layers offloaded to disk: every tool
gives what the same model gives in one piece. On a machine with GPUs, benchmarks/cuda_check.py runs the same with
layers on different CUDA devices."""

from __future__ import annotations

import copy

import pytest
import torch

import workbench as wb
from workbench.core.models import from_hf, load_model
from workbench.core.store import harvest
from workbench.methods.routing import swap_layers
from workbench.testing.tiny import byte_tokenizer, tiny_model

PROMPTS = ["The cat sat on the mat.", "Paris is", "a b c d e f"]
SITES = [f"blocks.{i}.hook_resid_post" for i in range(3)] + ["blocks.1.hook_mlp_out", "blocks.2.attn.hook_z"]


def dispatched(model, tmp_path, family):
    from accelerate import dispatch_model

    hf = copy.deepcopy(model.hf)
    base = "model.language_model" if family == "gemma3" else "model"
    dmap = {f"{base}.embed_tokens": "cpu", f"{base}.layers.0": "cpu", f"{base}.layers.1": "disk",
            f"{base}.layers.2": "cpu", f"{base}.norm": "disk", "lm_head": "disk"}
    rest = {n for n, _ in hf.get_submodule(base).named_children()} - {"embed_tokens", "layers", "norm"}
    dmap |= {f"{base}.{n}": "cpu" for n in rest}
    hf = dispatch_model(hf, dmap, main_device="cpu", offload_dir=str(tmp_path / "offload"))
    return from_hf(hf, byte_tokenizer(), name=f"{model.name}-dispatched")


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def pair(request, tmp_path_factory):
    ref = tiny_model(request.param)
    return ref, dispatched(ref, tmp_path_factory.mktemp("off"), request.param)


def test_offloaded_weights_are_off_device_and_identity_is_the_same(pair):
    ref, disp = pair
    assert disp.is_dispatched and not ref.is_dispatched
    assert any(p.device.type == "meta" for p in disp.hf.parameters())  # really offloaded
    assert disp.device == ref.device == torch.device("cpu") and disp.head_device == torch.device("cpu")
    assert disp.weights_hash == ref.weights_hash  # same values, wherever they live
    with pytest.raises(ValueError, match="dispatched"):
        from_hf(disp.hf, byte_tokenizer(), device="cpu")


def test_trace_stop_and_edits(pair):
    ref, disp = pair
    enc = ref.encode(PROMPTS)
    out = {}
    for m in (ref, disp):
        with wb.trace(m, SITES) as tr, torch.no_grad():
            logits = m.hf(**enc).logits
        with wb.trace(m, ["blocks.1.hook_resid_post"], stop=True) as st, torch.no_grad():
            m.hf(**enc)
        edit = wb.add_direction(torch.ones(m.d_model), alpha=0.5)
        with wb.trace(m, edits={"blocks.0.hook_resid_post": edit}), torch.no_grad():
            edited = m.hf(**enc).logits
        out[m.name] = ({s: tr[s] for s in SITES}, logits, st["blocks.1.hook_resid_post"], edited)
    a, b = out.values()
    for s in SITES:
        torch.testing.assert_close(a[0][s], b[0][s], rtol=0, atol=0)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert wb.active_hooks() == []


def test_lens_harvest_and_layer_replacement(pair, tmp_path):
    ref, disp = pair
    fa = wb.logit_lens(ref, PROMPTS, positions="all", targets=["a"], top_k=3)
    fb = wb.logit_lens(disp, PROMPTS, positions="all", targets=["a"], top_k=3)
    assert fa.equals(fb)
    sa = harvest(ref, PROMPTS, SITES[:2], tmp_path / "a", progress=False, shard_tokens=16)
    sb = harvest(disp, PROMPTS, SITES[:2], tmp_path / "b", progress=False, shard_tokens=16)
    for s in SITES[:2]:
        torch.testing.assert_close(sa.load(s), sb.load(s), rtol=0, atol=0)
    donor_ref = tiny_model(ref.arch.family, seed=3)
    enc = ref.encode(PROMPTS)
    with swap_layers(ref, donor_ref, 1, 1), torch.no_grad():
        want = ref.hf(**enc).logits
    with swap_layers(disp, donor_ref, 1, 1), torch.no_grad():  # the donor's layer runs on its own device: CPU
        got = disp.hf(**enc).logits
    torch.testing.assert_close(want, got, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(disp.hf(**enc).logits, ref.hf(**enc).logits, rtol=0, atol=0)  # restored


def test_load_model_device_map_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_model("smollm2-135m", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="device_map"):
        load_model("smollm2-135m", device_map="everywhere")
    with pytest.raises(ValueError, match="go with a device_map"):
        load_model("smollm2-135m", offload_folder=tmp_path)


def test_load_model_from_a_folder_with_a_device_map(tmp_path):
    """A saved model loaded with an explicit device_map that sends a layer to disk gives the one-piece logits."""
    ref = tiny_model("llama")
    ref.hf.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    m = load_model(tmp_path / "m", device_map=dmap, offload_folder=tmp_path / "off")
    assert m.is_dispatched and any(p.device.type == "meta" for p in m.hf.parameters())
    enc = ref.encode(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(m.hf(**enc).logits, ref.hf(**enc).logits, rtol=0, atol=0)
    assert m.weights_hash == load_model(tmp_path / "m", device="cpu").weights_hash


def test_patching_and_tuned_lens_on_a_dispatched_model(pair):
    from workbench.methods.patching import activation_patching, attribution_patching
    from workbench.methods.tuned_lens import TunedLens

    ref, disp = pair
    pairs = [{"clean": "abcdef", "corrupt": "abxdef", "answer": "a", "wrong": "b"}]
    kinds = ("resid", "attn", "mlp", "head")
    for run in (lambda m: activation_patching(m, pairs, site_types=kinds, progress=False),
                lambda m: attribution_patching(m, pairs, site_types=kinds, progress=False)):
        a, b = run(ref), run(disp)
        assert (a.frame.score - b.frame.score).abs().max() < 1e-6
    lens = TunedLens.for_model(ref)
    with torch.no_grad():
        for t in lens.translators:
            t.weight.normal_(0, 0.05)
    fa = wb.logit_lens(ref, PROMPTS, lens=lens, top_k=3)
    fb = wb.logit_lens(disp, PROMPTS, lens=lens, top_k=3)
    assert fa.equals(fb)
    assert wb.active_hooks() == []
