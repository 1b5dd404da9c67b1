"""Activation patching (the ground truth) and attribution patching (its one-backward estimate).

    pairs = make_ioi_pairs(16, tokenizer=model.tokenizer)            # clean, corrupt, answer, wrong
    exact = activation_patching(model, pairs, site_types=("resid", "attn", "mlp"))
    atp = attribution_patching(model, pairs, method="atp")           # or method="ig", steps=5
    patching_agreement(exact, atp)                                   # rank correlation per site type

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
import inspect
import json
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
from workbench.core.sites import head_shape
from workbench.core.trace import trace
from workbench.io.checkpoint import UnitCheckpoint
from workbench.io.provenance import jsonable

SITE_TYPES = ("resid", "attn", "mlp", "head")
METRICS = ("logit_diff", "prob", "logprob")
METHODS = ("exact", "atp", "ig")
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


def _check_blocks(layers, n_blocks: int) -> list[int]:
    """Block indices 0..n_blocks-1 (None = all; negative from the end): the units' ``layer``."""
    if layers is None:
        return list(range(n_blocks))
    vals = [layers] if isinstance(layers, int) else list(layers) if isinstance(layers, (list, tuple, range)) else None
    allowed = f"layers are block indices 0..{n_blocks - 1} (negative from the end), or None for all"
    if not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals):
        raise ValueError(f"layers {layers!r} invalid: {allowed}")
    bad = [int(v) for v in vals if not -n_blocks <= v < n_blocks]
    if bad:
        raise ValueError(f"layers {bad} out of range: {allowed}")
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


def last_logits(model: Model, enc: Mapping, **kwargs) -> torch.Tensor:
    """Logits at the last position of ``model.hf(**enc, **kwargs)``; the head runs on that position alone when the
    model supports it (``logits_to_keep``)."""
    return model.hf(**enc, **kwargs, **last_position_only(model)).logits[:, -1]


def last_position_only(model: Model) -> dict:
    """The forward keyword that makes the head run on the last position alone, where the model takes it."""
    return {"logits_to_keep": 1} if _keeps_logits(model.hf) else {}


def _keeps_logits(hf) -> bool:
    return "logits_to_keep" in inspect.signature(type(hf).forward).parameters


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

        def edit_for(site):
            src, mask = clean[site], masks[site]
            return lambda t: torch.where(mask.to(t.device), src.to(t.device, t.dtype), t)

        with trace(model, edits={s: edit_for(s) for s in masks}):
            m = fn(last_logits(model, _repeat(p.corrupt, n)), p.answer, p.wrong).float().cpu()
        scores += (m[1:] - m[0]).tolist()
    return scores, clean_m, corrupt_m


def _attribution_pair(model: Model, p: Pair, units: list[tuple], fn, method: str, steps: int):
    sites = sorted({site_of(st, layer) for st, layer, _, _ in units})
    with torch.no_grad(), trace(model, [*sites, "hook_embed"]) as tr:
        clean_m = float(fn(last_logits(model, p.clean), p.answer, p.wrong)[0])
    clean = {s: tr[s] for s in [*sites, "hook_embed"]}
    n = 1 if method == "atp" else steps
    alphas = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    leaf: list[torch.Tensor] = []

    def embed(t: torch.Tensor) -> torch.Tensor:
        if method == "ig":  # corrupt -> clean, at the embedding output
            a = alphas.to(t.device, t.dtype)[:, None, None]
            t = t + a * (clean["hook_embed"].to(t.device, t.dtype) - t)
        x = t.detach().requires_grad_(True)
        leaf.append(x)
        return x

    with torch.enable_grad(), trace(model, sites, edits={"hook_embed": embed}, grads=True) as tg:
        m = fn(last_logits(model, _repeat(p.corrupt, n)), p.answer, p.wrong)
        torch.autograd.grad(m.sum(), leaf)
    if method == "atp":
        corrupt_m = float(m[0].detach())
        corrupt = {s: tg[s] for s in sites}
    else:
        with torch.no_grad(), trace(model, sites) as tc:
            corrupt_m = float(fn(last_logits(model, p.corrupt), p.answer, p.wrong)[0])
        corrupt = {s: tc[s] for s in sites}
    scores = []
    grads = {s: tg.grad(s).float().mean(0) for s in sites}  # [T, d]: averaged over the IG steps
    diffs = {s: (clean[s][0] - corrupt[s][0]).float() for s in sites}
    for st, layer, head, pos in units:
        s = site_of(st, layer)
        sl = _slice(model, head)
        scores.append(float((diffs[s][pos, sl] * grads[s][pos, sl]).sum()))
    return scores, clean_m, corrupt_m


def _run(model: Model, pairs, method: str, *, site_types, layers, positions, metric, batch_size: int, steps: int,
         checkpoint, progress: bool) -> PatchingResult:
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    fn = metric_fn(metric)
    types = _check_site_types(site_types)
    layer_list = _check_blocks(layers, model.n_layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    checked = check_pairs(model, pairs)
    plans = [_units(model, types, layer_list, _check_positions(positions, len(p.tokens), i))
             for i, p in enumerate(checked)]
    config = {"method": method, "site_types": types, "layers": layer_list, "positions": positions,
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
                        layers=None, positions: str | int | Sequence[int] = "all", metric: str | Callable = "logit_diff",
                        batch_size: int = 32, checkpoint: str | os.PathLike | None = None,
                        progress: bool = True) -> PatchingResult:
    """Exact patching, clean into corrupt, of every unit (site type x block x position [x head]); see the module
    docstring. layers: block indices 0..L-1 (None = all). positions: "all" or ints (negative from the end).
    checkpoint: a folder keeping each finished pair; a rerun of the same sweep resumes with identical results."""
    return _run(model, pairs, "exact", site_types=site_types, layers=layers, positions=positions, metric=metric,
                batch_size=batch_size, steps=1, checkpoint=checkpoint, progress=progress)


def attribution_patching(model: Model, pairs, *, method: str = "atp",
                         site_types: Sequence[str] | str = ("resid", "attn", "mlp"), layers=None,
                         positions: str | int | Sequence[int] = "all", metric: str | Callable = "logit_diff",
                         steps: int = 5, checkpoint: str | os.PathLike | None = None,
                         progress: bool = True) -> PatchingResult:
    """Attribution patching (``method="atp"``) or its integrated-gradients variant (``"ig"``, ``steps`` points) of
    the same units as :func:`activation_patching`, whose scores it estimates."""
    if method not in ("atp", "ig"):
        raise ValueError(f"attribution method must be 'atp' or 'ig', got {method!r}")
    return _run(model, pairs, method, site_types=site_types, layers=layers, positions=positions, metric=metric,
                batch_size=1, steps=steps, checkpoint=checkpoint, progress=progress)


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
                             "site_types, layers and positions")
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
