"""Logit lens: read every layer's residual stream through the model's own final norm and output head.

Layer numbering follows Hugging Face ``hidden_states``: layer 0 is the embedding output (the residual entering
block 0), layer l is the residual after l decoder blocks, layer L is the last block's output. The final norm is
applied exactly once, so layer L of the lens equals the model's own logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float

from workbench.models import Model
from workbench.sites import layer_site
from workbench.trace import trace

LENS_COLUMNS = [
    "prompt_idx", "layer", "position", "input_token", "kind", "k", "token_id", "token", "prob", "logit", "rank",
]


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers + 1))
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty; give None (all) or indices in 0..n_layers")
    bad = [l for l in layers if not isinstance(l, int) or not -(n_layers + 1) <= l <= n_layers]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: the lens has layers 0..{n_layers} (0 = embeddings, {n_layers} = last block)"
        )
    return sorted({l % (n_layers + 1) for l in layers})


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


@torch.no_grad()
def lens_logits(model: Model, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... vocab"]:
    """Final norm (once) + head of the model on residual states."""
    return model.lens_logits(resid)


@torch.no_grad()
def logit_lens(
    model: Model,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | int | None = None,
    positions: int | Sequence[int] | str = -1,
    top_k: int = 5,
    targets=None,
    batch_size: int = 8,
    layer_chunk: int = 4,
) -> pd.DataFrame:
    """Top-k tokens and target-token probability/rank per prompt x layer x position, as a tidy long frame.

    prompts: non-empty list of strings. layers: hidden-state indices 0..L (None = all). positions: in-prompt
    positions (negative from the end; default the last token) or "all". targets: a token (str or id) or list for
    every prompt, or one list per prompt; each must be a single token. Only the requested positions are captured,
    the forward stops after the last requested layer, and the vocabulary projection runs ``layer_chunk`` layers at a
    time, so memory stays small for 262k-row heads.

    Columns: prompt_idx, layer, position, input_token, kind ("top" or "target"), k (1-based order in the top-k; NaN
    for targets), token_id, token, prob, logit, rank (1 + number of tokens with a strictly higher logit).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    L = model.n_layers
    layer_list = _check_layers(layers, L)
    if not isinstance(top_k, int) or not 0 <= top_k <= model.arch.vocab_size:
        raise ValueError(f"top_k must be an int in 0..{model.arch.vocab_size}, got {top_k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if positions != "all" and not isinstance(positions, (int, list, tuple)):
        raise ValueError(f"positions must be an int, a list of ints or 'all'; got {positions!r}")
    target_ids = _target_ids(model, targets, len(prompts))
    if top_k == 0 and target_ids is None:
        raise ValueError("nothing to report: top_k is 0 and no targets were given")

    sites = [layer_site(l) for l in layer_list]
    tok = model.tokenizer
    rows: list[dict] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        enc = model.encode(chunk)
        lengths = enc["attention_mask"].sum(-1).cpu()
        index, pos = _positions_index(positions, lengths, enc["input_ids"].shape[1])
        with trace(model, sites, positions=index, stop=True) as tr:
            model.hf(**enc)
        ids_cpu = enc["input_ids"].cpu()
        for c in range(0, len(layer_list), layer_chunk):
            group = layer_list[c : c + layer_chunk]
            h = torch.stack([tr[layer_site(l)] for l in group])  # [C, B, k, d]
            logits = model.lens_logits(h).float()  # [C, B, k, V]
            logprobs = torch.log_softmax(logits, dim=-1)
            if top_k:
                top_logit, top_id = logits.topk(top_k, dim=-1)
            for ci, layer in enumerate(group):
                for b in range(len(chunk)):
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
