"""The model made linear for one prompt: attention patterns and normalisation scales frozen, MLPs replaced.

    with frozen_model(model, ids, tcs) as fm:          # one recording forward of the real model
        fm.value_forward(batch=64)                     # the linear model's forward, graph kept, B rows
        ...

Freezing (Ameisen et al. 2025; circuit-tracer): for one prompt the recording forward runs the real model and keeps
every attention pattern (through a transformers attention function, :data:`FROZEN_ATTENTION`, registered with
``AttentionInterface``; the model's own eager attention computes the pattern, so softcapping, sliding windows and
GQA are the model's) and every RMS normalisation's scale ``1 / rms(x)`` (the norm modules are swapped for
:class:`FrozenNorm` while the context is open). Pinned, a layer's attention output is ``pattern @ V(x)``, a norm
is ``x * scale * gain``, and the MLP of layer l is ``x @ W_skip.T + c_l`` with ``c_l`` the constant
``acts @ W_dec + b_dec + error`` (the transcoder's features, its bias and its error at every position; a layer
without a transcoder is all error). The residual stream, every MLP input and the final norm's output are then an
affine function of the token embeddings, the feature activations, the errors and the biases; the recording values
are reproduced exactly (``check``: the pinned forward's logits equal the real model's).

Position 0 (BOS) has no feature nodes, as in circuit-tracer: its MLP output is all error (minus the bias and
skip), so nothing is lost from the sum.

Only RMS normalisation is supported (Llama, Mistral, Qwen 2/3, Gemma 2/3, SmolLM2): a norm whose output is not
``x / rms(x) * gain`` is refused by name when recorded. q/k norms inside attention are left alone: they only shape
the pattern, which is frozen.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from workbench.core.arch import ArchitectureError
from workbench.core.models import Model
from workbench.core.swap import swap_modules
from workbench.methods.circuits.transcoder import TranscoderSet

FROZEN_ATTENTION = "workbench_frozen"
_STATE: contextvars.ContextVar[_Freeze | None] = contextvars.ContextVar("workbench_frozen_state", default=None)


@dataclass
class _Freeze:
    mode: str = "record"  # "record": the real model, keeping patterns and scales; "pinned": the linear model
    patterns: dict = field(default_factory=dict)  # attention module -> [1, heads, T, S]
    scales: dict = field(default_factory=dict)  # norm module -> [1, T, 1] float32


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _frozen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, **kwargs):
    state = _STATE.get()
    if state is None:
        raise RuntimeError(f"attention implementation {FROZEN_ATTENTION!r} runs only inside frozen_model(...)")
    if state.mode == "record":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise ArchitectureError(f"{type(module).__name__} has no eager attention in its modeling file; the "
                                    "attention pattern cannot be recorded")
        out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs)
        state.patterns[module] = weights.detach()
        return out, weights
    weights = state.patterns[module]
    v = _repeat_kv(value, getattr(module, "num_key_value_groups", 1))
    out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, weights


AttentionInterface.register(FROZEN_ATTENTION, _frozen_attention)
AttentionMaskInterface.register(FROZEN_ATTENTION, eager_mask)


class FrozenNorm(nn.Module):
    """An RMS norm whose scale is recorded (``record``) and then held (``pinned``): ``x * scale * gain``."""

    def __init__(self, norm: nn.Module, name: str):
        super().__init__()
        self.norm, self.name = norm, name
        self.seen_in: Tensor | None = None  # pinned: what the last forward computed (graph kept)
        self.seen_out: Tensor | None = None
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if self.eps is None:
            raise ArchitectureError(f"norm {name} ({type(norm).__name__}) has no eps / variance_epsilon: only RMS "
                                    "norms can be frozen here")
        w = next(norm.parameters(), None)
        d = w.shape[-1] if w is not None else None
        if d is None:
            raise ArchitectureError(f"norm {name} ({type(norm).__name__}) has no weight: not an RMS norm with a gain")
        with torch.no_grad():  # the gain, read off the module: rms(ones) = 1
            ones = torch.ones(1, 1, d, dtype=torch.float32, device=w.device)
            self.gain = (norm(ones.to(w.dtype)).float() * math.sqrt(1 + self.eps)).reshape(d)

    def forward(self, x: Tensor) -> Tensor:
        state = _STATE.get()
        if state.mode == "record":
            y = self.norm(x)
            scale = torch.rsqrt(x.detach().float().pow(2).mean(-1, keepdim=True) + self.eps)
            mine = (x.detach().float() * scale) * self.gain
            if not torch.allclose(mine, y.detach().float(), rtol=1e-3, atol=1e-4 * float(mine.abs().max()) + 1e-6):
                raise ArchitectureError(f"norm {self.name} ({type(self.norm).__name__}) is not x / rms(x) * gain "
                                        f"(max deviation {float((mine - y.float()).abs().max()):.3g}); only RMS "
                                        "norms can be frozen")
            state.scales[self] = scale
            return y
        out = ((x.float() * state.scales[self]) * self.gain).to(x.dtype)
        self.seen_in, self.seen_out = x, out
        return out


class LinearMLP(nn.Module):
    """A layer's MLP: ``record`` runs it and keeps its input and output; ``pinned`` is ``skip(x) + const``."""

    def __init__(self, mlp: nn.Module, layer: int, tc=None):
        super().__init__()
        self.mlp, self.layer, self.tc = mlp, layer, tc
        self.x: Tensor | None = None  # recorded input [1, T, d]
        self.y: Tensor | None = None  # recorded output [1, T, d]
        self.const: Tensor | None = None  # pinned: [1 or B, T, d]
        self.seen_in: Tensor | None = None  # pinned: the input as computed (graph kept)
        self.seen_out: Tensor | None = None

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        state = _STATE.get()
        if state.mode == "record":
            y = self.mlp(x, *args, **kwargs)
            self.x, self.y = x.detach(), y.detach()
            return y
        out = self.const.to(x.dtype)
        if self.tc is not None and self.tc.W_skip is not None:
            out = out + (x.float() @ self.tc.W_skip.T).to(x.dtype)
        else:
            out = out + 0 * x[..., :1]  # keep the graph connected (grad zero): the layer's input is still a target
        self.seen_in, self.seen_out = x, out
        return out


def _norm_paths(hf: nn.Module, attn_name: str) -> list[str]:
    """Every RMS norm outside attention modules (q/k norms only shape the frozen pattern)."""
    out = []
    for name, mod in hf.named_modules():
        if "norm" in type(mod).__name__.lower() and not any(p == attn_name or p.endswith("_attn") or p == "attn"
                                                          for p in name.split(".")[:-1]):
            if not any(name.startswith(o + ".") for o in out):
                out.append(name)
    return out


@dataclass
class FrozenModel:
    """The recorded prompt and the pinned linear model (see the module docstring). ``ids``: [1, T]."""

    model: Model
    tcs: TranscoderSet | None
    ids: Tensor
    state: _Freeze
    mlps: list[LinearMLP]
    layer_outputs: list  # pinned: decoder layer outputs (graph kept)
    logits: Tensor  # the recording forward's logits [T, V] float32
    final_norm: FrozenNorm | None = None
    final_out: Tensor | None = None

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[1])

    def embeddings(self) -> Tensor:
        """Token embeddings as the model's embedding module returns them (Gemma's scaling included) [1, T, d]."""
        with torch.no_grad():
            return self.model.hf.get_input_embeddings()(self.ids.to(self.model.device)).float()

    def pinned_forward(self, embeds: Tensor, consts: list[Tensor]) -> None:
        """Run the linear model on ``embeds`` [B, T, d] with the MLP constants ``consts`` (one per layer,
        [1 or B, T, d]); the MLPs, layer outputs and the final norm keep what they computed (graph kept)."""
        for m, c in zip(self.mlps, consts):
            m.const = c
        self.layer_outputs.clear()
        token = _STATE.set(self.state)
        self.state.mode = "pinned"
        base = self.model.module(self.model.arch.layers.rpartition(".")[0]) if "." in self.model.arch.layers \
            else self.model.hf
        try:
            base(inputs_embeds=embeds.to(self.model.dtype), use_cache=False)
        finally:
            _STATE.reset(token)


def _layer_hook(store: list):
    def hook(module, args, output):
        store.append(output[0] if isinstance(output, tuple) else output)
    return hook


@contextlib.contextmanager
def frozen_model(model: Model, ids: Tensor, tcs: TranscoderSet | None) -> Iterator[FrozenModel]:
    """Record ``ids`` ([1, T] or [T]) on the real model and yield the :class:`FrozenModel`; the norms, MLPs and
    the attention implementation are restored on exit, also when something raises."""
    if model.arch.is_vlm:
        raise ArchitectureError("frozen_model takes a text model; for a VLM pass its language model")
    ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
    if ids.shape[0] != 1:
        raise ValueError(f"frozen_model records one prompt at a time, got ids of shape {tuple(ids.shape)}")
    if tcs is not None:
        tcs.check_fits(model)
    hf, arch = model.hf, model.arch
    state = _Freeze()
    mlps = [LinearMLP(model.module(arch.mlp_path(i)), i, tcs[i] if tcs is not None and i in tcs else None)
            for i in range(model.n_layers)]
    norms = {p: FrozenNorm(model.module(p), p) for p in _norm_paths(hf, arch.attn)}
    if arch.final_norm not in norms:
        raise ArchitectureError(f"the final norm {arch.final_norm} was not found among the norms {sorted(norms)}")
    swaps = {**{arch.mlp_path(i): m for i, m in enumerate(mlps)}, **norms}
    configs = [m.config for m in hf.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    configs = list({id(c): c for c in configs}.values())
    old_impl = [c._attn_implementation for c in configs]
    layer_outputs: list = []
    handles = []
    token = _STATE.set(state)
    try:
        for c in configs:
            c._attn_implementation = FROZEN_ATTENTION
        with swap_modules(model, swaps):
            for i in range(model.n_layers):
                handles.append(model.module(arch.layer_path(i)).register_forward_hook(_layer_hook(layer_outputs)))
            with torch.no_grad():
                logits = hf(input_ids=ids.to(model.device), use_cache=False).logits[0].float()
            if len(state.patterns) != model.n_layers:
                raise ArchitectureError(f"{len(state.patterns)} attention patterns recorded for {model.n_layers} "
                                        f"layers: {model.name}'s attention does not go through transformers' "
                                        "attention interface")
            layer_outputs.clear()
            _STATE.reset(token)
            token = None
            fm = FrozenModel(model, tcs, ids, state, mlps, layer_outputs, logits, norms[arch.final_norm])
            yield fm
    finally:
        for h in handles:
            h.remove()
        for c, impl in zip(configs, old_impl):
            c._attn_implementation = impl
        if token is not None:
            _STATE.reset(token)


__all__ = ["FROZEN_ATTENTION", "FrozenModel", "FrozenNorm", "LinearMLP", "frozen_model"]
