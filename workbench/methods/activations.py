"""The activation engine: batches of prompts (or already-encoded inputs) run once, and everything read from them.

One forward per batch gives the residual at chosen layers and positions (the last real token, a fixed position, or
the mean over listed positions), the model's next-token logits and, kept as a :class:`PrefixCache`, the key/value
cache of every input token, so that later work runs no prompt again:

- :meth:`PrefixCache.last_token`: last-token residuals ``{layer: [n, d]}`` in input order;
- :meth:`PrefixCache.step`: the last token recomputed under edits (steering, a patch) on the cache of the tokens
  before it (a key/value entry depends on earlier tokens only, so the cache cut by one position is exactly the
  cache of the input without its last token), with captures at any sites and greedy tokens generated on;
- :meth:`PrefixCache.generate`: greedy tokens from the unedited cache.

    cache = PrefixCache.build(model, prompts)                                 # length-batched text prompts
    cache = PrefixCache.build(model, batches=[(index, vqa_inputs(...)), ...])   # encoded (e.g. VLM) batches
    feats = cache.last_token([0, 10, 30])
    for b in cache.batches:
        out = cache.step(b, edits={"blocks.9.hook_resid_post": edit}, sites=[layer_site(30)], generate=4)

:func:`forward_batches` is the pass behind it (also without a cache: the forward then stops after the deepest
requested site), :func:`last_token` the plain last-token read of any sites. Layers are hidden-state layers as
:func:`workbench.core.sites.check_layers` defines them (0 = the embedding output, l = the output of block l-1).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import DynamicCache

from workbench.core.sites import check_layers, layer_site
from workbench.core.trace import Edit, trace

PositionSpec = Literal["last"] | int | Sequence[Sequence[int]]
Batch = tuple[np.ndarray, dict]  # (indices of the batch's inputs, its left-padded encoding)

# Families whose positions the model derives itself from the whole input (3-D M-RoPE): a last-token step on a cache
# would need their rope deltas, so they take a whole forward instead of a step.
FULL_FORWARD_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


# -- forward keywords ------------------------------------------------------------------------------------------------
def last_position_only(model) -> dict:
    """The forward keyword that makes the head run on the last position alone, where the model takes it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(model.hf).forward).parameters else {}


def last_logits(model, enc: Mapping, **kwargs) -> torch.Tensor:
    """Logits at the last position of ``model.hf(**enc, **kwargs)``; the head runs on that position alone when the
    model supports it (``logits_to_keep``)."""
    return model.hf(**enc, **kwargs, **last_position_only(model)).logits[:, -1]


def can_step(model, enc: Mapping) -> bool:
    """Whether the last token of ``enc`` can be recomputed on a cache of the others (not for M-RoPE VLMs, not for
    one-token inputs)."""
    return model.arch.family not in FULL_FORWARD_FAMILIES and enc["input_ids"].shape[1] > 1


def last_step_inputs(enc: Mapping) -> dict:
    """The forward inputs of the last token alone, continuing a cache of the tokens before it."""
    step = {"input_ids": enc["input_ids"][:, -1:], "attention_mask": enc["attention_mask"]}
    if "position_ids" in enc:
        step["position_ids"] = enc["position_ids"][:, -1:]
    return step


# -- batching ----------------------------------------------------------------------------------------------------------
def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def length_batches(model, prompts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Indices of ``prompts`` in batches of similar token length (shortest first); every index exactly once.

    Left padding makes results independent of the batch (tests check it), so grouping by length only saves the
    compute spent on padding: about 40 % on the counting prompts.
    """
    _check_batch_size(batch_size)
    lengths = [len(ids) for ids in model.tokenizer(list(prompts))["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def text_batches(model, prompts: Sequence[str], batch_size: int = 64, *, by_length: bool = True) -> Iterator[Batch]:
    """``(indices, model.encode(...))`` per batch of ``prompts``: grouped by token length (``by_length``) or in the
    order given. Checked at once, encoded lazily."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    _check_batch_size(batch_size)
    index = (length_batches(model, prompts, batch_size) if by_length else
             [np.arange(s, min(s + batch_size, len(prompts))) for s in range(0, len(prompts), batch_size)])
    return ((idx, model.encode([prompts[i] for i in idx])) for idx in index)


def position_lists(positions, n: int) -> list[list[int]] | None:
    """A position spec checked: None for "last"; else one non-empty list of ints per input."""
    if isinstance(positions, str):
        if positions != "last":
            raise ValueError(f"positions must be 'last', an int, or one list of token positions per prompt; "
                             f"got {positions!r}")
        return None
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        return [[int(positions)]] * n
    if not isinstance(positions, Sequence) or len(positions) != n:
        got = len(positions) if isinstance(positions, Sequence) else type(positions).__name__
        raise ValueError(f"positions must be 'last', an int, or one list of token positions per prompt ({n} lists); "
                         f"got {got}")
    out = []
    for i, p in enumerate(positions):
        plist = [p] if isinstance(p, (int, np.integer)) and not isinstance(p, bool) else p
        if (not isinstance(plist, (Sequence, np.ndarray)) or len(plist) == 0
                or not all(isinstance(q, (int, np.integer)) and not isinstance(q, bool) for q in plist)):
            raise ValueError(f"positions[{i}] must be a non-empty list of int token positions, got {p!r}")
        out.append([int(q) for q in plist])
    return out


# -- the forward pass --------------------------------------------------------------------------------------------------
@dataclass
class BatchActivations:
    """What one forward of a batch gave: ``values[name][key]`` [B, d] per position spec and layer (or site), in the
    model's dtype and on the site's device; ``logits`` [B, vocab] the model's next-token logits (when asked for or
    with a cache); ``cache`` the key/value cache of every input token (or None)."""

    index: np.ndarray
    enc: dict
    values: dict[str, dict]
    logits: torch.Tensor | None
    cache: object | None


def forward_batches(model, batches: Iterable[Batch], sites: Mapping, positions: Mapping[str, PositionSpec],
                    *, n: int | None = None, keep_cache: bool = False, logits: bool = False
                    ) -> Iterator[BatchActivations]:
    """One forward per batch, capturing ``sites`` (``{key: site name}``) at the positions of each spec.

    batches: ``(indices, encoding)`` pairs (:func:`text_batches`, or encoded multimodal batches). positions: ``{name:
    "last" | int | one list of positions per input}`` (lists index the unpadded input; their values are averaged);
    ``n`` (the number of inputs, default the length of a list spec) checks the lists. The forward stops after the deepest site unless the cache
    (``keep_cache``) or the logits (``logits``) are kept. Runs lazily, one batch at a time.
    """
    if not isinstance(positions, Mapping) or not positions:
        raise ValueError("positions must be a non-empty dict {name: position spec}")
    if not sites:
        raise ValueError("give at least one site to read")
    specs = {}
    for name, spec in positions.items():
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            specs[name] = int(spec)  # the same position in every input
        elif isinstance(spec, str):
            specs[name] = position_lists(spec, 0)
        else:
            specs[name] = position_lists(spec, n if n is not None else len(spec) if isinstance(spec, Sequence) else 0)
    return _forward_iter(model, batches, dict(sites), specs, keep_cache, logits)


@torch.no_grad()
def _forward_iter(model, batches, sites, specs, keep_cache, want_logits):
    for batch, enc in batches:
        batch = np.asarray(batch)
        lengths = enc["attention_mask"].sum(-1).cpu()
        T = enc["input_ids"].shape[1]
        # One index tensor for all specs: each spec's positions (padded with a duplicate, masked) side by side.
        index_parts, masks = [], {}
        col = 0
        for name, plists in specs.items():
            if plists is None:
                index_parts.append(torch.full((len(batch), 1), T - 1, dtype=torch.long))
                masks[name] = (col, None)
                col += 1
                continue
            rows = [[plists]] * len(batch) if isinstance(plists, int) else [plists[i] for i in batch]
            k = max(len(r) for r in rows)
            index = torch.empty(len(batch), k, dtype=torch.long)
            mask = torch.zeros(len(batch), k, dtype=torch.bool)
            for b, r in enumerate(rows):
                Lb = int(lengths[b])
                pos = [q + Lb if q < 0 else q for q in r]
                if any(not 0 <= q < Lb for q in pos):
                    raise ValueError(f"input {int(batch[b])}: positions {r} fall outside its {Lb} tokens "
                                     f"(0..{Lb - 1})")
                pos = pos + [pos[0]] * (k - len(pos))  # pad with a duplicate, masked out below
                index[b] = torch.tensor(pos) + (T - Lb)
                mask[b, : len(r)] = True
            index_parts.append(index)
            masks[name] = (col, mask)
            col += k
        index = torch.cat(index_parts, dim=1)
        cache, logits = None, None
        with trace(model, list(dict.fromkeys(sites.values())), positions=index.to(enc["input_ids"].device),
                   stop=not (keep_cache or want_logits)) as tr:
            if keep_cache:
                cache = DynamicCache(config=model.hf.config)
                cache.activate_past_recording()  # sliding-window layers keep every position, so crop() can cut one
                logits = last_logits(model, enc, past_key_values=cache, use_cache=True)
            elif want_logits:
                logits = last_logits(model, enc)
            else:
                model.hf(**enc)
        values: dict[str, dict] = {name: {} for name in specs}
        for key, site in sites.items():
            h = tr[site]  # [B, K, d]
            for name, (c0, mask) in masks.items():
                if mask is None:
                    values[name][key] = h[:, c0]
                else:
                    part = h[:, c0 : c0 + mask.shape[1]]
                    m = mask[..., None].to(h.device, h.dtype)
                    values[name][key] = (part * m).sum(1) / m.sum(1)
        yield BatchActivations(batch, enc, values, logits, cache)


def _layer_sites(model, layers) -> dict[int, str]:
    return {layer: layer_site(layer) for layer in check_layers(layers, model.n_layers)}


def _gather(parts: Iterable[tuple[np.ndarray, torch.Tensor]]) -> torch.Tensor:
    """Rows of each batch, float32 on the CPU, put back in input order (the batches' indices must cover 0..n-1
    exactly once)."""
    parts = list(parts)
    n = sum(len(index) for index, _ in parts)
    seen = np.sort(np.concatenate([np.asarray(index) for index, _ in parts]))
    if not np.array_equal(seen, np.arange(n)):
        raise ValueError(f"the batches' indices must cover 0..{n - 1} exactly once")
    out = None
    for index, value in parts:
        value = value.to("cpu", torch.float32).reshape(len(index), -1)
        if out is None:
            out = torch.empty(n, value.shape[-1])
        out[torch.as_tensor(index)] = value
    return out


def _batches_of(model, inputs, batches, batch_size, by_length) -> tuple[Iterable[Batch], int | None]:
    """The batches to run and the number of inputs (None for encoded batches: known once they have run)."""
    if (inputs is None) == (batches is None):
        raise ValueError("give either prompts or encoded batches, not both")
    if inputs is not None:
        if isinstance(inputs, str):
            inputs = [inputs]
        return text_batches(model, inputs, batch_size, by_length=by_length), len(inputs)
    return batches, None


@torch.no_grad()
def features(model, prompts: Sequence[str] | None = None, layers=None, positions: Mapping[str, PositionSpec] | None
             = None, *, batches: Iterable[Batch] | None = None, batch_size: int = 64, by_length: bool = True
             ) -> dict[str, dict[int, torch.Tensor]]:
    """Residual features ``{name: {layer: [n, d_model]}}`` (float32, CPU, input order) of ``prompts`` (or of encoded
    ``batches``) at hidden-state ``layers`` for each position spec; one forward per batch, stopped after the deepest
    layer. The features of probes (:mod:`workbench.methods.probes.features`)."""
    positions = {"last": "last"} if positions is None else positions
    batches, n = _batches_of(model, prompts, batches, batch_size, by_length)
    sites = _layer_sites(model, layers)
    parts = {name: {layer: [] for layer in sites} for name in positions}
    for ba in forward_batches(model, batches, sites, positions, n=n):
        for name, by_layer in ba.values.items():
            for layer, value in by_layer.items():
                parts[name][layer].append((ba.index, value))
    return {name: {layer: _gather(p) for layer, p in by_layer.items()} for name, by_layer in parts.items()}


@torch.no_grad()
def last_token(model, prompts: Sequence[str] | None = None, *, layers=None, sites: Sequence[str] | None = None,
               batches: Iterable[Batch] | None = None, batch_size: int = 64, by_length: bool = True) -> dict:
    """Last-token activations ``{layer: [n, d]}`` at hidden-state ``layers`` (or ``{site: [n, d]}`` at any ``sites``),
    float32 on the CPU in input order, of ``prompts`` or of encoded ``batches`` (e.g. VLM inputs). The forward stops
    after the deepest one."""
    if sites is not None and layers is not None:
        raise ValueError("give layers or sites, not both")
    keyed = ({s: s for s in ([sites] if isinstance(sites, str) else list(sites))} if sites is not None
             else _layer_sites(model, layers))
    batches, n = _batches_of(model, prompts, batches, batch_size, by_length)
    parts = {key: [] for key in keyed}
    for ba in forward_batches(model, batches, keyed, {"last": "last"}, n=n):
        for key, value in ba.values["last"].items():
            parts[key].append((ba.index, value))
    return {key: _gather(p) for key, p in parts.items()}


# -- the prefix cache ------------------------------------------------------------------------------------------------
@dataclass
class CachedBatch:
    """One batch of a :class:`PrefixCache`: its indices and encoding, the key/value cache of every input token, the
    last token's residual at each cached layer (``last[layer]`` [B, d], model dtype and device) and the model's
    next-token logits [B, vocab]."""

    index: np.ndarray
    enc: dict
    cache: object
    last: dict[int, torch.Tensor]
    logits: torch.Tensor

    def residuals(self, layers: Sequence[int]) -> torch.Tensor:
        """[len(layers), B, d] last-token residuals of this batch."""
        return torch.stack([self.last[layer] for layer in layers])


@dataclass
class Step:
    """One last-token step of a cached batch: ``captures[site]`` [B, d] at the last position, the model's logits
    [B, vocab] there, and the greedy tokens generated on (``tokens`` [B, <= n], on the CPU; None when none)."""

    captures: dict[str, torch.Tensor]
    logits: torch.Tensor
    tokens: torch.Tensor | None


@dataclass
class PrefixCache:
    """Inputs run once through a model and kept, so that many readings and edited steps share one forward pass.

    Per batch (:class:`CachedBatch`): the encoding, the key/value cache of every input token, the last token's
    residual at ``layers`` and the model's next-token logits. ``features`` holds the extra position specs asked for
    at build time (e.g. the mean over entity mentions), float32 on the CPU, rows in input order. ``inputs`` are the
    prompts (None when built from encoded batches).
    """

    model: object
    inputs: list | None
    n: int
    layers: list[int]
    batches: list[CachedBatch]
    features: dict[str, dict[int, torch.Tensor]]

    @classmethod
    @torch.no_grad()
    def build(cls, model, prompts: Sequence[str] | None = None, *, batches: Iterable[Batch] | None = None,
              layers=None, positions: Mapping[str, PositionSpec] | None = None, batch_size: int = 64,
              by_length: bool = True) -> PrefixCache:
        """Run ``prompts`` (length-batched, or in order with ``by_length=False``) or encoded ``batches`` once.

        layers: the hidden-state layers whose last-token residual is kept (default all). positions: extra
        ``{name: position spec}`` read at ``layers`` into :attr:`features`; ``"last"`` is reserved.
        """
        extra = dict(positions or {})
        if "last" in extra:
            raise ValueError("'last' is reserved for the last-token residuals; name the position spec differently")
        batches, n = _batches_of(model, prompts, batches, batch_size, by_length)
        sites = _layer_sites(model, layers)
        cached, parts = [], {name: {layer: [] for layer in sites} for name in extra}
        for ba in forward_batches(model, batches, sites, {"last": "last"} | extra, n=n, keep_cache=True):
            cached.append(CachedBatch(index=ba.index, enc=ba.enc, cache=ba.cache, last=ba.values["last"],
                                      logits=ba.logits))
            for name in extra:
                for layer in sites:
                    parts[name][layer].append((ba.index, ba.values[name][layer]))
        if not cached:
            raise ValueError("batches is empty: give at least one (indices, encoding) batch")
        n = sum(len(b.index) for b in cached)
        _gather((b.index, b.logits[:, :1]) for b in cached)  # checks the indices cover 0..n-1 once
        feats = {name: {layer: _gather(p) for layer, p in by_layer.items()} for name, by_layer in parts.items()}
        inputs = None if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
        return cls(model=model, inputs=inputs, n=n, layers=list(sites), batches=cached, features=feats)

    @property
    def prompts(self) -> list | None:
        return self.inputs

    def last_token(self, layers=None) -> dict[int, torch.Tensor]:
        """{layer: [n, d]} last-token residuals (float32, CPU), rows in input order."""
        layer_list = self.layers if layers is None else check_layers(layers, self.model.n_layers)
        missing = [v for v in layer_list if v not in self.layers]
        if missing:
            raise ValueError(f"layers {missing} were not cached; this cache holds {self.layers}")
        return {layer: _gather((b.index, b.last[layer]) for b in self.batches) for layer in layer_list}

    def logits(self) -> torch.Tensor:
        """[n, vocab] the model's next-token logits (float32, CPU), rows in input order."""
        return _gather((b.index, b.logits) for b in self.batches)

    def prefix(self, b: CachedBatch):
        """A copy of ``b``'s cache cut by one position: the cache of its inputs without their last token."""
        kv = copy.deepcopy(b.cache)
        kv.crop(-1)
        return kv

    @torch.no_grad()
    def step(self, b: CachedBatch, *, edits: Mapping[str, Edit] | None = None, sites: Sequence[str] = (),
             generate: int = 0, first_logits: Callable[[dict, torch.Tensor], torch.Tensor] | None = None,
             decided: Callable[[list[str]], list[bool]] | None = None) -> Step:
        """Recompute the last token of batch ``b`` under ``edits`` on its prefix cache, capturing ``sites`` there;
        then (``generate`` > 0) generate that many greedy tokens under the same edits. ``first_logits(captures,
        logits)`` chooses the logits the first token is taken from (default: the model's)."""
        kv = self.prefix(b)
        sites = list(sites)
        hooked = trace(self.model, sites, positions=-1, edits=edits) if sites or edits else contextlib.nullcontext()
        with hooked as tr:
            logits = last_logits(self.model, last_step_inputs(b.enc), past_key_values=kv, use_cache=True)
            caps = {site: tr.captures(site)[0] for site in sites}
            tokens = None
            if generate:
                first = logits if first_logits is None else first_logits(caps, logits)
                tokens = greedy(self.model, first, kv, b.enc, generate, decided=decided)
        return Step(caps, logits, tokens)

    @torch.no_grad()
    def generate(self, b: CachedBatch, n_tokens: int, *, first_logits: torch.Tensor | None = None,
                 decided: Callable[[list[str]], list[bool]] | None = None) -> torch.Tensor:
        """Greedy tokens [B, <= n_tokens] (CPU) continuing batch ``b`` from a copy of its cache, the first one from
        ``first_logits`` (default: the model's next-token logits)."""
        first = b.logits if first_logits is None else first_logits
        return greedy(self.model, first, copy.deepcopy(b.cache), b.enc, n_tokens, decided=decided)


# -- greedy generation -------------------------------------------------------------------------------------------------
def eos_ids(model) -> list[int]:
    """The model's end-of-sequence token ids (generation config, else the tokenizer's)."""
    eos = getattr(model.hf.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])


@torch.no_grad()
def greedy(model, first_logits: torch.Tensor, kv, enc: Mapping[str, torch.Tensor], n_tokens: int, *,
           decided: Callable[[list[str]], list[bool]] | None = None) -> torch.Tensor:
    """Greedy continuation [B, <= n_tokens] (CPU) from the next-token logits of the inputs and their key/value cache
    ``kv`` (extended in place).

    Argmax at every step, no sampling, penalties or other processors. A row that emits an end-of-sequence token is
    padded from then on (as ``generate`` does); the loop ends early once every row has emitted one or is
    ``decided`` (a callable on the decoded texts so far, e.g. "a digit run closed by a non-digit").
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    pad = model.tokenizer.pad_token_id
    eos = torch.tensor(eos_ids(model), dtype=torch.long, device=first_logits.device)
    tok = first_logits.argmax(-1)
    done = torch.isin(tok, eos)
    out = [tok]
    mask = enc["attention_mask"]
    pos = enc["position_ids"][:, -1:] if "position_ids" in enc else None
    for _ in range(1, n_tokens):
        stop = done
        if decided is not None:
            texts = model.tokenizer.batch_decode(torch.stack(out, 1), skip_special_tokens=True)
            stop = done | torch.tensor([bool(d) for d in decided(texts)], device=done.device)
        if bool(stop.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step = {"input_ids": tok[:, None], "attention_mask": mask}
        if pos is not None:
            pos = pos + 1
            step["position_ids"] = pos
        logits = last_logits(model, step, past_key_values=kv, use_cache=True)
        tok = torch.where(done, torch.full_like(tok, pad), logits.argmax(-1))
        done = done | torch.isin(tok, eos)
        out.append(tok)
    return torch.stack(out, 1).cpu()
