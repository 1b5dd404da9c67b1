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
    batch_size: int = 32,
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
    rows, rank_rows = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
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
        gold = torch.as_tensor(counts[start : start + len(chunk)])
        gold_ids = ids[gold - 1]
        final = None
        for layer, site in zip(layers, sites):
            logits = model.lens_logits(tr.captures(site)[0]).float().cpu()  # [B, V]; captures[0] = the prompt pass
            gold_logit = logits.gather(1, gold_ids[:, None])
            rank = (logits > gold_logit).sum(-1) + 1
            prob = torch.softmax(logits, -1).gather(1, gold_ids[:, None])[:, 0]
            rank_rows += [{"item": start + j, "layer": layer, "rank": int(rank[j]), "prob": float(prob[j])}
                          for j in range(len(chunk))]
            final = logits
        digit_pred = final[:, ids].argmax(-1) + 1
        full_pred = final.argmax(-1)
        texts = [""] * len(chunk)
        if generate:
            texts = model.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for j in range(len(chunk)):
            parsed = parse_answer(texts[j]) if generate else None
            rows.append({
                "item": start + j,
                "count": int(gold[j]),
                "digit_pred": int(digit_pred[j]),
                "digit_correct": int(digit_pred[j]) == int(gold[j]),
                "full_pred": model.tokenizer.convert_ids_to_tokens(int(full_pred[j])),
                "full_correct": int(full_pred[j]) == int(gold_ids[j]),
                "gen_text": texts[j],
                "gen_answer": parsed,
                "gen_correct": (parsed == int(gold[j])) if generate else None,
            })
    return AnswerEval(items=pd.DataFrame(rows), ranks=pd.DataFrame(rank_rows))
