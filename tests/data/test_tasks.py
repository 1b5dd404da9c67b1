"""Counting tasks: deterministic, balanced, the count in each prompt is the true count, spans and token positions
point at the counted items, answers are single tokens (or the check says which are not), splits are disjoint."""

import re
from collections import Counter

import numpy as np
import pytest

from workbench.data.tasks import (
    TASKS,
    TaskSet,
    check_single_token_answers,
    choose_answer_prefix,
    digit_token_ids,
    make_task,
    mention_token_positions,
    split,
    split_indices,
)
from workbench.testing.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def word_tok():
    """A word-level fast tokenizer (one token per word/punctuation, BOS prepended): multi-character tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from workbench.data.tasks import ANIMALS, OBJECTS

    words = ["<unk>", "<bos>", "How", "many", "are", "there", "?", "Answer", ":", *ANIMALS, *OBJECTS]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>")


def parse_count(task: str, prompt: str) -> int:
    """Count the counted items by reading the prompt text (independently of the generator)."""
    if task == "entity":
        m = re.fullmatch(r"(.+) How many (\w+) are there\? Answer:", prompt)
        return m.group(1).split(" ").count(m.group(2))
    if task == "character":
        m = re.fullmatch(r"How many times does '(\w)' appear in '(\w+)'\? Answer:", prompt)
        return m.group(2).count(m.group(1))
    if task == "addition":
        m = re.fullmatch(r"(\d)\+(\d)=", prompt)
        return int(m.group(1)) + int(m.group(2))
    m = re.fullmatch(r"Items: (.+)\. Count:", prompt)
    return len(m.group(1).split(", "))


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_balanced_and_counts_true(task):
    a = make_task(task, 95, seed=3)
    b = make_task(task, 95, seed=3)
    c = make_task(task, 95, seed=4)
    assert a.prompts == b.prompts and np.array_equal(a.counts, b.counts)
    assert a.prompts != c.prompts
    hist = Counter(a.counts.tolist())
    assert sorted(hist) == list(range(1, 10)) and max(hist.values()) - min(hist.values()) <= 1
    assert sorted(make_task(task, 90, seed=0).counts.tolist()) == sorted(list(range(1, 10)) * 10)
    assert a.counts[:20].tolist() != sorted(a.counts[:20].tolist())  # shuffled
    for prompt, count, answer in zip(a.prompts, a.counts, a.answers):
        assert parse_count(task, prompt) == count
        assert answer == a.answer_prefix + str(count)
    assert a.answer_prefix == ("" if task == "addition" else " ")
    assert a.params["seed"] == 3 and a.params["task"] == task


def test_task_specific_properties():
    ent = make_task("entity", 200, seed=1)
    for p, c, m in zip(ent.prompts, ent.counts, ent.meta):
        words = p.split(" How many ")[0].split(" ")
        assert 0 <= len(words) - c <= 4
        assert m["entity"] not in set(words) - {m["entity"]} and words.count(m["entity"]) == c
    assert {m["n_distractors"] for m in ent.meta} == {0, 1, 2, 3, 4}
    fixed = make_task("entity", 20, seed=1, n_distractors=2, entities=["owl"])
    assert all(m["n_distractors"] == 2 and m["entity"] == "owl" for m in fixed.meta)
    ch = make_task("character", 100, seed=1, word_length=(9, 11))
    assert {len(m["word"]) for m in ch.meta} <= {9, 10, 11}
    lst = make_task("list_length", 100, seed=1)
    assert all(len(set(m["items"])) == len(m["items"]) for m in lst.meta)
    add = make_task("addition", 200, seed=1, allow_zero=False, counts=range(2, 10))
    assert all(m["a"] >= 1 and m["b"] >= 1 for m in add.meta)
    assert set(add.counts.tolist()) == set(range(2, 10))
    uniq = make_task("entity", 100, seed=2, unique=True)
    assert len(set(uniq.prompts)) == 100


@pytest.mark.parametrize("task", ["entity", "character", "list_length"])
def test_spans_cover_the_counted_items(task):
    ts = make_task(task, 40, seed=5)
    for p, spans, c, m in zip(ts.prompts, ts.mention_char_spans, ts.counts, ts.meta):
        assert len(spans) == c
        texts = [p[s:e] for s, e in spans]
        if task == "entity":
            assert texts == [m["entity"]] * c
        elif task == "character":
            assert texts == [m["letter"]] * c
        else:
            assert texts == m["items"]
    assert make_task("addition", 5, seed=0).mention_char_spans is None


def test_mention_token_positions_byte_tokenizer(tok):
    ts = make_task("entity", 30, seed=7)
    all_pos = ts.mention_token_positions(tok)
    last = ts.mention_token_positions(tok, which="last")
    first = ts.mention_token_positions(tok, which="first")
    for i, (p, c, m) in enumerate(zip(ts.prompts, ts.counts, ts.meta)):
        ids = tok(p)["input_ids"]  # what Model.encode feeds, unpadded: <bos> first
        assert ids[0] == tok.bos_token_id
        ent = m["entity"]
        assert len(all_pos[i]) == c * len(ent)
        assert tok.decode([ids[j] for j in all_pos[i]]) == ent * c
        assert len(last[i]) == len(first[i]) == c
        assert all(tok.decode([ids[j]]) == ent[-1] for j in last[i])
        assert all(tok.decode([ids[j]]) == ent[0] for j in first[i])
        # the question's mention of the entity is not counted
        assert max(all_pos[i]) < len(tok(p.split(" How many ")[0])["input_ids"])


def test_mention_token_positions_multichar_tokens(word_tok):
    ts = make_task("entity", 30, seed=8)
    pos = ts.mention_token_positions(word_tok)
    for i, (p, c, m) in enumerate(zip(ts.prompts, ts.counts, ts.meta)):
        ids = word_tok(p)["input_ids"]
        assert word_tok.unk_token_id not in ids
        assert len(pos[i]) == c
        assert [word_tok.convert_ids_to_tokens(ids[j]) for j in pos[i]] == [m["entity"]] * c


def test_mention_positions_need_spans_and_matching_lengths(tok):
    with pytest.raises(ValueError, match="no counted-item spans"):
        make_task("addition", 3, seed=0).mention_token_positions(tok)
    with pytest.raises(ValueError, match="span lists"):
        mention_token_positions(tok, ["ab"], [])
    with pytest.raises(ValueError, match="which"):
        mention_token_positions(tok, ["ab"], [[(0, 1)]], which="middle")
    with pytest.raises(ValueError, match="outside the prompt"):
        mention_token_positions(tok, ["ab"], [[(1, 5)]])


def test_single_token_answers(tok):
    ids = digit_token_ids(tok, "")
    assert ids == [ord(str(d)) for d in range(1, 10)]
    ts = make_task("list_length", 18, seed=0, answer_prefix="")
    assert check_single_token_answers(tok, ts) == {str(d): ord(str(d)) for d in range(1, 10)}
    assert check_single_token_answers(tok, ["3", "7"]) == {"3": ord("3"), "7": ord("7")}
    assert digit_token_ids(tok, "", context=ts.prompts[0]) == ids
    assert choose_answer_prefix(tok) == ""

    with pytest.raises(ValueError) as err:
        check_single_token_answers(tok, make_task("entity", 18, seed=0))  # default prefix " "
    msg = str(err.value)
    for d in range(1, 10):
        assert f"' {d}' -> 2 tokens" in msg
    with pytest.raises(ValueError, match=r"'10' -> 2 tokens"):
        check_single_token_answers(tok, ["1", "10"])
    with pytest.raises(ValueError, match="' 1'"):
        digit_token_ids(tok, " ")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="entities", n=5), r"unknown task 'entities'.*'entity', 'character', 'addition', 'list_length'"),
        (dict(name="entity", n=0), "n must be an int >= 1, got 0"),
        (dict(name="entity", n=2.5), "n must be an int"),
        (dict(name="entity", n=5, counts=[0, 1]), r"counts \[0\] are not allowed"),
        (dict(name="entity", n=5, counts=[3, 10]), r"counts \[10\] are not allowed"),
        (dict(name="entity", n=5, counts=[]), "counts is empty"),
        (dict(name="entity", n=5, counts=[2, 2]), "duplicates"),
        (dict(name="entity", n=5, colour="red"), r"unknown option\(s\) \['colour'\].*allowed options"),
        (dict(name="entity", n=5, n_distractors=(3, 1)), r"n_distractors=\(3, 1\)"),
        (dict(name="entity", n=5, n_distractors=-1), "n_distractors=-1"),
        (dict(name="entity", n=5, distractor_words=["cat", "rock"]), r"share \['cat'\]"),
        (dict(name="entity", n=5, entities=["two words"]), "without spaces"),
        (dict(name="character", n=5, word_length=(4, 6)), "too short"),
        (dict(name="character", n=5, letters="ab1"), "distinct letters"),
        (dict(name="addition", n=5, allow_zero=False), "count 1 is impossible"),
        (dict(name="addition", n=5, allow_zero="no"), "allow_zero must be True or False"),
        (dict(name="list_length", n=5, items=["a", "b"]), "give more items"),
        (dict(name="list_length", n=5, answer_prefix="ab"), "answer_prefix"),
        (dict(name="addition", n=100, unique=True), "too few distinct prompts"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    name, n = kwargs.pop("name"), kwargs.pop("n")
    with pytest.raises(ValueError, match=match):
        make_task(name, n, seed=0, **kwargs)


def test_bad_seed_raises():
    with pytest.raises(ValueError, match="seed"):
        make_task("entity", 5, seed=-1)


def test_split_disjoint_balanced_deterministic():
    ts = make_task("entity", 300, seed=0, unique=True)
    parts = split(ts, [0.6, 0.2, 0.2], seed=1)
    assert [len(p) for p in parts] == [180, 60, 60]
    idx = [set(p.index.tolist()) for p in parts]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set().union(*idx) == set(range(300))
    for p in parts:
        assert isinstance(p, TaskSet)
        hist = Counter(p.counts.tolist())
        assert max(hist.values()) - min(hist.values()) <= 1, hist
        for j, i in enumerate(p.index):
            assert p.prompts[j] == ts.prompts[i] and p.counts[j] == ts.counts[i]
    again = split(ts, [0.6, 0.2, 0.2], seed=1)
    assert all(np.array_equal(a.index, b.index) for a, b in zip(parts, again))
    assert [len(p) for p in split(ts, [100, 50], seed=0)] == [100, 50]


def test_split_keeps_identical_prompts_together():
    ts = make_task("addition", 400, seed=0)  # only 54 distinct prompts: many repeats
    train, test = split(ts, [0.75, 0.25], seed=0)
    assert not set(train.prompts) & set(test.prompts)
    assert len(train) + len(test) == 400
    with pytest.raises(ValueError, match="sum to at most"):
        split_indices(ts.counts, [0.8, 0.4], seed=0)
    with pytest.raises(ValueError, match="sum to at most"):
        split_indices(ts.counts, [300, 200], seed=0)
    with pytest.raises(ValueError, match="all ints or all floats"):
        split_indices(ts.counts, [0.5, 100], seed=0)
