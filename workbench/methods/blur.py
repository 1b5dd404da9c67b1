"""Progressive visual decay: does the answer survive when the image is blurred away?

Each image is blurred with Gaussian kernels of growing size (default eight levels, 1x1 to 61x61; sigma from the
kernel size as OpenCV computes it, ``0.3 ((k - 1) / 2 - 1) + 0.8``; borders reflected as OpenCV's default
BORDER_REFLECT_101) and the question is asked again at every level. Metrics (methods.md section 2):

* ``E_k``: fraction of items whose answer at level k equals the unblurred answer;
* ``C``: fraction of items whose answer is unchanged at *all* levels (removes chance agreement on yes/no);
* accuracy at every level, and accuracy on the invariant subset;
* per item: the answer at every level, ``invariant``, and ``answerable_without_seeing`` (invariant and correct at
  the strongest blur: the question is answered without the visual evidence).

Works on any list of :class:`workbench.data.vqa.VQAItem` (or (image, question, answer) triples through
:func:`workbench.data.vqa.from_triples`) and any supported VLM; all levels of a batch of items are answered together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from workbench.data.vqa import ANSWERS, VQAItem
from workbench.methods.answering import answer_items

KERNELS = (1, 9, 17, 27, 35, 43, 53, 61)  # eight odd sizes from 1x1 (the unblurred image) to 61x61


def opencv_sigma(kernel: int) -> float:
    """OpenCV's sigma for a Gaussian kernel of size ``kernel`` when none is given."""
    return 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8


def check_kernels(kernels: Sequence[int]) -> tuple[int, ...]:
    """Odd positive ints, strictly increasing, starting at 1 (the reference level); raises naming the bad value."""
    ks = list(kernels) if not isinstance(kernels, (str, bytes)) else None
    if not ks:
        raise ValueError(f"blur kernels must be a non-empty list of odd ints starting at 1, got {kernels!r}")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0]
    if bad:
        raise ValueError(f"blur kernel sizes {bad} are not allowed: sizes are odd positive ints (1, 3, 5, ...)")
    if ks[0] != 1:
        raise ValueError(f"the first blur level must be 1 (the unblurred reference), got {ks[0]}")
    if any(b <= a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"blur kernel sizes must increase strictly, got {ks}")
    return tuple(int(k) for k in ks)


def gaussian_kernel_1d(kernel: int) -> np.ndarray:
    sigma = opencv_sigma(kernel)
    x = np.arange(kernel, dtype=np.float64) - (kernel - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _reflect101_index(n: int, pad: int) -> np.ndarray:
    """Indices of a reflect-101 padded axis of length n (works for pad >= n by reflecting repeatedly)."""
    idx = np.arange(-pad, n + pad)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def gaussian_blur(image: Image.Image, kernel: int) -> Image.Image:
    """Separable Gaussian blur of an RGB image with a ``kernel`` x ``kernel`` window (1 = unchanged copy)."""
    check_kernels([1] if kernel == 1 else [1, kernel])
    image = image.convert("RGB")
    if kernel == 1:
        return image.copy()
    a = np.asarray(image, dtype=np.float64)
    w = gaussian_kernel_1d(kernel)
    pad = kernel // 2
    for axis in (0, 1):
        idx = _reflect101_index(a.shape[axis], pad)
        padded = np.take(a, idx, axis=axis)
        out = np.zeros_like(a)
        for k, wk in enumerate(w):
            sl = [slice(None)] * 3
            sl[axis] = slice(k, k + a.shape[axis])
            out += wk * padded[tuple(sl)]
        a = out
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


@dataclass
class DecayResult:
    levels: pd.DataFrame  # kernel, sigma, E_k, accuracy, n
    items: pd.DataFrame  # item, question, answer, kind, answer_k{K} per level, invariant, answerable_without_seeing
    C: float  # fraction of items unchanged at every level
    accuracy_invariant: float  # accuracy (unblurred) on the invariant subset; nan when it is empty
    n_invariant: int
    kernels: tuple[int, ...] = field(default=KERNELS)

    def summary(self) -> dict:
        return {"C": self.C, "accuracy_invariant": self.accuracy_invariant, "n_invariant": self.n_invariant,
                "n_items": len(self.items), "accuracy_unblurred": float(self.levels["accuracy"].iloc[0]),
                "accuracy_most_blurred": float(self.levels["accuracy"].iloc[-1]),
                "answerable_without_seeing": float(self.items["answerable_without_seeing"].mean())}


def blur_decay(
    model,
    items: Sequence[VQAItem],
    kernels: Sequence[int] = KERNELS,
    *,
    candidates: Sequence[str] = ANSWERS,
    batch_size: int = 32,
) -> DecayResult:
    """Answer every item at every blur level; return the decay metrics (see the module docstring)."""

    kernels = check_kernels(kernels)  # before any forward
    items = list(items)
    if not items:
        raise ValueError("items is empty: give at least one (image, question, answer) item")
    per_level = {}
    for k in kernels:
        blurred = [gaussian_blur(it.image, k) for it in items]
        per_level[k] = answer_items(model, items, images=blurred, candidates=candidates, batch_size=batch_size)
    ref = per_level[kernels[0]]
    table = ref[["item", "kind", "question", "answer"]].copy()
    rows = []
    for k in kernels:
        df = per_level[k]
        table[f"answer_k{k}"] = df["pred"].values
        rows.append({"kernel": k, "sigma": round(opencv_sigma(k), 4) if k > 1 else 0.0,
                     "E_k": float((df["pred"].values == ref["pred"].values).mean()),
                     "accuracy": float(df["correct"].mean()), "n": len(df)})
    answers = table[[f"answer_k{k}" for k in kernels]].values
    invariant = (answers == answers[:, :1]).all(axis=1)
    table["correct"] = ref["correct"].values
    table["invariant"] = invariant
    table["answerable_without_seeing"] = invariant & per_level[kernels[-1]]["correct"].values
    n_inv = int(invariant.sum())
    acc_inv = float(ref["correct"].values[invariant].mean()) if n_inv else float("nan")
    return DecayResult(pd.DataFrame(rows), table, float(invariant.mean()), acc_inv, n_inv, kernels)
