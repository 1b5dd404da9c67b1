"""The readout study (notebook 06): read every layer with the tuned lens, and find what matters by patching.

    cfg = TunedLensPatchingConfig()                          # SmolLM2, the shipped tuned lens, 8 IOI pairs
    result = run_tuned_lens_patching_study(cfg, model=m)
    result.summary(); result.tables(); result.figures()

Two parts, one model:

1. **Tuned vs logit lens.** The tuned lens (shipped under ``probes/<model>/tuned-lens`` or trained here, see
   ``lens``) against the logit lens: held-out KL to the model's output per layer (the corpus' first windows, never
   trained on), and on counting prompts (``counting_task``) the gold count's probability and rank per layer.
2. **Patching.** IOI pairs (:mod:`workbench.data.ioi`): the exact sweep (ground truth), AtP and EAP-IG over the same
   units (``site_types`` at every position, and heads at ``head_positions``), their rank agreement per site type and
   the wall-time ratio of each to the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.data.ioi import make_ioi_pairs
from workbench.data.tasks import TASKS, answered_task
from workbench.io.figures import write_result_tables
from workbench.io.provenance import model_info
from workbench.methods.lens import logit_lens
from workbench.methods.patching import (
    SITE_TYPES,
    PatchingResult,
    activation_patching,
    attribution_patching,
    patching_agreement,
)
from workbench.methods.tuned_lens import (
    TunedLens,
    TunedLensTrainConfig,
    heldout_windows,
    lens_kl,
    load_tuned_lens,
    train_tuned_lens,
    tuned_lens_dir,
)
from workbench.plotting.lens import kl_figure
from workbench.plotting.patching import agreement_figure, patching_map_figure
from workbench.plotting.theme import apply_theme
from workbench.studies.notebook import (
    NotebookConfig,
    Phases,
    checkout_root,
    choice,
    each_in,
    each_int,
    positive_int,
    relation,
)

LENS_SOURCES = ("auto", "shipped", "train")
RECIPES = {"cpu": TunedLensTrainConfig.cpu, "gpu": TunedLensTrainConfig.gpu, "smoke": TunedLensTrainConfig.smoke}


@dataclass
class TunedLensPatchingConfig(NotebookConfig):
    NOTEBOOK = {"model": "model", "lens": "lens", "lens_recipe": "lens_recipe", "heldout": "heldout",
                "counting_task": "counting_task", "n_counting": "n_counting", "n_pairs": "n_pairs",
                "site_types": "site_types", "head_positions": "head_positions", "ig_steps": "ig_steps",
                "seed": "seed"}
    SMOKE_SIZED = ("heldout", "n_counting", "n_pairs", "site_types")
    RELATIONS = (relation(("site_types", "head_positions"), lambda c: bool(c.site_types or c.head_positions),
                          "site_types or head_positions non-empty (else nothing to patch)"),)

    model: str = DEFAULT_MODEL
    # "shipped" (probes/<model>/tuned-lens, else an error), "train" (here), "auto" (shipped if any)
    lens: str = choice("auto", LENS_SOURCES)
    # when training: "cpu" (docs/results/tuned-lens-patching.md), "gpu" (the paper's budget), "smoke"
    lens_recipe: str = choice("cpu", RECIPES)
    heldout: int = positive_int(16)  # held-out windows of 128 tokens for the KL per layer
    counting_task: str = choice("entity", TASKS)
    # counting prompts for the gold count by layer (10 per count; at least one per count)
    n_counting: int = positive_int(90, minimum=9)
    n_pairs: int = positive_int(8)  # IOI pairs; the exact sweep runs one forward per unit, batched
    # at every position (heads are asked for with head_positions)
    site_types: tuple[str, ...] = each_in(("resid", "attn", "mlp"), [t for t in SITE_TYPES if t != "head"],
                                          why="heads are asked for with head_positions")
    # heads (every head of every layer) at these positions (negative from the end); () = none
    head_positions: tuple[int, ...] = each_int((-1,))
    ig_steps: int = positive_int(5)
    seed: int = 0
    batch_size: int = positive_int(64)  # rows per patched forward
    smoke: bool = False

    @classmethod
    def smoke_config(cls, **overrides) -> TunedLensPatchingConfig:
        base = dict(heldout=2, n_counting=18, n_pairs=2, site_types=("resid",), smoke=True)
        return cls(**(base | overrides))


@dataclass
class TunedLensPatchingResult:
    config: dict
    model: dict
    lens_source: str  # where the tuned lens came from: a folder or "trained here"
    lens_card: dict
    kl: pd.DataFrame  # lens, layer, kl_nats, kl_bits, top1_agreement, n_tokens (held-out text)
    counting: pd.DataFrame  # lens, layer, digit_accuracy, gold_prob_digits, gold_rank_median (counting prompts)
    pairs: pd.DataFrame  # the IOI pairs
    patching: dict[str, PatchingResult]  # "exact", "atp", "ig"
    agreement: pd.DataFrame
    timings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Per layer: held-out KL of both lenses (bits per token) and their digit-restricted counting accuracy."""
        kl = self.kl.pivot(index="layer", columns="lens", values="kl_bits").add_prefix("kl_bits_")
        gold = self.counting.pivot(index="layer", columns="lens", values="digit_accuracy").add_prefix("digit_acc_")
        return kl.join(gold)

    def tables(self) -> dict[str, pd.DataFrame]:
        frames = {name: r.frame for name, r in self.patching.items()}
        return {"lens_kl_by_layer": self.kl, "counting_lens": self.counting, "ioi_pairs": self.pairs,
                "agreement_by_site_type": self.agreement,
                "patching_baselines": self.patching["exact"].baselines,
                "patching_scores": pd.concat(frames.values(), ignore_index=True)}

    def figures(self) -> dict[str, go.Figure]:
        return {
            "heldout_kl": kl_figure(self.kl, title=f"{self.model['name']}: KL(output || lens) on held-out text"),
            "counting_digit_accuracy": _counting_figure(self.counting, self.model["name"]),
            "patching_agreement": agreement_figure(self.agreement),
            "patching_map_exact": patching_map_figure(self.patching["exact"]),
            "patching_map_atp": patching_map_figure(self.patching["atp"]),
        }

    def save(self, out_dir: str | Path, model: Model | None = None) -> dict[str, Path]:
        """Every table as CSV plus ``study.json`` (model, lens source and card, config, timings) in ``out_dir``."""
        return write_result_tables(out_dir, self.tables(), {
            "model": self.model, "lens_source": self.lens_source, "lens_card": self.lens_card,
            "config": self.config, "timings": self.timings})


def _counting_figure(counting: pd.DataFrame, name: str) -> go.Figure:
    fig = go.Figure()
    for lens, g in counting.groupby("lens", sort=False):
        fig.add_scatter(x=g["layer"], y=g["digit_accuracy"], mode="lines+markers", name=f"{lens} lens")
    fig.add_hline(y=1 / 9, line_dash="dot", annotation_text="chance (1/9)")
    fig.update_layout(title=f"{name}: the gold count read by each lens (counting prompts, last position, among the "
                            "nine digits)", xaxis_title="layer", yaxis_title="digit-restricted accuracy",
                      yaxis_range=[0, 1])
    return apply_theme(fig)


def get_tuned_lens(model: Model, cfg: TunedLensPatchingConfig, progress: bool = True) -> tuple[TunedLens, str]:
    """The study's tuned lens and where it came from (``cfg.lens``: shipped folder, trained here, or auto)."""
    folder = tuned_lens_dir(model.name, checkout_root())
    if cfg.lens in ("shipped", "auto") and (folder / "card.json").is_file():
        return load_tuned_lens(folder, model=model), str(folder)
    if cfg.lens == "shipped":
        raise FileNotFoundError(f"no shipped tuned lens for {model.name} in {folder}; use lens='train' (recipe "
                                f"{cfg.lens_recipe!r}) or train one with workbench.methods.tuned_lens")
    # a smoke run trains the smoke recipe sized to the model's cost, whatever lens_recipe says
    recipe = TunedLensTrainConfig.smoke(model, seed=cfg.seed) if cfg.smoke else RECIPES[cfg.lens_recipe](seed=cfg.seed)
    return train_tuned_lens(model, recipe, progress=progress), "trained here"


def counting_by_layer(model: Model, lens: TunedLens | None, task: str, n: int, seed: int) -> pd.DataFrame:
    """Per layer, on ``n`` counting prompts at the last position, among the nine digit tokens, with the counting
    study's answer set-up (:func:`workbench.data.tasks.answered_task`: a tokenizer that splits the space
    from the digit gets the space at the end of the prompt, so the next token is the digit): the share of prompts whose gold count has the highest digit logit
    (``digit_accuracy``), the gold digit's probability renormalised over the digits (``gold_prob_digits``), and
    the gold digit's full-vocabulary rank (median)."""
    ts, digits = answered_task(model, task, n, seed=seed)  # as the counting study: the next token is the digit
    prompts = ts.prompts
    frame = logit_lens(model, prompts, top_k=0, targets=[digits] * len(ts), lens=lens)
    logits = frame.pivot_table(index=["prompt_idx", "layer"], columns="token_id", values="logit")[digits]
    ranks = frame.pivot_table(index=["prompt_idx", "layer"], columns="token_id", values="rank")[digits]
    gold = np.asarray(ts.counts)[logits.index.get_level_values("prompt_idx")] - 1  # digit index of the answer
    z = logits.to_numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows = pd.DataFrame({"layer": logits.index.get_level_values("layer"),
                         "correct": z.argmax(1) == gold,
                         "gold_prob_digits": p[np.arange(len(gold)), gold],
                         "gold_rank": ranks.to_numpy()[np.arange(len(gold)), gold]})
    g = rows.groupby("layer")
    return pd.DataFrame({"digit_accuracy": g.correct.mean(), "gold_prob_digits": g.gold_prob_digits.mean(),
                         "gold_rank_median": g.gold_rank.median()}).reset_index()


def compare_lenses(model: Model, cfg: TunedLensPatchingConfig, lens: TunedLens) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Phase ``lens_eval``: held-out KL per layer of the logit and the tuned lens, and the gold count by layer."""
    windows = heldout_windows(model, n=cfg.heldout, context_length=128)
    kl = lens_kl(model, {"logit": None, "tuned": lens}, windows)
    counting = pd.concat([counting_by_layer(model, lz, cfg.counting_task, cfg.n_counting, cfg.seed).assign(lens=name)
                          for name, lz in (("logit", None), ("tuned", lens))], ignore_index=True)
    return kl, counting


def run_patching(model: Model, cfg: TunedLensPatchingConfig, pairs: pd.DataFrame,
                 progress: bool = True) -> tuple[dict[str, PatchingResult], pd.DataFrame]:
    """Phase ``patching``: the exact sweep, AtP and EAP-IG over the same units, and their agreement."""
    results: dict[str, list[PatchingResult]] = {"exact": [], "atp": [], "ig": []}
    runs = []
    if cfg.site_types:
        runs.append({"site_types": cfg.site_types, "positions": "all"})
    if cfg.head_positions:
        runs.append({"site_types": ("head",), "positions": list(cfg.head_positions)})
    for spec in runs:
        results["exact"].append(activation_patching(model, pairs, batch_size=cfg.batch_size, progress=progress, **spec))
        results["atp"].append(attribution_patching(model, pairs, method="atp", progress=progress, **spec))
        results["ig"].append(attribution_patching(model, pairs, method="ig", steps=cfg.ig_steps, progress=progress,
                                                  **spec))
    patching = {name: _merge(parts) for name, parts in results.items()}
    return patching, patching_agreement(patching["exact"], patching["atp"], patching["ig"])


def run_tuned_lens_patching_study(cfg: TunedLensPatchingConfig | None = None, *, model: Model | None = None,
                                  progress: bool = True) -> TunedLensPatchingResult:
    """Phases ``pairs``, ``lens`` (load or train), ``lens_eval`` (:func:`compare_lenses`) and ``patching``
    (:func:`run_patching`); ``timings`` holds each one's wall seconds and ``total``."""
    cfg = cfg or TunedLensPatchingConfig()
    model = model or load_model(cfg.model)
    phases = Phases()
    pairs = phases.run("pairs", make_ioi_pairs, cfg.n_pairs, seed=cfg.seed, tokenizer=model.tokenizer)
    lens, source = phases.run("lens", get_tuned_lens, model, cfg, progress)
    kl, counting = phases.run("lens_eval", compare_lenses, model, cfg, lens)
    patching, agreement = phases.run("patching", run_patching, model, cfg, pairs, progress)
    timings = phases.finish(digits=4)
    return TunedLensPatchingResult(
        config={k: v for k, v in vars(cfg).items() if k != "notebook_params"}, model=model_info(model),
        lens_source=source, lens_card={k: v for k, v in lens.card.items() if k != "loss_curve"}, kl=kl,
        counting=counting, pairs=pairs, patching=patching, agreement=agreement, timings=timings)


def _merge(parts: list[PatchingResult]) -> PatchingResult:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    frame = pd.concat([p.frame for p in parts], ignore_index=True)
    return PatchingResult(frame, first.baselines, first.method, first.metric, float(np.sum([p.seconds for p in parts])),
                          {"parts": [p.config for p in parts]})
