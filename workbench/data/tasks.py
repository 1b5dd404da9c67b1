"""Counting tasks: seeded prompt generators whose answer is a count 1-9 (research thread 1, methods.md).

The counting-readout study asks whether a model *represents* a count (linear probes on the residual stream) and
whether its output head can *read it out* (geometry of the digit rows). Both need prompts whose count is known by
construction, balanced over 1..9, split so that evaluation prompts never reach training, and answers that are one
token each. This module makes them:

==============  =========================================================================  ==============
task            template                                                                    answer default
==============  =========================================================================  ==============
``entity``      ``"{words} How many {entity} are there? Answer:"``                          ``" 3"``
``character``   ``"How many times does '{letter}' appear in '{word}'? Answer:"``            ``" 3"``
``addition``    ``"{a}+{b}="``                                                              ``"3"``
``list_length`` ``"Items: {fruit}, {fruit}, .... Count:"``                                  ``" 3"``
==============  =========================================================================  ==============

Choices (documented, all adjustable through options):

- entity: ``{words}`` is ``count`` mentions of one entity word (an animal, singular, as in the reference code:
  ``"cat dog tree cat How many cat are there? Answer:"``) shuffled among 0-4 distractor words (objects, never an
  entity). Only the mentions before the question are counted; their character spans are in
  ``TaskSet.mention_char_spans``.
- character: ``{word}`` is a synthetic lowercase string (length 10-14 by default) holding ``letter`` exactly
  ``count`` times, the other characters drawn from the alphabet without ``letter``. Real words (the reference code
  uses "mississippi"-like words) cannot give balanced counts up to 9; synthetic strings can.
- addition: ``a + b = count`` with ``a`` uniform in 0..count (so ``a, b >= 0`` and ``1 <= a + b <= 9``;
  ``allow_zero=False`` keeps both operands >= 1, which rules out count 1). There are only 54 distinct addition
  prompts (45 without zeros), so large sets repeat prompts: :func:`split` keeps identical prompts in one split.
- list_length: ``count`` distinct fruits (sampled without replacement) joined by ``", "``.
- answers: ``answer_prefix + str(count)``. After ``"Answer:"``/``"Count:"`` the natural next token of GPT-2-style
  BPE tokenizers (GPT-2, Pythia) is space+digit, so those tasks default to ``" "``; after ``"="`` it is the bare
  digit, so addition defaults to ``""``. Tokenizers that split the space from the digit need ``answer_prefix=""``:
  that is all three registry models (SmolLM2, Qwen2.5, Gemma 3: ``" 3"`` is two tokens) and the tiny byte
  tokenizer. :func:`check_single_token_answers` catches it and :func:`choose_answer_prefix` picks the first prefix
  that gives one token per digit. (With such tokenizers the model's first token after ``"Answer:"`` is usually the
  space itself, so the digit read at the last prompt position is the second answer token, as in the reference
  code; say so when reporting baseline accuracy.)
- token positions: for the character task, BPE tokenizers merge letters of the synthetic string ("qq", "bq"), so a
  counted letter's token may hold other letters or several counted ones; :func:`mention_token_positions` reports
  every token that overlaps a counted item.

Counts are balanced (each requested count equally often, the remainder spread at random) and shuffled, all from
``numpy.random.default_rng(seed)``: the same arguments give the same prompts on every machine.

Length-decoupled variants (results audit D1: in ``list_length`` the count *is* the word count, in ``entity`` the
word count explains R² ≈ 0.77 of it, so a count probe may read prompt length). :data:`DECOUPLED_OPTIONS` and
:func:`decoupled_task` give each task a variant whose prompt length does not follow the count:

- entity, ``total_words``: ``total_words - count`` distractors, so every prompt has the same number of words.
- list_length, ``fixed_length`` + ``other_items`` + ``category``: a list of exactly ``fixed_length`` items, ``count``
  of them from ``items`` and the rest from ``other_items`` (disjoint), shuffled; the prompt asks for the category:
  ``"Items: apple, dog, cat, pear. How many fruits are there? Count:"`` (same ``"Count:"`` answer cue as the
  plain task, so the answer forms and :func:`answer_setup` are unchanged).
- character, ``word_length=(12, 12)``: every quoted string has 12 letters.
- addition: no option; it is decoupled by the split, :func:`split_groups` with ``decoupled=True`` (held-out prompts
  never share a first operand with training prompts).

:func:`nuisance_frame` lists, per prompt, the lengths (and operands) a count probe must beat.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from workbench.data.checks import check_range
from workbench.io.provenance import jsonable

TASKS = ("entity", "character", "addition", "list_length")
ALL_COUNTS = tuple(range(1, 10))

ANIMALS = ("cat", "dog", "bird", "fish", "frog", "bear", "wolf", "duck", "horse", "mouse", "sheep", "goat")
OBJECTS = ("tree", "rock", "cloud", "table", "river", "lamp", "chair", "book", "cup", "door", "shoe", "box")
FRUITS = (
    "apple", "banana", "cherry", "date", "fig", "grape", "kiwi", "lemon", "mango", "orange", "papaya", "pear",
    "peach", "plum", "lime", "melon", "apricot", "guava", "quince", "raspberry", "strawberry", "blueberry",
)

DEFAULT_ANSWER_PREFIX = {"entity": " ", "character": " ", "addition": "", "list_length": " "}

Span = tuple[int, int]


@dataclass
class TaskSet:
    """Prompts of one counting task with their counts, answers and (where defined) counted-item spans.

    prompts: the prompt strings. counts: int array [n] (1..9). answers: ``answer_prefix + str(count)``.
    mention_char_spans: per prompt, the ``(start, end)`` character spans of the counted items (entity mentions,
        letter occurrences inside the quoted word, list items); None for addition.
    meta: per prompt, what was drawn (entity, letter and word, operands, items).
    params: the generator arguments (task, n, seed, counts, options): enough to regenerate the set.
    index: position of each prompt in the originally generated set (kept through :meth:`subset` and :func:`split`).
    """

    task: str
    prompts: list[str]
    counts: np.ndarray
    answers: list[str]
    answer_prefix: str
    mention_char_spans: list[list[Span]] | None
    meta: list[dict[str, Any]]
    params: dict[str, Any]
    index: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Sequence[int] | np.ndarray) -> TaskSet:
        """The prompts at positions ``idx`` (in this set), as a new TaskSet."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise ValueError(f"subset indices must lie in 0..{len(self) - 1}; got min {idx.min()}, max {idx.max()}")
        pick = [int(i) for i in idx]
        return TaskSet(
            task=self.task,
            prompts=[self.prompts[i] for i in pick],
            counts=self.counts[idx].copy(),
            answers=[self.answers[i] for i in pick],
            answer_prefix=self.answer_prefix,
            mention_char_spans=None if self.mention_char_spans is None else [self.mention_char_spans[i] for i in pick],
            meta=[self.meta[i] for i in pick],
            params=dict(self.params),
            index=self.index[idx].copy(),
        )

    def mention_token_positions(
        self, tokenizer, *, which: Literal["all", "first", "last"] = "all", add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Token positions of the counted items, per prompt (see :func:`mention_token_positions`)."""
        if self.mention_char_spans is None:
            raise ValueError(f"task {self.task!r} has no counted-item spans; tasks with spans: entity, character, "
                             "list_length")
        return mention_token_positions(
            tokenizer, self.prompts, self.mention_char_spans, which=which, add_special_tokens=add_special_tokens
        )

    def answer_strings(self) -> list[str]:
        """The nine possible answers 1..9 in this set's answer form."""
        return [f"{self.answer_prefix}{d}" for d in ALL_COUNTS]


# -- validation ------------------------------------------------------------------------------------------------
def _check_counts(counts) -> list[int]:
    try:
        values = list(counts)
    except TypeError:
        raise ValueError(f"counts must be an iterable of ints in 1..9, got {counts!r}") from None
    if not values:
        raise ValueError("counts is empty; give ints in 1..9, e.g. range(1, 10)")
    bad = [c for c in values if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= c <= 9]
    if bad:
        raise ValueError(f"counts {bad} are not allowed: every count must be an int in 1..9 (one digit answer)")
    values = [int(c) for c in values]
    if len(set(values)) != len(values):
        raise ValueError(f"counts {values} contain duplicates; give each count once")
    return sorted(values)


def _check_words(name: str, words) -> tuple[str, ...]:
    if isinstance(words, str) or not isinstance(words, Iterable):
        raise ValueError(f"option {name} must be a list of words, got {words!r}")
    words = tuple(words)
    bad = [w for w in words if not isinstance(w, str) or not w or any(c.isspace() for c in w) or "," in w]
    if not words or bad:
        raise ValueError(f"option {name} must be a non-empty list of non-empty words without spaces or commas; "
                         f"bad entries: {bad or '(empty list)'}")
    if len(set(words)) != len(words):
        raise ValueError(f"option {name} has duplicate words: {sorted(w for w in set(words) if words.count(w) > 1)}")
    return words


def _check_prefix(prefix) -> str:
    if not isinstance(prefix, str) or len(prefix) > 1 or (prefix and not prefix.isspace()):
        raise ValueError(f"answer_prefix must be '' or a single whitespace character such as ' ', got {prefix!r}")
    return prefix


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"option {name} must be True or False, got {value!r}")
    return value


# -- generators ------------------------------------------------------------------------------------------------
# Each returns (prompt, spans or None, meta) for one count; options were validated beforehand.
Generator = Callable[[int, np.random.Generator, dict], tuple[str, list[Span] | None, dict]]


def _gen_entity(count: int, rng: np.random.Generator, opt: dict) -> tuple[str, list[Span], dict]:
    entity = str(rng.choice(opt["entities"]))
    if opt["total_words"] is not None:  # length-decoupled: every prompt has total_words words before the question
        n_dist = opt["total_words"] - count
    else:
        lo, hi = opt["n_distractors"]
        n_dist = int(rng.integers(lo, hi + 1))
    words = [entity] * count + [str(w) for w in rng.choice(opt["distractor_words"], size=n_dist)]
    words = [words[i] for i in rng.permutation(len(words))]
    spans, pos = [], 0
    for w in words:
        if w == entity:
            spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    prompt = " ".join(words) + f" How many {entity} are there? Answer:"
    return prompt, spans, {"entity": entity, "n_distractors": n_dist, "words": words}


def _gen_character(count: int, rng: np.random.Generator, opt: dict) -> tuple[str, list[Span], dict]:
    letter = str(rng.choice(list(opt["letters"])))
    lo, hi = opt["word_length"]
    length = int(rng.integers(lo, hi + 1))
    others = [c for c in opt["alphabet"] if c != letter]
    chars = [str(c) for c in rng.choice(others, size=length - count)]
    slots = set(rng.choice(length, size=count, replace=False).tolist())
    it = iter(chars)
    word = "".join(letter if i in slots else next(it) for i in range(length))
    head = f"How many times does '{letter}' appear in '"
    spans = [(len(head) + i, len(head) + i + 1) for i in range(length) if word[i] == letter]
    prompt = f"{head}{word}'? Answer:"
    return prompt, spans, {"letter": letter, "word": word}


def _gen_addition(count: int, rng: np.random.Generator, opt: dict) -> tuple[str, None, dict]:
    a = int(rng.integers(0, count + 1)) if opt["allow_zero"] else int(rng.integers(1, count))
    b = count - a
    return f"{a}+{b}=", None, {"a": a, "b": b}


def _gen_list_length(count: int, rng: np.random.Generator, opt: dict) -> tuple[str, list[Span], dict]:
    if opt["fixed_length"] is not None:
        return _gen_list_category(count, rng, opt)
    if opt["repeat"]:  # one item, repeated: the repeated-token counting of arXiv 2605.09239
        items = [str(rng.choice(opt["items"]))] * count
    else:
        items = [str(x) for x in rng.choice(opt["items"], size=count, replace=not opt["distinct"])]
    head = "Items: "
    spans, pos = [], len(head)
    for x in items:
        spans.append((pos, pos + len(x)))
        pos += len(x) + len(opt["delimiter"])
    return head + opt["delimiter"].join(items) + ". Count:", spans, {"items": items}


def _gen_list_category(count: int, rng: np.random.Generator, opt: dict) -> tuple[str, list[Span], dict]:
    """The length-decoupled list: ``fixed_length`` items, ``count`` from ``items`` (the category), the rest from
    ``other_items``, shuffled; spans are those of the category items only."""
    replace = not opt["distinct"]
    n_other = opt["fixed_length"] - count
    target = [str(x) for x in rng.choice(opt["items"], size=count, replace=replace)]
    other = [str(x) for x in rng.choice(opt["other_items"], size=n_other, replace=replace)] if n_other else []
    tagged = [(x, True) for x in target] + [(x, False) for x in other]
    tagged = [tagged[i] for i in rng.permutation(len(tagged))]
    head = "Items: "
    spans, pos = [], len(head)
    for x, is_target in tagged:
        if is_target:
            spans.append((pos, pos + len(x)))
        pos += len(x) + len(opt["delimiter"])
    items = [x for x, _ in tagged]
    prompt = head + opt["delimiter"].join(items) + f". How many {opt['category']} are there? Count:"
    return prompt, spans, {"items": items, "is_target": [t for _, t in tagged], "category": opt["category"]}


_GENERATORS: dict[str, Generator] = {
    "entity": _gen_entity,
    "character": _gen_character,
    "addition": _gen_addition,
    "list_length": _gen_list_length,
}

DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "entity": {"entities": ANIMALS, "distractor_words": OBJECTS, "n_distractors": (0, 4), "total_words": None},
    "character": {"letters": string.ascii_lowercase, "alphabet": string.ascii_lowercase, "word_length": (10, 14)},
    "addition": {"allow_zero": True},
    "list_length": {"items": FRUITS, "distinct": True, "delimiter": ", ", "repeat": False, "other_items": None,
                    "fixed_length": None, "category": None},
}
# Options added for the length-decoupled variants: left out of ``TaskSet.params`` while at their default (None), so
# the params (and probe cards) of the plain tasks are what they were before these options existed.
_DECOUPLING_OPTIONS = ("total_words", "other_items", "fixed_length", "category")

# The options of each task's length-decoupled variant (results audit D1); see :func:`decoupled_task`.
DECOUPLED_OPTIONS: dict[str, dict[str, Any]] = {
    "entity": {"total_words": 12},
    "character": {"word_length": (12, 12)},
    "addition": {},  # decoupled by the split: split_groups(..., decoupled=True)
    "list_length": {"fixed_length": 10, "other_items": ANIMALS, "category": "fruits"},
}


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"option {name}={value!r} is not allowed: {name} must be an int >= {minimum} (or None)")
    return int(value)


def _check_options(task: str, counts: list[int], options: dict) -> dict:
    allowed = {**DEFAULT_OPTIONS[task], "answer_prefix": DEFAULT_ANSWER_PREFIX[task], "unique": False}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for task {task!r}; allowed options: {sorted(allowed)}")
    opt = {**allowed, **options}
    opt["answer_prefix"] = _check_prefix(opt["answer_prefix"])
    opt["unique"] = _check_bool("unique", opt["unique"])
    if task == "entity":
        opt["entities"] = _check_words("entities", opt["entities"])
        opt["distractor_words"] = _check_words("distractor_words", opt["distractor_words"])
        clash = sorted(set(opt["entities"]) & set(opt["distractor_words"]))
        if clash:
            raise ValueError(f"options entities and distractor_words share {clash}; a distractor must never be an "
                             "entity, or the count would be wrong")
        if opt["total_words"] is None:
            opt["n_distractors"] = check_range("option n_distractors", opt["n_distractors"], 0, single=True)
        else:
            if options.get("n_distractors") is not None:
                raise ValueError(f"options total_words={opt['total_words']!r} and n_distractors="
                                 f"{options['n_distractors']!r} contradict each other: total_words fixes the number "
                                 "of distractors (total_words - count); give one of them")
            opt["total_words"] = _check_int("total_words", opt["total_words"], 1)
            if opt["total_words"] < max(counts):
                raise ValueError(f"option total_words={opt['total_words']} is too small: it must be >= the largest "
                                 f"count {max(counts)} (total_words - count distractors are added)")
            opt["n_distractors"] = None  # unused: recorded as None in params
    elif task == "character":
        for name in ("letters", "alphabet"):
            v = opt[name]
            if not isinstance(v, str) or not v or len(set(v)) != len(v) or not all(c.isalpha() for c in v):
                raise ValueError(f"option {name} must be a string of distinct letters, got {v!r}")
        if not set(opt["letters"]) <= set(opt["alphabet"]):
            raise ValueError(f"option letters {opt['letters']!r} must be a subset of alphabet {opt['alphabet']!r}")
        if len(opt["alphabet"]) < 2:
            raise ValueError(f"option alphabet {opt['alphabet']!r} needs at least 2 letters (the target and others)")
        lo, hi = opt["word_length"] = check_range("option word_length", opt["word_length"], 1, single=True)
        if lo < max(counts):
            raise ValueError(f"option word_length={opt['word_length']} is too short: the minimum length must be >= the "
                             f"largest count {max(counts)}")
    elif task == "addition":
        opt["allow_zero"] = _check_bool("allow_zero", opt["allow_zero"])
        if not opt["allow_zero"] and 1 in counts:
            raise ValueError("count 1 is impossible with allow_zero=False (a, b >= 1 gives a+b >= 2); "
                             "drop 1 from counts or allow zero operands")
    elif task == "list_length":
        opt["items"] = _check_words("items", opt["items"])
        opt["distinct"] = _check_bool("distinct", opt["distinct"])
        opt["repeat"] = _check_bool("repeat", opt["repeat"])
        if opt["repeat"] and opt["distinct"]:
            raise ValueError("options repeat=True (one item repeated) and distinct=True (no item twice) contradict "
                             "each other; give distinct=False with repeat=True")
        if not isinstance(opt["delimiter"], str) or not opt["delimiter"]:
            raise ValueError(f"option delimiter must be a non-empty string (e.g. ', ', ' ', '\\n'), got "
                             f"{opt['delimiter']!r}")
        if opt["distinct"] and not opt["repeat"] and len(opt["items"]) < max(counts):
            raise ValueError(f"option items has {len(opt['items'])} words but distinct lists of up to {max(counts)} "
                             "items are requested; give more items or distinct=False")
        _check_list_category(counts, opt)
    return opt


def _check_list_category(counts: list[int], opt: dict) -> None:
    """The length-decoupled list_length options: fixed_length, other_items and category come together."""
    given = [k for k in ("fixed_length", "other_items", "category") if opt[k] is not None]
    if not given:
        return
    if opt["fixed_length"] is None:
        raise ValueError(f"option(s) {given} need fixed_length (the number of items in every list); "
                         f"got fixed_length=None with {', '.join(f'{k}={opt[k]!r}' for k in given)}")
    fixed = opt["fixed_length"] = _check_int("fixed_length", opt["fixed_length"], 1)
    if fixed < max(counts):
        raise ValueError(f"option fixed_length={fixed} is too small: it must be >= the largest count {max(counts)}")
    if opt["repeat"]:
        raise ValueError(f"option fixed_length={fixed} cannot be combined with repeat=True; give repeat=False")
    if opt["other_items"] is None:
        raise ValueError(f"option fixed_length={fixed} needs other_items (the words that fill the list besides the "
                         "counted category), e.g. ANIMALS")
    opt["other_items"] = _check_words("other_items", opt["other_items"])
    clash = sorted(set(opt["items"]) & set(opt["other_items"]))
    if clash:
        raise ValueError(f"options items and other_items share {clash}; they must be disjoint, or the count "
                         "would be wrong")
    cat = opt["category"]
    if not isinstance(cat, str) or not cat.strip() or cat != cat.strip():
        raise ValueError(f"option category={cat!r} is not allowed: give the plural name of the counted items, "
                         "e.g. 'fruits'")
    if opt["distinct"]:
        need = fixed - min(counts)
        if len(opt["other_items"]) < need:
            raise ValueError(f"option other_items has {len(opt['other_items'])} words but distinct lists of "
                             f"fixed_length={fixed} need up to {need} of them (for count {min(counts)}); give more "
                             "other_items or distinct=False")


def balanced_counts(n: int, counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """``n`` counts, each of ``counts`` equally often (the n % k extra ones drawn without repeats), shuffled."""
    counts = np.asarray(counts, dtype=np.int64)
    k = len(counts)
    out = np.concatenate([np.repeat(counts, n // k), rng.choice(counts, size=n % k, replace=False)])
    return out[rng.permutation(n)]


def make_task(
    name: str,
    n: int,
    *,
    seed: int,
    counts: Iterable[int] = ALL_COUNTS,
    **options: Any,
) -> TaskSet:
    """Generate ``n`` prompts of counting task ``name`` (one of :data:`TASKS`), counts balanced over ``counts``.

    Options (all tasks): ``answer_prefix`` (str prepended to the digit; per-task defaults in
    :data:`DEFAULT_ANSWER_PREFIX`), ``unique`` (redraw until every prompt is distinct; raises when the task has too
    few distinct prompts for a count). Per task (defaults in :data:`DEFAULT_OPTIONS`):

    - entity: ``entities`` (words to count), ``distractor_words``, ``n_distractors`` (int or inclusive (min, max),
      default (0, 4)), ``total_words`` (int >= max(counts) or None: ``total_words - count`` distractors, so every
      prompt has the same number of words before the question; excludes ``n_distractors``).
    - character: ``letters`` (letters to ask about), ``alphabet`` (letters the string is made of),
      ``word_length`` (int or inclusive (min, max); min >= max(counts)).
    - addition: ``allow_zero`` (operands may be 0; default True).
    - list_length: ``items`` (words to list), ``distinct`` (no repeated item within a list; default True),
      ``delimiter`` (between items; default ``", "``), ``repeat`` (one item drawn per prompt and repeated ``count``
      times; needs ``distinct=False``); ``fixed_length`` (int >= max(counts) or None), ``other_items`` (words
      disjoint from ``items``) and ``category`` (plural name of ``items``, e.g. ``"fruits"``), given together: every
      list has ``fixed_length`` items, ``count`` of them from ``items``, and the prompt asks
      ``"... How many {category} are there? Count:"``.

    Every argument is checked before anything is generated; a bad one raises ValueError naming it and what is allowed.
    """
    if name not in _GENERATORS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {list(TASKS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    count_list = _check_counts(counts)
    opt = _check_options(name, count_list, options)

    rng = np.random.default_rng(int(seed))
    targets = balanced_counts(int(n), count_list, rng)
    gen = _GENERATORS[name]
    prompts, spans_all, metas, seen = [], [], [], set()
    for c in targets.tolist():
        for _attempt in range(200):
            prompt, spans, meta = gen(c, rng, opt)
            if not opt["unique"] or prompt not in seen:
                break
        else:
            raise ValueError(f"unique=True: task {name!r} with these options has too few distinct prompts for count "
                             f"{c} to fill n={n}; lower n, drop unique, or widen the options")
        seen.add(prompt)
        prompts.append(prompt)
        spans_all.append(spans)
        metas.append(meta)
    prefix = opt["answer_prefix"]
    params = {
        "task": name,
        "n": int(n),
        "seed": int(seed),
        "counts": count_list,
        "options": jsonable({k: v for k, v in sorted(opt.items())
                             if not (k in _DECOUPLING_OPTIONS and v is None)}),
    }
    return TaskSet(
        task=name,
        prompts=prompts,
        counts=targets.astype(np.int64),
        answers=[f"{prefix}{c}" for c in targets.tolist()],
        answer_prefix=prefix,
        mention_char_spans=None if name == "addition" else spans_all,
        meta=metas,
        params=params,
    )


# -- token positions -------------------------------------------------------------------------------------------
def mention_token_positions(
    tokenizer,
    prompts: Sequence[str],
    spans: Sequence[Sequence[Span]],
    *,
    which: Literal["all", "first", "last"] = "all",
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """Map character spans to token positions of the unpadded tokenised prompt (special tokens included).

    A token belongs to a span when their character ranges overlap (special tokens, with empty offsets, never do).
    which: "all" = every token of every span (sorted, no repeats); "first"/"last" = one token per span, the first or
    last of its tokens (in a causal model the last token of a mention has seen the whole mention). Positions index
    ``tokenizer(prompt, add_special_tokens=...)["input_ids"]``, the tokens :meth:`workbench.Model.encode` feeds
    the model before left padding. Needs a fast tokenizer (offset mappings).
    """
    if which not in ("all", "first", "last"):
        raise ValueError(f"which must be 'all', 'first' or 'last', got {which!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"mention_token_positions needs a fast tokenizer (offset mappings); got "
                         f"{type(tokenizer).__name__}")
    prompts = list(prompts)
    if len(spans) != len(prompts):
        raise ValueError(f"got {len(spans)} span lists for {len(prompts)} prompts; give one list per prompt")
    if not prompts:
        return []
    enc = tokenizer(prompts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    out: list[list[int]] = []
    for i, (prompt, offsets, prompt_spans) in enumerate(zip(prompts, enc["offset_mapping"], spans, strict=True)):
        positions: list[int] = []
        for s, e in prompt_spans:
            if not 0 <= s < e <= len(prompt):
                raise ValueError(f"prompt {i}: span {(s, e)} is outside the prompt of {len(prompt)} characters")
            toks = [t for t, (a, b) in enumerate(offsets) if a < b and a < e and b > s]
            if not toks:
                raise ValueError(f"prompt {i}: span {(s, e)} ({prompt[s:e]!r}) overlaps no token")
            positions += toks if which == "all" else [toks[0] if which == "first" else toks[-1]]
        out.append(sorted(set(positions)) if which == "all" else positions)
    return out


# -- answers as tokens -----------------------------------------------------------------------------------------
def _tokens_of(tokenizer, answer: str, context: str | None) -> list[int]:
    """Token ids of ``answer``: alone, or as the continuation of ``context`` when one is given (the form the model
    would produce); a tokenisation that merges across the boundary returns the ids of the whole joined tail."""
    if context is None:
        return list(tokenizer.encode(answer, add_special_tokens=False))
    ctx = list(tokenizer.encode(context, add_special_tokens=False))
    full = list(tokenizer.encode(context + answer, add_special_tokens=False))
    k = 0
    while k < min(len(ctx), len(full)) and ctx[k] == full[k]:
        k += 1
    return full[k:] if k == len(ctx) else full[k:] + [-1]  # -1 marks "merged with the context"


def _single_token_ids(tokenizer, answers: Sequence[str], context: str | None) -> dict[str, int]:
    ids: dict[str, int] = {}
    bad: list[str] = []
    for a in dict.fromkeys(answers):
        toks = _tokens_of(tokenizer, a, context)
        if len(toks) == 1 and toks[0] >= 0:
            ids[a] = toks[0]
        else:
            real = [t for t in toks if t >= 0]
            pieces = tokenizer.convert_ids_to_tokens(real)
            note = " (merges with the end of the prompt)" if -1 in toks else ""
            bad.append(f"{a!r} -> {len(real)} tokens {pieces}{note}")
    if bad:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        where = f" after the prompt {context[-30:]!r}" if context is not None else ""
        raise ValueError(
            f"answers are not single tokens for tokenizer {name!r}{where}: " + "; ".join(bad)
            + ". Every answer must be one token; try another answer_prefix (choose_answer_prefix finds one)."
        )
    return ids


def check_single_token_answers(tokenizer, taskset_or_answers: TaskSet | Sequence[str]) -> dict[str, int]:
    """Check that every answer is one token; return {answer: token id}.

    A TaskSet checks the nine answers 1..9 in its answer form, tokenised as the continuation of its first prompt
    (so a tokenizer that would merge the answer with the prompt's end is caught too). A list of strings checks
    those strings tokenised alone. Raises ValueError listing each offending answer and its tokens.
    """
    if isinstance(taskset_or_answers, TaskSet):
        return _single_token_ids(tokenizer, taskset_or_answers.answer_strings(), taskset_or_answers.prompts[0])
    if isinstance(taskset_or_answers, str):
        taskset_or_answers = [taskset_or_answers]
    answers = list(taskset_or_answers)
    if not answers or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"answers must be a TaskSet or a non-empty list of non-empty strings, got {answers[:5]!r}")
    return _single_token_ids(tokenizer, answers, None)


def digit_token_ids(tokenizer, answer_prefix: str, *, context: str | None = None) -> list[int]:
    """Token ids of the answers 1..9 written as ``answer_prefix + digit`` (index 0 is the digit 1).

    context: tokenise each answer as the continuation of this prompt (recommended: a prompt of the task) instead
    of alone. Raises ValueError listing the answers that are not one token.
    """
    prefix = _check_prefix(answer_prefix)
    answers = [f"{prefix}{d}" for d in ALL_COUNTS]
    ids = _single_token_ids(tokenizer, answers, context)
    out = [ids[a] for a in answers]
    if len(set(out)) != len(out):
        raise ValueError(f"digit answers {answers} map to repeated token ids {out}; each digit needs its own token")
    return out


def choose_answer_prefix(tokenizer, candidates: Sequence[str] = (" ", ""), *, context: str | None = None) -> str:
    """The first prefix in ``candidates`` with which every digit 1..9 is one token (ValueError if none works)."""
    errors = []
    for prefix in candidates:
        try:
            digit_token_ids(tokenizer, prefix, context=context)
            return prefix
        except ValueError as e:
            errors.append(f"{prefix!r}: {e}")
    raise ValueError(f"no answer prefix among {list(candidates)} gives single-token digits: " + " | ".join(errors))


# -- splits ----------------------------------------------------------------------------------------------------
def _tokenizer_of(tokenizer_or_model):
    """A tokenizer, or the ``tokenizer`` of a model (this layer never imports the model type)."""
    return getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)


def answer_setup(tokenizer, task: str, probe_prompt: str) -> tuple[str, str]:
    """(prompt suffix, answer prefix) giving single-token digit answers for this tokenizer (or a model's).

    Prefer the natural " 7" after "Answer:"; tokenizers that split the space from the digit (SmolLM2, Qwen 2.5 and
    Gemma 3 all do) get the space at the end of the prompt instead, so the next token is the bare digit.
    """
    tok = _tokenizer_of(tokenizer)
    prefix = DEFAULT_ANSWER_PREFIX[task]
    try:
        digit_token_ids(tok, prefix, context=probe_prompt)
        return "", prefix
    except ValueError:
        if prefix:
            digit_token_ids(tok, "", context=probe_prompt + prefix)  # raises with the answers if not
            return prefix, ""
        raise


def answered_task(tokenizer, task: str, n: int, *, seed: int, **options) -> tuple[TaskSet, list[int]]:
    """``n`` prompts of counting ``task`` in the answer set-up the counting studies share (:func:`answer_setup`'s
    suffix appended, so the next token is the answer) and the token ids of the answers 1..9, each checked to be one
    token as the continuation of the first prompt. ``tokenizer``: a tokenizer or a model; ``options`` go to
    :func:`make_task`."""
    tok = _tokenizer_of(tokenizer)
    probe = make_task(task, 1, seed=seed, **options)
    suffix, prefix = answer_setup(tok, task, probe.prompts[0])
    ts = make_task(task, n, seed=seed, answer_prefix=prefix, **options)
    if suffix:
        ts.prompts = [p + suffix for p in ts.prompts]
    return ts, digit_token_ids(tok, prefix, context=ts.prompts[0])


def _check_sizes(sizes, n: int) -> list[int]:
    sizes = list(sizes) if isinstance(sizes, (list, tuple, np.ndarray)) else sizes
    if not isinstance(sizes, list) or not sizes:
        raise ValueError(f"sizes must be a non-empty list of fractions (summing to <= 1) or of ints; got {sizes!r}")
    if all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes):
        if any(s < 0 for s in sizes) or sum(sizes) > n:
            raise ValueError(f"sizes {sizes} must be >= 0 and sum to at most the {n} items available")
        return [int(s) for s in sizes]
    if all(isinstance(s, (float, np.floating)) for s in sizes):
        if any(not 0 <= s <= 1 for s in sizes) or sum(sizes) > 1 + 1e-9:
            raise ValueError(f"fractions {sizes} must each lie in [0, 1] and sum to at most 1")
        raw = [s * n for s in sizes]
        out = [int(np.floor(r)) for r in raw]
        # largest remainders get the leftover items, as long as the fractions sum to 1
        budget = (round(sum(raw)) if abs(sum(sizes) - 1) < 1e-9 else int(np.floor(sum(raw) + 1e-9))) - sum(out)
        for i in sorted(range(len(raw)), key=lambda i: out[i] - raw[i])[: max(budget, 0)]:
            out[i] += 1
        return out
    raise ValueError(f"sizes must be all ints or all floats (fractions); got {sizes!r}")


def _split_mixed_groups(group_list: list[list[int]], order: np.ndarray, target: list[int], n: int) -> list[np.ndarray]:
    """Whole groups in seeded order, each to the split furthest below its size (the last column: unassigned)."""
    cols = target + ([n - sum(target)] if sum(target) < n else [])
    got = [0] * len(cols)
    out: list[list[int]] = [[] for _ in cols]
    for g in order.tolist():
        j = max(range(len(cols)), key=lambda j: (cols[j] - got[j], -j))
        out[j] += group_list[g]
        got[j] += len(group_list[g])
    return [np.array(sorted(o), dtype=np.int64) for o in out[: len(target)]]


def split_indices(
    counts: Sequence[int] | np.ndarray,
    sizes: Sequence[float] | Sequence[int],
    *,
    seed: int,
    groups: Sequence[Any] | None = None,
) -> list[np.ndarray]:
    """Disjoint index sets of the requested sizes, stratified by count, deterministic for a seed.

    sizes: fractions (e.g. ``[0.6, 0.2, 0.2]``) or numbers of items. groups: items with the same group key (e.g. the
    prompt text) always land in the same split, so a repeated prompt can never be both trained on and evaluated;
    with groups, split sizes are met as closely as whole groups allow.
    Stratification: every count class is shared among the splits in proportion to their sizes (rounded so that each
    class and each split total come out exact), so without groups each split holds every count equally often to
    within one item whenever the counts were balanced. Which items go where is a seeded shuffle.
    Groups whose items have different counts (e.g. :func:`split_groups` of addition by first operand) cannot be
    stratified: then whole groups, in seeded order, each go to the split furthest below its size, and the splits'
    count balance is whatever the groups give.
    """
    counts = np.asarray(counts).reshape(-1)
    n = len(counts)
    if n == 0:
        raise ValueError("nothing to split: counts is empty")
    target = _check_sizes(sizes, n)
    rng = np.random.default_rng(seed)
    keys = list(range(n)) if groups is None else list(groups)
    if len(keys) != n:
        raise ValueError(f"groups has {len(keys)} entries for {n} items; give one key per item")
    members: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    group_list = list(members.values())
    order = rng.permutation(len(group_list))
    if any(len({int(counts[i]) for i in g}) > 1 for g in group_list):
        return _split_mixed_groups(group_list, order, target, n)
    classes = sorted({int(counts[g[0]]) for g in group_list})
    by_class = {c: [int(g) for g in order if int(counts[group_list[g][0]]) == c] for c in classes}
    n_c = np.array([sum(len(group_list[g]) for g in by_class[c]) for c in classes])
    cols = target + ([n - sum(target)] if sum(target) < n else [])  # last column: items left unassigned
    # controlled rounding of the quotas n_c * t_j / n: rows sum to n_c, columns to t_j
    quota = n_c[:, None] * np.asarray(cols, dtype=np.float64)[None, :] / n
    alloc = np.floor(quota + 1e-9).astype(np.int64)
    row_left = n_c - alloc.sum(1)
    col_left = np.asarray(cols) - alloc.sum(0)
    frac = quota - alloc
    tie = rng.random(frac.shape)
    for flat in sorted(range(frac.size), key=lambda f: (-frac.flat[f], tie.flat[f])):
        ci, j = divmod(flat, len(cols))
        if row_left[ci] > 0 and col_left[j] > 0:
            alloc[ci, j] += 1
            row_left[ci] -= 1
            col_left[j] -= 1
    for ci in range(len(classes)):  # whatever rounding left over (rare): largest remaining column deficit first
        while row_left[ci] > 0:
            j = int(np.argmax(col_left))
            alloc[ci, j] += 1
            row_left[ci] -= 1
            col_left[j] -= 1
    out: list[list[int]] = [[] for _ in cols]
    for ci, c in enumerate(classes):
        j, taken = 0, 0
        for g in by_class[c]:
            while j < len(cols) - 1 and taken >= alloc[ci, j]:
                j, taken = j + 1, taken - alloc[ci, j]
            out[j] += group_list[g]
            taken += len(group_list[g])
    return [np.array(sorted(o), dtype=np.int64) for o in out[: len(target)]]


def split(
    taskset: TaskSet,
    sizes: Sequence[float] | Sequence[int],
    *,
    seed: int,
    group_identical: bool = True,
) -> list[TaskSet]:
    """Disjoint TaskSets (e.g. train/val/test) of the requested fractions or sizes, stratified by count.

    group_identical: identical prompt strings always go to the same split (default), so no evaluation prompt is
    ever seen in training; this matters for addition, which has only 54 distinct prompts.
    """
    if not isinstance(taskset, TaskSet):
        raise ValueError(f"split takes a TaskSet, got {type(taskset).__name__}")
    groups = taskset.prompts if group_identical else None
    return [taskset.subset(idx) for idx in split_indices(taskset.counts, sizes, seed=seed, groups=groups)]


# -- length-decoupled variants and their nuisances (results audit D1) ------------------------------------------
def decoupled_task(name: str, n: int, *, seed: int, **options: Any) -> TaskSet:
    """``n`` prompts of the length-decoupled variant of counting task ``name``: :func:`make_task` with
    :data:`DECOUPLED_OPTIONS` ``[name]``; ``options`` are passed on and override those (``counts=`` included).

    For addition the prompts are the plain ones: its decoupling is the split (:func:`split_groups` with
    ``decoupled=True``).
    """
    if name not in DECOUPLED_OPTIONS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {list(TASKS)}")
    return make_task(name, n, seed=seed, **{**DECOUPLED_OPTIONS[name], **options})


def _addition_operands(taskset: TaskSet) -> tuple[list[int], list[int]]:
    """The operands of each addition prompt: from ``meta`` (``a``, ``b``), else parsed from ``"{a}+{b}="``."""
    a_list, b_list = [], []
    for i, (prompt, meta) in enumerate(zip(taskset.prompts, taskset.meta, strict=True)):
        if isinstance(meta, dict) and "a" in meta and "b" in meta:
            a, b = int(meta["a"]), int(meta["b"])
        else:
            head = prompt.split("=", 1)[0].strip()
            parts = head.split("+")
            if "=" not in prompt or len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
                raise ValueError(f"addition prompt {i} ({prompt!r}) has no operands in its meta and does not "
                                 "read as '{a}+{b}='")
            a, b = int(parts[0]), int(parts[1])
        a_list.append(a)
        b_list.append(b)
    return a_list, b_list


def split_groups(taskset: TaskSet, task: str, *, decoupled: bool = False) -> list:
    """Group keys for :func:`split_indices` (``groups=``): items with one key never straddle two splits.

    Normally the prompt string (identical prompts stay together, as :func:`split` does). For ``addition`` with
    ``decoupled=True`` the first operand ``a`` ("addition split by operands"): no held-out prompt shares its first
    operand with a training prompt, so a probe cannot pass by reading the operand it saw with that sum. There are
    only 10 such groups (a = 0..9) and a group spans several counts (a=7 only reaches 7..9), so the splits'
    sizes and count balance follow the groups only roughly; count the distinct held-out units when you report.
    For the other tasks ``decoupled`` changes nothing (their decoupling is in the prompts, :func:`decoupled_task`).
    """
    if not isinstance(taskset, TaskSet):
        raise ValueError(f"split_groups takes a TaskSet, got {type(taskset).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {list(TASKS)}")
    if task != taskset.task:
        raise ValueError(f"task={task!r} but the TaskSet holds {taskset.task!r} prompts")
    _check_bool("decoupled", decoupled)
    if task == "addition" and decoupled:
        return list(_addition_operands(taskset)[0])
    return list(taskset.prompts)


def nuisance_frame(taskset: TaskSet, tokenizer=None) -> pd.DataFrame:
    """Per prompt, the surface quantities that a count probe must beat (one row per prompt, in order).

    Columns: ``n_words`` (whitespace-separated words of the whole prompt, question included), ``n_chars``
    (characters of the prompt), ``n_tokens`` (only when ``tokenizer`` - a tokenizer or a model with one - is given:
    ``len(tokenizer(prompt, add_special_tokens=False)["input_ids"])``, i.e. without BOS or other special tokens; a
    model that prepends BOS sees one more, the same for every prompt) and, for addition, ``operand_a`` and
    ``operand_b`` (from the per-prompt ``meta``, else parsed from the prompt). The count itself is not a column.

    These are the nuisances of results audit D1: in the plain ``list_length`` task the count equals the word count,
    in ``entity`` the word count explains most of it, so a probe's R² means "knows the count" only where it beats a
    regression on these columns and survives their removal (``workbench.methods.probes.controls``). For addition,
    ``operand_a + operand_b`` *is* the count: pass at most one operand as a nuisance.
    """
    if not isinstance(taskset, TaskSet):
        raise ValueError(f"nuisance_frame takes a TaskSet, got {type(taskset).__name__}")
    prompts = list(taskset.prompts)
    frame = pd.DataFrame({
        "n_words": np.array([len(p.split()) for p in prompts], dtype=np.int64),
        "n_chars": np.array([len(p) for p in prompts], dtype=np.int64),
    })
    if tokenizer is not None:
        tok = _tokenizer_of(tokenizer)
        ids = tok(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        frame["n_tokens"] = np.array([len(x) for x in ids], dtype=np.int64)
    if taskset.task == "addition":
        a, b = _addition_operands(taskset)
        frame["operand_a"] = np.array(a, dtype=np.int64)
        frame["operand_b"] = np.array(b, dtype=np.int64)
    return frame
