"""Three recent claims, one per thread, measured on the registry models (``shared/research/methods.md`` §5).

1. Counting, *early encoding, late suppression* (arXiv 2604.00778) and the repeated-token delimiter sweep of
   arXiv 2605.09239: :func:`late_suppression` zero- and mean-ablates the MLP outputs of the last 1-3 blocks (every
   position) and reads the digit-restricted answer; :func:`mlp_sweep` zero-ablates one block's MLP at a time;
   :func:`delimiter_sweep` runs both on repeated-item lists joined by each delimiter and names the overwrite layer
   three ways (:func:`overwrite_layers`: the block whose output lowers the lens's gold log-probability most, the MLP
   whose ablation raises the answer's gold log-probability most, and the layer where the count probe loses half its
   margin over chance after its peak), as a fraction of depth next to the paper's 88-93 %.
2. Latent reasoning, *Soft Thinking is single-threaded* (arXiv 2508.03440): :func:`soft_thinking_threads` reports
   per latent step the top token's share of the soft mixture and the mixture's entropy, with and without the
   paper's remedy (Gumbel-softmax noise on the mixture weights, ``LatentConfig.gumbel_tau``), and accuracy and
   drift (max |cos| to any token embedding) for each.
3. VLMs, *visual integration point* (arXiv 2509.23050): :func:`integration_curve` measures per layer the cosine
   distance between the hidden states of the same question with and without its image (the same tokens with the
   image tokens taken out), at the question's positions;
   :func:`vip_tvi` names the layer where it rises (VIP: the first layer reaching half its maximum) and the total
   beyond it (TVI: the sum of the distances from the VIP on, divided by the number of layers). The paper's exact
   thresholds are not reproduced here; these are our operational definitions, stated wherever the numbers appear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch

from workbench.core.models import Model
from workbench.core.sites import layer_site
from workbench.core.trace import trace
from workbench.core.vlm import image_token_mask
from workbench.data.reasoning import ReasoningSet
from workbench.data.vqa import VQAItem
from workbench.methods.activations import last_logits
from workbench.methods.answering import vqa_inputs
from workbench.methods.encoded_expressed import gap_panel
from workbench.methods.latent import LatentConfig, LatentRun, run_latent
from workbench.methods.manifold import manifold_metrics
from workbench.methods.patching import site_of
from workbench.studies.encoded_expressed.tasks import counting_task

PAPER_OVERWRITE_DEPTH = (0.88, 0.93)  # arXiv 2605.09239: the MLP that overwrites the count sits at 88-93 % of depth
DELIMITERS = {" ": "space", ", ": "comma", "\n": "newline"}


# -- 1. counting: late suppression and the delimiter sweep -------------------------------------------------------
def _batches(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


@torch.no_grad()
def mlp_means(model: Model, prompts: Sequence[str], blocks: Sequence[int],
              batch_size: int = 32) -> dict[int, torch.Tensor]:
    """Mean MLP output of each block over every real (unpadded) position of ``prompts``: the mean-ablation values."""
    sites = {site_of("mlp", b): b for b in blocks}
    sums = {b: torch.zeros(model.d_model, dtype=torch.float64) for b in blocks}
    count = 0
    for s, e in _batches(len(prompts), batch_size):
        enc = model.encode(prompts[s:e])
        with trace(model, list(sites)) as tr:
            last_logits(model, enc)
        mask = enc["attention_mask"].bool()
        count += int(mask.sum())
        for site, b in sites.items():
            sums[b] += tr[site][mask.to(tr[site].device)].double().sum(0).cpu()
    return {b: (v / count).float() for b, v in sums.items()}


@torch.no_grad()
def digit_readout(model: Model, prompts: Sequence[str], labels: np.ndarray, digit_ids: Sequence[int], *,
                  edits: Mapping | None = None, batch_size: int = 32) -> dict[str, float]:
    """Digit-restricted accuracy and mean gold log-probability (softmax over the digits) at the last position."""
    ids = torch.tensor(list(digit_ids))
    correct, logp = [], []
    for s, e in _batches(len(prompts), batch_size):
        enc = model.encode(prompts[s:e])
        if edits:
            with trace(model, edits=dict(edits)):
                z = last_logits(model, enc).float().cpu()
        else:
            z = last_logits(model, enc).float().cpu()
        lp = torch.log_softmax(z[:, ids], -1)
        gold = torch.as_tensor(labels[s:e])
        correct.append(lp.argmax(-1) == gold)
        logp.append(lp[torch.arange(len(gold)), gold])
    return {"digit_acc": float(torch.cat(correct).double().mean()), "gold_logprob": float(torch.cat(logp).mean())}


def _ablate(values: Mapping[int, torch.Tensor | None]) -> dict:
    def make(v):
        return (lambda t: torch.zeros_like(t)) if v is None else (lambda t: v.to(t.device, t.dtype).expand_as(t))
    return {site_of("mlp", b): make(v) for b, v in values.items()}


def late_suppression(model: Model, prompts: Sequence[str], labels: np.ndarray, digit_ids: Sequence[int], *,
                     last: Sequence[int] = (1, 2, 3), batch_size: int = 32,
                     means: Mapping[int, torch.Tensor] | None = None) -> pd.DataFrame:
    """Digit-restricted accuracy with the MLPs of the last k blocks (k in ``last``) zero- or mean-ablated at every
    position. ``means``: mean-ablation values (default: :func:`mlp_means` of these prompts)."""
    L = model.n_layers
    bad = [k for k in last if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L]
    if bad:
        raise ValueError(f"last {bad} not allowed: ablate 1..{L} final blocks")
    blocks_all = sorted({b for k in last for b in range(L - k, L)})
    means = means if means is not None else mlp_means(model, prompts, blocks_all, batch_size)
    rows = [{"ablation": "none", "n_last": 0, "blocks": ""}
            | digit_readout(model, prompts, labels, digit_ids, batch_size=batch_size)]
    for k in last:
        blocks = list(range(L - k, L))
        for mode in ("zero", "mean"):
            edits = _ablate({b: None if mode == "zero" else means[b] for b in blocks})
            rows.append({"ablation": mode, "n_last": k, "blocks": ",".join(map(str, blocks))}
                        | digit_readout(model, prompts, labels, digit_ids, edits=edits, batch_size=batch_size))
    frame = pd.DataFrame(rows)
    base = frame.iloc[0]
    frame["acc_change"] = frame.digit_acc - base.digit_acc
    frame["logprob_change"] = frame.gold_logprob - base.gold_logprob
    return frame


def mlp_sweep(model: Model, prompts: Sequence[str], labels: np.ndarray, digit_ids: Sequence[int], *,
              blocks: Sequence[int] | None = None, batch_size: int = 32) -> pd.DataFrame:
    """One row per block: the answer with that block's MLP zero-ablated (every position), and the change."""
    L = model.n_layers
    blocks = list(range(L)) if blocks is None else [int(b) for b in blocks]
    base = digit_readout(model, prompts, labels, digit_ids, batch_size=batch_size)
    rows = []
    for b in blocks:
        r = digit_readout(model, prompts, labels, digit_ids, edits=_ablate({b: None}), batch_size=batch_size)
        rows.append({"block": b, "depth": (b + 1) / L, **r, "acc_change": r["digit_acc"] - base["digit_acc"],
                     "logprob_change": r["gold_logprob"] - base["gold_logprob"]})
    return pd.DataFrame(rows)


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


def overwrite_layers(curve: pd.DataFrame, sweep: pd.DataFrame, n_layers: int,
                     panel: pd.DataFrame | None = None) -> dict:
    """Where the count is overwritten, three ways, each with its fraction of depth (layer / n_layers):

    - ``lens_drop``: the block whose output lowers the lens's mean gold log-probability (softmax over the digits)
      most (hidden-state layer l is the output of block l-1), and ``lens_peak``: the layer where that is highest;
    - ``mlp``: the block whose MLP, zero-ablated, raises the answer's gold log-probability most;
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
    if panel is not None:
        acc = panel.set_index("index").probe_acc.sort_index()
        chance = float(panel.chance.iloc[0])
        top = int(acc.idxmax())
        half = chance + (float(acc.max()) - chance) / 2
        below = acc.loc[top:][acc.loc[top:] <= half]
        drop = int(below.index[0]) if len(below) else math.nan
        out |= {"probe_peak_layer": top, "probe_peak_acc": float(acc.max()), "probe_final_acc": float(acc.iloc[-1]),
                "probe_drop_layer": drop, "probe_drop_depth": drop / n_layers}
    return out


def delimiter_sweep(model: Model, *, delimiters: Sequence[str] = tuple(DELIMITERS), n: int = 180,
                    n_train: int = 120, seed: int = 0, layers=None, batch_size: int = 32,
                    blocks: Sequence[int] | None = None,
                    progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Repeated-item counting (``"Items: plum, plum, plum. Count:"``, one fruit per prompt) with each delimiter:
    (gap panel, lens curves, MLP sweeps, summary: overwrite layers against the paper's 88-93 %). Scored on the held-out
    rows.
    blocks: the blocks the MLP sweep ablates one at a time (default: all)."""
    if not delimiters:
        raise ValueError("delimiters is empty")
    panels, curves, sweeps, summary = [], [], [], []
    for delim in delimiters:
        label = DELIMITERS.get(delim, repr(delim))
        gt, extra = counting_task(model, "list_length", n=n, n_train=n_train, seed=seed, layers=layers, patch=False,
                                  batch_size=batch_size, name=f"repeat ({label})", repeat=True, distinct=False,
                                  delimiter=delim)
        te = extra["test_idx"]
        prompts = [extra["prompts"][i] for i in te]
        labels = (extra["counts"] - 1)[te]
        panel = gap_panel(model, gt, progress=progress)
        panels.append(panel.assign(delimiter=label))
        curve = lens_gold_curve(model, gt.features[:, te], gt.axis_values, labels, extra["digit_ids"])
        sweep = mlp_sweep(model, prompts, labels, extra["digit_ids"], blocks=blocks, batch_size=batch_size)
        curves.append(curve.assign(delimiter=label))
        sweeps.append(sweep.assign(delimiter=label))
        summary.append({"delimiter": label, "n_test": len(te), "accuracy": extra["accuracy"],
                        **overwrite_layers(curve, sweep, model.n_layers, panel),
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
def integration_curve(model, items: Sequence[VQAItem], *, batch_size: int = 16) -> pd.DataFrame:
    """One row per (item, layer): mean cosine distance (1 - cos) between the hidden states of the question's tokens
    (every token after the last image token) with and without the image (``dist_text``), and at the last token
    (``dist_last``). The input without the image is the same token sequence with the image tokens taken out, so the
    compared tokens are the same by construction. Layer 0 (the embeddings) is 0 by construction."""
    items = list(items)
    if not items:
        raise ValueError("items is empty")
    pad = model.processor.tokenizer.pad_token_id
    pad = 0 if pad is None else int(pad)
    sites = [layer_site(v) for v in range(model.n_layers + 1)]
    rows = []
    for s, e in _batches(len(items), batch_size):
        chunk = items[s:e]
        with_img = vqa_inputs(model, [it.image for it in chunk], [it.question for it in chunk])
        ids, real = with_img["input_ids"].cpu(), with_img["attention_mask"].cpu().bool()
        img = image_token_mask(model, ids)
        texts, tails = [], []
        for i in range(len(chunk)):
            if not img[i].any():
                raise ValueError(f"item {s + i} has no image token in its input; the comparison needs one")
            texts.append(ids[i][real[i] & ~img[i]])
            tails.append(int(ids.shape[1] - 1 - int(img[i].nonzero().max())))  # tokens after the last image token
        T = max(len(t) for t in texts)
        text_ids = torch.full((len(chunk), T), pad, dtype=ids.dtype)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, t in enumerate(texts):
            text_ids[i, T - len(t):] = t
            mask[i, T - len(t):] = 1
        text_only = {"input_ids": text_ids.to(model.device), "attention_mask": mask.to(model.device),
                     "position_ids": ((mask.cumsum(-1) - 1).clamp(min=0)).to(model.device)}
        with trace(model, sites) as ti:
            last_logits(model, with_img)
        with trace(model, sites) as tt:
            last_logits(model, text_only)
        for v, site in enumerate(sites):
            hi, ht = ti[site].float(), tt[site].float()
            for i, q in enumerate(tails):
                cos = torch.nn.functional.cosine_similarity(hi[i, -q:], ht[i, -q:], dim=-1)
                rows.append({"item": s + i, "layer": v, "dist_text": float((1 - cos).mean()),
                             "dist_last": float(1 - cos[-1])})
    return pd.DataFrame(rows)


def vip_tvi(curve: pd.Series, *, fraction: float = 0.5) -> dict:
    """VIP: the first layer whose distance reaches ``fraction`` of the curve's maximum; TVI: the sum of the distances
    from the VIP to the last layer, divided by the number of layers (so models of different depth compare)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
    c = curve.sort_index()
    if c.empty or not np.isfinite(c.to_numpy()).all():
        raise ValueError("the distance curve is empty or not finite")
    L = int(c.index.max())
    peak = float(c.max())
    if peak <= 0:
        return {"vip": math.nan, "vip_depth": math.nan, "tvi": 0.0, "max_dist": peak}
    vip = int(c[c >= fraction * peak].index.min())
    return {"vip": vip, "vip_depth": vip / L, "tvi": float(c.loc[vip:].sum()) / L, "max_dist": peak}


def visual_integration(model, splits: Mapping[str, Sequence[VQAItem]], *, batch_size: int = 16,
                       fraction: float = 0.5) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per split and layer: mean distances; per split: VIP and TVI of the text-position curve and of the last
    token)."""
    curves, summary = [], []
    for name, items in splits.items():
        per_item = integration_curve(model, items, batch_size=batch_size)
        curve = per_item.groupby("layer")[["dist_text", "dist_last"]].mean().reset_index().assign(split=name)
        curves.append(curve)
        text = vip_tvi(curve.set_index("layer").dist_text, fraction=fraction)
        last = vip_tvi(curve.set_index("layer").dist_last, fraction=fraction)
        summary.append({"split": name, "n_items": len(items), **text,
                        **{f"{k}_last": v for k, v in last.items()}})
    return pd.concat(curves, ignore_index=True), pd.DataFrame(summary)
