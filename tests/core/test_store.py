"""Activation store: stored activations equal direct captures, corpus windows, resume, integrity, reading, errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import workbench
import workbench.core.store as store_mod
from workbench.core.store import ActivationStore, StoreError, harvest
from workbench.core.trace import trace
from workbench.data.corpus import Corpus
from workbench.testing.tiny import BOS, EOS, tiny_model

PROMPTS = [
    "The cat sat on the mat.",
    "Paris is the capital of",
    "a",
    "Hooks are installed on entry and removed on exit.",
    "zz",
    "Tiny random models load in milliseconds!",
    "one more prompt",
]
DOCS = [
    "First document, a little longer than one window of the corpus.",
    "",
    "Second one.",
    "Third document: the stream is cut into fixed windows.",
    "x",
]
SITES = ["blocks.1.hook_resid_post", "hook_embed"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(autouse=True)
def no_leaked_hooks():
    yield
    assert workbench.active_hooks() == []


def forward_counter(model):
    """Count forward passes that reach the embedding (a pre-hook of our own, removed by the caller)."""
    calls = []
    handle = model.hf.get_submodule(model.arch.embed).register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


def store_files(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.safetensors"))}


def manifest_sans_time(path):
    m = json.loads((path / "manifest.json").read_text())
    for key in ("created_at", "updated_at"):
        m.pop(key)
    return m


# -- equality with direct captures ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_positions_all_equals_trace(tmp_path, family):
    model = tiny_model(family)
    st = harvest(model, PROMPTS, SITES, tmp_path / "s", batch_size=3, shard_tokens=40, progress=False)
    assert len(st.shards) > 1  # several shards, concatenated in data order
    st.verify()
    toks = st.tokens()
    want = {site: [] for site in SITES}
    want_ids, want_rows, want_pos = [], [], []
    for start in range(0, len(PROMPTS), 3):
        enc = model.encode(PROMPTS[start : start + 3])
        with torch.no_grad(), trace(model, SITES) as tr:
            model.hf(**enc)
        mask = enc["attention_mask"].bool()
        for site in SITES:
            want[site].append(tr[site][mask])
        want_ids.append(enc["input_ids"][mask])
        lengths = mask.sum(-1)
        for b, n in enumerate(lengths.tolist()):
            want_rows += [start + b] * n
            want_pos += list(range(n))
    for site in SITES:
        got = st.load(site)
        assert got.dtype == torch.float32 and got.shape == (st.n_tokens, st.d(site)) == (st.n_tokens, 64)
        torch.testing.assert_close(got, torch.cat(want[site]), atol=1e-6, rtol=0)
    assert torch.equal(toks["token_ids"], torch.cat(want_ids))
    assert toks["row"].tolist() == want_rows and toks["position"].tolist() == want_pos
    assert st.n_tokens == len(want_rows) == st.manifest["n_tokens"]
    assert st.manifest["n_rows"] == len(PROMPTS) and st.manifest["data"]["n_items"] == len(PROMPTS)


def test_positions_last_equals_trace(tmp_path, model):
    st = harvest(model, PROMPTS, SITES, tmp_path / "s", batch_size=4, positions="last", progress=False)
    assert st.n_tokens == len(PROMPTS)
    for site in SITES:
        want = []
        for start in range(0, len(PROMPTS), 4):
            with torch.no_grad(), trace(model, site, positions=-1) as tr:
                model.hf(**model.encode(PROMPTS[start : start + 4]))
            want.append(tr[site])
        torch.testing.assert_close(st.load(site), torch.cat(want), atol=1e-6, rtol=0)
    toks = st.tokens()
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert toks["row"].tolist() == list(range(len(PROMPTS)))
    assert toks["position"].tolist() == [n - 1 for n in lengths]
    assert toks["token_ids"].tolist() == [model.tokenizer(p)["input_ids"][-1] for p in PROMPTS]


def test_bfloat16_and_model_dtype(tmp_path, model):
    st = harvest(model, PROMPTS[:2], SITES[0], tmp_path / "bf", dtype="bfloat16", progress=False)
    assert st.load(SITES[0]).dtype == torch.bfloat16 and st.manifest["dtype"] == "bfloat16"
    st = harvest(model, PROMPTS[:2], SITES[0], tmp_path / "own", dtype=None, progress=False)
    assert st.manifest["dtype"] == "float32"


# -- corpus ------------------------------------------------------------------------------------------------------
def expected_stream(docs):
    stream = []
    for d in docs:
        if d:
            stream += list(d.encode()) + [EOS]
    return stream


@pytest.mark.parametrize("prepend_bos", [None, False])
def test_corpus_fixed_windows(tmp_path, model, prepend_bos):
    ctx = 16
    st = harvest(model, Corpus(DOCS, prepend_bos=prepend_bos), "blocks.0.hook_resid_post", tmp_path / "c",
                 context_length=ctx, batch_size=2, shard_tokens=30, progress=False)
    toks = st.tokens()
    stream = expected_stream(DOCS)
    body = ctx - 1 if prepend_bos is None else ctx
    n_windows = -(-len(stream) // body)
    assert st.manifest["n_rows"] == n_windows and st.manifest["data"]["prepend_bos"] is (prepend_bos is None)
    assert st.n_tokens == len(stream) + (n_windows if prepend_bos is None else 0)
    rows = toks["row"].tolist()
    counts = [rows.count(r) for r in range(n_windows)]
    assert counts[:-1] == [ctx] * (n_windows - 1) and 0 < counts[-1] <= ctx  # fixed windows, last may be short
    ids = toks["token_ids"].tolist()
    if prepend_bos is None:
        assert [ids[i] for i, p in enumerate(toks["position"].tolist()) if p == 0] == [BOS] * n_windows
        ids = [t for i, t in enumerate(ids) if toks["position"][i] != 0]
    assert ids == stream
    # A full window's activations equal a direct capture of that window, alone and unpadded.
    first = torch.tensor([toks["token_ids"][:ctx].tolist()])
    with torch.no_grad(), trace(model, "blocks.0.hook_resid_post") as tr:
        model.hf(input_ids=first)
    torch.testing.assert_close(st.load("blocks.0.hook_resid_post")[:ctx], tr["blocks.0.hook_resid_post"][0],
                               atol=1e-5, rtol=1e-5)


def test_corpus_from_txt_file_and_function(tmp_path, model):
    paragraphs = ["para one\nstill para one", "para two", "para three\nline"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n\n\n")
    kw = dict(context_length=12, batch_size=2, progress=False)
    from_path = harvest(model, path, "hook_embed", tmp_path / "a", **kw)  # a .txt path = Corpus(path)
    from_list = harvest(model, Corpus(paragraphs), "hook_embed", tmp_path / "b", **kw)
    harvest(model, Corpus(lambda: iter(paragraphs)), "hook_embed", tmp_path / "c", **kw)
    assert from_path.manifest["data"]["sha256"] == from_list.manifest["data"]["sha256"]
    assert store_files(tmp_path / "a") == store_files(tmp_path / "b") == store_files(tmp_path / "c")
    assert from_path.manifest["data_source"] == str(path.resolve())
    lines = harvest(model, Corpus(path, split="line"), "hook_embed", tmp_path / "d", **kw)
    assert lines.manifest["data"]["n_items"] == 5
    with pytest.raises(ValueError, match="one-shot"):
        Corpus(p for p in paragraphs)
    with pytest.raises(ValueError, match="not an existing file"):
        Corpus("just some text")


def test_a_corpus_argument_goes_through_the_one_coercion(tmp_path, model):
    """A string or path is a corpus by workbench.data.corpus.as_corpus: a .jsonl file gives its "text" fields
    (the same windows as the texts themselves), and a string that is no corpus is refused naming both options."""
    texts = ["para one", "para two is longer", "three"]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kw = dict(context_length=8, batch_size=2, progress=False)
    harvest(model, jl, "hook_embed", tmp_path / "a", **kw)
    harvest(model, Corpus(texts), "hook_embed", tmp_path / "b", **kw)
    assert store_files(tmp_path / "a") == store_files(tmp_path / "b")


def test_max_tokens_exact(tmp_path, model):
    st = harvest(model, Corpus(DOCS), "hook_embed", tmp_path / "m", context_length=16, batch_size=2,
                 shard_tokens=20, max_tokens=37, progress=False)
    assert st.n_tokens == 37 and sum(s["n_tokens"] for s in st.shards) == 37
    assert st.load("hook_embed").shape == (37, 64)


# -- resume ------------------------------------------------------------------------------------------------------
def interrupt_after(monkeypatch, n_shards, exc=KeyboardInterrupt):
    real = store_mod._write_shard
    written = []

    def write(path, tensors):
        if len(written) == n_shards:
            raise exc("simulated interruption")
        written.append(path.name)
        return real(path, tensors)

    monkeypatch.setattr(store_mod, "_write_shard", write)


@pytest.mark.parametrize("kind", ["prompts", "corpus"])
def test_interrupted_then_resumed_is_identical(tmp_path, model, monkeypatch, kind):
    data = PROMPTS * 2 if kind == "prompts" else Corpus(DOCS * 3)
    kw = dict(batch_size=2, context_length=64 if kind == "prompts" else 16, shard_tokens=25, progress=False)
    full = harvest(model, data, SITES, tmp_path / "full", **kw)
    assert len(full.shards) >= 4

    with monkeypatch.context() as mp:
        interrupt_after(mp, 2)
        with pytest.raises(KeyboardInterrupt):
            harvest(model, data, SITES, tmp_path / "cut", **kw)
    partial = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert partial["status"] == "partial" and len(partial["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "cut").glob("shard_*")) == ["shard_00000.safetensors",
                                                                         "shard_00001.safetensors"]
    assert not list((tmp_path / "cut").glob(".*.tmp"))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "cut")
    assert ActivationStore(tmp_path / "cut", allow_partial=True).n_tokens == partial["n_tokens"]

    # The resume runs only the rows after the second shard.
    calls, handle = forward_counter(model)
    try:
        resumed = harvest(model, data, SITES, tmp_path / "cut", **kw)
    finally:
        handle.remove()
    remaining_rows = full.manifest["n_rows"] - (partial["shards"][-1]["last_row"] + 1)
    assert len(calls) == -(-remaining_rows // 2)
    assert store_files(tmp_path / "cut") == store_files(tmp_path / "full")
    assert manifest_sans_time(tmp_path / "cut") == manifest_sans_time(tmp_path / "full")
    resumed.verify()

    # A finished store is returned as is: no forward pass.
    calls, handle = forward_counter(model)
    try:
        again = harvest(model, data, SITES, tmp_path / "cut", **kw)
    finally:
        handle.remove()
    assert calls == [] and again.n_tokens == full.n_tokens


def test_exception_in_forward_then_resume(tmp_path, model):
    kw = dict(batch_size=2, shard_tokens=25, progress=False)
    harvest(model, PROMPTS, SITES, tmp_path / "full", **kw)
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = model.hf.get_submodule(model.arch.embed).register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            harvest(model, PROMPTS, SITES, tmp_path / "cut", **kw)
    finally:
        handle.remove()
    assert workbench.active_hooks() == []  # the trace cleaned up after the failed forward
    harvest(model, PROMPTS, SITES, tmp_path / "cut", **kw)
    assert store_files(tmp_path / "cut") == store_files(tmp_path / "full")
    assert manifest_sans_time(tmp_path / "cut") == manifest_sans_time(tmp_path / "full")


def test_mismatched_resume_raises(tmp_path, model):
    out = tmp_path / "s"
    harvest(model, PROMPTS, SITES, out, batch_size=2, progress=False)
    before = store_files(out)
    for change, match in [
        (dict(sites=SITES[:1]), "sites"),
        (dict(batch_size=3), "batch_size"),
        (dict(data=PROMPTS[:-1]), "data"),
        (dict(positions="last"), "positions"),
        (dict(model=tiny_model("llama", seed=1)), "model_weights_sha256"),
    ]:
        args = dict(model=model, data=PROMPTS, sites=SITES, batch_size=2) | change
        with pytest.raises(StoreError, match=match):
            harvest(args.pop("model"), args.pop("data"), args.pop("sites"), out, **args, progress=False)
        assert store_files(out) == before
    st = harvest(model, PROMPTS, SITES[:1], out, batch_size=3, progress=False, resume=False)
    assert st.sites == SITES[:1] and st.manifest["batch_size"] == 3


def test_foreign_folder_refused(tmp_path, model):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no activation store"):
        harvest(model, PROMPTS, SITES, tmp_path, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# -- integrity ---------------------------------------------------------------------------------------------------
def test_missing_and_tampered_shards(tmp_path, model):
    out = tmp_path / "s"
    harvest(model, PROMPTS, SITES, out, batch_size=2, shard_tokens=30, progress=False)
    ActivationStore(out).verify()
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, different content: only the hash sees it, and opening the store checks it
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard_00001.*sha256"):
        ActivationStore(out)
    with pytest.raises(StoreError, match="shard_00001.*sha256"):
        ActivationStore(out, allow_partial=True).verify()
    shard.write_bytes(bytes(data[:-4]))
    with pytest.raises(StoreError, match="shard_00001"):
        ActivationStore(out)
    shard.unlink()
    with pytest.raises(StoreError, match="shard_00001.safetensors \\(missing\\)"):
        ActivationStore(out)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ActivationStore(tmp_path / "nothing")
    # A resume rebuilds the missing shard (and everything after it), byte-identical to the original.
    with pytest.warns(UserWarning, match="missing"):
        harvest(model, PROMPTS, SITES, out, batch_size=2, shard_tokens=30, progress=False)
    harvest(model, PROMPTS, SITES, tmp_path / "ref", batch_size=2, shard_tokens=30, progress=False)
    assert store_files(out) == store_files(tmp_path / "ref")
    ActivationStore(out).verify()


# -- reading -----------------------------------------------------------------------------------------------------
def test_iter_batches(tmp_path, model):
    st = harvest(model, PROMPTS, SITES, tmp_path / "s", batch_size=2, shard_tokens=20, progress=False)
    site = SITES[0]
    full = st.load(site)
    n = st.n_tokens
    assert len(st.shards) >= 3 and n % 7 != 0

    plain = list(st.iter_batches(site, 7))
    assert [len(b) for b in plain] == [7] * (n // 7) + [n % 7]
    assert torch.equal(torch.cat(plain), full)
    assert [len(b) for b in st.iter_batches(site, 7, drop_last=True)] == [7] * (n // 7)

    def multiset(batches):
        return Counter(tuple(v.tolist()) for b in batches for v in b)

    shuffled = torch.cat(list(st.iter_batches(site, 7, shuffle=True, seed=3)))
    assert multiset([shuffled]) == multiset([full])  # every token exactly once (duplicates, e.g. BOS, counted)
    assert not torch.equal(shuffled, full)
    assert torch.equal(shuffled, torch.cat(list(st.iter_batches(site, 7, shuffle=True, seed=3))))  # same seed
    assert not torch.equal(shuffled, torch.cat(list(st.iter_batches(site, 7, shuffle=True, seed=4))))
    with pytest.raises(KeyError, match="not in this store"):
        next(st.iter_batches("blocks.2.hook_resid_post", 4))
    with pytest.raises(ValueError, match="batch_size"):
        next(st.iter_batches(site, 0))


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sites=["blocks.9.hook_resid_post"]), "blocks.9.hook_resid_post.*out of range"),
        (dict(sites=["blocks.0.hook_nope"]), "hook_nope"),
        (dict(sites=["no.such.module"]), "unknown site 'no.such.module'.*valid sites"),
        (dict(sites=[]), "sites must be"),
        (dict(sites=["hook_embed", "hook_embed"]), "more than once"),
        (dict(data=[]), "data is empty"),
        (dict(data=["ok", ""]), "prompt 1"),
        (dict(data=Corpus(["", ""])), "no non-empty document"),
        (dict(data="not a file"), "neither a registry corpus .* nor an existing file"),
        (dict(positions="first"), "positions must be one of \\['all', 'last'\\]"),
        (dict(positions=-1), "positions must be one of"),
        (dict(batch_size=0), "batch_size"),
        (dict(shard_tokens=0), "shard_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(context_length=4), "prompt 0 is .* tokens, longer than context_length=4"),
        (dict(context_length=100_000), "max_position_embeddings"),
        (dict(dtype="float64"), "dtype"),
    ],
)
def test_bad_input_raises_before_any_forward(tmp_path, model, kwargs, match):
    args = dict(data=PROMPTS, sites=SITES) | kwargs
    out = tmp_path / "out"
    calls, handle = forward_counter(model)
    try:
        with pytest.raises(ValueError, match=match):
            harvest(model, args.pop("data"), args.pop("sites"), out, progress=False, **args)
    finally:
        handle.remove()
    assert calls == [] and not out.exists()
    assert workbench.active_hooks() == []


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from workbench.io.atomic import atomic_write_text

    atomic_write_text(tmp_path / "a.csv", "x\n")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o666 & ~umask


# -- the write pipeline -----------------------------------------------------------------------------------------
def test_shards_are_written_while_the_next_batches_run(tmp_path, model, monkeypatch):
    """The writer thread holds a shard while forwards go on; at most one shard is ever waiting to be written, so
    memory stays at two shards; the store is the same as a plain one."""
    import threading

    real = store_mod._write_shard
    forwards, in_flight, overlapped = [], [], []

    def slow_write(path, parts):
        in_flight.append(path.name)
        seen = len(forwards)
        threading.Event().wait(0.5)  # the harvesting thread runs ahead meanwhile
        overlapped.append(len(forwards) > seen)
        assert len(in_flight) == 1, in_flight
        in_flight.pop()
        return real(path, parts)

    kw = dict(batch_size=1, shard_tokens=10, progress=False)
    plain = harvest(model, PROMPTS, SITES, tmp_path / "plain", **kw)
    monkeypatch.setattr(store_mod, "_write_shard", slow_write)
    handle = model.hf.get_submodule(model.arch.embed).register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        piped = harvest(model, PROMPTS, SITES, tmp_path / "piped", **kw)
    finally:
        handle.remove()
    assert len(overlapped) == len(plain.shards) >= 3
    assert any(overlapped[:-1])  # forwards ran while earlier shards were being written
    assert store_files(tmp_path / "piped") == store_files(tmp_path / "plain")
    piped.verify()


def test_a_failing_writer_stops_the_harvest_and_it_resumes(tmp_path, model, monkeypatch):
    kw = dict(batch_size=2, shard_tokens=25, progress=False)
    harvest(model, PROMPTS, SITES, tmp_path / "full", **kw)
    real, n = store_mod._write_shard, []

    def failing(path, parts):
        n.append(1)
        if len(n) == 2:
            raise OSError("disk full")
        return real(path, parts)

    with monkeypatch.context() as mp:
        mp.setattr(store_mod, "_write_shard", failing)
        with pytest.raises(OSError, match="disk full"):
            harvest(model, PROMPTS, SITES, tmp_path / "cut", **kw)
    partial = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert partial["status"] == "partial" and [s["file"] for s in partial["shards"]] == ["shard_00000.safetensors"]
    assert not list((tmp_path / "cut").glob(".*.tmp"))
    harvest(model, PROMPTS, SITES, tmp_path / "cut", **kw)
    assert store_files(tmp_path / "cut") == store_files(tmp_path / "full")


def test_shard_writer_is_safetensors_and_hashes_what_it_wrote(tmp_path):
    from safetensors.torch import load_file

    from workbench.io.atomic import sha256_file

    parts = {"a": [torch.randn(3, 5), torch.randn(2, 5)], "b": [torch.arange(4), torch.arange(3)],
             "c": [torch.randn(1, 7).bfloat16(), torch.randn(2, 7).bfloat16()]}
    digest, size = store_mod._write_shard(tmp_path / "s.safetensors", parts)
    assert digest == sha256_file(tmp_path / "s.safetensors") and size == (tmp_path / "s.safetensors").stat().st_size
    back = load_file(tmp_path / "s.safetensors")
    for name, ps in parts.items():
        assert torch.equal(back[name], torch.cat(ps))
