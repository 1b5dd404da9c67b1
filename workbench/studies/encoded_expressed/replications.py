"""Three recent claims, one per thread, measured on the registry models (``shared/research/methods.md`` §5), each
with the control that could produce it without the claimed cause.

1. Counting, *early encoding, late suppression* (arXiv 2604.00778) and the repeated-token delimiter sweep of
   arXiv 2605.09239: :func:`late_suppression` zero-ablates, or mean-ablates with position-matched means from a
   disjoint reference set, the MLP outputs of the last 1-3 blocks and reads the digit-restricted answer through the
   flattening control (the gain a temperature change to the same entropy gives is not counted) and the gold rank;
   :func:`pool_suppression` pools seeds and gives each condition its verdict. :func:`mlp_sweep` zero-ablates one
   block's MLP at a time; :func:`delimiter_sweep` runs it on repeated-item lists joined by each delimiter and names
   the overwrite layer three ways (:func:`overwrite_layers`), the MLP one tested as the winner among all blocks
   (:func:`best_block_test`), as a fraction of depth next to the paper's 88-93 %.
2. Latent reasoning, *Soft Thinking is single-threaded* (arXiv 2508.03440): :func:`soft_thinking_threads` reports
   per latent step the top token's share of the soft mixture and the mixture's entropy, with and without the
   paper's remedy (Gumbel-softmax noise on the mixture weights, ``LatentConfig.gumbel_tau``), and accuracy and
   drift (max |cos| to any token embedding) for each.
3. VLMs, *visual integration point* (arXiv 2509.23050), with the paper's definitions: :func:`chain_of_embedding`
   gives per item and layer the cosine distance between the last-token states with and without the image (the same
   tokens with the image tokens taken out) and the answers both ways; :func:`integration_point` finds the VIP by
   contrasting vision-dependent items (the answer changes without the image) with vision-independent ones, and TVI
   (each item's mean distance from the VIP on); :func:`visual_integration` runs both on one VLM and correlates TVI
   with answering right; :func:`across_models` correlates a per-model TVI with the prior's strength, with the
   interval that shows what a handful of models can say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from workbench.core.models import Model
from workbench.core.sites import layer_site
from workbench.core.trace import trace
from workbench.core.vlm import image_token_mask
from workbench.data.reasoning import ReasoningSet
from workbench.data.tasks import answered_task, split_indices
from workbench.data.vqa import VQAItem
from workbench.methods.activations import last_logits
from workbench.methods.controls import check_disjoint, flattening_control, mean_ablation_edit, position_means
from workbench.methods.answering import candidate_token_ids, vqa_inputs
from workbench.methods.encoded_expressed import gap_panel
from workbench.methods.latent import LatentConfig, LatentRun, run_latent
from workbench.methods.manifold import manifold_metrics
from workbench.methods.patching import site_of
from workbench.methods.stats import accuracy_ci, bootstrap_ci, mean_ci, permutation_p, resample_weights
from workbench.studies.encoded_expressed.tasks import counting_task

PAPER_OVERWRITE_DEPTH = (0.88, 0.93)  # arXiv 2605.09239: the MLP that overwrites the count sits at 88-93 % of depth
DELIMITERS = {" ": "space", ", ": "comma", "\n": "newline"}


# -- 1. counting: late suppression and the delimiter sweep -------------------------------------------------------
def _batches(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def digit_logits(model: Model, prompts: Sequence[str], digit_ids: Sequence[int], *, edits: Mapping | None = None,
                 batch_size: int = 32) -> torch.Tensor:
    """[n, k] next-token logits of ``prompts`` at the candidate tokens ``digit_ids`` (float64, CPU), with ``edits``
    (site -> function, :func:`workbench.core.trace.trace`) applied in every forward."""
    ids = torch.tensor(list(digit_ids))
    out = []
    for s, e in _batches(len(prompts), batch_size):
        enc = model.encode(list(prompts[s:e]))
        if edits:
            with trace(model, edits=dict(edits)):
                z = last_logits(model, enc)
        else:
            z = last_logits(model, enc)
        out.append(z.to("cpu", torch.float64)[:, ids])
    return torch.cat(out)


def digit_readout(model: Model, prompts: Sequence[str], labels: np.ndarray, digit_ids: Sequence[int], *,
                  edits: Mapping | None = None, batch_size: int = 32) -> dict[str, float]:
    """Digit-restricted accuracy and mean gold log-probability (softmax over the digits) at the last position."""
    z = digit_logits(model, prompts, digit_ids, edits=edits, batch_size=batch_size)
    lp = torch.log_softmax(z, -1)
    gold = torch.as_tensor(np.asarray(labels))
    return {"digit_acc": float((lp.argmax(-1) == gold).double().mean()),
            "gold_logprob": float(lp[torch.arange(len(gold)), gold].mean())}


def _zero_edits(blocks: Sequence[int]) -> dict:
    return {site_of("mlp", b): (lambda t: torch.zeros_like(t)) for b in blocks}


def prompt_lengths(model: Model, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Tokens per prompt as :meth:`Model.encode` gives them (special tokens included)."""
    out = np.zeros(len(prompts), dtype=np.int64)
    for s, e in _batches(len(prompts), batch_size):
        out[s:e] = model.encode(list(prompts[s:e]))["attention_mask"].sum(1).cpu().numpy()
    return out


def _interval_cols(prefix: str, iv) -> dict:
    return {prefix: iv.estimate, f"{prefix}_lo": iv.lo, f"{prefix}_hi": iv.hi}


def condition_row(flat: pd.DataFrame, groups: Sequence[str], seed: int = 0) -> dict:
    """One ablation's effect from its per-prompt flattening frame (:func:`workbench.methods.controls.flattening_control`
    of base vs ablated digit logits): accuracies with intervals (Wilson, or the bootstrap over distinct prompts when
    prompts repeat), and bootstrap intervals over distinct prompts of the gold log-prob change, of the part of it
    that a temperature change to the same entropy also gives (flattening), of what is left (excess), and of the gold
    digit's rank change (negative = the gold moved up). ``flat`` needs ``base_correct`` / ``ablated_correct`` (the
    argmax is the gold; rank 1 counts ties in the gold's favour, so accuracy is not read off the rank)."""
    g = list(groups)
    row = {"n": len(flat), "n_distinct": len(set(g)), "uniform_logp": float(flat.uniform_logp.iloc[0])}
    row |= _interval_cols("base_acc", accuracy_ci(flat.base_correct.to_numpy(int), groups=g, seed=seed))
    row |= _interval_cols("digit_acc", accuracy_ci(flat.ablated_correct.to_numpy(int), groups=g, seed=seed))
    for name, col in (("acc_change", flat.ablated_correct.astype(float) - flat.base_correct.astype(float)),
                      ("logprob_change", flat.gain_ablation), ("flattening_gain", flat.gain_flattening),
                      ("excess_gain", flat.excess_gain),
                      ("rank_change", flat.ablated_rank.astype(float) - flat.base_rank.astype(float))):
        row |= _interval_cols(name, mean_ci(col.to_numpy(float), groups=g, seed=seed))
    row |= {"gold_logprob": float(flat.ablated_logp.mean()), "base_logprob": float(flat.base_logp.mean()),
            "base_rank": float(flat.base_rank.mean()), "gold_rank": float(flat.ablated_rank.mean()),
            "base_entropy": float(flat.base_entropy.mean()), "entropy": float(flat.ablated_entropy.mean())}
    return row


def late_suppression(model: Model, prompts: Sequence[str], labels: np.ndarray, digit_ids: Sequence[int], *,
                     reference: Sequence[str], last: Sequence[int] = (1, 2, 3), batch_size: int = 32,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Do the last MLPs suppress an answer the model has? The MLP outputs of the last k blocks (k in ``last``) are
    zero-ablated, or mean-ablated with position-matched means (:func:`workbench.methods.controls.position_means`:
    each position gets the mean of the reference prompts' MLP output at the same distance from the end) from the
    ``reference`` prompts, which must be disjoint from ``prompts`` (checked). Everything is read among the
    candidate digits at the last position, and every ablation goes through the flattening control: the gain a
    temperature change of the unablated logits to the ablated entropy gives is subtracted (``excess_gain``), and the
    gold digit's rank is reported, which no temperature change moves.

    Prompts longer than every reference prompt have no position-matched mean at their first positions: they are
    left out of every condition and counted in ``n_excluded``. Returns (one row per condition with intervals,
    :func:`condition_row`; one row per prompt and condition: the flattening frame with ``correct`` columns)."""
    L = model.n_layers
    bad = [k for k in last if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L]
    if bad:
        raise ValueError(f"last {bad} not allowed: ablate 1..{L} final blocks")
    prompts, reference = list(prompts), list(reference)
    labels = np.asarray(labels)
    if len(labels) != len(prompts):
        raise ValueError(f"{len(labels)} labels for {len(prompts)} prompts")
    if not reference:
        raise ValueError("reference is empty: the mean ablation needs prompts to take the means from")
    check_disjoint(prompts, reference)
    blocks_all = sorted({b for k in last for b in range(L - k, L)})
    means = position_means(model, reference, [site_of("mlp", b) for b in blocks_all], batch_size=batch_size)
    covered = next(iter(means.values())).shape[0]
    keep = np.flatnonzero(prompt_lengths(model, prompts) <= covered)
    n_excluded = len(prompts) - len(keep)
    if not len(keep):
        raise ValueError(f"every prompt is longer than the reference prompts ({covered} tokens)")
    prompts, labels = [prompts[i] for i in keep], labels[keep]
    base = digit_logits(model, prompts, digit_ids, batch_size=batch_size)
    cand = list(range(len(digit_ids)))
    gold = torch.as_tensor(labels)
    rows, per_prompt = [], []
    for k in last:
        blocks = list(range(L - k, L))
        for mode in ("zero", "mean"):
            edits = (_zero_edits(blocks) if mode == "zero" else
                     {site_of("mlp", b): mean_ablation_edit(means[site_of("mlp", b)]) for b in blocks})
            z = digit_logits(model, prompts, digit_ids, edits=edits, batch_size=batch_size)
            flat = flattening_control(base, z, gold, cand)
            flat["base_correct"] = (base.argmax(-1) == gold).numpy()
            flat["ablated_correct"] = (z.argmax(-1) == gold).numpy()
            flat = flat.assign(ablation=mode, n_last=k, prompt=prompts)
            per_prompt.append(flat)
            rows.append({"ablation": mode, "n_last": k, "blocks": ",".join(map(str, blocks)),
                         "n_excluded": n_excluded, "reference_size": len(reference)}
                        | condition_row(flat, prompts, seed=seed))
    return pd.DataFrame(rows), pd.concat(per_prompt, ignore_index=True)


PAPER_CONDITION = ("mean", 2)  # arXiv 2604.00778: the penultimate and last MLPs suppress the count
NUMERICAL_TOL = 1e-6  # nats: an excess gain this small is the bisection's round-off, not an effect


def suppression_verdict(row) -> str:
    """The verdict on one pooled late-suppression condition (:func:`pool_suppression`), from its intervals:
    the answer rises beyond flattening ("holds"), the gold digit rises beyond flattening but the answer does not
    ("in part"), the gold rises only as much as flattening gives ("flattening only"), or it does not rise."""
    beyond = row["excess_gain_lo"] > NUMERICAL_TOL
    if beyond and row["acc_change_lo"] > 0:
        return "holds: the answer rises beyond flattening"
    if beyond:
        return "in part: the gold digit rises beyond flattening, the answer does not"
    if row["logprob_change_lo"] > NUMERICAL_TOL:
        return "no: the gain is what flattening gives"
    return "no: the gold digit does not rise"


def pool_suppression(per_prompt: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Per (task, ablation, n_last): :func:`condition_row` over the prompts of every seed (identical prompts are one
    unit), ``seeds_up`` (how many seeds' mean excess gain is positive, of ``n_seeds``) and the verdict."""
    rows = []
    keys = [c for c in ("model", "task") if c in per_prompt] + ["ablation", "n_last"]
    for key, g in per_prompt.groupby(keys, sort=False):
        row = dict(zip(keys, key)) | condition_row(g, g.prompt.tolist(), seed=seed)
        by_seed = g.groupby("seed").excess_gain.mean()
        row |= {"seed": "all", "n_seeds": len(by_seed), "seeds_up": int((by_seed > 0).sum())}
        row["verdict"] = suppression_verdict(row)
        row["paper_condition"] = (row["ablation"], int(row["n_last"])) == PAPER_CONDITION
        rows.append(row)
    return pd.DataFrame(rows)


def mlp_sweep(model: Model, prompts: Sequence[str], labels: np.ndarray, digit_ids: Sequence[int], *,
              blocks: Sequence[int] | None = None, batch_size: int = 32) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Zero-ablate one block's MLP at a time (every position): (one row per block: the answer and its change; one
    row per block and prompt: the flattening frame of that ablation, :func:`workbench.methods.controls.flattening_control`)."""
    L = model.n_layers
    blocks = list(range(L)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < L]
    if bad or not blocks:
        raise ValueError(f"blocks {bad or blocks} not allowed: give blocks in 0..{L - 1}")
    prompts, labels = list(prompts), np.asarray(labels)
    gold = torch.as_tensor(labels)
    base = digit_logits(model, prompts, digit_ids, batch_size=batch_size)
    cand = list(range(len(digit_ids)))
    rows, per_prompt = [], []
    for b in blocks:
        z = digit_logits(model, prompts, digit_ids, edits=_zero_edits([b]), batch_size=batch_size)
        flat = flattening_control(base, z, gold, cand)
        flat["acc_change"] = (z.argmax(-1) == gold).double().numpy() - (base.argmax(-1) == gold).double().numpy()
        per_prompt.append(flat.assign(block=b, prompt=prompts))
        rows.append({"block": b, "depth": (b + 1) / L, "digit_acc": float((z.argmax(-1) == gold).double().mean()),
                     "gold_logprob": float(flat.ablated_logp.mean()), "acc_change": float(flat.acc_change.mean()),
                     "logprob_change": float(flat.gain_ablation.mean()),
                     "excess_gain": float(flat.excess_gain.mean()),
                     "rank_change": float((flat.ablated_rank - flat.base_rank).mean())})
    return pd.DataFrame(rows), pd.concat(per_prompt, ignore_index=True)


@torch.no_grad()
def lens_gold_curve(model: Model, features: torch.Tensor, layers: Sequence[int], labels: np.ndarray,
                    digit_ids: Sequence[int]) -> pd.DataFrame:
    """Per hidden-state layer: the logit lens's digit-restricted accuracy and mean gold log-probability."""
    ids = torch.tensor(list(digit_ids))
    gold = torch.as_tensor(labels)
    rows = []
    for s, layer in enumerate(layers):
        z = model.lens_logits(features[s].to(model.head_device, model.dtype)).float().cpu()
        lp = torch.log_softmax(z[:, ids], -1)
        rows.append({"layer": int(layer), "lens_acc": float((lp.argmax(-1) == gold).double().mean()),
                     "lens_gold_logprob": float(lp[torch.arange(len(gold)), gold].mean())})
    return pd.DataFrame(rows)


def held_out_split(model: Model, task: str, *, n: int, n_train: int, seed: int,
                   **options) -> tuple[list[str], np.ndarray, list[str], list[int]]:
    """A fresh draw of counting ``task`` at ``seed``, split by distinct prompt like the panel's (no prompt on both
    sides): (held-out prompts, their labels 0..8, the training prompts, the digit token ids)."""
    if not 0 < n_train < n:
        raise ValueError(f"n_train must lie in 1..{n - 1} (n={n}), got {n_train}")
    ts, digit_ids = answered_task(model, task, n, seed=seed, **options)
    counts = np.asarray(ts.counts)
    tr, te = split_indices(counts, [n_train, n - n_train], seed=seed, groups=ts.prompts)[:2]
    return [ts.prompts[i] for i in te], (counts - 1)[te], [ts.prompts[i] for i in tr], digit_ids


def best_block_test(per_prompt: pd.DataFrame, value: str = "gain_ablation", *, n_boot: int = 2000, seed: int = 0,
                    band: tuple[float, float] = PAPER_OVERWRITE_DEPTH) -> dict:
    """The most helpful single-MLP ablation, tested as the winner of all the blocks it was picked from.

    per_prompt: :func:`mlp_sweep`'s per-prompt frames (columns ``block``, ``depth``, ``prompt``, ``value``, and
    ``unit``, one key per evaluated prompt row, e.g. seed and row). The winner is the block with the largest mean
    ``value``. Its p-value is the single-step max-T test (Romano & Wolf): the bootstrap over distinct prompts gives,
    per resample, every block's studentised deviation from its own mean, and the winner's t (mean / standard error)
    is compared with the maximum of those over blocks. Unlike a sign-flip null, blocks whose ablation is strongly
    destructive do not inflate the null of a helpful one. The winner's interval is the bootstrap over distinct
    prompts; ``winner_share`` is the share of resamples that pick the same block and ``in_band_share`` the share
    whose winner lies in ``band`` (fractions of depth; the paper's 88-93 %)."""
    wide = per_prompt.pivot_table(index="unit", columns="block", values=value, aggfunc="first")
    if wide.isna().any().any():
        raise ValueError("every block must be scored on the same prompts")
    groups = per_prompt.drop_duplicates("unit").set_index("unit").prompt.reindex(wide.index).tolist()
    X = wide.to_numpy(np.float64)
    blocks = wide.columns.to_numpy()
    depth = per_prompt.drop_duplicates("block").set_index("block").depth.reindex(blocks).to_numpy()
    codes, W = resample_weights(groups, len(X), n_resamples=n_boot, seed=seed)
    k = W.shape[1]
    if k < 2:
        raise ValueError("the test needs at least 2 distinct prompts")
    sums = np.zeros((k, X.shape[1]))
    np.add.at(sums, codes, X)
    cnt = np.bincount(codes, minlength=k).astype(np.float64)
    obs = X.mean(0)
    boot = (W @ sums) / (W @ cnt)[:, None]  # [n_boot, blocks]: resampled means
    se = boot.std(0, ddof=1)
    se = np.where(se > 0, se, np.inf)
    j = int(obs.argmax())
    t_obs = obs[j] / se[j]
    null_max = ((boot - obs) / se).max(1)
    lo, hi = np.quantile(boot[:, j], [0.025, 0.975])
    winners = boot.argmax(1)
    in_band = (depth[winners] >= band[0]) & (depth[winners] <= band[1])
    return {"block": int(blocks[j]), "depth": float(depth[j]), "gain": float(obs[j]), "gain_lo": float(lo),
            "gain_hi": float(hi), "t": float(t_obs), "p_max": permutation_p(t_obs, null_max),
            "t_threshold": float(np.quantile(null_max, 0.95)), "n_blocks": len(blocks), "n_prompts": len(X),
            "n_units": k, "winner_share": float((winners == j).mean()), "in_band_share": float(in_band.mean())}


def overwrite_layers(curve: pd.DataFrame, sweep: pd.DataFrame, n_layers: int,
                     panel: pd.DataFrame | None = None, per_prompt: pd.DataFrame | None = None,
                     seed: int = 0) -> dict:
    """Where the count is overwritten, three ways, each with its fraction of depth (layer / n_layers):

    - ``lens_drop``: the block whose output lowers the lens's mean gold log-probability (softmax over the digits)
      most (hidden-state layer l is the output of block l-1), and ``lens_peak``: the layer where that is highest;
    - ``mlp``: the block whose MLP, zero-ablated, raises the answer's gold log-probability most; with
      ``per_prompt`` (:func:`mlp_sweep`'s, with a ``unit`` column) tested against the max-over-blocks null with its
      interval (:func:`best_block_test`), and the same for the gain beyond flattening (``mlp_excess_*``);
    - ``probe_drop`` (with ``panel``, the gap panel of the same prompts): the first layer after the probe's peak
      where its held-out accuracy has lost half of its margin over chance.
    """
    lp = curve.set_index("layer").lens_gold_logprob.sort_index()
    peak = int(lp.idxmax())
    diffs = lp.diff().dropna()
    layer = int(diffs.idxmin())
    out = {"lens_peak_layer": peak, "lens_peak_depth": peak / n_layers, "lens_drop_block": layer - 1,
           "lens_drop_depth": layer / n_layers, "lens_drop": float(diffs.min())}
    best = sweep.loc[sweep.logprob_change.idxmax()]
    out |= {"mlp_block": int(best.block), "mlp_depth": float(best.depth),
            "mlp_logprob_gain": float(best.logprob_change), "mlp_acc_gain": float(best.acc_change)}
    if per_prompt is not None:
        t = best_block_test(per_prompt, "gain_ablation", seed=seed)
        if t["block"] != out["mlp_block"]:
            raise ValueError(f"the sweep's best block {out['mlp_block']} is not the per-prompt frame's {t['block']}")
        out |= {"mlp_logprob_gain_lo": t["gain_lo"], "mlp_logprob_gain_hi": t["gain_hi"], "mlp_p_max": t["p_max"], "mlp_winner_share": t["winner_share"],
                "mlp_in_band_share": t["in_band_share"], "mlp_n_prompts": t["n_prompts"], "mlp_n_units": t["n_units"]}
        e = best_block_test(per_prompt, "excess_gain", seed=seed)
        out |= {"mlp_excess_block": e["block"], "mlp_excess_depth": e["depth"], "mlp_excess_gain": e["gain"],
                "mlp_excess_gain_lo": e["gain_lo"], "mlp_excess_gain_hi": e["gain_hi"], "mlp_excess_p_max": e["p_max"]}
    if panel is not None:
        acc = panel.set_index("index").probe_acc.sort_index()
        chance = float(panel.chance.iloc[0])
        top = int(acc.idxmax())
        half = chance + (float(acc.max()) - chance) / 2
        below = acc.loc[top:][acc.loc[top:] <= half]
        drop = int(below.index[0]) if len(below) else math.nan
        at = panel.set_index("index").sort_index()
        out |= {"probe_peak_layer": top, "probe_peak_acc": float(acc.max()), "probe_final_acc": float(acc.iloc[-1]),
                "probe_drop_layer": drop, "probe_drop_depth": drop / n_layers}
        if "probe_acc_lo" in at:
            out |= {"probe_peak_lo": float(at.probe_acc_lo.loc[top]), "probe_peak_hi": float(at.probe_acc_hi.loc[top]),
                    "probe_peak_p_max": float(at.probe_max_p.iloc[0]) if "probe_max_p" in at else math.nan,
                    "probe_final_lo": float(at.probe_acc_lo.iloc[-1]), "probe_final_hi": float(at.probe_acc_hi.iloc[-1])}
    return out


def delimiter_sweep(model: Model, *, delimiters: Sequence[str] = tuple(DELIMITERS), n: int = 180,
                    n_train: int = 120, seed: int = 0, seeds: Sequence[int] | None = None, layers=None,
                    batch_size: int = 32, blocks: Sequence[int] | None = None, seeded: Sequence[str] | None = None,
                    progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Repeated-item counting (``"Items: plum, plum, plum. Count:"``, one fruit per prompt) with each delimiter:
    (gap panel, lens curves, MLP sweeps, summary: overwrite layers against the paper's 88-93 %). Scored on the
    held-out rows. The panel and lens curve use ``seed``'s draw; the MLP sweep runs on the held-out prompts of
    every seed in ``seeds`` (default: ``seed`` alone), pooled, and its winner is tested against the
    max-over-blocks null (:func:`best_block_test`); the sweep frame has one row per (seed, block) and the pooled
    rows (seed "all"). ``seeded``: the delimiters whose sweep runs on every seed (default: all; the others on
    ``seed`` alone).
    blocks: the blocks the MLP sweep ablates one at a time (default: all)."""
    if not delimiters:
        raise ValueError("delimiters is empty")
    seeds = [seed] if seeds is None else [int(s) for s in seeds]
    if not seeds or seeds[0] != seed:
        raise ValueError(f"seeds must start with the panel's seed {seed}, got {seeds}")
    panels, curves, sweeps, summary = [], [], [], []
    for delim in delimiters:
        label = DELIMITERS.get(delim, repr(delim))
        options = dict(repeat=True, distinct=False, delimiter=delim)
        gt, extra = counting_task(model, "list_length", n=n, n_train=n_train, seed=seed, layers=layers, patch=False,
                                  batch_size=batch_size, name=f"repeat ({label})", **options)
        te = extra["test_idx"]
        panel = gap_panel(model, gt, progress=progress, seed=seed)
        panels.append(panel.assign(delimiter=label))
        labels0 = (extra["counts"] - 1)[te]
        curve = lens_gold_curve(model, gt.features[:, te], gt.axis_values, labels0, extra["digit_ids"])
        curves.append(curve.assign(delimiter=label))
        frames, per_prompt = [], []
        for s in (seeds if seeded is None or delim in seeded else seeds[:1]):
            if s == seed:
                prompts, labels = [extra["prompts"][i] for i in te], labels0
            else:
                prompts, labels, _, _ = held_out_split(model, "list_length", n=n, n_train=n_train, seed=s, **options)
            sw, pp = mlp_sweep(model, prompts, labels, extra["digit_ids"], blocks=blocks, batch_size=batch_size)
            frames.append(sw.assign(seed=str(s), n_test=len(prompts)))
            per_prompt.append(pp.assign(seed=s, unit=[f"{s}:{r}" for r in pp.row]))
        pp = pd.concat(per_prompt, ignore_index=True)
        depth = {b: (b + 1) / model.n_layers for b in pp.block.unique()}
        pp["depth"] = pp.block.map(depth)
        pooled = (pp.groupby("block").agg(logprob_change=("gain_ablation", "mean"), excess_gain=("excess_gain", "mean"),
                                          acc_change=("acc_change", "mean"), gold_logprob=("ablated_logp", "mean"))
                  .reset_index().assign(depth=lambda f: f.block.map(depth), seed="all",
                                        n_test=len(pp.drop_duplicates("unit"))))
        sweep = pd.concat([*frames, pooled], ignore_index=True)
        sweeps.append(sweep.assign(delimiter=label))
        acc = accuracy_ci(extra["right"][te].astype(int), groups=[extra["prompts"][i] for i in te], seed=seed)
        summary.append({"delimiter": label, "n_test": len(te), "n_seeds": len(frames),
                        "accuracy": acc.estimate, "accuracy_lo": acc.lo, "accuracy_hi": acc.hi,
                        **overwrite_layers(curve, pooled, model.n_layers, panel, per_prompt=pp, seed=seed),
                        "seed_winners": ",".join(str(int(f.loc[f.logprob_change.idxmax()].block)) for f in frames),
                        "paper_depth": f"{PAPER_OVERWRITE_DEPTH[0]:.0%}-{PAPER_OVERWRITE_DEPTH[1]:.0%}"})
    return (pd.concat(panels, ignore_index=True), pd.concat(curves, ignore_index=True),
            pd.concat(sweeps, ignore_index=True), pd.DataFrame(summary))


# -- 2. Soft Thinking: single-threaded? ----------------------------------------------------------------------------
def soft_thinking_threads(model: Model, rs: ReasoningSet, *, n_steps: int = 6, taus: Sequence[float] = (0.5,),
                          seed: int = 0, batch_size: int = 50, plain: LatentRun | None = None,
                          **soft) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per Gumbel temperature (None = plain Soft Thinking, then each of ``taus``): (per step: mean top-token share,
    share of items whose top token holds > 90 % of the mixture, mean mixture entropy, median max |cos| to the token
    embeddings; per run: accuracy, mean top share, median max |cos|). ``plain``: an earlier run of plain Soft Thinking
    on ``rs`` with exactly this configuration, reused instead of run again (checked)."""
    steps, summary = [], []
    for tau in (None, *taus):
        cfg = LatentConfig(mode="soft", n_steps=n_steps, gumbel_tau=tau, seed=seed, batch_size=batch_size, **soft)
        if tau is None and plain is not None:
            if plain.config != asdict(cfg) or len(plain.items) != len(rs):
                raise ValueError(f"plain was run with {plain.config} on {len(plain.items)} items, not with "
                                 f"{asdict(cfg)} on {len(rs)}")
            run = plain
        else:
            run = run_latent(model, rs, cfg)
        man = manifold_metrics(model, run)
        label = "none" if tau is None else f"{tau:g}"
        for k in range(n_steps):
            ok = run.valid[:, k]
            top = run.top_weight[ok, k]
            drift = man[man.step == k + 1]
            steps.append({"gumbel_tau": label, "step": k + 1, "top_share": float(top.mean()),
                          "collapsed": float((top > 0.9).double().mean()),
                          "entropy": float(run.mixture_entropy[ok, k].mean()),
                          "max_cos": float(drift.max_cos.median()), "norm_ratio": float(drift.norm_ratio.median())})
        summary.append({"gumbel_tau": label, "accuracy": run.accuracy, "n_items": len(rs),
                        "top_share": float(run.top_weight[run.valid].mean()),
                        "collapsed": float((run.top_weight[run.valid] > 0.9).double().mean()),
                        "entropy": float(run.mixture_entropy[run.valid].mean()),
                        "max_cos": float(man.max_cos.median())})
    return pd.DataFrame(steps), pd.DataFrame(summary)


# -- 3. VLMs: visual integration point ------------------------------------------------------------------------------
@torch.no_grad()
def chain_of_embedding(model, items: Sequence[VQAItem], candidate_ids: Sequence[int], *,
                       batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The paper's two chains of embedding per item: the hidden states at every layer of the question with its image
    and "blind" (the same token sequence with the image tokens taken out, as the paper removes the image from the
    message). Returns (``last`` [n, L+1]: cosine distance 1 - cos between the two last-token states, the paper's
    D_l; ``text`` [n, L+1]: the same averaged over every question token after the image, our earlier measure;
    one row per item: ``answer_image`` / ``answer_blind`` (index of the argmax among ``candidate_ids`` with and
    without the image) and ``correct`` (the image answer is the item's answer, when it is a candidate)). Layer 0
    (the embeddings) is 0 by construction."""
    items = list(items)
    if not items:
        raise ValueError("items is empty")
    ids = torch.as_tensor(list(candidate_ids))
    pad = model.processor.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    sites = [layer_site(v) for v in range(model.n_layers + 1)]
    last = np.zeros((len(items), model.n_layers + 1))
    text = np.zeros_like(last)
    answers = []
    for s, e in _batches(len(items), batch_size):
        chunk = items[s:e]
        with_img = vqa_inputs(model, [it.image for it in chunk], [it.question for it in chunk])
        ids_b, real = with_img["input_ids"].cpu(), with_img["attention_mask"].cpu().bool()
        img = image_token_mask(model, ids_b)
        texts, tails = [], []
        for i in range(len(chunk)):
            if not img[i].any():
                raise ValueError(f"item {s + i} has no image token in its input; the comparison needs one")
            texts.append(ids_b[i][real[i] & ~img[i]])
            tails.append(int(ids_b.shape[1] - 1 - int(img[i].nonzero().max())))  # tokens after the last image token
        T = max(len(t) for t in texts)
        text_ids = torch.full((len(chunk), T), pad, dtype=ids_b.dtype)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, t in enumerate(texts):
            text_ids[i, T - len(t):] = t
            mask[i, T - len(t):] = 1
        blind = {"input_ids": text_ids.to(model.device), "attention_mask": mask.to(model.device),
                 "position_ids": ((mask.cumsum(-1) - 1).clamp(min=0)).to(model.device)}
        with trace(model, sites) as ti:
            z_img = last_logits(model, with_img)
        with trace(model, sites) as tt:
            z_blind = last_logits(model, blind)
        a_img = z_img.float().cpu()[:, ids].argmax(-1)
        a_blind = z_blind.float().cpu()[:, ids].argmax(-1)
        for v, site in enumerate(sites):
            hi, ht = ti[site].float(), tt[site].float()
            for i, q in enumerate(tails):
                cos = torch.nn.functional.cosine_similarity(hi[i, -q:], ht[i, -q:], dim=-1)
                text[s + i, v] = float((1 - cos).mean())
                last[s + i, v] = float(1 - cos[-1])
        answers += [{"item": s + i, "answer_image": int(a_img[i]), "answer_blind": int(a_blind[i])}
                    for i in range(len(chunk))]
    frame = pd.DataFrame(answers)
    frame["changes"] = frame.answer_image != frame.answer_blind
    return last, text, frame


def integration_point(dist, dependent, *, n_permutations: int = 999, alpha: float = 0.05, seed: int = 0) -> dict:
    """The paper's visual integration point (arXiv 2509.23050) and total visual integration.

    dist: [n, L+1] per-item, per-layer distances between the chains with and without the image (D_l).
    dependent: [n] bools: the item is vision-dependent (D_VT: its answer changes when the image is removed) or
    vision-independent (D_T: it does not). The paper's VIP is the first layer l* with
    D_l(VT) - D_l(T) > tau for every l >= l*; its tau comes from the pre-VIP spread. Here tau is the (1 - alpha)
    quantile of the maximum over layers of the same gap with the VT / T labels permuted (so a VIP is a layer from
    which the separation is never within what a random split of the items gives at any layer). TVI per item is the
    mean of its D_l over l >= l* (the paper's 1 / (L - l* + 1) sum), and ``tvi`` their mean.

    Returns vip (NaN when the gap never stays above tau, or a split has fewer than 2 items: ``reason`` says which),
    vip_depth, tau, the gap per layer (``gap``), the per-item TVI (``tvi_items``, NaN without a VIP) and counts."""
    D = np.asarray(dist, dtype=np.float64)
    dep = np.asarray(dependent, dtype=bool)
    if D.ndim != 2 or D.shape[0] != len(dep) or D.shape[1] < 2:
        raise ValueError(f"dist must be [n, L+1] with one row per item of dependent ({len(dep)}), got {D.shape}")
    if not np.isfinite(D).all():
        raise ValueError("dist has non-finite values")
    L = D.shape[1] - 1
    out = {"n_items": len(dep), "n_dependent": int(dep.sum()), "n_independent": int((~dep).sum()),
           "vip": math.nan, "vip_depth": math.nan, "tau": math.nan, "tvi": math.nan, "reason": "",
           "gap": np.full(L + 1, math.nan), "tvi_items": np.full(len(dep), math.nan)}
    if dep.sum() < 2 or (~dep).sum() < 2:
        out["reason"] = (f"{int(dep.sum())} vision-dependent and {int((~dep).sum())} vision-independent items: "
                         "each split needs at least 2")
        return out

    def gaps(mask):
        return D[mask].mean(0) - D[~mask].mean(0)

    gap = gaps(dep)
    rng = np.random.default_rng(seed)
    null_max = np.array([gaps(rng.permutation(dep)).max() for _ in range(n_permutations)])
    tau = float(np.quantile(null_max, 1 - alpha))
    above = gap > tau
    out |= {"gap": gap, "tau": tau}
    if not above[-1]:
        out["reason"] = "the gap is not above tau at the last layer"
        return out
    vip = L
    while vip > 0 and above[vip - 1]:
        vip -= 1
    tvi_items = D[:, vip:].mean(1)
    return out | {"vip": vip, "vip_depth": vip / L, "tvi": float(tvi_items.mean()), "tvi_items": tvi_items}


def visual_integration(model, splits: Mapping[str, Sequence[VQAItem]], candidates: Sequence[str], *,
                       batch_size: int = 16, seed: int = 0, prior_answer: str | None = None) -> dict:
    """The paper's VIP / TVI on one VLM (:func:`chain_of_embedding`, :func:`integration_point`) over the items of
    every split, with vision-dependent items = those whose answer among ``candidates`` changes without the image.

    Returns {"items": one row per item (split, answers, correct, changes, tvi), "curves": one row per layer (mean
    D_l of the dependent and independent items, the gap, tau, and our earlier question-token distance),
    "summary": one row (VIP, tau, TVI with its bootstrap interval over items, the Spearman rho between per-item TVI
    and answering right with the image, the paper's per-sample test, with its interval, the share of answers that
    do not change without the image, ``prior_rate``: the share of prior-violating items answered with
    ``prior_answer``, and ``tvi_fixed``: TVI from a fixed layer, half the depth, defined also where no VIP emerges)}."""
    names = [name for name, items in splits.items() for _ in items]
    items = [it for its in splits.values() for it in its]
    cands = list(candidates)
    ids = candidate_token_ids(model.processor.tokenizer, cands)
    last, text, frame = chain_of_embedding(model, items, ids, batch_size=batch_size)
    gold = np.array([cands.index(it.answer) if it.answer in cands else -1 for it in items])
    frame["split"] = names
    frame["correct"] = frame.answer_image.to_numpy() == gold
    point = integration_point(last, frame.changes.to_numpy(), seed=seed)
    frame["tvi"] = point["tvi_items"]
    L = last.shape[1] - 1
    dep = frame.changes.to_numpy()
    curves = pd.DataFrame({"layer": np.arange(L + 1), "dist_dependent": last[dep].mean(0) if dep.any() else math.nan,
                           "dist_independent": last[~dep].mean(0) if (~dep).any() else math.nan,
                           "dist_last": last.mean(0), "gap": point["gap"], "tau": point["tau"],
                           "dist_text": text.mean(0)})
    summary = {k: point[k] for k in ("n_items", "n_dependent", "n_independent", "vip", "vip_depth", "tau", "tvi",
                                     "reason")}
    # a sensitivity reading defined for every model (the paper's code fixes the VIP per model by hand): TVI from a
    # fixed layer, half the depth
    half = L // 2
    summary |= {"fixed_vip": half} | _interval_cols("tvi_fixed", mean_ci(last[:, half:].mean(1), seed=seed))
    summary["blind_agreement"] = float((~dep).mean())
    if prior_answer is not None and "prior_violating" in splits:
        viol = frame[frame.split == "prior_violating"]
        summary["prior_rate"] = float((viol.answer_image == cands.index(prior_answer)).mean())
        summary["n_prior_violating"] = len(viol)
    summary["accuracy"] = float(frame.correct.mean())
    if np.isfinite(point["vip"]):
        summary |= _interval_cols("tvi", mean_ci(point["tvi_items"], seed=seed))
        t, c = point["tvi_items"], frame.correct.to_numpy(float)
        if np.ptp(c) > 0:
            rho = float(spearmanr(t, c).statistic)
            iv = bootstrap_ci(lambda a, b: float(spearmanr(a, b).statistic) if np.ptp(b) > 0 and np.ptp(a) > 0
                              else 0.0, t, c, seed=seed, method="percentile", n_resamples=1000)
            summary |= {"rho_tvi_correct": rho, "rho_lo": iv.lo, "rho_hi": iv.hi}
    return {"items": frame, "curves": curves, "summary": pd.DataFrame([summary])}


def across_models(summary: pd.DataFrame, x: str = "tvi", y: str = "prior_rate") -> dict:
    """Pearson r between two per-model columns of ``summary`` (one row per model), with its Fisher-z 95 % interval
    (n >= 4) and n. A handful of models cannot test an across-model correlation: with n = 4, |r| must exceed 0.95
    for p < 0.05, and the interval spans most of [-1, 1]; the numbers say so."""
    f = summary[[x, y]].dropna()
    out = {"x": x, "y": y, "n_models": len(f), "r": math.nan, "r_lo": math.nan, "r_hi": math.nan, "p": math.nan}
    if len(f) < 3 or f[x].nunique() < 2 or f[y].nunique() < 2:
        return out
    res = pearsonr(f[x], f[y])
    out |= {"r": float(res.statistic), "p": float(res.pvalue)}
    if len(f) >= 4:
        ci = res.confidence_interval(0.95)
        out |= {"r_lo": float(ci.low), "r_hi": float(ci.high)}
    return out
