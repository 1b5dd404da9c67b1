"""The SAE study's links to the threads: which SAE features carry the count, and data selection in SAE space.

    counting = count_features(model, handle, "entity", n=400)         # features correlated with the count
    selection = data_selection_benchmark(model, handle)                # SAE vs raw-neuron similarity ranking

Last-token activations come from the activation engine (:func:`workbench.methods.activations.last_token`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from workbench.core.trace import trace
from workbench.data.corpus import DEFAULT_CORPUS, Corpus, load_corpus
from workbench.data.reasoning import arithmetic_chains, graph_reachability
from workbench.data.tasks import make_task
from workbench.methods.activations import last_token
from workbench.methods.probes.linear import RidgeProbe
from workbench.methods.sae.handle import SAEError, SAEHandle


# -- counting link ------------------------------------------------------------------------------------------------
@dataclass
class CountFeatures:
    table: pd.DataFrame  # one row per feature: corr with the count, density on the prompts, mean act by count
    probes: pd.DataFrame  # ridge probe R2 / round accuracy on SAE codes vs raw residual (held-out)
    codes: Tensor  # [n, d_sae] SAE codes at the last token
    counts: np.ndarray


def count_features(model, handle: SAEHandle, task: str = "entity", *, n: int = 400, seed: int = 0,
                   top: int = 20) -> CountFeatures:
    """Which SAE features carry the count: encode the last-token activation of ``n`` counting prompts of ``task``,
    rank features by |Pearson r| with the count, and compare held-out ridge probes (alpha chosen on a validation
    split) on the SAE code, on the top-``top`` features only, and on the raw residual."""

    ts = make_task(task, n, seed=seed)
    x = last_token(model, ts.prompts, sites=[handle.site], by_length=False)[handle.site]
    codes = handle.encode(x.to(handle.sae.W_enc.device)).float().cpu()
    y = ts.counts.astype(np.float64)
    c = codes.double().numpy()
    cc = c - c.mean(0)
    yc = y - y.mean()
    denom = np.sqrt((cc ** 2).sum(0) * (yc ** 2).sum())
    r = np.divide(cc.T @ yc, denom, out=np.zeros(c.shape[1]), where=denom > 0)
    order = np.argsort(-np.abs(r))
    table = pd.DataFrame({"feature": order, "corr": r[order], "abs_corr": np.abs(r[order]),
                          "density": (c[:, order] > 0).mean(0)})
    for k in range(1, 10):
        mask = ts.counts == k
        table[f"mean_count_{k}"] = c[mask][:, order].mean(0) if mask.any() else np.nan
    train, test = _split(len(ts), seed)
    rows = []
    for name, X in (("sae_code", codes), (f"sae_top{top}", codes[:, torch.as_tensor(order[:top].copy())]),
                    ("residual", x)):
        probe = RidgeProbe(seed=seed).fit(X[train], y[train])
        rows.append({"task": task, "features": name, "d": X.shape[1], "r2_test": probe.r2(X[test], y[test]),
                     "round_acc_test": probe.round_accuracy(X[test], y[test]), "alpha": probe.alpha,
                     "n_train": len(train), "n_test": len(test)})
    table.insert(0, "task", task)
    return CountFeatures(table.head(max(top, 50)).reset_index(drop=True), pd.DataFrame(rows), codes, ts.counts)


def _split(n: int, seed: int, test_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * (1 - test_fraction)))
    return np.sort(perm[:k]), np.sort(perm[k:])


# -- data selection -----------------------------------------------------------------------------------------------
REPRESENTATIONS = ("sae", "neurons")
SIMILARITIES = ("cosine", "jaccard")


@torch.no_grad()
def represent(model, handle: SAEHandle, texts: Sequence[str], representation: str = "sae", *,
              batch_size: int = 32) -> Float[Tensor, "n d"]:
    """One vector per text: the mean over its tokens (position 0 left out) of the SAE code (``"sae"``, sparse,
    non-negative) or of the raw site activation (``"neurons"``)."""
    if representation not in REPRESENTATIONS:
        raise SAEError(f"representation must be one of {list(REPRESENTATIONS)}, got {representation!r}")
    out = []
    for s in range(0, len(texts), batch_size):
        enc = model.encode(list(texts[s : s + batch_size]))
        with trace(model, handle.site, stop=True) as tr:
            model.hf(**enc)
        x = tr[handle.site].float()
        mask = enc["attention_mask"].to(x.device).clone().float()
        first = mask.argmax(1)  # left padding: the first real token
        mask[torch.arange(len(mask)), first] = 0.0
        v = handle.encode(x).float() if representation == "sae" else x
        out.append(((v * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).cpu())
    return torch.cat(out)


def similarity(pool: Float[Tensor, "n d"], target: Float[Tensor, "m d"], kind: str = "cosine") -> Float[Tensor, " n"]:
    """Score of each pool vector against the target set: cosine with the target centroid, or weighted Jaccard
    (sum of minima / sum of maxima, for non-negative vectors such as SAE codes) with the centroid."""
    if kind not in SIMILARITIES:
        raise SAEError(f"similarity must be one of {list(SIMILARITIES)}, got {kind!r}")
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
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


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
                             corpus=None, pool: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rank a mixed pool against a target task (entity counting prompts, a template none of the pool's positives
    uses) by similarity in SAE space vs raw-neuron space. Returns (summary: AUROC and precision@n_pos per
    representation x similarity, scores: the pool with one score column per method)."""

    pool = pool if pool is not None else selection_pool(n_per_source, seed=seed, corpus=corpus)
    target = make_task("entity", n_target, seed=seed + 2).prompts
    scores = pool.copy()
    rows = []
    labels = pool["label"].to_numpy(bool)
    n_pos = int(labels.sum())
    for rep in REPRESENTATIONS:
        P = represent(model, handle, list(pool["text"]), rep)
        T = represent(model, handle, target, rep)
        for kind in SIMILARITIES:
            if rep == "neurons" and kind == "jaccard":
                continue  # raw activations are signed
            s = similarity(P, T, kind).numpy()
            col = f"{rep}_{kind}"
            scores[col] = s
            top = np.argsort(-s)[:n_pos]
            rows.append({"representation": rep, "similarity": kind, "auroc": auroc(s, labels),
                         "precision_at_n_pos": float(labels[top].mean()), "n_pool": len(pool), "n_pos": n_pos,
                         "n_target": n_target, "dims": P.shape[1],
                         "mean_nonzero_dims": float((P != 0).sum(1).float().mean())})
    return pd.DataFrame(rows), scores
