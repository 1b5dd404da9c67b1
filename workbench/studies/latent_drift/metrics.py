"""Drift metrics of latent reasoning, per step (research thread 3; methods.md defines them, no paper does).

From a :class:`workbench.methods.latent.LatentRun`:

- :func:`manifold_metrics` (:mod:`workbench.methods.manifold`, which the encoded-vs-expressed study uses too): for the
  vector fed in at each step, the max cosine to any token's input embedding and the nearest tokens, the norm ratio to
  the mean embedding norm, the mean Euclidean distance to the k nearest embeddings (divided by the mean embedding
  norm), and the cosine with the previous step's input;
- :func:`lens_metrics`: the logit lens of every layer at every step: entropy, top-1 probability, the rank of the
  gold intermediate result of that step (1 = top), and at the last layer the KL divergence from this step's lens
  to the final step's;
- :func:`fact_retention`: a ridge probe trained on the state of the step where a fact (an intermediate value) is
  computed, evaluated on the states of later steps: R² and probe-round accuracy against the gap, next to a probe
  refitted at each later step (is the fact still there in another direction?);
- :func:`step_summary`: the per-step table the figures plot (median over items), mixture entropy included.

Embedding-space quantities use the embeddings the model actually feeds its first block (Gemma's sqrt(d) scale
included); the vocabulary is scanned in chunks, so a 262k-row head needs no [V, d] copy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from workbench.core.models import Model
from workbench.data.reasoning import ReasoningSet, arithmetic_operands, gold_step_token_ids
from workbench.methods.latent import LatentRun
from workbench.methods.manifold import manifold_metrics
from workbench.methods.probes.base import probe_round_accuracy, r2_score
from workbench.methods.probes.linear import RidgeProbe
from workbench.methods.stats import mean_ci

__all__ = ["fact_retention", "lens_by_step_layer", "lens_metrics", "manifold_metrics", "mirror_values",
           "operand_controlled_retention", "retention_beyond_operands", "step_summary"]


def _gold_for_step(golds: list[int], step: int) -> int:
    """The gold token of 1-based ``step``: the step-th intermediate, the final answer beyond the last one."""
    return golds[min(step, len(golds)) - 1]


@torch.no_grad()
def lens_metrics(model: Model, run: LatentRun, rs: ReasoningSet, *, steps_per_hop: int = 1) -> pd.DataFrame:
    """One row per (item, step, layer): entropy, top1_prob, top1_token, gold_rank, gold_prob; plus kl_to_final at
    the last layer (KL(lens at step k || lens at the item's final step), nats; NaN at other layers).
    ``steps_per_hop``: loop steps per reasoning step (a CoT-trained model writes each step as several tokens): the
    gold of step k is intermediate ceil(k / steps_per_hop)."""
    if isinstance(steps_per_hop, bool) or not isinstance(steps_per_hop, int) or steps_per_hop < 1:
        raise ValueError(f"steps_per_hop must be a positive int, got {steps_per_hop!r}")
    gold_ids = gold_step_token_ids(model.tokenizer, rs)
    n, S, Lp1, d = run.states.shape
    L = Lp1 - 1
    frames = []
    for i in range(n):
        ks = torch.nonzero(run.valid[i], as_tuple=True)[0]
        if len(ks) == 0:
            continue
        H = run.states[i, ks].reshape(-1, d).to(model.device, model.dtype)  # [k * (L+1), d]
        logp = torch.log_softmax(model.lens_logits(H).double(), -1).cpu()  # [k*(L+1), V]
        logp = logp.reshape(len(ks), Lp1, -1)
        gold = torch.tensor([_gold_for_step(gold_ids[i], -(-(int(k) + 1) // steps_per_hop)) for k in ks])
        p = logp.exp()
        ent = -(p * logp).sum(-1)  # [k, L+1]
        top_p, top_i = p.max(-1)
        g = gold[:, None, None].expand(-1, Lp1, 1)
        gold_lp = logp.gather(-1, g)[..., 0]
        rank = (logp > gold_lp[..., None]).sum(-1) + 1
        final = logp[-1, L]
        kl = (p[:, L] * (logp[:, L] - final[None])).sum(-1)
        kk, ll = np.meshgrid(ks.numpy() + 1, np.arange(Lp1), indexing="ij")
        frame = pd.DataFrame({
            "item": i, "step": kk.ravel(), "layer": ll.ravel(), "entropy": ent.numpy().ravel(),
            "top1_prob": top_p.numpy().ravel(),
            "top1_token": model.tokenizer.convert_ids_to_tokens(top_i.reshape(-1).tolist()),
            "gold_rank": rank.numpy().ravel(), "gold_prob": gold_lp.exp().numpy().ravel(),
        })
        frame["kl_to_final"] = np.where(frame.layer == L, np.repeat(kl.numpy(), Lp1), np.nan)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def fact_retention(run: LatentRun, rs: ReasoningSet, layer: int, *, train_fraction: float = 0.5,
                   seed: int = 0) -> pd.DataFrame:
    """Does the state still hold the value computed at step j, k - j steps later?

    For every fact step j (1..number of intermediates, numeric tasks), a :class:`RidgeProbe` is trained on the
    states at step j of a seeded ``train_fraction`` of the items (target: the intermediate value of step j) and
    evaluated on the other items' states at every step k >= j (same target). The control ``*_refit`` trains a
    fresh probe at step k on the same training items: a fact that the step-j probe misses but the refit finds has
    moved, not vanished. Rows: fact_step, eval_step, gap, layer, r2, round_acc, r2_refit, round_acc_refit,
    n_test.
    """
    if rs.task != "arithmetic":
        raise ValueError(f"fact retention needs numeric intermediates (task 'arithmetic'), got {rs.task!r}")
    n, S, Lp1, d = run.states.shape
    if not 0 <= layer < Lp1:
        raise ValueError(f"layer {layer} out of range: 0..{Lp1 - 1}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_tr = int(round(train_fraction * n))
    tr, te = order[:n_tr], order[n_tr:]
    if n_tr < 4 or len(te) < 2:
        raise ValueError(f"fact retention needs more items: {n} give {n_tr} train / {len(te)} test")
    values = np.array([[float(v) for v in steps] for steps in rs.steps])  # [n, hops]
    rows = []
    def fit(idx, step, y):
        # alpha from a validation split when there is data for one; a fixed alpha = 1 on tiny (smoke) sets
        probe = RidgeProbe(seed=seed, alpha=None if len(idx) >= 10 else 1.0)
        return probe.fit(run.states[idx, step - 1, layer].double(), torch.as_tensor(y[idx]))

    for j in range(1, min(values.shape[1], S) + 1):
        ok_tr = tr[run.valid[tr, j - 1].numpy()]
        y = values[:, j - 1]
        if len(ok_tr) < 4 or np.ptp(y[ok_tr]) == 0:
            continue
        probe = fit(ok_tr, j, y)
        for k in range(j, S + 1):
            ok_te = te[run.valid[te, k - 1].numpy()]
            ok_tr_k = tr[run.valid[tr, k - 1].numpy()]
            if len(ok_te) < 2 or len(ok_tr_k) < 4:
                continue
            X = run.states[ok_te, k - 1, layer].double()
            target = torch.as_tensor(y[ok_te])
            pred = probe.predict(X)
            refit = fit(ok_tr_k, k, y).predict(X)  # control: is the fact decodable at step k at all?
            rows.append({"fact_step": j, "eval_step": k, "gap": k - j, "layer": layer,
                         "r2": r2_score(pred, target), "round_acc": probe_round_accuracy(pred, target, lo=0, hi=9),
                         "r2_refit": r2_score(refit, target),
                         "round_acc_refit": probe_round_accuracy(refit, target, lo=0, hi=9), "n_test": len(ok_te)})
    return pd.DataFrame(rows)


def mirror_values(rs: ReasoningSet) -> np.ndarray:
    """The "mirror chain" of every arithmetic item: the same operands with every + and - swapped (a doubling stays a
    doubling), [n, hops]. Linear in the operands exactly as the real intermediates are, but never computed by the
    task: the control target of :func:`operand_controlled_retention`."""
    starts, ops, consts = arithmetic_operands(rs)
    out = []
    for s, op, cs in zip(starts, ops, consts):
        v, row = float(s), []
        for o, c in zip(op, cs):
            v = v - c if o == "+" else v + c if o == "-" else 2 * v
            row.append(v)
        out.append(row)
    return np.array(out)


def operand_controlled_retention(run: LatentRun, rs: ReasoningSet, layer: int, *, split_seeds=(0, 1, 2),
                                 train_fraction: float = 0.5) -> pd.DataFrame:
    """Which intermediates a state holds *beyond what a linear read of the prompt's operands gives* (arithmetic).

    The computed values are linear in the numbers the prompt writes (``a=3; b=a+4``: b = a + 4), so a linear probe
    reads an "intermediate" from a state that only carries the operands. The control target is the mirror chain
    (:func:`mirror_values`: the same operands, + and - swapped): exactly as linear in the operands, never computed.
    A state that holds the operands in independent directions (with independent decoding noise) gives both the same
    absolute squared error (the mirror chain's values spread wider, so its R² is higher: R² is not the comparison);
    one that holds the computed value reads the real chain better. Per split seed (the prompts split into train /
    test halves: no prompt on both sides), loop step and fact, at ``layer``, ridge probes (:class:`RidgeProbe`) for
    the value, its mirror, and each operand (start value and the hops' signed constants: +4, -4; a doubling's 2).

    Rows, one per (split seed, step, fact, test item): ``err_value`` and ``err_mirror`` (squared test errors, both
    over the value's test variance, so ``err_value``'s mean is 1 - R²), ``right`` (the value probe reads the value,
    rounded), and the split's ``r2``, ``r2_mirror`` and ``r2_operands`` (mean over the operands); :func:`retention_beyond_operands`
    bootstraps the difference over prompts.
    """
    if rs.task != "arithmetic":
        raise ValueError(f"the operand control needs task 'arithmetic', got {rs.task!r}")
    n, S, Lp1, d = run.states.shape
    if not 0 <= layer < Lp1:
        raise ValueError(f"layer {layer} out of range: 0..{Lp1 - 1}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}")
    starts, ops, consts = arithmetic_operands(rs)
    operands = np.array([[s] + [c if o == "+" else -c if o == "-" else c for o, c in zip(op, cs)]
                         for s, op, cs in zip(starts, ops, consts)], dtype=np.float64)  # [n, 1 + hops], signed
    values = np.array([[float(v) for v in steps] for steps in rs.steps])  # [n, hops]
    mirror = mirror_values(rs)
    prompts = np.array(rs.prompts)
    uniq = np.unique(prompts)
    rows = []

    def probe(X, y, tr, te, seed):
        p = RidgeProbe(seed=seed, alpha=None if len(tr) >= 10 else 1.0).fit(
            torch.as_tensor(X[tr]), torch.as_tensor(y[tr], dtype=torch.float64))
        return p.predict(torch.as_tensor(X[te])).numpy()

    for split in split_seeds:
        rng = np.random.default_rng(split)
        train_prompts = set(rng.permutation(uniq)[: int(round(train_fraction * len(uniq)))])
        is_tr = np.array([p in train_prompts for p in prompts])
        for k in range(1, S + 1):
            ok = run.valid[:, k - 1].numpy()
            tr, te = np.flatnonzero(is_tr & ok), np.flatnonzero(~is_tr & ok)
            if len(tr) < 8 or len(te) < 4:
                continue
            X = run.states[:, k - 1, layer].double().numpy()
            r2_ops = [r2_score(probe(X, operands[:, m], tr, te, split), operands[te, m])
                      for m in range(operands.shape[1]) if np.ptp(operands[tr, m]) > 0]
            for j in range(values.shape[1]):
                y, z = values[:, j], mirror[:, j]
                if np.ptp(y[tr]) == 0 or np.ptp(z[tr]) == 0 or np.ptp(y[te]) == 0 or np.ptp(z[te]) == 0:
                    continue
                py, pz = probe(X, y, tr, te, split), probe(X, z, tr, te, split)
                scale = y[te].var()  # one scale for both: the comparison is of absolute errors (see above)
                ey = (py - y[te]) ** 2 / scale
                ez = (pz - z[te]) ** 2 / scale
                r2y, r2z = r2_score(py, y[te]), r2_score(pz, z[te])
                for t, i in enumerate(te):
                    rows.append({"split_seed": split, "step": k, "layer": layer, "fact": j + 1, "item": int(i),
                                 "prompt": prompts[i], "err_value": float(ey[t]), "err_mirror": float(ez[t]),
                                 "right": bool(np.clip(np.round(py[t]), 0, 9) == y[i]), "r2": r2y, "r2_mirror": r2z,
                                 "r2_operands": float(np.mean(r2_ops)) if r2_ops else np.nan})
    return pd.DataFrame(rows)


def retention_beyond_operands(rows: pd.DataFrame, by=("step", "fact")) -> pd.DataFrame:
    """Per (step, fact): the value probe's R² and probe-round accuracy, the mirror chain's R², and ``beyond`` =
    (MSE(mirror) - MSE(value)) / Var(value), the mean over test items of the squared-error difference, with a
    bootstrap interval over prompts (an item's rows from every split seed stay together); the operands' mean R²;
    n_prompts, n_splits."""
    out = []
    for key, g in rows.groupby(list(by), sort=True):
        diff = g.err_mirror.to_numpy() - g.err_value.to_numpy()
        groups = g.prompt.to_numpy()
        ci = mean_ci(diff, groups=groups) if len(set(groups)) >= 2 else None
        key = key if isinstance(key, tuple) else (key,)
        per_split = g.groupby("split_seed")[["r2", "r2_mirror", "r2_operands"]].first().mean()
        out.append(dict(zip(by, key)) | {
            "r2": float(per_split.r2), "r2_mirror": float(per_split.r2_mirror),
            "r2_operands": float(per_split.r2_operands), "probe_acc": float(g.right.mean()),
            "beyond": float(diff.mean()), "beyond_lo": ci.lo if ci else np.nan, "beyond_hi": ci.hi if ci else np.nan,
            "n_prompts": int(g.prompt.nunique()), "n_splits": int(g.split_seed.nunique())})
    return pd.DataFrame(out)


def lens_by_step_layer(lens: pd.DataFrame) -> pd.DataFrame:
    """The per-(item, step, layer) lens metrics of :func:`lens_metrics` summarised over items, per step and layer:
    median_gold_rank, mean_gold_prob, median_entropy, readable (fraction of items with the gold step at rank 1)."""
    g = lens.groupby(["step", "layer"])
    return pd.DataFrame({
        "median_gold_rank": g.gold_rank.median(), "mean_gold_prob": g.gold_prob.mean(),
        "median_entropy": g.entropy.median(),
        "readable": g.gold_rank.apply(lambda r: float((r == 1).mean())),
    }).reset_index()


def step_summary(manifold: pd.DataFrame, lens: pd.DataFrame, run: LatentRun) -> pd.DataFrame:
    """Per step: medians over items of the manifold metrics and of the last layer's lens metrics, the mean
    mixture entropy (soft), and the number of items still thinking."""
    L = int(lens.layer.max())
    last = lens[lens.layer == L]
    m = manifold.groupby("step")[["max_cos", "norm_ratio", "knn_dist", "prev_cos"]].median()
    lz = last.groupby("step")[["entropy", "top1_prob", "gold_rank", "kl_to_final"]].median()
    out = m.join(lz, how="outer")
    ent = run.mixture_entropy.numpy()
    out["mixture_entropy"] = [float(np.nanmean(ent[:, k - 1])) if np.isfinite(ent[:, k - 1]).any() else np.nan
                              for k in out.index]
    out["n_items"] = [int(run.valid[:, k - 1].sum()) for k in out.index]
    return out.reset_index()
