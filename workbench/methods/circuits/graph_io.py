"""Graphs and feature cards in the files circuit-tracer's (and Neuronpedia's) frontend reads.

    data = graph_json(graph, "ioi-0")                    # metadata, qParams, nodes, links
    write_graph_files(graph, "figures/08_attribution_graphs/graphs", "ioi-0")   # <slug>.json + graph-metadata.json
    cards = feature_cards(model, tcs, [(12, 345), ...], corpus="sharegpt-en", n_tokens=32_768)
    write_feature_cards(cards, folder)                   # features/<cantor(layer, feature)>.json

Graph JSON (circuit-tracer ``frontend/graph_models.py``, schema_version 1): node ids ``{layer}_{feature}_{pos}``
(features; ``feature`` = cantor(layer, feature)), ``0_{layer}_{pos}`` (errors), ``E_{token}_{pos}`` (tokens),
``{n_layers + 1}_{vocab}_{pos}`` (targets; a target that is not one logit gets the virtual vocab index
``vocab_size + i`` and its name as ``clerp``); ``influence`` is the cumulative influence of pruning (smaller = more
important), links ``{source, target, weight}`` with the raw signed direct effect of the kept edges, and only nodes
on a kept edge are written (plus every token and target). :func:`check_graph_json` validates a file against that
schema; :func:`read_graph_json` reads one back.

Feature cards (``frontend/feature_models.py``): ``transcoder_id``, ``index``, ``examples_quantiles`` (top
activating contexts from the corpus), ``top_logits`` / ``bottom_logits`` (the decoder row read through the final
norm's gain and the unembedding: the feature's direct logit effect), ``act_min``, ``act_max``,
``quantile_values``, ``histogram``, ``activation_frequency``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.core.models import Model
from workbench.core.trace import trace
from workbench.io.atomic import atomic_write_json, atomic_write_text
from workbench.methods.circuits.attribution import AttributionGraph, PrunedGraph, prune_graph
from workbench.methods.circuits.transcoder import TranscoderSet

SCHEMA_VERSION = 1
METADATA_FILE = "graph-metadata.json"
FEATURE_TYPES = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")
NODE_FIELDS = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
               "token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str,
               "clerp": str, "influence": (float, type(None)), "activation": (float, type(None))}
METADATA_FIELDS = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str,
                   "node_threshold": (float, type(None)), "schema_version": (int, type(None))}
QPARAMS_FIELDS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}


def cantor(layer: int, feature: int) -> int:
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def cantor_unpair(z: int) -> tuple[int, int]:
    w = int((np.sqrt(8 * z + 1) - 1) // 2)
    t = w * (w + 1) // 2
    feature = z - t
    return w - feature, feature


def _node(node_id, feature, layer, ctx_idx, feature_type, js, *, influence=None, activation=None, clerp="",
          token_prob=0.0, is_target_logit=False) -> dict:
    return {"node_id": node_id, "feature": int(feature), "layer": str(layer), "ctx_idx": int(ctx_idx),
            "feature_type": feature_type, "token_prob": float(token_prob), "is_target_logit": bool(is_target_logit),
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js, "clerp": clerp,
            "influence": None if influence is None else float(influence),
            "activation": None if activation is None else float(activation)}


def graph_nodes(graph: AttributionGraph, cumulative: torch.Tensor, vocab_size: int) -> list[dict]:
    """Every node of ``graph`` as a circuit-tracer node (index = node index). circuit-tracer's error id
    ``0_{layer}_{pos}`` is also the id of feature ``layer`` of layer 0 at ``pos``; when both exist the error node
    becomes ``0_{layer}_{pos}_error``."""
    taken = {f"{int(a)}_{int(c)}_{int(b)}" for a, b, c in graph.features}
    out = []
    L, T = graph.n_layers, graph.n_pos
    for i in range(graph.n_nodes):
        kind = graph.node_kind(i)
        infl = float(cumulative[i])
        if kind == "feature":
            layer, pos, feat = (int(v) for v in graph.features[i])
            out.append(_node(f"{layer}_{feat}_{pos}", cantor(layer, feat), layer, pos, FEATURE_TYPES[0],
                             f"{layer}_{feat}-0", influence=infl, activation=float(graph.activations[i])))
        elif kind == "error":
            layer, pos = divmod(i - graph.error_start, T)
            node_id = f"0_{layer}_{pos}" if f"0_{layer}_{pos}" not in taken else f"0_{layer}_{pos}_error"
            out.append(_node(node_id, -1, layer, pos, FEATURE_TYPES[1], f"{layer}_{pos}-0", influence=infl))
        elif kind == "token":
            pos = i - graph.token_start
            tok = graph.input_ids[pos]
            out.append(_node(f"E_{tok}_{pos}", pos, "E", pos, FEATURE_TYPES[2], f"E_{tok}-{pos}", influence=infl))
        else:
            k = i - graph.target_start
            t = graph.targets[k]
            vocab = t.token_id if t.token_id is not None else vocab_size + k
            pos = t.pos % T
            clerp = (f'Output "{graph.targets[k].name[len("logit "):].strip(chr(39))}" (p={t.weight:.3f})'
                     if t.token_id is not None else t.name)
            out.append(_node(f"{L + 1}_{vocab}_{pos}", vocab, L + 1, pos, FEATURE_TYPES[3], f"L_{vocab}-{pos}",
                             clerp=clerp, token_prob=t.weight if t.token_id is not None else 0.0,
                             is_target_logit=k == 0))
    return out


def graph_json(graph: AttributionGraph, slug: str, *, pruned: PrunedGraph | None = None, scan: str | None = None,
               vocab_size: int | None = None) -> dict:
    """The graph as circuit-tracer's frontend reads it (pruned with the default thresholds unless given)."""
    pruned = pruned or prune_graph(graph)
    vocab_size = vocab_size or max([t.token_id or 0 for t in graph.targets] + [max(graph.input_ids)]) + 1
    nodes = graph_nodes(graph, pruned.cumulative, vocab_size)
    keep = pruned.node_mask
    dst, src = torch.nonzero(pruned.edge_mask & keep[:, None] & keep[None, :], as_tuple=True)
    weights = graph.adjacency[dst, src].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": w}
             for s, d, w in zip(src.tolist(), dst.tolist(), weights)]
    used = {x["source"] for x in links} | {x["target"] for x in links}
    kept_nodes = [n for n in nodes if n["node_id"] in used or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan or graph.scan, "transcoder_list": [],
                "prompt_tokens": list(graph.token_strings), "prompt": graph.prompt,
                "node_threshold": float(pruned.node_threshold), "schema_version": SCHEMA_VERSION,
                "info": {"generator": "workbench", "model": graph.model_name,
                         "edge_threshold": float(pruned.edge_threshold)}}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": kept_nodes, "links": links}


class GraphSchemaError(ValueError):
    """A graph JSON that does not follow circuit-tracer's schema."""


def _check_fields(obj: Mapping, fields: Mapping, where: str) -> None:
    for name, typ in fields.items():
        if name not in obj:
            raise GraphSchemaError(f"{where}: missing field {name!r}")
        v = obj[name]
        ok = isinstance(v, typ) and not (typ in (int, float) and isinstance(v, bool))
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if isinstance(typ, tuple) and float in typ and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise GraphSchemaError(f"{where}: field {name!r} is {type(v).__name__}, expected {typ}")


def check_graph_json(data: Mapping) -> None:
    """Raise :class:`GraphSchemaError` unless ``data`` follows the frontend's schema (types, ids, links)."""
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in data:
            raise GraphSchemaError(f"missing top-level key {key!r}")
    _check_fields(data["metadata"], METADATA_FIELDS, "metadata")
    _check_fields(data["qParams"], QPARAMS_FIELDS, "qParams")
    ids = set()
    for n in data["nodes"]:
        _check_fields(n, NODE_FIELDS, f"node {n.get('node_id')!r}")
        if n["feature_type"] not in FEATURE_TYPES:
            raise GraphSchemaError(f"node {n['node_id']!r}: feature_type {n['feature_type']!r}")
        if n["node_id"] in ids:
            raise GraphSchemaError(f"duplicate node id {n['node_id']!r}")
        ids.add(n["node_id"])
    for link in data["links"]:
        if set(link) != {"source", "target", "weight"}:
            raise GraphSchemaError(f"a link has keys {sorted(link)}, expected source, target, weight")
        if link["source"] not in ids or link["target"] not in ids:
            raise GraphSchemaError(f"link {link['source']} -> {link['target']} names a node that is not in nodes")


def write_graph_files(graph: AttributionGraph, folder: str | os.PathLike, slug: str, **kwargs) -> Path:
    """``<folder>/<slug>.json`` and the entry in ``<folder>/graph-metadata.json`` (other graphs' entries kept)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = graph_json(graph, slug, **kwargs)
    check_graph_json(data)
    path = folder / f"{slug}.json"
    atomic_write_text(path, json.dumps(data, separators=(",", ":")))  # compact: a graph has 30k-150k links
    index_path = folder / METADATA_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
    atomic_write_json(index_path, index)
    return path


def read_graph_json(path: str | os.PathLike) -> dict:
    data = json.loads(Path(path).read_text())
    check_graph_json(data)
    return data


# -- feature cards ---------------------------------------------------------------------------------------------------
def _logit_rows(model: Model, tcs: TranscoderSet, layer: int, feats: Sequence[int], k: int) -> list[tuple]:
    gain = model.final_norm.weight.detach().float()
    if "gemma" in model.arch.family:
        gain = 1 + gain
    dirs = tcs[layer].W_dec[list(feats)].detach().float() * gain
    logits = dirs @ model.W_U.float().T
    out = []
    for row in logits:
        top, bot = row.topk(k).indices.tolist(), (-row).topk(k).indices.tolist()
        out.append(([model.tokenizer.decode([t]) for t in top], [model.tokenizer.decode([t]) for t in bot]))
    return out


@torch.no_grad()
def feature_cards(model: Model, tcs: TranscoderSet, features: Sequence[tuple[int, int]], ids: torch.Tensor, *,
                  n_examples: int = 8, context: int = 12, n_logits: int = 10, progress: bool = True,
                  batch_windows: int = 8) -> dict[int, dict]:
    """Cards for ``features`` ((layer, feature) pairs) from the corpus windows ``ids`` [n, T]: the contexts of
    their ``n_examples`` largest activations (``context`` tokens either side), their activation statistics over
    every token after position 0, and their direct logit effects. Keyed by cantor(layer, feature)."""
    by_layer: dict[int, list[int]] = {}
    for layer, feat in features:
        if layer not in tcs:
            raise ValueError(f"no transcoder for layer {layer}")
        by_layer.setdefault(int(layer), []).append(int(feat))
    layers = sorted(by_layer)
    sites = [f"{model.arch.mlp_path(i)}:input" for i in layers]
    top_vals = {i: torch.full((len(by_layer[i]), n_examples), -1.0) for i in layers}
    top_where = {i: torch.zeros(len(by_layer[i]), n_examples, 2, dtype=torch.long) for i in layers}
    acts_all = {i: [] for i in layers}
    for s in tqdm(range(0, len(ids), batch_windows), desc="feature cards", disable=not progress):
        chunk = ids[s: s + batch_windows]
        with trace(model, sites) as tr:
            model.hf(input_ids=chunk.to(model.device))
        for i, site in zip(layers, sites):
            a = tcs[i].encode(tr[site].float())[..., by_layer[i]]  # [b, T, n]
            a[:, 0] = 0
            acts_all[i].append(a.reshape(-1, a.shape[-1]).cpu())
            flat = a.permute(2, 0, 1).reshape(len(by_layer[i]), -1)
            v, j = flat.topk(min(n_examples, flat.shape[1]), dim=1)
            where = torch.stack([j // chunk.shape[1] + s, j % chunk.shape[1]], -1)
            vals = torch.cat([top_vals[i], v], 1)
            wh = torch.cat([top_where[i], where], 1)
            best = vals.topk(n_examples, dim=1).indices
            top_vals[i] = vals.gather(1, best)
            top_where[i] = wh.gather(1, best[..., None].expand(-1, -1, 2))
    cards = {}
    tok = model.tokenizer
    for i in layers:
        acts = torch.cat(acts_all[i])
        logits = _logit_rows(model, tcs, i, by_layer[i], n_logits)
        for n, feat in enumerate(by_layer[i]):
            col = acts[:, n]
            nz = col[col > 0]
            examples = []
            for v, (w, p) in zip(top_vals[i][n].tolist(), top_where[i][n].tolist()):
                if v <= 0:
                    continue
                lo, hi = max(0, p - context), min(ids.shape[1], p + context + 1)
                window = ids[w, lo:hi].tolist()
                a = col[w * ids.shape[1] + lo: w * ids.shape[1] + hi]
                examples.append({"tokens": [tok.decode([t]) for t in window],
                                 "tokens_acts_list": [round(float(x), 4) for x in a.tolist()],
                                 "train_token_ind": p - lo, "is_repeated_datapoint": False})
            hist = torch.histc(nz, bins=10, min=0, max=float(nz.max())) if len(nz) else torch.zeros(10)
            qs = torch.quantile(nz, torch.linspace(0, 1, 11)).tolist() if len(nz) else [0.0] * 11
            cards[cantor(i, feat)] = {
                "transcoder_id": f"{tcs.path.name if tcs.path else 'transcoders'}/layer_{i}", "index": cantor(i, feat),
                "layer": i, "feature": feat,
                "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}],
                "top_logits": logits[n][0], "bottom_logits": logits[n][1],
                "act_min": 0.0, "act_max": float(nz.max()) if len(nz) else 0.0, "quantile_values": qs,
                "histogram": [float(x) for x in hist.tolist()],
                "activation_frequency": float((col > 0).float().mean()), "n_tokens": int(len(col))}
    return cards


def write_feature_cards(cards: Mapping[int, dict], folder: str | os.PathLike) -> Path:
    """One ``<cantor index>.json`` per card in ``folder`` (circuit-tracer's local-scan layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, card in cards.items():
        atomic_write_text(folder / f"{int(index)}.json", json.dumps(card, separators=(",", ":")))
    return folder
