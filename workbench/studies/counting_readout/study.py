"""The counting-readout study: does a model know the count, and can its digit rows read it out?

One call runs the whole protocol of methods.md section 1 on one model, for every task and seed:

1. tasks (balanced counts 1-9), split into train (``n_train``) and held-out test (``n_test``) prompts;
2. residual features at every layer (last token; for the entity task also the mean over the entity mentions);
3. per-layer ridge probes (alpha on a validation split of train) and logistic probes, scored on test;
4. geometry: |cos| of each probe direction with the digit rows, against the random baseline and random directions;
   a permutation test at the best layer; principal angles between the count directions of all tasks and the
   digit rows; digit-row norm percentiles;
5. the logit lens: gold-digit rank by layer;
6. interventions, each evaluated on the test prompts only: digit-row repair, LoRA on Q/V, steering along the probe
   direction; for each: digit-restricted, full-vocabulary and true greedy-generation accuracy, and the lens ranks.

The best layer is chosen by validation R² (never by test data). Results are small dataframes in
:class:`CountingResult`; :func:`save_counting_result` writes them as CSV.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.core.sites import check_layers, layer_site
from workbench.data.tasks import (
    TASKS,
    TaskSet,
    answer_setup,
    answered_task,
    make_task,
    split,
    split_indices,
)
from workbench.io.atomic import atomic_write_bytes, sha256_file
from workbench.io.checkpoint import UnitCheckpoint
from workbench.io.figures import write_result_tables
from workbench.io.paths import cache_root, model_key, safe_segment
from workbench.io.provenance import code_fingerprint, jsonable
from workbench.methods.activations import PrefixCache
from workbench.methods.probes.base import probe_dir, save_probe
from workbench.methods.probes.features import residual_features_many
from workbench.methods.probes.layerwise import layerwise_logistic, layerwise_ridge
from workbench.studies.counting_readout import plots
from workbench.methods.stats import accuracy_ci, seed_summary
from workbench.studies.counting_readout.controls import (
    best_layer_null,
    decoupled_probes,
    nuisance_controls,
    readout_geometry,
    steering_controls,
)
from workbench.studies.counting_readout.evaluation import evaluate_answers
from workbench.studies.counting_readout.geometry import (
    geometry_table,
    principal_angles,
    random_baseline,
    row_norm_percentiles,
)
from workbench.studies.counting_readout.interventions import steering_edit, train_digit_rows, train_lora_qv
from workbench.studies.notebook import (
    NotebookConfig,
    Phases,
    at_most,
    checkout_root,
    choice,
    each_in,
    each_int,
    positive_int,
)

METHODS = ("baseline", "probe_round", "digit_rows", "lora_qv", "steering")
INTERVENTIONS = ("digit_rows", "lora_qv", "steering")
LORA_SCOPES = ("joint", "per_task")


@dataclass
class CountingConfig(NotebookConfig):
    # notebook 02's parameters -> fields (see workbench.studies.notebook); a smoke run sizes the last four itself
    NOTEBOOK = {"model": "model", "tasks": "tasks", "layers": "layers", "interventions": "interventions",
                "lora_scope": "lora_scope", "n_prompts": "n_test", "n_train": "n_train", "seeds": "seeds",
                "save_probes": ("probes_root", lambda save: checkout_root() if save else None)}
    SMOKE_SIZED = ("n_prompts", "n_train", "seeds", "save_probes")
    RELATIONS = (at_most("n_lora_train", "n_train", when=lambda c: "lora_qv" in c.interventions,
                         why="the LoRA pool is part of the train prompts"),)

    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = each_in(tuple(TASKS), TASKS, non_empty=True)
    # the paper's seeds; each seed draws its own prompts and trains anew
    seeds: tuple[int, ...] = each_int((11, 77, 42), non_empty=True)
    # the paper trains digit-row repair on 600 prompts; 300 keeps the default run (3 seeds x 4 tasks, every control)
    # within 20 minutes on 2 CPU cores (docs/results/counting-readout.md)
    n_train: int = positive_int(300)
    n_test: int = positive_int(200)  # held out: never used for training, alpha or layer choice
    n_lora_train: int = positive_int(300)  # the LoRA pool, a subset of the train prompts (the paper's: 400 of 600)
    layers: Sequence[int] | None = None  # probe layers (hidden-state indices 0..L); None = all
    repair_steps: int = positive_int(500)
    lora_steps: int = positive_int(200)
    lora_batch: int = positive_int(4)
    # "joint": one adapter per seed, trained on the LoRA pools of all tasks together and evaluated on each task;
    # "per_task": the paper's protocol, one adapter per task and seed (4x the training, too slow for the default run
    # on 2 CPU cores: docs/results/counting-readout.md).
    lora_scope: str = choice("joint", LORA_SCOPES)
    steer_alphas: tuple[float, ...] = (-1.0, -0.5, -0.25, 0.25, 0.5, 1.0)  # x mean residual norm at that layer
    steer_select_n: int = 32  # train prompts used to pick the steering alpha (6 alphas x 32 forwards)
    gen_tokens: int = 6
    batch_size: int = 64  # prompts are batched by length, so a big batch costs little padding
    n_permutations: int = positive_int(999)  # geometry permutation test: p floor 1/1000
    n_layer_permutations: int = positive_int(199)  # best-layer R2 against the max over layers (p floor 1/200)
    n_null: int = positive_int(50)  # norm-matched random directions per steering null
    n_shuffles: int = positive_int(5)  # shuffled-label refits of the probe control
    n_steer_prompts: int = positive_int(64)  # held-out prompts of the steering controls (each null draw runs them)
    logistic_probes: bool = False  # also a logistic probe per layer (about a minute per task and seed on 2 cores)
    logistic_C: float = 1.0  # fixed (on standardised features): a per-layer C search would dominate the run time
    probes_root: str | None = "."  # best-layer probes go to <probes_root>/probes/<model>/<task>/ (None: not saved)
    # a subset skips the others (LoRA is ~half of the run time)
    # the default run leaves LoRA out (half of the run time); it is a cell of notebooks/studies.yaml
    interventions: tuple[str, ...] = each_in(("digit_rows", "steering"), INTERVENTIONS)
    smoke: bool = False

    @classmethod
    def smoke_config(cls, **overrides) -> CountingConfig:
        """Small enough for CI: one seed, few prompts, short training."""
        base = dict(seeds=(11,), n_train=27, n_test=18, n_lora_train=18, repair_steps=50, lora_steps=2,
                    steer_select_n=12, gen_tokens=3, n_permutations=19, n_layer_permutations=9, n_null=3,
                    n_shuffles=2, probes_root=None, smoke=True)
        return cls(**(base | overrides))


@dataclass
class CountingResult:
    config: dict
    model: str
    weights_hash: str
    tied_head: bool
    d_model: int
    n_layers: int
    probes: pd.DataFrame  # task, seed, variant, layer, r2_test (+ CI), round_acc_test (+ CI), r2_val, alpha, ...
    geometry: pd.DataFrame  # task, seed, layer, basis, cos_mean/min/max, random baseline and band
    lens: pd.DataFrame  # task, seed, method, layer, median_rank, mean_prob, lens_accuracy
    accuracy: pd.DataFrame  # task, seed, method, digit_restricted, full_vocab, generation
    extras: pd.DataFrame  # task, seed, key, value: best layer, permutation p, chosen alpha, param counts, times
    angles: pd.DataFrame  # seed, layer, angle_index, degrees
    norm_percentiles: pd.DataFrame  # digit, token, percentile
    controls: pd.DataFrame = field(default_factory=pd.DataFrame)  # task, seed, variant, layer, control, r2 (+ CI), ...
    steering: pd.DataFrame = field(default_factory=pd.DataFrame)  # task, seed, edit, value (+ CI), null range, p
    timings: dict = field(default_factory=dict)

    def lens_peaks(self) -> pd.DataFrame:
        """Per task, seed and method: where the gold digit's lens peaks (see :func:`lens_peaks`)."""
        return lens_peaks(self.lens)

    def summary(self) -> pd.DataFrame:
        """Accuracy over seeds, one row per task x method: mean, sd and the t interval over seeds of each metric
        (:func:`workbench.methods.stats.seed_summary`), and the distinct held-out prompts per seed (``n_units``)."""
        metrics = ["digit_restricted", "full_vocab", "generation"]
        out = seed_summary(self.accuracy, metrics, ["task", "method"])
        if "n_units" in self.accuracy.columns:
            units = self.accuracy.groupby(["task", "method"], sort=False).n_units.mean().rename("n_units_per_seed")
            out = out.merge(units.reset_index(), on=["task", "method"])
        return out

    def control_summary(self) -> pd.DataFrame:
        """The probe controls over seeds, one row per task x variant x control: mean, sd, t interval of R² and
        probe-round accuracy, the layer(s) they were measured at, distinct held-out prompts per seed."""
        if self.controls.empty:
            return pd.DataFrame()
        out = seed_summary(self.controls, ["r2", "round_acc"], ["task", "variant", "control"])
        extra = self.controls.groupby(["task", "variant", "control"], sort=False).agg(
            layers=("layer", lambda x: ",".join(str(v) for v in sorted(set(x)))),
            n_test_units=("n_test_units", "mean")).reset_index()
        return out.merge(extra, on=["task", "variant", "control"])

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables a notebook records in its manifest (the full tables go to CSV by ``save_counting_result``)."""
        return {"accuracy_table": self.summary(), "controls_table": self.control_summary()}

    def figures(self) -> dict[str, go.Figure]:
        """The study's figures, by name: probe R², |cos| with the digit rows, lens ranks, accuracy."""
        return {
            "r2_by_layer": plots.probe_r2_by_layer(self.probes),
            "probe_controls": plots.probe_controls_by_layer(self.probes),
            "cos_by_layer": plots.cos_by_layer(self.geometry),
            "lens_rank_by_layer": plots.lens_rank_by_layer(self.lens),
            "accuracy": plots.accuracy_bars(self.summary()),
        }

    def save(self, out_dir: str | Path, model: Model | None = None) -> dict[str, Path]:
        """Every table as CSV plus ``study.json`` (:func:`save_counting_result`; ``model`` is not needed)."""
        return save_counting_result(self, out_dir)


def _accuracy_intervals(items: pd.DataFrame, test: TaskSet) -> dict:
    """95 % intervals of the three accuracies over the held-out prompts (Wilson, or the bootstrap over distinct
    prompts where prompts repeat) and the number of distinct prompts."""
    out = {}
    for metric, col in (("digit_restricted", "digit_correct"), ("full_vocab", "full_correct"),
                        ("generation", "gen_correct")):
        if items[col].isna().any():
            continue
        ci = accuracy_ci(items[col].astype(int).to_numpy(), groups=test.prompts)
        out |= {f"{metric}_lo": ci.lo, f"{metric}_hi": ci.hi}
    return out | {"n_units": len(set(test.prompts))}


def _ordered(ts: TaskSet, seed: int, cfg: CountingConfig) -> TaskSet:
    """The train prompts then the held-out ones, as :func:`_make_sets` splits them (the features' row order)."""
    tr, te = split_indices(ts.counts, [cfg.n_train, cfg.n_test], seed=seed, groups=ts.prompts)
    return ts.subset(np.concatenate([tr, te]))


def _make_sets(model: Model, task: str, seed: int, cfg: CountingConfig) -> tuple[TaskSet, TaskSet, TaskSet, list[int]]:
    ts, digit_ids = answered_task(model, task, cfg.n_train + cfg.n_test, seed=seed)
    train, test = split(ts, [cfg.n_train, cfg.n_test], seed=seed)
    return ts, train, test, digit_ids


def unit_features(model: Model, train: TaskSet, test: TaskSet, task: str, layers: Sequence[int],
                  cfg: CountingConfig) -> tuple[dict, PrefixCache]:
    """Phase ``features`` of one (seed, task): residual features of every prompt at ``layers`` by variant
    (``last_token``; for the entity task also ``mention_mean``), train rows first, and the held-out prompts' prefix
    cache. Train prompts: features only. Held-out prompts: one forward whose key/value cache and last-token
    residuals (every layer) also serve the baseline, digit-row and steering evaluations (no second pass)."""
    specs, test_specs = {"last_token": "last"}, {}
    if task == "entity":  # both variants from one forward
        specs["mention_mean"] = train.mention_token_positions(model.tokenizer)
        test_specs["mention_mean"] = test.mention_token_positions(model.tokenizer)
    variants = residual_features_many(model, train.prompts, layers, specs, batch_size=cfg.batch_size)
    test_cache = PrefixCache.build(model, test.prompts, batch_size=cfg.batch_size, positions=test_specs)
    test_variants = {"last_token": test_cache.last_token(layers)} | test_cache.features
    variants = {name: {layer: torch.cat([by_layer[layer], test_variants[name][layer]]) for layer in layers}
                for name, by_layer in variants.items()}
    return variants, test_cache


def unit_probes(model: Model, variants: dict, counts: np.ndarray, tr_idx: np.ndarray, te_idx: np.ndarray, seed: int,
                cfg: CountingConfig, groups: Sequence[str] | None = None) -> tuple[list[pd.DataFrame], object]:
    """Phase ``probes`` of one (seed, task): per variant, ridge probes for every layer at once (batched SVDs on the
    model's device; alpha on a validation split that keeps identical prompts together, ``groups``; held-out R² and
    probe-round accuracy with 95 % bootstrap intervals over distinct prompts) and logistic probes layer by layer;
    returns the tables and the ``last_token`` ridge fit."""
    tables, main = [], None
    for variant, fts in variants.items():
        lw = layerwise_ridge(fts, counts.astype(float), tr_idx, te_idx, seed=seed, device=model.device, groups=groups,
                             ci=True)
        table = lw.table
        if cfg.logistic_probes:
            table = table.merge(layerwise_logistic(fts, counts, tr_idx, te_idx, C=cfg.logistic_C,
                                                   device=model.device), on="layer")
        tables.append(table.assign(variant=variant)[["variant", *table.columns]])
        if variant == "last_token":
            main = lw
    return tables, main


def _rank_rows(frame: pd.DataFrame, **keys) -> pd.DataFrame:
    frame = frame.copy()
    for k, v in keys.items():
        frame.insert(0, k, v)
    return frame


def lora_adapter(model: Model, tasks: Sequence[str], seed: int, cfg: CountingConfig):
    """Phase ``train_lora``: a LoRA adapter on Q/V trained on the pools of ``tasks`` (each task's pool: the first
    ``n_lora_train`` of its shuffled train prompts)."""
    pool_prompts, pool_answers = [], []
    for t in tasks:
        _, train_t, _, ids_t = _make_sets(model, t, seed, cfg)
        pool = train_t.subset(np.arange(min(cfg.n_lora_train, len(train_t))))
        pool_prompts += pool.prompts
        pool_answers += [ids_t[c - 1] for c in pool.counts]
    return train_lora_qv(model, pool_prompts, pool_answers, steps=cfg.lora_steps, batch_size=cfg.lora_batch, seed=seed)


def _select_steering_alpha(model, site, direction, scale, prompts, counts, digit_ids, cfg) -> tuple[float, dict]:
    curve = {}
    cache = PrefixCache.build(model, prompts, batch_size=cfg.batch_size)  # the prompts run once for all alphas
    for a in cfg.steer_alphas:
        edit = steering_edit(direction, a * scale)
        acc = evaluate_answers(model, prompts, counts, digit_ids, edits={site: edit}, generate=False, lens=False,
                               cache=cache).accuracy()
        curve[a] = acc["full_vocab"] + 1e-3 * acc["digit_restricted"]
    best = max(curve, key=lambda a: (curve[a], -abs(a)))
    return best, curve


@dataclass
class TaskProbes:
    """Per-layer ridge probes of one task and seed, with what the probe explorer shows: the table (layer, r2_test,
    round_acc_test, ...), the geometry (|cos| with the digit rows per layer), and held-out predictions."""

    task: str
    seed: int
    table: pd.DataFrame
    geometry: pd.DataFrame
    y_test: np.ndarray  # true counts of the held-out prompts
    predictions: dict[int, np.ndarray]  # layer -> predicted counts of the held-out prompts


@torch.no_grad()
def task_probes(model: Model, task: str, seed: int, cfg: CountingConfig, layers: Sequence[int]) -> TaskProbes:
    """Steps 1-4 of the study for one task and seed (same prompts, split, features and probes as
    :func:`run_counting_study` with the same ``cfg``): one feature pass over the prompts, then a ridge probe and the
    digit-row geometry per layer, and the probes' predictions on the held-out prompts."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    layers = check_layers(layers, model.n_layers)  # hidden-state layers, the package's one meaning of layers
    _, train, test, digit_ids = _make_sets(model, task, seed, cfg)
    prompts = train.prompts + test.prompts
    counts = np.concatenate([train.counts, test.counts]).astype(float)
    tr_idx, te_idx = np.arange(len(train)), np.arange(len(train), len(prompts))
    feats = residual_features_many(model, prompts, layers, {"last_token": "last"},
                                   batch_size=cfg.batch_size)["last_token"]
    lw = layerwise_ridge(feats, counts, tr_idx, te_idx, seed=seed, device=model.device, groups=prompts)
    geo = geometry_table(lw.probes, model.W_U.detach(), digit_ids, seed=seed)
    preds = {layer: lw.probes[layer].predict(feats[layer][te_idx]).numpy() for layer in layers}
    return TaskProbes(task=task, seed=seed, table=lw.table, geometry=geo, y_test=counts[te_idx], predictions=preds)


def checkpoint_dir(model: Model, cfg: CountingConfig, layers: Sequence[int]) -> Path:
    """The default checkpoint folder of a study: in the user cache, keyed by the model's weights, the canonical
    config and the workbench code, so a resume can only ever continue the same study run by the same code."""
    spec = json.dumps(jsonable({"config": asdict(cfg), "layers": list(layers), "weights": model.weights_hash,
                                "code": code_fingerprint()}), sort_keys=True)
    return cache_root() / "checkpoints" / "counting" / f"{model_key(model)}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


class _Checkpoint(UnitCheckpoint):
    """One unit per finished (seed, task): its table rows (JSON) and count direction (safetensors), written
    atomically, the JSON last. ``spec`` must match the folder's or the folder is refused."""

    KIND = "counting-checkpoint"

    def __init__(self, folder: Path, spec: dict):
        super().__init__(folder, spec, kind=self.KIND)

    def _paths(self, seed: int, task: str) -> tuple[str, Path]:
        stem = f"seed{seed}-{safe_segment(task)}"
        return stem, self.path(stem, ".safetensors")

    def load_unit(self, seed: int, task: str, rows: dict, directions: dict) -> bool:
        stem, tensors = self._paths(seed, task)
        unit = self.load(stem)
        if unit is None:
            return False
        if not tensors.is_file() or sha256_file(tensors) != unit["direction_sha256"]:
            return False  # damaged: the unit runs again
        for name, new in unit["rows"].items():  # order-preserving forms: JSON files are written with sorted keys
            rows[name].extend(pd.DataFrame(r["data"], columns=r["columns"]) if name in _FRAME_ROWS else dict(r)
                              for r in new)
        directions.setdefault(seed, {})[task] = load_file(str(tensors))["direction"]
        return True

    def save_unit(self, seed: int, task: str, rows: dict, marks: dict, direction: torch.Tensor) -> None:
        stem, tensors = self._paths(seed, task)
        data = save({"direction": direction.detach().cpu().contiguous()})
        atomic_write_bytes(tensors, data)
        new = {name: [{"columns": list(r.columns), "data": r.to_numpy().tolist()} if name in _FRAME_ROWS
                      else list(r.items()) for r in v[marks[name]:]] for name, v in rows.items()}
        self.save(stem, {"seed": seed, "task": task, "rows": jsonable(new),
                         "direction_sha256": hashlib.sha256(data).hexdigest()})


_FRAME_ROWS = ("probes", "geometry", "lens", "controls", "steering")  # rows kept as DataFrames (the others are dicts)


def run_counting_study(cfg: CountingConfig | None = None, *, model: Model | None = None,
                       progress: bool = True, checkpoint: bool | str | os.PathLike = False) -> CountingResult:
    """Run the counting protocol on one model (see module docstring). ``model`` overrides ``cfg.model``.

    checkpoint: ``True`` keeps each finished (seed, task) unit in the user cache (:func:`checkpoint_dir`), a path
    keeps them there; a rerun of the same study (same config, layers and weights) loads the finished units and runs
    only the rest, with identical results. ``False`` (default): nothing is kept."""
    cfg = cfg or CountingConfig()
    phases = Phases()
    model = model or load_model(cfg.model)
    L = model.n_layers
    if cfg.layers is None and cfg.smoke:
        layers = sorted(set(range(0, L + 1, max(1, L // 6))) | {L})  # a handful of layers: seconds, not minutes
    else:
        layers = check_layers(cfg.layers, L)
    if L not in layers:
        layers.append(L)  # the last layer feeds the digit-row repair
    W_U = model.W_U.detach()
    probe_rows, geo_rows, lens_rows, acc_rows, extra_rows, angle_rows = [], [], [], [], [], []
    timings = phases.timings

    jobs = [(seed, task) for seed in cfg.seeds for task in cfg.tasks]
    # Validate every task's answers for this tokenizer before any heavy work.
    for task in cfg.tasks:
        answer_setup(model, task, make_task(task, 1, seed=0).prompts[0])
    directions_by_seed: dict[int, dict[str, torch.Tensor]] = {}
    lora_cache: dict = {}  # (seed, tasks) -> the trained adapter, so a joint adapter is trained once per seed
    digit_ids_any = None
    control_rows, steer_rows = [], []
    rows = {"probes": probe_rows, "geometry": geo_rows, "lens": lens_rows, "accuracy": acc_rows,
            "extras": extra_rows, "controls": control_rows, "steering": steer_rows}
    ckpt = None
    if checkpoint:
        folder = checkpoint_dir(model, cfg, layers) if checkpoint is True else Path(checkpoint)
        ckpt = _Checkpoint(folder, {"config": asdict(cfg), "layers": layers, "weights_sha256": model.weights_hash})
    bar = tqdm(jobs, desc=f"counting {model.name}", disable=not progress)
    for seed, task in bar:
        bar.set_postfix(task=task, seed=seed)
        ts, train, test, digit_ids = _make_sets(model, task, seed, cfg)
        ordered = _ordered(ts, seed, cfg)  # train then test prompts, the row order of the features
        if ckpt is not None and ckpt.load_unit(seed, task, rows, directions_by_seed):
            digit_ids_any = digit_ids
            timings["resumed_units"] = timings.get("resumed_units", 0) + 1
            continue  # this (seed, task) finished in an earlier, interrupted run
        marks = {name: len(v) for name, v in rows.items()}
        digit_ids_any = digit_ids
        everything = train.prompts + test.prompts
        counts = np.concatenate([train.counts, test.counts])
        tr_idx = np.arange(len(train))
        te_idx = np.arange(len(train), len(everything))
        key = dict(task=task, seed=seed)

        variants, test_cache = phases.run("features", unit_features, model, train, test, task, layers, cfg)
        feats = variants["last_token"]
        tables, main = phases.run("probes", unit_probes, model, variants, counts, tr_idx, te_idx, seed, cfg,
                                  ordered.prompts)
        probe_rows += [_rank_rows(t, **key) for t in tables]
        best = int(main.table.loc[main.table.r2_val.idxmax(), "layer"])
        best_probe = main.probes[best]
        directions_by_seed.setdefault(seed, {})[task] = best_probe.direction_raw
        facts = {"best_layer": best, "best_layer_r2_test": float(main.table.set_index("layer").r2_test[best]),
                 "prompt_suffix_space": float(ts.prompts[0].endswith(" ")),
                 "n_test_units": len(set(test.prompts)), "n_train_units": len(set(train.prompts))}

        with phases("controls"):
            facts |= best_layer_null(feats, counts, tr_idx, te_idx, main.probes, ordered.prompts, seed,
                                     cfg.n_layer_permutations, device=model.device)
            ctrl, residual = nuisance_controls(model, ordered, feats, counts, tr_idx, te_idx, best, seed,
                                               n_shuffles=cfg.n_shuffles, device=model.device)
            control_rows.append(_rank_rows(ctrl, variant="plain", **key))
            probe_rows.append(_rank_rows(residual.assign(variant="residual"), **key))
        with phases("decoupled"):
            dec_tables, dec_ctrl, dec_facts = decoupled_probes(
                model, task, seed, cfg.n_train, cfg.n_test, layers, cfg.batch_size, n_shuffles=cfg.n_shuffles,
                device=model.device, plain=(ordered, feats))
            probe_rows += [_rank_rows(t, **key) for t in dec_tables]
            control_rows.append(_rank_rows(dec_ctrl, variant="decoupled", **key))
            facts |= dec_facts

        with phases("geometry"):
            geo, geo_facts = readout_geometry(model, feats, main.probes, counts, tr_idx, best, digit_ids,
                                              ordered.prompts, seed, cfg.n_permutations)
            geo_rows.append(_rank_rows(geo, **key))
            facts |= geo_facts
        extra_rows += [key | {"key": k, "value": v} for k, v in facts.items()]
        if cfg.probes_root:
            save_probe(best_probe, probe_dir(model.name, task, f"seed{seed}_layer{best}", cfg.probes_root),
                       model=model, site=layer_site(best), layer=best, task=task, generator_params=ts.params,
                       seed=seed, metrics=main.table.set_index("layer").loc[best].to_dict(),
                       overwrite=True)  # the study was asked to save: it refreshes its own probe folders

        def evaluate(method, m=model, edits=None):
            with phases(f"eval_{method}"):
                ev = evaluate_answers(m, test.prompts, test.counts, digit_ids, edits=edits, gen_tokens=cfg.gen_tokens,
                                      batch_size=cfg.batch_size, cache=test_cache if m is model else None)
                acc_rows.append(key | {"method": method} | ev.accuracy() | _accuracy_intervals(ev.items, test))
                lens_rows.append(_rank_rows(ev.ranks_by_layer(), method=method, **key))
            return ev

        evaluate("baseline")
        best_row = main.table.set_index("layer").loc[best]
        acc_rows.append(key | {"method": "probe_round", "digit_restricted": float(best_row.round_acc_test),
                               "full_vocab": np.nan, "generation": np.nan,
                               "digit_restricted_lo": float(best_row.round_acc_lo),
                               "digit_restricted_hi": float(best_row.round_acc_hi),
                               "n_units": int(best_row.n_test_units)})

        if "digit_rows" in cfg.interventions:
            with phases("train_digit_rows"):
                normed = model.final_norm(feats[L][tr_idx].to(model.device, model.dtype)).detach()
                repair = train_digit_rows(model, normed, torch.as_tensor(train.counts - 1), digit_ids,
                                          steps=cfg.repair_steps, seed=seed)
            extra_rows.append(key | {"key": "digit_rows_params", "value": repair.n_params})
            with repair.applied(model):
                evaluate("digit_rows")

        if "lora_qv" in cfg.interventions:
            scope_tasks = cfg.tasks if cfg.lora_scope == "joint" else (task,)
            with phases("train_lora"):
                if (seed, scope_tasks) not in lora_cache:
                    lora_cache.clear()  # one adapter in memory at a time
                    lora_cache[(seed, scope_tasks)] = lora_adapter(model, scope_tasks, seed, cfg)
            lora = lora_cache[(seed, scope_tasks)]
            extra_rows += [key | {"key": "lora_params", "value": lora.n_params},
                           key | {"key": "lora_final_loss", "value": float(np.mean(lora.losses[-10:]))},
                           key | {"key": "lora_pool_tasks", "value": len(scope_tasks)}]
            evaluate("lora_qv", m=lora.model)

        if "steering" in cfg.interventions:
            with phases("select_steering"):
                site = layer_site(best)
                scale = float(feats[best][tr_idx].norm(dim=-1).mean())
                n_sel = min(cfg.steer_select_n, len(train))
                alpha, curve = _select_steering_alpha(model, site, best_probe.direction_raw, scale,
                                                      train.prompts[:n_sel], train.counts[:n_sel], digit_ids, cfg)
            extra_rows += [key | {"key": "steer_alpha_rel", "value": alpha},
                           key | {"key": "steer_alpha_abs", "value": alpha * scale}]
            extra_rows += [key | {"key": f"steer_train_acc@{a}", "value": v} for a, v in curve.items()]
            with phases("steering_controls"):
                steer, steer_facts = steering_controls(
                    model, test, digit_ids, feats, counts, tr_idx, best, best_probe, alpha * scale, seed,
                    n_null=cfg.n_null, n_prompts=cfg.n_steer_prompts, batch_size=cfg.batch_size)
            steer_rows.append(_rank_rows(steer, **key))
            extra_rows += [key | {"key": k, "value": v} for k, v in steer_facts.items()]
        if ckpt is not None:
            ckpt.save_unit(seed, task, rows, marks, directions_by_seed[seed][task])

    # Principal angles between the span of the count directions (all tasks, best layers) and the digit rows.
    digit_rows = W_U[digit_ids_any].detach().double().T.cpu()  # [d, 9]
    # A task whose best layer has constant features (e.g. the embedding of a shared last token) has a zero
    # direction: it spans nothing, so it is left out of the span, loudly, and the row names the tasks used.
    for seed, dirs in directions_by_seed.items():
        live = {t: d for t, d in dirs.items() if float(d.norm()) > 0}
        if len(live) < len(dirs):
            warnings.warn(f"seed {seed}: the count direction of {sorted(set(dirs) - set(live))} is zero (constant "
                          "features at its best layer); it is left out of the principal angles", stacklevel=2)
        if not live:
            continue
        A = torch.stack([d.double() for d in live.values()], dim=1)  # [d, n_tasks]
        for i, deg in enumerate(principal_angles(A, digit_rows).tolist()):
            angle_rows.append({"seed": seed, "angle_index": i, "degrees": deg, "tasks": ",".join(live)})
    pct = row_norm_percentiles(W_U, digit_ids_any)
    norm_rows = [{"digit": k + 1, "token": model.tokenizer.convert_ids_to_tokens(t), "percentile": float(p)}
                 for k, (t, p) in enumerate(zip(digit_ids_any, pct.tolist()))]
    lora_cache.clear()
    return CountingResult(
        config=asdict(cfg) | {"layers": layers},
        model=model.name,
        weights_hash=model.weights_hash,
        tied_head=model.arch.tied,
        d_model=model.d_model,
        n_layers=L,
        probes=pd.concat(probe_rows, ignore_index=True),
        geometry=pd.concat(geo_rows, ignore_index=True),
        lens=pd.concat(lens_rows, ignore_index=True),
        accuracy=pd.DataFrame(acc_rows),
        extras=pd.DataFrame(extra_rows),
        controls=pd.concat(control_rows, ignore_index=True) if control_rows else pd.DataFrame(),
        steering=pd.concat(steer_rows, ignore_index=True) if steer_rows else pd.DataFrame(),
        angles=pd.DataFrame(angle_rows),
        norm_percentiles=pd.DataFrame(norm_rows),
        timings=phases.finish() | {"random_baseline": random_baseline(model.d_model)},
    )


def lens_peaks(lens: pd.DataFrame) -> pd.DataFrame:
    """The peak layers of the logit lens, per task, seed and method, from the lens table (layer, median_rank,
    mean_prob, lens_accuracy): the layer where the gold digit's mean probability is highest, the layer of its best
    (lowest) median rank, and of the highest lens accuracy, with those values; ties go to the earliest layer."""
    missing = {"task", "seed", "method", "layer", "median_rank", "mean_prob", "lens_accuracy"} - set(lens.columns)
    if missing:
        raise ValueError(f"the lens table lacks column(s) {sorted(missing)}")
    rows = []
    for (task, seed, method), g in lens.groupby(["task", "seed", "method"], sort=False):
        g = g.sort_values("layer").reset_index(drop=True)
        p, r, a = g.loc[g.mean_prob.idxmax()], g.loc[g.median_rank.idxmin()], g.loc[g.lens_accuracy.idxmax()]
        rows.append({"task": task, "seed": seed, "method": method,
                     "peak_prob_layer": int(p.layer), "peak_prob": float(p.mean_prob),
                     "best_rank_layer": int(r.layer), "best_median_rank": float(r.median_rank),
                     "peak_accuracy_layer": int(a.layer), "peak_lens_accuracy": float(a.lens_accuracy),
                     "last_layer_median_rank": float(g.median_rank.iloc[-1])})
    return pd.DataFrame(rows)


TABLES = ("probes", "geometry", "lens", "accuracy", "extras", "angles", "norm_percentiles", "controls", "steering")


def save_counting_result(result: CountingResult, out_dir: str | Path) -> dict[str, Path]:
    """Write every table of ``result`` (and the seed summary) as CSV into ``out_dir``; returns the paths."""

    tables = {name: getattr(result, name) for name in TABLES} | {"accuracy_summary": result.summary(),
                                                                 "lens_peaks": result.lens_peaks(),
                                                                 "controls_summary": result.control_summary()}
    paths = write_result_tables(out_dir, tables, {
        "model": result.model, "weights_hash": result.weights_hash, "tied_head": result.tied_head,
        "d_model": result.d_model, "n_layers": result.n_layers, "config": result.config, "timings": result.timings,
        "random_baseline_abs_cos": math.sqrt(2 / (math.pi * result.d_model)),
    })
    paths["summary"] = paths.pop("accuracy_summary")
    return paths
