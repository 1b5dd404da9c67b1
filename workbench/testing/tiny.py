"""Tiny randomly initialised models of every supported family, built offline from configs (for tests).

Each has 3 layers, width 64 and a byte-level tokenizer (256 byte tokens plus <pad>/<bos>/<eos>), so they load in
milliseconds and exercise the same code paths as the real models: tied and untied heads, grouped-query attention,
scaled embeddings (Gemma), logit soft-capping (Gemma 2), learned positions (GPT-2), partial rotary (NeoX).

Vision-language families (``workbench.core.arch.SUPPORTED_VLM_FAMILIES``) get the same 3-layer, width-64 language model
behind a width-32 vision tower (:func:`tiny_vlm`), a byte tokenizer with the family's image tokens (the image token
is always id 259), a real transformers processor built offline where this environment allows it
(:func:`tiny_vlm_processor`), and processor-free inputs of the exact shapes each family needs
(:func:`tiny_vlm_inputs`).
"""

from __future__ import annotations

import importlib.util

import torch
import transformers as T
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from workbench.core.arch import SUPPORTED_FAMILIES, SUPPORTED_VLM_FAMILIES
from workbench.core.models import Model, from_hf
from workbench.methods.circuits.transcoder import Transcoder, TranscoderSet

N_LAYERS = 3
D_MODEL = 64
VOCAB = 259  # 256 bytes + <pad> <bos> <eos>
PAD, BOS, EOS = 256, 257, 258


def byte_tokenizer(extra_tokens: tuple[str, ...] = (), named: dict[str, str] | None = None):
    """A byte-level fast tokenizer with no merges: every UTF-8 byte is one token.

    extra_tokens: special tokens (e.g. a VLM's image placeholder) that get ids 259, 260, ... in order.
    named: model-specific names for some of them (e.g. ``{"image_token": "<image>"}``, then ``tok.image_token``).
    """

    # ByteLevel pre-tokenisation maps bytes to printable characters; map those characters to ids 0..255.
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    b2u = bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    if not (set(vocab) == set(byte_chars)):
        raise RuntimeError("the byte tokenizer's vocabulary is not the 256 byte characters")
    vocab.update({"<pad>": PAD, "<bos>": BOS, "<eos>": EOS})
    vocab.update({t: VOCAB + j for j, t in enumerate(extra_tokens)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    if extra_tokens:  # matched whole in text, before byte splitting
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_tokens])
    kwargs = {"extra_special_tokens": dict(named)} if named else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", padding_side="left", **kwargs
    )


def tiny_config(family: str):
    """A small config of ``family`` (a ``model_type`` from ``workbench.core.arch.SUPPORTED_FAMILIES``)."""

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    decoder = dict(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    if family == "llama":
        return T.LlamaConfig(**decoder, tie_word_embeddings=True)
    if family == "mistral":
        return T.MistralConfig(**decoder, sliding_window=8, tie_word_embeddings=False)
    if family == "qwen2":
        return T.Qwen2Config(**decoder, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**decoder, head_dim=16, tie_word_embeddings=False)
    if family == "gemma2":
        return T.Gemma2Config(
            **decoder, head_dim=16, sliding_window=8, final_logit_softcapping=5.0, attn_logit_softcapping=20.0,
            query_pre_attn_scalar=16,
        )
    if family == "gemma3_text":
        return T.Gemma3TextConfig(**decoder, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if family == "gpt2":
        return T.GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=128, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(
            hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=128, rotary_pct=0.25, tie_word_embeddings=False, **common,
        )

    raise ValueError(f"no tiny config for family {family!r}; families: {sorted(SUPPORTED_FAMILIES)}")


def tiny_hf(family: str, seed: int = 0):
    """The transformers model of :func:`tiny_config`, with seeded random weights, eval mode."""

    config = tiny_config(family)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norm weights at their identity; perturb every parameter so no site is trivial.
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf.eval()


def tiny_model(family: str = "llama", seed: int = 0) -> Model:
    """A workbench :class:`Model` around :func:`tiny_hf` and the byte tokenizer."""
    return from_hf(tiny_hf(family, seed), byte_tokenizer(), name=f"tiny-{family}")


# -- vision-language models ---------------------------------------------------------------------------------------
IMAGE = VOCAB  # the image token id of every tiny VLM (259)
VLM_VOCAB = VOCAB + 5  # room for each family's extra tokens
# Each family's extra tokens (the image token first, so it is id 259), and the named ones its processor reads.
VLM_TOKENS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "llava": (("<image>",), {}),
    "qwen2_vl": (("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"), {}),
    "qwen2_5_vl": (("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"), {}),
    "gemma3": (
        ("<image_soft_token>", "<start_of_image>", "<end_of_image>"),
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    ),
    "idefics3": (("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"), {}),
    "smolvlm": (("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"), {}),
}
# The (square) image side each tiny vision tower sees, in pixels. Qwen2.5-VL's is 32 so that its 4x4 merged patches
# span 2x2 attention windows of 16 px and the tower really reorders patches by window.
VLM_IMAGE_PX = {"llava": 16, "qwen2_vl": 16, "qwen2_5_vl": 32, "gemma3": 16, "idefics3": 16, "smolvlm": 16}
VISION_LAYERS = 3  # as many as the decoder: the arch map must not confuse the two lists


def _vlm_families() -> list[str]:

    return sorted(SUPPORTED_VLM_FAMILIES)


def tiny_vlm_config(family: str):
    """A small config of the vision-language ``family`` (a ``model_type`` of ``SUPPORTED_VLM_FAMILIES``)."""

    text = dict(
        hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, vocab_size=VLM_VOCAB, pad_token_id=PAD,
        bos_token_id=BOS, eos_token_id=EOS,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS, num_attention_heads=2)
    px = VLM_IMAGE_PX.get(family)
    mrope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}  # sums to head_dim / 2
    qwen_vision = dict(depth=VISION_LAYERS, num_heads=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    if family == "llava":
        return T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(**vision, image_size=px, patch_size=8, projection_dim=32),
            text_config=T.LlamaConfig(**text, tie_word_embeddings=True), image_token_index=IMAGE,
            tie_word_embeddings=True,
        )
    if family == "qwen2_vl":
        return T.Qwen2VLConfig(
            vision_config=dict(**qwen_vision, embed_dim=32, hidden_size=D_MODEL, mlp_ratio=2),
            text_config=dict(**text, rope_parameters=mrope), image_token_id=IMAGE, video_token_id=IMAGE + 1,
            vision_start_token_id=IMAGE + 2, vision_end_token_id=IMAGE + 3,
        )
    if family == "qwen2_5_vl":
        return T.Qwen2_5_VLConfig(
            vision_config=dict(
                **qwen_vision, hidden_size=32, out_hidden_size=D_MODEL, intermediate_size=64, window_size=16,
                fullatt_block_indexes=[1],
            ),
            text_config=dict(**text, rope_parameters=mrope), image_token_id=IMAGE, video_token_id=IMAGE + 1,
            vision_start_token_id=IMAGE + 2, vision_end_token_id=IMAGE + 3,
        )
    if family == "gemma3":
        # The text config names a final soft-cap that Gemma3ForConditionalGeneration never applies: the lens must not.
        return T.Gemma3Config(
            vision_config=dict(model_type="siglip_vision_model", **vision, image_size=px, patch_size=4),
            text_config=dict(
                **text, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, final_logit_softcapping=5.0
            ),
            mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=IMAGE + 1, eoi_token_index=IMAGE + 2,
        )
    if family in ("idefics3", "smolvlm"):
        cls = T.Idefics3Config if family == "idefics3" else T.SmolVLMConfig
        return cls(
            vision_config=dict(**vision, image_size=px, patch_size=4),
            text_config=dict(model_type="llama", **text), image_token_id=IMAGE, scale_factor=2,
        )
    raise ValueError(f"no tiny config for vision-language family {family!r}; families: {_vlm_families()}")


def tiny_vlm_hf(family: str, seed: int = 0):
    """The transformers model of :func:`tiny_vlm_config`, with seeded random weights, eval mode."""

    config = tiny_vlm_config(family)
    torch.manual_seed(seed)
    hf = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # as tiny_hf: no identity norms; Gemma 3's projector starts at zero
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return hf.eval()


def vlm_tokenizer(family: str):
    """The byte tokenizer with ``family``'s image tokens."""
    if family not in VLM_TOKENS:
        raise ValueError(f"no tiny tokenizer for vision-language family {family!r}; families: {_vlm_families()}")
    extra, named = VLM_TOKENS[family]
    return byte_tokenizer(extra, named)


def _lenient(processor_cls):
    """``processor_cls`` that accepts ``None`` for an optional part: Qwen's and SmolVLM's video processors need
    torchvision, which the workbench does not install (images never go through them)."""

    class Lenient(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    Lenient.__name__ = Lenient.__qualname__ = processor_cls.__name__
    return Lenient


def tiny_vlm_processor(family: str, tokenizer=None):
    """A real transformers processor for the tiny ``family`` (PIL image backend, offline), sized to its tower.

    Raises ImportError naming the missing package where transformers' processor class needs one (SmolVLM's needs
    ``num2words``).
    """

    tok = tokenizer if tokenizer is not None else vlm_tokenizer(family)
    px = VLM_IMAGE_PX.get(family)
    if family == "llava":
        ip = T.CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px})
        return T.LlavaProcessor(
            image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        ip = T.Qwen2VLImageProcessorPil(
            patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=px * px, max_pixels=px * px
        )
        cls = T.Qwen2VLProcessor if family == "qwen2_vl" else T.Qwen2_5_VLProcessor
        return _lenient(cls)(image_processor=ip, tokenizer=tok, video_processor=None)
    if family == "gemma3":
        ip = T.Gemma3ImageProcessorPil(size={"height": px, "width": px})
        return T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4)
    if family in ("idefics3", "smolvlm"):
        size = {"longest_edge": px}
        if family == "idefics3":
            ip = T.Idefics3ImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size)
            return T.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4)
        if importlib.util.find_spec("num2words") is None:
            raise ImportError("transformers' SmolVLMProcessor needs the package 'num2words' (pip install num2words)")
        ip = T.SmolVLMImageProcessorPil(do_image_splitting=False, size=size, max_image_size=size)
        return _lenient(T.SmolVLMProcessor)(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_len=4)
    raise ValueError(f"no tiny processor for vision-language family {family!r}; families: {_vlm_families()}")


def tiny_vlm(family: str = "llava", seed: int = 0, *, processor: bool | None = None) -> Model:
    """A workbench :class:`Model` around :func:`tiny_vlm_hf` and the family's byte tokenizer.

    processor: attach :func:`tiny_vlm_processor` (True: must succeed; None: when this environment can build it;
    False: never).
    """
    tok = vlm_tokenizer(family)
    proc = None
    if processor or processor is None:
        try:
            proc = tiny_vlm_processor(family, tok)
        except ImportError:
            if processor:
                raise
    return from_hf(tiny_vlm_hf(family, seed), tok, name=f"tiny-{family}", processor=proc)


def image_tokens_per_image(config) -> int:
    """How many image-token positions one image fills in a tiny VLM of ``config`` (at its ``VLM_IMAGE_PX``)."""
    family = config.model_type
    v = config.vision_config
    if family == "llava":
        n = (v.image_size // v.patch_size) ** 2
        return n + (config.vision_feature_select_strategy == "full")  # "default" drops the CLS token
    if family == "gemma3":
        return config.mm_tokens_per_image
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return (VLM_IMAGE_PX[family] // v.patch_size) ** 2 // v.spatial_merge_size**2
    if family in ("idefics3", "smolvlm"):
        return (v.image_size // v.patch_size) ** 2 // config.scale_factor**2
    raise ValueError(f"no tiny inputs for vision-language family {family!r}; families: {_vlm_families()}")


def tiny_vlm_inputs(model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free inputs for a tiny VLM (a :class:`Model` or its ``hf``): one random image per row.

    Each row is ``<bos>``, 3 text bytes, the image tokens, then text bytes; row 0 is the longest and the others are
    left-padded by 2 per row. Returns input_ids, attention_mask, pixel_values and per family:

    * LLaVA, Gemma 3: pixel_values ``[batch, 3, px, px]``; position_ids (from the mask, like ``Model.encode``);
      Gemma 3 also ``token_type_ids`` (1 at image tokens: bidirectional attention among them).
    * Qwen2-VL / Qwen2.5-VL: pixel_values of flattened patches ``[batch * (px/4)^2, 3*2*4*4]``,
      ``image_grid_thw`` ``[batch, 3]`` = (1, px/4, px/4), and ``mm_token_type_ids``; no position_ids (the model
      builds its 3-D M-RoPE positions from the mask).
    * Idefics3 / SmolVLM: pixel_values ``[batch, 1, 3, px, px]`` (images per row), ``pixel_attention_mask``
      ``[batch, 1, px, px]`` (bool), position_ids.
    """
    hf = getattr(model, "hf", model)
    config = hf.config
    family = config.model_type
    n_img = image_tokens_per_image(config)
    px = VLM_IMAGE_PX[family]
    g = torch.Generator().manual_seed(seed)
    longest = 3 + n_img + 5 + 1
    ids = torch.full((batch, longest), PAD, dtype=torch.long)
    mask = torch.zeros((batch, longest), dtype=torch.long)
    for b in range(batch):
        n_suffix = max(5 - 2 * b, 1)
        row = [BOS, *torch.randint(0, 256, (3,), generator=g).tolist(), *[IMAGE] * n_img,
               *torch.randint(0, 256, (n_suffix,), generator=g).tolist()]
        ids[b, longest - len(row):] = torch.tensor(row)
        mask[b, longest - len(row):] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        p = config.vision_config.patch_size
        t = config.vision_config.temporal_patch_size
        side = px // p
        out["pixel_values"] = torch.randn(batch * side * side, 3 * t * p * p, generator=g)
        out["image_grid_thw"] = torch.tensor([[1, side, side]] * batch)
        out["mm_token_type_ids"] = (ids == IMAGE).long()
        return out
    if family in ("idefics3", "smolvlm"):
        out["pixel_values"] = torch.randn(batch, 1, 3, px, px, generator=g)
        out["pixel_attention_mask"] = torch.ones(batch, 1, px, px, dtype=torch.bool)
    else:
        out["pixel_values"] = torch.randn(batch, 3, px, px, generator=g)
    if family == "gemma3":
        out["token_type_ids"] = (ids == IMAGE).long()
    out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return out


def random_transcoders(model: Model, *, k: int = 6, layers=None, seed: int = 1, skip: bool = True, width: int = 4):
    """A :class:`~workbench.methods.circuits.transcoder.TranscoderSet` of seeded random TopK transcoders for every
    layer of ``model`` (or ``layers``): a graph on a tiny model without training."""
    g = torch.Generator().manual_seed(seed)
    d = model.d_model
    tcs = {}
    for i in (range(model.n_layers) if layers is None else layers):
        tc = Transcoder(d, width * d, k=k, skip=skip)
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        tcs[i] = tc
    out = TranscoderSet(tcs, model_name=model.name)
    out.requires_grad_(False)
    return out
