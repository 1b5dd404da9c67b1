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
``ln_final.hook_normalized``     output of the final norm (HF hidden_states[-1])                 output
``<dotted.module.path>``         output of any module of the Hugging Face model                  output
``<dotted.module.path>:input``   first input of any module                                       input
===============================  ==========================================================  =======

Note: HF's last ``hidden_states`` entry already has the final norm applied, so ``blocks.{L-1}.hook_resid_post``
equals ``hidden_states[L]`` only before that norm; ``ln_final.hook_normalized`` equals ``hidden_states[L]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.arch import ArchMap

_BLOCK_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(\w+)$")
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


def layer_site(layer: int) -> str:
    """Site of hidden-state layer ``layer`` (HF ``hidden_states`` numbering): 0 -> ``blocks.0.hook_resid_pre``
    (the embedding output), l -> ``blocks.{l-1}.hook_resid_post`` (before the final norm)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise SiteError(f"layer must be a non-negative int (0 = embeddings), got {layer!r}")
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


def site_names(arch: ArchMap) -> list[str]:
    """Every named (non-raw) site of a model, in forward order."""
    names = ["hook_embed"]
    for i in range(arch.n_layers):
        names += [f"blocks.{i}.{h}" for h in _BLOCK_HOOKS]
    names.append("ln_final.hook_normalized")
    return names


def _valid_hint(arch: ArchMap) -> str:
    return (
        f"valid sites: 'hook_embed', 'blocks.{{i}}.{{{'|'.join(_BLOCK_HOOKS)}}}' with 0 <= i < {arch.n_layers}, "
        "'ln_final.hook_normalized', or a dotted module path of the model (append ':input' for its input)"
    )


def resolve_site(name: str, arch: ArchMap, module_names: set[str]) -> Site:
    """Map a site name onto a module and hook kind, or raise :class:`SiteError` listing what is valid."""
    if not isinstance(name, str) or not name:
        raise SiteError(f"site must be a non-empty string, got {name!r}; {_valid_hint(arch)}")
    if name == "hook_embed":
        return Site(name, arch.embed, "output", None, (-1, 0))
    if name == "ln_final.hook_normalized":
        return Site(name, arch.final_norm, "output", None, (arch.n_layers, 0))
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
        return Site(name, path, kind, None, (arch.n_layers + 1, 0))
    raise SiteError(f"unknown site {name!r}; {_valid_hint(arch)}")
