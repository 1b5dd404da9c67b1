"""Multimodal inputs for vision-language models: checked images, image-token positions, and processor batches.

    batch = encode_multimodal(model, [img_a, img_b], ["<image>\\nWhat colour is it?", "<image>\\nHow many?"])
    with workbench.core.trace(model, ["blocks.3.hook_resid_post", "projector.hook_out"]) as tr:
        model.hf(**batch)
    img = image_token_mask(model, batch["input_ids"])          # [batch, seq] bool: where the image features went

A VLM :class:`~workbench.core.models.Model` (``model.arch.is_vlm``) carries its transformers processor in
``model.processor`` (``load_model`` sets it for a folder or hub id of a supported VLM family). Its prompts name
where each image goes with the processor's placeholder string (:func:`image_placeholder`: ``"<image>"`` for LLaVA,
Idefics3 and SmolVLM, ``"<|image_pad|>"`` for Qwen2-VL / Qwen2.5-VL, ``"<start_of_image>"`` for Gemma 3); the
processor expands each into the image's token positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# Families whose language model takes 3-D multimodal rotary positions (M-RoPE), which the model computes itself from
# the attention mask and ``mm_token_type_ids``: a 1-D ``position_ids`` would be wrong there.
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
MIN_IMAGE_SIZE = 16  # pixels on the shorter side: below one ViT patch (14-16 px) an image carries nothing to see
IMAGE_MODES = ("RGB", "RGBA", "L", "P", "CMYK")  # PIL modes check_image converts to RGB (RGBA/P on white)


def _arch(model):
    arch = getattr(model, "arch", None)
    if arch is None:
        raise TypeError(f"expected a workbench Model (load_model / from_hf), got {type(model).__name__}")
    return arch


def _name(model) -> str:
    return getattr(model, "name", None) or type(model).__name__


def image_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Bool tensor of ``input_ids``' shape: True where the id is the model's image token (where the projected image
    features are scattered in). Raises ValueError for a text-only model."""
    arch = _arch(model)
    if not arch.is_vlm:
        raise ValueError(
            f"image_token_mask needs a vision-language model; {_name(model)} is a text-only {arch.family} model"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    return input_ids == arch.image_token_id


def check_image(image, *, min_size: int = MIN_IMAGE_SIZE):
    """An RGB ``PIL.Image`` of ``image``, or ValueError saying what is wrong and what is allowed.

    Accepts a PIL image of mode RGB, L, P, CMYK or RGBA (transparency composited on white), an ``H x W x 3`` uint8
    numpy array, or a ``3 x H x W`` float tensor with values in [0, 1] (quantised to 8 bits, as image files are).
    The shorter side must be at least ``min_size`` pixels.
    """
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int (pixels), got {min_size!r}")
    allowed = (
        f"a PIL image of mode {'/'.join(IMAGE_MODES)}, an HxWx3 uint8 numpy array, or a 3xHxW float tensor in [0, 1]"
    )
    if isinstance(image, Image.Image):
        if image.mode not in IMAGE_MODES:
            raise ValueError(f"image mode {image.mode!r} is not supported; allowed modes: {list(IMAGE_MODES)}")
        if image.mode == "P":
            image = image.convert("RGBA")  # a palette may carry transparency
        if image.mode == "RGBA":
            white = Image.new("RGB", image.size, (255, 255, 255))
            white.paste(image, mask=image.getchannel("A"))
            image = white
        else:
            image = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}; {allowed}")
        image = Image.fromarray(image)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"tensor image must be a 3xHxW float tensor in [0, 1], got shape {tuple(image.shape)} dtype "
                f"{image.dtype}; {allowed}"
            )
        t = image.detach().float().cpu()
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ValueError(
                f"tensor image values must lie in [0, 1], got min {float(t.min()):.4g} max {float(t.max()):.4g}"
                " (nan/inf not allowed); scale 0-255 images by 1/255"
            )
        image = Image.fromarray((t * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy())
    else:
        raise ValueError(f"unsupported image type {type(image).__name__}; allowed: {allowed}")
    w, h = image.size
    if min(w, h) < min_size:
        raise ValueError(f"image is {w}x{h} pixels; its shorter side must be at least {min_size} px")
    return image


def image_placeholder(model) -> str:
    """The string a prompt uses for one image: the processor's image token (Gemma 3: its begin-of-image token)."""
    arch = _arch(model)
    if not arch.is_vlm:
        raise ValueError(f"{_name(model)} is a text-only {arch.family} model: it has no image placeholder")
    processor = getattr(model, "processor", None)
    if processor is None:
        raise ValueError(
            f"{_name(model)} has no processor: load it with load_model(folder or hub id), or give "
            "from_hf(..., processor=AutoProcessor.from_pretrained(...))"
        )
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or not token:
        raise ValueError(f"the processor {type(processor).__name__} of {_name(model)} names no image_token string")
    return token


def _per_prompt_images(images, n_prompts: int) -> list[list]:
    """Normalise ``images`` to one list per prompt (an image, a list of images, or None for each prompt)."""
    if images is None:
        return [[] for _ in range(n_prompts)]
    if not isinstance(images, (list, tuple)):
        images = [images]  # one image for one prompt
    if len(images) != n_prompts:
        raise ValueError(
            f"got {len(images)} image entries for {n_prompts} prompts; give one entry per prompt (an image, a list of "
            "images, or None)"
        )
    return [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]


def check_multimodal(model, images, prompts: Sequence[str] | str) -> tuple[list[str], list[list]]:
    """Validate a multimodal request without running anything: ``(prompts, images per prompt)`` with every image
    converted by :func:`check_image`, or ValueError. See :func:`encode_multimodal` for the rules."""
    arch = _arch(model)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"every prompt must be a non-empty string; got {bad[:3]!r}")
    per_prompt = _per_prompt_images(images, len(prompts))
    if not arch.is_vlm:
        if any(per_prompt):
            raise ValueError(
                f"image given to text-only model {_name(model)} ({arch.family}); give images=None, or use a "
                "vision-language model"
            )
        return prompts, per_prompt
    placeholder = image_placeholder(model)
    for i, (prompt, imgs) in enumerate(zip(prompts, per_prompt)):
        if not imgs:
            raise ValueError(
                f"question without an image for a VLM: prompt {i} ({prompt[:60]!r}) has no image; {_name(model)} "
                f"needs one image per {placeholder!r} in the prompt"
            )
        n = prompt.count(placeholder)
        if n != len(imgs):
            raise ValueError(
                f"prompt {i} ({prompt[:60]!r}) has {n} image placeholder(s) {placeholder!r} for {len(imgs)} image(s); "
                f"put exactly one {placeholder!r} per image"
            )
    return prompts, [[check_image(im) for im in imgs] for imgs in per_prompt]


def encode_multimodal(model, images, prompts: Sequence[str] | str) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts with their images, ready for ``model.hf(**batch)``.

    images: one entry per prompt: an image (see :func:`check_image`), a list of images (the prompt then has one
        placeholder per image, in order), or None. A text-only model takes no images (then this is
        ``model.encode(prompts)``); a VLM needs at least one image per prompt.
    prompts: strings containing :func:`image_placeholder` once per image.

    Everything is checked before the processor or the model runs. Position ids follow the attention mask like
    :meth:`Model.encode` (so padding changes no result), except for the M-RoPE families (Qwen2-VL, Qwen2.5-VL),
    whose model computes its 3-D positions from the mask and ``mm_token_type_ids``. Tensors are on the model's
    device; floating ones (pixel values) in its dtype.
    """
    prompts, checked = check_multimodal(model, images, prompts)
    if not model.arch.is_vlm:
        return model.encode(prompts)
    processor = model.processor
    processor.tokenizer.padding_side = "left"
    enc = processor(text=prompts, images=checked, return_tensors="pt", padding=True)
    batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    mask = batch["attention_mask"]
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise RuntimeError(f"the processor of {_name(model)} padded on the right; the workbench needs left padding")
    if model.arch.family not in MROPE_FAMILIES:
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    dev, dt = model.device, model.dtype
    return {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev) for k, v in batch.items()}
