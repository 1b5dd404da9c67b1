"""Notebook 08: attribution graphs of IOI and counting prompts on the shipped transcoders, each validated.

    cfg = GraphsConfig(model="smollm2-135m")
    result = run_graphs_study(cfg, model=m)
    result.summary()                     # one row per graph: size, time, exactness, ablation Spearman, pruned share
    save_graphs_result(result, cfg.output_dir)   # tables, graph JSON (circuit-tracer layout), feature cards

Graphs: ``n_ioi`` IOI prompts (target: logit(IO) - logit(S) at the last position), and one counting prompt
(``counting_task``, count ``count``) twice: towards the correct answer's logit (demeaned, as circuit-tracer's
logit targets), and towards a count direction at layer
``count_layer``'s residual output, last position (a ridge probe of the count fitted here on ``n_probe_prompts``
prompts of the same task; its held-out R² is reported with it): the target circuit-tracer cannot take.
Every graph is validated (:mod:`workbench.methods.circuits.validate`): exactness, ablations of its top-N
features in the real model, the pruned graph's share in the replacement model, the replacement and completeness
scores; and for the IOI prompts, per (layer, position), the graph's MLP effects against the exact patching sweep
of the same MLP outputs (clean into the name-swap corruption).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.core.models import Model, load_model
from workbench.data.corpus import DEFAULT_CORPUS, token_windows
from workbench.data.ioi import make_ioi_pairs
from workbench.data.tasks import TASKS, answered_task
from workbench.io.figures import write_result_tables
from workbench.io.paths import resolve_output_path
from workbench.methods.activations import last_token
from workbench.methods.circuits.attribution import (
    AttributionConfig,
    AttributionGraph,
    PrunedGraph,
    attribute,
    direction_target,
    logit_diff_target,
    logit_targets,
    prune_graph,
)
from workbench.methods.circuits.graph_io import feature_cards, graph_json, write_feature_cards, write_graph_files
from workbench.methods.circuits.train import build_transcoders, recipe
from workbench.methods.circuits.transcoder import TranscoderSet, load_transcoders
from workbench.methods.circuits.validate import ValidationResult, graph_vs_patching, validate_graph
from workbench.methods.patching import activation_patching, check_pairs
from workbench.methods.probes.linear import RidgeProbe
from workbench.plotting.circuits import graph_figure
from workbench.studies.attribution_graphs.plots import ablation_figure, patching_figure
from workbench.studies.notebook import NotebookConfig, Phases, choice, each_in, int_range, positive_int

SHIPPED = "saes/{model}/transcoders/topk-4x-k32"


@dataclass
class GraphsConfig(NotebookConfig):
    NOTEBOOK = {"model": "model", "transcoders": "transcoders", "n_ioi": "n_ioi", "counting_task": "counting_task",
                "count": "count", "max_feature_nodes": "max_feature_nodes", "top_n": "top_n",
                "n_card_tokens": "n_card_tokens", "seed": "seed"}
    SMOKE_SIZED = ("n_ioi", "max_feature_nodes", "top_n", "n_card_tokens")

    model: str = "smollm2-135m"
    transcoders: str = "shipped"  # "shipped" (saes/<model>/transcoders/topk-4x-k32), "train" (smoke recipe), a folder
    n_ioi: int = positive_int(4, minimum=2)
    counting_task: str = choice("character", TASKS)
    count: int = int_range(5, 1, 9)
    count_layer: int | None = None  # None: two thirds of the way up
    n_probe_prompts: int = positive_int(300, minimum=20)
    max_feature_nodes: int = positive_int(2048)
    batch_size: int = positive_int(64)
    top_n: int = positive_int(20, minimum=3)
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    n_card_tokens: int = positive_int(16_384, minimum=64)
    corpus: str = DEFAULT_CORPUS
    patching_sites: tuple[str, ...] = each_in(("mlp",), ("mlp",), non_empty=True)
    seed: int = 0
    smoke: bool = False
    output_dir: str = "figures/08_attribution_graphs"

    @classmethod
    def smoke_config(cls, **overrides):
        return cls(**({"smoke": True, "n_ioi": 2, "max_feature_nodes": 48, "top_n": 5, "n_card_tokens": 256,
                       "n_probe_prompts": 40, "batch_size": 16} | overrides))


@dataclass
class GraphRun:
    slug: str
    kind: str  # "ioi", "count-answer", "count-direction"
    graph: AttributionGraph
    pruned: PrunedGraph
    validation: ValidationResult
    json: dict


@dataclass
class GraphsResult:
    config: dict
    model: str
    weights_hash: str
    transcoders_path: str
    transcoder_quality: pd.DataFrame
    runs: list[GraphRun]
    patching: pd.DataFrame
    patching_stats: dict
    probe: dict
    cards: dict
    timings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        rows = []
        for r in self.runs:
            v = r.validation.to_frame().iloc[0].to_dict()
            rows.append({"graph": r.slug, "kind": r.kind, "target": r.graph.targets[0].name,
                         "n_tokens": r.graph.n_pos, "n_active": r.graph.n_active,
                         "n_selected": r.graph.n_features, "seconds": r.graph.seconds,
                         **{k: v[k] for k in v if k != "graph"}})
        return pd.DataFrame(rows)

    def ablations(self) -> pd.DataFrame:
        return pd.concat([r.validation.ablation.assign(graph=r.slug) for r in self.runs], ignore_index=True)

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"graphs": self.summary(), "ablations": self.ablations(), "graph_vs_patching": self.patching,
                "patching_agreement": pd.DataFrame([self.patching_stats]),
                "transcoder_quality": self.transcoder_quality}

    def figures(self) -> dict[str, go.Figure]:
        # one graph per kind (the first IOI prompt, the count direction): every graph is in graphs/<slug>.json
        shown = {r.kind: r for r in reversed(self.runs)}
        figs = {f"graph_{r.slug}": graph_figure(r.json, title=f"{r.slug}: {r.graph.targets[0].name}", max_links=150)
                for kind, r in shown.items() if kind in ("ioi", "count-direction")}
        figs["ablation_vs_prediction"] = ablation_figure(self.ablations())
        figs["graph_vs_patching_scatter"] = patching_figure(self.patching, self.patching_stats)
        return figs

    def save(self, out_dir: str | Path, model=None) -> dict[str, Path]:
        return save_graphs_result(self, out_dir)


def _transcoders(cfg: GraphsConfig, model: Model) -> TranscoderSet:
    if cfg.transcoders == "shipped":
        return load_transcoders(resolve_output_path(SHIPPED.format(model=model.name)), model=model)
    if cfg.transcoders == "train":
        folder = resolve_output_path(cfg.output_dir) / ("_smoke_transcoders" if cfg.smoke else "transcoders")
        if folder.exists():
            return load_transcoders(folder, model=model)
        tcs, _ = build_transcoders(model, recipe("smoke", corpus=cfg.corpus), folder, recipe_name="smoke",
                                   progress=False)
        return tcs
    return load_transcoders(resolve_output_path(cfg.transcoders), model=model)


def _count_probe(cfg: GraphsConfig, model: Model, layer: int) -> tuple[torch.Tensor, dict]:
    task, _ = answered_task(model, cfg.counting_task, cfg.n_probe_prompts, seed=cfg.seed + 1)
    X = last_token(model, task.prompts, layers=[layer + 1])[layer + 1]
    y = torch.tensor(task.counts, dtype=torch.float32)
    n_train = int(0.75 * len(y))
    probe = RidgeProbe(seed=cfg.seed).fit(X[:n_train], y[:n_train])
    pred = probe.predict(X[n_train:]).float()
    r2 = float(1 - ((pred - y[n_train:]) ** 2).sum() / ((y[n_train:] - y[n_train:].mean()) ** 2).sum())
    return probe.direction_raw.float(), {"layer": layer, "site": f"blocks.{layer}.hook_resid_post",
                                         "r2_test": r2, "n_train": n_train, "n_test": len(y) - n_train,
                                         "task": cfg.counting_task}


def _run_one(model: Model, tcs: TranscoderSet, cfg: GraphsConfig, slug: str, kind: str, ids, targets) -> GraphRun:
    acfg = AttributionConfig(max_feature_nodes=cfg.max_feature_nodes, batch_size=cfg.batch_size)
    graph = attribute(model, ids, tcs, targets=targets, cfg=acfg, progress=not cfg.smoke)
    pruned = prune_graph(graph, cfg.node_threshold, cfg.edge_threshold)
    val = validate_graph(model, graph, tcs, top_n=cfg.top_n, node_threshold=cfg.node_threshold,
                         edge_threshold=cfg.edge_threshold, name=slug)
    return GraphRun(slug, kind, graph, pruned, val,
                    graph_json(graph, slug, pruned=pruned, vocab_size=model.arch.vocab_size))


def run_graphs_study(cfg: GraphsConfig, *, model: Model | None = None) -> GraphsResult:
    phases = Phases()
    start = time.perf_counter()
    model = model or load_model(cfg.model)
    with phases("transcoders"):
        tcs = _transcoders(cfg, model)
    runs = []
    with phases("ioi_graphs"):
        pairs = check_pairs(model, make_ioi_pairs(cfg.n_ioi, seed=cfg.seed, tokenizer=model.tokenizer))
        for k, p in enumerate(pairs):
            target = logit_diff_target(model, p.answer, p.wrong)
            runs.append(_run_one(model, tcs, cfg, f"ioi-{k}", "ioi", p.clean["input_ids"][0].cpu(), [target]))
    with phases("patching"):
        exact = activation_patching(model, make_ioi_pairs(cfg.n_ioi, seed=cfg.seed, tokenizer=model.tokenizer),
                                    site_types=cfg.patching_sites, progress=not cfg.smoke)
        merged, stats = graph_vs_patching([r.graph for r in runs], exact.frame)
        stats["patching_seconds"] = exact.seconds
    with phases("counting_graphs"):
        layer = cfg.count_layer if cfg.count_layer is not None else (2 * model.n_layers) // 3
        direction, probe = _count_probe(cfg, model, layer)
        task, digit_ids = answered_task(model, cfg.counting_task, 1, seed=cfg.seed, counts=[cfg.count])
        ids = model.tokenizer(task.prompts[0], return_tensors="pt")["input_ids"][0]
        answer = [digit_ids[cfg.count - 1]]  # the answer set-up of the counting study: the next token is the digit
        with torch.no_grad():
            logits = model.hf(input_ids=ids[None].to(model.device)).logits[0].float().cpu()
        runs.append(_run_one(model, tcs, cfg, "count-answer", "count-answer", ids,
                             logit_targets(model, logits, tokens=answer)))
        runs.append(_run_one(model, tcs, cfg, "count-direction", "count-direction", ids,
                             [direction_target(model, layer, direction, name=f"count probe @ L{layer}")]))
    with phases("feature_cards"):
        feats = sorted({(int(a), int(c)) for r in runs for (a, b, c), k in
                        zip(r.graph.features, r.pruned.node_mask[: r.graph.n_features].tolist()) if k})
        T = 128 if not cfg.smoke else 32
        windows = token_windows(cfg.corpus, model.tokenizer, T, last="drop",
                                until_tokens=cfg.n_card_tokens)
        card_ids = torch.tensor(list(windows), dtype=torch.long)
        cards = feature_cards(model, tcs, feats, card_ids, progress=not cfg.smoke) if feats else {}
    quality = pd.DataFrame(tcs.card.get("quality", []))
    phases.timings["total"] = time.perf_counter() - start
    return GraphsResult(asdict(cfg), model.name, model.weights_hash, str(tcs.path), quality, runs, merged, stats,
                        probe, cards, phases.finish())


def save_graphs_result(result: GraphsResult, out_dir: str | Path) -> dict[str, Path]:
    """Tables (CSV) + ``study.json``; every graph as circuit-tracer JSON in ``graphs/`` (with
    ``graph-metadata.json``), the cards of their pruned features in ``graphs/features/``."""
    out = Path(out_dir)
    paths = write_result_tables(out, result.tables(), {
        "model": result.model, "weights_hash": result.weights_hash, "transcoders": result.transcoders_path,
        "config": result.config, "timings": result.timings, "probe": result.probe,
        "patching": result.patching_stats})
    for r in result.runs:
        paths[f"graph_{r.slug}"] = write_graph_files(r.graph, out / "graphs", r.slug, pruned=r.pruned,
                                                     vocab_size=max(t.token_id or 0 for t in r.graph.targets) + 1)
    paths["cards"] = write_feature_cards(result.cards, out / "graphs" / "features")
    return paths
