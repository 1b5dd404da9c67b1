"""Site names: TransformerLens-style names mapped onto Hugging Face modules.

A *site* is one tensor in the forward pass that ``trace`` can read or edit:

===============================  ==========================================================  =======
name                             what it is                                                   hook
===============================  ==========================================================  =======
``hook_embed``                   output of the token embedding module                         output
``blocks.{i}.hook_resid_pre``    residual stream entering decoder layer i (HF hidden_states[i])  input
``blocks.{i}.hook_attn_out``     output of layer i's attention module (before the residual add) output
``blocks.{i}.hook_mlp_out``      output of layer i's MLP module (before the residual add)        output
``blocks.{i}.hook_resid_post``   residual stream leaving decoder layer i (HF hidden_states[i+1]) output
``blocks.{i}.attn.hook_z``       every head's output before the attention output projection       input
                                 (the input of ``o_proj`` / ``c_proj`` / ``dense``): [..., n_heads * d_head],
                                 head h = slice ``h*d_head:(h+1)*d_head`` (see :func:`head_shape`)
``ln_final.hook_normalized``     output of the final norm (HF hidden_states[-1])                 output
``<dotted.module.path>``         output of any module of the Hugging Face model                  output
``<dotted.module.path>:input``   first input of any module                                       input
===============================  ==========================================================  =======

Note: HF's last ``hidden_states`` entry already has the final norm applied, so ``blocks.{L-1}.hook_resid_post``
equals ``hidden_states[L]`` only before that norm; ``ln_final.hook_normalized`` equals ``hidden_states[L]``.

Vision-language models add (``blocks.*``, ``hook_embed`` and ``ln_final`` are the language model's):

======================================  ====================================================================
``vision.blocks.{i}.hook_resid_post``   output of vision encoder layer i
``vision.hook_out``                     output of the vision tower (its ``last_hidden_state``)
``projector.hook_out``                  the projected image features that are scattered into the image-token
                                        positions: the projector's output; for Qwen (whose merger sits inside
                                        the tower) the tower's ``pooler_output``, i.e. the merger's output back
                                        in patch order
======================================  ====================================================================

On a VLM, ``hook_embed`` is the token embedding *before* the image features are scattered in (the image positions
hold the placeholder's embedding); ``blocks.0.hook_resid_pre`` is the residual after the scatter.
Vision sites have no text sequence dimension (their shape is the tower's own: ``[images, patches, d]``, or
``[patches, d]`` for Qwen, whose Qwen2.5 tower also orders patches by attention window), so ``trace``'s
``positions`` never applies to them, nor to raw module paths inside the vision tower.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from workbench.core.arch import ArchMap

_BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(\w+)$")
_HEAD_RE = re.compile(r"^blocks\.(-?\d+)\.attn\.hook_z$")
# The attention output projection inside one attention module, tried in order (Llama/Qwen/Gemma/Mistral, GPT-2,
# GPT-NeoX); its input is the concatenation of the heads' outputs.
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")
_VISION_BLOCK_HOOKS = ("hook_resid_post",)
_VISION_BLOCK_RE = re.compile(r"^vision\.blocks\.(-?\d+)\.(\w+)$")
_VISION_SITES = ("vision.hook_out", "projector.hook_out")
INPUT_SUFFIX = ":input"


class SiteError(ValueError):
    """An unknown site name or an out-of-range layer."""


@dataclass(frozen=True)
class Site:
    name: str  # the name the user gave
    module: str  # dotted path of the hooked HF module ("" is the root)
    kind: str  # "output" or "input"
    layer: int | None  # decoder layer index for blocks.* sites, else None
    order: tuple[int, int]  # (layer slot, within-layer slot): forward order of named sites, for sorting
    field: str | None = None  # read (and edit) this field of the module's ModelOutput instead of its first tensor
    stream: str = "text"  # "text" (dim 1 is the token sequence: positions apply) or "vision" (tower-shaped)


def layer_site(layer: int) -> str:
    """Site of hidden-state layer ``layer`` (HF ``hidden_states`` numbering): 0 -> ``blocks.0.hook_resid_pre``
    (the embedding output), l -> ``blocks.{l-1}.hook_resid_post`` (before the final norm)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise SiteError(f"layer must be a non-negative int (0 = embeddings), got {layer!r}")
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def spread_layers(n_layers: int, k: int) -> list[int]:
    """``k`` hidden-state layers spread evenly over ``0..n_layers``, both ends included (fewer when the model has
    fewer): the layers a smoke run reads, so that it fits a model of any depth. ``spread_layers(30, 4)`` is
    ``[0, 10, 20, 30]``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 2:
        raise ValueError(f"k must be an int >= 2 (both ends), got {k!r}")
    check_layers(None, n_layers)  # validates n_layers
    return sorted({round(i * n_layers / (k - 1)) for i in range(k)})


def check_layers(layers, n_layers: int, *, name: str = "layers") -> list[int]:
    """The one meaning of ``layers=`` in the package, validated here and nowhere else.

    Layers are hidden-state layers ``0..n_layers`` (Hugging Face ``hidden_states`` numbering: 0 = the embedding
    output, l = the output of block l-1, see :func:`layer_site`). ``None`` means all of them; an int means that
    one; a sequence means those. Negative values count from the end (-1 = ``n_layers``). The result is sorted and
    free of repeats, so ``[10, 0, 10]`` and ``(0, 10)`` name the same layers. Bools, non-integers, out-of-range
    values and empty sequences raise ``ValueError`` naming the bad values and the allowed range.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, numbers.Integral) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if layers is None:
        return list(range(n_layers + 1))
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{name} must be None (all), an int or a list of ints; got {layers!r}")
    layers = list(layers)
    allowed = (f"layers are ints in 0..{n_layers} (0 = embedding output, {n_layers} = last block; negative counts "
               "from the end), or None for all")
    if not layers:
        raise ValueError(f"{name} is empty: {allowed}")
    not_int = [v for v in layers if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if not_int:
        raise ValueError(f"{name} {not_int} are not ints: {allowed}")
    out = [v for v in layers if not -(n_layers + 1) <= v <= n_layers]
    if out:
        raise ValueError(f"{name} {out} out of range: {allowed}")
    return sorted({int(v) % (n_layers + 1) for v in layers})


def site_names(arch: ArchMap) -> list[str]:
    """Every named (non-raw) site of a model, in forward order (a VLM's vision sites run before its decoder)."""
    names = ["hook_embed"]
    if arch.is_vlm:
        names += [f"vision.blocks.{i}.{h}" for i in range(arch.n_vision_layers) for h in _VISION_BLOCK_HOOKS]
        names += list(_VISION_SITES)
    for i in range(arch.n_layers):
        names += [f"blocks.{i}.{h}" for h in _BLOCK_HOOKS]
    names.append("ln_final.hook_normalized")
    return names


def out_proj_path(arch: ArchMap, layer: int, module_names: set[str]) -> str:
    """The attention output projection of decoder layer ``layer`` (its input is ``blocks.{layer}.attn.hook_z``)."""
    attn = arch.attn_path(layer)
    for child in _OUT_PROJ_NAMES:
        if f"{attn}.{child}" in module_names:
            return f"{attn}.{child}"
    raise SiteError(f"no attention output projection ({'/'.join(_OUT_PROJ_NAMES)}) inside {attn}: the head site "
                    f"blocks.{layer}.attn.hook_z is not available for this {arch.family} model")


def head_shape(config) -> tuple[int, int]:
    """(n_heads, d_head) of a Hugging Face config (a VLM's text config is used): how ``attn.hook_z`` splits."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = next((getattr(cfg, k) for k in ("num_attention_heads", "n_head") if isinstance(getattr(cfg, k, None), int)),
                   None)
    if n_heads is None:
        raise SiteError(f"config {type(cfg).__name__} names no number of attention heads")
    d_head = getattr(cfg, "head_dim", None)
    if not isinstance(d_head, int):
        d_head = cfg.hidden_size // n_heads
    return n_heads, d_head


def _valid_hint(arch: ArchMap) -> str:
    vision = ""
    if arch.is_vlm:
        vision = (
            f"'vision.blocks.{{j}}.hook_resid_post' with 0 <= j < {arch.n_vision_layers}, "
            f"{', '.join(repr(s) for s in _VISION_SITES)}, "
        )
    return (
        f"valid sites: 'hook_embed', 'blocks.{{i}}.{{{'|'.join(_BLOCK_HOOKS)}}}' or 'blocks.{{i}}.attn.hook_z' with "
        f"0 <= i < {arch.n_layers}, "
        f"{vision}'ln_final.hook_normalized', or a dotted module path of the model (append ':input' for its input)"
    )


def _in_vision(path: str, arch: ArchMap) -> bool:
    return arch.is_vlm and any(path == p or path.startswith(p + ".") for p in (arch.vision, arch.projector))


def _resolve_vision_site(name: str, arch: ArchMap) -> Site:
    if not arch.is_vlm:
        raise SiteError(
            f"site {name!r} needs a vision-language model; this {arch.family} model is text-only. {_valid_hint(arch)}"
        )
    nv = arch.n_vision_layers
    if name == "vision.hook_out":
        return Site(name, arch.vision, "output", None, (-1, 1 + nv), stream="vision")
    if name == "projector.hook_out":
        if arch.projector.startswith(arch.vision + "."):
            # Qwen: the merger runs inside the tower, which returns its output (in patch order) as pooler_output.
            return Site(name, arch.vision, "output", None, (-1, 2 + nv), field="pooler_output", stream="vision")
        return Site(name, arch.projector, "output", None, (-1, 2 + nv), stream="vision")
    match = _VISION_BLOCK_RE.match(name)
    if match is None:
        raise SiteError(f"unknown site {name!r}; {_valid_hint(arch)}")
    layer, hook = int(match.group(1)), match.group(2)
    if not 0 <= layer < nv:
        raise SiteError(
            f"vision layer {layer} in site {name!r} is out of range: the vision tower has {nv} layers (0..{nv - 1})"
        )
    if hook not in _VISION_BLOCK_HOOKS:
        raise SiteError(f"unknown hook {hook!r} in site {name!r}; vision block hooks are {list(_VISION_BLOCK_HOOKS)}")
    return Site(name, arch.vision_layer_path(layer), "output", None, (-1, 1 + layer), stream="vision")


def resolve_site(name: str, arch: ArchMap, module_names: set[str]) -> Site:
    """Map a site name onto a module and hook kind, or raise :class:`SiteError` listing what is valid."""
    if not isinstance(name, str) or not name:
        raise SiteError(f"site must be a non-empty string, got {name!r}; {_valid_hint(arch)}")
    if name == "hook_embed":
        return Site(name, arch.embed, "output", None, (-1, 0))
    if name == "ln_final.hook_normalized":
        return Site(name, arch.final_norm, "output", None, (arch.n_layers, 0))
    if name.startswith(("vision.", "projector.")) and name.split(":")[0] not in module_names:
        return _resolve_vision_site(name, arch)
    match = _HEAD_RE.match(name)
    if match:
        layer = int(match.group(1))
        if not 0 <= layer < arch.n_layers:
            raise SiteError(f"layer {layer} in site {name!r} is out of range: the model has {arch.n_layers} layers "
                            f"(0..{arch.n_layers - 1})")
        return Site(name, out_proj_path(arch, layer, module_names), "input", layer, (layer, 1))
    match = _BLOCK_RE.match(name)
    if match:
        layer, hook = int(match.group(1)), match.group(2)
        if not 0 <= layer < arch.n_layers:
            raise SiteError(
                f"layer {layer} in site {name!r} is out of range: the model has {arch.n_layers} layers "
                f"(0..{arch.n_layers - 1})"
            )
        if hook not in _BLOCK_HOOKS:
            raise SiteError(f"unknown hook {hook!r} in site {name!r}; block hooks are {list(_BLOCK_HOOKS)}")
        slot = _BLOCK_HOOKS.index(hook)
        if hook == "hook_resid_pre":
            return Site(name, arch.layer_path(layer), "input", layer, (layer, slot))
        if hook == "hook_resid_post":
            return Site(name, arch.layer_path(layer), "output", layer, (layer, slot))
        child = arch.attn_path(layer) if hook == "hook_attn_out" else arch.mlp_path(layer)
        return Site(name, child, "output", layer, (layer, slot))
    path, kind = (name[: -len(INPUT_SUFFIX)], "input") if name.endswith(INPUT_SUFFIX) else (name, "output")
    if path in module_names:
        stream = "vision" if _in_vision(path, arch) else "text"
        return Site(name, path, kind, None, (arch.n_layers + 1, 0), stream=stream)
    raise SiteError(f"unknown site {name!r}; {_valid_hint(arch)}")
