"""The activation engine (workbench.methods.activations) against independent computations on tiny random models of
several families, text and VLM, with left-padded batches: Hugging Face's own ``output_hidden_states``, forward hooks
placed on the decoder layers by hand (no ``trace``), and ``generate``. Where the arithmetic is the same (the same
batch through the same forward) the engine must be bit-identical; a step on a prefix cache is a different
computation of the same numbers and is held to float tolerance."""

import random

import numpy as np
import pytest
import torch

from workbench.methods.activations import PrefixCache, features, greedy, last_token, text_batches
from workbench.testing.tiny import tiny_model, tiny_vlm

PROMPTS = ["the cat sat on the mat", "a dog", "one bird flew over the park at noon", "my fish swam",
           "a b c d e f g h i j k l m n o p q r s t u v w x y z Count: "]  # past the tiny sliding windows (gemma2)
FAMILIES = ["llama", "gemma2", "qwen2"]


def _decoder(m, i):
    return m.module(m.arch.layer_path(i))


def _hf_hidden(m, enc, **kw):
    """Hidden states of every layer 0..L (layer L before the final norm: from a hand-placed hook on the last decoder
    layer) and the last-position logits, from one plain forward."""
    grabbed = {}

    def hook(mod, args, out):
        grabbed["last"] = (out[0] if isinstance(out, tuple) else out).detach()

    h = _decoder(m, m.n_layers - 1).register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = m.hf(**enc, output_hidden_states=True, **kw)
    finally:
        h.remove()
    hs = list(out.hidden_states[: m.n_layers]) + [grabbed["last"]]
    return hs, out.logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_and_features_equal_hf_hidden_states_bit_for_bit(family):
    m = tiny_model(family)
    enc = m.encode(PROMPTS)  # one left-padded batch: the engine runs the same batch with by_length=False
    assert (enc["attention_mask"] == 0).any()
    hs, _ = _hf_hidden(m, enc)
    got = last_token(m, PROMPTS, batch_size=len(PROMPTS), by_length=False)
    assert sorted(got) == list(range(m.n_layers + 1))
    for layer, h in enumerate(hs):
        assert torch.equal(got[layer], h[:, -1].float())
    # any site, keyed by its name (the SAE study's reads)
    site = "blocks.1.hook_resid_post"
    assert torch.equal(last_token(m, PROMPTS, sites=[site], batch_size=len(PROMPTS), by_length=False)[site],
                       hs[2][:, -1].float())
    # mean over listed positions of the unpadded prompt, and a fixed position
    mentions = [[0, 2], [1], [3, 4, 5], [0], [-1, -2]]
    feats = features(m, PROMPTS, [1, 2], {"mentions": mentions, "first": 0, "last": "last"},
                     batch_size=len(PROMPTS), by_length=False)
    lengths = enc["attention_mask"].sum(-1)
    T = enc["input_ids"].shape[1]
    for layer in (1, 2):
        for i, plist in enumerate(mentions):
            L = int(lengths[i])
            cols = [T - L + (q % L) for q in plist]
            want = hs[layer][i, cols].mean(0).float()
            torch.testing.assert_close(feats["mentions"][layer][i], want, rtol=1e-6, atol=1e-6)
        assert torch.equal(feats["first"][layer], hs[layer][torch.arange(len(PROMPTS)), T - lengths].float())
        assert torch.equal(feats["last"][layer], hs[layer][:, -1].float())


@pytest.mark.parametrize("family", FAMILIES)
def test_length_batching_keeps_input_order_and_values(family):
    m = tiny_model(family)
    one = last_token(m, PROMPTS, batch_size=len(PROMPTS), by_length=False)
    batched = last_token(m, PROMPTS, batch_size=2)  # by length: other batches, other padding
    order = np.concatenate([idx for idx, _ in text_batches(m, PROMPTS, 2)])
    assert sorted(order.tolist()) == list(range(len(PROMPTS))) and order.tolist() != list(range(len(PROMPTS)))
    for layer in one:
        torch.testing.assert_close(batched[layer], one[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_reads_steps_and_generation_equal_plain_forwards(family):
    m = tiny_model(family)
    cache = PrefixCache.build(m, PROMPTS, batch_size=len(PROMPTS), by_length=False)
    enc = m.encode(PROMPTS)
    hs, logits = _hf_hidden(m, enc, logits_to_keep=1)
    last = cache.last_token()
    for layer, h in enumerate(hs):
        assert torch.equal(last[layer], h[:, -1].float())
    assert torch.equal(cache.logits(), logits.float())
    b = cache.batches[0]
    # an unedited step on the prefix cache is the last token of a whole forward (another computation: tolerance)
    step = cache.step(b, sites=["blocks.0.hook_resid_post"])
    torch.testing.assert_close(step.logits.float(), logits.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step.captures["blocks.0.hook_resid_post"].float(), hs[1][:, -1].float(),
                               rtol=1e-4, atol=1e-5)
    # an edit at the last position: the whole forward patched by a hand-placed hook on decoder layer 1
    v = torch.randn(m.d_model)

    def edit(t):
        out = t.clone()
        out[:, -1] = out[:, -1] + v.to(t.dtype)
        return out

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = edit(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = _decoder(m, 1).register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = m.hf(**enc).logits[:, -1]
            ref_gen = m.hf.generate(**{k: enc[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=4,
                                    do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    finally:
        handle.remove()
    edited = cache.step(b, edits={"blocks.1.hook_resid_post": edit}, generate=4)
    torch.testing.assert_close(edited.logits.float(), ref.float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edited.logits.float(), logits.float())
    # greedy generation under the edit (every step edited) and without it, against HF generate
    n_new = edited.tokens.shape[1]
    assert torch.equal(edited.tokens, ref_gen[:, enc["input_ids"].shape[1]:][:, :n_new].cpu())
    with torch.no_grad():
        plain = m.hf.generate(**{k: enc[k] for k in ("input_ids", "attention_mask")}, max_new_tokens=4,
                              do_sample=False, pad_token_id=m.tokenizer.pad_token_id)
    tokens = cache.generate(b, 4)
    assert torch.equal(tokens, plain[:, enc["input_ids"].shape[1]:][:, :tokens.shape[1]].cpu())
    # the cache is not consumed: a second step gives the same numbers
    assert torch.equal(cache.step(b).logits, step.logits)


def test_prefix_cache_extra_positions_and_checks():
    m = tiny_model("llama")
    mentions = [[1, 3], [0], [2, 4, 5], [1], [0, 1]]
    cache = PrefixCache.build(m, PROMPTS, batch_size=2, positions={"mentions": mentions})
    ref = features(m, PROMPTS, None, {"last": "last", "mentions": mentions}, batch_size=2)
    for layer in range(m.n_layers + 1):
        assert torch.equal(cache.last_token()[layer], ref["last"][layer])  # same batches, same arithmetic
        assert torch.equal(cache.features["mentions"][layer], ref["mentions"][layer])
    with pytest.raises(ValueError, match="reserved"):
        PrefixCache.build(m, PROMPTS, positions={"last": "last"})
    with pytest.raises(ValueError, match="not cached"):
        PrefixCache.build(m, PROMPTS, layers=[1]).last_token([2])
    with pytest.raises(ValueError, match="exactly once"):
        last_token(m, batches=[(np.array([0, 0]), m.encode(PROMPTS[:2]))])
    with pytest.raises(ValueError, match="either prompts or encoded batches"):
        last_token(m)
    with pytest.raises(ValueError, match="outside"):
        features(m, PROMPTS, [1], {"x": [[40]] * len(PROMPTS)})
    with pytest.raises(ValueError, match="n_tokens"):
        greedy(m, torch.zeros(1, 3), None, m.encode(PROMPTS[:1]), 0)


def test_vlm_batches_equal_hf_hidden_states_and_step_on_the_cache():
    from PIL import Image

    from workbench.data.vqa import VQAItem
    from workbench.methods.answering import vqa_batches, vqa_inputs

    vlm = tiny_vlm("llava", seed=0, processor=True)
    rng = random.Random(0)
    items = [VQAItem(Image.new("RGB", (32, 32), tuple(rng.randint(0, 255) for _ in range(3))), q, "red", "colour")
             for q in ["what color is the circle?", "colour?", "which colour is the big shape here?"]]
    enc = vqa_inputs(vlm, [it.image for it in items], [it.question for it in items])
    assert (enc["attention_mask"] == 0).any()
    hs, logits = _hf_hidden(vlm, enc, logits_to_keep=1)
    got = last_token(vlm, layers=None, batches=vqa_batches(vlm, items, batch_size=len(items)))
    for layer, h in enumerate(hs):
        assert torch.equal(got[layer], h[:, -1].float())
    # in batches of 2 (other padding): equal to tolerance, rows in item order
    two = last_token(vlm, layers=[1, vlm.n_layers], batches=vqa_batches(vlm, items, batch_size=2))
    for layer in (1, vlm.n_layers):
        torch.testing.assert_close(two[layer], hs[layer][:, -1].float(), rtol=1e-5, atol=1e-5)
    cache = PrefixCache.build(vlm, batches=vqa_batches(vlm, items, batch_size=len(items)))
    assert torch.equal(cache.logits(), logits.float())
    torch.testing.assert_close(cache.step(cache.batches[0]).logits.float(), logits.float(), rtol=1e-4, atol=1e-4)
