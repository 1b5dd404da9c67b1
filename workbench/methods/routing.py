"""Where is the visual evidence lost? Counterfactual layer replacement and image-token activation patching.

* :func:`swap_layers` / :func:`layer_replacement`: decoder layers i..j of one model are replaced by those of
  another model of the same architecture (two testbed variants; a VLM and its base language model) while a block
  runs, restored in ``finally`` (:func:`workbench.core.swap.swap_modules`). The scan moves the swapped range (first N,
  last N, sliding windows) and records answer flips, accuracy and how often the planted prior is answered.
* :func:`image_patching`: residuals at the image-token positions of layer l (hidden-state numbering: 0 = the
  embeddings with the projected image scattered in) are patched from the clean-image run into the corrupted
  (blurred / blank) run — and back — and the answer is read; last-token-only patching is run alongside as the
  comparison the paper reports to fail for VLMs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from workbench.core.models import module_device
from workbench.core.sites import check_layers, layer_site
from workbench.core.swap import swap_modules
from workbench.core.trace import trace
from workbench.core.vlm import image_token_mask
from workbench.data.checks import check_range
from workbench.data.vqa import ANSWERS, VQAItem
from workbench.methods.answering import answer_items, vqa_inputs
from workbench.methods.stats import wilson_ci


def _decoder_layers(model) -> torch.nn.ModuleList:
    return model.module(model.arch.layers)


def check_compatible(model, donor) -> None:
    """Same family, layer count, width and per-layer parameter shapes; raises naming the difference."""
    a, b = model.arch, donor.arch
    for attr in ("n_layers", "d_model"):
        if getattr(a, attr) != getattr(b, attr):
            raise ValueError(f"cannot swap layers: {attr} {getattr(a, attr)} ({model.name}) != "
                             f"{getattr(b, attr)} ({donor.name})")
    la, lb = _decoder_layers(model)[0], _decoder_layers(donor)[0]
    if type(la) is not type(lb):
        raise ValueError(f"cannot swap layers: {type(la).__name__} ({model.name}) vs "
                         f"{type(lb).__name__} ({donor.name})")
    sa = {k: v.shape for k, v in la.state_dict().items()}
    sb = {k: v.shape for k, v in lb.state_dict().items()}
    if sa != sb:
        diff = sorted(set(sa.items()) ^ set(sb.items()))[:4]
        raise ValueError(f"cannot swap layers: parameter shapes differ ({diff})")
    # Each donor layer runs where the model's layer would (dispatched models: layer by layer).
    for i, (ma, mb) in enumerate(zip(_decoder_layers(model), _decoder_layers(donor), strict=True)):
        da, db = module_device(ma), module_device(mb)
        if da != db:
            raise ValueError(f"donor {donor.name}'s layer {i} runs on {db}, {model.name}'s on {da}: load the donor "
                             "with the same device (or device_map) as the model")


@contextlib.contextmanager
def swap_layers(model, donor, start: int, end: int) -> Iterator[None]:
    """While the block runs, ``model``'s decoder layers start..end (inclusive) are ``donor``'s."""
    start, end = check_range("layers", (start, end), 0, model.n_layers - 1)
    with swap_layer_set(model, donor, range(start, end + 1)):
        yield


@contextlib.contextmanager
def swap_layer_set(model, donor, layers: Sequence[int]) -> Iterator[None]:
    """While the block runs, ``model``'s decoder layers ``layers`` (any set, each in 0..n_layers-1) are ``donor``'s,
    each at its own index."""
    check_compatible(model, donor)
    layers = sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < model.n_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or '(none)'} not allowed: give decoder layers in 0..{model.n_layers - 1}")
    donor_layers = _decoder_layers(donor)
    with swap_modules(model, {model.arch.layer_path(i): donor_layers[i] for i in layers}):
        yield


def random_layer_sets(n_layers: int, size: int, n_draws: int, *, seed: int = 0) -> list[tuple[int, ...]]:
    """``n_draws`` distinct sets of ``size`` decoder layers drawn at random (not contiguous), sorted: the control
    for a contiguous window of the same size (does any replacement of that many layers do the same?)."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size < n_layers:
        raise ValueError(f"size {size!r} is not allowed: 1..{n_layers - 1}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive int, got {n_draws!r}")
    rng = np.random.default_rng(seed)
    out: list[tuple[int, ...]] = []
    for _ in range(100 * n_draws):
        s = tuple(sorted(int(i) for i in rng.choice(n_layers, size, replace=False)))
        if s not in out:
            out.append(s)
        if len(out) == n_draws:
            return out
    raise ValueError(f"only {len(out)} distinct sets of {size} of {n_layers} layers found; ask for fewer draws")


def random_layer_control(model, donor, items: Sequence[VQAItem], size: int, n_draws: int, *, seed: int = 0,
                         candidates: Sequence[str] = ANSWERS, batch_size: int = 32) -> pd.DataFrame:
    """Answers of ``model`` with random sets of ``size`` layers taken from ``donor`` (:func:`random_layer_sets`):
    one row per draw (scheme "random", ``layers`` lists them), the same columns as :func:`layer_replacement`."""
    check_compatible(model, donor)
    base = answer_items(model, items, candidates=candidates, batch_size=batch_size)
    rows = []
    for layers in random_layer_sets(model.n_layers, size, n_draws, seed=seed):
        with swap_layer_set(model, donor, layers):
            df = answer_items(model, items, candidates=candidates, batch_size=batch_size)
        rows.append(_row("random", min(layers), max(layers), df, base) | {"n_swapped": len(layers),
                                                                         "layers": ",".join(map(str, layers))})
    return pd.DataFrame(rows)


def replacement_windows(n_layers: int, sizes: Sequence[int] = (), window: int | None = None,
                        stride: int = 1) -> list[tuple[str, int, int]]:
    """(scheme, start, end) ranges: ``first`` N and ``last`` N for each N in sizes, ``window`` of width w at each
    stride (all inclusive)."""
    out = []
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_layers:
            raise ValueError(f"swap size {n!r} is not allowed: 1..{n_layers}")
        out += [("first", 0, n - 1), ("last", n_layers - n, n_layers - 1)]
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n_layers:
            raise ValueError(f"window {window!r} is not allowed: 1..{n_layers}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        out += [("window", s, s + window - 1) for s in range(0, n_layers - window + 1, stride)]
    if not out:
        raise ValueError("no swap ranges: give sizes and/or window")
    return out


def layer_replacement(
    model,
    donor,
    items: Sequence[VQAItem],
    windows: Sequence[tuple[str, int, int]],
    *,
    candidates: Sequence[str] = ANSWERS,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Answers of ``model`` with each range of layers taken from ``donor``: one row per (scheme, start, end).

    flip_rate: fraction of items whose answer differs from ``model``'s own; accuracy; prior_rate: fraction answering
    the planted prior (items with a prior answer only); also the donor-free and all-swapped references.
    """

    check_compatible(model, donor)
    for scheme, s, e in windows:
        check_range("layers", (s, e), 0, model.n_layers - 1)
    base = answer_items(model, items, candidates=candidates, batch_size=batch_size)
    rows = [_row("none", -1, -1, base, base)]
    for scheme, s, e in windows:
        with swap_layers(model, donor, s, e):
            df = answer_items(model, items, candidates=candidates, batch_size=batch_size)
        rows.append(_row(scheme, s, e, df, base))
    return pd.DataFrame(rows)


def _row(scheme: str, s: int, e: int, df: pd.DataFrame, base: pd.DataFrame) -> dict:
    has_prior = df["prior_answer"].notna()
    acc = wilson_ci(int(df["correct"].sum()), len(df))
    row = {"scheme": scheme, "start": s, "end": e, "n_swapped": 0 if s < 0 else e - s + 1,
           "layers": "" if s < 0 else ",".join(map(str, range(s, e + 1))),
           "flip_rate": float((df["pred"].values != base["pred"].values).mean()),
           "accuracy": acc.estimate, "accuracy_lo": acc.lo, "accuracy_hi": acc.hi,
           "prior_rate": float("nan"), "prior_rate_lo": float("nan"), "prior_rate_hi": float("nan"),
           "p_gold": float(df["p_gold"].mean()), "n": len(df), "n_prior": int(has_prior.sum())}
    if has_prior.any():
        pr = wilson_ci(int(df.loc[has_prior, "says_prior"].sum()), int(has_prior.sum()))
        row |= {"prior_rate": pr.estimate, "prior_rate_lo": pr.lo, "prior_rate_hi": pr.hi}
    return row


# -- activation patching between inputs ---------------------------------------------------------------------------
MIN_RECOVERY_GAP = 0.05  # recovery is a ratio: below this clean-corrupt gap it is noise, reported as NaN
def _image_mask(model, input_ids: torch.Tensor) -> torch.Tensor:

    return image_token_mask(model, input_ids)


def _capture_layers(model, items, images, layers, batch_size) -> list[dict[int, torch.Tensor]]:
    """Per batch: {layer: residual [b, seq, d]} of the given images."""

    out = []
    sites = {layer_site(l): l for l in layers}
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        batch = vqa_inputs(model, list(images[start: start + batch_size]), [it.question for it in chunk])
        with torch.no_grad(), trace(model, list(sites)) as tr:
            model.hf(**batch, logits_to_keep=1)
        out.append({l: tr[s] for s, l in sites.items()})
    return out


def image_patching(
    model,
    items: Sequence[VQAItem],
    clean_images: Sequence[Image.Image],
    corrupt_images: Sequence[Image.Image],
    layers: Sequence[int],
    *,
    positions: Sequence[str] = ("image", "last"),
    candidates: Sequence[str] = ANSWERS,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Patch residuals at ``layers`` between the clean and corrupted runs of the same questions.

    One row per (direction, positions, layer): ``clean->corrupt`` patches clean residuals into the corrupted run
    (how much of the clean answer comes back), ``corrupt->clean`` the reverse (how much is destroyed). positions:
    ``image`` (every image-token position) or ``last`` (the last prompt token). ``recovery`` = (metric - corrupt) /
    (clean - corrupt) for accuracy and p_gold, against the two unpatched runs.
    """

    items = list(items)
    layers = check_layers(layers, model.n_layers, name="patching layers")
    wrong = [p for p in positions if p not in ("image", "last")]
    if wrong or not positions:
        raise ValueError(f"positions {wrong or '(none)'} not allowed: 'image', 'last'")
    if len(clean_images) != len(items) or len(corrupt_images) != len(items):
        raise ValueError("give one clean and one corrupted image per item")
    clean = answer_items(model, items, images=clean_images, candidates=candidates, batch_size=batch_size)
    corrupt = answer_items(model, items, images=corrupt_images, candidates=candidates, batch_size=batch_size)
    refs = {"clean": clean, "corrupt": corrupt}
    caps = {"clean": _capture_layers(model, items, clean_images, layers, batch_size),
            "corrupt": _capture_layers(model, items, corrupt_images, layers, batch_size)}
    rows = []
    for direction, (src, dst) in {"clean->corrupt": ("clean", "corrupt"),
                                  "corrupt->clean": ("corrupt", "clean")}.items():
        dst_images = clean_images if dst == "clean" else corrupt_images
        for pos in positions:
            for layer in layers:
                counter = iter(range(10**9))

                def edits(batch, layer=layer, pos=pos, src=src, counter=counter):
                    source = caps[src][next(counter)][layer]
                    if pos == "image":
                        mask = _image_mask(model, batch["input_ids"])
                    else:
                        mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
                        mask[:, -1] = True  # left padding: the last column is every row's last token

                    def edit(t, source=source, mask=mask):
                        if t.shape != source.shape:
                            raise ValueError(f"patch shapes differ: {tuple(t.shape)} vs {tuple(source.shape)}")
                        return torch.where(mask.unsqueeze(-1), source.to(t.dtype), t)

                    return {layer_site(layer): edit}

                df = answer_items(model, items, images=dst_images, candidates=candidates, batch_size=batch_size,
                                  edits=edits)
                rows.append(_patch_row(direction, pos, layer, df, refs[src], refs[dst]))
    return pd.DataFrame(rows)


def _patch_row(direction: str, pos: str, layer: int, df: pd.DataFrame, src: pd.DataFrame, dst: pd.DataFrame) -> dict:
    def rec(metric: str) -> float:
        a, b, m = float(dst[metric].mean()), float(src[metric].mean()), float(df[metric].mean())
        return (m - a) / (b - a) if abs(b - a) >= MIN_RECOVERY_GAP else float("nan")

    acc = wilson_ci(int(df["correct"].sum()), len(df))
    agree = wilson_ci(int((df["pred"].values == src["pred"].values).sum()), len(df))
    return {"direction": direction, "positions": pos, "layer": layer, "accuracy": acc.estimate,
            "accuracy_lo": acc.lo, "accuracy_hi": acc.hi, "p_gold": float(df["p_gold"].mean()),
            "agree_source": agree.estimate, "agree_source_lo": agree.lo, "agree_source_hi": agree.hi,
            "recovery_accuracy": rec("correct"), "recovery_p_gold": rec("p_gold"), "n": len(df)}
