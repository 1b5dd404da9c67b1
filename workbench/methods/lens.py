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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

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


@dataclass
class LensResult:
    """What a lens read, as tensors (CPU), one entry per layer x row; ``to_frame()`` gives the tidy frame.

    A *row* is one (prompt, position) that was read. Shapes: ``Ly`` layers, ``N`` rows, ``k`` top tokens, ``T``
    target slots (``target_ids`` is -1 where a prompt has fewer targets than the longest list).
    """

    model: str
    lens: str  # "logit" or "tuned": which lens read the layers
    layers: list[int]  # hidden-state indices, in the order of dim 0
    prompt_idx: Int[torch.Tensor, " N"]
    position: Int[torch.Tensor, " N"]  # in-prompt position (0 = first real token)
    input_ids: Int[torch.Tensor, " N"]  # the token at that position
    top_ids: Int[torch.Tensor, "Ly N k"]
    top_logits: Float[torch.Tensor, "Ly N k"]
    top_logprobs: Float[torch.Tensor, "Ly N k"]
    top_ranks: Int[torch.Tensor, "Ly N k"]  # 1 + number of tokens with a strictly higher logit (ties share a rank)
    target_ids: Int[torch.Tensor, "N T"]
    target_logits: Float[torch.Tensor, "Ly N T"]
    target_logprobs: Float[torch.Tensor, "Ly N T"]
    target_ranks: Int[torch.Tensor, "Ly N T"]
    tokenizer: object = field(repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.prompt_idx.shape[0])

    @property
    def top_probs(self) -> torch.Tensor:
        return self.top_logprobs.exp()

    @property
    def target_probs(self) -> torch.Tensor:
        """Target probabilities; NaN in the padded slots (``target_ids == -1``)."""
        return self.target_logprobs.exp()

    def to_frame(self) -> pd.DataFrame:
        """The tidy long frame (:data:`LENS_COLUMNS`), built without a Python loop over rows: per prompt, layer and
        position, the top-k rows (by k) then the targets in the order given."""
        Ly, N, k = self.top_ids.shape
        T = self.target_ids.shape[1]
        layers = np.asarray(self.layers, dtype=np.int64)
        prompt, position, inp = (t.numpy() for t in (self.prompt_idx, self.position, self.input_ids))

        def block(ids, logits, logprobs, ranks, width, keep):
            # [Ly, N, width] -> flat arrays over the kept entries
            li, ni, wi = np.meshgrid(np.arange(Ly), np.arange(N), np.arange(width), indexing="ij")
            keep = np.broadcast_to(keep, (Ly, N, width))
            return {
                "li": li[keep], "ni": ni[keep], "wi": wi[keep], "token_id": ids.numpy()[keep],
                "logit": logits.numpy()[keep], "logprob": logprobs.numpy()[keep], "rank": ranks.numpy()[keep],
            }

        top = block(self.top_ids, self.top_logits, self.top_logprobs, self.top_ranks, k,
                    np.ones((1, 1, k), dtype=bool))
        tgt_keep = (self.target_ids >= 0).numpy()[None]
        tgt_ids = self.target_ids.clamp(min=0)[None].expand(Ly, N, T)
        tgt = block(tgt_ids, self.target_logits, self.target_logprobs, self.target_ranks, T, tgt_keep)
        kind = np.concatenate([np.zeros(len(top["li"]), np.int8), np.ones(len(tgt["li"]), np.int8)])
        cat = {key: np.concatenate([top[key], tgt[key]]) for key in top}
        ni, li = cat["ni"], cat["li"]
        order = np.lexsort((cat["wi"], kind, position[ni], layers[li], prompt[ni]))
        ni, li, kind = ni[order], li[order], kind[order]
        token_id = cat["token_id"][order]
        frame = pd.DataFrame({
            "prompt_idx": prompt[ni],
            "layer": layers[li],
            "position": position[ni],
            "input_token": _token_strings(self.tokenizer, inp[ni]),
            "kind": pd.Categorical.from_codes(kind, categories=["top", "target"], ordered=True),
            "k": pd.array(np.where(kind == 0, cat["wi"][order] + 1, 0), dtype="Int64"),
            "token_id": token_id,
            "token": _token_strings(self.tokenizer, token_id),
            "prob": np.exp(cat["logprob"][order].astype(np.float64)),
            "logit": cat["logit"][order].astype(np.float64),
            "rank": cat["rank"][order],
        }, columns=LENS_COLUMNS)
        frame.loc[kind == 1, "k"] = pd.NA
        return frame


def _token_strings(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Token strings of an id array, converting each distinct id once."""
    if len(ids) == 0:
        return np.empty(0, dtype=object)
    uniq, inverse = np.unique(ids, return_inverse=True)
    names = np.empty(len(uniq), dtype=object)
    names[:] = tokenizer.convert_ids_to_tokens(uniq.tolist())
    return names[inverse]


def _budget_rows(model: Model, vocab: int, max_memory: int | None, device: torch.device) -> int:
    """Rows of the head projection per chunk: each row holds the logits (model dtype + float32) and one temporary
    of the vocabulary's size for the ranks, so ~ vocab x (itemsize + 9) bytes."""
    per_row = vocab * (torch.finfo(model.dtype).bits // 8 + 9)
    if max_memory is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            max_memory = min(free // 4, 8 << 30)
        else:
            max_memory = 1 << 30
    return max(1, int(max_memory) // per_row)


def _check_lens_args(model, prompts, images, inputs, layers, positions, top_k, targets, batch_size, lens,
                     max_memory):
    """Every argument checked before any forward; returns (prompts, images, inputs, n_prompts, layers, targets)."""
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
    layer_list = check_layers(layers, model.n_layers)
    if not isinstance(top_k, int) or not 0 <= top_k <= model.arch.vocab_size:
        raise ValueError(f"top_k must be an int in 0..{model.arch.vocab_size}, got {top_k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise ValueError(f"max_memory must be a positive number of bytes or None (a default from the device), "
                         f"got {max_memory!r}")
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
        if not callable(check) or not callable(getattr(lens, "transform", None)):
            raise ValueError(f"lens must be a TunedLens (workbench.methods.tuned_lens) or None, got {type(lens).__name__}")
        check(model)  # shapes and weights: a lens of another model raises here, before any forward
    target_ids = _target_ids(model, targets, n_prompts)
    if top_k == 0 and target_ids is None:
        raise ValueError("nothing to report: top_k is 0 and no targets were given")
    return prompts, images, inputs, n_prompts, layer_list, target_ids


@torch.no_grad()
def read_lens(
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
    max_memory: int | None = None,
    lens=None,
) -> LensResult:
    """The logit lens (or a tuned lens) as tensors: top-k ids, logits, log-probabilities and ranks, and the same
    for the targets, per layer x (prompt, position). Arguments as :func:`logit_lens`; ``.to_frame()`` is its frame.

    Everything is computed on the device of the model's head: one forward per batch of prompts captures only the
    requested positions of the requested layers (stopping after the last), then the (layer, row) pairs go through
    norm + head in chunks of at most ``max_memory`` bytes of logits (None: a quarter of the free CUDA memory, at
    most 8 GiB, or 1 GiB on CPU). Ranks are counted by comparison with the vocabulary, never by sorting it; the
    results move to the CPU once, at the end.
    """
    prompts, images, inputs, n_prompts, layer_list, target_ids = _check_lens_args(
        model, prompts, images, inputs, layers, positions, top_k, targets, batch_size, lens, max_memory)
    dev, V = model.head_device, model.arch.vocab_size
    chunk_rows = _budget_rows(model, V, max_memory, dev)
    T = max((len(t) for t in target_ids), default=0) if target_ids is not None else 0
    all_targets = torch.full((n_prompts, T), -1, dtype=torch.long)
    for i, ts in enumerate(target_ids or []):
        all_targets[i, : len(ts)] = torch.tensor(ts, dtype=torch.long)
    sites = [layer_site(l) for l in layer_list]
    Ly = len(layer_list)
    meta: dict[str, list[torch.Tensor]] = {"prompt_idx": [], "position": [], "input_ids": []}
    out: dict[str, list[torch.Tensor]] = {name: [] for name in (
        "top_ids", "top_logits", "top_logprobs", "top_ranks", "target_logits", "target_logprobs", "target_ranks")}

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
        lengths = enc["attention_mask"].sum(-1).cpu()
        select = _select_mask(model, positions, enc)
        if select is not None:
            index, pos = _mask_index(select, lengths, enc["input_ids"].shape[1])
        else:
            index, pos = _positions_index(positions, lengths, enc["input_ids"].shape[1])
        with trace(model, sites, positions=index, stop=True) as tr:
            model.hf(**enc)
        valid = pos >= 0  # [B, k]: rows with fewer selected positions are padded with -1
        b_idx, j_idx = valid.nonzero(as_tuple=True)
        n = int(b_idx.shape[0])
        meta["prompt_idx"].append(b_idx + start)
        meta["position"].append(pos[b_idx, j_idx])
        meta["input_ids"].append(enc["input_ids"].cpu()[b_idx, index[b_idx, j_idx]])
        gather = (b_idx.to(dev), j_idx.to(dev))
        hs = [tr[s].to(dev)[gather] for s in sites]  # [n, d] per layer, moved from its layer's device to the head's
        del tr
        tids = all_targets[b_idx + start].to(dev)  # [n, T]
        res = {name: [] for name in out}
        for s in range(0, Ly * n, chunk_rows):
            e = min(s + chunk_rows, Ly * n)
            parts = []
            for li in range(s // n, (e - 1) // n + 1):
                a, b = max(s, li * n) - li * n, min(e, (li + 1) * n) - li * n
                x = hs[li][a:b]
                if lens is not None:
                    x = lens.transform(x, layer_list[li]).to(model.dtype)
                parts.append(x)
            logits = model.lens_logits(torch.cat(parts)).float()  # [R, V]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            if top_k:
                tl, ti = logits.topk(top_k, dim=-1)
                res["top_ids"].append(ti)
                res["top_logits"].append(tl)
                res["top_logprobs"].append(tl - lse)
                # a token above a top-k value is itself in the top-k, so its rank is counted among the k
                res["top_ranks"].append((tl[:, None, :] > tl[:, :, None]).sum(-1) + 1)
            if T:
                rows = torch.arange(s, e, device=dev) % n
                t_rows = tids[rows]
                tgl = logits.gather(-1, t_rows.clamp(min=0))
                # int32 sums: a bool -> int64 cast of the whole [R, V] comparison cost more than the comparison
                ranks = torch.stack([(logits > tgl[:, c : c + 1]).sum(-1, dtype=torch.int32) for c in range(T)],
                                    dim=-1).long() + 1
                nan = torch.tensor(float("nan"), device=dev)
                res["target_logits"].append(torch.where(t_rows >= 0, tgl, nan))
                res["target_logprobs"].append(torch.where(t_rows >= 0, tgl - lse, nan))
                res["target_ranks"].append(torch.where(t_rows >= 0, ranks, 0))
            del logits
        for name, parts in res.items():
            width = top_k if name.startswith("top") else T
            dtype = torch.long if name.endswith(("ids", "ranks")) else torch.float32
            flat = torch.cat(parts) if parts else torch.empty((Ly * n, width), dtype=dtype, device=dev)
            out[name].append(flat.view(Ly, n, width))
    result = {name: torch.cat(parts, dim=1).cpu() for name, parts in out.items()}
    return LensResult(
        model=model.name, lens="logit" if lens is None else "tuned", layers=list(layer_list),
        **{k: torch.cat(v) for k, v in meta.items()}, target_ids=all_targets[torch.cat(meta["prompt_idx"])],
        **result, tokenizer=model.tokenizer,
    )


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
    max_memory: int | None = None,
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
    each must be a single token. Only the requested positions are captured, the forward stops after the last
    requested layer, and the vocabulary projection runs in chunks of at most ``max_memory`` bytes of logits (see
    :func:`read_lens`), so memory stays bounded for 262k-row heads and long prompts.

    lens: a :class:`workbench.methods.tuned_lens.TunedLens` trained for this model reads every layer through its
    translator first (the tuned lens); None (default) is the logit lens. The frame is the same either way.

    Columns: prompt_idx, layer, position, input_token, kind ("top" or "target"), k (1-based order in the top-k; NaN
    for targets), token_id, token, prob, logit, rank (1 + number of tokens with a strictly higher logit).
    This is ``read_lens(...).to_frame()``; use :func:`read_lens` to keep the tensors.
    """
    return read_lens(model, prompts, images=images, inputs=inputs, layers=layers, positions=positions, top_k=top_k,
                     targets=targets, batch_size=batch_size, max_memory=max_memory, lens=lens).to_frame()
