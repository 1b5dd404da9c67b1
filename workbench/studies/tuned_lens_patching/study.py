"""The readout study (notebook 06): read every layer with the tuned lens, and find what matters by patching.

    cfg = TunedLensPatchingConfig()                          # SmolLM2, the shipped tuned lens, 64 IOI pairs x 2
    result = run_tuned_lens_patching_study(cfg, model=m)
    result.summary(); result.tables(); result.figures()

Two parts, one model:

1. **Tuned vs logit lens.** The tuned lens (shipped under ``probes/<model>/tuned-lens`` or trained here, see
   ``lens``) against the logit lens: held-out KL to the model's output per layer (the corpus' first windows, never
   trained on), measured per window so that its interval and the ratio logit / tuned per layer are bootstrapped over
   windows (tokens of one window are not independent); and on counting prompts (``counting_task``) the gold count's
   probability and rank per layer.
2. **Patching.** ``n_pairs`` IOI pairs from six templates (:mod:`workbench.data.ioi`) under two corruptions
   (``corruptions``): the name swap (S2 -> IO: the answer flips) and ABC (IO and S1 replaced by two fresh names: the
   answer is undetermined). For each, the exact sweep (ground truth), AtP and EAP-IG over the same units:
   ``site_types`` at the position roles ``positions`` (IO, S1, S2, END: found per pair, so that pairs of different
   templates line up role by role; a role before the first token where clean and corrupt differ is skipped, its
   activations being identical in a causal model) in every ``block_stride``-th block, and heads at
   ``head_positions`` (from the end). Every unit keeps its per-pair recovery; the summary gives the mean with a
   bootstrap interval over pairs (the clean prompt is the unit), the per-pair sd and IQR; the clean and corrupt
   logit differences get intervals; the agreement of AtP / EAP-IG with the sweep gets intervals over pairs; and
   the best block (or head) of every site type x role is tested against the max-over-candidates sign-flip null
   (``patching_winners``).

Cost (2 CPU cores, SmolLM2-135M): an exact unit is one row of a batched forward of the ~15-token prompt, ~40 ms;
AtP and EAP-IG cost ~1.3 s and ~2.4 s per pair whatever the units. The default (64 pairs x 2 corruptions, resid and
attn at S2 and END in every second block: 60 units per pair and corruption) spends ~5 min in the sweep and ~8 min
in the attribution methods; heads at the last position (``head_positions=(-1,)``) would add 9 heads x 15 blocks =
135 units per pair and corruption, ~12 min.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.data.ioi import CORRUPTIONS, ROLES, corrupted, make_ioi_pairs, role_positions
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
from workbench.studies.tuned_lens_patching.plots import (
    agreement_ci_figure,
    kl_ci_figure,
    kl_ratio_figure,
    recovery_figure,
    role_map_figure,
)
from workbench.studies.tuned_lens_patching.uncertainty import (
    AGREEMENT_N_BOOT,
    N_BOOT,
    N_PERMUTATIONS,
    agreement_intervals,
    best_against_null,
    kl_intervals,
    spread,
    unit_summary,
)

LENS_SOURCES = ("auto", "shipped", "train")
RECIPES = {"cpu": TunedLensTrainConfig.cpu, "gpu": TunedLensTrainConfig.gpu, "smoke": TunedLensTrainConfig.smoke}
METHODS = ("exact", "atp", "ig")
SUMMARY_KEYS = ["corruption", "method", "site_type", "layer", "head", "role"]


@dataclass
class TunedLensPatchingConfig(NotebookConfig):
    NOTEBOOK = {"model": "model", "lens": "lens", "lens_recipe": "lens_recipe", "heldout": "heldout",
                "counting_task": "counting_task", "n_counting": "n_counting", "n_pairs": "n_pairs",
                "corruptions": "corruptions", "site_types": "site_types", "positions": "positions",
                "block_stride": "block_stride", "head_positions": "head_positions", "ig_steps": "ig_steps",
                "seed": "seed"}
    SMOKE_SIZED = ("heldout", "n_counting", "n_pairs", "site_types")
    RELATIONS = (relation(("site_types", "head_positions"), lambda c: bool(c.site_types or c.head_positions),
                          "site_types or head_positions non-empty (else nothing to patch)"),)

    model: str = DEFAULT_MODEL
    # "shipped" (probes/<model>/tuned-lens, else an error), "train" (here), "auto" (shipped if any)
    lens: str = choice("auto", LENS_SOURCES)
    # when training: "cpu" (docs/results/tuned-lens-patching.md), "gpu" (the paper's budget), "smoke"
    lens_recipe: str = choice("cpu", RECIPES)
    heldout: int = positive_int(16)  # held-out windows of 128 tokens for the KL per layer (the bootstrap unit)
    counting_task: str = choice("entity", TASKS)
    # counting prompts for the gold count by layer (10 per count; at least one per count)
    n_counting: int = positive_int(90, minimum=9)
    n_pairs: int = positive_int(64)  # IOI pairs (each run under every corruption); the exact sweep is batched
    # "name_swap" (S2 -> IO, the answer flips), "abc" (IO and S1 -> two fresh names, the answer is undetermined)
    corruptions: tuple[str, ...] = each_in(tuple(CORRUPTIONS), tuple(CORRUPTIONS), non_empty=True)
    # at the position roles of `positions` (heads are asked for with head_positions)
    site_types: tuple[str, ...] = each_in(("resid", "attn"), [t for t in SITE_TYPES if t != "head"],
                                          why="heads are asked for with head_positions")
    # position roles patched for site_types: IO, S1, S2 (the names' mentions), END (the last token)
    positions: tuple[str, ...] = each_in(("S2", "END"), ROLES, non_empty=True)
    block_stride: int = positive_int(2)  # patch blocks 0, stride, 2 x stride, ... (1 = every block)
    # heads (every head of every patched block) at these positions (negative from the end); () = none
    head_positions: tuple[int, ...] = each_int(())
    ig_steps: int = positive_int(5)
    seed: int = 0
    batch_size: int = positive_int(64)  # rows per patched forward
    # bootstrap resamples per interval (at most AGREEMENT_N_BOOT for the agreement's correlations)
    n_boot: int = positive_int(N_BOOT, minimum=100)
    n_permutations: int = positive_int(N_PERMUTATIONS, minimum=99)  # sign flips of the winners' null
    smoke: bool = False

    @classmethod
    def smoke_config(cls, **overrides) -> TunedLensPatchingConfig:
        base = dict(heldout=2, n_counting=18, n_pairs=4, site_types=("resid",), n_boot=500, smoke=True)
        return cls(**(base | overrides))


@dataclass
class TunedLensPatchingResult:
    config: dict
    model: dict
    lens_source: str  # where the tuned lens came from: a folder or "trained here"
    lens_card: dict
    # lens, layer, kl_nats, kl_bits (+ _lo, _hi: 95 % CI over windows, _sd), top1_agreement, n_tokens, n_windows
    kl: pd.DataFrame
    counting: pd.DataFrame  # lens, layer, digit_accuracy, gold_prob_digits, gold_rank_median (counting prompts)
    pairs: pd.DataFrame  # the IOI pairs, with each role's token position and each corruption's first differing token
    patching: dict[str, dict[str, PatchingResult]]  # corruption -> "exact" / "atp" / "ig"
    agreement: pd.DataFrame  # per corruption, method and site type, with 95 % CIs over pairs
    kl_windows: pd.DataFrame = field(default_factory=pd.DataFrame)  # lens, layer, window, kl_bits, ...
    kl_ratio: pd.DataFrame = field(default_factory=pd.DataFrame)  # layer, ratio logit / tuned with its CI
    stats: dict[str, pd.DataFrame] = field(default_factory=dict)  # patching_statistics(): per-pair tables, summaries
    timings: dict = field(default_factory=dict)

    def scores(self) -> pd.DataFrame:
        """Every method's per-pair score and recovery of every unit, both corruptions (column ``corruption``)."""
        return pd.concat([r.frame for per in self.patching.values() for r in per.values()], ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """Per layer: held-out KL of both lenses (bits per token, 95 % CI over windows), the ratio logit / tuned with
        its CI, and each lens' digit-restricted counting accuracy."""
        kl = self.kl.pivot(index="layer", columns="lens", values="kl_bits").add_prefix("kl_bits_")
        if {"kl_bits_lo", "kl_bits_hi"} <= set(self.kl.columns):
            for end in ("lo", "hi"):
                kl = kl.join(self.kl.pivot(index="layer", columns="lens", values=f"kl_bits_{end}")
                             .add_prefix("kl_bits_").add_suffix(f"_{end}"))
        if not self.kl_ratio.empty:
            kl = kl.join(self.kl_ratio.set_index("layer")[["ratio", "ratio_lo", "ratio_hi"]])
        gold = self.counting.pivot(index="layer", columns="lens", values="digit_accuracy").add_prefix("digit_acc_")
        return kl.join(gold)

    def tables(self) -> dict[str, pd.DataFrame]:
        tables = {"lens_kl_by_layer": self.kl, "lens_kl_by_window": self.kl_windows,
                  "lens_kl_ratio_by_layer": self.kl_ratio, "counting_lens": self.counting, "ioi_pairs": self.pairs,
                  "agreement_by_site_type": self.agreement, "patching_scores": self.scores()}
        return tables | dict(self.stats)

    def figures(self) -> dict[str, go.Figure]:
        scores = self.scores()
        figs = {
            "heldout_kl": kl_ci_figure(self.kl, title=f"{self.model['name']}: KL(output || lens) on held-out text "
                                                      "(95 % CI over windows)"),
            "counting_digit_accuracy": _counting_figure(self.counting, self.model["name"]),
            "patching_agreement": agreement_ci_figure(self.agreement),
            "patching_map_exact": role_map_figure(scores, method="exact"),
            "patching_map_atp": role_map_figure(scores, method="atp"),
        }
        if not self.kl_ratio.empty and self.kl_ratio["ratio"].notna().any():
            figs["kl_ratio"] = kl_ratio_figure(self.kl_ratio, title=f"{self.model['name']}: KL(logit lens) / "
                                                                    "KL(tuned lens) per layer (95 % CI over windows)")
        summary = self.stats.get("patching_summary")
        if summary is not None and not summary.empty and (summary["site_type"].astype(str) != "head").any():
            figs["patching_recovery"] = recovery_figure(summary)
        return figs

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


def compare_lenses(model: Model, cfg: TunedLensPatchingConfig,
                   lens: TunedLens) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Phase ``lens_eval``: held-out KL per layer of the logit and the tuned lens, per window (the bootstrap unit)
    and summarised with 95 % CIs over windows, the ratio logit / tuned per layer with its CI, and the gold count by
    layer. Returns (kl, kl_windows, kl_ratio, counting)."""
    windows = heldout_windows(model, n=cfg.heldout, context_length=128)
    lenses = {"logit": None, "tuned": lens}
    kl_windows = pd.concat([lens_kl(model, lenses, windows[i:i + 1]).assign(window=i) for i in range(len(windows))],
                           ignore_index=True)
    kl, ratio = kl_intervals(kl_windows, n_boot=cfg.n_boot, seed=cfg.seed)
    counting = pd.concat([counting_by_layer(model, lz, cfg.counting_task, cfg.n_counting, cfg.seed).assign(lens=name)
                          for name, lz in lenses.items()], ignore_index=True)
    return kl, kl_windows, ratio, counting


def ioi_pairs(model: Model, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` IOI pairs (:func:`workbench.data.ioi.make_ioi_pairs`, every name checked to be one token) with, in the
    model's tokenisation, each role's position (``pos_IO``, ``pos_S1``, ``pos_S2``, ``pos_END``), ``n_tokens`` and
    per corruption the first position where clean and corrupt differ (``first_diff_<corruption>``)."""
    pairs = make_ioi_pairs(n, seed=seed, tokenizer=model.tokenizer)
    tok = model.tokenizer
    rows = []
    for r in pairs.to_dict("records"):
        ids = model.encode([r["clean"]])["input_ids"][0].tolist()
        pos = role_positions(ids, tok.encode(r["answer"], add_special_tokens=False)[0],
                             tok.encode(r["wrong"], add_special_tokens=False)[0])
        row = {f"pos_{k}": v for k, v in pos.items()} | {"n_tokens": len(ids)}
        for name, col in CORRUPTIONS.items():
            other = model.encode([r[col]])["input_ids"][0].tolist()
            if len(other) != len(ids):
                raise ValueError(f"IOI pair {r['clean']!r}: its {name} prompt {r[col]!r} is {len(other)} tokens, the "
                                 f"clean one {len(ids)}; the names must be single tokens")
            row[f"first_diff_{name}"] = next(i for i, (a, b) in enumerate(zip(ids, other, strict=True)) if a != b)
        rows.append(row)
    return pd.concat([pairs, pd.DataFrame(rows)], axis=1)


def _plans(pairs: pd.DataFrame, cfg: TunedLensPatchingConfig, corruption: str) -> list[tuple[list[int], dict]]:
    """(pair indices, patching keywords) per run: pairs whose patched positions coincide run together."""
    specs = []
    if cfg.site_types:
        groups: dict[tuple[int, ...], list[int]] = {}
        first = pairs[f"first_diff_{corruption}"].to_numpy()
        for i in range(len(pairs)):
            pos = tuple(sorted({int(pairs[f"pos_{role}"].iat[i]) for role in cfg.positions} - set(range(first[i]))))
            if pos:
                groups.setdefault(pos, []).append(i)
        specs += [(idx, {"site_types": cfg.site_types, "positions": list(pos)}) for pos, idx in groups.items()]
    if cfg.head_positions:
        specs.append((list(range(len(pairs))), {"site_types": ("head",), "positions": list(cfg.head_positions)}))
    if not specs:
        raise ValueError(f"nothing to patch under the {corruption} corruption: the roles {list(cfg.positions)} all "
                         "come before the first token where its prompts differ (their activations are identical); add "
                         "later roles (S2, END) or head_positions")
    return specs


def _roles(frame: pd.DataFrame, pairs: pd.DataFrame) -> pd.Series:
    """Each row's position role (IO, S1, S2, END), or its offset from the end where it has none."""
    role = frame["from_end"].astype(str)
    idx = frame["pair"].to_numpy()
    for r in ROLES:
        role = role.mask(frame["position"].to_numpy() == pairs[f"pos_{r}"].to_numpy()[idx], r)
    return role


def _merge(parts: list[tuple[list[int], PatchingResult]], pairs: pd.DataFrame, corruption: str) -> PatchingResult:
    """One result of the runs of a method (pair indices mapped back to the pairs frame), with columns ``role`` and
    ``corruption``."""
    frames, bases = [], []
    for idx, r in parts:
        back = np.asarray(idx)
        frames.append(r.frame.assign(pair=back[r.frame["pair"].to_numpy()]))
        bases.append(r.baselines.assign(pair=back[r.baselines["pair"].to_numpy()]))
    frame = pd.concat(frames, ignore_index=True)
    frame["site_type"] = pd.Categorical(frame["site_type"], categories=list(SITE_TYPES), ordered=True)
    frame = frame.sort_values(["pair", "site_type", "layer", "head", "position"], kind="stable").reset_index(drop=True)
    frame["role"] = _roles(frame, pairs)
    frame["corruption"] = corruption
    base = pd.concat(bases, ignore_index=True).drop_duplicates("pair").sort_values("pair").reset_index(drop=True)
    first = parts[0][1]
    return PatchingResult(frame, base, first.method, first.metric, float(sum(r.seconds for _, r in parts)),
                          {"corruption": corruption, "parts": [r.config for _, r in parts]})


def run_patching(model: Model, cfg: TunedLensPatchingConfig, pairs: pd.DataFrame, progress: bool = True
                 ) -> tuple[dict[str, dict[str, PatchingResult]], pd.DataFrame]:
    """Phase ``patching``: per corruption, the exact sweep, AtP and EAP-IG over the same units, and their agreement
    (:func:`workbench.methods.patching.patching_agreement`) with 95 % CIs over pairs."""
    blocks = list(range(0, model.n_layers, cfg.block_stride))
    plans = {c: _plans(pairs, cfg, c) for c in cfg.corruptions}  # every plan checked before any forward
    jobs = [(c, m, idx, spec) for c in cfg.corruptions for m in METHODS for idx, spec in plans[c]]
    parts: dict[tuple[str, str], list] = {}
    for c, m, idx, spec in tqdm(jobs, desc="patching (corruption x method x position group)", disable=not progress):
        sub = corrupted(pairs.iloc[idx].reset_index(drop=True), c)
        if m == "exact":
            r = activation_patching(model, sub, blocks=blocks, batch_size=cfg.batch_size, progress=False, **spec)
        else:
            r = attribution_patching(model, sub, method=m, steps=cfg.ig_steps, blocks=blocks, progress=False, **spec)
        parts.setdefault((c, m), []).append((idx, r))
    patching = {c: {m: _merge(parts[(c, m)], pairs, c) for m in METHODS} for c in cfg.corruptions}
    groups = pairs["clean"].tolist()
    agreement = []
    for c, res in patching.items():
        a = patching_agreement(res["exact"], res["atp"], res["ig"]).assign(corruption=c)
        a["site_type"] = a["site_type"].astype(str)
        ci = pd.concat([agreement_intervals(res["exact"], res[m], groups, n_boot=min(cfg.n_boot, AGREEMENT_N_BOOT),
                                            seed=cfg.seed)
                        for m in ("atp", "ig")], ignore_index=True)
        ci["site_type"] = ci["site_type"].astype(str)
        agreement.append(a.merge(ci, on=["method", "site_type"], how="left"))
    agreement = pd.concat(agreement, ignore_index=True)
    front = ["corruption", "method", "site_type", "n", "n_large"]
    return patching, agreement[front + [c for c in agreement.columns if c not in front]]


def patching_statistics(pairs: pd.DataFrame, patching: dict[str, dict[str, PatchingResult]], *,
                        n_boot: int = N_BOOT, n_permutations: int = N_PERMUTATIONS, seed: int = 0
                        ) -> dict[str, pd.DataFrame]:
    """Phase ``statistics``: the per-pair tables and their summaries over pairs (the unit: the distinct clean
    prompt).

    - ``patching_baselines``: per corruption and pair, the clean and corrupt logit difference and their gap;
    - ``patching_baseline_summary``: per corruption and quantity (clean_metric, corrupt_metric, gap): mean, 95 % CI,
      sd, median, IQR over pairs and the share of pairs above 0;
    - ``patching_summary``: per corruption, method and unit (site type, block, head, role): n_pairs, the mean
      recovery with its 95 % CI (recovery_lo / _hi), its per-pair sd, median, q25 / q75, and the mean score;
    - ``patching_winners``: per corruption, method, site type and role, the best block (heads: block and head) by
      mean recovery against the max over the candidates of a sign-flip null (each pair's recovery, all candidates
      together, multiplied by a random sign): p (``p_at_floor``: p is at its floor 1 / (1 + n_permutations), i.e.
      at most that), the null's 95 % threshold and how many candidates exceed it.
    """
    groups = pairs["clean"].to_numpy(dtype=object)
    baselines, base_summary, winners = [], [], []
    for c, res in patching.items():
        b = res["exact"].baselines.copy()
        b["gap"] = b["clean_metric"] - b["corrupt_metric"]
        b.insert(0, "corruption", c)
        b["template"] = pairs["template"].to_numpy()[b["pair"].to_numpy()]
        b["clean"] = groups[b["pair"].to_numpy()]
        b["corrupt"] = pairs[CORRUPTIONS[c]].to_numpy()[b["pair"].to_numpy()]
        baselines.append(b)
        for q in ("clean_metric", "corrupt_metric", "gap"):
            row = {"corruption": c, "quantity": q}
            row |= spread(b[q].to_numpy(), groups[b["pair"].to_numpy()], n_boot=n_boot, seed=seed)
            row["frac_positive"] = float((b[q] > 0).mean())
            base_summary.append(row)
    scores = pd.concat([r.frame for res in patching.values() for r in res.values()], ignore_index=True)
    scores["site_type"] = scores["site_type"].astype(str)
    summary = unit_summary(scores, groups, by=SUMMARY_KEYS, n_boot=n_boot, seed=seed)
    for (c, m, st, role), g in scores.groupby(["corruption", "method", "site_type", "role"], sort=False):
        table = g.pivot_table(index="pair", columns=["layer", "head"], values="recovery", aggfunc="mean",
                              dropna=False)
        res = best_against_null(table.to_numpy(), groups[table.index.to_numpy()], n_permutations=n_permutations,
                                seed=seed)
        layer, head = table.columns[res.pop("best")]
        winners.append({"corruption": c, "method": m, "site_type": st, "role": role, "best_layer": int(layer),
                        "best_head": int(head)} | res)
    winners = pd.DataFrame(winners)
    ci = summary.rename(columns={"layer": "best_layer", "head": "best_head"})[
        ["corruption", "method", "site_type", "role", "best_layer", "best_head", "recovery_lo", "recovery_hi"]]
    winners = winners.merge(ci, on=["corruption", "method", "site_type", "role", "best_layer", "best_head"],
                            how="left")
    return {"patching_baselines": pd.concat(baselines, ignore_index=True),
            "patching_baseline_summary": pd.DataFrame(base_summary),
            "patching_summary": summary, "patching_winners": winners}


def run_tuned_lens_patching_study(cfg: TunedLensPatchingConfig | None = None, *, model: Model | None = None,
                                  progress: bool = True) -> TunedLensPatchingResult:
    """Phases ``pairs`` (:func:`ioi_pairs`), ``lens`` (load or train), ``lens_eval`` (:func:`compare_lenses`),
    ``patching`` (:func:`run_patching`) and ``statistics`` (:func:`patching_statistics`); ``timings`` holds each
    one's wall seconds and ``total``."""
    cfg = cfg or TunedLensPatchingConfig()
    model = model or load_model(cfg.model)
    phases = Phases()
    pairs = phases.run("pairs", ioi_pairs, model, cfg.n_pairs, seed=cfg.seed)
    lens, source = phases.run("lens", get_tuned_lens, model, cfg, progress)
    kl, kl_windows, kl_ratio, counting = phases.run("lens_eval", compare_lenses, model, cfg, lens)
    patching, agreement = phases.run("patching", run_patching, model, cfg, pairs, progress)
    stats = phases.run("statistics", patching_statistics, pairs, patching, n_boot=cfg.n_boot,
                       n_permutations=cfg.n_permutations, seed=cfg.seed)
    timings = phases.finish(digits=4)
    return TunedLensPatchingResult(
        config={k: v for k, v in vars(cfg).items() if k != "notebook_params"}, model=model_info(model),
        lens_source=source, lens_card={k: v for k, v in lens.card.items() if k != "loss_curve"}, kl=kl,
        counting=counting, pairs=pairs, patching=patching, agreement=agreement, kl_windows=kl_windows,
        kl_ratio=kl_ratio, stats=stats, timings=timings)
