"""The latent-drift study: every mode on the same items, drift metrics per step, accuracy against n_steps, on the
base model and on the models trained to reason.

:func:`run_drift_study` runs, for one model and task:

1. every mode of :mod:`workbench.methods.latent` at ``n_steps`` (``direct`` with none), instrumented at every layer;
2. the drift metrics of :mod:`workbench.studies.latent_drift.metrics` per step, the lens as a step x layer table,
   fact retention, and fact retention against the operands (the value's probe against the mirror chain's);
3. accuracy against the number of steps, for each thinking mode at every value of ``steps_grid``;
4. with ``trained``: the same on the adapters of :mod:`workbench.studies.latent_drift.training` (CoT, Coconut's
   curriculum, direct), Soft Thinking's reliance test on the CoT-trained model, and every shipped adapter's accuracy
   by hop count from its card (:func:`trained_models`, :func:`adapter_accuracy`).

Results are small dataframes in :class:`DriftResult`; :func:`save_drift_result` writes them as CSV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.data.reasoning import REASONING_TASKS, make_reasoning_task
from workbench.io.figures import write_result_tables
from workbench.io.artifact import read_artifact, read_card
from workbench.methods.latent import MAX_STEPS, MODES, LatentConfig, parse_reliance_variant, run_latent
from workbench.methods.reasoner import CARD_FILE as REASONER_CARD
from workbench.methods.reasoner import (
    REASONER_KIND,
    TRAIN_MODES,
    ReasonerConfig,
    chain_tokens,
    ReasonerError,
    adapter_name,
    load_reasoner,
    reasoner_dir,
)
from workbench.methods.stats import mean_ci, wilson_ci
from workbench.studies.latent_drift import plots
from workbench.studies.latent_drift.metrics import (
    fact_retention,
    lens_by_step_layer,
    lens_metrics,
    manifold_metrics,
    operand_controlled_retention,
    retention_beyond_operands,
    step_summary,
)
from workbench.studies.latent_drift.training import base_accuracy, evaluation_sets, heuristic_accuracy
from workbench.studies.notebook import (
    ConfigError,
    NotebookConfig,
    Phases,
    choice,
    each_in,
    each_int,
    each_number,
    int_range,
    positive_int,
)


@dataclass
class DriftConfig(NotebookConfig):
    # notebook 04's parameters -> fields (see workbench.studies.notebook); a smoke run sizes the last three itself
    NOTEBOOK = {"model": "model", "modes": "modes", "task": "task", "n_hops": "n_hops", "soft": "soft",
                "seed": "seed", "n_steps": "n_steps", "steps_grid": "steps_grid", "n_items": "n_items",
                "trained": "trained", "adapter_seed": "adapter_seed", "adapters_root": "adapters_root",
                "reliance": "reliance", "gumbel_taus": "gumbel_taus", "split_seeds": "split_seeds",
                "wide_mixture": "wide_mixture"}
    SMOKE_SIZED = ("n_steps", "steps_grid", "n_items")

    model: str = DEFAULT_MODEL
    task: str = choice("arithmetic", REASONING_TASKS)
    modes: tuple[str, ...] = each_in(MODES, MODES, non_empty=True)
    n_steps: int = int_range(6, 1, MAX_STEPS)  # thinking steps of the instrumented runs
    n_hops: int = 2  # reasoning steps the task needs (arithmetic operations / graph edges): a=3; b=a+4; c=b*2
    n_items: int = positive_int(100, minimum=8)  # >= 8: fact retention splits them
    # accuracy against n_steps (uninstrumented metrics only)
    steps_grid: tuple[int, ...] = each_int((1, 2, 4, 6, 8), lo=1, hi=MAX_STEPS)
    retention_layer: int | None = None  # None: the middle layer
    seed: int = 0
    soft: dict = field(default_factory=dict)  # LatentConfig overrides for mode "soft" (e.g. gumbel_tau=0.5)
    # the trained models (workbench train-reasoner), from probes/<model>/reasoning/<mode>-s<adapter_seed>; () (the
    # default): the base model only. Notebook 04 asks for all three on the default model, which ships them.
    trained: tuple[str, ...] = each_in((), TRAIN_MODES)
    adapter_seed: int = int_range(0, 0, 99)
    adapters_root: str | None = None  # the folder holding probes/ (None: the checkout)
    # Soft Thinking's reliance test on the CoT-trained model (workbench.methods.latent.reliance_weights)
    reliance: tuple[str, ...] = ("top1", "top2", "top3", "drop1", "gumbel0.5", "gumbel1", "gumbel2")
    # a second Soft Thinking run on the CoT-trained model with a wider mixture (overrides of LatentConfig): with the
    # paper's filters (T 0.6, top-p 0.95, min-p 0.001) a confident model's mixture is one token; {} skips it
    wide_mixture: dict = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "min_p": 0.0})
    gumbel_taus: tuple[float, ...] = each_number((0.5, 1.0, 2.0), above=0)  # whole-loop accuracy with this noise
    split_seeds: tuple[int, ...] = each_int((0, 1, 2), lo=0, non_empty=True)  # the operand-controlled probes' splits
    batch_size: int = 50  # decoding is bound by reading the weights: big batches cut the number of passes
    smoke: bool = False

    def __post_init__(self):
        super().__post_init__()
        LatentConfig(mode="soft", n_steps=1, **self.soft)  # bad Soft Thinking options fail here, before any forward
        LatentConfig(mode="soft", n_steps=1, **self.wide_mixture)  # bad overrides fail here too
        self.reliance = tuple(self.reliance)
        for v in self.reliance:
            parse_reliance_variant(v)
        if self.trained and self.task != "arithmetic":
            raise ConfigError(f"the trained models were taught task 'arithmetic'; task={self.task!r} needs "
                              "trained=[]", ["trained", "task"])
        if self.trained:  # missing adapters fail here, before any model loads
            for mode in self.trained:
                folder = reasoner_dir(self.model, adapter_name(mode, self.adapter_seed), self.adapters_root)
                if not (folder / REASONER_CARD).is_file():
                    raise ConfigError(f"no {mode} adapter for {self.model} at {folder}: train it with `workbench "
                                      f"train-reasoner --model {self.model} --seeds {self.adapter_seed}`, or set "
                                      "trained=[]", ["trained"])

    @classmethod
    def smoke_config(cls, **overrides) -> DriftConfig:
        base = dict(n_items=16, n_steps=3, steps_grid=(1, 2), smoke=True)
        return cls(**(base | overrides))


@dataclass
class DriftResult:
    config: dict
    model: str
    weights_hash: str
    steps: pd.DataFrame  # mode, step, medians of the drift metrics, n_items
    manifold: pd.DataFrame  # mode, item, step, max_cos, nearest, norm_ratio, knn_dist, prev_cos
    lens: pd.DataFrame  # mode, step, layer, median gold rank, mean gold prob, median entropy, readable fraction
    retention: pd.DataFrame  # mode, fact_step, eval_step, gap, r2, round_acc
    retention_operands: pd.DataFrame  # model, mode, step, fact: probe vs operand baseline, beyond with CI
    accuracy: pd.DataFrame  # mode, n_steps, accuracy, n_items
    items: pd.DataFrame  # mode, item, answer text, parsed, correct, thought text
    reliance: pd.DataFrame = field(default_factory=pd.DataFrame)  # variant: KL, argmax agreement, accuracy, CIs
    trained_accuracy: pd.DataFrame = field(default_factory=pd.DataFrame)  # model, mode, n_steps, accuracy, CI
    # every shipped adapter's accuracy by hop count, as its card records it (all seeds): see adapter_accuracy
    adapter_accuracy: pd.DataFrame = field(default_factory=pd.DataFrame)
    timings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Accuracy as a mode x n_steps table (``direct`` in the 0 column)."""
        return accuracy_table(self)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables a notebook records in its manifest (all tables go to CSV by ``save_drift_result``)."""
        out = {"accuracy_table": self.summary().reset_index(), "drift_by_step_table": self.steps}
        if not self.trained_accuracy.empty:
            out["trained_accuracy_table"] = self.trained_accuracy
        if not self.reliance.empty:
            out["reliance_table"] = self.reliance
        if not self.adapter_accuracy.empty:
            out["adapter_accuracy_table"] = self.adapter_accuracy
        if not self.retention_operands.empty:
            out["retention_operands_table"] = self.retention_operands
        return out

    def figures(self) -> dict[str, go.Figure]:
        """Drift metrics by step, the lens by step and layer, accuracy by steps, and retention if measured."""
        figures = {
            "drift_by_step": plots.drift_by_step(self.steps),
            "lens_step_layer": plots.lens_step_layer(self.lens),
            "accuracy_by_steps": plots.accuracy_by_steps(self.accuracy),
        }
        if not self.retention.empty:
            figures["retention_by_gap"] = plots.retention_by_gap(self.retention)
        if not self.retention_operands.empty:
            figures["retention_beyond_operands"] = plots.retention_beyond_operands(self.retention_operands)
        if not self.reliance.empty:
            figures["soft_reliance"] = plots.soft_reliance(self.reliance)
        if not self.adapter_accuracy.empty:
            figures["trained_accuracy_by_hops"] = plots.accuracy_by_hops(self.adapter_accuracy)
        return figures

    def save(self, out_dir: str | Path, model: Model | None = None) -> dict[str, Path]:
        """Every table as CSV plus ``study.json`` (:func:`save_drift_result`; ``model`` is not needed)."""
        return save_drift_result(self, out_dir)


def _loop_config(cfg: DriftConfig, mode: str, n: int, **extra) -> LatentConfig:
    extra = (cfg.soft if mode == "soft" else {}) | extra
    return LatentConfig(mode=mode, n_steps=0 if mode == "direct" else n, seed=cfg.seed, batch_size=cfg.batch_size,
                        **extra)


def instrumented_mode(model: Model, rs, cfg: DriftConfig, mode: str, layer: int, *, label: str | None = None,
                      loop: LatentConfig | None = None, steps_per_hop: int = 1, reliance: Sequence[str] = ()
                      ) -> dict:
    """Phase ``run_<label>``: one loop at ``n_steps`` (or ``loop``), instrumented: its accuracy row, items, and
    (thinking modes) the drift metrics per step, the lens by step and layer and, on arithmetic, fact retention at
    ``layer`` with and without the operand control. ``label`` names the run in every frame (default: the mode);
    ``steps_per_hop``: loop steps per reasoning step (the lens's gold intermediate of step k is hop
    ceil(k / steps_per_hop)); ``reliance``: Soft Thinking's reliance variants (soft only)."""
    label = label or mode
    loop = loop or _loop_config(cfg, mode, cfg.n_steps)
    run = run_latent(model, rs, loop, reliance=reliance)
    n = loop.n_steps
    out = {"accuracy": {"mode": label, "n_steps": n, "accuracy": run.accuracy, "n_items": len(rs)},
           "items": run.items.assign(mode=label)}
    if reliance:
        out["reliance_steps"] = run.reliance.assign(mode=label)
    if mode != "direct":
        man = manifold_metrics(model, run)
        lz = lens_metrics(model, run, rs, steps_per_hop=steps_per_hop)
        out |= {"steps": step_summary(man, lz, run).assign(mode=label), "manifold": man.assign(mode=label),
                "lens": lens_by_step_layer(lz).assign(mode=label)}
        if cfg.task == "arithmetic":
            out["retention"] = fact_retention(run, rs, layer, seed=cfg.seed).assign(mode=label)
            rows = operand_controlled_retention(run, rs, layer, split_seeds=cfg.split_seeds)
            if not rows.empty:
                out["retention_operands"] = retention_beyond_operands(rows).assign(mode=label)
    return out


def steps_grid_accuracy(model: Model, rs, cfg: DriftConfig, grid: list[tuple[str, int]], bar=None) -> list[dict]:
    """Phase ``steps_grid``: accuracy of each (thinking mode, step count) of ``grid`` (uninstrumented)."""
    rows = []
    for mode, n in grid:  # n_steps itself was measured by the instrumented runs
        if bar is not None:
            bar.set_postfix_str(f"{mode}, {n} steps")
        run = run_latent(model, rs, _loop_config(cfg, mode, n))
        rows.append({"mode": mode, "n_steps": n, "accuracy": run.accuracy, "n_items": len(rs)})
        if bar is not None:
            bar.update()
    return rows


def adapter_accuracy(model_name: str, root: str | None = None, *, base: Model | None = None) -> pd.DataFrame:
    """The accuracy every adapter in ``probes/<model>/reasoning/`` records in its card (measured as stored, on
    held-out chains, at training time), one row per (adapter, evaluation): all seeds, Coconut by stage. Each card's
    hashes are checked first. With ``base`` (the untrained model), its accuracy on the same held-out sets (rebuilt
    from the cards' evaluation settings) is added as adapter ``base`` (:func:`training.base_accuracy`), and the
    answer-without-computing floors as adapter ``heuristic`` (:func:`training.heuristic_accuracy`)."""
    folder = reasoner_dir(model_name, "x", root).parent
    rows, settings = [], set()
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        card = read_artifact(sub, REASONER_KIND, error=ReasonerError)
        settings.add((card["task"], tuple(card["eval_hops"]), card["n_eval_per_hop"], card["eval_seed"]))
        for r in card.get("accuracy", []):
            rows.append({"adapter": sub.name, **r, "training_seconds": card.get("training_seconds")})
    out = pd.DataFrame(rows)
    if base is not None and settings:
        if len(settings) > 1:
            raise ValueError(f"the adapters in {folder} were evaluated on different sets {sorted(settings)}: "
                             "retrain them with one recipe")
        task, hops, n, seed = settings.pop()
        sets = evaluation_sets(task, hops, n, seed=seed)
        out = pd.concat([out, base_accuracy(base, sets).assign(adapter="base"),
                         heuristic_accuracy(sets).assign(adapter="heuristic")], ignore_index=True)
    return out


def _accuracy_row(model_label: str, mode: str, latent_run, **extra) -> dict:
    k, n = int(latent_run.items.correct.sum()), len(latent_run.items)
    ci = wilson_ci(k, n)
    return {"model": model_label, "mode": mode, **extra, "n_items": n, "correct": k, "accuracy": k / n,
            "ci_low": ci.lo, "ci_high": ci.hi}


def trained_models(cfg: DriftConfig, rs, layer: int, *, progress: bool = True) -> dict[str, list]:
    """Phase ``trained``: the adapters of ``cfg.trained`` (seed ``adapter_seed``), each merged into a fresh base.

    - ``cot``: its chain of thought (the steps' tokens, then the answer cue), instrumented (label ``cot-trained``);
      Soft Thinking on it (marker: the CoT cue, same number of steps; label ``soft-on-cot``) with the reliance test
      at every step, and the whole loop's accuracy with the top token only (``top1``: the greedy chain again) and
      with Gumbel noise at each of ``gumbel_taus``;
    - ``coconut``: continuous thought at ``n_steps`` instrumented (label ``coconut-trained``), and its accuracy at
      every step count of ``steps_grid`` and at the trained count;
    - ``direct``: its accuracy.
    Accuracy rows carry Wilson intervals (``trained_accuracy``); the reliance frame pools every (item, step):
    mean KL with a bootstrap interval over items, argmax agreement, and the whole-loop accuracy of the variant.
    """
    out: dict[str, list] = {k: [] for k in ("steps", "manifold", "lens", "retention", "retention_operands",
                                            "items", "trained_accuracy", "reliance")}
    for mode in cfg.trained:
        folder = reasoner_dir(cfg.model, adapter_name(mode, cfg.adapter_seed), cfg.adapters_root)
        model = load_reasoner(folder)
        label = f"{mode}-s{cfg.adapter_seed}"
        rc = ReasonerConfig(**read_card(folder / REASONER_CARD)["recipe"])
        if mode == "direct":
            run = run_latent(model, rs, _loop_config(cfg, "direct", 0))
            out["trained_accuracy"].append(_accuracy_row(label, "direct", run, n_steps=0))
            out["items"].append(run.items.assign(mode="direct-trained"))
            continue
        if mode == "cot":
            n_tok = chain_tokens(model.tokenizer, rs)
            per_hop = max(1, n_tok // cfg.n_hops)
            res = instrumented_mode(model, rs, cfg, "cot", layer, label="cot-trained", steps_per_hop=per_hop,
                                    loop=_loop_config(cfg, "cot", n_tok))
            _collect(out, res)
            out["trained_accuracy"].append(_accuracy_row(label, "cot", _Acc(res["items"]), n_steps=n_tok))
            mixtures = {"soft-on-cot": {}} | ({"soft-on-cot (wide)": dict(cfg.wide_mixture)} if cfg.wide_mixture
                                             else {})
            for run_label, mix in mixtures.items():
                soft = dict(bot=rs.cot_cue, eot="") | mix
                res = instrumented_mode(model, rs, cfg, "soft", layer, label=run_label, steps_per_hop=per_hop,
                                        loop=_loop_config(cfg, "soft", n_tok, **soft), reliance=cfg.reliance)
                _collect(out, res)
                base_acc = _accuracy_row(label, "soft", _Acc(res["items"]), n_steps=n_tok, variant="mixture",
                                         run=run_label)
                out["trained_accuracy"].append(base_acc)
                whole = {"top1": dict(keep_top_n=1)} | {f"gumbel{t:g}": dict(gumbel_tau=float(t))
                                                        for t in cfg.gumbel_taus}
                acc_rows = {}
                for variant, over in whole.items():
                    run = run_latent(model, rs, _loop_config(cfg, "soft", n_tok, **(soft | over)))
                    acc_rows[variant] = _accuracy_row(label, "soft", run, n_steps=n_tok, variant=variant,
                                                      run=run_label)
                    out["trained_accuracy"].append(acc_rows[variant])
                out["reliance"].append(reliance_summary(res["reliance_steps"], acc_rows, base_acc)
                                       .assign(run=run_label, model=label))
        if mode == "coconut":
            res = instrumented_mode(model, rs, cfg, "coconut", layer, label="coconut-trained")
            _collect(out, res)
            trained_n = rc.n_stages * rc.thoughts_per_step
            for n in sorted({trained_n, *cfg.steps_grid, cfg.n_steps}):
                run = run_latent(model, rs, _loop_config(cfg, "coconut", n))
                out["trained_accuracy"].append(_accuracy_row(label, "coconut", run, n_steps=n,
                                                             trained_thoughts=trained_n))
        del model
    return out


class _Acc:
    """A stand-in run for :func:`_accuracy_row` from an instrumented run's items."""

    def __init__(self, items: pd.DataFrame):
        self.items = items


def _collect(out: dict[str, list], res: dict) -> None:
    for name in ("steps", "manifold", "lens", "retention", "retention_operands", "items"):
        if name in res:
            out[name].append(res[name])


def reliance_summary(steps: pd.DataFrame, whole: dict[str, dict], mixture: dict) -> pd.DataFrame:
    """Per reliance variant: mean KL(loop || variant) of the next-step distribution with a bootstrap interval over
    items, the argmax agreement, the share of steps where the variant is defined, and (for ``top1`` and the
    Gumbel variants) the accuracy of the whole loop run with it beside the mixture's."""
    rows = []
    for variant, g in steps.groupby("variant", sort=False):
        d = g[g.defined]
        per_item = d.groupby("item").agg(kl=("kl", "mean"), agree=("argmax_agree", "mean"))
        kl = mean_ci(per_item.kl.to_numpy()) if len(per_item) >= 2 else None
        ag = mean_ci(per_item.agree.astype(float).to_numpy()) if len(per_item) >= 2 else None
        row = {"variant": variant, "n_items": int(d.item.nunique()), "n_steps": int(len(d)),
               "defined_share": float(g.defined.mean()), "kl_mean": float(d.kl.mean()) if len(d) else np.nan,
               "kl_lo": kl.lo if kl else np.nan, "kl_hi": kl.hi if kl else np.nan,
               "argmax_agree": float(d.argmax_agree.astype(float).mean()) if len(d) else np.nan,
               "agree_lo": ag.lo if ag else np.nan, "agree_hi": ag.hi if ag else np.nan,
               "mixture_accuracy": mixture["accuracy"]}
        if variant in whole:
            row |= {"loop_accuracy": whole[variant]["accuracy"], "loop_ci_low": whole[variant]["ci_low"],
                    "loop_ci_high": whole[variant]["ci_high"]}
        rows.append(row)
    return pd.DataFrame(rows)


def run_drift_study(cfg: DriftConfig | None = None, *, model: Model | None = None, progress: bool = True) -> DriftResult:
    """Every loop mode on the same items, instrumented at ``n_steps`` (phase ``run_<mode>`` each,
    :func:`instrumented_mode`), then accuracy over ``steps_grid`` (phase ``steps_grid``).
    ``progress``: a tqdm bar over the runs (one per mode, then one per extra step count)."""
    cfg = cfg or DriftConfig()
    phases = Phases()
    model = model or load_model(cfg.model)
    rs = make_reasoning_task(cfg.task, cfg.n_items, n_hops=cfg.n_hops, seed=cfg.seed)
    layer = model.n_layers // 2 if cfg.retention_layer is None else cfg.retention_layer
    if not 0 <= layer <= model.n_layers:
        raise ValueError(f"retention_layer {layer} out of range: 0..{model.n_layers}")
    parts: dict[str, list] = {k: [] for k in ("steps", "manifold", "lens", "retention", "retention_operands",
                                              "accuracy", "items", "trained_accuracy", "reliance")}

    grid = [(mode, n) for mode in cfg.modes if mode != "direct" for n in cfg.steps_grid if n != cfg.n_steps]
    bar = tqdm(total=len(cfg.modes) + len(grid), desc=f"drift {model.name}", unit="run", disable=not progress)
    for mode in cfg.modes:
        bar.set_postfix_str(f"{mode}, {cfg.n_steps} steps, instrumented")
        reliance = cfg.reliance if mode == "soft" and cfg.trained else ()  # beside the trained model's test
        res = phases.run(f"run_{mode}", instrumented_mode, model, rs, cfg, mode, layer, reliance=reliance)
        if reliance:
            mixture = {"accuracy": float(res["items"].correct.mean())}
            parts["reliance"].append(reliance_summary(res.pop("reliance_steps"), {}, mixture)
                                     .assign(run="soft (base model)", model="base"))
        for name, value in res.items():
            parts[name].append(value)
        bar.update()
    parts["accuracy"] += phases.run("steps_grid", steps_grid_accuracy, model, rs, cfg, grid, bar)
    bar.close()
    adapters = pd.DataFrame()
    if cfg.trained:
        trained = phases.run("trained", trained_models, cfg, rs, layer, progress=progress)
        for name, frames in trained.items():
            parts[name] += frames
        adapters = phases.run("adapter_accuracy", adapter_accuracy, cfg.model, cfg.adapters_root, base=model)
    timings = phases.finish()

    def cat(frames, first=("mode",)):
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True)
        return df[list(first) + [c for c in df.columns if c not in first]]

    return DriftResult(
        config=asdict(cfg) | {"retention_layer": layer},
        model=model.name,
        weights_hash=model.weights_hash,
        steps=cat(parts["steps"]),
        manifold=cat(parts["manifold"]),
        lens=cat(parts["lens"]),
        retention=cat(parts["retention"]),
        retention_operands=cat(parts["retention_operands"]),
        reliance=cat(parts["reliance"], first=("run", "variant")),
        trained_accuracy=cat([pd.DataFrame(parts["trained_accuracy"])] if parts["trained_accuracy"] else [],
                             first=("model", "mode")),
        accuracy=cat([pd.DataFrame(parts["accuracy"]).sort_values(["mode", "n_steps"])]),
        items=cat(parts["items"]),
        adapter_accuracy=adapters,
        timings=timings,
    )


TABLES = ("steps", "manifold", "lens", "retention", "retention_operands", "accuracy", "items", "reliance",
          "trained_accuracy", "adapter_accuracy")


def save_drift_result(result: DriftResult, out_dir: str | Path) -> dict[str, Path]:
    """Every table as CSV plus ``study.json`` (model, weights hash, config, timings) in ``out_dir``."""

    return write_result_tables(out_dir, {name: getattr(result, name) for name in TABLES}, {
        "model": result.model, "weights_hash": result.weights_hash, "config": result.config,
        "timings": result.timings})


def accuracy_table(result: DriftResult, modes: Sequence[str] | None = None) -> pd.DataFrame:
    """Accuracy as a mode x n_steps table (``direct`` in the 0 column)."""
    acc = result.accuracy if modes is None else result.accuracy[result.accuracy["mode"].isin(modes)]
    return acc.pivot_table(index="mode", columns="n_steps", values="accuracy")
