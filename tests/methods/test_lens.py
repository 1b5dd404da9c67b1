"""Logit lens: the last layer is the model's own output; ranks and probabilities are what they claim."""

import numpy as np
import pandas as pd
import pytest
import torch

import workbench as wb
from tests.conftest import PROMPTS
from workbench.methods.lens import LENS_COLUMNS


def test_last_layer_lens_equals_model_logits(tiny):
    df = wb.logit_lens(tiny, PROMPTS, layers=[tiny.n_layers], top_k=10)
    with torch.no_grad():
        logits = tiny.hf(**tiny.encode(PROMPTS)).logits[:, -1].float()
    probs = logits.softmax(-1)
    top = logits.topk(10, dim=-1)
    for b in range(len(PROMPTS)):
        rows = df[(df.prompt_idx == b) & (df.kind == "top")].sort_values("k")
        assert rows.token_id.tolist() == top.indices[b].tolist()
        torch.testing.assert_close(torch.tensor(rows.logit.values, dtype=torch.float32), top.values[b], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            torch.tensor(rows.prob.values, dtype=torch.float32), probs[b, top.indices[b]], rtol=1e-6, atol=1e-7
        )


def test_lens_equals_manual_norm_and_head_at_every_layer(tiny):
    """Independent computation from HF hidden_states: norm once (hidden_states[L] is already normed)."""
    with torch.no_grad():
        out = tiny.hf(**tiny.encode(PROMPTS), output_hidden_states=True)
    hs = out.hidden_states
    targets = [" ", "a"]
    df = wb.logit_lens(tiny, PROMPTS, top_k=1, targets=targets)
    tid = [tiny.tokenizer.encode(t, add_special_tokens=False)[0] for t in targets]
    for layer in range(tiny.n_layers + 1):
        h = hs[layer][:, -1]
        with torch.no_grad():
            normed = h if layer == tiny.n_layers else tiny.final_norm(h)
            logits = tiny.unembed(normed).float()
        if layer == tiny.n_layers:
            # same ops as HF's head; matmul on [B, d] vs [B, T, d] may differ in the last bit
            torch.testing.assert_close(logits, out.logits[:, -1].float(), rtol=1e-6, atol=1e-6)
        for b in range(len(PROMPTS)):
            sub = df[(df.prompt_idx == b) & (df.layer == layer)]
            top = sub[sub.kind == "top"].iloc[0]
            assert top.token_id == int(logits[b].argmax())
            assert top["rank"] == 1
            for t in tid:
                row = sub[(sub.kind == "target") & (sub.token_id == t)].iloc[0]
                expected_rank = 1 + int((logits[b] > logits[b, t]).sum())
                assert row["rank"] == expected_rank
                assert row.prob == pytest.approx(float(logits[b].softmax(-1)[t]), rel=1e-5, abs=1e-9)


def test_chunking_and_batching_do_not_change_results(tiny):
    """max_memory=1 byte projects one (layer, row) pair at a time; the default does all at once."""
    a = wb.logit_lens(tiny, PROMPTS, top_k=3, batch_size=1, max_memory=1, positions="all", targets=["a", " "])
    b = wb.logit_lens(tiny, PROMPTS, top_k=3, batch_size=8, positions="all", targets=["a", " "])
    cols = ["prompt_idx", "layer", "position", "kind", "k", "token_id", "rank"]
    assert a[cols].equals(b[cols])
    assert (a.prob - b.prob).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("positions", [-1, [0, -1], "all"])
def test_vectorised_frame_equals_row_by_row_reference(family, positions):
    """The tensor-first lens and its vectorised to_frame against the original loop over rows (kept in
    tests/methods/_lens_reference.py): same rows in the same order, same ids and ranks, probabilities to 1e-6."""
    from tests.methods._lens_reference import reference_logit_lens
    from workbench.testing.tiny import tiny_model

    m = tiny_model(family)
    prompts = ["abc", "hello there", "x"] if positions != [0, -1] else ["abc", "hello there"]
    targets = [["a"], ["b", " "], ["c"]][: len(prompts)]
    layers = list(range(m.n_layers + 1))
    ref = reference_logit_lens(m, prompts, layers=layers, positions=positions, top_k=4, targets=targets, batch_size=2)
    res = wb.read_lens(m, prompts, positions=positions, top_k=4, targets=targets, batch_size=2, max_memory=20_000)
    new = res.to_frame()
    assert list(new.columns) == list(ref.columns)
    assert len(new) == len(ref)
    exact = ["prompt_idx", "layer", "position", "input_token", "kind", "k", "token_id", "token", "rank"]
    pd.testing.assert_frame_equal(new[exact], ref[exact])
    np.testing.assert_allclose(new.prob, ref.prob, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.logit, ref.logit, rtol=1e-6, atol=1e-6)
    assert new.dtypes.equals(ref.dtypes)
    # the tensors are the frame's source: shapes and padding of per-prompt target lists
    assert res.top_ids.shape == (len(layers), len(res), 4)
    assert res.target_ids.shape == (len(res), 2) and (res.target_ids[res.prompt_idx != 1, 1] == -1).all()
    assert res.target_probs[:, res.prompt_idx != 1, 1].isnan().all()


def test_top_k_ranks_count_ties_like_the_full_vocabulary():
    """Ranks of top-k entries come from comparisons inside the top-k; with tied logits they must equal the count over
    the whole vocabulary (1 + strictly higher), which a zeroed head makes all ties."""
    from workbench.testing.tiny import tiny_model

    m = tiny_model("llama")
    with torch.no_grad():
        m.W_U[: m.arch.vocab_size // 2] = 0.0
        m.W_U[5] = m.W_U[7] = m.W_U[9]  # three tokens share every logit
    res = wb.read_lens(m, ["abc"], top_k=6, targets=[0, 5], positions="all")
    with torch.no_grad():
        out = m.hf(**m.encode(["abc"]), output_hidden_states=True)
    for li, layer in enumerate(res.layers):
        logits = m.lens_logits(out.hidden_states[layer][0]) if layer < m.n_layers else out.logits[0]
        logits = logits.float()
        for n in range(len(res)):
            row = logits[int(res.position[n])]
            for r in range(6):
                t = int(res.top_ids[li, n, r])
                assert int(res.top_ranks[li, n, r]) == 1 + int((row > row[t]).sum())
            for c, t in enumerate([0, 5]):
                assert int(res.target_ranks[li, n, c]) == 1 + int((row > row[t]).sum())


def test_max_memory_is_checked():
    from workbench.testing.tiny import tiny_model

    with pytest.raises(ValueError, match="max_memory"):
        wb.read_lens(tiny_model("llama"), ["abc"], max_memory=0)


def test_tidy_frame_shape_and_positions():
    from workbench.testing.tiny import tiny_model

    m = tiny_model("llama")
    df = wb.logit_lens(m, ["abc", "hello"], layers=[0, 2], positions=[0, -1], top_k=2)
    assert list(df.columns) == LENS_COLUMNS
    assert len(df) == 2 * 2 * 2 * 2  # prompts x layers x positions x top_k
    assert sorted(df[df.prompt_idx == 0].position.unique()) == [0, 3]  # "<bos>abc": 4 tokens
    full = wb.logit_lens(m, ["abc", "hello"], layers=[1], positions="all", top_k=1)
    assert full.groupby("prompt_idx").position.nunique().tolist() == [4, 6]
    assert full[full.prompt_idx == 1].input_token.tolist()[1:] == list("hello")


def test_per_prompt_targets():
    from workbench.testing.tiny import tiny_model

    m = tiny_model("qwen2")
    df = wb.logit_lens(m, ["ab", "cd"], layers=[1], top_k=0, targets=[["x"], ["y", "z"]])
    assert df.groupby("prompt_idx").token.apply(list).tolist() == [["x"], ["y", "z"]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[]), "empty"),
        (dict(layers=[99]), "out of range"),
        (dict(targets=["ab"]), "one token"),
        (dict(positions=[50]), "outside"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=0), "nothing to report"),
        (dict(positions="middle"), "positions"),
    ],
)
def test_bad_input(kwargs, match):
    from workbench.testing.tiny import tiny_model

    m = tiny_model("llama")
    args = dict(prompts=["abc"]) | kwargs
    with pytest.raises(ValueError, match=match):
        wb.logit_lens(m, **args)


@pytest.mark.integration
def test_real_model_lens(smollm2):
    m = smollm2
    prompts = ["The capital of France is", "One, two, three, four,"]
    df = wb.logit_lens(m, prompts, targets=[[" Paris"], [" five"]], top_k=3)
    with torch.no_grad():
        logits = m.hf(**m.encode(prompts)).logits[:, -1].float()
    last = df[(df.layer == m.n_layers) & (df.kind == "top") & (df.k == 1)]
    assert last.token_id.tolist() == logits.argmax(-1).tolist()
    target_last = df[(df.layer == m.n_layers) & (df.kind == "target")]
    assert target_last["rank"].tolist() == [1, 1]  # the model answers Paris and five
    early = df[(df.layer == 1) & (df.kind == "target")]
    assert (early["rank"] > 1).all()  # ...which layer 1 cannot read out yet
