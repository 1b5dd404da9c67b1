"""The readout in the right basis: what the output head actually reads from a residual, and in which geometry.

A digit's logit is ``W_U[d] · norm(h)``, not ``W_U[d] · h``: the final norm rescales each coordinate by its gain
(RMSNorm: ``γ ⊙ h / rms(h)``; Gemma's ``(1 + w)``; LayerNorm also centres). Comparing a probe direction with raw
head rows ignores that. And a cosine in raw residual coordinates depends on the residual's anisotropy (a few huge
directions dominate); in whitened coordinates (covariance ``Σ`` of the residuals at that layer) it does not.

- :func:`readout_covectors`: the covector ``∂ logit_d / ∂ h`` through the model's own final norm, averaged over
  real residuals (each row's gradient scaled by its rms, so every residual counts equally): ``γ ⊙ W_U[d]`` up to
  the norm's data-dependent projection. Works for any norm module the model has (it is differentiated, not parsed).
- :func:`residual_covariance`: Ledoit-Wolf shrunk covariance of residuals (well conditioned when n < d).
- :func:`covector_cosines`: |cos| between covectors, raw or in whitened coordinates. For covectors ``w, u`` the
  whitened cosine is ``wᵀΣu / sqrt(wᵀΣw · uᵀΣu)`` (a covector maps to ``Σ^{1/2} u`` when ``z = Σ^{-1/2} h``).
- :func:`random_covector_band`: the chance band of a random direction's mean |cos| with those covectors, in the
  same basis (isotropic in whitened coordinates).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from sklearn.covariance import LedoitWolf


def _ids(ids, vocab: int) -> list[int]:
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    bad = [i for i in ids if not 0 <= i < vocab]
    if not ids or bad:
        raise ValueError(f"token ids {bad or '(empty)'} not allowed: give ids in 0..{vocab - 1}")
    return ids


def readout_covectors(model, ids: Sequence[int], H: Float[torch.Tensor, "n d"], *,
                      batch_size: int = 256) -> Float[torch.Tensor, "k d"]:
    """[k, d] float64: for each token ``ids[i]``, the mean over residuals ``h`` in ``H`` of
    ``rms(h) · ∂(W_U[ids[i]] · final_norm(h)) / ∂h`` (the head's bias does not depend on h and drops out).

    ``H``: residuals at the layer being read (e.g. the training prompts' last-token residuals there), fed through
    the model's final norm as the logit lens does."""
    W_U = model.W_U.detach()
    ids = _ids(ids, W_U.shape[0])
    if not isinstance(H, torch.Tensor) or H.ndim != 2 or H.shape[1] != W_U.shape[1] or H.shape[0] < 1:
        got = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        raise ValueError(f"H must be [n, d={W_U.shape[1]}] residuals, got {got}")
    norm = model.final_norm
    rows = W_U[torch.tensor(ids, device=W_U.device)].to(torch.float32)
    total = torch.zeros(len(ids), W_U.shape[1], dtype=torch.float64)
    for start in range(0, H.shape[0], batch_size):
        h = H[start:start + batch_size].to(model.device, torch.float32)
        scale = h.pow(2).mean(-1, keepdim=True).sqrt()  # rms: makes each row's gradient scale-free
        for i in range(len(ids)):
            x = h.clone().requires_grad_(True)
            with torch.enable_grad():
                out = norm(x.to(model.dtype)).to(torch.float32) @ rows[i].to(x.device)
                (g,) = torch.autograd.grad(out.sum(), x)
            total[i] += (g * scale).sum(0).double().cpu()
    return total / H.shape[0]


def residual_covariance(H: Float[torch.Tensor, "n d"]) -> Float[torch.Tensor, "d d"]:
    """Ledoit-Wolf shrunk covariance (float64) of the rows of ``H``; needs at least 2 rows."""
    X = torch.as_tensor(H).detach().double().cpu().numpy()
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"H must be [n >= 2, d] residuals, got shape {X.shape}")
    return torch.from_numpy(LedoitWolf().fit(X).covariance_)


def covector_cosines(w: Float[torch.Tensor, " d"], U: Float[torch.Tensor, "k d"],
                     sigma: Float[torch.Tensor, "d d"] | None = None) -> Float[torch.Tensor, " k"]:
    """|cos| between the covector ``w`` and each row of ``U``: raw (``sigma`` None) or in the whitened coordinates
    of covariance ``sigma`` (``|wᵀΣu| / sqrt(wᵀΣw uᵀΣu)``)."""
    w = torch.as_tensor(w).detach().double().cpu().reshape(1, -1)
    U = torch.as_tensor(U).detach().double().cpu()
    if U.ndim != 2 or U.shape[1] != w.shape[1]:
        raise ValueError(f"U must be [k, d={w.shape[1]}], got {tuple(U.shape)}")
    if not bool(w.abs().sum() > 0):
        raise ValueError("w is zero: its cosine is undefined")
    if sigma is None:
        G = torch.eye(w.shape[1], dtype=torch.float64)
    else:
        G = torch.as_tensor(sigma).detach().double().cpu()
        if G.shape != (w.shape[1], w.shape[1]):
            raise ValueError(f"sigma must be [d, d] with d = {w.shape[1]}, got {tuple(G.shape)}")
    wu = (w @ G @ U.T)[0]
    ww = (w @ G @ w.T)[0, 0]
    uu = torch.einsum("kd,de,ke->k", U, G, U)
    return (wu / (ww * uu).sqrt()).abs()


def random_covector_band(U: Float[torch.Tensor, "k d"], sigma: Float[torch.Tensor, "d d"] | None = None, *,
                         n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean and 95 % band of a random direction's mean |cos| with the rows of ``U``, in the basis of ``sigma``
    (random directions isotropic in that basis: Gaussian in whitened coordinates)."""
    U = torch.as_tensor(U).detach().double().cpu()
    d = U.shape[1]
    if sigma is None:
        V = U
    else:  # a covector u in whitened coordinates is Σ^{1/2} u
        evals, evecs = torch.linalg.eigh(torch.as_tensor(sigma).double().cpu())
        V = U @ (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    R = torch.randn(n, d, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    cos = ((R / R.norm(dim=1, keepdim=True)) @ (V / V.norm(dim=1, keepdim=True)).T).abs().mean(1)
    lo, hi = np.quantile(cos.numpy(), [0.025, 0.975])
    return {"random_mean": float(cos.mean()), "random_lo": float(lo), "random_hi": float(hi)}
