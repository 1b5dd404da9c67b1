"""An SAE evaluation suite in the spirit of SAEBench (Karvonen et al., arXiv 2503.09532), from its definitions, on
offline data. SAEBench itself does not install here (numpy < 2, torchvision).

    data = bench_data(model, site, corpus, probing={"entity": (prompts, counts)})   # once per model and site
    row = bench_sae(model, handle, data)          # core + absorption + sparse probing of one SAE
    stab = stability({seed: handle, ...})         # best-match decoder cosine across seeds

What every SAE is measured against is computed once (:func:`bench_data`): fresh corpus windows with their clean and
zero-ablated cross-entropy, the first-letter prompts' residuals with a ground-truth letter probe, and the probing
sets' residuals with a logistic probe on the full residual for each binary task. Each SAE then costs one spliced
forward over the windows plus encodes.

Metrics (SAEBench's names where they exist):

* core: FVU, L0, dead (never fire on the windows) and dense (> 10 % of tokens) latents, CE loss recovered.
* absorption (Chanin et al., arXiv 2409.14507, as in SAEBench): single-token words (a leading space and lowercase
  letters) in an in-context prompt "``<word> has the first letter:``"; the residual is read at the word. A
  multinomial logistic probe of the first letter is the ground truth; letters whose probe F1 on held-out words is
  below ``min_probe_f1`` are left out. Per letter the *main latents* are found by k-sparse probing: latents ranked by
  the difference of their mean activation on the letter's words and on the others, k grown from 1 while the held-out
  F1 of a logistic probe on the top k rises by more than ``f1_jump`` (at most ``max_main``). On held-out words of
  the letter that the probe gets right, with ``cos`` each latent's decoder cosine with the probe direction and
  ``proj = act * cos``:

  - *absorption fraction*: 0 if the main latents' projection reaches the residual's projection on the probe, or
    the top-3 other latents with cos >= 0.1 and proj > 0 carry less than 40 % of it; 1 if the main latents'
    projection is <= 0; otherwise absorbed / (absorbed + main), absorbed = min(their projection, what the main
    latents leave);
  - *full absorption*: no main latent fires, the latent with the largest projection has cos >= 0.025 and carries at
    least 40 % of the residual's projection.

  Both are averaged over words, then over letters.
* sparse probing: each probing set (prompts with a class label) becomes one-vs-rest binary tasks with balanced
  negatives, split in halves by :func:`workbench.data.tasks.split_indices` (stratified, identical prompts on one
  side); per task the latents are ranked by |mean difference| on the training half and a logistic probe on the top k
  (k = 1, 2, 5, 10, 20) is scored on the test half, against a logistic probe on the full residual; each accuracy
  with its interval over distinct test prompts.
* stability: for two SAEs of one site trained with different seeds, each latent's best cosine among the other's
  decoder rows (alive latents only), averaged; and the fraction of latents whose best match is above 0.7.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from workbench.core.trace import trace
from workbench.data.corpus import Corpus
from workbench.data.tasks import split_indices
from workbench.methods.probes.base import standardise_stats
from workbench.methods.probes.linear import LogisticProbe, fit_softmax_regression
from workbench.methods.sae.evaluate import CoreData, core_data, core_metrics
from workbench.methods.sae.handle import SAEError, SAEHandle
from workbench.methods.stats import Interval, accuracy_ci

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE_SUFFIX = " has the first letter:"
ICL_WORDS = (" tape", " king", " moon")  # fixed in-context examples (left out of the word list)
SPARSE_KS = (1, 2, 5, 10, 20)
PROBE_C = 1.0  # inverse L2 strength of the k-sparse probes (on standardised latents); sklearn's default
FULL_CS = (0.01, 0.1, 1.0, 10.0)  # the full-residual probe's C is chosen on a validation split
STABLE_COS = 0.7  # a latent "has a match" in another seed's SAE when their decoder cosine exceeds this


# -- the shared data ----------------------------------------------------------------------------------------------
@dataclass
class LetterData:
    """First-letter prompts: the word tokens, their letters, the residual at the word, the ground-truth probe."""

    words: list[str]
    letters: np.ndarray  # [n] index into LETTERS
    acts: Tensor  # [n, d] residual at the word token
    train_idx: np.ndarray
    test_idx: np.ndarray
    directions: Tensor  # [26, d] ground-truth probe directions in the residual's own space (unit norm)
    probe_correct: np.ndarray  # [n] the ground-truth probe predicts the word's letter
    probe_f1: np.ndarray  # [26] held-out F1 of the ground-truth probe, one-vs-rest (nan: letter absent)
    evaluated: list[int]  # letters with probe F1 >= min_probe_f1 and enough words


@dataclass
class ProbingSet:
    """Prompts' residuals at the readout position and a class label, split in halves, with the binary tasks."""

    name: str
    acts: Tensor  # [n, d]
    labels: np.ndarray  # [n] class index
    classes: list[str]
    groups: list | None = None  # [n] the unit of each item (the prompt text): identical ones stay on one side
    tasks: list[dict] = field(default_factory=list)  # {"positive": class, "train": idx, "test": idx}
    residual_acc: list[float] = field(default_factory=list)  # per task: the full-residual probe's test accuracy
    residual_ci: list[Interval] = field(default_factory=list)  # per task: its interval over distinct test units


@dataclass
class BenchData:
    site: str
    core: CoreData
    letters: LetterData | None
    probing: list[ProbingSet]
    settings: dict


def first_letter_words(tokenizer, *, per_letter: int, seed: int = 0,
                       min_letters: int = 2) -> tuple[list[int], list[str]]:
    """Single-token words: tokens that decode to a space and ``min_letters``+ lowercase ASCII letters, at most
    ``per_letter`` per first letter (a seeded sample), in-context example words left out."""
    pattern = re.compile(rf"^ [a-z]{{{min_letters},}}$")
    by_letter: dict[str, list[tuple[int, str]]] = {c: [] for c in LETTERS}
    skip = set(ICL_WORDS)
    for tid in range(len(tokenizer)):
        w = tokenizer.decode([tid])
        if pattern.match(w) and w not in skip:
            by_letter[w[1]].append((tid, w))
    rng = np.random.default_rng(seed)
    ids, words = [], []
    for c in LETTERS:
        found = sorted(by_letter[c])
        if len(found) > per_letter:
            found = [found[i] for i in sorted(rng.choice(len(found), per_letter, replace=False))]
        ids += [t for t, _ in found]
        words += [w for _, w in found]
    return ids, words


def _icl_prefix(tokenizer) -> list[int]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    text = "".join(f"{w}{TEMPLATE_SUFFIX} {w.strip()[0].upper()}\n" for w in ICL_WORDS)
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def letter_data(model, site: str, *, per_letter: int = 60, seed: int = 0, min_probe_f1: float = 0.6,
                min_words: int = 6, batch_size: int = 64) -> LetterData:
    """The first-letter task at ``site``: prompts built from token ids (in-context examples + word + suffix, so the
    word is exactly one token and every prompt has the same length), a seeded half/half split stratified by letter
    (:func:`workbench.data.tasks.split_indices`),
    and the ground-truth multinomial logistic probe (C chosen on a validation split of the training half)."""
    tok = model.tokenizer
    ids, words = first_letter_words(tok, per_letter=per_letter, seed=seed)
    if not ids:
        raise SAEError("the tokenizer has no single-token lowercase words for the first-letter task")
    prefix = _icl_prefix(tok)
    suffix = tok(TEMPLATE_SUFFIX, add_special_tokens=False)["input_ids"]
    pos = len(prefix)
    rows = torch.tensor([prefix + [t] + suffix for t in ids])
    acts = []
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size].to(model.device)
        with trace(model, site, positions=pos, stop=True) as tr:
            model.hf(input_ids=batch)
        acts.append(tr[site].reshape(len(batch), -1).float().cpu())
    acts = torch.cat(acts)
    letters = np.array([LETTERS.index(w[1]) for w in words])
    # halves stratified by letter, each word on one side (the package's one split)
    train, test = (np.sort(i) for i in split_indices(letters, [0.5, 0.5], seed=seed, groups=words))
    probe = LogisticProbe(seed=seed).fit(acts[train], letters[train])
    pred = np.full(len(words), -1)
    pred[:] = probe.predict(acts).numpy()
    classes = probe.classes.numpy()
    directions = torch.zeros(26, acts.shape[1], dtype=torch.float64)
    # the probe acts on standardised inputs: its direction in the residual's own space is coef / std
    directions[classes] = probe.coef / probe.std
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    f1 = np.full(26, np.nan)
    for c in classes:
        yt, yp = letters[test] == c, pred[test] == c
        f1[c] = _f1(yt, yp)
    n_test = np.bincount(letters[test], minlength=26)
    evaluated = [int(c) for c in range(26) if n_test[c] >= min_words and np.nan_to_num(f1[c]) >= min_probe_f1]
    return LetterData(words, letters, acts, train, test, directions.float(), pred == letters, f1, evaluated)


def _f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    tp = float((y_true & y_pred).sum())
    denom = float(y_true.sum() + y_pred.sum())
    return 2 * tp / denom if denom else 0.0


def probing_set(name: str, acts: Tensor, labels: Sequence, *, groups: Sequence | None = None, seed: int = 0,
                min_positives: int = 8) -> ProbingSet:
    """One-vs-rest binary tasks of a labelled set: for each class with at least ``2 * min_positives`` examples, its
    examples and as many others (a seeded sample), split in halves by :func:`workbench.data.tasks.split_indices`
    (stratified by the binary target; ``groups``, e.g. the prompt texts, keeps identical items on one side, so a
    repeated prompt is never both trained on and scored); each task's full-residual logistic probe is fit here (C
    chosen on a validation split) and its test accuracy kept as the baseline, with its interval over distinct test
    units."""
    if isinstance(min_positives, bool) or not isinstance(min_positives, int) or min_positives < 4:
        raise SAEError(f"min_positives must be an int >= 4 (the residual probe's validation split needs 8 training "
                       f"rows), got {min_positives!r}")
    labels = np.asarray(labels)
    classes = sorted({str(v) for v in labels.tolist()})
    y = np.array([classes.index(str(v)) for v in labels.tolist()])
    if acts.shape[0] != len(y):
        raise SAEError(f"probing set {name!r}: {acts.shape[0]} activations for {len(y)} labels")
    if groups is not None:
        groups = list(groups)
        if len(groups) != len(y):
            raise SAEError(f"probing set {name!r}: {len(groups)} groups for {len(y)} labels")
    rng = np.random.default_rng(seed)
    ps = ProbingSet(name, acts.float(), y, classes, groups)
    for c in range(len(classes)):
        pos = np.flatnonzero(y == c)
        neg = np.flatnonzero(y != c)
        if len(pos) < 2 * min_positives or len(neg) < len(pos):
            continue
        neg = rng.choice(neg, len(pos), replace=False)
        idx = np.concatenate([pos, neg])
        target = np.concatenate([np.ones(len(pos), int), np.zeros(len(neg), int)])
        unit = _units(ps, idx)
        tr, te = (np.sort(i) for i in split_indices(target, [0.5, 0.5], seed=seed + c, groups=unit))
        if len(tr) == 0 or len(te) == 0 or len(set(target[tr])) < 2:
            continue  # too few distinct items to hold both classes out
        task = {"positive": classes[c], "idx": idx, "target": target, "train": tr, "test": te}
        X = ps.acts[idx]
        probe = LogisticProbe(Cs=FULL_CS, seed=seed).fit(X[tr], target[tr])
        correct = (probe.predict(X[te]).numpy() == target[te]).astype(np.float64)
        ps.tasks.append(task)
        ps.residual_acc.append(float(correct.mean()))
        ps.residual_ci.append(accuracy_ci(correct, groups=[unit[i] for i in te], seed=seed))
    if not ps.tasks:
        raise SAEError(f"probing set {name!r} has no class with {2 * min_positives}+ examples and as many others")
    return ps


def _units(ps: ProbingSet, idx: np.ndarray) -> list:
    """The unit key of each of ``ps``'s items ``idx``: its group, or the item itself when the set has no groups."""
    return [ps.groups[i] for i in idx] if ps.groups is not None else [int(i) for i in idx]


def bench_data(model, site: str, corpus: Corpus | Sequence[str], *, probing: Mapping[str, tuple[Tensor, Sequence]]
               | None = None, n_tokens: int = 32_768, context_length: int = 128, skip_documents: int = 0,
               words_per_letter: int = 60, min_positives: int = 8, first_position: int = 1,
               ce_tokens: int | None = None, seed: int = 0, progress: bool = True) -> BenchData:
    """Everything the suite measures SAEs of ``site`` against (see the module docstring). ``probing``: {name:
    (activations [n, d] at ``site``, labels) or (activations, labels, groups)}, made into tasks by
    :func:`probing_set` (groups, e.g. the prompt texts: identical items stay on one side of the split);
    ``words_per_letter=0`` leaves absorption out."""
    for name, v in (("n_tokens", n_tokens), ("context_length", context_length), ("words_per_letter", words_per_letter)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and name != "words_per_letter"):
            raise SAEError(f"{name} must be a positive int, got {v!r}")
    core = core_data(model, site, corpus, n_tokens=n_tokens, context_length=context_length,
                     skip_documents=skip_documents, first_position=first_position, ce_tokens=ce_tokens,
                     progress=progress)
    letters = letter_data(model, site, per_letter=words_per_letter, seed=seed) if words_per_letter else None
    sets = [probing_set(name, spec[0], spec[1], groups=spec[2] if len(spec) > 2 else None, seed=seed,
                        min_positives=min_positives) for name, spec in (probing or {}).items()]
    return BenchData(site, core, letters, sets, {"n_tokens": n_tokens, "context_length": context_length,
                                                 "skip_documents": skip_documents,
                                                 "words_per_letter": words_per_letter,
                                                 "min_positives": min_positives, "first_position": first_position,
                                                 "ce_tokens": ce_tokens,
                                                 "seed": seed})


# -- per SAE -------------------------------------------------------------------------------------------------------
def _encode(handle: SAEHandle, x: Tensor, batch: int = 4096) -> Tensor:
    dev = handle.sae.W_enc.device
    with torch.no_grad():
        return torch.cat([handle.encode(x[s : s + batch].to(dev)).float().cpu() for s in range(0, len(x), batch)])


def _fit_predict(Xtr: Tensor, ytr: np.ndarray, Xte: Tensor, C: float = PROBE_C) -> np.ndarray:
    """A binary L2 logistic probe (sklearn's objective) on standardised features: predictions on ``Xte``."""
    mean, std = standardise_stats(Xtr.double())
    coef, icpt = fit_softmax_regression(((Xtr.double() - mean) / std)[None], torch.as_tensor(ytr), 2, C,
                                        max_iter=200, tol=1e-4)
    logits = ((Xte.double() - mean) / std) @ coef[0].T + icpt[0]
    return logits.argmax(1).numpy()


def _top_by_mean_diff(codes: Tensor, target: np.ndarray, k: int) -> Tensor:
    t = torch.as_tensor(target, dtype=torch.bool)
    diff = codes[t].mean(0) - codes[~t].mean(0)
    return diff.abs().topk(min(k, codes.shape[1])).indices


def main_latents(codes: Tensor, letters: np.ndarray, train: np.ndarray, test: np.ndarray, letter: int, *,
                 max_main: int = 10, f1_jump: float = 0.03) -> list[int]:
    """The letter's main latents by k-sparse probing (see the module docstring)."""
    y = letters == letter
    t = torch.as_tensor(y[train])
    diff = codes[train][t].mean(0) - codes[train][~t].mean(0)
    order = diff.topk(min(max_main, codes.shape[1])).indices.tolist()  # latents more active on the letter
    best_f1, k = -1.0, 0
    for j in range(1, len(order) + 1):
        cols = order[:j]
        f1 = _f1(y[test], _fit_predict(codes[train][:, cols], y[train].astype(int), codes[test][:, cols]) == 1)
        if j > 1 and f1 - best_f1 <= f1_jump:
            break
        best_f1, k = f1, j
    return order[:k]


def absorption(handle: SAEHandle, data: LetterData, *, max_main: int = 10, f1_jump: float = 0.03) -> pd.DataFrame:
    """Per evaluated letter: its main latents, the mean absorption fraction and the full-absorption rate over the
    held-out words of the letter that the ground-truth probe gets right."""
    codes = _encode(handle, data.acts)
    W = handle.W_dec.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = []
    for c in data.evaluated:
        main = main_latents(codes, data.letters, data.train_idx, data.test_idx, c, max_main=max_main, f1_jump=f1_jump)
        p = data.directions[c]
        cos = W @ p  # [d_sae]
        words = [i for i in data.test_idx if data.letters[i] == c and data.probe_correct[i]]
        fractions, full = [], []
        for i in words:
            proj_x = float(data.acts[i] @ p)
            proj = codes[i] * cos
            main_proj = float(proj[main].sum())
            others = torch.ones(len(cos), dtype=torch.bool)
            others[main] = False
            cand = proj[others & (cos >= 0.1) & (proj > 0)]
            absorbers = float(cand.topk(min(3, len(cand))).values.sum()) if len(cand) else 0.0
            if proj_x <= 0 or main_proj >= proj_x or absorbers / proj_x < 0.4:
                frac = 0.0
            elif main_proj <= 0:
                frac = 1.0
            else:
                absorbed = min(absorbers, proj_x - main_proj)
                frac = float(np.clip(absorbed / (absorbed + main_proj), 0, 1))
            fractions.append(frac)
            top = int(proj.argmax())
            full.append(bool((codes[i][main] <= 1e-8).all() and cos[top] >= 0.025 and proj_x > 0
                             and float(proj[top]) / proj_x >= 0.4))
        rows.append({"letter": LETTERS[c], "main_latents": " ".join(map(str, main)), "n_main": len(main),
                     "n_words": len(words), "absorption_fraction": float(np.mean(fractions)) if words else np.nan,
                     "full_absorption": float(np.mean(full)) if words else np.nan,
                     "probe_f1": float(data.probe_f1[c])})
    return pd.DataFrame(rows)


def sparse_probing(handle: SAEHandle, sets: Sequence[ProbingSet], ks: Sequence[int] = SPARSE_KS) -> pd.DataFrame:
    """Per probing set, binary task and k: the top-k-latent probe's test accuracy (latents ranked on the training
    half only) beside the full residual's, each with its interval over distinct test units (:func:`accuracy_ci`)
    and the number of those units (``n_test_units``)."""
    rows = []
    for ps in sets:
        codes_all = _encode(handle, ps.acts)
        for task, res_acc, res_ci in zip(ps.tasks, ps.residual_acc, ps.residual_ci or [None] * len(ps.tasks)):
            codes, target = codes_all[task["idx"]], task["target"]
            tr, te = task["train"], task["test"]
            unit = _units(ps, task["idx"])
            test_units = [unit[i] for i in te]
            for k in ks:
                cols = _top_by_mean_diff(codes[tr], target[tr], k)
                pred = _fit_predict(codes[tr][:, cols], target[tr], codes[te][:, cols])
                correct = (pred == target[te]).astype(np.float64)
                ci = accuracy_ci(correct, groups=test_units, n_resamples=1000)
                rows.append({"set": ps.name, "positive": task["positive"], "k": int(k),
                             "sae_acc": float(correct.mean()), "sae_acc_lo": ci.lo, "sae_acc_hi": ci.hi,
                             "residual_acc": res_acc,
                             "residual_acc_lo": res_ci.lo if res_ci is not None else np.nan,
                             "residual_acc_hi": res_ci.hi if res_ci is not None else np.nan,
                             "ci_method": ci.method, "n_train": len(tr), "n_test": len(te),
                             "n_test_units": len(set(test_units))})
    return pd.DataFrame(rows)


def stability(handles: Mapping[object, SAEHandle], freqs: Mapping[object, Tensor] | None = None) -> pd.DataFrame:
    """For every ordered pair (a, b) of SAEs of one site (e.g. seeds): the mean over a's alive latents (``freqs[a]
    > 0``; all latents without ``freqs``) of the best decoder cosine in b, and the fraction above 0.7."""
    keys = list(handles)
    if len(keys) < 2:
        raise SAEError(f"stability needs at least two SAEs, got {len(keys)}")
    W = {}
    for k in keys:
        w = handles[k].W_dec.detach().float().cpu()
        W[k] = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    shapes = {k: tuple(w.shape) for k, w in W.items()}
    if len({s[1] for s in shapes.values()}) != 1:
        raise SAEError(f"stability compares SAEs of one site; decoder shapes differ: {shapes}")
    rows = []
    for a in keys:
        alive = torch.ones(len(W[a]), dtype=torch.bool) if freqs is None else freqs[a] > 0
        for b in keys:
            if a == b:
                continue
            best = torch.cat([(W[a][alive][s : s + 4096] @ W[b].T).max(1).values
                              for s in range(0, int(alive.sum()), 4096)])
            rows.append({"a": a, "b": b, "n_alive": int(alive.sum()), "best_cos_mean": float(best.mean()),
                         "frac_matched": float((best > STABLE_COS).float().mean())})
    return pd.DataFrame(rows)


def bench_sae(model, handle: SAEHandle, data: BenchData, *, progress: bool = True) -> dict:
    """Core, absorption and sparse-probing results of one SAE: {"core": dict (with ``feature_freq``),
    "absorption": frame per letter, "sparse_probing": frame per set x task x k}."""
    core = core_metrics(model, handle, data.core, progress=progress)
    return {"core": core,
            "absorption": absorption(handle, data.letters) if data.letters is not None else pd.DataFrame(),
            "sparse_probing": sparse_probing(handle, data.probing) if data.probing else pd.DataFrame()}


def summary_row(result: dict) -> dict:
    """One flat row of a :func:`bench_sae` result: the core metrics, the mean absorption over letters, and the
    sparse-probing accuracy per k (mean over every set's tasks) with the residual's."""
    core = {k: v for k, v in result["core"].items() if k != "feature_freq"}
    row = {k: core[k] for k in ("fvu", "fvu_from_pos2", "l0", "n_dead", "n_dense", "ce_loss_recovered") if k in core}
    row["dead_frac"] = core["n_dead"] / len(result["core"]["feature_freq"])
    ab = result["absorption"]
    if len(ab):
        row["absorption_fraction"] = float(ab.absorption_fraction.mean())
        row["full_absorption"] = float(ab.full_absorption.mean())
        row["n_main_latents"] = float(ab.n_main.mean())
    sp = result["sparse_probing"]
    if len(sp):
        for k, g in sp.groupby("k"):
            row[f"sparse_acc_k{k}"] = float(g.sae_acc.mean())
        row["residual_acc"] = float(sp.drop_duplicates(["set", "positive"]).residual_acc.mean())
    return row
