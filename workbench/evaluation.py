"""Answer evaluation for single-token numeric answers: three honest ways to ask "did the model say it?".

- digit-restricted: argmax over the answer tokens only (what a readout repair can fix);
- full vocabulary: the next token's argmax over the whole vocabulary is the gold answer token;
- generation: TRUE multi-token greedy generation, the answer parsed from the generated text.

Parse rule (documented, tested): the continuation is decoded, and the answer is the first maximal run of ASCII
digits in it (``" 3 apples"`` -> 3, ``"\\n\\nThe answer is 3."`` -> 3, ``" three"`` -> no answer). No answer
counts as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from workbench.models import Model
from workbench.sites import layer_site
from workbench.trace import Edit, trace

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
    edits: Mapping[str, Edit] | None = None,
    gen_tokens: int = 6,
    batch_size: int = 64,
    generate: bool = True,
    lens: bool = True,
) -> AnswerEval:
    """Answers under the three rules plus the gold token's logit-lens rank at every layer, in one pass per batch.

    ``answer_ids[k - 1]`` is the token of answer ``k``. The prompt's forward (generation's prefill, or a plain
    forward when ``generate=False``) is traced at the last position of every layer; the lens of the last layer is
    the next-token distribution the digit and full-vocabulary rules score. ``edits`` (trace edits, e.g. steering)
    apply to that forward and to every generation step; a swapped head (``swap_modules``) applies to all of it.
    ``lens=False`` reads only the last layer (no per-layer ranks: ``ranks`` then holds the last layer alone).
    """
    if len(prompts) != len(counts) or not prompts:
        raise ValueError(f"need one count per prompt; got {len(prompts)} prompts and {len(counts)} counts")
    counts = np.asarray(counts, dtype=int)
    if counts.min() < 1 or counts.max() > len(answer_ids):
        raise ValueError(f"counts must lie in 1..{len(answer_ids)}")
    if gen_tokens < 1:
        raise ValueError(f"gen_tokens must be >= 1, got {gen_tokens}")
    ids = torch.tensor(list(answer_ids), dtype=torch.long)
    L = model.n_layers
    layers = list(range(L + 1)) if lens else [L]
    sites = [layer_site(layer) for layer in layers]
    rows, rank_parts = [], []
    for batch in length_batches(model, prompts, batch_size):  # similar lengths together: little padding
        chunk = [prompts[i] for i in batch]
        enc = model.encode(chunk)
        with trace(model, sites, positions=-1, edits=edits) as tr:
            if generate:
                out = model.hf.generate(
                    **{k: v for k, v in enc.items() if k != "position_ids"},  # generate derives them from the mask
                    max_new_tokens=gen_tokens,
                    do_sample=False,
                    pad_token_id=model.tokenizer.pad_token_id,
                )
            else:
                model.hf(**enc, logits_to_keep=1)
        gold = torch.as_tensor(counts[batch])
        gold_ids = ids[gold - 1]
        H = torch.stack([tr.captures(site)[0] for site in sites])  # [n_layers, B, d]; captures[0] = the prompt pass
        rank, prob = _gold_rank_prob(model, H.flatten(0, 1), gold_ids.repeat(len(layers)))
        rank_parts.append(pd.DataFrame({
            "item": np.tile(batch, len(layers)),
            "layer": np.repeat(layers, len(batch)),
            "rank": rank.numpy(),
            "prob": prob.numpy(),
        }))
        final = model.lens_logits(H[-1]).float().cpu()  # the model's next-token logits
        digit_pred = final[:, ids].argmax(-1) + 1
        full_pred = final.argmax(-1)
        texts = [""] * len(chunk)
        if generate:
            texts = model.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
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


def length_batches(model: Model, prompts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Indices of ``prompts`` in batches of similar token length (shortest first); every index exactly once.

    Left padding makes results independent of the batch (tests check it), so grouping by length only saves the
    compute spent on padding: about 40 % on the counting prompts.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = [len(ids) for ids in model.tokenizer(list(prompts))["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


_LENS_CHUNK = 1 << 26  # logits entries per lens matmul (256 MB in float32): one pass over W_U for many rows


def _gold_rank_prob(model: Model, H: torch.Tensor, gold_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-lens rank (1 = top) and probability of ``gold_ids[r]`` for each residual row ``H[r]``."""
    rows = max(1, _LENS_CHUNK // model.W_U.shape[0])
    ranks, probs = [], []
    for s in range(0, H.shape[0], rows):
        logits = model.lens_logits(H[s : s + rows]).float()
        g = gold_ids[s : s + rows].to(logits.device)[:, None]
        gold_logit = logits.gather(1, g)
        ranks.append(((logits > gold_logit).sum(-1) + 1).cpu())
        probs.append((gold_logit[:, 0] - torch.logsumexp(logits, -1)).exp().cpu())
    return torch.cat(ranks), torch.cat(probs)
