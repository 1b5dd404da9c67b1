"""Answer visual questions with any supported VLM, batched: restricted, full-vocabulary and generated answers.

For each item the answer is read three ways from one prompt:

* ``pred``: the candidate answer (default :data:`workbench.data.vqa.ANSWERS`) whose first token has the highest logit
  at the last prompt position (a forced choice; candidates' first tokens must be distinct);
* ``top_token``: the full-vocabulary argmax token at that position (``full_correct``: it is the gold answer's first
  token);
* ``generated`` (``generate=True``): greedy decoding of up to ``max_new_tokens``; parse rule: lower-case, take the
  first run of letters or digits; ``gen_correct`` when it equals the gold answer.

``p_gold`` / ``p_prior`` are full-vocabulary probabilities of the gold / prior answer's first token.
Images may be replaced per call (``images=``: blurred, blank, noise), forward edits applied (``edits=``: site ->
function, through :func:`workbench.core.trace.trace`), so every intervention in :mod:`workbench.methods.routing` and
:mod:`workbench.methods.blur` reads answers the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from workbench.core.trace import trace
from workbench.core.vlm import encode_multimodal, image_placeholder
from workbench.data.vqa import ANSWERS, VQAItem


def _check_vlm(model) -> None:
    if getattr(model, "processor", None) is None or not getattr(model.arch, "is_vlm", False):
        raise ValueError(f"model {model.name!r} is not a vision-language model with a processor; "
                         "VQA answering needs one (e.g. load_model('vlm-testbed'))")


def format_prompt(model, question: str) -> str:
    """The prompt text for one question: the model's own ``prompt_template`` (the testbed's hand-built format),
    else the processor's chat template, else the image placeholder, the question and ``Answer:``."""
    if model.prompt_template:
        return model.prompt_template.format(question=question)
    proc = model.processor
    if getattr(proc, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return proc.apply_chat_template(messages, add_generation_prompt=True)
    return f"{image_placeholder(model)}\n{question}\nAnswer: "


def candidate_token_ids(tokenizer, candidates: Sequence[str]) -> list[int]:
    """First token of each candidate as answered after the prompt; they must be distinct."""
    ids = []
    for c in candidates:
        enc = tokenizer.encode(c, add_special_tokens=False)
        if not enc:
            raise ValueError(f"candidate answer {c!r} encodes to no tokens")
        ids.append(enc[0])
    dup = {c for c, i in zip(candidates, ids) if ids.count(i) > 1}
    if dup:
        raise ValueError(f"candidate answers {sorted(dup)} share a first token; restricted scoring needs distinct ones")
    return ids


def vqa_inputs(model, images: Sequence[Image.Image], questions: Sequence[str]) -> dict[str, torch.Tensor]:
    """A left-padded multimodal batch (one image per question) through :func:`workbench.core.vlm.encode_multimodal`."""

    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions: give one image per question")
    return encode_multimodal(model, list(images), [format_prompt(model, q) for q in questions])


def vqa_batches(model, items: Sequence[VQAItem], batch_size: int = 32, *,
                images: Sequence[Image.Image] | None = None):
    """``(indices, vqa_inputs(...))`` per batch of ``items`` in their order (``images`` replaces their images): the
    encoded batches the activation engine (:mod:`workbench.methods.activations`) reads."""

    items = list(items)
    if images is not None and len(images) != len(items):
        raise ValueError(f"{len(images)} images for {len(items)} items: give one image per item")
    for s in range(0, len(items), batch_size):
        chunk = items[s: s + batch_size]
        imgs = [it.image for it in chunk] if images is None else list(images[s: s + batch_size])
        yield np.arange(s, s + len(chunk)), vqa_inputs(model, imgs, [it.question for it in chunk])


def parse_generated(text: str) -> str:
    """The parse rule for generated answers: lower-case, first run of letters or digits ("" when none)."""
    m = re.search(r"[a-z0-9]+", text.lower())
    return m.group(0) if m else ""


def answer_items(
    model,
    items: Sequence[VQAItem],
    *,
    images: Sequence[Image.Image] | None = None,
    candidates: Sequence[str] = ANSWERS,
    edits: Mapping[str, Callable] | Callable[[dict], Mapping[str, Callable]] | None = None,
    generate: bool = False,
    max_new_tokens: int = 4,
    batch_size: int = 32,
) -> pd.DataFrame:
    """One row per item: pred, correct, p_gold, p_prior, top_token, full_correct, [generated, gen_correct].

    ``images`` replaces the items' images (same order). ``edits`` is a site -> edit mapping applied to every batch,
    or a function of the batch returning one (for edits that need the image-token mask of that batch).
    """

    _check_vlm(model)
    items = list(items)
    if not items:
        raise ValueError("items is empty")
    if images is not None and len(images) != len(items):
        raise ValueError(f"{len(images)} replacement images for {len(items)} items")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tok = model.processor.tokenizer
    cand = list(candidates)
    cand_ids = torch.tensor(candidate_token_ids(tok, cand))
    first = {a: tok.encode(a, add_special_tokens=False)[0] for a in cand}
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start: start + batch_size]
        imgs = [it.image for it in chunk] if images is None else list(images[start: start + batch_size])
        batch = vqa_inputs(model, imgs, [it.question for it in chunk])
        batch_edits = edits(batch) if callable(edits) else edits
        with torch.no_grad():
            if batch_edits:
                with trace(model, edits=batch_edits):
                    logits = model.hf(**batch, logits_to_keep=1).logits[:, -1]
            else:
                logits = model.hf(**batch, logits_to_keep=1).logits[:, -1]
        logits = logits.float().cpu()
        probs = torch.softmax(logits, -1)
        restricted = cand_ids[logits[:, cand_ids].argmax(-1)]
        top = logits.argmax(-1)
        gen_texts = [None] * len(chunk)
        if generate:
            gen_texts = _generate(model, batch, batch_edits, max_new_tokens)
        for k, it in enumerate(chunk):
            gold_id = first.get(it.answer, tok.encode(it.answer, add_special_tokens=False)[0])
            pred = cand[int((cand_ids == restricted[k]).nonzero()[0, 0])]
            row = {
                "item": start + k, "kind": it.kind, "question": it.question, "answer": it.answer,
                "prior_answer": it.prior_answer, "pred": pred, "correct": pred == it.answer,
                "p_gold": float(probs[k, gold_id]),
                "p_prior": float(probs[k, first[it.prior_answer]]) if it.prior_answer in first else np.nan,
                "says_prior": it.prior_answer is not None and pred == it.prior_answer,
                "top_token": tok.decode([int(top[k])]), "full_correct": int(top[k]) == gold_id,
            }
            if generate:
                parsed = parse_generated(gen_texts[k])
                row |= {"generated": gen_texts[k], "gen_parsed": parsed, "gen_correct": parsed == it.answer.lower()}
            rows.append(row)
    return pd.DataFrame(rows)


def _generate(model, batch: dict, batch_edits, max_new_tokens: int) -> list[str]:
    tok = model.processor.tokenizer
    gen_batch = {k: v for k, v in batch.items() if k != "position_ids"}
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        if batch_edits:
            raise ValueError("generate=True with edits is not supported: edits apply to the prompt pass only")
        out = model.hf.generate(**gen_batch, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    return [tok.decode(row, skip_special_tokens=True) for row in new]


def blank_image(size: int = 64, value: int = 255) -> Image.Image:
    """A uniform image (white by default): the blind baseline."""
    return Image.new("RGB", (size, size), (value, value, value))


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def accuracy_summary(df: pd.DataFrame, by: str = "split") -> pd.DataFrame:
    """Mean correct / full_correct / gen_correct / says_prior by a column."""
    cols = [c for c in ("correct", "full_correct", "gen_correct", "says_prior", "p_gold") if c in df]
    out = df.groupby(by)[cols].mean().reset_index()
    out["n"] = df.groupby(by).size().values
    return out
