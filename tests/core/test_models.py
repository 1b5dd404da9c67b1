"""Model zoo: registry, local folders and hub ids share one path; the cache is safe; bad input fails early."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.core.arch import ArchitectureError, resolve_arch
from workbench.core.zoo import REGISTRY
from workbench.io.atomic import COMPLETE_MARKER, build_once, sha256_file
from workbench.testing.tiny import byte_tokenizer, tiny_config, tiny_hf, tiny_model

TIED = {"llama": True, "qwen2": True, "gemma2": True, "gemma3_text": True, "gpt2": True,
        "mistral": False, "qwen3": False, "gpt_neox": False}


def test_arch_map_of_every_family(tiny):
    a = tiny.arch
    assert a.n_layers == 3 and a.d_model == 64 and a.vocab_size == 259
    assert a.tied == TIED[a.family]
    for i in range(a.n_layers):
        for path in (a.layer_path(i), a.attn_path(i), a.mlp_path(i)):
            tiny.module(path)  # exists
    assert tiny.module(a.embed) is tiny.hf.get_input_embeddings()
    assert tiny.module(a.unembed) is tiny.hf.get_output_embeddings()
    assert (a.logit_softcap is not None) == (a.family == "gemma2")


def test_unsupported_architecture_raises_with_the_supported_list():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=50))
    with pytest.raises(ArchitectureError, match="not supported.*llama"):
        resolve_arch(bert)
    with pytest.raises(ArchitectureError):
        wb.from_hf(bert, byte_tokenizer())


def test_unknown_model_name_lists_the_registry():
    with pytest.raises(ValueError) as info:
        wb.load_model("smollm2")
    for name in REGISTRY:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device="tpu"), "device 'tpu'"),
        (dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), "cuda"),
        (dict(dtype="float8"), "dtype 'float8'.*float32"),
        (dict(dtype=torch.int8), "dtype"),
    ],
)
def test_bad_device_or_dtype_fails_before_loading(kwargs, match, monkeypatch):
    def must_not_load(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("workbench.core.models.ensure_packaged", must_not_load)
    with pytest.raises(ValueError, match=match):
        wb.load_model("smollm2-135m", **kwargs)


def test_local_folder_goes_through_from_pretrained(tmp_path):
    original = tiny_model("qwen3")
    original.hf.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    loaded = wb.load_model(str(tmp_path), device="cpu")
    assert loaded.arch == original.arch
    enc = loaded.encode(["hello there", "x"])
    with torch.no_grad():
        assert torch.equal(loaded.hf(**enc).logits, original.hf(**enc).logits)
    (weights,) = Path(tmp_path).glob("*.safetensors")
    assert loaded.weights_hash == sha256_file(weights)
    assert loaded.tokenizer.padding_side == "left"


def test_hub_ids_use_the_same_path(monkeypatch):
    seen = []

    def fake_tok(name, **kw):
        seen.append(("tok", name))
        return byte_tokenizer()

    def fake_model(name, **kw):
        seen.append(("model", name, kw.get("dtype")))
        return tiny_hf("llama")

    def fake_info(name, timeout=None):  # the one look-up the name check makes: the hub answers
        seen.append(("info", name, timeout))
        return object()

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", fake_tok)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_model)
    monkeypatch.setattr("workbench.core.models.model_info", fake_info)
    m = wb.load_model("some-org/some-model", device="cpu", dtype="float32")
    assert seen.pop(0) == ("info", "some-org/some-model", 10)
    assert seen == [("tok", "some-org/some-model"), ("model", "some-org/some-model", torch.float32)]
    assert m.name == "some-org/some-model" and m.source["hub_id"] == "some-org/some-model"


def test_weights_hash_of_in_memory_model_tracks_the_weights():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert a.weights_hash == b.weights_hash != c.weights_hash


def _slow_build(final, log):
    def build(tmp):
        with open(log, "a") as f:
            f.write("built\n")
        (tmp / "data.txt").write_text("payload")
        time.sleep(0.5)
        return {"ok": True}

    build_once(Path(final), build)
    assert (Path(final) / "data.txt").read_text() == "payload"


def test_build_once_builds_once_under_concurrency(tmp_path):
    final, log = tmp_path / "thing", tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build, args=(str(final), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().count("built") == 1
    assert (final / COMPLETE_MARKER).exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_half_written_build_is_never_taken_for_complete(tmp_path):
    final = tmp_path / "thing"
    final.mkdir()
    (final / "data.txt").write_text("truncated")  # no completion marker: a crashed writer
    stale = tmp_path / ".tmp-thing-deadbeef"
    stale.mkdir()

    def failing(tmp):
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        build_once(final, failing)
    assert not (final / COMPLETE_MARKER).exists() and not list(tmp_path.glob(".tmp-*"))

    def good(tmp):
        (tmp / "data.txt").write_text("full")
        return {}

    build_once(final, good)
    assert (final / "data.txt").read_text() == "full"


def test_tiny_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="families"):
        tiny_config("bert")


@pytest.mark.integration
def test_packaged_default_model(smollm2):
    m = smollm2
    assert m.arch.family == "llama" and m.n_layers == 30 and m.d_model == 576 and m.arch.tied
    assert m.source["registry"] == "smollm2-135m" and len(m.source["source_sha256"]) == 64
    folder = Path(m.source["path"])
    assert (folder / COMPLETE_MARKER).exists()
    assert m.weights_hash == sha256_file(next(folder.glob("*.safetensors")))
    enc = m.encode(["The capital of France is"])
    with torch.no_grad():
        top = m.hf(**enc).logits[0, -1].argmax()
    assert m.tokenizer.decode(top).strip() == "Paris"


def test_weights_hash_hashes_each_tensor_once_and_sees_every_change(monkeypatch):
    """Tied weights are hashed once; a second Model around the same weights hashes nothing; an in-place change, a
    replaced tensor or another model at reused addresses is never served a stale digest."""
    import workbench.core.models as models_mod
    from workbench.core.models import from_hf
    from workbench.testing.tiny import byte_tokenizer, tiny_hf, tiny_model

    hashed = []
    real = models_mod._bytes_sha256
    monkeypatch.setattr(models_mod, "_bytes_sha256", lambda t: hashed.append(t.data_ptr()) or real(t))
    m = tiny_model("gemma2")  # ties its head to the embedding
    assert m.hf.get_output_embeddings().weight is m.hf.get_input_embeddings().weight
    h0 = m.weights_hash
    distinct = {t.data_ptr() for t in m.hf.state_dict().values()}
    assert len(hashed) == len(distinct) < len(m.hf.state_dict())
    hashed.clear()
    assert from_hf(m.hf, byte_tokenizer()).weights_hash == h0 and hashed == []
    old = m.W_U[0, 0].item()
    with torch.no_grad():
        m.W_U[0, 0] += 1.0
    assert m.weights_hash != h0 and len(hashed) == 1  # only the changed tensor is read again
    with torch.no_grad():
        m.W_U[0, 0] = old
    assert m.weights_hash == h0  # the identity is the values, not the history
    other = from_hf(tiny_hf("gemma2", seed=1), byte_tokenizer())
    assert other.weights_hash != h0
    assert tiny_model("gemma2", seed=0).weights_hash == h0  # a fresh copy of the same values


def test_weights_hash_covers_names_dtypes_and_bytes():
    from workbench.core.models import _tensors_sha256

    a = {"w": torch.zeros(4), "b": torch.ones(2)}
    base = _tensors_sha256(a)
    assert _tensors_sha256({"w": torch.zeros(4), "c": torch.ones(2)}) != base
    assert _tensors_sha256({"w": torch.zeros(4, dtype=torch.float64), "b": torch.ones(2)}) != base
    assert _tensors_sha256({"w": torch.zeros(2, 2), "b": torch.ones(2)}) != base
    assert _tensors_sha256({"w": torch.tensor([0.0, 0.0, 0.0, 1e-30]), "b": torch.ones(2)}) != base
    assert _tensors_sha256({"w": torch.zeros(8)[::2], "b": torch.ones(2)}) == base  # strided: its values
