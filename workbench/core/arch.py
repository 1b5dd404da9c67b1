"""Architecture map: where the embedding, decoder layers, attention, MLP, final norm and unembedding live.

The map is *found* by inspecting the module tree (``get_input_embeddings``, the ``ModuleList`` whose length is the
configured number of layers, the norm beside it, ``get_output_embeddings``), then checked against what we know of
each supported family. A family we have not verified raises instead of guessing: a silently wrong map would give
silently wrong science.

Vision-language models (``SUPPORTED_VLM_FAMILIES``): the decoder layers, final norm, embedding and head are those of
the *language model* (``hf.get_decoder()``), searched only inside it, because the vision tower has its own list of
layers (of the same length in some configs). The map adds the vision tower (``hf.get_encoder("image")``), its list
of encoder layers, the multimodal projector and the image token id.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

# model_type -> human family name. Each of these is covered by a tiny random model in ``workbench.testing.tiny`` and by
# the equivalence tests (captures == ``output_hidden_states``, last-layer lens == logits).
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX / Pythia",
}

# Vision-language families (model_type -> name), each covered by a tiny random model in ``workbench.testing.tiny`` and the
# same equivalence tests. Their language part is mapped like a text model; none of their heads soft-caps the logits
# (Gemma 3's text config may name a cap, but ``Gemma3ForConditionalGeneration`` does not apply it).
SUPPORTED_VLM_FAMILIES: dict[str, str] = {
    "llava": "LLaVA",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "gemma3": "Gemma 3 (vision)",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
}

# Child names tried, in order, inside one decoder layer / beside the layer list.
_ATTN_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm")
# Where a VLM keeps its multimodal projector: beside the towers (LLaVA, Gemma 3, Idefics3, SmolVLM) or, for Qwen,
# inside the vision tower (its patch merger).
_PROJECTOR_NAMES = ("multi_modal_projector", "connector")
_TOWER_PROJECTOR_NAMES = ("merger",)


class ArchitectureError(ValueError):
    """The module tree of a model could not be mapped onto the workbench's sites."""


@dataclass(frozen=True)
class ArchMap:
    """Dotted module paths (relative to the Hugging Face model) of the parts every tool needs."""

    family: str  # config.model_type, one of SUPPORTED_FAMILIES
    embed: str  # token embedding module (its output is ``hook_embed``)
    layers: str  # the nn.ModuleList of decoder layers
    n_layers: int
    attn: str  # attention child name inside one layer, e.g. "self_attn"
    mlp: str  # MLP child name inside one layer
    final_norm: str
    unembed: str  # output head (lm_head / embed_out)
    tied: bool  # unembedding shares its storage with the embedding (SmolLM2, Gemma 3, small Qwen do)
    d_model: int
    vocab_size: int  # rows of the unembedding (may exceed len(tokenizer))
    logit_softcap: float | None  # Gemma 2 caps logits: tanh(z / c) * c; part of the head, so the lens applies it
    # -- vision-language models only (None for text models) --
    vision: str | None = None  # the vision tower
    vision_layers: str | None = None  # the nn.ModuleList of its encoder layers
    n_vision_layers: int | None = None
    projector: str | None = None  # multimodal projector / connector / merger (its output fills the image positions)
    image_token_id: int | None = None  # the placeholder id whose positions receive the projected image features

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None

    def vision_layer_path(self, i: int) -> str:
        if not self.is_vlm:
            raise ArchitectureError(f"{self.family} is a text-only model: it has no vision layers")
        return f"{self.vision_layers}.{i}"

    def layer_path(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def attn_path(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.attn}"

    def mlp_path(self, i: int) -> str:
        return f"{self.layers}.{i}.{self.mlp}"


def _n_layers_from_config(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _path_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise ArchitectureError(f"module {type(target).__name__} is not inside {type(root).__name__}")


def _first_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(module.named_children())
    for name in names:
        if name in children:
            return name
    return None


def _supported_list() -> str:
    return f"text: {sorted(SUPPORTED_FAMILIES)}; vision-language: {sorted(SUPPORTED_VLM_FAMILIES)}"


def resolve_arch(hf: nn.Module) -> ArchMap:
    """Inspect ``hf`` (a ``*ForCausalLM``, or a ``*ForConditionalGeneration`` VLM) and return its :class:`ArchMap`,
    or raise :class:`ArchitectureError`."""
    config = getattr(hf, "config", None)
    if config is None:
        raise ArchitectureError(f"{type(hf).__name__} has no .config: not a Hugging Face model")
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_VLM_FAMILIES:
        return _resolve_vlm(hf, config, model_type)
    if model_type not in SUPPORTED_FAMILIES:
        raise ArchitectureError(
            f"architecture {model_type!r} ({type(hf).__name__}) is not supported; supported model_type values: "
            f"{_supported_list()}"
        )
    return _resolve_text(hf, config, model_type, root="")


def _resolve_text(hf: nn.Module, config, model_type: str, *, root: str) -> ArchMap:
    """The language-model part: layers searched only inside the submodule ``root`` ("" = the whole model)."""
    n_layers = _n_layers_from_config(config)
    if n_layers is None:
        raise ArchitectureError(f"{model_type}: config names no layer count (num_hidden_layers / n_layer)")

    embed_module = hf.get_input_embeddings()
    unembed_module = hf.get_output_embeddings()
    if embed_module is None or unembed_module is None:
        raise ArchitectureError(f"{model_type}: model has no input or output embeddings (is it a *ForCausalLM?)")
    embed = _path_of(hf, embed_module)
    unembed = _path_of(hf, unembed_module)
    if root and not embed.startswith(root + "."):
        raise ArchitectureError(f"{model_type}: the input embedding {embed} is not inside the language model {root}")

    search_root = hf.get_submodule(root) if root else hf
    prefix = root + "." if root else ""
    layer_lists = [
        (prefix + name, m)
        for name, m in search_root.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m) == n_layers
        and len(m) > 0
        and _first_child(m[0], _ATTN_NAMES) is not None
        and _first_child(m[0], _MLP_NAMES) is not None
    ]
    if len(layer_lists) != 1:
        raise ArchitectureError(
            f"{model_type}: expected exactly one list of {n_layers} decoder layers with attention and MLP children, "
            f"found {[name for name, _ in layer_lists]}"
        )
    layers, layer_list = layer_lists[0]
    attn = _first_child(layer_list[0], _ATTN_NAMES)
    mlp = _first_child(layer_list[0], _MLP_NAMES)

    parent_path = layers.rsplit(".", 1)[0] if "." in layers else ""
    parent = hf.get_submodule(parent_path) if parent_path else hf
    norm_name = _first_child(parent, _FINAL_NORM_NAMES)
    if norm_name is None:
        raise ArchitectureError(f"{model_type}: no final norm beside {layers} (tried {_FINAL_NORM_NAMES})")
    final_norm = f"{parent_path}.{norm_name}" if parent_path else norm_name

    weight = getattr(unembed_module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ArchitectureError(f"{model_type}: unembedding {unembed} has no 2-D weight")
    vocab_size, d_model = weight.shape
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (d_model == hidden):
        raise ArchitectureError(f"unembedding width {d_model} != config hidden size {hidden}")
    if not (embed_module.weight.shape[1] == d_model):
        raise ArchitectureError("embedding and unembedding widths differ")
    tied = embed_module.weight.data_ptr() == weight.data_ptr()
    softcap = getattr(config, "final_logit_softcapping", None)
    # Families whose heads do something the map does not model must not slip through.
    for attr in ("logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise ArchitectureError(f"{model_type}: config.{attr} scales the logits; the lens does not model it")
    return ArchMap(
        family=model_type,
        embed=embed,
        layers=layers,
        n_layers=n_layers,
        attn=attn,
        mlp=mlp,
        final_norm=final_norm,
        unembed=unembed,
        tied=tied,
        d_model=int(d_model),
        vocab_size=int(vocab_size),
        logit_softcap=float(softcap) if softcap else None,
    )


def _resolve_vlm(hf: nn.Module, config, model_type: str) -> ArchMap:
    name = f"{model_type} ({type(hf).__name__})"
    text_config = getattr(config, "text_config", None)
    vision_config = getattr(config, "vision_config", None)
    if text_config is None or vision_config is None:
        raise ArchitectureError(f"{name}: a vision-language config needs text_config and vision_config")
    base = getattr(hf, "base_model", hf)
    lm = hf.get_decoder() if hasattr(hf, "get_decoder") else None
    if lm is None or lm is hf or lm is base:
        raise ArchitectureError(f"{name}: no language model found (tried get_decoder(): language_model / text_model)")
    tower = hf.get_encoder(modality="image") if hasattr(hf, "get_encoder") else None
    if tower is None or tower is hf or tower is base:
        raise ArchitectureError(
            f"{name}: no vision tower found (tried get_encoder('image'): vision_tower / visual / vision_model); "
            f"is this the text-only class of a VLM checkpoint?"
        )
    lm_path, vision = _path_of(hf, lm), _path_of(hf, tower)

    # The language part, with the text config (layer count, width) and the layer search confined to the LM.
    text = _resolve_text(hf, text_config, model_type, root=lm_path)
    # None of the supported VLM heads applies a soft-cap, whatever the text config says (see SUPPORTED_VLM_FAMILIES).
    text = replace(text, logit_softcap=None)

    n_vision = _n_layers_from_config(vision_config)
    if n_vision is None:
        raise ArchitectureError(f"{name}: vision_config names no layer count (num_hidden_layers / depth)")
    vision_lists = [
        f"{vision}.{path}" for path, m in tower.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) == n_vision and n_vision > 0
    ]
    if len(vision_lists) != 1:
        raise ArchitectureError(
            f"{name}: expected exactly one list of {n_vision} vision encoder layers inside {vision}, "
            f"found {vision_lists}"
        )

    base_path = _path_of(hf, base) if base is not hf else ""
    projector = None
    for child in _PROJECTOR_NAMES:
        if child in dict(base.named_children()):
            projector = f"{base_path}.{child}" if base_path else child
            break
    if projector is None:
        child = _first_child(tower, _TOWER_PROJECTOR_NAMES)
        projector = f"{vision}.{child}" if child else None
    if projector is None:
        raise ArchitectureError(
            f"{name}: no multimodal projector (tried {_PROJECTOR_NAMES} beside the towers, {_TOWER_PROJECTOR_NAMES} "
            f"inside {vision})"
        )

    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if not isinstance(image_token_id, int):
        raise ArchitectureError(f"{name}: config has no integer image_token_id / image_token_index")
    return replace(
        text,
        vision=vision,
        vision_layers=vision_lists[0],
        n_vision_layers=n_vision,
        projector=projector,
        image_token_id=image_token_id,
    )
