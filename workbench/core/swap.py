"""Module replacement: put other modules at dotted paths of a model for the duration of a block.

    with swap_modules(model, {"lm_head": repaired_head, "model.layers.3": other_layer}):
        model.hf(**batch)

The originals are restored in ``finally``, also when the forward raises (the pattern of tuned-lens's
``assign_key_path``). Paths are checked before anything is swapped; an unknown path raises and names it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from torch import nn


def _parent_and_name(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    return parent, name


@contextlib.contextmanager
def swap_modules(model, replacements: Mapping[str, nn.Module]) -> Iterator[None]:
    """Replace each ``path -> module`` inside ``model.hf`` (or a bare ``nn.Module``) while the block runs."""
    root = model.hf if hasattr(model, "hf") else model
    if not replacements:
        raise ValueError("swap_modules needs at least one path -> module replacement")
    known = {name for name, _ in root.named_modules()}
    bad = [p for p in replacements if p not in known or not p]
    if bad:
        raise ValueError(f"unknown module path(s) {bad}; paths are dotted names from model.hf.named_modules()")
    for path, module in replacements.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"replacement for {path!r} must be an nn.Module, got {type(module).__name__}")
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, module in replacements.items():
            parent, name = _parent_and_name(root, path)
            originals.append((parent, name, getattr(parent, name) if not name.isdigit() else parent[int(name)]))
            if name.isdigit():
                parent[int(name)] = module
            else:
                setattr(parent, name, module)
        yield
    finally:
        for parent, name, original in reversed(originals):
            if name.isdigit():
                parent[int(name)] = original
            else:
                setattr(parent, name, original)
