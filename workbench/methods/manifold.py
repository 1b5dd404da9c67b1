"""Where a latent-reasoning input lies against the token embedding manifold, per step (used by the latent-drift and
encoded-vs-expressed studies).

:func:`manifold_metrics`: for the vector fed in at each step of a :class:`workbench.methods.latent.LatentRun`, the
max cosine to any token's input embedding and the nearest tokens, the norm ratio to the mean embedding norm, the mean
Euclidean distance to the k nearest embeddings (divided by the mean embedding norm), and the cosine with the previous
step's input. It uses the embeddings the model actually feeds its first block (Gemma's sqrt(d) scale included); the
vocabulary is scanned in chunks, so a 262k-row head needs no [V, d] copy.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from workbench.core.models import Model
from workbench.methods.latent import LatentRun, embedding_scale

_CHUNK = 1 << 25  # entries of a [rows, vocab-chunk] score matrix per matmul


def _vocab_chunks(V: int, rows: int) -> range:
    return range(0, V, max(1024, _CHUNK // max(rows, 1)))


@torch.no_grad()
def manifold_metrics(model: Model, run: LatentRun, *, knn: int = 10, n_nearest: int = 3) -> pd.DataFrame:
    """One row per (item, step) that ran: max_cos, nearest tokens, norm_ratio, knn_dist, prev_cos."""
    n, S, d = run.inputs.shape
    items, steps = torch.nonzero(run.valid, as_tuple=True)
    X = run.inputs[items, steps].double()  # [R, d]
    if X.shape[0] == 0:
        return pd.DataFrame(columns=["item", "step", "max_cos", "nearest", "norm_ratio", "knn_dist", "prev_cos"])
    W = model.W_E.detach().to("cpu", torch.float64)
    s = embedding_scale(model)
    V = W.shape[0]
    row_norm = W.norm(dim=-1) * s  # effective embedding norms
    mean_norm = float(row_norm.mean())
    Xn = X / X.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    x2 = X.square().sum(-1, keepdim=True)
    best_cos = torch.full((X.shape[0], n_nearest), -math.inf, dtype=torch.float64)
    best_ids = torch.zeros((X.shape[0], n_nearest), dtype=torch.long)
    best_d2 = torch.full((X.shape[0], knn), math.inf, dtype=torch.float64)
    for c in _vocab_chunks(V, X.shape[0]):
        E = W[c : c + _CHUNK] * s
        dots = X @ E.T  # [R, chunk]
        cos = dots / (X.norm(dim=-1, keepdim=True).clamp_min(1e-30) * row_norm[c : c + E.shape[0]][None])
        d2 = x2 + row_norm[c : c + E.shape[0]][None].square() - 2 * dots
        cat_cos = torch.cat([best_cos, cos], 1)
        cat_ids = torch.cat([best_ids, torch.arange(c, c + E.shape[0]).expand(X.shape[0], -1)], 1)
        best_cos, pick = cat_cos.topk(n_nearest, dim=1)
        best_ids = cat_ids.gather(1, pick)
        best_d2 = torch.cat([best_d2, d2], 1).topk(knn, dim=1, largest=False).values
    prev_cos = torch.full((X.shape[0],), math.nan, dtype=torch.float64)
    prev = {(int(i), int(k)): r for r, (i, k) in enumerate(zip(items, steps))}
    for r, (i, k) in enumerate(zip(items.tolist(), steps.tolist())):
        if (i, k - 1) in prev:
            prev_cos[r] = float(Xn[r] @ Xn[prev[(i, k - 1)]])
    tok = model.tokenizer
    return pd.DataFrame({
        "item": items.numpy(),
        "step": steps.numpy() + 1,
        "max_cos": best_cos[:, 0].numpy(),
        "nearest": ["|".join(tok.convert_ids_to_tokens(ids)) for ids in best_ids.tolist()],
        "norm_ratio": (X.norm(dim=-1) / mean_norm).numpy(),
        "knn_dist": (best_d2.clamp_min(0).sqrt().mean(-1) / mean_norm).numpy(),
        "prev_cos": prev_cos.numpy(),
    })
