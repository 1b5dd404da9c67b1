"""Attribution graphs on the Hugging Face modules: direct effects between transcoder features, errors and tokens
on the model made linear for one prompt (:mod:`workbench.methods.circuits.frozen`), towards any target.

    graph = attribute(model, "When Mary and John went to the store, John gave a drink to", tcs)
    graph.check_exact()                         # every row: sum of its direct effects + biases = its value
    pruned = prune_graph(graph)                 # node / edge influence thresholds (circuit-tracer's)
    replacement, completeness = graph_scores(graph)
    graph.to_frame()                            # nodes: kind, layer, position, feature, activation, influence

Rows (targets) and columns (sources) follow circuit-tracer (Ameisen et al. 2025): the adjacency ``A[target,
source]`` holds the direct effect of a source on a target through the linear model, i.e. through attention's
value path with frozen patterns, frozen norms and the transcoders' skip paths, but never through another
feature. Sources: a feature (layer l, position q, index i) with activation a contributes ``a * W_dec[i] . g``
where g is the gradient of the target at layer l's MLP output, position q; an error node ``err . g``; a token its
embedding ``e . g``. Targets: the top logits (cumulative probability 0.95, at most 10; the unembedding row minus
the mean row, read at the final norm's output), a logit difference, **any direction at any layer's residual
output and any position** (:func:`direction_target`), and every explored feature (its encoder row at its layer's
MLP input). Each backward pass injects ``batch_size`` targets at once (one per row of the batch).

Explored features are chosen as circuit-tracer does: after the target rows, by their influence on the targets
through the rows computed so far (recomputed every ``update_interval`` batches), up to ``max_feature_nodes``.

Every row also gets its value (the target read off the recording forward), the sum of the transcoder decoder
biases' direct effects (``bias``) and of the model's own biases (``constant``, from a forward of the linear model
with every source zero); ``check_exact`` asserts ``value = sum of all direct effects + bias + constant``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.models import Model
from workbench.methods.circuits.frozen import FrozenModel, frozen_model
from workbench.methods.circuits.transcoder import TranscoderSet

SITES = ("final", "resid", "mlp_in")


class AttributionError(ValueError):
    """Bad attribution arguments (targets, budgets, prompts)."""


@dataclass
class Target:
    """One target row: ``vector . tensor[pos]`` at ``site`` ("final": the final norm's output, where logits are
    read; "resid": decoder layer ``layer``'s output; "mlp_in": layer ``layer``'s MLP input)."""

    name: str
    site: str
    pos: int
    vector: Tensor
    layer: int = -1
    weight: float = 1.0  # its weight in influence (a logit's probability, as in circuit-tracer)
    token_id: int | None = None  # logit targets: the token
    bias: float = 0.0  # added to the value (a feature's encoder bias)

    def __post_init__(self):
        self.vector = torch.as_tensor(self.vector).detach().float().cpu().reshape(-1)
        if self.site not in SITES:
            raise AttributionError(f"target site must be one of {list(SITES)}, got {self.site!r}")


def _unembed_rows(model: Model) -> Tensor:
    return model.W_U.float()  # [vocab, d]


def logit_targets(model: Model, logits: Tensor, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                  tokens: Sequence[int] | None = None) -> list[Target]:
    """circuit-tracer's salient logits of the last position (or ``tokens``): unembedding row minus the mean row,
    weighted by the token's probability."""
    probs = torch.softmax(logits[-1].detach().float(), -1)
    if tokens is None:
        top_p, top_i = probs.topk(max_n_logits)
        cut = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob))) + 1
        tokens = top_i[:cut].tolist()
    W = _unembed_rows(model)
    mean = W.mean(0)
    out = []
    for t in tokens:
        if not 0 <= int(t) < W.shape[0]:
            raise AttributionError(f"token id {t} is outside the vocabulary (0..{W.shape[0] - 1})")
        label = model.tokenizer.decode([int(t)])
        out.append(Target(f"logit {label!r}", "final", -1, (W[int(t)] - mean).detach(), weight=float(probs[int(t)]),
                          token_id=int(t)))
    return out


def logit_diff_target(model: Model, good: int, bad: int, *, pos: int = -1) -> Target:
    """``logit(good) - logit(bad)`` at ``pos`` (before any final softcap)."""
    W = _unembed_rows(model)
    for t in (good, bad):
        if not 0 <= int(t) < W.shape[0]:
            raise AttributionError(f"token id {t} is outside the vocabulary (0..{W.shape[0] - 1})")
    name = f"logit {model.tokenizer.decode([int(good)])!r} - {model.tokenizer.decode([int(bad)])!r}"
    return Target(name, "final", pos, W[int(good)] - W[int(bad)], weight=1.0)


def direction_target(model: Model, layer: int, direction: Tensor, *, pos: int = -1, name: str = "") -> Target:
    """``direction . resid`` at decoder layer ``layer``'s output, position ``pos``: a probe's or a count's
    direction, anywhere (circuit-tracer's targets are fixed to the last position's logits)."""
    if not 0 <= layer < model.n_layers:
        raise AttributionError(f"layer must be in 0..{model.n_layers - 1}, got {layer}")
    direction = torch.as_tensor(direction, dtype=torch.float32).reshape(-1)
    if direction.shape[0] != model.d_model:
        raise AttributionError(f"direction has {direction.shape[0]} entries, {model.name}'s residual has "
                               f"{model.d_model}")
    return Target(name or f"direction @ L{layer}", "resid", pos, direction, layer=layer)


@dataclass
class AttributionConfig:
    max_feature_nodes: int = 2048  # feature rows explored (circuit-tracer's CLI default is 7,500)
    batch_size: int = 64  # targets per backward pass
    update_interval: int = 4  # re-rank the unexplored features every this many batches
    max_n_logits: int = 10
    desired_logit_prob: float = 0.95

    def validate(self) -> None:
        for name in ("max_feature_nodes", "batch_size", "update_interval", "max_n_logits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "max_feature_nodes" else 1):
                raise AttributionError(f"{name} must be a positive int, got {v!r}")
        if not 0 < self.desired_logit_prob <= 1:
            raise AttributionError(f"desired_logit_prob must be in (0, 1], got {self.desired_logit_prob!r}")


@dataclass
class AttributionGraph:
    """The graph of one prompt. Node order (rows and columns of ``adjacency``): the selected features, the error
    nodes (layer-major: ``layer * n_pos + pos``), the tokens, the targets."""

    model_name: str
    scan: str
    prompt: str
    input_ids: list[int]
    token_strings: list[str]
    n_layers: int
    features: np.ndarray  # [n_selected, 3]: layer, pos, feature index
    activations: np.ndarray  # [n_selected]
    targets: list[Target]
    adjacency: Tensor  # [N, N] float32, rows = targets of edges, columns = sources
    row_value: Tensor  # [N]: each computed row's value (NaN for rows not computed)
    row_bias: Tensor  # [N]: direct effect of the transcoders' decoder biases
    row_constant: Tensor  # [N]: the model's own biases (and a feature row's encoder bias)
    row_unselected: Tensor  # [N]: direct effects of active features that were not selected (not in adjacency)
    n_active: int  # active features in the prompt (selected or not)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def target_start(self) -> int:
        return self.token_start + self.n_pos

    def target_weights(self) -> Tensor:
        w = torch.zeros(self.n_nodes)
        w[self.target_start:] = torch.tensor([t.weight for t in self.targets], dtype=torch.float32)
        return w

    def computed_rows(self) -> Tensor:
        return torch.nonzero(~torch.isnan(self.row_value)).reshape(-1)

    def exactness(self) -> pd.DataFrame:
        """Per computed row: value, sum of direct effects (selected + unselected) + bias + constant, and the
        relative error against max(|value|, the row's largest |term|)."""
        rows = self.computed_rows()
        total = self.adjacency[rows].double().sum(1) + self.row_unselected[rows].double() + \
            self.row_bias[rows].double() + self.row_constant[rows].double()
        value = self.row_value[rows].double()
        scale = torch.maximum(value.abs(), self.adjacency[rows].abs().amax(1).double()).clamp_min(1e-6)
        return pd.DataFrame({"row": rows.numpy(), "name": [self.node_name(int(r)) for r in rows],
                             "value": value.numpy(), "sum": total.numpy(),
                             "rel_error": ((value - total).abs() / scale).numpy()})

    def check_exact(self, tol: float = 1e-4) -> float:
        """The largest relative error of any row; raises when it exceeds ``tol``."""
        frame = self.exactness()
        worst = float(frame["rel_error"].max())
        if not worst <= tol:
            bad = frame.sort_values("rel_error").iloc[-1]
            raise AttributionError(f"attribution is not exact: row {bad['name']} has value {bad['value']:.6g} but "
                                   f"its direct effects sum to {bad['sum']:.6g} (relative error {worst:.2e} > {tol})")
        return worst

    def node_kind(self, i: int) -> str:
        if i < self.error_start:
            return "feature"
        if i < self.token_start:
            return "error"
        if i < self.target_start:
            return "token"
        return "target"

    def node_name(self, i: int) -> str:
        kind = self.node_kind(i)
        if kind == "feature":
            layer, pos, feat = self.features[i]
            return f"L{layer}/F{feat}@{pos}"
        if kind == "error":
            layer, pos = divmod(i - self.error_start, self.n_pos)
            return f"err L{layer}@{pos}"
        if kind == "token":
            pos = i - self.token_start
            return f"tok {self.token_strings[pos]!r}@{pos}"
        return self.targets[i - self.target_start].name

    def node_layer_pos(self, i: int) -> tuple[int, int]:
        kind = self.node_kind(i)
        if kind == "feature":
            return int(self.features[i][0]), int(self.features[i][1])
        if kind == "error":
            layer, pos = divmod(i - self.error_start, self.n_pos)
            return layer, pos
        if kind == "token":
            return -1, i - self.token_start
        t = self.targets[i - self.target_start]
        return (self.n_layers if t.site == "final" else t.layer), (t.pos % self.n_pos)

    def to_frame(self) -> pd.DataFrame:
        """One row per node: id, kind, layer (-1 tokens, n_layers targets), position, feature, activation,
        influence on the targets (circuit-tracer's normalised influence)."""
        infl = node_influence(self.adjacency, self.target_weights()).numpy()
        rows = []
        for i in range(self.n_nodes):
            layer, pos = self.node_layer_pos(i)
            kind = self.node_kind(i)
            rows.append({"node": i, "name": self.node_name(i), "kind": kind, "layer": layer, "pos": pos,
                         "feature": int(self.features[i][2]) if kind == "feature" else -1,
                         "activation": float(self.activations[i]) if kind == "feature" else np.nan,
                         "influence": float(infl[i])})
        return pd.DataFrame(rows)


# -- influence and pruning (circuit-tracer's graph.py) ---------------------------------------------------------------
def normalize_matrix(matrix: Tensor) -> Tensor:
    m = matrix.abs()
    return m / m.sum(dim=1, keepdim=True).clamp(min=1e-10)


def _influence(A: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    current = weights @ A
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = current @ A
        total += current
    raise AttributionError(f"influence did not converge in {max_iter} iterations (a cycle in the graph?)")


def node_influence(adjacency: Tensor, weights: Tensor) -> Tensor:
    """Each node's influence on the weighted targets: ``w (A + A^2 + ...)`` on the row-normalised |A|."""
    return _influence(normalize_matrix(adjacency), weights)


def total_effects(adjacency: Tensor, weights: Tensor) -> Tensor:
    """Signed total effect of every node on ``weights . targets`` through all paths of the graph."""
    return _influence(adjacency, weights)


@dataclass
class PrunedGraph:
    node_mask: Tensor
    edge_mask: Tensor
    cumulative: Tensor  # circuit-tracer's cumulative influence (smaller = more important)
    node_threshold: float
    edge_threshold: float

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())


def _find_threshold(scores: Tensor, threshold: float) -> Tensor:
    s = torch.sort(scores, descending=True).values
    cum = torch.cumsum(s, 0) / torch.sum(s).clamp_min(1e-30)
    i = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype))), len(cum) - 1)
    return s[i]


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """Keep the nodes that carry ``node_threshold`` of the influence on the targets and the edges that carry
    ``edge_threshold``, then drop features and errors left without an outgoing edge and features without an
    incoming one, until nothing changes (circuit-tracer's ``prune_graph``)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0 <= v <= 1:
            raise AttributionError(f"{name} must be in [0, 1], got {v!r}")
    A, w = graph.adjacency, graph.target_weights()
    n_fixed = graph.n_targets + graph.n_pos
    infl = node_influence(A, w)
    node_mask = infl >= _find_threshold(infl, node_threshold)
    node_mask[-n_fixed:] = True
    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize_matrix(pruned)
    edge_scores = norm * (_influence(norm, w) + w)[:, None]
    edge_mask = edge_scores >= _find_threshold(edge_scores.flatten(), edge_threshold)
    old = node_mask.clone()
    node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)
    node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
    while not torch.equal(node_mask, old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
    s, order = torch.sort(infl, descending=True)
    cum = torch.zeros_like(infl)
    cum[order] = torch.cumsum(s, 0) / s.sum().clamp_min(1e-30)
    return PrunedGraph(node_mask, edge_mask, cum, node_threshold, edge_threshold)


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """circuit-tracer's (replacement score, completeness score): the share of the targets' influence that reaches
    tokens rather than errors, and the influence-weighted share of every node's input that is not error."""
    w = graph.target_weights()
    norm = normalize_matrix(graph.adjacency)
    infl = _influence(norm, w)
    token_infl = infl[graph.token_start:graph.target_start].sum()
    error_infl = infl[graph.error_start:graph.token_start].sum()
    replacement = token_infl / (token_infl + error_infl).clamp_min(1e-30)
    non_error = 1 - norm[:, graph.error_start:graph.token_start].sum(-1)
    out = infl + w
    completeness = (non_error * out).sum() / out.sum()
    return float(replacement), float(completeness)


# -- attribution ------------------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    fm: FrozenModel
    embeds: Tensor  # [T, d]
    consts: list[Tensor]  # per layer [1, T, d]: features + decoder bias + error
    errors: Tensor  # [L, T, d]
    b_dec: Tensor  # [L, d] (zero for layers without a transcoder)
    feat_layer: Tensor  # [n_active]
    feat_pos: Tensor
    feat_idx: Tensor
    feat_act: Tensor
    dec_vecs: Tensor  # [n_active, d] activation * W_dec row
    enc_vecs: Tensor  # [n_active, d]
    enc_bias: Tensor  # [n_active]


def _setup(model: Model, fm: FrozenModel, tcs: TranscoderSet) -> _Setup:
    T, d, L = fm.n_pos, model.d_model, model.n_layers
    embeds = fm.embeddings()[0]
    consts, errors, b_dec = [], torch.zeros(L, T, d), torch.zeros(L, d)
    layers, poss, idxs, acts, decs, encs, ebias = [], [], [], [], [], [], []
    with torch.no_grad():
        for layer, m in enumerate(fm.mlps):
            x, y = m.x[0].float().cpu(), m.y[0].float().cpu()
            if m.tc is None:
                consts.append(y[None].to(model.device))
                errors[layer] = y
                continue
            tc = m.tc
            a = tc.encode(x.to(tc.W_enc.device)).cpu()
            a[0] = 0  # position 0 (BOS): no feature nodes, as in circuit-tracer
            recon = a @ tc.W_dec.cpu() + tc.b_dec.cpu() + tc.skip(x.to(tc.W_enc.device)).cpu()
            errors[layer] = y - recon
            b_dec[layer] = tc.b_dec.cpu()
            consts.append((y - tc.skip(x.to(tc.W_enc.device)).cpu())[None].to(model.device))
            pos, idx = torch.nonzero(a, as_tuple=True)
            layers.append(torch.full_like(pos, layer))
            poss.append(pos)
            idxs.append(idx)
            vals = a[pos, idx]
            acts.append(vals)
            decs.append(vals[:, None] * tc.W_dec.cpu()[idx])
            encs.append(tc.W_enc.cpu()[idx])
            ebias.append(tc.b_enc.cpu()[idx])
    cat = (lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape))
    return _Setup(fm, embeds.cpu(), consts, errors, b_dec, cat(layers, (0,)).long(), cat(poss, (0,)).long(),
                  cat(idxs, (0,)).long(), cat(acts, (0,)), cat(decs, (0, d)), cat(encs, (0, d)), cat(ebias, (0,)))


def _site_tensor(fm: FrozenModel, site: str, layer: int) -> Tensor:
    if site == "final":
        return fm.final_norm.seen_out
    if site == "resid":
        return fm.layer_outputs[layer]
    return fm.mlps[layer].seen_in


def _row_values(fm: FrozenModel, rows: list[Target]) -> list[float]:
    """Each target's value in the pinned forward just run (row 0 of the batch)."""
    out = []
    for t in rows:
        h = _site_tensor(fm, t.site, t.layer)[0, t.pos].float()
        out.append(float(h.detach().cpu() @ t.vector.float()) + t.bias)
    return out


class _Engine:
    """The pinned linear model with its graph kept for ``B`` rows; one call of :meth:`rows` = one backward."""

    def __init__(self, model: Model, s: _Setup, B: int):
        self.model, self.s, self.B = model, s, B
        fm = s.fm
        self.embeds = s.embeds[None].expand(B, -1, -1).to(model.device).clone().requires_grad_(True)
        with torch.enable_grad():
            fm.pinned_forward(self.embeds, s.consts)
        self.outs = [m.seen_out for m in fm.mlps]
        self.values_cache: dict = {}
        n_by_layer = torch.bincount(s.feat_layer, minlength=model.n_layers) if len(s.feat_layer) else \
            torch.zeros(model.n_layers, dtype=torch.long)
        self.layer_slices = []
        start = 0
        for n in n_by_layer.tolist():
            self.layer_slices.append(slice(start, start + n))
            start += n

    def rows(self, targets: list[Target]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Direct effects on ``targets`` (<= B): (features [R, n_active], errors [R, L, T], tokens [R, T],
        decoder biases [R])."""
        fm, s, B = self.s.fm, self.s, self.B
        T, d = fm.n_pos, self.model.d_model
        by_tensor: dict[int, tuple[Tensor, Tensor]] = {}
        for b, t in enumerate(targets):
            ten = _site_tensor(fm, t.site, t.layer)
            key = id(ten)
            if key not in by_tensor:
                by_tensor[key] = (ten, torch.zeros(B, T, d, dtype=ten.dtype, device=ten.device))
            by_tensor[key][1][b, t.pos % T] = t.vector.to(ten.dtype).to(ten.device)
        outs, grads = zip(*by_tensor.values())
        g = torch.autograd.grad(list(outs), self.outs + [self.embeds], list(grads), retain_graph=True,
                                allow_unused=True)
        R = len(targets)
        G = torch.stack([(x if x is not None else torch.zeros(B, T, d, device=self.embeds.device)).float()
                         for x in g[:-1]], 1)[:R].cpu()  # [R, L, T, d]
        GE = g[-1][:R].float().cpu()
        feat = torch.zeros(R, len(s.feat_layer))
        for layer, sl in enumerate(self.layer_slices):
            if sl.stop > sl.start:
                feat[:, sl] = (G[:, layer, s.feat_pos[sl]] * s.dec_vecs[sl]).sum(-1)
        err = (G * s.errors).sum(-1)
        tok = (GE * s.embeds).sum(-1)
        bias = (G.sum(2) * s.b_dec).sum((-1, -2))
        return feat, err, tok, bias


def _constants(fm: FrozenModel, s: _Setup, rows: list[Target]) -> list[float]:
    """The model's own biases: each target's value in the linear model with every source (tokens, features,
    errors, decoder biases) zero."""
    zero = torch.zeros_like(s.embeds)[None]
    with torch.no_grad():
        fm.pinned_forward(zero, [torch.zeros_like(c) for c in s.consts])
        return _row_values(fm, rows)


def _feature_target(s: _Setup, j: int) -> Target:
    layer, pos = int(s.feat_layer[j]), int(s.feat_pos[j])
    return Target(f"L{layer}/F{int(s.feat_idx[j])}@{pos}", "mlp_in", pos, s.enc_vecs[j], layer=layer,
                  bias=float(s.enc_bias[j]))


def _rank(feat_rows: Tensor, row_feature: list[int], row_norm: Tensor, weights: Tensor, n_active: int,
          depth: int) -> Tensor:
    """Influence of every active feature on the weighted targets through the computed rows (the power series
    of circuit-tracer's partial influences, over rows whose sources are already known)."""
    A = feat_rows.abs() / row_norm[:, None].clamp_min(1e-10)  # [R, n_active]
    w = weights.clone()
    total = torch.zeros(n_active)
    feat_to_row = {f: r for r, f in enumerate(row_feature) if f >= 0}
    rows_of = torch.tensor(list(feat_to_row.values()), dtype=torch.long)
    feats_of = torch.tensor(list(feat_to_row.keys()), dtype=torch.long)
    for _ in range(depth):
        cur = w @ A
        total += cur
        if not len(rows_of):
            break
        w = torch.zeros_like(w)
        w[rows_of] = cur[feats_of]
        if not bool(w.any()):
            break
    return total


def attribute(model: Model, prompt: str | Tensor, tcs: TranscoderSet, *, targets: Sequence[Target] | None = None,
              cfg: AttributionConfig | None = None, progress: bool = True, add_special_tokens: bool = True
              ) -> AttributionGraph:
    """The attribution graph of ``prompt`` (a string, or token ids) with the transcoders ``tcs``.

    targets: the rows the graph explains (default: circuit-tracer's salient logits of the last position); they
    are the graph's target nodes, weighted by ``Target.weight`` in influence and pruning."""
    cfg = cfg or AttributionConfig()
    cfg.validate()
    start = time.perf_counter()
    tcs.check_fits(model)
    if not model.is_dispatched:
        tcs.to(model.device)
    if isinstance(prompt, str):
        if not prompt:
            raise AttributionError("the prompt is empty")
        ids = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
        text = prompt
    else:
        ids = torch.as_tensor(prompt).reshape(1, -1)
        text = model.tokenizer.decode(ids[0])
    T = ids.shape[1]
    if T < 2:
        raise AttributionError(f"the prompt has {T} token(s); a graph needs at least 2 (position 0 has no features)")
    with frozen_model(model, ids, tcs) as fm:
        if targets is None:
            targets = logit_targets(model, fm.logits, max_n_logits=cfg.max_n_logits,
                                    desired_logit_prob=cfg.desired_logit_prob)
        targets = list(targets)
        if not targets:
            raise AttributionError("no targets")
        for t in targets:
            if not -T <= t.pos < T:
                raise AttributionError(f"target {t.name!r} reads position {t.pos}, the prompt has {T} tokens")
            if t.site != "final" and not 0 <= t.layer < model.n_layers:
                raise AttributionError(f"target {t.name!r} reads layer {t.layer}; layers are 0..{model.n_layers - 1}")
            if t.vector.shape[-1] != model.d_model:
                raise AttributionError(f"target {t.name!r} has a vector of {t.vector.shape[-1]}, not d_model")
        s = _setup(model, fm, tcs)
        n_active = len(s.feat_layer)
        B = cfg.batch_size
        eng = _Engine(model, s, B)
        # values of every possible row from the pinned forward (row 0); constants from the all-zero forward
        target_values = _row_values(fm, targets)
        feat_values = _feature_values(fm, s)
        budget = min(cfg.max_feature_nodes, n_active)
        rows_feat, rows_err, rows_tok, rows_bias, row_feature = [], [], [], [], []
        bar = tqdm(total=len(targets) + budget, desc="attribution rows", disable=not progress)
        for i in range(0, len(targets), B):
            f, e, t, b = eng.rows(targets[i:i + B])
            rows_feat.append(f), rows_err.append(e), rows_tok.append(t), rows_bias.append(b)
            row_feature += [-1] * f.shape[0]
            bar.update(f.shape[0])
        visited = torch.zeros(n_active, dtype=torch.bool)
        weights_t = torch.tensor([t.weight for t in targets], dtype=torch.float32)
        order: list[int] = []
        n_batches = 0
        while len(order) < budget:
            if n_batches % cfg.update_interval == 0 or not order:
                F = torch.cat(rows_feat)
                norm = F.abs().sum(1) + torch.cat(rows_err).abs().sum((1, 2)) + torch.cat(rows_tok).abs().sum(1)
                w = torch.zeros(F.shape[0])
                w[: len(targets)] = weights_t
                infl = _rank(F, row_feature, norm, w, n_active, model.n_layers + 2)
                infl[visited] = -1
                queue = torch.argsort(infl, descending=True).tolist()
                queue = [j for j in queue if not visited[j]]
            take = queue[: min(B, budget - len(order))]
            queue = queue[len(take):]
            f, e, t, b = eng.rows([_feature_target(s, j) for j in take])
            rows_feat.append(f), rows_err.append(e), rows_tok.append(t), rows_bias.append(b)
            row_feature += take
            order += take
            visited[take] = True
            n_batches += 1
            bar.update(len(take))
        bar.close()
        all_rows = targets + [_feature_target(s, j) for j in order]
        constants = _constants(fm, s, all_rows)
    F, E, TK, BI = torch.cat(rows_feat), torch.cat(rows_err), torch.cat(rows_tok), torch.cat(rows_bias)
    sel = torch.tensor(sorted(order), dtype=torch.long)
    n_sel, L = len(sel), model.n_layers
    N = n_sel + L * T + T + len(targets)
    A = torch.zeros(N, N)
    pos_of = {int(j): k for k, j in enumerate(sel.tolist())}
    row_index = [n_sel + L * T + T + i for i in range(len(targets))] + [pos_of[j] for j in order]
    ri = torch.tensor(row_index, dtype=torch.long)
    A[ri, :n_sel] = F[:, sel]
    A[ri, n_sel:n_sel + L * T] = E.reshape(len(row_index), L * T)
    A[ri, n_sel + L * T:n_sel + L * T + T] = TK
    unselected = F.sum(1) - F[:, sel].sum(1)
    nan = torch.full((N,), float("nan"))
    row_value, row_bias, row_const, row_unsel = nan.clone(), torch.zeros(N), torch.zeros(N), torch.zeros(N)
    row_value[ri] = torch.tensor(target_values + [feat_values[j] for j in order], dtype=torch.float32)
    row_bias[ri] = BI
    row_const[ri] = torch.tensor(constants, dtype=torch.float32)  # a feature row's includes its encoder bias
    row_unsel[ri] = unselected
    feats = torch.stack([s.feat_layer[sel], s.feat_pos[sel], s.feat_idx[sel]], 1).numpy() if n_sel else \
        np.zeros((0, 3), dtype=np.int64)
    toks = ids[0].tolist()
    return AttributionGraph(
        model.name, str(tcs.path.name if tcs.path else "transcoders"), text, toks,
        [model.tokenizer.decode([t]) for t in toks], L, feats, s.feat_act[sel].numpy(), targets, A, row_value,
        row_bias, row_const, row_unsel, n_active, time.perf_counter() - start,
        config={"max_feature_nodes": cfg.max_feature_nodes, "batch_size": cfg.batch_size,
                "update_interval": cfg.update_interval},
        stats={"n_active": n_active, "n_selected": n_sel, "n_rows": len(row_index),
               "n_backward": math.ceil(len(targets) / B) + n_batches})


def _feature_values(fm: FrozenModel, s: _Setup) -> Tensor:
    """Every active feature's pre-activation in the pinned forward (= its activation for TopK's chosen ones)."""
    out = torch.zeros(len(s.feat_layer))
    for layer, m in enumerate(fm.mlps):
        mask = s.feat_layer == layer
        if mask.any():
            x = m.seen_in[0].detach().float().cpu()[s.feat_pos[mask]]
            out[mask] = (x * s.enc_vecs[mask]).sum(-1) + s.enc_bias[mask]
    return out
