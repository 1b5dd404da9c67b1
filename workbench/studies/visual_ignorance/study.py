"""The visual-ignorance study: where, layer by layer, does a VLM lose the visual evidence to the language prior?

:func:`run_visual_study` runs, for a VLM and a donor of the same architecture (by default the two testbed variants):

1. accuracy on every held-out split with the real image, a blank image and a noise image (blind baselines), for
   the model and the donor; restricted, full-vocabulary and generated answers;
2. counterfactual layer replacement both ways (model <- donor layers, donor <- model layers), and model <- the
   base language model's layers, over first-N / last-N / sliding-window ranges, on the prior items;
3. activation patching of the image-token residuals (and of the last token) between the clean image and each
   corruption (strongest blur, blank), both directions, at every requested layer, on items where the image matters;
4. layer-wise MLP probes on the last-token residual predicting the ground-truth colour and, separately, the prior
   answer (what the model answers with a blank image), scored on held-out conflict items (truth != prior): P(ground
   truth) from the first, P(prior) from the second, and P(prior answer) under the ground-truth probe;
5. progressive-blur decay (E_k, C, accuracy under decay, invariant subset, per-item table) on every split and on
   easy-VQA's own (text-answerable) yes/no questions.

Results are small dataframes in :class:`VisualResult`; :func:`save_visual_result` writes them as CSV.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from workbench.core.models import load_model
from workbench.core.sites import check_layers, spread_layers
from workbench.data.vqa import (
    COLOURS,
    PRIOR,
    VQAItem,
    easy_vqa_images,
    easy_vqa_questions,
    evaluation_set,
    load_images,
    probe_training_items,
)
from workbench.io.figures import write_result_tables
from workbench.methods.activations import last_token
from workbench.methods.answering import answer_items, blank_image, noise_image, vqa_batches
from workbench.methods.blur import KERNELS, blur_decay, check_kernels, gaussian_blur
from workbench.methods.probes.base import probe_dir, save_probe
from workbench.methods.probes.mlp import layerwise_mlp
from workbench.methods.routing import image_patching, layer_replacement, random_layer_control, replacement_windows
from workbench.methods.stats import wilson_ci
from workbench.studies.notebook import NotebookConfig, Phases, as_tuple, choice, each_in, each_int, positive_int
from workbench.studies.visual_ignorance import plots

DEFAULT_VLM = "vlm-testbed"
DEFAULT_DONOR = "vlm-testbed-balanced"
DEFAULT_BASE_LM = "smollm2-135m"
DEFAULT_SAME_PRIOR_DONOR = "vlm-testbed-s1"  # the biased recipe at another training seed: the same prior
DEFAULT_SEED_MODELS = ("vlm-testbed-s1", "vlm-testbed-balanced-s1")  # a second trained seed of each variant
DATASETS = ("testbed", "easy-vqa")
CORRUPTIONS = ("blur", "blank")
TESTBED_DECAY_SPLITS = ("prior_violating", "prior_consistent", "shape", "count", "easy-vqa-yesno")


@dataclass
class VisualConfig(NotebookConfig):
    # notebook 03's parameters -> fields (see workbench.studies.notebook); a smoke run sizes all but the first five
    # itself; save_probes is the notebook's own (it saves the best-layer probes after the run)
    NOTEBOOK = {"model": "model", "donor": "donor", "base_lm": "base_lm", "dataset": "dataset", "seed": "seed",
                "n_items": "n_items", "n_decay_items": "n_decay_items", "n_patch_items": "n_patch_items",
                "patch_split": "patch_split", "blur_levels": "blur_levels", "decay_splits": "decay_splits",
                "layers": "layers", "patch_layers": "patch_layers", "swap_sizes": "swap_sizes",
                "swap_window": "swap_window", "corruptions": "corruptions", "save_probes": None,
                "same_prior_donor": "same_prior_donor", "seed_models": "seed_models",
                "n_random_swaps": "n_random_swaps"}
    SMOKE_SIZED = ("n_items", "n_decay_items", "n_patch_items", "patch_split", "blur_levels", "decay_splits",
                   "layers", "patch_layers", "swap_sizes", "swap_window", "corruptions", "n_random_swaps")

    model: str = DEFAULT_VLM
    donor: str | None = DEFAULT_DONOR  # same architecture, different prior reliance; None skips replacement
    base_lm: str | None = DEFAULT_BASE_LM  # the VLM's base language model (layer replacement VLM <- LM)
    # a second model with the same prior (layer replacement model <- it: a change there is not the prior's removal)
    same_prior_donor: str | None = DEFAULT_SAME_PRIOR_DONOR
    # further trained seeds: accuracy with the image (how much of a difference between the variants is the seed)
    seed_models: tuple[str, ...] = as_tuple(DEFAULT_SEED_MODELS)
    # the random-layer control: this many random sets of swap_window donor layers (not contiguous); 19 or more let
    # a window beat them at p <= 0.05
    n_random_swaps: int = positive_int(19)
    # "testbed": the held-out splits of workbench.data.vqa; "easy-vqa": its test questions
    dataset: str = choice("testbed", DATASETS)
    n_items: int = positive_int(100)  # items per held-out split (accuracy, probes' test items, layer replacement)
    # colour questions on training images for the probes (>= 40: the probes need a validation split)
    n_probe_train: int = positive_int(480, minimum=40)
    # items per split for the blur decay (8 levels each: the costliest part per item)
    n_decay_items: int = positive_int(50)
    n_patch_items: int = positive_int(50)  # items for activation patching
    patch_split: str | None = None  # None: "colour" (rectangles and triangles: the image matters) or the first split
    blur_levels: tuple[int, ...] = KERNELS  # checked (and sorted) by methods.blur.check_kernels
    # hidden-state layers of the probes (0 = embeddings); None = all (one pass reads them all)
    layers: tuple[int, ...] | None = each_int(None, lo=0, non_empty=True, optional=True)
    # patching: one pass per layer and direction
    patch_layers: tuple[int, ...] | None = each_int((0, 5, 10, 15, 20, 25, 30), lo=0, non_empty=True, optional=True)
    # first-N / last-N ranges (None: 4/15 of the depth)
    swap_sizes: tuple[int, ...] | None = as_tuple((8, 15), optional=True)
    # sliding window width, stride = half of it (None: half the depth)
    swap_window: int | None = positive_int(10, optional=True)
    # None: TESTBED_DECAY_SPLITS, or every split of easy-vqa
    decay_splits: tuple[str, ...] | None = as_tuple(None, optional=True)
    corruptions: tuple[str, ...] = each_in(("blank",), CORRUPTIONS, non_empty=True)  # "blur" (strongest level), "blank"
    generate: bool = True  # also greedy generation with parsing, for the model's accuracy row
    seed: int = 0
    batch_size: int = positive_int(32)
    smoke: bool = False

    def __post_init__(self):
        self.blur_levels = check_kernels(self.blur_levels)
        super().__post_init__()

    @classmethod
    def smoke_config(cls, **overrides) -> VisualConfig:
        # layers, patch_layers, swap_sizes and swap_window left as None: the run sizes them to the model's depth
        base = dict(n_items=8, n_probe_train=48, n_decay_items=6, n_patch_items=6, layers=None, patch_layers=None,
                    swap_sizes=None, swap_window=None, blur_levels=(1, 17, 61),
                    decay_splits=("prior_violating", "easy-vqa-yesno"), corruptions=("blank",), generate=False,
                    n_random_swaps=2, smoke=True)
        return cls(**(base | overrides))


@dataclass
class VisualResult:
    config: dict
    model: str
    weights_hash: str
    accuracy: pd.DataFrame  # model, condition, split, correct, full_correct, gen_correct, says_prior, n
    replacement: pd.DataFrame  # pair, scheme, start, end, n_swapped, flip_rate, accuracy, prior_rate, p_gold
    patching: pd.DataFrame  # model, corruption, direction, positions, layer, accuracy, recovery_*
    probes: pd.DataFrame  # model, layer, p_gt, p_prior, acc_gt, acc_prior (held-out conflict items)
    decay: pd.DataFrame  # model, split, kernel, sigma, E_k, accuracy
    decay_summary: pd.DataFrame  # model, split, C, accuracy_invariant, n_invariant, answerable_without_seeing
    decay_items: pd.DataFrame  # model, split, item, question, answer, answer_k*, invariant, answerable_without_seeing
    items: pd.DataFrame  # model, condition, split, per-item answers
    timings: dict = field(default_factory=dict)
    probe_objects: dict = field(default_factory=dict, repr=False)  # (model, target, layer) -> MLPProbe

    def replacement_controls(self) -> pd.DataFrame:
        """Per window of the main replacement (model <- donor): its prior rate with the interval, the same window
        taken from the same-prior donor, the random-layer null (``random_le``: how many of the random sets of
        donor layers cut the prior as far, of ``n_random``, and ``p_random``) and a verdict. A window whose cut the
        same-prior donor also gives, or that random layers match, is disruption, not the prior's location."""
        r = self.replacement
        if r.empty or "control" not in r:
            return pd.DataFrame()
        main = r[(r.control == "") & (r.pair == f"{self.model} <- {self.config.get('donor')}")]
        same = r[r.control == "same-prior donor"]
        rand = r[r.control == "random layers"]
        base = main[main.scheme == "none"]
        rows = []
        for _, w in main[main.scheme != "none"].iterrows():
            row = {"scheme": w.scheme, "start": w.start, "end": w.end, "n_swapped": w.n_swapped,
                   "prior_rate": w.prior_rate, "prior_rate_lo": w.prior_rate_lo, "prior_rate_hi": w.prior_rate_hi,
                   "baseline": float(base.prior_rate.iloc[0]) if len(base) else np.nan}
            sp = same[(same.scheme == w.scheme) & (same.start == w.start) & (same.end == w.end)]
            if len(sp):
                row |= {"same_prior": float(sp.prior_rate.iloc[0]), "same_prior_lo": float(sp.prior_rate_lo.iloc[0]),
                        "same_prior_hi": float(sp.prior_rate_hi.iloc[0])}
            if len(rand) and w.n_swapped == int(rand.n_swapped.iloc[0]):
                le = int((rand.prior_rate <= w.prior_rate).sum())
                row |= {"n_random": len(rand), "random_mean": float(rand.prior_rate.mean()),
                        "random_min": float(rand.prior_rate.min()), "random_le": le,
                        "p_random": (1 + le) / (1 + len(rand))}
            row["verdict"] = _replacement_verdict(row)
            rows.append(row)
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Accuracy by model and condition (rows) and held-out split (columns)."""
        return self.accuracy.pivot_table(index=["model", "condition"], columns="split", values="correct")

    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables a notebook records in its manifest (all tables go to CSV by ``save_visual_result``)."""
        return {"accuracy_table": self.accuracy, "decay_summary_table": self.decay_summary,
                "replacement_table": self.replacement, "replacement_controls_table": self.replacement_controls(),
                "probes_table": self.probes}

    def figures(self) -> dict[str, go.Figure]:
        """Accuracy, probe curves, blur decay; layer replacement and patching where they ran."""
        figures = {
            "accuracy": plots.vqa_accuracy_bars(self.accuracy),
            "probe_curves": plots.visual_probe_curves(self.probes),
            "decay_curve": plots.decay_curve(self.decay, self.decay_summary),
        }
        if not self.replacement.empty:
            figures["replacement_prior_rate"] = plots.replacement_heatmap(self.replacement, "prior_rate")
            figures["replacement_accuracy"] = plots.replacement_heatmap(self.replacement, "accuracy")
            controls = self.replacement_controls()
            if not controls.empty:
                figures["replacement_controls"] = plots.replacement_controls_figure(controls)
        if not self.patching.empty:
            figures["patching_curves"] = plots.patching_curves(self.patching)
        return figures

    def save(self, out_dir: str | Path, model=None) -> dict[str, Path]:
        """Every table as CSV plus ``study.json`` (:func:`save_visual_result`; ``model`` is not needed)."""
        return save_visual_result(self, out_dir)


def _replacement_verdict(row: dict) -> str:
    cut = row["prior_rate_hi"] < row["baseline"]
    if not cut:
        return "no cut: the prior rate stays within its interval of the baseline"
    same = row.get("same_prior_hi")
    if same is not None and same < row["baseline"]:
        return "disruption: the same-prior donor's layers cut the prior too"
    if "p_random" in row and row["p_random"] > 0.05:
        return "disruption: random donor layers cut the prior as far"
    if same is None or "p_random" not in row:
        return "cut, without its controls"
    return "the prior's location: the same-prior donor keeps it and random layers do not cut it as far"


def _eval_splits(cfg: VisualConfig) -> dict[str, list[VQAItem]]:
    if cfg.dataset == "testbed":
        return evaluation_set(cfg.n_items, seed=cfg.seed)
    return {"easy-vqa-yesno": easy_vqa_test_items(cfg.n_items, "yesno", cfg.seed),
            "easy-vqa-open": easy_vqa_test_items(cfg.n_items, "open", cfg.seed)}


def easy_vqa_test_items(n: int, kind: str, seed: int = 0) -> list[VQAItem]:
    """easy-VQA's own test questions (not rebalanced): ``yesno`` or ``open`` (shape / colour) questions."""

    images = easy_vqa_images("test")
    pool = [(q, a, i) for q, a, i in easy_vqa_questions("test")
            if i in images and ((a in ("yes", "no")) == (kind == "yesno"))]
    rng = random.Random(f"easy-vqa:{kind}:{seed}")
    picked = rng.sample(pool, min(n, len(pool)))
    out = []
    for q, a, i in picked:
        path, shape, colour = images[i]
        out.append(VQAItem(load_images(path), q, a, "yesno" if a in ("yes", "no") else
                           ("colour" if a in COLOURS else "shape"), shape, colour, None, f"easy-vqa:test:{i}"))
    return out


def _accuracy_phase(models: dict, splits: dict, cfg: VisualConfig) -> tuple[list[dict], list[pd.DataFrame]]:
    """Phase ``accuracy``: every model on every split with the image; the model also with the blank- and noise-image
    baselines (and generated answers), the donor with the blank image. Every rate has its Wilson interval over the
    items. (The further seeds and the donor's noise baseline are left out to keep the default run within 20 min.)"""
    acc_rows, item_frames = [], []
    for role, m in models.items():
        conditions = {"model": ("image", "blank", "noise"), "donor": ("image", "blank")}.get(role, ("image",))
        for condition in conditions:
            for split, items in splits.items():
                images = None if condition == "image" else [
                    blank_image(it.image.width) if condition == "blank" else noise_image(it.image.width, seed=k)
                    for k, it in enumerate(items)]
                df = answer_items(m, items, images=images, batch_size=cfg.batch_size,
                                  generate=cfg.generate and condition == "image" and role == "model")
                df = df.assign(model=m.name, role=role, condition=condition, split=split)
                item_frames.append(df)
                row = {"model": m.name, "role": role, "condition": condition, "split": split, "n": len(df)}
                for col in ("correct", "full_correct", "gen_correct", "says_prior", "p_gold"):
                    if col in df:
                        row[col] = float(df[col].mean())
                for col in ("correct", "says_prior"):
                    x = df[col].dropna() if col in df else pd.Series([], dtype=float)
                    if len(x):
                        iv = wilson_ci(int(x.astype(bool).sum()), len(x))
                        row |= {f"{col}_lo": iv.lo, f"{col}_hi": iv.hi}
                acc_rows.append(row)
    return acc_rows, item_frames


def _replacement_phase(model, donor, base_lm, same_prior, splits: dict, cfg: VisualConfig, swap_sizes, swap_window
                       ) -> list[pd.DataFrame]:
    """Phase ``replacement``: counterfactual layer replacement on the prior-violating items, with its two controls:
    the same windows from a donor with the same prior (``control`` "same-prior donor"), and random sets of
    ``swap_window`` donor layers (``control`` "random layers")."""
    repl = []
    swap_items = splits.get("prior_violating", [])
    if swap_items:
        windows = replacement_windows(model.n_layers, swap_sizes, swap_window, max(1, swap_window // 2))
        pairs = []
        if donor is not None:
            pairs += [(f"{model.name} <- {donor.name}", model, donor, ""),
                      (f"{donor.name} <- {model.name}", donor, model, "")]
        if same_prior is not None:
            pairs += [(f"{model.name} <- {same_prior.name}", model, same_prior, "same-prior donor")]
        if base_lm is not None:
            pairs += [(f"{model.name} <- {base_lm.name}", model, base_lm, "")]
        for label, m, d, control in pairs:
            repl.append(layer_replacement(m, d, swap_items, windows, batch_size=cfg.batch_size)
                        .assign(pair=label, control=control))
        if donor is not None and cfg.n_random_swaps:
            repl.append(random_layer_control(model, donor, swap_items, swap_window, cfg.n_random_swaps, seed=cfg.seed,
                                             batch_size=cfg.batch_size)
                        .assign(pair=f"{model.name} <- {donor.name}", control="random layers"))
    return repl


def _patching_phase(models: dict, patch_items: list, cfg: VisualConfig, patch_layers) -> list[pd.DataFrame]:
    """Phase ``patching``: image-token activation patching between the clean and the corrupted images."""
    clean = [it.image for it in patch_items]
    patch = []
    for role, m in models.items():
        for corruption in cfg.corruptions:
            corrupt = [gaussian_blur(im, cfg.blur_levels[-1]) if corruption == "blur" else blank_image(im.width)
                       for im in clean]
            df = image_patching(m, patch_items, clean, corrupt, patch_layers, batch_size=cfg.batch_size)
            patch.append(df.assign(model=m.name, role=role, corruption=corruption))
    return patch


def _probes_phase(models: dict, test_items: list, cfg: VisualConfig, layers) -> tuple[list[dict], dict]:
    """Phase ``probes``: layer-wise MLP probes, ground truth vs the prior answer (the blank-image answer)."""
    probe_rows, probe_objects = [], {}
    if not test_items:
        return probe_rows, probe_objects
    train_items = probe_training_items(cfg.n_probe_train, seed=cfg.seed)
    all_items = train_items + test_items
    n_train = len(train_items)
    for role, m in models.items():
        blind = answer_items(m, all_items, images=[blank_image(it.image.width) for it in all_items],
                             batch_size=cfg.batch_size)["pred"].tolist()
        feats = last_token(m, layers=layers, batches=vqa_batches(m, all_items, cfg.batch_size))
        truth = [it.answer for it in all_items]
        targets = {"ground_truth": truth}
        if len(set(blind[:n_train])) > 1:  # one blank-image answer for every item: no prior to probe for
            targets["prior"] = blind
        fit = layerwise_mlp(feats, targets, range(n_train), range(n_train, len(all_items)), seed=cfg.seed)
        conflict = [n_train + k for k, it in enumerate(test_items) if it.answer != blind[n_train + k]]
        for layer in layers:
            pg, pp = fit.probes[("ground_truth", layer)], fit.probes.get(("prior", layer))
            has_pp = bool(conflict) and pp is not None
            X = feats[layer][conflict] if conflict else None
            probe_rows.append({
                "model": m.name, "role": role, "layer": layer, "n_conflict": len(conflict),
                "p_gt": float(pg.prob_of(X, [truth[i] for i in conflict]).mean()) if conflict else np.nan,
                "p_prior": float(pp.prob_of(X, [blind[i] for i in conflict]).mean()) if has_pp else np.nan,
                # the same question asked of the ground-truth probe: does the layer lean to the prior's answer?
                "p_prior_gt_probe": float(pg.prob_of(X, [blind[i] for i in conflict]).mean()) if conflict
                else np.nan,
                "acc_gt": pg.accuracy(X, [truth[i] for i in conflict]) if conflict else np.nan,
                "acc_prior": pp.accuracy(X, [blind[i] for i in conflict]) if has_pp else np.nan,
                "acc_gt_all_test": float(fit.table.query("target == 'ground_truth' and layer == @layer")
                                         ["accuracy_test"].iloc[0]),
            })
            probe_objects[(m.name, "ground_truth", layer)] = pg
            if pp is not None:
                probe_objects[(m.name, "prior", layer)] = pp
    return probe_rows, probe_objects


def _decay_phase(models: dict, splits: dict, decay_names, cfg: VisualConfig
                 ) -> tuple[list[pd.DataFrame], list[dict], list[pd.DataFrame]]:
    """Phase ``decay``: progressive blur, per model and split."""
    decay, decay_summary, decay_items = [], [], []
    pool = dict(splits)
    if cfg.dataset == "testbed":
        pool["easy-vqa-yesno"] = easy_vqa_test_items(cfg.n_decay_items, "yesno", cfg.seed)
    decay_splits = {name: pool[name][: cfg.n_decay_items] for name in decay_names}
    for role, m in models.items():
        for split, items in decay_splits.items():
            res = blur_decay(m, items, cfg.blur_levels, batch_size=cfg.batch_size)
            decay.append(res.levels.assign(model=m.name, role=role, split=split))
            decay_summary.append({"model": m.name, "role": role, "split": split, **res.summary(),
                                  **above_chance(res, items)})
            decay_items.append(res.items.assign(model=m.name, role=role, split=split))
    return decay, decay_summary, decay_items


def above_chance(res, items: list[VQAItem]) -> dict:
    """Is the model above chance on this split with the unblurred image? ``chance`` is the majority answer's share
    among the items (what answering from the question alone can reach on a balanced split: 0.5 for yes/no); the
    unblurred accuracy's Wilson interval must lie above it. Where it does not, "answerable without seeing" reads
    answers that are no better than guessing, and ``answerable_without_seeing_valid`` is NaN."""
    answers = pd.Series([it.answer for it in items])
    chance = float(answers.value_counts(normalize=True).iloc[0])
    right = res.items[f"answer_k{res.kernels[0]}"].to_numpy() == res.items["answer"].to_numpy()
    iv = wilson_ci(int(right.sum()), len(right))
    above = iv.lo > chance
    return {"chance": chance, "accuracy_unblurred_lo": iv.lo, "accuracy_unblurred_hi": iv.hi, "above_chance": above,
            "answerable_without_seeing_valid": float(res.items["answerable_without_seeing"].mean()) if above
            else float("nan")}


def run_visual_study(cfg: VisualConfig | None = None, *, model=None, donor=None, base_lm=None,
                     progress: bool = True) -> VisualResult:
    """Every input checked first, then the phases ``accuracy``, ``replacement``, ``patching``, ``probes`` and
    ``decay`` (one function each); ``timings`` holds each one's wall seconds and ``total``."""
    cfg = cfg or VisualConfig()
    phases = Phases()
    model = model or load_model(cfg.model)
    if not getattr(model.arch, "is_vlm", False):
        raise ValueError(f"model {model.name!r} is not a vision-language model; the visual study needs one")
    n = model.n_layers  # a smoke run reads layers spread over the model's depth (on 30 layers: 0, 10, 20, 30)
    layers = check_layers(spread_layers(n, 4) if cfg.smoke and cfg.layers is None else cfg.layers, n)
    patch_layers = check_layers(spread_layers(n, 3) if cfg.smoke and cfg.patch_layers is None else cfg.patch_layers,
                                n, name="patch_layers")  # validated before any forward
    swap_sizes = cfg.swap_sizes if cfg.swap_sizes is not None else (max(1, round(n * 4 / 15)),)  # 8 of 30
    swap_window = cfg.swap_window if cfg.swap_window is not None else max(2, n // 2)  # 15 of 30
    if donor is None and cfg.donor:
        donor = load_model(cfg.donor)
    if base_lm is None and cfg.base_lm:
        base_lm = load_model(cfg.base_lm)
    loaded = {}
    for name in dict.fromkeys([*cfg.seed_models, *([cfg.same_prior_donor] if cfg.same_prior_donor else [])]):
        if name in (model.name, getattr(donor, "name", None)):
            raise ValueError(f"{name!r} is the model or the donor; seed_models and same_prior_donor must be others")
        loaded[name] = load_model(name)
        if not getattr(loaded[name].arch, "is_vlm", False):
            raise ValueError(f"{name!r} is not a vision-language model")
    same_prior = loaded.get(cfg.same_prior_donor) if cfg.same_prior_donor else None
    models = {"model": model} | ({"donor": donor} if donor is not None else {})
    seeds = {f"seed:{name}": loaded[name] for name in cfg.seed_models}
    splits = _eval_splits(cfg)
    prior_items = [it for name in ("prior_violating", "prior_consistent") for it in splits.get(name, [])]
    known = set(splits) | ({"easy-vqa-yesno"} if cfg.dataset == "testbed" else set())
    decay_names = cfg.decay_splits or (TESTBED_DECAY_SPLITS if cfg.dataset == "testbed" else tuple(splits))
    unknown = [s for s in decay_names if s not in known]
    if unknown:
        raise ValueError(f"decay_splits {unknown} unknown; this dataset's splits: {sorted(known)}")
    patch_split = cfg.patch_split or ("colour" if "colour" in splits else next(iter(splits)))
    if patch_split not in splits:
        raise ValueError(f"patch_split {patch_split!r} unknown; this dataset's splits: {sorted(splits)}")

    bar = tqdm(total=5, desc=f"visual {model.name}", unit="part", disable=not progress)

    def phase(name, fn, *args):
        bar.set_postfix_str(name)
        out = phases.run(name, fn, *args)
        bar.update()
        return out

    acc_rows, item_frames = phase("accuracy", _accuracy_phase, models | seeds, splits, cfg)
    repl = phase("replacement", _replacement_phase, model, donor, base_lm, same_prior, splits, cfg, swap_sizes,
                 swap_window)
    # on the prior-violating items (or all items of the first split)
    patch = phase("patching", _patching_phase, models, splits[patch_split][: cfg.n_patch_items], cfg, patch_layers)
    test_items = list(prior_items) + list(splits.get("colour", []))
    probe_rows, probe_objects = phase("probes", _probes_phase, models, test_items, cfg, layers)
    decay, decay_summary, decay_items = phase("decay", _decay_phase, models, splits, decay_names, cfg)
    bar.close()
    timings = phases.finish(digits=1)

    def cat(frames, first):
        if not frames:
            return pd.DataFrame()
        df = pd.concat(frames, ignore_index=True)
        return df[[c for c in first if c in df] + [c for c in df.columns if c not in first]]

    return VisualResult(
        config=asdict(cfg), model=model.name, weights_hash=model.weights_hash,
        accuracy=pd.DataFrame(acc_rows),
        replacement=cat(repl, ("pair", "control", "scheme", "start", "end")),
        patching=cat(patch, ("model", "role", "corruption", "direction", "positions", "layer")),
        probes=pd.DataFrame(probe_rows),
        decay=cat(decay, ("model", "role", "split", "kernel")),
        decay_summary=pd.DataFrame(decay_summary),
        decay_items=cat(decay_items, ("model", "role", "split", "item")),
        items=cat(item_frames, ("model", "role", "condition", "split", "item")),
        timings=timings, probe_objects=probe_objects,
    )


TABLES = ("accuracy", "replacement", "patching", "probes", "decay", "decay_summary", "decay_items", "items")


def save_visual_result(result: VisualResult, out_dir: str | Path) -> dict[str, Path]:
    """Every table as CSV plus ``study.json`` (model, weights hash, config, timings) in ``out_dir``."""

    tables = {name: getattr(result, name) for name in TABLES} | {"replacement_controls": result.replacement_controls()}
    return write_result_tables(out_dir, tables, {
        "model": result.model, "weights_hash": result.weights_hash, "config": result.config,
        "timings": result.timings})


def save_best_probes(result: VisualResult, models: dict, root: str | Path = ".") -> list[Path]:
    """Save, per model and target, the probe of the layer with the highest held-out conflict probability under
    ``<root>/probes/<model>/visual-<target>/layer_NN`` (safetensors + card, like the counting probes)."""

    saved = []
    for name, m in models.items():
        rows = result.probes[result.probes["model"] == name]
        if rows.empty:
            continue
        for target, col in (("ground_truth", "p_gt"), ("prior", "p_prior")):
            if rows[col].isna().all():
                continue
            layer = int(rows.loc[rows[col].idxmax(), "layer"])
            probe = result.probe_objects[(name, target, layer)]
            row = rows[rows["layer"] == layer].iloc[0]
            folder = probe_dir(name, f"visual-{target}", layer, root)
            saved.append(save_probe(
                probe, folder, model=m, site=f"layer {layer} (hidden_states[{layer}]), last prompt token",
                layer=layer, task=f"visual-{target}",
                generator_params={"dataset": result.config["dataset"], "n_items": result.config["n_items"],
                                  "n_probe_train": result.config["n_probe_train"], "prior": asdict(PRIOR)},
                seed=result.config["seed"],
                metrics={"p_target_conflict": float(row[col]),
                         "accuracy_conflict": float(row["acc_gt" if target == "ground_truth" else "acc_prior"]),
                         "n_conflict": int(row["n_conflict"])},
                overwrite=True))  # asked to save: refreshes the probe folders this package wrote
    return saved
