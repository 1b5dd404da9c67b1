"""Activation patching (the ground truth) and attribution patching (its one-backward estimate): one engine each.

    pairs = make_ioi_pairs(16, tokenizer=model.tokenizer)            # clean, corrupt, answer, wrong
    exact = activation_patching(model, pairs, site_types=("resid", "attn", "mlp"), blocks=None)
    atp = attribution_patching(model, pairs, method="atp")           # or method="ig", steps=5
    patching_agreement(exact, atp)                                   # rank correlation per site type
    residual_patching(model, clean, corrupt, answer_ids, wrong_ids, model.encode, layers=None)   # last position

:func:`residual_patching` patches the residual at the last position of inputs of any length (prompts, VQA items),
one hidden-state layer at a time (``layers=``, :func:`workbench.core.sites.check_layers`): the same exact patch, run
on a prefix cache (:class:`workbench.methods.activations.PrefixCache`: only the last token is recomputed), and the
same AtP estimate. The units of :func:`activation_patching` are chosen by block (``blocks=``): a ``resid`` unit of
block l is the residual entering it, hidden-state layer l.

Both patch *clean into corrupt* ("denoising"): the score of a unit (a site type, a layer, a position and, for heads,
a head) is the change of the metric on the corrupt prompt when that unit takes its value from the clean prompt.

- **Exact**: one forward per unit, run as batches of copies of the corrupt prompt in which every row patches a
  different unit (``batch_size`` rows per forward).
- **AtP** (Nanda 2023; Syed et al., arXiv 2310.10348): ``(a_clean - a_corrupt) . d metric / d a`` at the corrupt
  run, for every unit at once: one clean forward, one corrupt forward + backward.
- **IG** (EAP-IG, Hanna et al., arXiv 2403.17806): the gradient averaged over ``steps`` inputs whose embeddings are
  interpolated from corrupt to clean (midpoints ``(k + 1/2) / steps``), times the same activation difference; the
  ``steps`` inputs run as one batch, one forward + one backward.

Units: ``resid`` = ``blocks.{l}.hook_resid_pre`` (the residual entering block l), ``attn`` / ``mlp`` = the block's
attention / MLP output, ``head`` = one head's slice of ``blocks.{l}.attn.hook_z`` (its output before the output
projection). Metrics at the last position: ``logit_diff`` = logit(answer) - logit(wrong), ``prob`` = p(answer),
``logprob`` = log p(answer). ``recovery`` = score / (metric(clean) - metric(corrupt)): 1 = the unit alone restores the
clean behaviour.

Gradients come from the same :func:`workbench.core.trace.trace` primitive (``grads=True``: tensor hooks removed on
exit, also when the forward raises); no parameter gradient is ever accumulated (``torch.autograd.grad`` with respect
to the embedding output only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from workbench.core.models import Model
from workbench.core.sites import check_layers, head_shape, layer_site
from workbench.core.trace import Edit, trace
from workbench.io.checkpoint import UnitCheckpoint
from workbench.io.provenance import jsonable
from workbench.methods.activations import PrefixCache, can_step, forward_batches, last_logits

SITE_TYPES = ("resid", "attn", "mlp", "head")
METRICS = ("logit_diff", "prob", "logprob")
METHODS = ("exact", "atp", "ig")
RESIDUAL_METHODS = ("exact", "atp")
PAIR_COLUMNS = ("clean", "corrupt", "answer", "wrong")
FRAME_COLUMNS = ["pair", "method", "site_type", "layer", "head", "position", "from_end", "token", "score", "recovery"]
_SITE = {"resid": "blocks.{}.hook_resid_pre", "attn": "blocks.{}.hook_attn_out", "mlp": "blocks.{}.hook_mlp_out",
         "head": "blocks.{}.attn.hook_z"}


def site_of(site_type: str, layer: int) -> str:
    """The trace site a unit of ``site_type`` at block ``layer`` patches."""
    return _SITE[site_type].format(layer)


@dataclass(frozen=True)
class Pair:
    """One checked prompt pair: token ids (1 x T each, same T) and the answer / wrong token ids."""

    clean: dict
    corrupt: dict
    answer: int
    wrong: int
    tokens: tuple[str, ...]  # the clean prompt's tokens, for labels


def _one_token(model: Model, text, what: str, i: int) -> int:
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        if not 0 <= int(text) < model.arch.vocab_size:
            raise ValueError(f"pair {i}: {what} id {text} out of range 0..{model.arch.vocab_size - 1}")
        return int(text)
    if not isinstance(text, str) or not text:
        raise ValueError(f"pair {i}: {what} must be a non-empty string (one token) or a token id, got {text!r}")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"pair {i}: {what} {text!r} is {len(ids)} tokens "
                         f"{model.tokenizer.convert_ids_to_tokens(ids)} for {model.name}; it must be one token")
    return ids[0]


def check_pairs(model: Model, pairs) -> list[Pair]:
    """Validate prompt pairs (a DataFrame or a sequence of mappings with clean, corrupt, answer, wrong) before any
    heavy work: every field present, answer and wrong one token each and different, clean and corrupt the same
    number of tokens (so positions line up)."""
    if isinstance(pairs, pd.DataFrame):
        missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
        if missing:
            raise ValueError(f"pairs frame lacks columns {missing}; it needs {list(PAIR_COLUMNS)}")
        records = pairs[list(PAIR_COLUMNS)].to_dict("records")
    elif isinstance(pairs, Sequence) and not isinstance(pairs, (str, bytes)):
        records = list(pairs)
        for i, r in enumerate(records):
            if not isinstance(r, Mapping) or any(c not in r for c in PAIR_COLUMNS):
                raise ValueError(f"pair {i} must be a mapping with keys {list(PAIR_COLUMNS)}, got {r!r}")
    else:
        raise ValueError(f"pairs must be a DataFrame or a list of dicts with {list(PAIR_COLUMNS)}, got "
                         f"{type(pairs).__name__}")
    if not records:
        raise ValueError("pairs is empty: give at least one clean/corrupt pair")
    out = []
    for i, r in enumerate(records):
        for key in ("clean", "corrupt"):
            if not isinstance(r[key], str) or not r[key]:
                raise ValueError(f"pair {i}: {key} must be a non-empty string, got {r[key]!r}")
        answer, wrong = _one_token(model, r["answer"], "answer", i), _one_token(model, r["wrong"], "wrong", i)
        if answer == wrong:
            raise ValueError(f"pair {i}: answer and wrong are the same token {r['answer']!r}")
        clean, corrupt = model.encode([r["clean"]]), model.encode([r["corrupt"]])
        if clean["input_ids"].shape != corrupt["input_ids"].shape:
            raise ValueError(
                f"pair {i}: clean is {clean['input_ids'].shape[1]} tokens and corrupt {corrupt['input_ids'].shape[1]};"
                f" patching needs prompts of the same length (clean={r['clean']!r}, corrupt={r['corrupt']!r})"
            )
        tokens = tuple(model.tokenizer.convert_ids_to_tokens(clean["input_ids"][0].tolist()))
        out.append(Pair(clean, corrupt, answer, wrong, tokens))
    return out


def metric_fn(metric: str | Callable) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    """logits [N, vocab] at the last position, answer id, wrong id -> metric [N] (differentiable)."""
    if callable(metric):
        return metric
    if metric == "logit_diff":
        return lambda lg, a, w: lg[:, a] - lg[:, w]
    if metric == "prob":
        return lambda lg, a, w: torch.softmax(lg.float(), -1)[:, a]
    if metric == "logprob":
        return lambda lg, a, w: torch.log_softmax(lg.float(), -1)[:, a]
    raise ValueError(f"metric must be one of {list(METRICS)} or a callable (logits, answer, wrong) -> [N]; got {metric!r}")


def _check_site_types(site_types) -> list[str]:
    types = [site_types] if isinstance(site_types, str) else list(site_types)
    bad = [t for t in types if t not in SITE_TYPES]
    if not types or bad:
        raise ValueError(f"site_types {bad or types} invalid: choose among {list(SITE_TYPES)}")
    return [t for t in SITE_TYPES if t in types]


def _check_positions(positions, T: int, i: int) -> list[int]:
    if positions == "all":
        return list(range(T))
    plist = [positions] if isinstance(positions, int) else list(positions) if isinstance(positions, (list, tuple)) else None
    if not plist or not all(isinstance(p, int) and not isinstance(p, bool) for p in plist):
        raise ValueError(f"positions must be 'all', an int or a non-empty list of ints; got {positions!r}")
    bad = [p for p in plist if not -T <= p < T]
    if bad:
        raise ValueError(f"positions {bad} fall outside pair {i}'s {T} tokens")
    return sorted({p % T for p in plist})


def _check_blocks(blocks, n_blocks: int) -> list[int]:
    """Block indices 0..n_blocks-1 (None = all; negative from the end): the units' block (frame column ``layer``)."""
    if blocks is None:
        return list(range(n_blocks))
    vals = [blocks] if isinstance(blocks, int) else list(blocks) if isinstance(blocks, (list, tuple, range)) else None
    allowed = f"blocks are block indices 0..{n_blocks - 1} (negative from the end), or None for all"
    if not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals):
        raise ValueError(f"blocks {blocks!r} invalid: {allowed}")
    bad = [int(v) for v in vals if not -n_blocks <= v < n_blocks]
    if bad:
        raise ValueError(f"blocks {bad} out of range: {allowed}")
    return sorted({int(v) % n_blocks for v in vals})


def _units(model: Model, site_types: list[str], layers: list[int], positions: list[int]) -> list[tuple]:
    n_heads = head_shape(model.hf.config)[0] if "head" in site_types else 0
    units = []
    for st in site_types:
        for layer in layers:
            for pos in positions:
                units += [(st, layer, h, pos) for h in range(n_heads)] if st == "head" else [(st, layer, -1, pos)]
    return units


def _slice(model: Model, head: int) -> slice:
    if head < 0:
        return slice(None)
    d_head = head_shape(model.hf.config)[1]
    return slice(head * d_head, (head + 1) * d_head)


def _repeat(enc: Mapping, n: int) -> dict:
    return {k: v.expand(n, *v.shape[1:]) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}


@dataclass
class PatchingResult:
    """Scores of one method over pairs x units, and each pair's clean/corrupt metric."""

    frame: pd.DataFrame  # FRAME_COLUMNS
    baselines: pd.DataFrame  # pair, clean_metric, corrupt_metric
    method: str
    metric: str
    seconds: float  # wall time of the whole run (forwards, backwards, bookkeeping)
    config: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.frame.copy()

    def mean_map(self, site_type: str) -> pd.DataFrame:
        """Mean recovery over pairs as a layer x position (from the end) table (heads: layer x head, summed over
        positions)."""
        f = self.frame[self.frame.site_type == site_type]
        if f.empty:
            raise ValueError(f"no {site_type!r} units in this result; it has {sorted(self.frame.site_type.unique())}")
        if site_type == "head":
            per = f.groupby(["pair", "layer", "head"], observed=True).recovery.sum().reset_index()
            return per.pivot_table(index="layer", columns="head", values="recovery", aggfunc="mean")
        return f.pivot_table(index="layer", columns="from_end", values="recovery", aggfunc="mean")


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=FRAME_COLUMNS)
    frame["site_type"] = pd.Categorical(frame["site_type"], categories=list(SITE_TYPES), ordered=True)
    return frame.sort_values(["pair", "site_type", "layer", "head", "position"], kind="stable").reset_index(drop=True)


def _rows(pair_idx: int, method: str, p: Pair, units: list[tuple], scores: Sequence[float], span: float) -> list[dict]:
    T = len(p.tokens)
    return [{"pair": pair_idx, "method": method, "site_type": st, "layer": layer, "head": head, "position": pos,
             "from_end": pos - T, "token": p.tokens[pos], "score": float(s),
             "recovery": float(s) / span if span != 0 else float("nan")}
            for (st, layer, head, pos), s in zip(units, scores, strict=True)]


# -- the two engines ------------------------------------------------------------------------------------------------
def _replace(src: torch.Tensor, mask: torch.Tensor) -> Edit:
    """The one patch: the entries where ``mask`` holds take ``src``'s values (both broadcast against the
    activation)."""
    return lambda t: torch.where(mask.to(t.device), src.to(t.device, t.dtype), t)


@torch.no_grad()
def _patched_logits(model: Model, corrupt, edits: Mapping[str, Edit]) -> torch.Tensor:
    """Exact patching: the last-position logits of the corrupt run under ``edits``. ``corrupt`` is an encoding (a
    whole forward) or ``(PrefixCache, CachedBatch)``: then only the last token is recomputed, on the cache of the
    others (the edits must touch the last position alone; patching it changes nothing before it)."""
    if isinstance(corrupt, tuple):
        cache, b = corrupt
        return cache.step(b, edits=edits).logits
    with trace(model, edits=dict(edits)):
        return last_logits(model, corrupt)


def _attribution(model: Model, clean: Mapping, corrupt: Mapping, sites: Sequence[str], metric: Callable, *,
                 method: str = "atp", steps: int = 1, positions=None):
    """Attribution patching: per site, the activation difference clean - corrupt and the gradient of ``metric``
    (logits at the last position [N, vocab] -> [N]) at the corrupt run (``"atp"``), or averaged over ``steps``
    inputs whose embeddings run from corrupt to clean (``"ig"``, one row per batch). One clean forward, one corrupt
    forward + backward; gradients through ``trace(grads=True)``. ``positions``: None (every position) or what
    ``trace`` takes (e.g. -1). Returns (clean metric [B], corrupt metric [B], {site: diff}, {site: grad}), float32."""
    sites = list(sites)
    with torch.no_grad(), trace(model, [*sites, "hook_embed"], positions=positions) as tr:
        clean_m = metric(last_logits(model, clean)).detach().float()
    src = {s: tr[s] for s in sites}
    embed_clean = tr["hook_embed"]
    n = 1 if method == "atp" else steps
    alphas = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    leaf: list[torch.Tensor] = []

    def embed(t: torch.Tensor) -> torch.Tensor:
        if method == "ig":  # corrupt -> clean, at the embedding output
            a = alphas.to(t.device, t.dtype)[:, None, None]
            t = t + a * (embed_clean.to(t.device, t.dtype) - t)
        x = t.detach().requires_grad_(True)
        leaf.append(x)
        return x

    run = corrupt if n == 1 else _repeat(corrupt, n)
    with torch.enable_grad(), trace(model, sites, positions=positions, edits={"hook_embed": embed}, grads=True) as tg:
        m = metric(last_logits(model, run))
        torch.autograd.grad(m.sum(), leaf, allow_unused=True)  # a VLM may call its embedding more than once
    if method == "atp":
        corrupt_m = m.detach().float()
        base = {s: tg[s] for s in sites}
    else:
        with torch.no_grad(), trace(model, sites, positions=positions) as tc:
            corrupt_m = metric(last_logits(model, corrupt)).detach().float()
        base = {s: tc[s] for s in sites}
    grads = {s: tg.grad(s).float() if n == 1 else tg.grad(s).float().mean(0, keepdim=True) for s in sites}
    diffs = {s: (src[s] - base[s]).float() for s in sites}
    return clean_m, corrupt_m, diffs, grads


# -- units of prompt pairs (activation_patching, attribution_patching) ----------------------------------------------
@torch.no_grad()
def _exact_pair(model: Model, p: Pair, units: list[tuple], fn, batch_size: int) -> tuple[list[float], float, float]:
    sites = sorted({site_of(st, layer) for st, layer, _, _ in units})
    with trace(model, sites) as tr:
        clean_m = float(fn(last_logits(model, p.clean), p.answer, p.wrong)[0])
    clean = {s: tr[s] for s in sites}
    corrupt_m = float(fn(last_logits(model, p.corrupt), p.answer, p.wrong)[0])
    scores: list[float] = []
    for start in range(0, len(units), batch_size):
        chunk = units[start : start + batch_size]
        n = len(chunk) + 1  # row 0 is left unpatched: the reference each row is compared with, in the same batch,
        masks: dict[str, torch.Tensor] = {}  # so a patch that changes nothing scores exactly 0
        for r, (st, layer, head, pos) in enumerate(chunk, start=1):
            site = site_of(st, layer)
            if site not in masks:
                masks[site] = torch.zeros((n, *clean[site].shape[1:]), dtype=torch.bool, device=model.device)
            masks[site][r, pos, _slice(model, head)] = True
        edits = {s: _replace(clean[s], mask) for s, mask in masks.items()}
        m = fn(_patched_logits(model, _repeat(p.corrupt, n), edits), p.answer, p.wrong).float().cpu()
        scores += (m[1:] - m[0]).tolist()
    return scores, clean_m, corrupt_m


def _attribution_pair(model: Model, p: Pair, units: list[tuple], fn, method: str, steps: int):
    sites = sorted({site_of(st, layer) for st, layer, _, _ in units})
    clean_m, corrupt_m, diffs, grads = _attribution(model, p.clean, p.corrupt, sites,
                                                    lambda z: fn(z, p.answer, p.wrong), method=method, steps=steps)
    scores = []
    for st, layer, head, pos in units:
        s = site_of(st, layer)
        sl = _slice(model, head)
        scores.append(float((diffs[s][0, pos, sl] * grads[s][0, pos, sl]).sum()))
    return scores, float(clean_m[0]), float(corrupt_m[0])


def _run(model: Model, pairs, method: str, *, site_types, blocks, positions, metric, batch_size: int, steps: int,
         checkpoint, progress: bool) -> PatchingResult:
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    fn = metric_fn(metric)
    types = _check_site_types(site_types)
    block_list = _check_blocks(blocks, model.n_layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    checked = check_pairs(model, pairs)
    plans = [_units(model, types, block_list, _check_positions(positions, len(p.tokens), i))
             for i, p in enumerate(checked)]
    config = {"method": method, "site_types": types, "blocks": block_list, "positions": positions,
              "metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "callable"),
              "steps": steps if method == "ig" else None}
    store = None
    if checkpoint:
        if callable(metric):
            raise ValueError("checkpoint needs a named metric (a callable cannot be checked on resume)")
        spec = {"config": jsonable(config), "weights": model.weights_hash,
                "pairs": hashlib.sha256(json.dumps([[p.clean["input_ids"].tolist(), p.corrupt["input_ids"].tolist(),
                                                     p.answer, p.wrong] for p in checked]).encode()).hexdigest()}
        store = UnitCheckpoint(Path(checkpoint), spec, kind="patching-checkpoint")
    rows: list[dict] = []
    base: list[dict] = []
    t0 = time.perf_counter()
    for i, (p, units) in enumerate(tqdm(list(zip(checked, plans, strict=True)), desc=f"patching ({method})",
                                        disable=not progress)):
        unit = store.load(f"pair-{i:05d}") if store is not None else None
        if unit is None:
            if method == "exact":
                scores, cm, xm = _exact_pair(model, p, units, fn, batch_size)
            else:
                scores, cm, xm = _attribution_pair(model, p, units, fn, method, steps)
            unit = {"scores": scores, "clean_metric": cm, "corrupt_metric": xm}
            if store is not None:
                store.save(f"pair-{i:05d}", unit)
        cm, xm = unit["clean_metric"], unit["corrupt_metric"]
        rows += _rows(i, method, p, units, unit["scores"], cm - xm)
        base.append({"pair": i, "clean_metric": cm, "corrupt_metric": xm})
    return PatchingResult(_frame(rows), pd.DataFrame(base), method, config["metric"], time.perf_counter() - t0, config)


def activation_patching(model: Model, pairs, *, site_types: Sequence[str] | str = ("resid", "attn", "mlp"),
                        blocks=None, positions: str | int | Sequence[int] = "all", metric: str | Callable = "logit_diff",
                        batch_size: int = 32, checkpoint: str | os.PathLike | None = None,
                        progress: bool = True) -> PatchingResult:
    """Exact patching, clean into corrupt, of every unit (site type x block x position [x head]); see the module
    docstring. blocks: block indices 0..L-1 (None = all; a ``resid`` unit of block l is hidden-state layer l, the
    residual entering block l). positions: "all" or ints (negative from the end).
    checkpoint: a folder keeping each finished pair; a rerun of the same sweep resumes with identical results."""
    return _run(model, pairs, "exact", site_types=site_types, blocks=blocks, positions=positions, metric=metric,
                batch_size=batch_size, steps=1, checkpoint=checkpoint, progress=progress)


def attribution_patching(model: Model, pairs, *, method: str = "atp",
                         site_types: Sequence[str] | str = ("resid", "attn", "mlp"), blocks=None,
                         positions: str | int | Sequence[int] = "all", metric: str | Callable = "logit_diff",
                         steps: int = 5, checkpoint: str | os.PathLike | None = None,
                         progress: bool = True) -> PatchingResult:
    """Attribution patching (``method="atp"``) or its integrated-gradients variant (``"ig"``, ``steps`` points) of
    the same units as :func:`activation_patching`, whose scores it estimates."""
    if method not in ("atp", "ig"):
        raise ValueError(f"attribution method must be 'atp' or 'ig', got {method!r}")
    return _run(model, pairs, method, site_types=site_types, blocks=blocks, positions=positions, metric=metric,
                batch_size=1, steps=steps, checkpoint=checkpoint, progress=progress)


# -- the residual at the last position of inputs of any length (the gap panel's patching) -----------------------------
def residual_patching(model: Model, clean: Sequence, corrupt: Sequence, answer_ids: Sequence[int],
                      wrong_ids: Sequence[int], encode: Callable[[Sequence], dict], *, layers=None,
                      method: str = "exact", batch_size: int = 16, prefix_cache: bool = True,
                      progress: bool = False) -> pd.DataFrame:
    """Patch the residual at the last position of each corrupt input, one hidden-state layer at a time, from its clean
    partner, and measure the logit difference ``answer - wrong`` at the last position.

    clean / corrupt: inputs (prompts, VQA items, ...) that ``encode`` turns into a left-padded batch for
    ``model.hf``; answer_ids: the clean run's answer per pair, wrong_ids: the corrupt run's. Left padding puts every
    input's last token at position -1, so the two inputs need not have the same length. layers: hidden-state layers
    (:func:`workbench.core.sites.check_layers`; None = all), patched at ``layer_site(l)``.
    method: "exact" (the patch of :func:`activation_patching`; on a prefix cache
    (:class:`~workbench.methods.activations.PrefixCache`) the last token alone is recomputed per layer, on the
    key/value cache of the others: patching the last position changes nothing before it) or "atp" (the estimate of
    :func:`attribution_patching`, ``(a_clean - a_corrupt) . d metric / d a`` from one forward and backward of the
    corrupt batch). prefix_cache=False runs the whole corrupt input per layer instead (the same numbers to float
    tolerance; M-RoPE VLMs always do).

    Returns one row per layer: index (hidden-state layer), patch_recovery = mean over pairs of (patched - corrupt)
    divided by the mean of (clean - corrupt), patch_method, n_pairs, clean_metric, corrupt_metric (means). At the
    last layer an exact patch reproduces the clean logits, so its recovery is 1.
    """
    if method not in RESIDUAL_METHODS:
        raise ValueError(f"method must be one of {list(RESIDUAL_METHODS)}, got {method!r}")
    n = len(clean)
    if not n or len(corrupt) != n or len(answer_ids) != n or len(wrong_ids) != n:
        raise ValueError(f"give as many corrupt inputs, answer ids and wrong ids as clean inputs ({n}, "
                         f"{len(corrupt)}, {len(answer_ids)}, {len(wrong_ids)}); at least one pair")
    if any(a == w for a, w in zip(answer_ids, wrong_ids)):
        raise ValueError("a pair has the same answer and wrong token: the logit difference would be 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    layer_list = check_layers(layers, model.n_layers)
    sites = {layer: layer_site(layer) for layer in layer_list}
    m_clean, m_corrupt = [], []
    m_patch = {v: [] for v in layer_list}
    for s in tqdm(range(0, n, batch_size), desc=f"residual patching ({method})", disable=not progress):
        cb, xb = encode(clean[s: s + batch_size]), encode(corrupt[s: s + batch_size])
        a = torch.tensor(answer_ids[s: s + batch_size])
        w = torch.tensor(wrong_ids[s: s + batch_size])

        def metric(z):
            rows = torch.arange(z.shape[0], device=z.device)
            z = z.float()
            return z[rows, a.to(z.device)] - z[rows, w.to(z.device)]

        if method == "exact":
            index = np.arange(len(a))
            ca = next(forward_batches(model, [(index, cb)], sites, {"last": "last"}, logits=True))
            mc, src = metric(ca.logits), ca.values["last"]
            if prefix_cache and can_step(model, xb):
                cache = PrefixCache.build(model, batches=[(index, xb)], layers=layer_list[-1:])
                corrupt_run, T = (cache, cache.batches[0]), 1  # the step sees the last position alone
                mx = metric(cache.batches[0].logits)
            else:
                corrupt_run, T = xb, xb["input_ids"].shape[1]
                with torch.no_grad():
                    mx = metric(last_logits(model, xb))
            mask = torch.zeros(len(a), T, 1, dtype=torch.bool)
            mask[:, -1] = True
            for v, site in sites.items():
                edit = _replace(src[v][:, None], mask)
                m_patch[v].append(metric(_patched_logits(model, corrupt_run, {site: edit})).cpu())
        else:
            mc, mx, diffs, grads = _attribution(model, cb, xb, list(sites.values()), metric, positions=-1)
            for v, site in sites.items():
                est = (diffs[site].to(grads[site].device) * grads[site]).sum(-1)
                m_patch[v].append((mx + est.to(mx.device)).cpu())
        m_clean.append(mc.cpu())
        m_corrupt.append(mx.cpu())
    mc, mx = torch.cat(m_clean).double(), torch.cat(m_corrupt).double()
    gap = float((mc - mx).mean())
    rows = []
    for v in layer_list:
        mp = torch.cat(m_patch[v]).double()
        rows.append({"index": v, "patch_recovery": float((mp - mx).mean()) / gap if gap != 0 else math.nan,
                     "patch_method": method, "n_pairs": n, "clean_metric": float(mc.mean()),
                     "corrupt_metric": float(mx.mean())})
    return pd.DataFrame(rows)


def patching_agreement(exact: PatchingResult, *estimates: PatchingResult, large: float = 0.1) -> pd.DataFrame:
    """Spearman and Pearson correlation of each estimate's scores with the exact scores, per site type and pooled,
    over every (pair, unit); plus the wall-time ratio exact / estimate and the top-10 overlap (the share of the 10
    units with the largest |exact| that are also among the estimate's 10 largest |score|, per pair, averaged; ties
    among the exact scores make it arbitrary). Most units change nothing, so the all-unit Spearman mostly ranks
    noise: ``spearman_large`` and ``n_large`` are over the units whose exact |recovery| is at least ``large``."""
    if exact.method != "exact":
        raise ValueError(f"the first result must be the exact sweep, got method {exact.method!r}")
    if not estimates:
        raise ValueError("give at least one attribution result to compare with the exact sweep")
    keys = ["pair", "site_type", "layer", "head", "position"]
    rows = []
    for est in estimates:
        if est.metric != exact.metric:
            raise ValueError(f"metrics differ: exact {exact.metric!r}, {est.method} {est.metric!r}")
        merged = exact.frame[keys + ["score", "recovery"]].merge(est.frame[keys + ["score"]], on=keys,
                                                                  suffixes=("_exact", "_est"))
        if len(merged) != len(exact.frame) or len(merged) != len(est.frame):
            raise ValueError(f"{est.method} covers other units than the exact sweep ({len(est.frame)} vs "
                             f"{len(exact.frame)} rows, {len(merged)} shared): run both with the same pairs, "
                             "site_types, blocks and positions")
        for st, g in [*merged.groupby("site_type", observed=True), ("all", merged)]:
            if len(g) < 3:
                continue
            overlap = []
            for _, gp in g.groupby("pair"):
                k = min(10, len(gp))
                top_e = set(gp["score_exact"].abs().nlargest(k).index)
                top_a = set(gp["score_est"].abs().nlargest(k).index)
                overlap.append(len(top_e & top_a) / k)
            big = g[g["recovery"].abs() >= large]
            rows.append({
                "method": est.method, "site_type": st, "n": len(g), "n_large": len(big),
                "spearman_large": float(big["score_exact"].corr(big["score_est"], method="spearman"))
                if len(big) >= 3 else float("nan"),
                "spearman": float(g["score_exact"].corr(g["score_est"], method="spearman")),
                "pearson": float(g["score_exact"].corr(g["score_est"], method="pearson")),
                "top10_overlap": float(np.mean(overlap)),
                "seconds": est.seconds, "exact_seconds": exact.seconds,
                "speedup": exact.seconds / est.seconds if est.seconds > 0 else float("nan"),
            })
    return pd.DataFrame(rows)
