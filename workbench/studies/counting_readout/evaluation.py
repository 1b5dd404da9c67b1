"""Answer evaluation for single-token numeric answers: three honest ways to ask "did the model say it?".

- digit-restricted: argmax over the answer tokens only (what a readout repair can fix);
- full vocabulary: the next token's argmax over the whole vocabulary is the gold answer token;
- generation: TRUE multi-token greedy generation, the answer parsed from the generated text.

Parse rule (documented, tested): the continuation is decoded, and the answer is the first maximal run of ASCII
digits in it (``" 3 apples"`` -> 3, ``"\\n\\nThe answer is 3."`` -> 3, ``" three"`` -> no answer). No answer
counts as wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from workbench.core.models import Model
from workbench.core.sites import layer_site
from workbench.core.trace import Edit
from workbench.methods.activations import PrefixCache

_DIGITS = re.compile(r"[0-9]+")


def parse_answer(text: str) -> int | None:
    """The first run of digits in ``text`` as an int, or None."""
    match = _DIGITS.search(text)
    return int(match.group()) if match else None


@dataclass
class AnswerEval:
    """Result of :func:`evaluate_answers`: one row per item, and the gold token's lens rank per item and layer."""

    items: pd.DataFrame  # item, count, digit_pred, digit_correct, full_pred, full_correct, gen_text, gen_answer, ...
    ranks: pd.DataFrame  # item, layer, rank, prob (logit lens of the last prompt position)

    def accuracy(self) -> dict[str, float]:
        """Mean accuracy under each rule."""
        out = {"digit_restricted": float(self.items.digit_correct.mean()),
               "full_vocab": float(self.items.full_correct.mean())}
        if self.items.gen_correct.notna().any():
            out["generation"] = float(self.items.gen_correct.astype(float).mean())
        return out

    def ranks_by_layer(self) -> pd.DataFrame:
        """Per layer: median rank and mean probability of the gold token, and lens accuracy (gold is top-1)."""
        g = self.ranks.groupby("layer")
        return pd.DataFrame({
            "median_rank": g["rank"].median(),
            "mean_prob": g["prob"].mean(),
            "lens_accuracy": g["rank"].apply(lambda r: float((r == 1).mean())),
        }).reset_index()


@torch.no_grad()
def evaluate_answers(
    model: Model,
    prompts: Sequence[str],
    counts: Sequence[int],
    answer_ids: Sequence[int],
    *,
    edits: Mapping[str, Edit] | Callable[[np.ndarray], Mapping[str, Edit]] | None = None,
    gen_tokens: int = 6,
    batch_size: int = 64,
    generate: bool = True,
    lens: bool = True,
    cache: PrefixCache | None = None,
) -> AnswerEval:
    """Answers under the three rules plus the gold token's logit-lens rank at every layer.

    ``answer_ids[k - 1]`` is the token of answer ``k``. The lens of the last layer is the next-token distribution
    the digit and full-vocabulary rules score. ``edits`` (trace edits, e.g. steering at the last position) apply to
    the last prompt token's forward and to every generation step; a callable ``edits(index)`` gives the edits of one
    batch from the indices of its prompts (a per-prompt edit, e.g. toward a per-prompt target); a swapped head (``swap_modules``) applies to all
    of it. ``lens=False`` reads only the last layer (``ranks`` then holds the last layer alone).

    ``cache``: a :class:`~workbench.methods.activations.PrefixCache` of exactly these prompts on this model (every
    layer cached), shared by several evaluations (the prompts are not run again); without one, the prompts are run
    once here. Generation is greedy decoding (argmax at
    every step, no sampling, penalties or other processors) of up to ``gen_tokens`` tokens; a batch stops early once
    every answer is decided (a run of digits closed by a non-digit, or an end-of-sequence token), which changes no
    parsed answer.
    """
    if len(prompts) != len(counts) or not prompts:
        raise ValueError(f"need one count per prompt; got {len(prompts)} prompts and {len(counts)} counts")
    counts = np.asarray(counts, dtype=int)
    if counts.min() < 1 or counts.max() > len(answer_ids):
        raise ValueError(f"counts must lie in 1..{len(answer_ids)}")
    if gen_tokens < 1:
        raise ValueError(f"gen_tokens must be >= 1, got {gen_tokens}")
    if cache is None:
        cache = PrefixCache.build(model, prompts, batch_size=batch_size)
    elif cache.model is not model or cache.prompts != list(prompts):
        raise ValueError("cache was built for other prompts or another model: build PrefixCache.build(model, "
                         "prompts) for these")
    L = model.n_layers
    if L not in cache.layers or (lens and len(cache.layers) != L + 1):
        raise ValueError(f"the cache holds layers {cache.layers}; the evaluation reads "
                         f"{'every layer' if lens else f'layer {L}'}")
    ids = torch.tensor(list(answer_ids), dtype=torch.long)
    layers = list(range(L + 1)) if lens else [L]
    sites = [layer_site(layer) for layer in layers]
    rows, rank_parts = [], []
    for b in cache.batches:
        batch = b.index
        batch_edits = edits(batch) if callable(edits) else edits
        if batch_edits:
            # the last prompt token recomputed under the edits on the cache of the others, then generation under them
            out = cache.step(b, edits=batch_edits, sites=sites, generate=gen_tokens if generate else 0, decided=_decided,
                             first_logits=lambda caps, _: model.lens_logits(caps[sites[-1]]))
            H = torch.stack([out.captures[site] for site in sites])  # [n_layers, B, d]
            final = model.lens_logits(H[-1])  # the model's next-token logits (lens of the last layer)
            new = out.tokens
        else:
            H = b.residuals(layers)
            final = model.lens_logits(H[-1])
            new = cache.generate(b, gen_tokens, first_logits=final, decided=_decided) if generate else None
        gold = torch.as_tensor(counts[batch])
        gold_ids = ids[gold - 1]
        rank, prob = _gold_rank_prob(model, H.flatten(0, 1), gold_ids.repeat(len(layers)))
        rank_parts.append(pd.DataFrame({
            "item": np.tile(batch, len(layers)),
            "layer": np.repeat(layers, len(batch)),
            "rank": rank.numpy(),
            "prob": prob.numpy(),
        }))
        final = final.float().cpu()
        digit_pred = final[:, ids].argmax(-1) + 1
        full_pred = final.argmax(-1)
        texts = [""] * len(batch)
        if generate:
            texts = model.tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, item in enumerate(batch):
            parsed = parse_answer(texts[j]) if generate else None
            rows.append({
                "item": int(item),
                "count": int(gold[j]),
                "digit_pred": int(digit_pred[j]),
                "digit_correct": int(digit_pred[j]) == int(gold[j]),
                "full_pred": model.tokenizer.convert_ids_to_tokens(int(full_pred[j])),
                "full_correct": int(full_pred[j]) == int(gold_ids[j]),
                "gen_text": texts[j],
                "gen_answer": parsed,
                "gen_correct": (parsed == int(gold[j])) if generate else None,
            })
    items = pd.DataFrame(rows).sort_values("item", kind="stable").reset_index(drop=True)
    ranks = pd.concat(rank_parts).sort_values(["item", "layer"], kind="stable").reset_index(drop=True)
    return AnswerEval(items=items, ranks=ranks)


_DECIDED = re.compile(r"[0-9]+[^0-9]")


def _decided(texts: list[str]) -> list[bool]:
    """Which generated texts hold a decided answer: a run of digits closed by a non-digit."""
    return [bool(_DECIDED.search(t)) for t in texts]


_LENS_TILE = 512  # head rows per matmul: a tile of logits stays in cache for the comparisons and the exp
_LENS_KEEP = 1 << 25  # logits entries held while the tiles holding the gold tokens are read first (128 MB)


def _gold_rank_prob(model: Model, H: torch.Tensor, gold_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-lens rank (1 = top) and probability of ``gold_ids[r]`` for each residual row ``H[r]``.

    rank = 1 + #{v : logit_v > logit_gold}, probability = softmax(logits)[gold], logits = the model's head (and
    soft-cap) on the final-normed state. The head is read in tiles of ``_LENS_TILE`` rows against many residual rows
    at once, with a running log-sum-exp, so the [rows, vocab] logits never exist in memory; the tiles that hold
    the gold tokens are computed first and the gold logits taken from them, so every comparison is between
    numbers computed the same way.
    """
    head = model.module(model.arch.unembed)
    W = model.W_U
    bias = getattr(head, "bias", None)
    cap = model.arch.logit_softcap
    T = _LENS_TILE
    n_tiles = -(-W.shape[0] // T)
    gold_ids = gold_ids.to(W.device)

    def tile(x, t):
        logits = x @ W[t * T : (t + 1) * T].T
        if bias is not None:
            logits = logits + bias[t * T : (t + 1) * T]
        logits = logits.float()
        return torch.tanh(logits / cap) * cap if cap else logits

    gold_tiles = torch.unique(gold_ids // T).tolist()
    rows = max(1, _LENS_KEEP // (len(gold_tiles) * T))
    ranks, probs = [], []
    for s in range(0, H.shape[0], rows):
        x = model.final_norm(H[s : s + rows].to(W.device, W.dtype))
        g = gold_ids[s : s + rows]
        kept, gold = {}, torch.empty(x.shape[0], device=W.device)
        for t in gold_tiles:
            kept[t] = tile(x, t)
            sel = (g // T) == t
            gold[sel] = kept[t][sel, g[sel] - t * T]
        count = torch.zeros(x.shape[0], dtype=torch.long, device=W.device)
        top = torch.full((x.shape[0],), -math.inf, device=W.device)
        total = torch.zeros(x.shape[0], device=W.device)
        for t in range(n_tiles):
            logits = kept.pop(t) if t in kept else tile(x, t)
            count += (logits > gold[:, None]).sum(-1)
            new_top = torch.maximum(top, logits.max(-1).values)
            total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(-1)
            top = new_top
        ranks.append((count + 1).cpu())
        probs.append(torch.exp(gold - top - torch.log(total)).cpu())
    return torch.cat(ranks), torch.cat(probs)
