"""Checks of an attribution graph against the model itself (reported for every graph the study draws).

    v = validate_graph(model, graph, tcs)       # ValidationResult: exactness, ablations, pruned share, scores
    v.to_frame()

(a) **exactness**: on the frozen model (patterns, norm scales pinned, errors in), every computed row's direct
    effects plus biases reproduce its value (``AttributionGraph.check_exact``; 1e-4 relative).
(b) **interventions in the real model**: the top-N features by |predicted total effect| on a target are ablated one
    at a time in the real, unfrozen model (their decoder vector ``a * W_dec`` removed from their layer's MLP output
    at their position; attention, norms and every later MLP recompute); the measured change of the target is
    compared with the graph's prediction (minus the feature's signed total effect through the graph): Spearman,
    sign agreement, and the slope measured / predicted.
(c) **the pruned graph's share**: in the replacement model (every MLP a transcoder plus its clean error held fixed,
    features recomputed from their inputs, so it reproduces the clean run), only the pruned graph's features are
    allowed to fire; share = (target with those - target with no features) / (target with all - with none).
(d) :func:`graph_vs_patching`: per (layer, position), the graph's total effect of the MLP output (features + error)
    on a logit difference, against the exact activation-patching sweep of :mod:`workbench.methods.patching` of the
    same MLP outputs on the same prompts (Spearman of the magnitudes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn

from workbench.core.models import Model
from workbench.core.swap import swap_modules
from workbench.core.trace import trace
from workbench.methods.circuits.attribution import (
    AttributionError,
    AttributionGraph,
    PrunedGraph,
    Target,
    graph_scores,
    prune_graph,
    total_effects,
)
from workbench.methods.circuits.transcoder import TranscoderSet


def _site_name(model: Model, t: Target) -> str:
    if t.site == "final":
        return "ln_final.hook_normalized"
    if t.site == "resid":
        return f"blocks.{t.layer}.hook_resid_post"
    return f"{model.arch.mlp_path(t.layer)}:input"


def _read(model: Model, ids: Tensor, t: Target, edits: dict | None = None) -> Tensor:
    """The target's value for every row of ``ids`` [B, T] in the real model (with ``edits``)."""
    site = _site_name(model, t)
    with torch.no_grad(), trace(model, [site], edits=edits) as tr:
        model.hf(input_ids=ids.to(model.device))
    h = tr[site][:, t.pos % ids.shape[1]].float().cpu()
    return h @ t.vector.float() + t.bias


def target_weights_for(graph: AttributionGraph, target: int) -> Tensor:
    w = torch.zeros(graph.n_nodes)
    w[graph.target_start + target] = 1.0
    return w


def ablation_check(model: Model, graph: AttributionGraph, tcs: TranscoderSet, *, target: int = 0, top_n: int = 20,
                   batch_size: int = 16) -> pd.DataFrame:
    """(b): one row per ablated feature: predicted and measured change of ``graph.targets[target]``."""
    if not 0 <= target < graph.n_targets:
        raise AttributionError(f"target must be in 0..{graph.n_targets - 1}, got {target}")
    t = graph.targets[target]
    effects = total_effects(graph.adjacency, target_weights_for(graph, target))[: graph.n_features]
    top = torch.argsort(effects.abs(), descending=True)[: min(top_n, graph.n_features)].tolist()
    ids = torch.tensor([graph.input_ids])
    clean = float(_read(model, ids, t)[0])
    rows = []
    for s in range(0, len(top), batch_size):
        chunk = top[s: s + batch_size]
        B, T = len(chunk), graph.n_pos
        deltas: dict[int, Tensor] = {}
        for b, i in enumerate(chunk):
            layer, pos, feat = (int(v) for v in graph.features[i])
            vec = float(graph.activations[i]) * tcs[layer].W_dec[feat].detach().float().cpu()
            deltas.setdefault(layer, torch.zeros(B, T, model.d_model))[b, pos] = vec
        edits = {f"blocks.{layer}.hook_mlp_out": (lambda d: (lambda out: out - d.to(out.dtype).to(out.device)))(d)
                 for layer, d in deltas.items()}
        measured = _read(model, ids.expand(B, -1), t, edits) - clean
        for b, i in enumerate(chunk):
            layer, pos, feat = (int(v) for v in graph.features[i])
            rows.append({"node": i, "layer": layer, "pos": pos, "feature": feat,
                         "activation": float(graph.activations[i]), "predicted": -float(effects[i]),
                         "measured": float(measured[b]), "target": t.name})
    return pd.DataFrame(rows)


def ablation_summary(frame: pd.DataFrame) -> dict:
    if len(frame) < 3:
        return {"n": len(frame), "spearman": float("nan"), "spearman_p": float("nan"), "sign_agreement": float("nan"),
                "slope": float("nan")}
    rho, p = stats.spearmanr(frame["predicted"], frame["measured"])
    pred, meas = frame["predicted"].to_numpy(), frame["measured"].to_numpy()
    return {"n": len(frame), "spearman": float(rho), "spearman_p": float(p),
            "sign_agreement": float(np.mean(np.sign(pred) == np.sign(meas))),
            "slope": float((pred @ meas) / max(pred @ pred, 1e-30))}


class _KeepMLP(nn.Module):
    """A transcoder whose features may fire only where ``keep`` [T, F] allows, plus a fixed error [T, d]."""

    def __init__(self, tc, error: Tensor, keep: Tensor | None):
        super().__init__()
        self.tc, self.error, self.keep = tc, error, keep

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        acts = self.tc.encode(x.float())
        acts[:, 0] = 0  # position 0 is all error (as in the graph)
        if self.keep is not None:
            acts = acts * self.keep.to(acts.dtype)
        out = acts @ self.tc.W_dec + self.tc.b_dec + self.tc.skip(x.float()) + self.error.to(acts.dtype)
        return out.to(x.dtype)


@contextlib.contextmanager
def _replacement(model: Model, tcs: TranscoderSet, errors: Tensor, keep: dict[int, Tensor | None]) -> Iterator[None]:
    swaps = {model.arch.mlp_path(layer): _KeepMLP(tcs[layer], errors[layer], keep.get(layer))
             for layer in tcs.layers}
    with swap_modules(model, swaps):
        yield


def _clean_errors(model: Model, ids: Tensor, tcs: TranscoderSet) -> Tensor:
    sites = [f"{model.arch.mlp_path(i)}:input" for i in tcs.layers] + [f"blocks.{i}.hook_mlp_out" for i in tcs.layers]
    with torch.no_grad(), trace(model, sites) as tr:
        model.hf(input_ids=ids.to(model.device))
    errors = torch.zeros(model.n_layers, ids.shape[1], model.d_model)
    for i in tcs.layers:
        x, y = tr[f"{model.arch.mlp_path(i)}:input"][0].float(), tr[f"blocks.{i}.hook_mlp_out"][0].float()
        a = tcs[i].encode(x)
        a[0] = 0
        errors[i] = (y - (a @ tcs[i].W_dec + tcs[i].b_dec + tcs[i].skip(x))).cpu()
    return errors


def pruned_share(model: Model, graph: AttributionGraph, tcs: TranscoderSet, pruned: PrunedGraph, *,
                 target: int = 0) -> dict:
    """(c): the share of the target the pruned graph's features carry in the replacement model."""
    t = graph.targets[target]
    ids = torch.tensor([graph.input_ids])
    errors = _clean_errors(model, ids, tcs)
    kept = pruned.node_mask[: graph.n_features].numpy()
    keep = {i: torch.zeros(graph.n_pos, tcs[i].d_transcoder) for i in tcs.layers}
    for (layer, pos, feat), k in zip(graph.features, kept):
        if k:
            keep[int(layer)][int(pos), int(feat)] = 1
    none = {i: torch.zeros(graph.n_pos, tcs[i].d_transcoder) for i in tcs.layers}
    clean = float(_read(model, ids, t)[0])
    with _replacement(model, tcs, errors, {}):
        full = float(_read(model, ids, t)[0])
    with _replacement(model, tcs, errors, keep):
        part = float(_read(model, ids, t)[0])
    with _replacement(model, tcs, errors, none):
        zero = float(_read(model, ids, t)[0])
    den = full - zero
    return {"clean": clean, "replacement": full, "pruned_only": part, "no_features": zero,
            "pruned_share": (part - zero) / den if abs(den) > 1e-9 else float("nan"),
            "n_pruned_features": int(kept.sum()), "n_selected_features": graph.n_features}


@dataclass
class ValidationResult:
    graph: str
    max_rel_error: float
    ablation: pd.DataFrame
    ablation_stats: dict
    share: dict
    replacement_score: float
    completeness_score: float
    n_pruned_nodes: int
    n_pruned_edges: int
    extra: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"graph": self.graph, "max_rel_error": self.max_rel_error,
                              **{f"ablation_{k}": v for k, v in self.ablation_stats.items()},
                              **{k: v for k, v in self.share.items()},
                              "replacement_score": self.replacement_score,
                              "completeness_score": self.completeness_score,
                              "pruned_nodes": self.n_pruned_nodes, "pruned_edges": self.n_pruned_edges,
                              **self.extra}])


def validate_graph(model: Model, graph: AttributionGraph, tcs: TranscoderSet, *, target: int = 0, top_n: int = 20,
                   node_threshold: float = 0.8, edge_threshold: float = 0.98, name: str = "") -> ValidationResult:
    """(a)-(c) for ``graph`` (see the module docstring); (a) raises when the graph is not exact."""
    worst = graph.check_exact()
    abl = ablation_check(model, graph, tcs, target=target, top_n=top_n)
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    share = pruned_share(model, graph, tcs, pruned, target=target)
    rep, comp = graph_scores(graph)
    return ValidationResult(name or graph.prompt[:40], worst, abl, ablation_summary(abl), share, rep, comp,
                            pruned.n_nodes, pruned.n_edges)


def mlp_effects(graph: AttributionGraph, target: int = 0) -> pd.DataFrame:
    """Per (layer, position): the signed total effect of the MLP output (its features + its error node) on the
    target through the graph."""
    eff = total_effects(graph.adjacency, target_weights_for(graph, target))
    rows: dict[tuple[int, int], float] = {}
    for i in range(graph.n_features):
        layer, pos, _ = (int(v) for v in graph.features[i])
        rows[(layer, pos)] = rows.get((layer, pos), 0.0) + float(eff[i])
    for layer in range(graph.n_layers):
        for pos in range(graph.n_pos):
            i = graph.error_start + layer * graph.n_pos + pos
            rows[(layer, pos)] = rows.get((layer, pos), 0.0) + float(eff[i])
    return pd.DataFrame([{"layer": k[0], "position": k[1], "graph_effect": v} for k, v in sorted(rows.items())])


def graph_vs_patching(graphs: Sequence[AttributionGraph], patching_frame: pd.DataFrame, *, target: int = 0
                      ) -> tuple[pd.DataFrame, dict]:
    """(d): join each graph's per-(layer, position) MLP effect with the exact patching scores of the same pair
    (``patching_frame``: :func:`workbench.methods.patching.activation_patching`'s frame, site type ``mlp``, pair
    index = the graph's index); Spearman of |graph effect| with |patching score| over every (pair, layer,
    position), and per pair."""
    frames = []
    for k, g in enumerate(graphs):
        eff = mlp_effects(g, target)
        eff["pair"] = k
        frames.append(eff)
    eff = pd.concat(frames)
    pf = patching_frame[patching_frame["site_type"] == "mlp"][["pair", "layer", "position", "score"]]
    merged = eff.merge(pf, on=["pair", "layer", "position"])
    if len(merged) != len(pf):
        raise AttributionError(f"the graphs cover {len(eff)} (pair, layer, position) units and the patching sweep "
                               f"{len(pf)}; {len(merged)} shared: run both on the same prompts and positions")
    rho, p = stats.spearmanr(merged["graph_effect"].abs(), merged["score"].abs())
    per_pair = [stats.spearmanr(g["graph_effect"].abs(), g["score"].abs())[0] for _, g in merged.groupby("pair")]
    return merged, {"n": len(merged), "spearman_abs": float(rho), "spearman_p": float(p),
                    "spearman_abs_per_pair_mean": float(np.nanmean(per_pair)), "n_pairs": len(per_pair),
                    "spearman_signed": float(stats.spearmanr(merged["graph_effect"], merged["score"])[0])}
