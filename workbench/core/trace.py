"""The hook primitive: one context manager that captures and edits tensors at named sites.

    with workbench.core.trace(model, ["blocks.3.hook_resid_post"], positions=-1) as tr:
        model.hf(**batch)
    h = tr["blocks.3.hook_resid_post"]          # [batch, d_model]

Any forward pass run inside the block is traced: ``model.hf(...)``, ``model.hf.generate(...)``, a training step.
Hooks are installed on entry and removed on exit, also when the forward raises; only the handles this trace
installed are removed (hooks of other libraries are never touched). :func:`active_hooks` is the ledger of every
hook the workbench holds right now.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workbench.core.arch import ArchMap, resolve_arch
from workbench.core.sites import Site, resolve_site

Edit = Callable[[torch.Tensor], torch.Tensor]
Positions = None | int | Sequence[int] | slice | torch.Tensor


class StopForward(Exception):
    """Raised inside the forward once every requested site of a ``stop=True`` trace has fired; swallowed by that
    trace alone (``trace_id``), so an outer trace's stop passes through an inner trace's block."""

    def __init__(self, site: str, trace_id: int | None = None):
        super().__init__(site)
        self.site, self.trace_id = site, trace_id


@dataclass(frozen=True)
class HookRecord:
    trace_id: int
    site: str
    module: str
    kind: str  # "output" (forward hook), "input" (forward pre-hook) or "grad" (a tensor hook of grads=True)


_LEDGER: dict[int, HookRecord] = {}  # RemovableHandle.id -> record
_TRACE_IDS = itertools.count()


def active_hooks() -> list[HookRecord]:
    """Every hook the workbench has installed and not yet removed (empty outside a ``trace`` block)."""
    return list(_LEDGER.values())


def _unwrap(model) -> tuple[nn.Module, ArchMap]:
    hf = getattr(model, "hf", None)
    arch = getattr(model, "arch", None)
    if isinstance(hf, nn.Module) and isinstance(arch, ArchMap):
        return hf, arch
    if isinstance(model, nn.Module):
        return model, resolve_arch(model)
    raise TypeError(f"trace needs a workbench Model or a Hugging Face model, got {type(model).__name__}")


def _check_positions(positions: Positions) -> None:
    if positions is None or isinstance(positions, (int, slice)):
        return
    if isinstance(positions, torch.Tensor):
        if positions.dtype not in (torch.int64, torch.int32) or positions.ndim not in (1, 2):
            raise ValueError(
                f"positions tensor must be integer with shape [batch] or [batch, k], got {positions.dtype} "
                f"{tuple(positions.shape)}"
            )
        return
    if isinstance(positions, Sequence) and positions and all(isinstance(p, int) for p in positions):
        return
    raise ValueError(
        f"positions must be None (all), an int, a non-empty list of ints, a slice or an index tensor; got {positions!r}"
    )


def select_positions(t: torch.Tensor, positions: Positions) -> torch.Tensor:
    """Index the sequence dimension (dim 1) of ``t``; an int drops the dimension, like numpy."""
    if positions is None:
        return t
    if t.ndim < 2:
        raise ValueError(f"cannot select positions of a tensor of shape {tuple(t.shape)}: it has no sequence dim")
    if isinstance(positions, torch.Tensor):
        idx = positions.to(t.device, torch.long)
        rows = torch.arange(t.shape[0], device=t.device)
        if idx.ndim == 1:
            return t[rows, idx]
        return t[rows[:, None], idx]
    if isinstance(positions, (int, slice)):
        return t[:, positions]
    return t[:, list(positions)]


def _own_copy(sel: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``sel`` (a selection of ``full``) in memory of its own when it still shares ``full``'s storage: a view would
    keep every position of the activation alive (and could see the model write into it later). ``detach()`` of a
    view is not marked as a view, so the storages are compared, not ``_base``."""
    if sel.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
        return sel.clone(memory_format=torch.contiguous_format)
    return sel


def _first_key(value: Mapping, field: str | None):
    """The key a site reads in a ModelOutput (or dict): ``field``, else the first entry (``last_hidden_state``)."""
    return field if field is not None else next(iter(value), None)


def _first_tensor(value, site: str, field: str | None = None) -> torch.Tensor:
    if field is None and isinstance(value, torch.Tensor):
        return value
    if field is None and isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping):  # transformers' ModelOutput (e.g. a vision tower's BaseModelOutputWithPooling)
        t = value.get(_first_key(value, field))
        if isinstance(t, torch.Tensor):
            return t
    want = f"a ModelOutput with a tensor {field!r}" if field else "a tensor, a tuple of them or a ModelOutput"
    raise TypeError(f"site {site!r}: module returned {type(value).__name__}, expected {want}")


def _replace_first(value, new: torch.Tensor, field: str | None = None):
    if field is None and isinstance(value, torch.Tensor):
        return new
    if isinstance(value, Mapping):
        value[_first_key(value, field)] = new  # a ModelOutput made by this very call: updating it in place is safe
        return value
    return (new, *value[1:])


class Trace:
    """Context manager returned by :func:`trace`. Read captures with ``tr[site]`` after the forward."""

    def __init__(
        self,
        model,
        sites: str | Iterable[str] = (),
        *,
        edits: Mapping[str, Edit] | None = None,
        positions: Positions = None,
        detach: bool = True,
        stop: bool = False,
        grads: bool = False,
    ):
        hf, arch = _unwrap(model)
        site_list = [sites] if isinstance(sites, str) else list(sites)
        edits = dict(edits or {})
        if not site_list and not edits:
            raise ValueError("trace needs at least one site to capture or edit")
        for name, fn in edits.items():
            if not callable(fn):
                raise TypeError(f"edit for site {name!r} must be callable (tensor -> tensor), got {type(fn).__name__}")
        _check_positions(positions)
        module_names = {name for name, _ in hf.named_modules()}
        # Resolve every name before installing anything: a bad name raises with nothing hooked.
        self._capture = {name: resolve_site(name, arch, module_names) for name in site_list}
        self._edit_sites = {name: resolve_site(name, arch, module_names) for name in edits}
        self._edits = edits
        self._hf, self.arch = hf, arch
        self.positions, self.detach, self.stop, self.want_grads = positions, detach, stop, bool(grads)
        if grads and stop:
            raise ValueError("grads=True needs the whole forward (the metric is computed at the end); drop stop=True")
        self._records: dict[str, list[torch.Tensor]] = {name: [] for name in site_list}
        self._grads: dict[str, list[torch.Tensor]] = {name: [] for name in site_list}
        self._handles: list = []
        self._fired: set[str] = set()
        self.id = next(_TRACE_IDS)

    # -- reading ------------------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self._capture)

    def __getitem__(self, site: str) -> torch.Tensor:
        """The capture of ``site`` from the most recent forward pass."""
        if site not in self._records:
            raise KeyError(f"site {site!r} was not captured by this trace; captured: {list(self._records)}")
        calls = self._records[site]
        if not calls:
            raise KeyError(f"site {site!r} did not fire: no forward pass through it ran inside the trace")
        return calls[-1]

    def grad(self, site: str) -> torch.Tensor:
        """The gradient reaching ``site`` in the most recent backward pass (``grads=True``), positions selected like
        the capture. Backward passes run inside the block; each adds one entry (see :meth:`grads`)."""
        received = self.grads(site)
        if not received:
            raise KeyError(f"no gradient reached site {site!r}: run a backward pass (metric.backward() or "
                           "torch.autograd.grad) inside the trace block, from a metric that depends on the site")
        return received[-1]

    def grads(self, site: str) -> list[torch.Tensor]:
        """Every gradient of ``site`` received so far, in the order the backward passes ran."""
        if not self.want_grads:
            raise KeyError("this trace was made without grads=True: it records no gradients")
        if site not in self._grads:
            raise KeyError(f"site {site!r} was not captured by this trace; captured: {list(self._grads)}")
        return list(self._grads[site])

    def captures(self, site: str) -> list[torch.Tensor]:
        """All captures of ``site``, one per forward call (e.g. one per generated token)."""
        if site not in self._records:
            raise KeyError(f"site {site!r} was not captured by this trace; captured: {list(self._records)}")
        return list(self._records[site])

    # -- hooking ------------------------------------------------------------------------------------------------
    def _process(self, site_name: str, t: torch.Tensor) -> torch.Tensor:
        if site_name in self._edits:
            new = self._edits[site_name](t)
            if not isinstance(new, torch.Tensor) or new.shape != t.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"edit for site {site_name!r} must return a tensor of shape {tuple(t.shape)}, got {got}")
            t = new
        if site_name in self._capture:
            # Vision-tower sites have no token sequence dimension: positions select only in the text stream.
            text = self._capture[site_name].stream == "text"
            sel = select_positions(t, self.positions) if text else t
            if self.detach:
                sel = _own_copy(sel.detach(), t)
            self._records[site_name].append(sel)
            if self.want_grads:
                self._hook_grad(site_name, t, text)
        return t

    def _hook_grad(self, site_name: str, t: torch.Tensor, text: bool) -> None:
        if not t.requires_grad:
            raise RuntimeError(
                f"trace(grads=True): the activation at {site_name!r} does not require grad. Run the forward under "
                "torch.enable_grad() with parameters (or an earlier site, e.g. an edit of 'hook_embed' returning "
                "t.detach().requires_grad_()) that require grad"
            )

        def keep(g: torch.Tensor) -> None:
            self._grads[site_name].append(_own_copy(select_positions(g, self.positions).detach(), g) if text
                                          else g.detach())

        handle = t.register_hook(keep)
        self._handles.append(handle)
        _LEDGER[handle.id] = HookRecord(self.id, site_name, "<tensor>", "grad")

    def _after(self, site_name: str) -> None:
        if self.stop:
            self._fired.add(site_name)
            if self._fired >= self._wanted:
                self._fired.clear()
                raise StopForward(site_name, self.id)

    def _make_output_hook(self, site_names: list[str], field: str | None):
        def hook(module, args, output):
            t = _first_tensor(output, site_names[0], field)
            original = t
            for name in site_names:
                t = self._process(name, t)
            for name in site_names:
                self._after(name)
            return None if t is original else _replace_first(output, t, field)

        return hook

    def _make_input_hook(self, site_names: list[str]):
        def hook(module, args, kwargs):
            if args:
                t = args[0]
            elif "hidden_states" in kwargs:
                t = kwargs["hidden_states"]
            else:
                raise TypeError(f"site {site_names[0]!r}: module was called without a positional or hidden_states input")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"site {site_names[0]!r}: input is {type(t).__name__}, not a tensor")
            original = t
            for name in site_names:
                t = self._process(name, t)
            for name in site_names:
                self._after(name)
            if t is original:
                return None
            if args:
                return (t, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": t}

        return hook

    def __enter__(self) -> Trace:
        groups: dict[tuple[str, str, str | None], list[str]] = {}
        all_sites: dict[str, Site] = {**self._edit_sites, **self._capture}
        # Edits run before captures at the same module, so a capture sees the edited value.
        ordered = sorted(all_sites.values(), key=lambda s: s.name not in self._edits)
        for site in ordered:
            groups.setdefault((site.module, site.kind, site.field), []).append(site.name)
        self._wanted = set(all_sites)
        self._fired.clear()
        try:
            for (path, kind, field), names in groups.items():
                module = self._hf.get_submodule(path) if path else self._hf
                if kind == "output":
                    handle = module.register_forward_hook(self._make_output_hook(names, field))
                else:
                    handle = module.register_forward_pre_hook(self._make_input_hook(names), with_kwargs=True)
                self._handles.append(handle)
                for name in names:
                    _LEDGER[handle.id] = HookRecord(self.id, name, path, kind)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
            _LEDGER.pop(handle.id, None)
        self._handles.clear()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._remove()
        return isinstance(exc, StopForward) and exc.trace_id == self.id


def trace(
    model,
    sites: str | Iterable[str] = (),
    *,
    edits: Mapping[str, Edit] | None = None,
    positions: Positions = None,
    detach: bool = True,
    stop: bool = False,
    grads: bool = False,
) -> Trace:
    """Capture (``sites``) and/or edit (``edits``: site -> function) tensors during forward passes in the block.

    positions: keep only these sequence positions of each capture (None = all; ``-1`` = the last token, which is
        the last real token under left padding; an index tensor [batch] or [batch, k] picks per row). Vision-tower
        sites of a VLM (``vision.*``, ``projector.hook_out``) are always captured whole.
    detach: store detached copies (default) or keep the autograd graph.
    stop: abort the forward right after every requested site has fired, so reading layer k runs only layers
        0..k. The abort is swallowed at the end of the ``with`` block; statements after the forward inside the
        block do not run, so read the captures after it.
    grads: also record the gradient reaching each captured site when a backward pass runs inside the block
        (``tr.grad(site)``; tensor hooks, removed on exit like the module hooks). The forward must build a graph
        (``torch.enable_grad()``; an activation that does not require grad raises).
    Edits get the full tensor and return one of the same shape; captures at an edited site see the edited value.
    """
    return Trace(model, sites, edits=edits, positions=positions, detach=detach, stop=stop, grads=grads)


# -- edit helpers -----------------------------------------------------------------------------------------------
def seq_index(positions: Positions):
    if positions is None:
        return slice(None)
    if isinstance(positions, (int, slice)):
        return positions
    if isinstance(positions, torch.Tensor):
        raise ValueError("edit helpers take int, list or slice positions")
    return list(positions)


def add_direction(direction: torch.Tensor, alpha: float = 1.0, positions: Positions = None) -> Edit:
    """Edit that adds ``alpha * direction`` (shape [d_model]) to the chosen positions."""
    index = seq_index(positions)

    def edit(t: torch.Tensor) -> torch.Tensor:
        if direction.shape != t.shape[-1:]:
            raise ValueError(f"direction has shape {tuple(direction.shape)}, the site has width {t.shape[-1]}")
        out = t.clone()
        out[:, index] += alpha * direction.to(t.device, t.dtype)
        return out

    return edit


def replace_with(value: torch.Tensor, positions: Positions = None) -> Edit:
    """Edit that overwrites the chosen positions with ``value`` (broadcast to their shape)."""
    index = seq_index(positions)

    def edit(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out[:, index] = value.to(t.device, t.dtype)
        return out

    return edit


def patch_from(source: Trace, site: str, positions: Positions = None) -> Edit:
    """Edit that writes ``source[site]`` (a capture from another run, taken with the same positions) in place."""
    return replace_with(source[site], positions)
