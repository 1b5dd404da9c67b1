"""The encoded-vs-expressed study: one gap panel across the three threads, and three replications.

One call (:func:`run_encoded_expressed_study`) runs, on the text model ``cfg.model`` and the VLMs ``cfg.vlms``:

1. the gap panel (:mod:`workbench.methods.encoded_expressed`) for every counting task (per layer), for the latent loops (per latent
   step, :mod:`workbench.studies.encoded_expressed.tasks`) and for the testbed's colour questions on each VLM (per layer);
2. late suppression (arXiv 2604.00778) on every counting task, and the delimiter sweep of arXiv 2605.09239;
3. Soft Thinking's single-threadedness and the Gumbel-softmax remedy (arXiv 2508.03440);
4. the visual integration point and total visual integration (arXiv 2509.23050) of each VLM.

:func:`save_encoded_expressed_result` writes every table as CSV; the notebook ``07_encoded_expressed`` drives it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.core.sites import check_layers, spread_layers
from workbench.data.reasoning import MAX_HOPS, REASONING_TASKS, make_reasoning_task
from workbench.data.tasks import TASKS
from workbench.data.vqa import COLOURS, PRIOR, evaluation_set
from workbench.io.figures import write_result_tables
from workbench.io.artifact import read_card
from workbench.methods.encoded_expressed import gap_panel
from workbench.methods.latent import MAX_STEPS, LatentConfig
from workbench.methods.reasoner import CARD_FILE as REASONER_CARD
from workbench.methods.reasoner import ReasonerConfig, adapter_name, chain_tokens, load_reasoner, reasoner_dir
from workbench.methods.stats import accuracy_ci
from workbench.methods.tuned_lens import TunedLens, load_tuned_lens, tuned_lens_dir
from workbench.studies.encoded_expressed import plots
from workbench.studies.encoded_expressed.replications import (
    DELIMITERS,
    across_models,
    delimiter_sweep,
    held_out_split,
    late_suppression,
    pool_suppression,
    soft_thinking_threads,
    visual_integration,
)
from workbench.studies.encoded_expressed.tasks import VISUAL_SPLITS, counting_task, latent_task, visual_task
from workbench.studies.notebook import (
    ConfigError,
    NotebookConfig,
    Phases,
    as_tuple,
    choice,
    each_in,
    each_int,
    each_number,
    int_range,
    as_tuple_value,
    constrained,
    less_than,
    positive_int,
)

THREADS = ("counting", "latent", "visual")
LATENT_ADAPTER = {"coconut": "coconut", "soft": "cot", "cot": "cot"}  # which trained model runs each loop
LATENT_MODES = ("coconut", "soft", "cot")
TUNED_LENS = ("auto", "none")
TESTBEDS = ("vlm-testbed", "vlm-testbed-balanced")  # the panel's VLMs
# the visual integration point runs on every testbed the workbench can load: both variants and a second trained seed
# of each (a user's real VLM is added with ``vip_vlms``)
VIP_TESTBEDS = (*TESTBEDS, "vlm-testbed-s1", "vlm-testbed-balanced-s1")


@dataclass
class EncodedExpressedConfig(NotebookConfig):
    # notebook 07's parameters -> fields (see workbench.studies.notebook); a smoke run sizes the SMOKE_SIZED ones itself
    NOTEBOOK = {"model": "model", "tasks": "tasks", "vlms": "vlms", "latent_modes": "latent_modes",
                "n_prompts": "n_prompts", "n_train": "n_train", "n_vlm_items": "n_vlm_items",
                "n_latent_items": "n_latent_items", "n_steps": "n_steps", "gumbel_taus": "gumbel_taus",
                "delimiters": "delimiters", "layers": "layers", "tuned_lens": "tuned_lens", "seed": "seed",
                "vip_vlms": "vip_vlms", "extra_seeds": "extra_seeds", "seeded_delimiters": "seeded_delimiters",
                "latent_trained": "latent_trained", "adapter_seed": "adapter_seed", "adapters_root": "adapters_root"}
    SMOKE_SIZED = ("tasks", "layers", "n_prompts", "n_train", "n_vlm_items", "n_latent_items", "n_steps", "gumbel_taus",
                   "delimiters", "extra_seeds")
    RELATIONS = (less_than("n_train", "n_prompts", "held-out rows to score on"),
                 less_than("n_latent_train", "n_latent_items", "held-out rows to score on"),
                 less_than("n_delimiter_train", "n_delimiter", "held-out rows to score on"))

    model: str = DEFAULT_MODEL  # the text model: counting, delimiter sweep, latent loops
    tasks: tuple[str, ...] = each_in(tuple(TASKS), TASKS)  # counting tasks of the panel and of late suppression
    # the VLM panel runs on these (empty: skipped; the grid's other models skip it)
    vlms: tuple[str, ...] = as_tuple(TESTBEDS)
    # the visual integration point (arXiv 2509.23050) runs on these (empty: skipped)
    vip_vlms: tuple[str, ...] = as_tuple(VIP_TESTBEDS)
    latent_modes: tuple[str, ...] = each_in(("coconut", "soft"), LATENT_MODES)  # the per-step panel's modes
    # hidden-state layers of the layer panels (None: all); the MLP sweep of the delimiter replication then ablates
    # only the blocks ending at these layers
    layers: tuple[int, ...] | None = as_tuple(None, optional=True)
    # the per-step panel needs answers 0-9: arithmetic only
    latent_task: str = choice("arithmetic", [t for t in REASONING_TASKS if t == "arithmetic"])
    n_hops: int = int_range(2, 1, MAX_HOPS)
    n_prompts: int = positive_int(300)  # per counting task; n_train of them train the probes, the rest is held out
    n_train: int = positive_int(200)
    n_pairs: int = positive_int(32)  # patching pairs per task (clean = a row the model answers right)
    min_pairs: int = positive_int(8)  # fewer right rows than this: attribution patching over arbitrary pairs instead
    n_vlm_train: int = positive_int(240)  # probe training items (every shape x colour, training images)
    # held-out items per split (prior-violating, prior-consistent, other shapes' colour)
    n_vlm_items: int = positive_int(40)
    n_latent_items: int = positive_int(200)  # arithmetic chains; n_latent_train train the per-step probes
    n_latent_train: int = positive_int(120)
    n_steps: int = int_range(6, 1, MAX_STEPS)
    gumbel_taus: tuple[float, ...] = each_number((0.5, 1.0), above=0)  # the remedy's temperatures (the paper: 0.5)
    delimiters: tuple[str, ...] = constrained(tuple(DELIMITERS), convert=as_tuple_value,
                                              check=lambda v: all(isinstance(d, str) and d for d in v),
                                              allowed="a list of non-empty strs")
    n_delimiter: int = positive_int(135)  # repeated-item prompts per delimiter (90 train the probes)
    n_delimiter_train: int = positive_int(90)
    ablate_last: tuple[int, ...] = each_int((1, 2, 3), lo=1)  # final blocks to ablate
    # "auto": the shipped lens under probes/<model>/tuned-lens when there is one
    tuned_lens: str = choice("auto", TUNED_LENS)
    seed: int = 0
    # further prompt draws (seeds) for late suppression and the delimiter sweep's MLP ablations, beyond ``seed``
    extra_seeds: tuple[int, ...] = each_int((1, 2), lo=0)
    # the delimiters whose MLP sweep runs on every draw (the paper's: space); the others on ``seed`` alone, which
    # keeps the default run within 20 minutes (every draw of every delimiter: 20.5)
    seeded_delimiters: tuple[str, ...] = constrained((" ",), convert=as_tuple_value,
                                                     check=lambda v: all(isinstance(d, str) and d for d in v),
                                                     allowed="a list of non-empty strs")
    # the latent part on the models trained to reason (workbench train-reasoner; probes/<model>/reasoning/): coconut
    # on the Coconut-trained adapter at its trained number of thoughts, soft (Soft Thinking) on the CoT-trained one,
    # fed after its CoT cue for as many steps as the chain's tokens. False (the default): the base model, as before.
    latent_trained: bool = False
    adapter_seed: int = int_range(0, 0, 99)
    adapters_root: str | None = None  # the folder holding probes/ (None: the checkout)
    batch_size: int = positive_int(32)
    smoke: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.latent_trained:  # missing adapters fail here, before any model loads
            for mode in self.latent_modes:
                folder = reasoner_dir(self.model, adapter_name(LATENT_ADAPTER[mode], self.adapter_seed),
                                      self.adapters_root)
                if not (folder / REASONER_CARD).is_file():
                    raise ConfigError(f"latent_trained: no {LATENT_ADAPTER[mode]} adapter for {self.model} at "
                                      f"{folder}; train it with `workbench train-reasoner --model {self.model} --seeds "
                                      f"{self.adapter_seed}`, or set latent_trained=False", ["latent_trained"])

    @classmethod
    def smoke_config(cls, **overrides) -> EncodedExpressedConfig:
        """Small enough for CI: one counting task, few prompts and items, two latent steps, two delimiters."""
        # layers None: four spread over the model's depth at run time
        base = dict(tasks=("list_length",), layers=None, n_prompts=54, n_train=36, n_pairs=4, min_pairs=2,
                    n_vlm_train=48, n_vlm_items=4, n_latent_items=30, n_latent_train=18, n_steps=2, gumbel_taus=(0.5,),
                    delimiters=(", ", " "), n_delimiter=45, n_delimiter_train=27, extra_seeds=(1,),
                    smoke=True)
        return cls(**(base | overrides))


def _layers(cfg: EncodedExpressedConfig, model) -> tuple[int, ...] | list[int] | None:
    """The layers of the panels on ``model``: the config's, or in a smoke run without any, four spread over the
    model's depth (on 30 layers: 0, 10, 20, 30)."""
    return spread_layers(model.n_layers, 4) if cfg.smoke and cfg.layers is None else cfg.layers


@dataclass
class EncodedExpressedResult:
    config: dict
    model: str
    weights_hash: str
    panel: pd.DataFrame  # thread, model, task, axis, index, probe_acc, lens_acc, [tuned_acc], probe_cos, patch_...
    accuracy: pd.DataFrame  # thread, model, task, what the model answers right on the held-out rows
    suppression: pd.DataFrame  # model, task, ablation, n_last, digit_acc, gold_logprob, changes
    delimiter_panel: pd.DataFrame
    delimiter_curves: pd.DataFrame  # delimiter, layer, lens_acc, lens_gold_logprob
    delimiter_sweeps: pd.DataFrame  # delimiter, block, depth, digit_acc, gold_logprob, changes
    delimiter_summary: pd.DataFrame  # delimiter, overwrite layers and depths, the paper's depth
    soft_steps: pd.DataFrame  # gumbel_tau, step, top_share, collapsed, entropy, max_cos
    soft_summary: pd.DataFrame  # gumbel_tau, accuracy, top_share, collapsed, entropy, max_cos
    vip_curves: pd.DataFrame  # model, layer, dist_dependent, dist_independent, gap, tau, dist_last, dist_text
    vip_summary: pd.DataFrame  # model, n_dependent, n_independent, vip, vip_depth, tau, tvi [lo, hi], rho, prior_rate
    vip_items: pd.DataFrame = field(default_factory=pd.DataFrame)  # model, split, item, answers, changes, correct, tvi
    timings: dict = field(default_factory=dict)

    def suppression_verdicts(self) -> pd.DataFrame:
        """The pooled late-suppression rows (over every seed) with their verdicts, the paper's condition first."""
        if self.suppression.empty:
            return pd.DataFrame()
        pooled = self.suppression[self.suppression.seed == "all"]
        cols = ["model", "task", "ablation", "n_last", "paper_condition", "n", "n_distinct", "n_seeds", "base_acc",
                "base_acc_lo", "base_acc_hi", "digit_acc", "digit_acc_lo", "digit_acc_hi", "acc_change",
                "acc_change_lo", "acc_change_hi", "logprob_change", "logprob_change_lo", "logprob_change_hi",
                "flattening_gain", "excess_gain", "excess_gain_lo", "excess_gain_hi", "seeds_up", "base_rank",
                "gold_rank", "rank_change", "rank_change_lo", "rank_change_hi", "base_logprob", "uniform_logp",
                "verdict"]
        return pooled.sort_values(["task", "paper_condition"], ascending=[True, False], kind="stable")[cols]

    def vip_correlation(self) -> pd.DataFrame:
        """Across the VLMs: Pearson r of TVI against the prior rate and against the share of answers the image does
        not change, with n (a handful of models cannot test an across-model correlation; the interval says so)."""
        if self.vip_summary.empty:
            return pd.DataFrame()
        return pd.DataFrame([across_models(self.vip_summary, x, y) for x in ("tvi", "tvi_fixed")
                             for y in ("prior_rate", "blind_agreement")])

    def summary(self) -> pd.DataFrame:
        """Per (thread, model, task): the best held-out probe accuracy and where, the lens's best and its final
        value, and the first layer / step where patching recovers half of the answer."""
        rows = []
        for (thread, model, task), g in self.panel.groupby(["thread", "model", "task"], sort=False):
            best = g.loc[g.probe_acc.idxmax()]
            row = {"thread": thread, "model": model, "task": task, "axis": g.axis.iloc[0],
                   "probe_best": best.probe_acc, "probe_best_lo": best.get("probe_acc_lo", np.nan),
                   "probe_best_hi": best.get("probe_acc_hi", np.nan), "probe_best_at": int(best["index"]),
                   "probe_max_p": best.get("probe_max_p", np.nan), "n_test": best.get("n_test", np.nan),
                   "n_units": best.get("n_units", np.nan), "chance": g.chance.iloc[0],
                   "lens_best": g.lens_acc.max(), "lens_final": g.lens_acc.iloc[-1],
                   "gap": best.probe_acc - g.lens_acc.iloc[-1]}
            if "patch_recovery" in g and g.patch_recovery.notna().any():
                half = g[g.patch_recovery >= 0.5]
                row["patch_half_at"] = int(half["index"].iloc[0]) if len(half) else np.nan
                row["patch_method"] = g.patch_method.dropna().iloc[0]
                row["n_pairs"] = int(g.n_pairs.dropna().iloc[0])
            rows.append(row)
        return pd.DataFrame(rows)

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables a notebook records in its manifest (every table goes to CSV by ``save_encoded_expressed_result``)."""
        return {"summary_table": self.summary(), "suppression_table": self.suppression_verdicts(),
                "delimiter_table": self.delimiter_summary, "soft_table": self.soft_summary,
                "vip_table": self.vip_summary, "vip_correlation": self.vip_correlation()}

    def figures(self) -> dict[str, go.Figure]:
        """The panel of each thread that ran, and each replication that ran."""
        figures = {f"panel_{t}": plots.panel_figure(self.panel, t) for t in THREADS
                   if not self.panel.empty and (self.panel.thread == t).any()}
        if not self.suppression.empty:
            figures["late_suppression"] = plots.suppression_figure(self.suppression)
        if not self.delimiter_curves.empty:
            figures["delimiter_sweep"] = plots.delimiter_figure(self.delimiter_panel, self.delimiter_curves,
                                                                self.delimiter_sweeps, self.delimiter_summary)
        if not self.soft_steps.empty:
            figures["soft_single_threaded"] = plots.soft_threads_figure(self.soft_steps, self.soft_summary)
        if not self.vip_curves.empty and "gap" in self.vip_curves:
            figures["visual_integration"] = plots.integration_figure(self.vip_curves, self.vip_summary)
        return figures

    def save(self, out_dir: str | Path, model: Model | None = None) -> dict[str, Path]:
        """Every table as CSV plus ``study.json`` (:func:`save_encoded_expressed_result`; ``model`` is not needed)."""
        return save_encoded_expressed_result(self, out_dir)


def shipped_tuned_lens(model: Model, setting: str = "auto") -> TunedLens | None:
    """The tuned lens shipped for ``model`` (``probes/<model>/tuned-lens``) or None when there is none or
    ``setting`` is "none". A shipped lens trained on other weights raises (never a silent fallback)."""
    if setting not in TUNED_LENS:
        raise ValueError(f"tuned_lens must be one of {list(TUNED_LENS)}, got {setting!r}")
    folder = tuned_lens_dir(model.name)
    if setting == "none" or not folder.is_dir():
        return None
    return load_tuned_lens(folder, model=model)


def counting_phase(model: Model, cfg: EncodedExpressedConfig, task: str, layers, tuned: TunedLens | None) -> dict:
    """Phase ``counting_<task>``: the counting task's panel, and late suppression on the held-out prompts of ``seed``
    and of every extra seed (each with its own disjoint reference set: that draw's training prompts)."""
    gt, extra = counting_task(model, task, n=cfg.n_prompts, n_train=cfg.n_train, seed=cfg.seed, layers=layers,
                              n_pairs=cfg.n_pairs, min_pairs=cfg.min_pairs, batch_size=cfg.batch_size)
    panel = (gap_panel(model, gt, tuned_lens=tuned, seed=cfg.seed, ridge_round=True)
             .assign(thread="counting", model=model.name))
    te, tr = extra["test_idx"], extra["train_idx"]
    draws = {cfg.seed: ([extra["prompts"][i] for i in te], (extra["counts"] - 1)[te],
                        [extra["prompts"][i] for i in tr])}
    for s in cfg.extra_seeds:
        prompts, labels, reference, _ = held_out_split(model, task, n=cfg.n_prompts, n_train=cfg.n_train, seed=s)
        draws[s] = (prompts, labels, reference)
    rows, per_prompt = [], []
    for s, (prompts, labels, reference) in draws.items():
        sup, pp = late_suppression(model, prompts, labels, extra["digit_ids"], reference=reference,
                                   last=cfg.ablate_last, batch_size=cfg.batch_size, seed=cfg.seed)
        rows.append(sup.assign(seed=str(s)))
        per_prompt.append(pp.assign(seed=s))
    per_prompt = pd.concat(per_prompt, ignore_index=True).assign(model=model.name, task=task)
    suppression = pd.concat([*rows, pool_suppression(per_prompt, seed=cfg.seed)], ignore_index=True)
    return {"panel": panel, "suppression": suppression.assign(model=model.name, task=task),
            "accuracy": [{"thread": "counting", "model": model.name, "task": task, "accuracy": extra["accuracy"]}
                         | _acc_interval(extra["right"][te], [extra["prompts"][i] for i in te], cfg.seed)]}


def _acc_interval(right, groups, seed: int) -> dict:
    iv = accuracy_ci(np.asarray(right).astype(int), groups=groups, seed=seed)
    return {"accuracy_lo": iv.lo, "accuracy_hi": iv.hi, "n": len(right), "n_units": iv.n}


def latent_loop(cfg: EncodedExpressedConfig, model: Model, rs, mode: str) -> LatentConfig:
    """The loop of ``mode``: ``n_steps`` on the base model; on a trained model (``latent_trained``) coconut at its
    trained number of thoughts, soft / cot after the CoT cue for the chain's tokens."""
    if not cfg.latent_trained:
        return LatentConfig(mode=mode, n_steps=cfg.n_steps, seed=cfg.seed)
    if mode == "coconut":
        card = read_card(Path(model.source["adapter"]) / REASONER_CARD)
        return ReasonerConfig(**card["recipe"]).latent_config(seed=cfg.seed)
    n_tok = chain_tokens(model.tokenizer, rs)
    extra = dict(bot=rs.cot_cue, eot="") if mode == "soft" else {}
    return LatentConfig(mode=mode, n_steps=n_tok, seed=cfg.seed, **extra)


def latent_phase(model: Model, cfg: EncodedExpressedConfig, rs, mode: str, tuned: TunedLens | None) -> dict:
    """Phase ``latent_<mode>``: the latent loop's per-step panel."""
    lcfg = latent_loop(cfg, model, rs, mode)
    gt, extra = latent_task(model, rs, lcfg, n_train=cfg.n_latent_train, seed=cfg.seed, n_pairs=cfg.n_pairs,
                            min_pairs=cfg.min_pairs)
    return {"panel": gap_panel(model, gt, tuned_lens=tuned).assign(thread="latent", model=model.name),
            "accuracy": [{"thread": "latent", "model": model.name, "task": gt.name, "accuracy": extra["accuracy"]}],
            "run": extra["run"]}


def visual_phase(vlm: Model, cfg: EncodedExpressedConfig) -> dict:
    """Phase ``visual_<vlm>``: the VLM's colour-question panel."""
    vlm_layers = check_layers(_layers(cfg, vlm), vlm.n_layers)
    gt, extra = visual_task(vlm, n_train=cfg.n_vlm_train, n_items=cfg.n_vlm_items, seed=cfg.seed, layers=vlm_layers,
                            n_pairs=cfg.n_pairs, min_pairs=cfg.min_pairs, batch_size=cfg.batch_size)
    panel = (gap_panel(vlm, gt, tuned_lens=shipped_tuned_lens(vlm, cfg.tuned_lens), seed=cfg.seed)
             .assign(thread="visual", model=vlm.name))
    accuracy = [{"thread": "visual", "model": vlm.name, "task": f"colour/{split}", "accuracy": acc}
                for split, acc in extra["accuracy"].items()]
    return {"panel": panel, "accuracy": accuracy}


def vip_phase(vlm: Model, cfg: EncodedExpressedConfig) -> dict:
    """Phase ``vip_<vlm>``: the paper's visual integration point and TVI on the held-out colour items."""
    splits = evaluation_set(cfg.n_vlm_items, seed=cfg.seed)
    out = visual_integration(vlm, {name: splits[name] for name in VISUAL_SPLITS}, COLOURS,
                             batch_size=cfg.batch_size, seed=cfg.seed, prior_answer=PRIOR.colour)
    return {k: v.assign(model=vlm.name) for k, v in out.items()}


def run_encoded_expressed_study(cfg: EncodedExpressedConfig | None = None, *, model: Model | None = None,
                                vlm_models: Mapping[str, object] | None = None,
                                progress: bool = True) -> EncodedExpressedResult:
    """Everything in the module docstring for ``cfg``; ``vlm_models`` gives already loaded VLMs by name. Every input
    is checked first; then the phases ``counting_<task>``, ``delimiter_sweep``, ``latent_<mode>``, ``soft_threads``
    and ``visual_<vlm>``, each timed into ``timings`` (with ``total``)."""
    cfg = cfg or EncodedExpressedConfig()
    phases = Phases()
    model = model or load_model(cfg.model)
    bad = [k for k in cfg.ablate_last if k > model.n_layers]
    if bad:
        raise ValueError(f"ablate_last {bad} exceeds the {model.n_layers} blocks of {model.name}")
    stray = [d for d in cfg.seeded_delimiters if d not in cfg.delimiters]
    if stray:
        raise ValueError(f"seeded_delimiters {stray} are not among the delimiters {list(cfg.delimiters)}")
    if cfg.seed in cfg.extra_seeds or len(set(cfg.extra_seeds)) != len(cfg.extra_seeds):
        raise ValueError(f"extra_seeds {list(cfg.extra_seeds)} must be distinct and must not repeat seed {cfg.seed}")
    layers = check_layers(_layers(cfg, model), model.n_layers)  # checked before any forward
    tuned = shipped_tuned_lens(model, cfg.tuned_lens)
    vlm_models = dict(vlm_models or {})
    for name in dict.fromkeys((*cfg.vlms, *cfg.vip_vlms)):  # every VLM is loaded and checked before the first forward
        vlm = vlm_models.get(name) or load_model(name)
        if not getattr(vlm.arch, "is_vlm", False):
            raise ValueError(f"vlms: {name!r} is not a vision-language model; the visual part needs one "
                             f"(e.g. {list(TESTBEDS)})")
        check_layers(_layers(cfg, vlm), vlm.n_layers, name="layers (for the VLMs)")
        vlm_models[name] = vlm
    panels, accuracy, suppression = [], [], []
    parts = len(cfg.tasks) + 2 + len(cfg.latent_modes) + len(cfg.vlms) + len(cfg.vip_vlms)
    bar = tqdm(total=parts, desc=f"encoded vs expressed {model.name}", unit="part", disable=not progress)

    def phase(name: str, label: str, fn, *args):
        bar.set_postfix_str(label)
        out = phases.run(name, fn, *args)
        bar.update()
        return out

    for task in cfg.tasks:  # 1. counting: panel + late suppression
        out = phase(f"counting_{task}", f"counting {task}", counting_phase, model, cfg, task, layers, tuned)
        panels.append(out["panel"])
        accuracy += out["accuracy"]
        suppression.append(out["suppression"])

    # 2. repeated items by delimiter
    d_panel, d_curves, d_sweeps, d_summary = phase(
        "delimiter_sweep", "delimiter sweep", lambda: delimiter_sweep(
            model, delimiters=cfg.delimiters, n=cfg.n_delimiter, n_train=cfg.n_delimiter_train,
            seed=cfg.seed, seeds=[cfg.seed, *cfg.extra_seeds], seeded=cfg.seeded_delimiters, layers=layers,
            batch_size=cfg.batch_size,
            blocks=None if _layers(cfg, model) is None else [v - 1 for v in layers if v > 0]))

    rs = make_reasoning_task(cfg.latent_task, cfg.n_latent_items, n_hops=cfg.n_hops, seed=cfg.seed)
    runs, loops = {}, {}
    for mode in cfg.latent_modes:  # 3. latent loops, per step (on the trained models with latent_trained)
        lm = model
        if cfg.latent_trained:  # the base's tuned lens was not trained on these weights: the logit lens only
            lm = load_reasoner(reasoner_dir(cfg.model, adapter_name(LATENT_ADAPTER[mode], cfg.adapter_seed),
                                            cfg.adapters_root))
        loops[mode] = lm
        out = phase(f"latent_{mode}", f"latent {mode}", latent_phase, lm, cfg, rs, mode,
                    None if cfg.latent_trained else tuned)
        panels.append(out["panel"])
        accuracy += out["accuracy"]
        runs[mode] = out["run"]
    soft_model = loops.get("soft") or (load_reasoner(reasoner_dir(cfg.model, adapter_name("cot", cfg.adapter_seed),
                                                                  cfg.adapters_root))
                                       if cfg.latent_trained else model)
    soft_loop = latent_loop(cfg, soft_model, rs, "soft")
    soft_steps, soft_summary = phase(
        "soft_threads", "soft thinking threads", lambda: soft_thinking_threads(
            soft_model, rs, n_steps=soft_loop.n_steps, taus=cfg.gumbel_taus, seed=cfg.seed, plain=runs.get("soft"),
            bot=soft_loop.bot, eot=soft_loop.eot))

    for name in cfg.vlms:  # 4. VLMs: panel
        out = phase(f"visual_{name}", name, visual_phase, vlm_models[name], cfg)
        panels.append(out["panel"])
        accuracy += out["accuracy"]
    vip = {"items": [], "curves": [], "summary": []}
    for name in cfg.vip_vlms:  # 5. VLMs: visual integration point
        out = phase(f"vip_{name}", f"VIP {name}", vip_phase, vlm_models[name], cfg)
        for k in vip:
            vip[k].append(out[k])
    bar.close()
    timings = phases.finish(digits=1)

    def cat(frames, first=("thread", "model", "task")):
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True)
        lead = [c for c in first if c in df.columns]
        return df[lead + [c for c in df.columns if c not in lead]]

    return EncodedExpressedResult(
        config=asdict(cfg) | {"tuned_lens_loaded": tuned is not None},
        model=model.name, weights_hash=model.weights_hash,
        panel=cat(panels), accuracy=cat([pd.DataFrame(accuracy)]),
        suppression=cat(suppression, ("model", "task")),
        delimiter_panel=d_panel, delimiter_curves=d_curves, delimiter_sweeps=d_sweeps, delimiter_summary=d_summary,
        soft_steps=soft_steps, soft_summary=soft_summary,
        vip_curves=cat(vip["curves"], ("model",)), vip_summary=cat(vip["summary"], ("model",)),
        vip_items=cat(vip["items"], ("model", "split")),
        timings=timings,
    )


TABLES = ("panel", "accuracy", "suppression", "delimiter_panel", "delimiter_curves", "delimiter_sweeps",
          "delimiter_summary", "soft_steps", "soft_summary", "vip_curves", "vip_summary", "vip_items")


def save_encoded_expressed_result(result: EncodedExpressedResult, out_dir: str | Path) -> dict[str, Path]:
    """Every table as CSV plus ``study.json`` (model, weights hash, config, timings) in ``out_dir``."""
    tables = {name: getattr(result, name) for name in TABLES}
    tables |= {"suppression_verdicts": result.suppression_verdicts(), "vip_correlation": result.vip_correlation()}
    return write_result_tables(out_dir, tables, {
        "model": result.model, "weights_hash": result.weights_hash, "config": result.config,
        "timings": result.timings})
