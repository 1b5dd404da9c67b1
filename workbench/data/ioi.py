"""Indirect-object identification (IOI) prompt pairs for patching (Wang et al. 2022, arXiv 2211.00593).

    pairs = make_ioi_pairs(32, seed=0, tokenizer=model.tokenizer)   # a DataFrame: clean, corrupt, answer, wrong

Clean: ``"When Mary and John went to the store, John gave a drink to"`` -> answer ``" Mary"`` (the indirect
object), wrong ``" John"`` (the subject). Corrupt: the same prompt with the *second* mention swapped
(``"..., Mary gave a drink to"``), so the name the model should say flips; the standard metric is the logit
difference ``logit(answer) - logit(wrong)``, positive on the clean prompt and negative on the corrupt one.

Clean and corrupt differ in one name, so with single-token names they have the same number of tokens and every
position lines up (patching copies position p of one run into position p of the other). Give ``tokenizer`` to keep
only names that are one token with their leading space; :func:`workbench.methods.patching.check_pairs` checks it
again for any pair frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PAIR_COLUMNS = ("clean", "corrupt", "answer", "wrong")
# Common English first names, short, so that most BPE vocabularies hold " Name" as one token.
NAMES = (
    "Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "Mark", "Lisa", "David", "Emma", "Peter", "Kate",
    "Mike", "Laura", "Alex", "Jane", "Chris", "Amy", "Dan", "Rose", "Ben", "Sam", "Lucy",
)
PLACES = ("store", "park", "school", "office", "garden", "station", "market", "beach", "library", "hospital")
OBJECTS = ("drink", "book", "ball", "letter", "gift", "key", "bag", "cake", "ring", "pen")
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
)


def single_token_names(tokenizer, names: Sequence[str] = NAMES) -> list[str]:
    """The names that are one token of ``tokenizer`` with their leading space (how they appear mid-sentence)."""
    return [n for n in names if len(tokenizer.encode(" " + n, add_special_tokens=False)) == 1]


def make_ioi_pairs(n: int, *, seed: int = 0, tokenizer=None, names: Sequence[str] = NAMES,
                   templates: Sequence[str] = TEMPLATES) -> pd.DataFrame:
    """``n`` seeded IOI clean/corrupt pairs as a frame with columns clean, corrupt, answer, wrong, template.

    tokenizer: keep only names that are a single token for it (recommended: pairs then line up token by token).
    Each pair draws a template, two different names (A = indirect object, B = subject), a place and an object.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    pool = single_token_names(tokenizer, names) if tokenizer is not None else list(names)
    if len(pool) < 2:
        raise ValueError(f"need at least 2 names that are single tokens; of {list(names)} only {pool} are")
    templates = list(templates)
    bad = [t for t in templates if not all(f"{{{k}}}" in t for k in ("A", "B", "S"))]
    if not templates or bad:
        raise ValueError(f"templates must be non-empty and each must name {{A}}, {{B}} and {{S}}; bad: {bad}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        t = int(rng.integers(len(templates)))
        a, b = (pool[i] for i in rng.choice(len(pool), size=2, replace=False))
        place, obj = PLACES[int(rng.integers(len(PLACES)))], OBJECTS[int(rng.integers(len(OBJECTS)))]
        fill = {"A": a, "B": b, "place": place, "obj": obj}
        rows.append({
            "clean": templates[t].format(S=b, **fill),
            "corrupt": templates[t].format(S=a, **fill),
            "answer": " " + a,
            "wrong": " " + b,
            "template": t,
        })
    return pd.DataFrame(rows)
