"""The SAE study's links to the threads: which SAE features carry the count, and data selection in SAE space.

    counting = count_features(model, handle, "entity", n=400, seed=0)  # features correlated with the count
    selection, scores = data_selection_benchmark(model, handle, seed=0)  # SAE vs neurons vs lexical ranking

Every split is :func:`workbench.data.tasks.split_indices` (stratified by count, identical prompts on one side) and
everything fitted (the features kept, the ridge penalty, the probe) sees the training half only. Every score carries
a bootstrap interval over distinct test prompts (:mod:`workbench.methods.stats`); the study runs each seed of its
``seeds`` and summarises them with :func:`workbench.methods.stats.seed_summary`.

Last-token activations come from the activation engine (:func:`workbench.methods.activations.last_token`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import rankdata
from sklearn.feature_extraction.text import TfidfVectorizer
from torch import Tensor

from workbench.core.trace import trace
from workbench.data.corpus import DEFAULT_CORPUS, Corpus, load_corpus
from workbench.data.reasoning import arithmetic_chains, graph_reachability
from workbench.data.tasks import make_task, split_indices
from workbench.methods.activations import last_token
from workbench.methods.probes.base import r2_score
from workbench.methods.probes.linear import ALPHAS, RidgeProbe
from workbench.methods.stats import N_RESAMPLES, Interval, accuracy_ci, bootstrap_ci
from workbench.methods.sae.handle import SAEError, SAEHandle


# -- counting link ------------------------------------------------------------------------------------------------
TEST_FRACTION = 0.5  # half the prompts (grouped by prompt text, stratified by count) are held out
VAL_FRACTION = 0.2  # of the training half: the validation split that picks the ridge penalty


@dataclass
class CountFeatures:
    table: pd.DataFrame  # one row per feature, ranked on the TRAINING half: corr with the count (train and test)
    probes: pd.DataFrame  # ridge probe R2 / round accuracy on SAE codes vs raw residual (held-out, with CIs)
    codes: Tensor  # [n, d_sae] SAE codes at the last token
    counts: np.ndarray
    prompts: list[str] = field(default_factory=list)
    train: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    test: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    selected: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the top features (train)


def pearson_r(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of every column of ``X`` [n, d] with ``y`` [n] (0 for a constant column)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = X - X.mean(0), y - y.mean()
    denom = np.sqrt((xc ** 2).sum(0) * (yc ** 2).sum())
    return np.divide(xc.T @ yc, denom, out=np.zeros(X.shape[1]), where=denom > 0)


def interval_columns(name: str, iv: Interval) -> dict:
    """``{name: estimate, name_lo, name_hi, name_n (distinct units), name_confidence, name_method}``."""
    d = iv.to_dict(f"{name}_")
    return {name: d.pop(f"{name}_estimate"), **d}


def robust_ci(statistic, *arrays, groups, seed: int = 0, n_resamples: int = N_RESAMPLES) -> Interval:
    """:func:`workbench.methods.stats.bootstrap_ci` over distinct ``groups`` (BCa, falling back to the percentile
    interval where BCa is undefined); an interval of NaNs (method ``"none"``) when no bootstrap is possible (fewer
    than two distinct units, or a statistic undefined on the resamples)."""
    for method in ("BCa", "percentile"):
        try:
            return bootstrap_ci(statistic, *arrays, groups=groups, seed=seed, n_resamples=n_resamples, method=method)
        except (ValueError, SAEError, ZeroDivisionError, FloatingPointError):
            continue
    est = float(statistic(*arrays))
    return Interval(est, float("nan"), float("nan"), len(set(groups)), method="none")


def fit_ridge_grouped(X, y: np.ndarray, groups: Sequence, *, seed: int = 0) -> RidgeProbe:
    """A ridge probe whose penalty is picked on a validation split of ``(X, y)`` that keeps identical prompts
    (``groups``) on one side, refitted on all of ``(X, y)`` with that penalty."""
    y = np.asarray(y, dtype=np.float64)
    fit, val = split_indices(y.astype(np.int64), [1 - VAL_FRACTION, VAL_FRACTION], seed=seed, groups=list(groups))
    scores = []
    if len(fit) >= 2 and len(val) >= 2 and np.ptp(y[fit]) > 0:
        for a in ALPHAS:
            pred = RidgeProbe(alpha=a).fit(X[torch.as_tensor(fit)], y[fit]).predict(X[torch.as_tensor(val)])
            s = r2_score(pred.double().numpy(), y[val])
            scores.append(s if np.isfinite(s) else -np.inf)
        best = max(range(len(ALPHAS)), key=lambda i: (scores[i], i))  # ties -> the larger alpha
        return RidgeProbe(alpha=ALPHAS[best]).fit(X, y)
    return RidgeProbe(seed=seed).fit(X, y)


def count_probes(codes, residual, counts, prompts: Sequence[str], *, task: str, seed: int = 0, top: int = 20,
                 n_resamples: int = N_RESAMPLES) -> CountFeatures:
    """The count probes on given last-token SAE codes and residuals. One split (:func:`split_indices`: stratified by
    count, identical prompts on one side); everything fitted sees the training half only: the features are ranked
    by |Pearson r| with the count on the training prompts, the top ``top`` kept, and each ridge probe (its penalty
    chosen on a grouped validation split of the training half) is scored on the test half, with a bootstrap CI
    over distinct test prompts (R2) and the accuracy interval of :func:`accuracy_ci` (rounded prediction)."""
    codes_t = torch.as_tensor(codes).float()
    resid_t = torch.as_tensor(residual).float()
    counts = np.asarray(counts)
    prompts = list(prompts)
    y = counts.astype(np.float64)
    train, test = (np.sort(i) for i in split_indices(counts, [1 - TEST_FRACTION, TEST_FRACTION], seed=seed,
                                                      groups=prompts))
    c = codes_t.double().numpy()
    r = pearson_r(c[train], y[train])  # train labels only
    order = np.argsort(-np.abs(r), kind="stable")
    r_test = pearson_r(c[test], y[test])
    table = pd.DataFrame({"feature": order, "corr": r[order], "abs_corr": np.abs(r[order]),
                          "corr_test": r_test[order], "density": (c[train][:, order] > 0).mean(0)})
    for k in range(1, 10):
        mask = counts[train] == k
        table[f"mean_count_{k}"] = c[train][mask][:, order].mean(0) if mask.any() else np.nan
    selected = order[:top].copy()
    groups_train = [prompts[i] for i in train]
    groups_test = [prompts[i] for i in test]
    rows = []
    tr, te = torch.as_tensor(train), torch.as_tensor(test)
    for name, X in (("sae_code", codes_t), (f"sae_top{top}", codes_t[:, torch.as_tensor(selected)]),
                    ("residual", resid_t)):
        probe = fit_ridge_grouped(X[tr], y[train], groups_train, seed=seed)
        pred = probe.predict(X[te]).double().numpy()
        yt = y[test]
        correct = (np.clip(np.round(pred), 1, 9) == yt).astype(np.float64)
        r2 = robust_ci(r2_score, pred, yt, groups=groups_test, seed=seed, n_resamples=n_resamples)
        acc = accuracy_ci(correct, groups=groups_test, seed=seed, n_resamples=n_resamples)
        rows.append({"task": task, "seed": seed, "features": name, "d": X.shape[1],
                     **interval_columns("r2_test", r2), **interval_columns("round_acc_test", acc),
                     "alpha": probe.alpha, "n_train": len(train), "n_test": len(test),
                     "n_train_prompts": len(set(groups_train)), "n_test_prompts": len(set(groups_test))})
    table.insert(0, "seed", seed)
    table.insert(0, "task", task)
    return CountFeatures(table.head(max(top, 50)).reset_index(drop=True), pd.DataFrame(rows), codes_t, counts,
                         prompts, train, test, selected)


def count_features(model, handle: SAEHandle, task: str = "entity", *, n: int = 400, seed: int = 0,
                   top: int = 20, n_resamples: int = N_RESAMPLES) -> CountFeatures:
    """Which SAE features carry the count: encode the last-token activation of ``n`` counting prompts of ``task``
    (generated with ``seed``) and run :func:`count_probes` on them (features ranked on the training half only;
    held-out ridge probes on the SAE code, on the top-``top`` features and on the raw residual, with CIs)."""

    ts = make_task(task, n, seed=seed)
    x = last_token(model, ts.prompts, sites=[handle.site], by_length=False)[handle.site]
    codes = handle.encode(x.to(handle.sae.W_enc.device)).float().cpu()
    return count_probes(codes, x, ts.counts, ts.prompts, task=task, seed=seed, top=top, n_resamples=n_resamples)


# -- data selection -----------------------------------------------------------------------------------------------
REPRESENTATIONS = ("sae", "neurons")
SIMILARITIES = ("cosine", "jaccard")
CENTRINGS = ("none", "pool mean")
# (representation, similarity, centring): the SAE code as it is (its encoder subtracts the decoder bias, about the
# training data's mean, before it encodes), the raw residual by cosine both uncentred (the biased baseline of the
# earlier tables, kept so the bias stays visible) and centred on the pool's mean (label-free: every candidate's
# vector, positives and negatives alike), and a lexical baseline (TF-IDF bag of words, no model at all).
SELECTION_METHODS = (("sae", "cosine", "none"), ("sae", "jaccard", "none"), ("neurons", "cosine", "none"),
                     ("neurons", "cosine", "pool mean"), ("lexical", "tfidf_cosine", "none"))


@torch.no_grad()
def represent(model, handle: SAEHandle, texts: Sequence[str], representation: str = "sae", *,
              batch_size: int = 32) -> Float[Tensor, "n d"]:
    """One vector per text: the mean over its tokens (position 0 left out) of the SAE code (``"sae"``, sparse,
    non-negative) or of the raw site activation (``"neurons"``)."""
    if representation not in REPRESENTATIONS:
        raise SAEError(f"representation must be one of {list(REPRESENTATIONS)}, got {representation!r}")
    return represent_all(model, handle, texts, batch_size=batch_size)[representation]


@torch.no_grad()
def represent_all(model, handle: SAEHandle, texts: Sequence[str], *,
                  batch_size: int = 32) -> dict[str, Float[Tensor, "n d"]]:
    """{representation: [n, d]} of :data:`REPRESENTATIONS` from one forward per batch (see :func:`represent`)."""
    out = {rep: [] for rep in REPRESENTATIONS}
    for s in range(0, len(texts), batch_size):
        enc = model.encode(list(texts[s : s + batch_size]))
        with trace(model, handle.site, stop=True) as tr:
            model.hf(**enc)
        x = tr[handle.site].float()
        mask = enc["attention_mask"].to(x.device).clone().float()
        first = mask.argmax(1)  # left padding: the first real token
        mask[torch.arange(len(mask)), first] = 0.0
        denom = mask.sum(1, keepdim=True).clamp(min=1)
        for rep, v in (("sae", handle.encode(x).float()), ("neurons", x)):
            out[rep].append(((v * mask[..., None]).sum(1) / denom).cpu())
    return {rep: torch.cat(v) for rep, v in out.items()}


def lexical_vectors(pool: Sequence[str], target: Sequence[str]) -> tuple[Tensor, Tensor]:
    """TF-IDF bag-of-words vectors of ``pool`` and ``target`` (words, numbers and single punctuation marks as
    tokens, lowercased, IDF fitted on pool and target together, no labels), L2-normalised rows."""
    vec = TfidfVectorizer(lowercase=True, token_pattern=r"(?u)\b\w+\b|[^\w\s]")
    m = vec.fit_transform(list(pool) + list(target)).toarray()
    m = torch.as_tensor(m, dtype=torch.float32)
    return m[: len(pool)], m[len(pool):]


def similarity(pool: Float[Tensor, "n d"], target: Float[Tensor, "m d"], kind: str = "cosine", *,
               center: Float[Tensor, " d"] | None = None) -> Float[Tensor, " n"]:
    """Score of each pool vector against the target set: cosine with the target centroid, or weighted Jaccard
    (sum of minima / sum of maxima, for non-negative vectors such as SAE codes) with the centroid. ``center``: a
    vector subtracted from pool and target first (centred cosine)."""
    if kind not in SIMILARITIES:
        raise SAEError(f"similarity must be one of {list(SIMILARITIES)}, got {kind!r}")
    if center is not None:
        if kind != "cosine":
            raise SAEError("centring applies to the cosine similarity only")
        pool, target = pool - center, target - center
    centroid = target.mean(0, keepdim=True)
    if kind == "cosine":
        return torch.nn.functional.cosine_similarity(pool, centroid, dim=1)
    if (pool < 0).any() or (centroid < 0).any():
        raise SAEError("weighted Jaccard needs non-negative vectors (SAE codes), got negative entries")
    return torch.minimum(pool, centroid).sum(1) / torch.maximum(pool, centroid).sum(1).clamp(min=1e-12)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        raise SAEError("AUROC needs both positive and negative items")
    ranks = rankdata(scores)  # average ranks: a tie counts one half (the Mann-Whitney U statistic)
    u = float(ranks[labels].sum()) - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def selection_pool(n_per_source: int = 60, *, seed: int = 0, corpus=None) -> pd.DataFrame:
    """A mixed pool with known labels: counting prompts of the character, addition and list-length tasks (the
    positives), and as negatives arithmetic-chain reasoning prompts (digits and '=' like counting, but no count),
    graph-reachability prompts and corpus messages cut to prompt length. Returns text, source, label."""

    rows = []
    for task in ("character", "addition", "list_length"):
        for p in make_task(task, n_per_source, seed=seed + 1).prompts:
            rows.append((p, f"count:{task}", True))
    for p in arithmetic_chains(n_per_source, n_hops=2, seed=seed).prompts:
        rows.append((p, "reasoning:arithmetic", False))
    for p in graph_reachability(n_per_source, n_hops=2, seed=seed).prompts:
        rows.append((p, "reasoning:graph", False))
    corpus = corpus if corpus is not None else load_corpus(DEFAULT_CORPUS)
    docs = corpus.documents() if isinstance(corpus, Corpus) else iter(corpus)
    taken = 0
    rng = np.random.default_rng(seed)
    for doc in docs:
        if taken >= 2 * n_per_source:
            break
        if rng.random() < 0.5:
            continue
        rows.append((doc[:300], "corpus", False))
        taken += 1
    return pd.DataFrame(rows, columns=["text", "source", "label"])


def data_selection_benchmark(model, handle: SAEHandle, *, n_target: int = 40, n_per_source: int = 60, seed: int = 0,
                             corpus=None, pool: pd.DataFrame | None = None,
                             n_resamples: int = N_RESAMPLES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank a mixed pool against a target task (entity counting prompts, a template none of the pool's positives
    uses) by similarity in SAE space, in raw-neuron space (uncentred and centred on the pool's mean) and by TF-IDF
    bag of words (:data:`SELECTION_METHODS`). Returns (summary: one row per method with the AUROC, its bootstrap CI
    over distinct pool texts and precision@n_pos; scores: the pool with one score column per method)."""

    pool = pool if pool is not None else selection_pool(n_per_source, seed=seed, corpus=corpus)
    target = make_task("entity", n_target, seed=seed + 2).prompts
    scores = pool.copy()
    rows = []
    labels = pool["label"].to_numpy(bool)
    texts = list(pool["text"])
    n_pos = int(labels.sum())
    pool_vecs, target_vecs = represent_all(model, handle, texts), represent_all(model, handle, target)
    vectors = {rep: (pool_vecs[rep], target_vecs[rep]) for rep in REPRESENTATIONS}
    vectors["lexical"] = lexical_vectors(texts, target)
    for rep, kind, centring in SELECTION_METHODS:
        P, T = vectors[rep]
        center = P.mean(0) if centring == "pool mean" else None
        s = similarity(P, T, "cosine" if kind == "tfidf_cosine" else kind, center=center).numpy()
        method = f"{rep}_{kind}" + ("_centred" if centring != "none" else "")
        scores[method] = s
        top = np.argsort(-s, kind="stable")[:n_pos]
        iv = robust_ci(auroc, s, labels, groups=texts, seed=seed, n_resamples=n_resamples)
        rows.append({"seed": seed, "method": method, "representation": rep, "similarity": kind, "centring": centring,
                     **interval_columns("auroc", iv), "precision_at_n_pos": float(labels[top].mean()),
                     "n_pool": len(pool), "n_pool_texts": len(set(texts)), "n_pos": n_pos, "n_target": n_target,
                     "dims": P.shape[1], "mean_nonzero_dims": float((P != 0).sum(1).float().mean())})
    scores.insert(0, "seed", seed)
    return pd.DataFrame(rows), scores
