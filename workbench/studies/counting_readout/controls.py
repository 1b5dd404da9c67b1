"""The controls of the counting study (results audit D1, D9, D10, D16): what each claim must beat.

Per (seed, task) unit, on the same prompts and split as the main probes:

- :func:`nuisance_controls`: the Hewitt & Liang control task and selectivity, shuffled labels, the nuisance baseline
  (the probe on token count, word count, operands only) and the residual probe (nuisances regressed out) at the
  best layer, and the residual probe's curve over every layer;
- :func:`decoupled_probes`: the same probes on the task's length-decoupled variant (entity and character at a fixed
  length, lists of mixed categories at a fixed length, addition split by its first operand);
- :func:`readout_geometry`: |cos| with the digit readout in three bases (raw rows; covectors through the final norm;
  those in whitened coordinates), and the permutation tests in the raw and gain bases;
- :func:`steering_controls`: steering along the probe direction and the class-mean direction against a null of
  norm-matched random directions, and the count-dependent edit (move each prompt's probe reading to another
  count) against random directions displaced by the same amounts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from workbench.core.models import Model
from workbench.core.sites import layer_site
from workbench.data.tasks import DECOUPLED_OPTIONS, TaskSet, answered_task, nuisance_frame, split_groups, split_indices
from workbench.methods.activations import PrefixCache
from workbench.methods.controls import (
    NullResult,
    class_mean_direction,
    direction_null,
    probe_target_edit,
    scaled_edit,
)
from workbench.methods.probes.controls import nuisance_design, probe_controls, residualize
from workbench.methods.probes.features import residual_features_many
from workbench.methods.probes.layerwise import layerwise_max_null, layerwise_ridge
from workbench.methods.readout import readout_covectors, residual_covariance
from workbench.methods.stats import accuracy_ci, mean_ci
from workbench.studies.counting_readout.geometry import geometry_table, permutation_test
from workbench.studies.counting_readout.interventions import steering_edit


def nuisances_of(model: Model, ts: TaskSet) -> tuple[pd.DataFrame, list]:
    """The nuisance columns a count probe must beat, and the control task's types. Addition: its first operand
    only (the two operands sum to the count) and the operand as the type; the others: token, word and character
    counts, and the token count as the type (the length a probe could read instead of the count)."""
    frame = nuisance_frame(ts, model.tokenizer)
    if ts.task == "addition":
        return frame[["operand_a", "n_tokens"]], frame.operand_a.tolist()
    return frame[["n_tokens", "n_words", "n_chars"]], frame.n_tokens.tolist()


def _rows(table: pd.DataFrame, **keys) -> pd.DataFrame:
    return table.assign(**keys)[[*keys, *table.columns]]


def nuisance_controls(model: Model, ts: TaskSet, feats: dict, counts: np.ndarray, tr: np.ndarray, te: np.ndarray,
                      best: int, seed: int, *, n_shuffles: int = 5, device=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(controls at the best layer, the residual probe's per-layer table) for one unit; ``ts`` holds the train then
    the test prompts in the row order of ``feats``."""
    nuis, types = nuisances_of(model, ts)
    ctrl = probe_controls(feats[best], counts, nuis, tr, te, groups=ts.prompts, types=types, seed=seed,
                          n_shuffles=n_shuffles).to_frame()
    design = nuisance_design(nuis)
    res = {layer: residualize(X, design, tr) for layer, X in feats.items()}
    lw = layerwise_ridge(res, counts.astype(float), tr, te, seed=seed, device=device, groups=ts.prompts, ci=True)
    return ctrl.assign(layer=best), lw.table


def decoupled_probes(model: Model, task: str, seed: int, n_train: int, n_test: int, layers: Sequence[int],
                     batch_size: int, *, n_shuffles: int = 5, device=None,
                     plain: tuple[TaskSet, dict] | None = None) -> tuple[list[pd.DataFrame], pd.DataFrame, dict]:
    """The probes on the length-decoupled variant of ``task``: per-layer tables of the probe (``decoupled``) and of
    the residual probe (``decoupled_residual``), the controls at the variant's best layer, and facts (n, distinct
    held-out units, best layer). Addition reuses the plain prompts and their features (``plain``: the TaskSet and
    features, train then test) with a split by first operand."""
    if task == "addition":
        if plain is None:
            raise ValueError("addition's decoupled variant is a split of the plain prompts: pass plain=(ts, feats)")
        ts, feats = plain
        groups = split_groups(ts, task, decoupled=True)
        tr, te = split_indices(ts.counts, [n_train, n_test], seed=seed, groups=groups)
        facts0 = {f"decoupled_test_operand_{a}": 1.0 for a in sorted({groups[i] for i in te})}  # held-out a's
    else:
        facts0 = {}
        ts_all, _ = answered_task(model, task, n_train + n_test, seed=seed + 10_000, **DECOUPLED_OPTIONS[task])
        tr, te = split_indices(ts_all.counts, [n_train, n_test], seed=seed, groups=ts_all.prompts)
        order = np.concatenate([tr, te])
        ts = ts_all.subset(order)
        tr, te = np.arange(len(tr)), np.arange(len(tr), len(order))
        feats = residual_features_many(model, ts.prompts, layers, {"last_token": "last"},
                                       batch_size=batch_size)["last_token"]
    counts = np.asarray(ts.counts)
    groups = ts.prompts  # the split kept operands apart; the units of intervals and shuffles are the prompts
    lw = layerwise_ridge(feats, counts.astype(float), tr, te, seed=seed, device=device, groups=groups, ci=True)
    best = int(lw.table.loc[lw.table.r2_val.idxmax(), "layer"])
    nuis, types = nuisances_of(model, ts)
    ctrl = probe_controls(feats[best], counts, nuis, tr, te, groups=groups, types=types, seed=seed,
                          n_shuffles=n_shuffles).to_frame().assign(layer=best)
    design = nuisance_design(nuis)
    res = {layer: residualize(X, design, tr) for layer, X in feats.items()}
    lw_res = layerwise_ridge(res, counts.astype(float), tr, te, seed=seed, device=device, groups=groups, ci=True)
    facts = facts0 | {"decoupled_best_layer": best, "decoupled_n_test": len(te),
             "decoupled_n_test_units": len(set(np.asarray(groups, dtype=object)[te].tolist())),
             "decoupled_words_sd": float(nuisance_frame(ts).n_words.std())}
    return [lw.table.assign(variant="decoupled"), lw_res.table.assign(variant="decoupled_residual")], ctrl, facts


def best_layer_null(feats: dict, counts: np.ndarray, tr, te, probes: dict, groups, seed: int, n_permutations: int,
                    device=None) -> dict:
    """The best layer's held-out R² against the max over all layers under shuffled counts (D16)."""
    res = layerwise_max_null(feats, counts.astype(float), tr, te, probes, n_permutations=n_permutations,
                             groups=groups, seed=seed, device=device)
    return {"best_r2_max_null_p": res.p, "best_r2_max_null_threshold": res.threshold,
            "best_r2_n_layers": res.n_candidates, "best_r2_n_permutations": res.n_permutations}


def readout_geometry(model: Model, feats: dict, probes: dict, counts: np.ndarray, tr: np.ndarray, best: int,
                     digit_ids: Sequence[int], groups, seed: int, n_permutations: int) -> tuple[pd.DataFrame, dict]:
    """Per-layer |cos| in the three bases, and the permutation tests at the best layer (raw rows and the
    covectors through the final norm), with ``n_permutations`` shuffles of the counts among distinct prompts."""
    W_U = model.W_U.detach()
    cov, sig = {}, {}
    for layer, X in feats.items():
        H = X[tr]
        cov[layer] = readout_covectors(model, digit_ids, H)
        sig[layer] = residual_covariance(H)
    geo = geometry_table(probes, W_U, digit_ids, seed=seed, covectors_by_layer=cov, sigma_by_layer=sig)
    g_tr = np.asarray(groups, dtype=object)[tr].tolist()
    y_tr = counts[tr].astype(float)
    alpha = probes[best].alpha
    raw = permutation_test(feats[best][tr], y_tr, W_U, digit_ids, n_perm=n_permutations, seed=seed, alpha=alpha,
                           groups=g_tr)
    gain = permutation_test(feats[best][tr], y_tr, cov[best], list(range(len(digit_ids))), n_perm=n_permutations,
                            seed=seed, alpha=alpha, groups=g_tr)
    white = permutation_test(feats[best][tr], y_tr, cov[best], list(range(len(digit_ids))), n_perm=n_permutations,
                             seed=seed, alpha=alpha, groups=g_tr, sigma=sig[best])
    facts = {"whitened_permutation_p": white.p_value, "whitened_permutation_p_less": white.p_less,
             "whitened_permutation_observed_cos": white.observed,
             "whitened_permutation_null_mean_cos": float(white.null.double().mean()),
             "permutation_p": raw.p_value, "permutation_p_less": raw.p_less, "permutation_observed_cos": raw.observed,
             "permutation_null_mean_cos": float(raw.null.double().mean()),
             "gain_permutation_p": gain.p_value, "gain_permutation_p_less": gain.p_less,
             "gain_permutation_observed_cos": gain.observed, "n_permutations": n_permutations}
    return geo, facts


def _null_columns(res: NullResult) -> dict:
    """The null's columns of a steering row: null_lo / null_hi (its 95 % range), null_mean, null_sd, p_greater,
    p_less (the observed value against it, floor 1 / (1 + n_null)), n_null."""
    return {k: v for k, v in res.to_dict().items() if k != "observed"}


def _probe_readout(probe) -> tuple[torch.Tensor, float]:
    """(w, b) with the probe's prediction = w · h + b in raw residual coordinates."""
    w = probe.coef_std.double() / probe.std.double()
    return w, float(probe.intercept - probe.mean.double() @ w)


def steering_controls(model: Model, test, digit_ids: Sequence[int], feats: dict, counts: np.ndarray,
                      tr: np.ndarray, best: int, probe, alpha_abs: float, seed: int, *, n_null: int, n_prompts: int,
                      batch_size: int, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """Steering and the count-dependent edit on the first ``n_prompts`` held-out prompts (digit-restricted next
    token), each against a null of ``n_null`` norm-matched random directions.

    - ``steer_probe`` / ``steer_class_mean``: a constant shift of ``alpha_abs`` along the probe direction / the
      class-mean direction at the best layer; score: the accuracy change against the unedited model. Both are
      compared with one null (random directions of the same norm ``alpha_abs``). A constant shift cannot separate
      balanced counts, so this asks only whether the direction moves answers more than a random one.
    - ``count_edit``: each prompt's probe reading moved to another count (seeded, never its own); score: the
      fraction of answers that follow the target (chance 1/9). Its null displaces each prompt by the same distance
      along random directions."""
    site = layer_site(best)
    sub = test.subset(np.arange(min(n_prompts, len(test))))
    cache = PrefixCache.build(model, sub.prompts, batch_size=batch_size)
    groups = sub.prompts
    ids = torch.tensor(list(digit_ids), dtype=torch.long)
    gold = np.asarray(sub.counts)

    def predict(edits=None) -> np.ndarray:
        """The digit-restricted answer (1..9) of every prompt: the model's last-token logits recomputed under
        ``edits`` (a dict, or a callable of the batch's prompt indices) on the prefix cache."""
        out = np.zeros(len(sub), dtype=np.int64)
        for batch in cache.batches:
            e = edits(batch.index) if callable(edits) else edits
            logits = cache.step(batch, edits=e).logits if e else batch.logits
            out[batch.index] = logits.float().cpu()[:, ids].argmax(-1).numpy() + 1
        return out

    base_correct = (predict() == gold).astype(np.float64)
    facts = {"steer_baseline_acc": float(base_correct.mean()), "steer_n_prompts": len(sub)}

    def steer_score(u) -> float:
        return float((predict({site: steering_edit(u, alpha_abs)}) == gold).mean() - base_correct.mean())

    X = feats[best][tr].double()
    directions = {"probe": probe.direction_raw.double(), "class_mean": class_mean_direction(X, counts[tr])}
    units = {name: v / v.norm() for name, v in directions.items()}
    null = direction_null(steer_score, units["probe"], n=n_null, seed=seed, progress=progress)
    rows = []
    for name, unit in units.items():
        correct = (predict({site: steering_edit(unit, alpha_abs)}) == gold).astype(np.float64)
        ci = mean_ci(correct - base_correct, groups=groups)
        res = NullResult.of(ci.estimate, null.null)
        rows.append({"edit": f"steer_{name}", "alpha_abs": alpha_abs, "score": "accuracy_change",
                     "value": ci.estimate, "value_lo": ci.lo, "value_hi": ci.hi, "n_units": ci.n,
                     "acc": float(correct.mean())} | _null_columns(res))
    facts["class_mean_cos_probe"] = float(units["class_mean"] @ units["probe"])
    # the count-dependent edit: targets are other counts, drawn per prompt
    rng = np.random.default_rng(seed)
    targets = ((gold - 1 + rng.integers(1, 9, len(gold))) % 9) + 1
    w, b = _probe_readout(probe)
    H = cache.last_token([best])[best].double().cpu()
    shift = ((torch.from_numpy(targets).double() - (H @ w + b)) / w.norm()).abs()  # each prompt's displacement

    def null_score(u) -> float:
        return float((predict(lambda index: {site: scaled_edit(u.float(), shift[index].float())}) == targets).mean())

    pred = predict(lambda index: {site: probe_target_edit(w.float(), b, torch.from_numpy(targets[index]).float())})
    edit_null = direction_null(null_score, w / w.norm(), n=n_null, seed=seed + 1, progress=progress)
    follows = (pred == targets).astype(int)
    res = NullResult.of(float(follows.mean()), edit_null.null)
    ci = accuracy_ci(follows, groups=groups)
    rows.append({"edit": "count_edit", "alpha_abs": float(shift.mean()), "score": "follows_target",
                 "value": ci.estimate, "value_lo": ci.lo, "value_hi": ci.hi, "n_units": ci.n,
                 "acc": float((pred == gold).mean())} | _null_columns(res))
    return pd.DataFrame(rows), facts
