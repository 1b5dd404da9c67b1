"""IOI prompt pairs (workbench.data.ioi): templates, the two corruptions, single-token names and role positions,
with SmolLM2's own tokenizer (the tiny registered model's: no weights needed)."""

import pytest
from transformers import AutoTokenizer

from workbench.data.ioi import (
    CORRUPTIONS,
    NAMES,
    ROLES,
    TEMPLATES,
    check_single_token_names,
    corrupted,
    make_ioi_pairs,
    role_positions,
    single_token_names,
)


@pytest.fixture(scope="module")
def tok():
    from workbench.testbed.tiny import ensure_tiny_lm

    return AutoTokenizer.from_pretrained(ensure_tiny_lm())


@pytest.fixture(scope="module")
def pairs(tok):
    return make_ioi_pairs(tokenizer=tok)


def _ids(tok, text):
    return tok(text)["input_ids"]


def _words(text):
    return text.replace(",", " ").replace(".", " ").split()


def test_default_is_at_least_64_pairs_over_at_least_4_templates(pairs):
    assert len(pairs) >= 64 and len(TEMPLATES) >= 4
    assert pairs["template"].nunique() >= 4
    assert pairs["template"].value_counts().min() >= len(pairs) // len(TEMPLATES)  # templates are cycled
    skeletons = {t.split("{S}")[0].split("{B}")[0] for t in TEMPLATES}  # distinct sentence frames
    assert len(skeletons) >= 4
    assert pairs["place"].nunique() > 1 and pairs["obj"].nunique() > 1
    assert pairs["clean"].nunique() == len(pairs)


def test_the_name_swap_flips_the_second_subject_mention(pairs):
    for r in pairs.itertuples():
        assert r.answer == " " + r.io and r.wrong == " " + r.s and r.io != r.s
        clean, corrupt = _words(r.clean), _words(r.corrupt)
        assert clean.count(r.s) == 2 and clean.count(r.io) == 1
        assert corrupt.count(r.io) == 2 and corrupt.count(r.s) == 1
        s2 = len(clean) - 1 - clean[::-1].index(r.s)
        assert clean[:s2] == corrupt[:s2] and corrupt[s2] == r.io and clean[s2 + 1:] == corrupt[s2 + 1:]


def test_the_abc_corruption_uses_fresh_names(pairs):
    for r in pairs.itertuples():
        assert len({r.io, r.s, r.c, r.d}) == 4
        clean, abc = _words(r.clean), _words(r.corrupt_abc)
        assert r.c not in clean and r.d not in clean  # fresh: neither is in the clean prompt
        assert r.io not in abc and abc.count(r.s) == 1  # the answer left the context; only S2 keeps the subject
        assert abc.count(r.c) == 1 and abc.count(r.d) == 1  # three different names: the answer is undetermined
        assert r.corrupt_abc == TEMPLATES[r.template].format(A=r.c, B=r.d, S=r.s, place=r.place, obj=r.obj)
        assert [i for i, (a, b) in enumerate(zip(clean, abc)) if a != b] == [clean.index(r.io), clean.index(r.s)]


def test_all_three_prompts_line_up_token_by_token(tok, pairs):
    for r in pairs.itertuples():
        clean = _ids(tok, r.clean)
        assert len(clean) == len(_ids(tok, r.corrupt)) == len(_ids(tok, r.corrupt_abc))
        pos = role_positions(clean, _ids(tok, r.answer)[0], _ids(tok, r.wrong)[0])
        assert list(pos) == list(ROLES) and pos["IO"] < pos["S1"] < pos["S2"] < pos["END"] == len(clean) - 1
        assert tok.convert_ids_to_tokens(clean[pos["S2"]]) == tok.convert_ids_to_tokens(_ids(tok, r.wrong))[0]


def test_corrupted_selects_the_prompt(pairs):
    assert corrupted(pairs, "abc")["corrupt"].tolist() == pairs["corrupt_abc"].tolist()
    assert corrupted(pairs, "name_swap")["corrupt"].tolist() == pairs["corrupt"].tolist()
    assert set(CORRUPTIONS) == {"name_swap", "abc"}
    with pytest.raises(ValueError, match="corruption must be one of"):
        corrupted(pairs, "shuffle")


def test_a_name_that_is_not_one_token_raises_naming_it(tok):
    assert single_token_names(tok) == list(NAMES)  # every default name is one token for SmolLM2
    bad = "Xzqvbrlwn"
    with pytest.raises(ValueError, match=bad):
        make_ioi_pairs(8, tokenizer=tok, names=(*NAMES[:6], bad))
    with pytest.raises(ValueError, match="one token"):
        check_single_token_names(tok, (bad,))
    check_single_token_names(tok)  # the defaults pass


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="at least 4 different names"):
        make_ioi_pairs(3, names=("Mary", "John", "Tom"))
    with pytest.raises(ValueError, match="must name"):
        make_ioi_pairs(3, templates=("{A} and {B} went home",))
    with pytest.raises(ValueError, match="follow a space"):
        make_ioi_pairs(3, templates=("{A} and {B} left; {S} gave it to",))
    with pytest.raises(ValueError, match="positive int"):
        make_ioi_pairs(0)
    with pytest.raises(ValueError, match="IO name once"):
        role_positions([1, 2, 3], 7, 2)
    assert make_ioi_pairs(16, seed=3).equals(make_ioi_pairs(16, seed=3))
    assert not make_ioi_pairs(16, seed=3).equals(make_ioi_pairs(16, seed=4))
