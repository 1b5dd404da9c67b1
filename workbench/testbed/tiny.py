"""Tiny registered models for the fast test tier: ``tiny-smollm2``, ``tiny-vlm`` and ``tiny-vlm-balanced``.

They are names ``load_model`` accepts (registered through the ``workbench.models`` entry point, like the testbed), so
every notebook can run at smoke size on them in seconds (``workbench run NN --smoke -p model=tiny-smollm2``):

* ``tiny-smollm2``: SmolLM2-135M's own tokenizer and configuration at 4 layers and width 64, with seeded random
  weights. Real tokenization (single-token digits, the chat-free prompts) keeps the studies' code paths those of
  the real model; the weights answer at chance. Smoke runs size their layers to the model's depth.
* ``tiny-vlm`` / ``tiny-vlm-balanced`` (and ``tiny-vlm-s1`` / ``tiny-vlm-balanced-s1``, for the testbed's second
  trained seeds): the testbed's LLaVA assembly (its processor, image token and prompt) around ``tiny-smollm2`` and a
  random 2-layer, width-32 DINOv2 tower; they differ only in the projector's seed, as stand-in donors of the same
  architecture.

Each is built once into the user cache (``build_once``: seconds, from the converted SmolLM2 tokenizer), so the
loaders hash and verify their files like every other cached model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Dinov2Config,
    Dinov2Model,
)

from workbench.core.models import from_hf, resolve_device, resolve_dtype
from workbench.core.zoo import PluginModel, ensure_packaged, register_model
from workbench.io.atomic import build_once, combined_sha256, read_marker, sha256_file, verify_files
from workbench.io.paths import cache_root
from workbench.testbed.model import PATCH, PROMPT, assemble

TINY_LM = "tiny-smollm2"
# name -> projector seed; the "-s1" pair stands in for the testbed's second trained seed of each variant
TINY_VLMS = {"tiny-vlm": 0, "tiny-vlm-balanced": 1, "tiny-vlm-s1": 2, "tiny-vlm-balanced-s1": 3}
LM_SHAPE = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
VISION_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
IMAGE_PX = 28  # 2 x 2 patches of 14 px: four image tokens
SEED = 0
_VERSION = "2"  # bump when the recipe changes: the cache folder name carries it


def _weights_files(folder: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(folder.glob("*.safetensors"))}


def ensure_tiny_lm() -> Path:
    """Build ``tiny-smollm2`` once into the user cache; return its folder."""
    base = ensure_packaged("smollm2-135m")
    final = cache_root() / "models" / TINY_LM / f"v{_VERSION}-{base.name}"

    def build(tmp: Path) -> dict:
        config = AutoConfig.from_pretrained(base)
        for key, value in LM_SHAPE.items():
            setattr(config, key, value)
        torch.manual_seed(SEED)
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # random init leaves the norms at identity: perturb every parameter
            for p in hf.parameters():
                p.add_(0.02 * torch.randn_like(p))
        hf.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        return {"name": TINY_LM, "base": str(base.name), "weights_files": _weights_files(tmp)}

    return build_once(final, build)


def ensure_tiny_vlm(name: str) -> Path:
    """Build ``tiny-vlm`` or ``tiny-vlm-balanced`` once into the user cache; return its folder."""
    if name not in TINY_VLMS:
        raise ValueError(f"unknown tiny VLM {name!r}; allowed: {sorted(TINY_VLMS)}")
    lm = ensure_tiny_lm()
    final = cache_root() / "models" / name / f"v{_VERSION}-{lm.name}"

    def build(tmp: Path) -> dict:
        torch.manual_seed(SEED)
        vision = Dinov2Model(Dinov2Config(**VISION_SHAPE, patch_size=PATCH, image_size=IMAGE_PX)).eval()
        model, _, processor = assemble(IMAGE_PX, lm_folder=lm, vision=vision, seed=TINY_VLMS[name])
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        return {"name": name, "lm": lm.name, "weights_files": _weights_files(tmp)}

    return build_once(final, build)


def _load(folder: Path, name: str, device, dtype, vlm: bool):
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    files = read_marker(folder)["weights_files"]
    verify_files(folder, files)
    source = {"registry": name, "path": str(folder), "hub_id": None, "weights_files": files}
    if vlm:
        hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=dt)
        processor = AutoProcessor.from_pretrained(folder)
        model = from_hf(hf, processor.tokenizer, name=name, device=dev, source=source, processor=processor,
                        prompt_template=PROMPT)
    else:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
        model = from_hf(hf, AutoTokenizer.from_pretrained(folder), name=name, device=dev, source=source)
    model.bind_weights_files(combined_sha256(files))
    return model


def register() -> None:
    """The ``workbench.models`` entry point: add the tiny names to the zoo."""
    register_model(PluginModel(
        name=TINY_LM, description="tiny random SmolLM2 (its tokenizer, 4 layers, d=64) for fast tests",
        load=lambda device, dtype: _load(ensure_tiny_lm(), TINY_LM, device, dtype, vlm=False),
        fetch=ensure_tiny_lm, requires=("smollm2-135m",),
    ))
    for name in TINY_VLMS:
        register_model(PluginModel(
            name=name, description="tiny random testbed-shaped VLM (tiny-smollm2 + a width-32 ViT) for fast tests",
            load=lambda device, dtype, name=name: _load(ensure_tiny_vlm(name), name, device, dtype, vlm=True),
            fetch=lambda name=name: ensure_tiny_vlm(name), requires=("smollm2-135m",),
        ))
