"""Vision-language models in the core: the arch map, VLM sites, trace/lens equivalence with HF, multimodal inputs.

Every family of SUPPORTED_VLM_FAMILIES runs as a tiny random model (3 decoder layers and 3 vision layers: the two
lists have the same length on purpose), offline, with processor-free inputs from workbench.testing.tiny; the processor
paths run where this environment can build the family's processor.
"""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.core.arch import SUPPORTED_VLM_FAMILIES, ArchitectureError, resolve_arch
from workbench.core.sites import SiteError, site_names
from workbench.core.vlm import check_image, check_multimodal, encode_multimodal, image_placeholder, image_token_mask
from workbench.testing.tiny import IMAGE, image_tokens_per_image, tiny_model, tiny_vlm, tiny_vlm_inputs

VLM_FAMILIES = sorted(SUPPORTED_VLM_FAMILIES)
_CACHE: dict[str, wb.Model] = {}


def _vlm(family: str) -> wb.Model:
    if family not in _CACHE:
        _CACHE[family] = tiny_vlm(family)
    return _CACHE[family]


@pytest.fixture(params=VLM_FAMILIES)
def vlm(request):
    return _vlm(request.param)


@pytest.fixture(params=VLM_FAMILIES)
def vlm_with_processor(request):
    m = _vlm(request.param)
    if m.processor is None:
        pytest.fail(f"transformers' {request.param} processor cannot be built here (a missing package? num2words, "
                    "which SmolVLM's processor needs, is in the vlm extra)")
    return m


def _forward(m, inputs, **kw):
    with torch.no_grad():
        return m.hf(**inputs, **kw)


def _image(seed=0, size=(24, 20)):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# -- the arch map ------------------------------------------------------------------------------------------------
def test_arch_map_of_every_vlm(vlm):
    a, hf = vlm.arch, vlm.hf
    assert a.is_vlm and a.family in SUPPORTED_VLM_FAMILIES
    assert a.n_layers == 3 and a.n_vision_layers == 3 and a.d_model == 64 and a.image_token_id == IMAGE
    lm = hf.get_decoder()
    lm_path = next(name for name, mod in hf.named_modules() if mod is lm)
    assert a.layers == f"{lm_path}.layers" and a.final_norm == f"{lm_path}.norm"
    assert vlm.module(a.layers) is lm.layers and vlm.final_norm is lm.norm
    assert vlm.module(a.embed) is hf.get_input_embeddings() and vlm.module(a.unembed) is hf.get_output_embeddings()
    assert vlm.module(a.vision) is hf.get_encoder(modality="image")
    assert a.vision_layers.startswith(a.vision + ".") and len(vlm.module(a.vision_layers)) == 3
    assert not a.layers.startswith(a.vision) and not a.vision_layers.startswith(lm_path)
    assert a.projector.split(".")[-1] in ("multi_modal_projector", "connector", "merger")
    # Gemma 3's tiny text config names a final soft-cap, which Gemma3ForConditionalGeneration never applies.
    assert a.logit_softcap is None
    if a.family == "gemma3":
        assert hf.config.text_config.final_logit_softcapping == 5.0


def test_text_models_are_not_vlms():
    a = tiny_model("llama").arch
    assert not a.is_vlm
    assert (a.vision, a.vision_layers, a.n_vision_layers, a.projector, a.image_token_id) == (None,) * 5
    assert not any(s.startswith(("vision.", "projector.")) for s in site_names(a))


def test_unmapped_vlm_family_raises_with_the_supported_list():
    from transformers import AutoModelForImageTextToText, PaliGemmaConfig

    cfg = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=4, projection_dim=64),
        text_config=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300),
        image_token_index=259,
    )
    hf = AutoModelForImageTextToText.from_config(cfg)
    with pytest.raises(ArchitectureError, match="'paligemma'.*not supported") as info:
        resolve_arch(hf)
    for family in VLM_FAMILIES + ["llama"]:
        assert repr(family) in str(info.value)


def test_llava_with_a_dinov2_tower():
    """The testbed's layout: LLaVA on a DINOv2 tower (its layers are `encoder.layer`), last layer fed on."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=4, image_size=16).to_dict() | {"model_type": "dinov2"},
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=264, tie_word_embeddings=True).to_dict(),
        image_token_id=IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    a = resolve_arch(hf)
    assert a.vision == "model.vision_tower" and a.vision_layers == "model.vision_tower.encoder.layer"
    assert a.n_vision_layers == 2 and a.n_layers == 2 and a.tied
    ids = torch.tensor([[1, 2] + [IMAGE] * 16 + [3, 4]])
    sites = ["vision.blocks.1.hook_resid_post", "projector.hook_out", "blocks.0.hook_resid_pre"]
    with wb.trace(hf, sites) as tr, torch.no_grad():
        hf(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16))
    assert tr["vision.blocks.1.hook_resid_post"].shape == (1, 17, 32)  # CLS + 16 patches
    assert torch.equal(tr["blocks.0.hook_resid_pre"][ids == IMAGE], tr["projector.hook_out"].reshape(-1, 64))


# -- sites -------------------------------------------------------------------------------------------------------
def test_site_names_of_a_vlm(vlm):
    names = site_names(vlm.arch)
    vision = ["vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post", "vision.blocks.2.hook_resid_post",
              "vision.hook_out", "projector.hook_out"]
    assert names[1:6] == vision  # after hook_embed, before the decoder: forward order
    assert "blocks.2.hook_resid_post" in names and names[-1] == "ln_final.hook_normalized"
    with wb.trace(vlm, names):  # every name resolves
        pass


@pytest.mark.parametrize(
    "site, match",
    [
        ("vision.blocks.3.hook_resid_post", "vision layer 3 .* out of range: the vision tower has 3 layers"),
        ("vision.blocks.-1.hook_resid_post", "out of range"),
        ("vision.blocks.0.hook_mlp_out", "unknown hook 'hook_mlp_out'.*vision block hooks are"),
        ("vision.hook_in", "unknown site 'vision.hook_in'.*vision.blocks"),
        ("projector.hook_in", "unknown site"),
    ],
)
def test_bad_vision_sites_raise_before_hooking(site, match):
    m = _vlm("llava")
    with pytest.raises(SiteError, match=match):
        wb.trace(m, ["blocks.0.hook_resid_post", site])
    assert wb.active_hooks() == []


@pytest.mark.parametrize("site", ["vision.hook_out", "projector.hook_out", "vision.blocks.0.hook_resid_post"])
def test_vision_sites_on_a_text_model_raise(site):
    with pytest.raises(SiteError, match="needs a vision-language model.*text-only") as info:
        wb.trace(tiny_model("llama"), [site])
    assert "valid sites" in str(info.value)


# -- trace equivalence -------------------------------------------------------------------------------------------
def test_residuals_equal_output_hidden_states(vlm):
    L = vlm.n_layers
    sites = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(L)]
    sites.append("ln_final.hook_normalized")
    inputs = tiny_vlm_inputs(vlm)
    with wb.trace(vlm, sites) as tr:
        out = _forward(vlm, inputs, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == L + 1
    torch.testing.assert_close(tr["blocks.0.hook_resid_pre"], hs[0], rtol=0, atol=1e-6)
    for i in range(L - 1):
        torch.testing.assert_close(tr[f"blocks.{i}.hook_resid_post"], hs[i + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(tr["ln_final.hook_normalized"], hs[L], rtol=0, atol=1e-6)
    torch.testing.assert_close(vlm.final_norm(tr[f"blocks.{L - 1}.hook_resid_post"]), hs[L], rtol=0, atol=1e-6)


def test_last_layer_lens_equals_logits(vlm):
    inputs = tiny_vlm_inputs(vlm)
    site = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    with wb.trace(vlm, [site]) as tr:
        logits = _forward(vlm, inputs).logits
    with torch.no_grad():
        lens = vlm.lens_logits(tr[site])
    torch.testing.assert_close(lens, logits, rtol=1e-6, atol=1e-6)


def test_vision_sites_capture_the_towers_tensors(vlm):
    a = vlm.arch
    inputs = tiny_vlm_inputs(vlm)
    sites = [f"vision.blocks.{i}.hook_resid_post" for i in range(a.n_vision_layers)]
    sites += ["vision.hook_out", "projector.hook_out", "blocks.0.hook_resid_pre"]
    with wb.trace(vlm, sites, positions=-1) as tr:  # positions never apply to vision sites
        _forward(vlm, inputs)
    B, n_img = inputs["input_ids"].shape[0], image_tokens_per_image(vlm.hf.config)
    block = tr["vision.blocks.0.hook_resid_post"]
    if a.family.startswith("qwen"):  # flattened patches of every image
        assert block.shape == (int(inputs["image_grid_thw"].prod(-1).sum()), 32)
    else:
        assert block.ndim == 3 and block.shape[0] == B and block.shape[-1] == 32
    assert tr["vision.hook_out"].shape == block.shape
    assert tr["projector.hook_out"].numel() == B * n_img * a.d_model
    # The projector's output is exactly what fills the image-token positions of the residual stream.
    img = image_token_mask(vlm, inputs["input_ids"])
    assert tr["blocks.0.hook_resid_pre"].shape == (B, a.d_model)  # positions=-1 did apply here
    with wb.trace(vlm, ["projector.hook_out", "blocks.0.hook_resid_pre"]) as full:
        _forward(vlm, inputs)
    assert torch.equal(full["blocks.0.hook_resid_pre"][img], full["projector.hook_out"].reshape(-1, a.d_model))


def test_editing_the_projector_output_writes_the_image_positions(vlm):
    inputs = tiny_vlm_inputs(vlm)
    img = image_token_mask(vlm, inputs["input_ids"])
    with wb.trace(vlm, ["blocks.0.hook_resid_pre"], edits={"projector.hook_out": torch.zeros_like}) as tr:
        _forward(vlm, inputs)
    h = tr["blocks.0.hook_resid_pre"]
    assert (h[img] == 0).all() and (h[~img & inputs["attention_mask"].bool()] != 0).any(-1).all()


def test_identity_edits_at_image_positions_are_bit_identical(vlm):
    inputs = tiny_vlm_inputs(vlm)
    img = image_token_mask(vlm, inputs["input_ids"])
    clean = _forward(vlm, inputs).logits

    def at_images(t):
        out = t.clone()
        out[img] = t[img].clone()
        return out

    edits = {f"blocks.{i}.hook_resid_post": at_images for i in range(vlm.n_layers)}
    edits |= {s: (lambda t: t.clone()) for s in site_names(vlm.arch) if s.startswith(("vision.", "projector."))}
    with wb.trace(vlm, edits=edits):
        edited = _forward(vlm, inputs).logits
    assert torch.equal(clean, edited)


def test_hooks_removed_when_a_vlm_forward_raises(vlm):
    def boom(t):
        raise RuntimeError("boom")

    def hooks():  # transformers keeps output-recording hooks of its own on some modules: those must stay
        return {(name, *m._forward_hooks, *m._forward_pre_hooks) for name, m in vlm.hf.named_modules()}

    _forward(vlm, tiny_vlm_inputs(vlm))  # transformers installs its hooks on a first forward
    before = hooks()
    sites = ["blocks.0.hook_resid_post", "vision.hook_out"]
    with pytest.raises(RuntimeError, match="boom"):
        with wb.trace(vlm, sites, edits={"vision.blocks.1.hook_resid_post": boom}):
            assert len(wb.active_hooks()) == 3
            _forward(vlm, tiny_vlm_inputs(vlm))
    assert wb.active_hooks() == []
    assert hooks() == before


def test_left_padding_does_not_change_results(vlm):
    inputs = tiny_vlm_inputs(vlm, batch=3)
    batched = _forward(vlm, inputs).logits[:, -1]
    for b in range(3):  # each row alone, unpadded
        real = inputs["attention_mask"][b].bool()
        one = {k: inputs[k][b : b + 1, real] for k in inputs if k in ("input_ids", "attention_mask", "position_ids",
                                                                    "token_type_ids", "mm_token_type_ids")}
        if vlm.arch.family.startswith("qwen"):
            per = int(inputs["image_grid_thw"][b].prod())
            one["pixel_values"] = inputs["pixel_values"][b * per : (b + 1) * per]
            one["image_grid_thw"] = inputs["image_grid_thw"][b : b + 1]
        else:
            one["pixel_values"] = inputs["pixel_values"][b : b + 1]
            if "pixel_attention_mask" in inputs:
                one["pixel_attention_mask"] = inputs["pixel_attention_mask"][b : b + 1]
        torch.testing.assert_close(batched[b : b + 1], _forward(vlm, one).logits[:, -1], rtol=1e-5, atol=1e-5)


# -- image_token_mask / check_image ------------------------------------------------------------------------------
def test_image_token_mask(vlm):
    ids = tiny_vlm_inputs(vlm)["input_ids"]
    mask = image_token_mask(vlm, ids)
    assert mask.dtype == torch.bool and torch.equal(mask, ids == IMAGE)
    assert mask.sum() == ids.shape[0] * image_tokens_per_image(vlm.hf.config)


def test_image_token_mask_of_a_text_model_raises():
    with pytest.raises(ValueError, match="needs a vision-language model; tiny-llama is a text-only llama model"):
        image_token_mask(tiny_model("llama"), torch.tensor([[1, 2]]))


def test_check_image_converts_to_rgb():
    from PIL import Image

    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = check_image(rgba)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    for mode in ("L", "P", "CMYK", "RGB"):
        assert check_image(Image.new(mode, (16, 30))).mode == "RGB"
    arr = np.zeros((18, 17, 3), dtype=np.uint8)
    arr[..., 1] = 200
    assert check_image(arr).size == (17, 18) and check_image(arr).getpixel((0, 0)) == (0, 200, 0)
    t = torch.zeros(3, 16, 24)
    t[0] = 1.0
    assert check_image(t).size == (24, 16) and check_image(t).getpixel((3, 3)) == (255, 0, 0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: __import__("PIL.Image").Image.new("I;16", (20, 20)), "mode 'I;16' is not supported.*RGB"),
        (lambda: __import__("PIL.Image").Image.new("LA", (20, 20)), "mode 'LA'"),
        (lambda: __import__("PIL.Image").Image.new("RGB", (40, 10)), "40x10 pixels.*at least 16 px"),
        (lambda: np.zeros((20, 20, 3), dtype=np.float32), "HxWx3 uint8.*float32"),
        (lambda: np.zeros((20, 20), dtype=np.uint8), r"shape \(20, 20\)"),
        (lambda: torch.full((3, 20, 20), 255.0), r"\[0, 1\].*max 255"),
        (lambda: torch.zeros(1, 3, 20, 20), r"3xHxW float tensor.*\(1, 3, 20, 20\)"),
        (lambda: torch.zeros(3, 20, 20, dtype=torch.uint8), "float tensor"),
        (lambda: "cat.png", "unsupported image type str"),
    ],
)
def test_check_image_rejects(make, match):
    with pytest.raises(ValueError, match=match):
        check_image(make())


# -- encode_multimodal -------------------------------------------------------------------------------------------
def test_encode_multimodal_batch(vlm_with_processor):
    m = vlm_with_processor
    ph = image_placeholder(m)
    prompts = [f"{ph} what is this?", f"hi {ph}"]
    batch = encode_multimodal(m, [_image(0), _image(1, (30, 16))], prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and "pixel_values" in batch
    assert (mask[:, 1:] >= mask[:, :-1]).all() and mask[1, 0] == 0  # left padding
    assert (image_token_mask(m, ids).sum(-1) > 0).all()
    if m.arch.family.startswith("qwen"):
        assert "position_ids" not in batch and {"image_grid_thw", "mm_token_type_ids"} <= set(batch)
    else:
        assert torch.equal(batch["position_ids"][mask.bool()], torch.cat([torch.arange(int(n)) for n in mask.sum(-1)]))
    if m.arch.family == "gemma3":
        assert torch.equal(batch["token_type_ids"].bool(), image_token_mask(m, ids))
    if m.arch.family in ("idefics3", "smolvlm"):
        assert batch["pixel_values"].ndim == 5 and "pixel_attention_mask" in batch
    logits = _forward(m, batch).logits[:, -1]
    for b in range(2):  # padding changes no result
        alone = _forward(m, encode_multimodal(m, [[_image(0), _image(1, (30, 16))][b]], [prompts[b]])).logits[:, -1]
        torch.testing.assert_close(logits[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_encode_multimodal_two_images_in_one_prompt(vlm_with_processor):
    m = vlm_with_processor
    ph = image_placeholder(m)
    batch = encode_multimodal(m, [[_image(0), _image(1)], _image(2)], [f"{ph} and {ph}?", f"{ph}!"])
    n = image_token_mask(m, batch["input_ids"]).sum(-1)
    assert n[0] == 2 * n[1]
    _forward(m, batch)


def test_encode_multimodal_errors(vlm_with_processor):
    m = vlm_with_processor
    ph = image_placeholder(m)
    with pytest.raises(ValueError, match="question without an image for a VLM: prompt 1"):
        encode_multimodal(m, [_image(), None], [f"{ph} a", "b"])
    with pytest.raises(ValueError, match="question without an image"):
        encode_multimodal(m, None, ["what is in the picture?"])
    with pytest.raises(ValueError, match="2 image placeholder.*for 1 image"):
        encode_multimodal(m, [_image()], [f"{ph}{ph} a"])
    with pytest.raises(ValueError, match="0 image placeholder"):
        encode_multimodal(m, [_image()], ["no placeholder"])
    with pytest.raises(ValueError, match="2 image entries for 1 prompts"):
        encode_multimodal(m, [_image(), _image()], [f"{ph} a"])
    with pytest.raises(ValueError, match="8x8 pixels"):
        encode_multimodal(m, [_image(size=(8, 8))], [f"{ph} a"])


def test_encode_multimodal_on_a_text_model():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="image given to text-only model tiny-llama"):
        encode_multimodal(m, [_image()], ["<image> a"])
    batch = encode_multimodal(m, None, ["abc", "de"])
    assert all(torch.equal(batch[k], m.encode(["abc", "de"])[k]) for k in batch)


def test_a_vlm_without_processor_says_how_to_get_one():
    m = tiny_vlm("llava", processor=False)
    with pytest.raises(ValueError, match="has no processor"):
        encode_multimodal(m, [_image()], ["<image> a"])
    with pytest.raises(ValueError, match="processor was given for the text-only"):
        wb.from_hf(tiny_model("llama").hf, _vlm("llava").tokenizer, processor=_vlm("llava").processor)


def test_smolvlm_processor_needs_num2words():
    from importlib.util import find_spec

    from workbench.testing.tiny import tiny_vlm_processor

    if find_spec("num2words") is not None:
        assert tiny_vlm_processor("smolvlm") is not None
    else:
        with pytest.raises(ImportError, match="num2words"):
            tiny_vlm_processor("smolvlm")


# -- logit lens --------------------------------------------------------------------------------------------------
def test_lens_on_prepared_inputs_at_image_positions(vlm):
    inputs = tiny_vlm_inputs(vlm)
    L, n_img, B = vlm.n_layers, image_tokens_per_image(vlm.hf.config), inputs["input_ids"].shape[0]
    df = wb.logit_lens(vlm, inputs=inputs, layers=[0, L], positions="image", top_k=2)
    assert len(df) == B * 2 * n_img * 2
    assert set(df.input_token) == {vlm.tokenizer.convert_ids_to_tokens(IMAGE)}
    logits = _forward(vlm, inputs).logits
    img = image_token_mask(vlm, inputs["input_ids"])
    pad = (1 - inputs["attention_mask"]).sum(-1)
    last = df[(df.layer == L) & (df.k == 1)]
    for b in range(B):
        rows = last[last.prompt_idx == b]
        expected = logits[b][img[b]].argmax(-1)
        assert rows.token_id.tolist() == expected.tolist()
        assert rows.position.tolist() == (img[b].nonzero().flatten() - pad[b]).tolist()
        torch.testing.assert_close(
            torch.tensor(rows.logit.values, dtype=torch.float32), logits[b][img[b]].max(-1).values, rtol=1e-6, atol=1e-6
        )
    text = wb.logit_lens(vlm, inputs=inputs, layers=[L], positions="text", top_k=1)
    assert len(text) == int(inputs["attention_mask"].sum()) - B * n_img
    as_mask = wb.logit_lens(vlm, inputs=inputs, layers=[0, L], positions=img, top_k=2)
    assert as_mask.equals(df)


def test_lens_with_images_and_prompts(vlm_with_processor):
    m = vlm_with_processor
    ph = image_placeholder(m)
    prompts, images = [f"{ph} what?", f"x {ph} y z"], [_image(0), _image(1)]
    df = wb.logit_lens(m, prompts, images=images, layers=[m.n_layers], top_k=3, batch_size=1)
    logits = _forward(m, encode_multimodal(m, images, prompts)).logits[:, -1]
    for b in range(2):
        rows = df[df.prompt_idx == b].sort_values("k")
        assert rows.token_id.tolist() == logits[b].topk(3).indices.tolist()
        torch.testing.assert_close(torch.tensor(rows.logit.values, dtype=torch.float32), logits[b].topk(3).values,
                                   rtol=1e-5, atol=1e-5)


def test_lens_on_text_prompts_of_a_vlm():
    m = _vlm("llava")
    df = wb.logit_lens(m, ["abc", "hello"], layers=[m.n_layers], top_k=1)
    with torch.no_grad():
        logits = m.hf(**m.encode(["abc", "hello"])).logits[:, -1]
    assert df.token_id.tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "either prompts"),
        (dict(prompts=["a"], inputs={}), "either prompts"),
        (dict(inputs={"input_ids": torch.tensor([[1, 2]])}), "attention_mask"),
        (dict(inputs={"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 0]])}), "left-padded"),
        (dict(prompts=["a"], positions=torch.ones(1, 2, dtype=torch.bool)), "with inputs="),
        (dict(prompts=["a"], positions="middle"), "positions must be"),
        (dict(prompts=["<image> a"], images=[None]), "question without an image"),
    ],
)
def test_lens_bad_multimodal_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        wb.logit_lens(_vlm("llava"), **kwargs)


def test_lens_image_positions_on_a_text_model_raise():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="positions='image' needs a vision-language model"):
        wb.logit_lens(m, ["abc"], positions="image")
    with pytest.raises(ValueError, match="image given to text-only model"):
        wb.logit_lens(m, ["abc"], images=[_image()])
    inputs = m.encode(["abc", "hello"])
    bad = inputs["attention_mask"].bool().clone()
    bad[0, 0] = True  # a padding position of the shorter row
    with pytest.raises(ValueError, match="selects padding"):
        wb.logit_lens(m, inputs=inputs, positions=bad)


# -- loading and harvesting --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3"])  # Qwen's and SmolVLM's processors need torchvision
def test_load_model_of_a_vlm_folder(family, tmp_path):
    original = _vlm(family)
    original.hf.save_pretrained(tmp_path)
    original.processor.save_pretrained(tmp_path)
    loaded = wb.load_model(str(tmp_path), device="cpu")
    assert loaded.arch == original.arch and type(loaded.processor).__name__ == type(original.processor).__name__
    assert loaded.tokenizer is loaded.processor.tokenizer and loaded.tokenizer.padding_side == "left"
    ph = image_placeholder(loaded)
    batch = encode_multimodal(loaded, [_image(0), _image(1)], [f"{ph} a", f"b {ph} cd"])
    ref = encode_multimodal(original, [_image(0), _image(1)], [f"{ph} a", f"b {ph} cd"])
    assert all(torch.equal(batch[k], ref[k]) for k in ref)
    assert torch.equal(_forward(loaded, batch).logits, _forward(original, ref).logits)


def test_load_model_of_a_cached_vlm_hub_id(monkeypatch):
    seen = []
    m = _vlm("llava")

    def fake_config(name, **kw):
        seen.append(("config", kw.get("local_files_only")))
        return m.hf.config

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", fake_config)
    monkeypatch.setattr("transformers.AutoProcessor.from_pretrained", lambda name, **kw: m.processor)
    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_pretrained", lambda name, **kw: m.hf)

    def no_causal_lm(*a, **k):
        raise AssertionError("a VLM must not go through AutoModelForCausalLM")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_causal_lm)
    # in the Hugging Face cache: the name check finds it there and asks the hub nothing
    monkeypatch.setattr("workbench.core.models.try_to_load_from_cache", lambda name, f: f"/cache/{name}/{f}")
    loaded = wb.load_model("some-org/some-vlm", device="cpu")
    assert seen == [("config", True)]  # the cache only: no network before the model's own files
    assert loaded.processor is m.processor and loaded.arch.is_vlm and loaded.source["hub_id"] == "some-org/some-vlm"


def test_harvest_text_through_a_vlm(tmp_path):
    m = _vlm("qwen2_vl")
    prompts = ["hello there", "abc"]
    store = wb.harvest(m, prompts, ["blocks.1.hook_resid_post"], tmp_path / "acts", progress=False)
    with wb.trace(m, ["blocks.1.hook_resid_post"]) as tr:
        _forward(m, m.encode(prompts))
    enc = m.encode(prompts)
    expected = tr["blocks.1.hook_resid_post"][enc["attention_mask"].bool()]
    torch.testing.assert_close(store.load("blocks.1.hook_resid_post"), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="vision tower.*harvest feeds text only"):
        wb.harvest(m, prompts, ["blocks.1.hook_resid_post", "projector.hook_out"], tmp_path / "v", progress=False)
    assert not (tmp_path / "v").exists()


def test_check_multimodal_converts_without_running(vlm_with_processor):
    m = vlm_with_processor
    ph = image_placeholder(m)
    prompts, images = check_multimodal(m, np.zeros((20, 20, 3), dtype=np.uint8), f"{ph} a")
    assert prompts == [f"{ph} a"] and images[0][0].mode == "RGB"
