"""Indirect-object identification (IOI) prompt pairs for patching (Wang et al. 2022, arXiv 2211.00593).

    pairs = make_ioi_pairs(64, seed=0, tokenizer=model.tokenizer)   # clean, corrupt, corrupt_abc, answer, wrong, ...
    abc = corrupted(pairs, "abc")                                  # the same pairs, ``corrupt`` = the ABC prompt

Clean: ``"When Mary and John went to the store, John gave a drink to"`` -> answer ``" Mary"`` (the indirect
object, IO), wrong ``" John"`` (the subject, S). Two corruptions of every clean prompt (:data:`CORRUPTIONS`):

- ``name_swap`` (column ``corrupt``): the *second* mention of the subject (S2) swapped for the IO
  (``"..., Mary gave a drink to"``), so the name the model should say flips (ABB -> ABA). The logit difference
  ``logit(answer) - logit(wrong)`` is positive on the clean prompt and negative on this one.
- ``abc`` (column ``corrupt_abc``): the IO and the first subject mention in the context replaced by two fresh names
  C and D, neither in the clean prompt (``"When Lisa and Paul went to the store, John gave a drink to"``): three
  different names, so the answer is not determined by the context and the logit difference falls towards 0 instead
  of flipping. Its prompt keeps the clean S2 token: what the model reads at S2 differs only through attention.

Every pair uses one of :data:`TEMPLATES` (six sentence frames, cycled so each is used about equally), a place and an
object from :data:`PLACES` / :data:`OBJECTS`, and four different names (A = IO, B = S, C, D) from :data:`NAMES`.
Clean and both corruptions differ only in names, so with single-token names they have the same number of tokens and
every position lines up (patching copies position p of one run into position p of the other). Give ``tokenizer``
to check that every name is one token with its leading space: a name that is not raises a ``ValueError`` naming it.
:func:`role_positions` finds the token positions of the IO, S1, S2 and the last token (END) in a tokenised prompt,
so that results of pairs from different templates can be compared role by role.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PAIR_COLUMNS = ("clean", "corrupt", "answer", "wrong")
# which column of a make_ioi_pairs frame holds each corruption's prompt
CORRUPTIONS = {"name_swap": "corrupt", "abc": "corrupt_abc"}
ROLES = ("IO", "S1", "S2", "END")  # the indirect object, the subject's first and second mention, the last token
# Common English first names, short, so that most BPE vocabularies hold " Name" as one token (all are single tokens
# for SmolLM2's tokenizer).
NAMES = (
    "Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "Mark", "Lisa", "David", "Emma", "Peter", "Kate",
    "Mike", "Laura", "Alex", "Jane", "Chris", "Amy", "Dan", "Rose", "Ben", "Sam", "Lucy", "Michael", "Robert",
    "William", "Daniel", "Andrew", "Kevin", "George", "Eric", "Adam", "Jack", "Henry", "Susan", "Alice", "Grace",
    "Rachel", "Simon",
)
PLACES = ("store", "park", "school", "office", "garden", "station", "market", "beach", "library", "hospital",
          "restaurant", "house", "museum", "hotel", "farm", "lake")
OBJECTS = ("drink", "book", "ball", "letter", "gift", "key", "bag", "cake", "ring", "pen", "bottle", "phone", "hat",
           "apple", "flower", "card")
# Six frames: A and B introduced together, then S (= B in the clean prompt) gives something to the answer.
TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {S} gave a {obj} to",
    "Today {A} and {B} found a {obj} at the {place}. Then {S} gave it to",
    "Yesterday {A} and {B} met at the {place}, and {S} brought a {obj} to",
)


def _non_single(tokenizer, names: Sequence[str]) -> dict[str, list[str]]:
    out = {}
    for n in names:
        ids = tokenizer.encode(" " + n, add_special_tokens=False)
        if len(ids) != 1:
            out[n] = tokenizer.convert_ids_to_tokens(ids)
    return out


def single_token_names(tokenizer, names: Sequence[str] = NAMES) -> list[str]:
    """The names that are one token of ``tokenizer`` with their leading space (how they appear mid-sentence)."""
    bad = _non_single(tokenizer, names)
    return [n for n in names if n not in bad]


def check_single_token_names(tokenizer, names: Sequence[str] = NAMES) -> None:
    """Raise a ``ValueError`` naming every name that is not one token of ``tokenizer`` with its leading space."""
    bad = _non_single(tokenizer, names)
    if bad:
        detail = ", ".join(f"{n!r} -> {toks}" for n, toks in bad.items())
        raise ValueError(f"IOI names must each be one token with a leading space for this tokenizer; these are not: "
                         f"{detail}. Drop them from names= (single_token_names(tokenizer, names) lists the ones "
                         "that are)")


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    bad = [t for t in templates if not isinstance(t, str)
           or not all(t.count(f"{{{k}}}") == 1 for k in ("A", "B", "S"))]
    if not templates or bad:
        raise ValueError(f"templates must be non-empty and each must name {{A}}, {{B}} and {{S}} once; bad: {bad}")
    # a name is checked as one token with its leading space, so it must follow a space in the template
    glued = [t for t in templates for k in ("A", "B", "S") if (i := t.index(f"{{{k}}}")) == 0 or t[i - 1] != " "]
    if glued:
        raise ValueError(f"every name in a template must follow a space (not start the prompt); bad: "
                         f"{sorted(set(glued))}")
    return templates


def make_ioi_pairs(n: int = 64, *, seed: int = 0, tokenizer=None, names: Sequence[str] = NAMES,
                   templates: Sequence[str] = TEMPLATES, places: Sequence[str] = PLACES,
                   objects: Sequence[str] = OBJECTS) -> pd.DataFrame:
    """``n`` seeded IOI pairs: columns clean, corrupt (the name swap), corrupt_abc (the ABC corruption), answer,
    wrong, template (index into ``templates``), io, s, c, d (the four names), place, obj.

    tokenizer: check that every name is a single token for it (a ``ValueError`` names the ones that are not).
    Templates are cycled (pair i uses template i mod len(templates)) so each frame is used about equally; each pair
    draws four different names, a place and an object.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    names = list(names)
    if len(set(names)) < 4:
        raise ValueError(f"need at least 4 different names: at least 2 names for the IO and the subject, and 2 more "
                         f"for the ABC corruption's fresh names; got {names}")
    if tokenizer is not None:
        check_single_token_names(tokenizer, names)
    templates = _check_templates(templates)
    if not places or not objects:
        raise ValueError("places and objects must be non-empty")
    pool = list(dict.fromkeys(names))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = i % len(templates)
        a, b, c, d = (pool[j] for j in rng.choice(len(pool), size=4, replace=False))
        place, obj = places[int(rng.integers(len(places)))], objects[int(rng.integers(len(objects)))]
        fill = {"place": place, "obj": obj}
        rows.append({
            "clean": templates[t].format(A=a, B=b, S=b, **fill),
            "corrupt": templates[t].format(A=a, B=b, S=a, **fill),
            "corrupt_abc": templates[t].format(A=c, B=d, S=b, **fill),
            "answer": " " + a,
            "wrong": " " + b,
            "template": t,
            "io": a, "s": b, "c": c, "d": d, "place": place, "obj": obj,
        })
    return pd.DataFrame(rows)


def corrupted(pairs: pd.DataFrame, corruption: str) -> pd.DataFrame:
    """``pairs`` with column ``corrupt`` holding ``corruption``'s prompt (:data:`CORRUPTIONS`), as the patching
    functions read it."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {list(CORRUPTIONS)}, got {corruption!r}")
    col = CORRUPTIONS[corruption]
    if col not in pairs.columns:
        raise ValueError(f"pairs has no column {col!r} for the {corruption} corruption (make it with make_ioi_pairs)")
    return pairs.assign(corrupt=pairs[col])


def role_positions(ids: Sequence[int], io_id: int, s_id: int) -> dict[str, int]:
    """Token positions of the roles in a tokenised clean prompt ``ids``: IO (the answer name's mention), S1 and S2
    (the subject's first and last mention) and END (the last token). ``io_id`` / ``s_id``: the names' token ids."""
    ids = [int(x) for x in ids]
    io = [i for i, t in enumerate(ids) if t == int(io_id)]
    s = [i for i, t in enumerate(ids) if t == int(s_id)]
    if len(io) != 1 or len(s) != 2:
        raise ValueError(f"an IOI clean prompt holds the IO name once and the subject twice; found the IO at {io} "
                         f"and the subject at {s} (are the names single tokens?)")
    return {"IO": io[0], "S1": s[0], "S2": s[1], "END": len(ids) - 1}
