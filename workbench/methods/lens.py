"""Logit lens: read every layer's residual stream through the model's own final norm and output head.

Layer numbering follows Hugging Face ``hidden_states``: layer 0 is the embedding output (the residual entering
block 0), layer l is the residual after l decoder blocks, layer L is the last block's output. The final norm is
applied exactly once, so layer L of the lens equals the model's own logits.

Vision-language models: the lens reads the language model's residual stream. Give ``images`` with the prompts
(batched through ``workbench.core.vlm.encode_multimodal``), or a prepared left-padded batch as ``inputs``; ``positions``
can then pick the image-token positions (``"image"``), the text positions (``"text"``) or any boolean mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float

from workbench.core.models import Model
from workbench.core.sites import check_layers, layer_site
from workbench.core.trace import trace
from workbench.core.vlm import check_multimodal, encode_multimodal, image_token_mask

LENS_COLUMNS = [
    "prompt_idx", "layer", "position", "input_token", "kind", "k", "token_id", "token", "prob", "logit", "rank",
]


def _target_ids(model: Model, targets, n_prompts: int) -> list[list[int]] | None:
    """Targets: one token (str or id) or a list for all prompts, or one list per prompt. Each must be one token."""
    if targets is None:
        return None

    def one(t) -> int:
        if isinstance(t, int):
            if not 0 <= t < model.arch.vocab_size:
                raise ValueError(f"target id {t} out of range 0..{model.arch.vocab_size - 1}")
            return t
        if isinstance(t, str):
            ids = model.tokenizer.encode(t, add_special_tokens=False)
            if len(ids) != 1:
                pieces = model.tokenizer.convert_ids_to_tokens(ids)
                raise ValueError(f"target {t!r} is {len(ids)} tokens {pieces} for {model.name}; targets must be one token")
            return ids[0]
        raise TypeError(f"target must be a str or an int token id, got {t!r}")

    if isinstance(targets, (str, int)):
        return [[one(targets)]] * n_prompts
    targets = list(targets)
    if targets and all(isinstance(t, (list, tuple)) for t in targets):
        if len(targets) != n_prompts:
            raise ValueError(f"per-prompt targets: got {len(targets)} lists for {n_prompts} prompts")
        return [[one(t) for t in ts] for ts in targets]
    shared = [one(t) for t in targets]
    return [shared] * n_prompts


def _positions_index(positions, lengths: torch.Tensor, padded_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row indices into the left-padded sequence, and the in-prompt positions they stand for.

    positions: an int or list of ints (negative counts from each prompt's end), or "all".
    Returns (index [B, k], pos [B, k]) with pos = -1 where a row has fewer tokens (only for "all").
    """
    B = lengths.shape[0]
    if positions == "all":
        k = int(lengths.max())
        pos = torch.arange(k).expand(B, k).clone()
        pos[pos >= lengths[:, None]] = -1
    else:
        plist = [positions] if isinstance(positions, int) else list(positions)
        if not plist or not all(isinstance(p, int) for p in plist):
            raise ValueError(f"positions must be an int, a non-empty list of ints or 'all'; got {positions!r}")
        pos = torch.tensor(plist).expand(B, len(plist)).clone()
        pos = torch.where(pos < 0, pos + lengths[:, None], pos)
        if (pos < 0).any() or (pos >= lengths[:, None]).any():
            raise ValueError(f"positions {positions!r} fall outside a prompt of {int(lengths.min())} tokens")
    index = (padded_len - lengths)[:, None] + pos.clamp(min=0)
    return index, pos


def _mask_index(select: torch.Tensor, lengths: torch.Tensor, padded_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, pos) like :func:`_positions_index` for a boolean [B, T] selection of the left-padded sequence; rows
    with fewer selected positions are filled with pos = -1."""
    counts = select.sum(-1)
    k = max(int(counts.max()), 1)
    index = torch.zeros((select.shape[0], k), dtype=torch.long)
    pos = torch.full((select.shape[0], k), -1, dtype=torch.long)
    for b in range(select.shape[0]):
        idx = select[b].nonzero().flatten()
        index[b, : len(idx)] = idx
        pos[b, : len(idx)] = idx - (padded_len - int(lengths[b]))
    return index, pos


def _select_mask(model: Model, positions, enc: Mapping) -> torch.Tensor | None:
    """The boolean [B, T] selection for positions "image" / "text" / a bool tensor; None for the other kinds."""
    ids, attn = enc["input_ids"].cpu(), enc["attention_mask"].cpu().bool()
    if isinstance(positions, torch.Tensor):
        if positions.dtype != torch.bool or positions.shape != ids.shape:
            raise ValueError(
                f"a positions mask must be a bool tensor of the batch's shape {tuple(ids.shape)}, got "
                f"{positions.dtype} {tuple(positions.shape)}"
            )
        select = positions.cpu()
        if (select & ~attn).any():
            raise ValueError("the positions mask selects padding positions (attention_mask == 0)")
        return select
    if positions == "image":

        select = image_token_mask(model, ids) & attn
        if not select.any():
            raise ValueError("positions='image' selects nothing: the batch has no image tokens")
        return select
    if positions == "text":
        if not model.arch.is_vlm:
            return attn

        return attn & ~image_token_mask(model, ids)
    return None


def _check_inputs(model: Model, inputs) -> dict:
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs or "attention_mask" not in inputs:
        raise ValueError(
            "inputs must be a dict with at least input_ids and attention_mask (e.g. from model.encode or "
            f"workbench.core.vlm.encode_multimodal), got {type(inputs).__name__}"
        )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tensors = isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)
    if not (tensors and ids.ndim == 2 and mask.shape == ids.shape):
        raise ValueError("inputs' input_ids and attention_mask must be tensors of the same [batch, seq] shape")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("inputs must be left-padded (like Model.encode / encode_multimodal): a row's attention_mask "
                         "has a 0 after a 1")
    if (mask.sum(-1) == 0).any():
        raise ValueError("inputs has a row with no tokens (attention_mask all 0)")
    return {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@torch.no_grad()
def lens_logits(model: Model, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... vocab"]:
    """Final norm (once) + head of the model on residual states."""
    return model.lens_logits(resid)


@torch.no_grad()
def logit_lens(
    model: Model,
    prompts: Sequence[str] | None = None,
    *,
    images=None,
    inputs: Mapping | None = None,
    layers: Sequence[int] | int | None = None,
    positions: int | Sequence[int] | str | torch.Tensor = -1,
    top_k: int = 5,
    targets=None,
    batch_size: int = 8,
    layer_chunk: int = 4,
    lens=None,
) -> pd.DataFrame:
    """Top-k tokens and target-token probability/rank per prompt x layer x position, as a tidy long frame.

    prompts: non-empty list of strings. images: for a VLM, one entry per prompt (an image or a list of images; see
    ``workbench.core.vlm.encode_multimodal``). inputs: instead of prompts, one prepared left-padded batch (a dict with
    input_ids, attention_mask and whatever the model takes, e.g. pixel_values), run as a single forward;
    ``prompt_idx`` is then the row. layers: hidden-state indices 0..L (None = all). positions: in-prompt positions
    (negative from the end; default the last token), "all", "image" (a VLM's image-token positions), "text" (every
    real non-image position), or a bool tensor of the batch's [batch, seq] shape (with ``inputs``) selecting
    positions of the padded sequence. targets: a token (str or id) or list for every prompt, or one list per prompt;
    each must be a single token. Only the requested positions are captured,
    the forward stops after the last requested layer, and the vocabulary projection runs ``layer_chunk`` layers at a
    time, so memory stays small for 262k-row heads.

    lens: a :class:`workbench.methods.tuned_lens.TunedLens` trained for this model reads every layer through its
    translator first (the tuned lens); None (default) is the logit lens. The frame is the same either way.

    Columns: prompt_idx, layer, position, input_token, kind ("top" or "target"), k (1-based order in the top-k; NaN
    for targets), token_id, token, prob, logit, rank (1 + number of tokens with a strictly higher logit).
    """
    if (prompts is None) == (inputs is None):
        raise ValueError("give either prompts (with images for a VLM) or a prepared batch as inputs, not both/neither")
    if inputs is not None:
        if images is not None:
            raise ValueError("images go with prompts; a prepared inputs batch already holds its pixel values")
        inputs = _check_inputs(model, inputs)
        n_prompts = int(inputs["input_ids"].shape[0])
    else:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        n_prompts = len(prompts)
        if images is not None:

            prompts, images = check_multimodal(model, images, prompts)  # every batch is valid before any forward
    L = model.n_layers
    layer_list = check_layers(layers, L)
    if not isinstance(top_k, int) or not 0 <= top_k <= model.arch.vocab_size:
        raise ValueError(f"top_k must be an int in 0..{model.arch.vocab_size}, got {top_k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    mask_kinds = ("image", "text")
    if isinstance(positions, torch.Tensor):
        if inputs is None:
            raise ValueError("a positions mask indexes a prepared batch: give it with inputs=, or use 'image'/'text'")
    elif positions != "all" and positions not in mask_kinds and not isinstance(positions, (int, list, tuple)):
        raise ValueError(
            f"positions must be an int, a list of ints, 'all', 'image', 'text' or a bool mask; got {positions!r}"
        )
    if positions == "image" and not isinstance(positions, torch.Tensor) and not model.arch.is_vlm:
        raise ValueError(f"positions='image' needs a vision-language model; {model.name} is text-only")
    if lens is not None:
        check = getattr(lens, "check_model", None)
        if not callable(check) or not callable(getattr(lens, "logits", None)):
            raise ValueError(f"lens must be a TunedLens (workbench.methods.tuned_lens) or None, got {type(lens).__name__}")
        check(model)  # shapes and weights: a lens of another model raises here, before any forward
    target_ids = _target_ids(model, targets, n_prompts)
    if top_k == 0 and target_ids is None:
        raise ValueError("nothing to report: top_k is 0 and no targets were given")

    sites = [layer_site(l) for l in layer_list]
    tok = model.tokenizer
    rows: list[dict] = []

    def batches():
        if inputs is not None:
            yield 0, inputs
            return
        for start in range(0, n_prompts, batch_size):
            chunk = prompts[start : start + batch_size]
            if images is not None:

                yield start, encode_multimodal(model, images[start : start + batch_size], chunk)
            else:
                yield start, model.encode(chunk)

    for start, enc in batches():
        B = int(enc["input_ids"].shape[0])
        lengths = enc["attention_mask"].sum(-1).cpu()
        select = _select_mask(model, positions, enc)
        if select is not None:
            index, pos = _mask_index(select, lengths, enc["input_ids"].shape[1])
        else:
            index, pos = _positions_index(positions, lengths, enc["input_ids"].shape[1])
        with trace(model, sites, positions=index, stop=True) as tr:
            model.hf(**enc)
        ids_cpu = enc["input_ids"].cpu()
        for c in range(0, len(layer_list), layer_chunk):
            group = layer_list[c : c + layer_chunk]
            h = torch.stack([tr[layer_site(l)] for l in group])  # [C, B, k, d]
            if lens is None:
                logits = model.lens_logits(h).float()  # [C, B, k, V]
            else:
                logits = torch.stack([lens.logits(model, h[ci], layer).float() for ci, layer in enumerate(group)])
            logprobs = torch.log_softmax(logits, dim=-1)
            if top_k:
                top_logit, top_id = logits.topk(top_k, dim=-1)
            for ci, layer in enumerate(group):
                for b in range(B):
                    for j in range(index.shape[1]):
                        p = int(pos[b, j])
                        if p < 0:
                            continue
                        base = {
                            "prompt_idx": start + b,
                            "layer": layer,
                            "position": p,
                            "input_token": tok.convert_ids_to_tokens(int(ids_cpu[b, index[b, j]])),
                        }
                        lg = logits[ci, b, j]
                        if top_k:
                            for r in range(top_k):
                                t_id = int(top_id[ci, b, j, r])
                                rows.append(base | {
                                    "kind": "top", "k": r + 1, "token_id": t_id,
                                    "token": tok.convert_ids_to_tokens(t_id),
                                    "prob": float(logprobs[ci, b, j, t_id].exp()),
                                    "logit": float(top_logit[ci, b, j, r]),
                                    "rank": int((lg > lg[t_id]).sum()) + 1,
                                })
                        if target_ids is not None:
                            for t_id in target_ids[start + b]:
                                rows.append(base | {
                                    "kind": "target", "k": None, "token_id": t_id,
                                    "token": tok.convert_ids_to_tokens(t_id),
                                    "prob": float(logprobs[ci, b, j, t_id].exp()),
                                    "logit": float(lg[t_id]),
                                    "rank": int((lg > lg[t_id]).sum()) + 1,
                                })
    frame = pd.DataFrame(rows, columns=LENS_COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    frame["kind"] = pd.Categorical(frame["kind"], categories=["top", "target"], ordered=True)
    # One order whatever the batching/chunking: prompt, layer, position, top-k rows (by k) then targets.
    frame = frame.sort_values(["prompt_idx", "layer", "position", "kind", "k"], kind="stable", na_position="last")
    return frame.reset_index(drop=True)
