"""Length-decoupled task variants (results audit D1): the count no longer follows the prompt length; addition is
split by first operand; nuisance_frame lists the lengths a count probe must beat; bad options name the value."""

import re
from collections import Counter

import numpy as np
import pytest

from workbench.data.tasks import (
    ANIMALS,
    DECOUPLED_OPTIONS,
    FRUITS,
    OBJECTS,
    TASKS,
    answered_task,
    decoupled_task,
    make_task,
    nuisance_frame,
    split,
    split_groups,
    split_indices,
)
from workbench.testing.tiny import byte_tokenizer


def test_decoupled_options_cover_every_task():
    assert set(DECOUPLED_OPTIONS) == set(TASKS)
    assert DECOUPLED_OPTIONS["addition"] == {}
    for name in TASKS:
        a, b = decoupled_task(name, 27, seed=4), decoupled_task(name, 27, seed=4)
        assert a.prompts == b.prompts and a.task == name
        assert sorted(Counter(a.counts.tolist()).values()) == [3] * 9


def test_entity_decoupled_has_constant_word_count():
    ts = decoupled_task("entity", 180, seed=0)
    assert Counter(ts.counts.tolist()) == {c: 20 for c in range(1, 10)}
    frame = nuisance_frame(ts)
    assert frame["n_words"].nunique() == 1 and frame["n_words"].iloc[0] == 12 + 6
    for prompt, c, meta, spans in zip(ts.prompts, ts.counts, ts.meta, ts.mention_char_spans, strict=True):
        m = re.fullmatch(r"(.+) How many (\w+) are there\? Answer:", prompt)
        words = m.group(1).split(" ")
        assert len(words) == 12 and words.count(m.group(2)) == c
        assert meta["n_distractors"] == 12 - c and len(spans) == c
        assert all(prompt[s:e] == m.group(2) for s, e in spans)
    assert ts.params["options"]["total_words"] == 12
    # the params regenerate the set
    again = make_task("entity", 180, seed=0, counts=ts.params["counts"], **ts.params["options"])
    assert again.prompts == ts.prompts
    # plain entity prompts: unchanged options, varying length
    plain = make_task("entity", 90, seed=0)
    assert "total_words" not in plain.params["options"]
    assert nuisance_frame(plain)["n_words"].nunique() > 1


def test_list_length_decoupled_has_constant_item_count_and_right_category_counts():
    ts = decoupled_task("list_length", 180, seed=1)
    fixed = DECOUPLED_OPTIONS["list_length"]["fixed_length"]
    assert fixed in (9, 10) and Counter(ts.counts.tolist()) == {c: 20 for c in range(1, 10)}
    assert nuisance_frame(ts)["n_words"].nunique() == 1
    for prompt, c, meta, spans in zip(ts.prompts, ts.counts, ts.meta, ts.mention_char_spans, strict=True):
        m = re.fullmatch(r"Items: (.+)\. How many fruits are there\? Count:", prompt)
        items = m.group(1).split(", ")
        assert len(items) == fixed and len(set(items)) == fixed  # distinct by default
        assert sum(x in FRUITS for x in items) == c
        assert all(x in FRUITS or x in ANIMALS for x in items)
        assert [prompt[s:e] for s, e in spans] == [x for x in items if x in FRUITS]
        assert meta["is_target"] == [x in FRUITS for x in items]
    # the answer form is the plain task's (" 3" after "Count:"), and the answer set-up still works
    assert ts.answer_prefix == " " and ts.answers[0] == f" {ts.counts[0]}"
    ats, ids = answered_task(byte_tokenizer(), "list_length", 18, seed=0, **DECOUPLED_OPTIONS["list_length"])
    assert len(ids) == 9 and all("How many fruits" in p for p in ats.prompts)
    # the plain task is untouched
    plain = make_task("list_length", 9, seed=0)
    assert all(re.fullmatch(r"Items: .+\. Count:", p) for p in plain.prompts)
    assert "fixed_length" not in plain.params["options"]
    # non-distinct lists may repeat items
    nd = make_task("list_length", 45, seed=2, fixed_length=9, other_items=OBJECTS, category="fruits", distinct=False)
    assert all(len(m["items"]) == 9 for m in nd.meta)


def test_character_decoupled_has_constant_length():
    ts = decoupled_task("character", 90, seed=2)
    words = [m["word"] for m in ts.meta]
    assert {len(w) for w in words} == {12}
    assert all(w.count(m["letter"]) == c for w, m, c in zip(words, ts.meta, ts.counts, strict=True))
    assert nuisance_frame(ts)["n_chars"].nunique() == 1


def test_options_override_the_decoupled_ones():
    ts = decoupled_task("entity", 18, seed=0, total_words=15, counts=range(1, 7))
    assert {len(p.split()) for p in ts.prompts} == {15 + 6} and set(ts.counts.tolist()) == set(range(1, 7))


def test_split_groups_addition_by_first_operand():
    ts = decoupled_task("addition", 300, seed=0)
    groups = split_groups(ts, "addition", decoupled=True)
    assert groups == [m["a"] for m in ts.meta]
    for seed in range(5):
        tr, va, te = split_indices(ts.counts, [0.6, 0.2, 0.2], seed=seed, groups=groups)
        a = np.array(groups)
        assert not set(a[tr]) & set(a[te]) and not set(a[tr]) & set(a[va]) and not set(a[va]) & set(a[te])
        assert len(tr) and len(te) and len(tr) + len(va) + len(te) == 300
    # normally (and for the other tasks) the prompt string
    assert split_groups(ts, "addition") == ts.prompts
    ent = decoupled_task("entity", 20, seed=0)
    assert split_groups(ent, "entity", decoupled=True) == ent.prompts
    with pytest.raises(ValueError, match="'entity'"):
        split_groups(ts, "entity")
    with pytest.raises(ValueError, match="'counting'"):
        split_groups(ts, "counting")


def test_nuisance_frame_columns():
    tok = byte_tokenizer()
    ts = make_task("entity", 20, seed=0)
    frame = nuisance_frame(ts, tok)
    assert list(frame.columns) == ["n_words", "n_chars", "n_tokens"] and len(frame) == 20
    assert frame["n_words"].tolist() == [len(p.split()) for p in ts.prompts]
    assert frame["n_chars"].tolist() == [len(p) for p in ts.prompts]
    assert frame["n_tokens"].tolist() == [len(tok(p, add_special_tokens=False)["input_ids"]) for p in ts.prompts]
    assert list(nuisance_frame(ts).columns) == ["n_words", "n_chars"]
    add = make_task("addition", 30, seed=1)
    af = nuisance_frame(add)
    assert list(af.columns) == ["n_words", "n_chars", "operand_a", "operand_b"]
    assert (af["operand_a"] + af["operand_b"]).tolist() == add.counts.tolist()
    # operands parsed from the prompt when the meta lacks them (e.g. a subset rebuilt by hand)
    add.meta = [{} for _ in add.meta]
    assert nuisance_frame(add)["operand_a"].tolist() == af["operand_a"].tolist()
    # through split, the groups still keep apart
    tr, te = split(decoupled_task("list_length", 36, seed=0), [0.5, 0.5], seed=0)
    assert not set(tr.prompts) & set(te.prompts)


@pytest.mark.parametrize(("name", "options", "pattern"), [
    ("entity", {"total_words": 5}, r"total_words=5 is too small"),
    ("entity", {"total_words": 0}, r"total_words=0"),
    ("entity", {"total_words": "12"}, r"total_words='12'"),
    ("entity", {"total_words": 12, "n_distractors": 3}, r"total_words=12 and n_distractors=3"),
    ("list_length", {"fixed_length": 7, "other_items": ANIMALS, "category": "fruits"}, r"fixed_length=7 is too small"),
    ("list_length", {"fixed_length": 10, "category": "fruits"}, r"fixed_length=10 needs other_items"),
    ("list_length", {"other_items": ANIMALS, "category": "fruits"}, r"need fixed_length"),
    ("list_length", {"fixed_length": 10, "other_items": ("cat", "apple"), "category": "fruits"}, r"\['apple'\]"),
    ("list_length", {"fixed_length": 10, "other_items": ("cat", "dog"), "category": "fruits"},
     r"other_items has 2 words"),
    ("list_length", {"fixed_length": 10, "other_items": ANIMALS}, r"category=None"),
    ("list_length", {"fixed_length": 10, "other_items": ANIMALS, "category": " fruits"}, r"category=' fruits'"),
    ("list_length", {"fixed_length": 10, "other_items": ANIMALS, "category": "fruits", "repeat": True,
                     "distinct": False}, r"fixed_length=10 cannot be combined with repeat=True"),
    ("character", {"word_length": (5, 12)}, r"word_length=\(5, 12\)"),
])
def test_bad_options_name_the_value(name, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_task(name, 9, seed=0, **options)


def test_decoupled_task_bad_options():
    with pytest.raises(ValueError, match=r"total_words=5 is too small"):
        decoupled_task("entity", 9, seed=0, total_words=5)
    with pytest.raises(ValueError, match=r"fixed_length=8 is too small"):
        decoupled_task("list_length", 9, seed=0, fixed_length=8)
    with pytest.raises(ValueError, match=r"\['apple'\]"):
        decoupled_task("list_length", 9, seed=0, other_items=("apple", *ANIMALS))


def test_decoupled_task_unknown_name():
    with pytest.raises(ValueError, match="unknown task 'counting'"):
        decoupled_task("counting", 9, seed=0)
