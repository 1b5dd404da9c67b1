"""Architecture map: where the embedding, decoder layers, attention, MLP, final norm and unembedding live.

The map is *found* by inspecting the module tree (``get_input_embeddings``, the ``ModuleList`` whose length is the
configured number of layers, the norm beside it, ``get_output_embeddings``), then checked against what we know of
each supported family. A family we have not verified raises instead of guessing: a silently wrong map would give
silently wrong science.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> human family name. Each of these is covered by a tiny random model in ``workbench.tiny`` and by
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

# Child names tried, in order, inside one decoder layer / beside the layer list.
_ATTN_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward")
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm")


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


def resolve_arch(hf: nn.Module) -> ArchMap:
    """Inspect ``hf`` (a ``*ForCausalLM``) and return its :class:`ArchMap`, or raise :class:`ArchitectureError`."""
    config = getattr(hf, "config", None)
    if config is None:
        raise ArchitectureError(f"{type(hf).__name__} has no .config: not a Hugging Face model")
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ArchitectureError(
            f"architecture {model_type!r} ({type(hf).__name__}) is not supported; supported model_type values: "
            f"{sorted(SUPPORTED_FAMILIES)}"
        )
    n_layers = _n_layers_from_config(config)
    if n_layers is None:
        raise ArchitectureError(f"{model_type}: config names no layer count (num_hidden_layers / n_layer)")

    embed_module = hf.get_input_embeddings()
    unembed_module = hf.get_output_embeddings()
    if embed_module is None or unembed_module is None:
        raise ArchitectureError(f"{model_type}: model has no input or output embeddings (is it a *ForCausalLM?)")
    embed = _path_of(hf, embed_module)
    unembed = _path_of(hf, unembed_module)

    layer_lists = [
        (name, m)
        for name, m in hf.named_modules()
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
    assert d_model == hidden, f"unembedding width {d_model} != config hidden size {hidden}"
    assert embed_module.weight.shape[1] == d_model, "embedding and unembedding widths differ"
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
