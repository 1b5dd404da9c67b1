"""The hook core: captures equal Hugging Face's own, edits behave, hooks never leak."""

import pytest
import torch

import workbench as wb
from tests.conftest import PROMPTS
from workbench.core.sites import SiteError


def _forward(m, **kw):
    with torch.no_grad():
        return m.hf(**m.encode(PROMPTS), **kw)


def test_residuals_equal_output_hidden_states(tiny):
    L = tiny.n_layers
    sites = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
    sites.append("ln_final.hook_normalized")
    with wb.trace(tiny, sites) as tr:
        out = _forward(tiny, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    torch.testing.assert_close(tr["blocks.0.hook_resid_pre"], hs[0], rtol=0, atol=0)
    for i in range(L - 1):
        torch.testing.assert_close(tr[f"blocks.{i}.hook_resid_post"], hs[i + 1], rtol=0, atol=0)
    # HF's last hidden state has the final norm applied; our resid_post of the last block does not.
    torch.testing.assert_close(tr["ln_final.hook_normalized"], hs[L], rtol=0, atol=0)
    torch.testing.assert_close(tiny.final_norm(tr[f"blocks.{L - 1}.hook_resid_post"]), hs[L], rtol=0, atol=0)


def test_resid_pre_equals_previous_resid_post(tiny):
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(1, tiny.n_layers)]
    sites += [f"blocks.{i}.hook_resid_post" for i in range(tiny.n_layers - 1)]
    with wb.trace(tiny, sites) as tr:
        _forward(tiny)
    for i in range(1, tiny.n_layers):
        assert torch.equal(tr[f"blocks.{i}.hook_resid_pre"], tr[f"blocks.{i - 1}.hook_resid_post"])


# Gemma's post-attention/post-MLP norms sit outside the attn/mlp modules, so its update is not the plain sum.
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"])
def test_attn_and_mlp_outputs_sum_to_residual_update(family):
    """resid_post = resid_pre + attn_out + mlp_out (sequential and NeoX's parallel residual alike)."""
    from workbench.testing.tiny import tiny_model

    tiny = tiny_model(family)
    i = 1
    sites = [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out",
             f"blocks.{i}.hook_resid_post"]
    with wb.trace(tiny, sites) as tr:
        _forward(tiny)
    total = tr[sites[0]] + tr[sites[1]] + tr[sites[2]]
    torch.testing.assert_close(total, tr[sites[3]], rtol=1e-6, atol=1e-6)


def test_identity_edit_is_bit_identical(tiny):
    clean = _forward(tiny).logits
    every = ["hook_embed", "ln_final.hook_normalized"]
    for i in range(tiny.n_layers):
        every += [f"blocks.{i}.{h}" for h in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    with wb.trace(tiny, edits={s: (lambda t: t.clone()) for s in every}):
        edited = _forward(tiny).logits
    assert torch.equal(clean, edited)
    with wb.trace(tiny, every, positions=-1):
        captured = _forward(tiny).logits
    assert torch.equal(clean, captured)


def test_add_direction_edit_matches_manual_residual(tiny):
    """Adding v at resid_post of layer 0 == feeding layer 1 the shifted residual."""
    torch.manual_seed(1)
    v = torch.randn(tiny.d_model)
    with wb.trace(tiny, ["blocks.1.hook_resid_pre"], edits={"blocks.0.hook_resid_post": wb.add_direction(v, 2.0)}) as tr:
        _forward(tiny)
    with wb.trace(tiny, ["blocks.0.hook_resid_post"]) as clean:
        _forward(tiny)
    torch.testing.assert_close(tr["blocks.1.hook_resid_pre"], clean["blocks.0.hook_resid_post"] + 2.0 * v)


def test_patch_from_another_run_restores_clean_logits(tiny):
    m = tiny
    clean_enc, corrupt_enc = m.encode(["abcdefgh"]), m.encode(["zyxwvuts"])
    site = f"blocks.{m.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        with wb.trace(m, [site]) as src:
            clean = m.hf(**clean_enc).logits
        with wb.trace(m, edits={site: wb.patch_from(src, site)}):
            patched = m.hf(**corrupt_enc).logits
    torch.testing.assert_close(patched, clean, rtol=0, atol=0)


def test_positions_last_token_under_left_padding(tiny):
    enc = tiny.encode(PROMPTS)
    with wb.trace(tiny, ["blocks.1.hook_resid_post"]) as full, torch.no_grad():
        tiny.hf(**enc)
    with wb.trace(tiny, ["blocks.1.hook_resid_post"], positions=-1) as last, torch.no_grad():
        tiny.hf(**enc)
    assert last["blocks.1.hook_resid_post"].shape == (len(PROMPTS), tiny.d_model)
    assert torch.equal(last["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:, -1])
    idx = torch.tensor([[0, 2]] * len(PROMPTS))
    with wb.trace(tiny, ["blocks.1.hook_resid_post"], positions=idx) as picked, torch.no_grad():
        tiny.hf(**enc)
    assert torch.equal(picked["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:, [0, 2]])


def test_left_padding_does_not_change_results(tiny):
    """position_ids follow the mask: a padded batch gives each prompt's own unpadded result."""
    with torch.no_grad():
        batched = tiny.hf(**tiny.encode(PROMPTS)).logits[:, -1]
        for i, p in enumerate(PROMPTS):
            alone = tiny.hf(**tiny.encode([p])).logits[:, -1]
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_stop_early_runs_only_needed_layers(tiny):
    calls = []
    handles = [tiny.module(tiny.arch.layer_path(i)).register_forward_hook(lambda mod, a, o, i=i: calls.append(i))
               for i in range(tiny.n_layers)]
    try:
        with wb.trace(tiny, ["blocks.0.hook_resid_post"], stop=True) as tr:
            _forward(tiny)
            raise AssertionError("the forward should have stopped")  # never reached
        assert calls == [0]
        with wb.trace(tiny, ["blocks.0.hook_resid_post"]) as full:
            _forward(tiny)
        assert torch.equal(tr["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])
    finally:
        for h in handles:
            h.remove()


def test_hooks_removed_when_forward_raises(tiny):
    def boom(t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with wb.trace(tiny, ["blocks.0.hook_resid_post"], edits={"blocks.1.hook_mlp_out": boom}):
            assert len(wb.active_hooks()) == 2
            _forward(tiny)
    assert wb.active_hooks() == []
    for _, module in tiny.hf.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_foreign_hooks_are_never_removed(tiny):
    seen = []
    layer = tiny.module(tiny.arch.layer_path(0))
    foreign = layer.register_forward_hook(lambda *a: seen.append(1))
    try:
        with wb.trace(tiny, ["blocks.0.hook_resid_post"]):
            _forward(tiny)
        assert list(layer._forward_hooks) == [foreign.id]
        _forward(tiny)
        assert len(seen) == 2
    finally:
        foreign.remove()


def test_ledger_lists_own_hooks(tiny):
    with wb.trace(tiny, ["hook_embed", "blocks.1.hook_resid_pre"]) as tr:
        records = wb.active_hooks()
        assert {r.site for r in records} == {"hook_embed", "blocks.1.hook_resid_pre"}
        assert {r.kind for r in records} == {"output", "input"}
        assert all(r.trace_id == tr.id for r in records)


def test_generate_captures_every_step(tiny):
    enc = tiny.encode(["hello"])
    with wb.trace(tiny, ["blocks.0.hook_resid_post"], positions=-1) as tr, torch.no_grad():
        tiny.hf.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)
    assert len(tr.captures("blocks.0.hook_resid_post")) == 4


def test_gradients_flow_when_not_detached(tiny):
    with wb.trace(tiny, ["blocks.1.hook_resid_post"], detach=False) as tr:
        out = tiny.hf(**tiny.encode(PROMPTS))
    h = tr["blocks.1.hook_resid_post"]
    assert h.requires_grad
    (g,) = torch.autograd.grad(out.logits[:, -1].sum(), h)
    assert g.shape == h.shape and g.abs().sum() > 0


def test_raw_module_paths_and_inputs(tiny):
    path = tiny.arch.mlp_path(1)
    with wb.trace(tiny, [path, path + ":input", "blocks.1.hook_mlp_out"]) as tr:
        _forward(tiny)
    assert torch.equal(tr[path], tr["blocks.1.hook_mlp_out"])
    assert tr[path + ":input"].shape[-1] == tiny.d_model


@pytest.mark.parametrize(
    "site, match",
    [
        ("blocks.99.hook_resid_post", "out of range"),
        ("blocks.0.hook_resid_middle", "unknown hook"),
        ("no.such.module", "unknown site"),
        ("", "non-empty"),
    ],
)
def test_bad_sites_raise_before_hooking(site, match):
    from workbench.testing.tiny import tiny_model

    m = tiny_model("llama")
    with pytest.raises(SiteError, match=match) as info:
        wb.trace(m, ["blocks.0.hook_resid_post", site])
    assert "valid" in str(info.value) or "layers" in str(info.value) or "block hooks" in str(info.value)
    assert wb.active_hooks() == []


def test_bad_edits_and_positions():
    from workbench.testing.tiny import tiny_model

    m = tiny_model("llama")
    with pytest.raises(TypeError, match="callable"):
        wb.trace(m, edits={"hook_embed": 3})
    with pytest.raises(ValueError, match="positions"):
        wb.trace(m, ["hook_embed"], positions="last")
    with pytest.raises(ValueError, match="shape"):
        with wb.trace(m, edits={"hook_embed": lambda t: t[:, :1]}):
            m.hf(**m.encode(["abc"]))
    with pytest.raises(ValueError, match="at least one"):
        wb.trace(m, [])


def test_grads_equal_autograd_at_every_layer_and_hooks_leave(tiny):
    """trace(grads=True) records d metric / d site (positions selected like the capture), equal to autograd on HF
    hidden_states; its tensor hooks are in the ledger inside the block and gone after it."""
    sites = [f"blocks.{i}.hook_resid_post" for i in range(tiny.n_layers - 1)]
    enc = tiny.encode(PROMPTS)
    with torch.enable_grad():
        out = tiny.hf(**enc, output_hidden_states=True)
        for h in out.hidden_states:
            h.retain_grad()
        out.logits[:, -1, 7].sum().backward()
        want = [out.hidden_states[i + 1].grad for i in range(len(sites))]
        tiny.hf.zero_grad(set_to_none=True)
        with wb.trace(tiny, sites, grads=True, positions=-1) as tr:
            logits = tiny.hf(**enc).logits
            assert any(r.kind == "grad" for r in wb.active_hooks())
            logits[:, -1, 7].sum().backward()
    tiny.hf.zero_grad(set_to_none=True)
    assert wb.active_hooks() == []
    for site, w in zip(sites, want, strict=True):
        torch.testing.assert_close(tr.grad(site), w[:, -1], rtol=1e-5, atol=1e-7)
    assert len(tr.grads(sites[0])) == 1


def test_grads_need_a_graph_and_a_backward(tiny):
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not require grad"):
        with wb.trace(tiny, ["blocks.0.hook_mlp_out"], grads=True):
            _forward(tiny)
    assert wb.active_hooks() == []
    with torch.enable_grad(), wb.trace(tiny, ["blocks.0.hook_mlp_out"], grads=True) as tr:
        tiny.hf(**tiny.encode(PROMPTS))
    with pytest.raises(KeyError, match="run a backward"):
        tr.grad("blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="stop=True"):
        wb.trace(tiny, ["blocks.0.hook_mlp_out"], grads=True, stop=True)
    with wb.trace(tiny, ["blocks.0.hook_mlp_out"]) as tr:
        _forward(tiny)
    with pytest.raises(KeyError, match="without grads=True"):
        tr.grad("blocks.0.hook_mlp_out")


def test_head_site_is_the_output_projection_input(tiny):
    """blocks.i.attn.hook_z: its heads, through the output projection, give hook_attn_out."""
    from workbench.core.sites import head_shape

    with wb.trace(tiny, ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"]) as tr:
        _forward(tiny)
    z, out = tr["blocks.1.attn.hook_z"], tr["blocks.1.hook_attn_out"]
    n_heads, d_head = head_shape(tiny.hf.config)
    assert z.shape[-1] == n_heads * d_head
    proj = tiny.module(tiny.arch.attn_path(1) + "." + next(
        c for c in ("o_proj", "c_proj", "dense") if hasattr(tiny.module(tiny.arch.attn_path(1)), c)))
    with torch.no_grad():
        torch.testing.assert_close(proj(z), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(SiteError, match="out of range"):
        wb.trace(tiny, ["blocks.99.attn.hook_z"])


@pytest.mark.parametrize("positions", [-1, [0, -1], slice(-2, None), "per-row"])
def test_position_captures_hold_only_their_positions(tiny, positions):
    """A capture of some positions owns memory of its own size: a view would keep every position of the activation
    (all layers x all tokens) alive, which is what capturing everything costs."""
    if positions == "per-row":
        positions = torch.arange(len(PROMPTS)) % 2
    sites = [f"blocks.{i}.hook_resid_post" for i in range(tiny.n_layers)]
    with wb.trace(tiny, sites, positions=positions) as tr:
        _forward(tiny)
    for site in sites:
        t = tr[site]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), site
    with wb.trace(tiny, sites, positions=positions, grads=True) as tr, torch.enable_grad():
        tiny.hf(**tiny.encode(PROMPTS)).logits.sum().backward()
    tiny.hf.zero_grad(set_to_none=True)
    for site in sites:
        g = tr.grad(site)
        assert g.untyped_storage().nbytes() == g.numel() * g.element_size(), site
