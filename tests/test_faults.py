"""Fault injection: each of the fifteen ways a result could silently lie (issue "Results that cannot silently lie"),
tried on tiny models and temporary folders, must now fail loudly or stay correct."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

import workbench.batch.runner as nbs
import workbench.studies.counting_readout.study as counting_study
from workbench.batch.doctor import doctor
from workbench.core import models as core_models
from workbench.core import zoo
from workbench.core.models import check_model_name, from_hf, load_model
from workbench.core.store import ActivationStore, StoreError, harvest
from workbench.core.trace import trace
from workbench.io.atomic import COMPLETE_MARKER, IntegrityError, build_once, sha256_file
from workbench.io.figures import save_table, write_result_tables
from workbench.io.owned import FolderOwnershipError
from workbench.io.paths import model_key, repo_root, resolve_output_path, run_output_dir, safe_segment
from workbench.methods.probes.base import load_probe, save_probe
from workbench.methods.probes.linear import RidgeProbe
from workbench.methods.sae.handle import SAEError, load_sae, save_sae
from workbench.methods.sae.train import SAETrainConfig, train_sae
from workbench.studies.counting_readout.interventions import train_lora_qv
from workbench.studies.counting_readout.study import CountingConfig, run_counting_study
from workbench.studies.sae_features.study import SAEStudyConfig, train_cache_paths
from workbench.testing.tiny import tiny_model

PROMPTS = ["hello world, this is a test", "hi there", "the cat sat on the mat", "one two three"]
SITE = "blocks.1.hook_resid_post"


def _flip_byte(path: Path, offset: int = -100) -> None:
    """Corrupt one byte in place, keeping the size (the write changes the mtime, as any edit does)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny model saved as a Hugging Face folder and loaded back by path (its identity bound to the files)."""
    m = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    m.hf.save_pretrained(folder)
    m.tokenizer.save_pretrained(folder)
    return folder


# 1 -------------------------------------------------------------------------------------------------------------
def test_1_weights_identity_is_derived_never_copied(saved_tiny, tmp_path):
    base = load_model(saved_tiny, device="cpu")
    files_hash = sha256_file(saved_tiny / "model.safetensors")
    assert base.weights_hash == files_hash  # unchanged since loading: the files' hash
    lora = train_lora_qv(base, PROMPTS[:2], [base.tokenizer.encode("a")[-1]] * 2, steps=2, batch_size=2, seed=0)
    assert lora.model.source["path"] == base.source["path"]  # provenance is copied ...
    assert lora.model.weights_hash not in (files_hash, base.weights_hash)  # ... the identity is not
    copied = from_hf(base.hf, base.tokenizer, source={"weights_sha256": "0" * 64})
    assert copied.weights_hash != "0" * 64
    store = harvest(base, PROMPTS, SITE, tmp_path / "store", progress=False)
    with pytest.raises(StoreError, match="model_weights_sha256"):  # the merged model never reuses the base's store
        harvest(lora.model, PROMPTS, SITE, tmp_path / "store", progress=False)
    assert store.manifest["model_weights_sha256"] == files_hash
    with torch.no_grad():  # an edit in place changes the identity; undoing it restores the content hash
        base.hf.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    edited = base.weights_hash
    assert edited != files_hash
    with torch.no_grad():
        base.hf.model.layers[0].mlp.down_proj.weight[0, 0] -= 1.0
    assert base.weights_hash not in (edited,)
    assert load_model(saved_tiny, device="cpu", dtype="bfloat16").weights_hash != files_hash  # other values


# 2 -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    m = tiny_model("llama")
    out = tmp_path_factory.mktemp("sae")
    docs = [f"Document {i}: the quick brown fox counts {i * 3} sheep." for i in range(60)]
    from workbench.data.corpus import Corpus

    store = harvest(m, Corpus(docs), SITE, out / "store", context_length=32, shard_tokens=1024, progress=False)
    cfg = SAETrainConfig(expansion=2, k=4, batch_size=128, total_tokens=1024, dead_feature_window=10)
    train_sae(store, SITE, cfg, model=m, out_dir=out / "sae")
    return m, store, cfg, out / "sae"


def test_2_sae_writers_never_delete_a_folder_they_did_not_write(tiny_sae, tmp_path):
    m, store, cfg, sae_folder = tiny_sae
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.md").write_text("keep me")
    handle = load_sae(sae_folder, m)
    with pytest.raises(FolderOwnershipError, match="not written by workbench"):
        save_sae(handle, notes)
    with pytest.raises(FolderOwnershipError, match="not written by workbench"):
        train_sae(store, SITE, cfg, model=m, out_dir=notes)  # refused before any training
    assert (notes / "ideas.md").read_text() == "keep me" and sorted(p.name for p in notes.iterdir()) == ["ideas.md"]
    copy = tmp_path / "copy"
    save_sae(handle, copy)
    with pytest.raises(FolderOwnershipError, match="overwrite=True"):
        save_sae(handle, copy)  # an SAE already there: replaced only when asked
    save_sae(handle, copy, overwrite=True)
    probe = RidgeProbe(alpha=1.0).fit(np.random.default_rng(0).normal(size=(20, 4)), np.arange(20.0))
    with pytest.raises(FolderOwnershipError, match="holds a workbench sae"):
        save_probe(probe, copy, model={"name": "m", "weights_hash": "0" * 64}, site="s", layer=1, task="t",
                   generator_params=None, seed=0, metrics={}, overwrite=True)


# 3 -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_registry(saved_tiny, tmp_path, monkeypatch):
    """A registry name whose 'converted' cache folder is the tiny model, with its marker."""
    folder = tmp_path / "cache-model"
    folder.mkdir()
    for f in saved_tiny.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / COMPLETE_MARKER).write_text(json.dumps({
        "name": "tiny-reg", "hub_id": "org/tiny", "source_sha256": "1" * 64,
        "weights_files": {"model.safetensors": sha256_file(folder / "model.safetensors")}}))
    monkeypatch.setitem(zoo.REGISTRY, "tiny-reg", zoo.REGISTRY["smollm2-135m"])
    monkeypatch.setattr(core_models, "ensure_packaged", lambda name: folder)
    return folder


def test_3_damaged_cached_weights_are_refused_and_cache_files_are_readable(fake_registry, tmp_path):
    good = load_model("tiny-reg", device="cpu")
    assert good.weights_hash == json.loads((fake_registry / COMPLETE_MARKER).read_text())["weights_files"][
        "model.safetensors"]
    _flip_byte(fake_registry / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors: sha256"):
        load_model("tiny-reg", device="cpu")

    def build(tmp: Path) -> dict:
        fd = os.open(tmp / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"x")
        os.close(fd)
        return {}

    built = build_once(tmp_path / "built", build)
    assert (built / "weights.bin").stat().st_mode & 0o044 == 0o044  # group/other readable like its siblings


# 4 -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a, b", [({"model": "org/name"}, {"model": "org.name"}),
                                  ({"layers": [0, 10]}, {"layers": "0+10"}),
                                  ({"layers": []}, {"layers": "none"}),
                                  ({"model": "m", "seed": 1}, {"model": "m", "seed": "1"})])
def test_4_grid_cells_never_share_a_folder(a, b, tmp_path):
    assert nbs.output_dir_for("02_x", tmp_path, False, a) != nbs.output_dir_for("02_x", tmp_path, False, b)
    assert nbs.parameter_slug(a) == nbs.parameter_slug(dict(reversed(list(a.items()))))  # canonical: order-free


# 5 -------------------------------------------------------------------------------------------------------------
def test_5_a_smoke_run_never_writes_into_a_full_size_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_output_dir("figures/02_x", True) == tmp_path / "figures/02_x/_smoke"
    assert run_output_dir("figures/02_x/_smoke", True) == tmp_path / "figures/02_x/_smoke"  # not doubled
    with pytest.raises(ValueError, match="full-size run never writes there"):
        run_output_dir("figures/02_x/_smoke", False)
    out = tmp_path / "figures" / "02_x"
    save_table(pd.DataFrame({"a": [1]}), "full", out, params={"smoke": False})
    before = (out / "full.csv").read_bytes()
    with pytest.raises(ValueError, match="refusing to write a smoke record"):
        save_table(pd.DataFrame({"a": [2]}), "full", out, params={"smoke": True})
    assert (out / "full.csv").read_bytes() == before  # nothing was replaced
    with pytest.raises(ValueError, match="refusing to write a smoke record"):
        write_result_tables(out, {"t": pd.DataFrame({"a": [1]})}, {"config": {"smoke": True}})
    cfg = CountingConfig.from_notebook({**{k: None for k in CountingConfig.NOTEBOOK}, "model": "m",
                                        "tasks": ["entity"], "interventions": [], "lora_scope": "joint",
                                        "smoke": True, "output_dir": "figures/02_x"})
    assert cfg.output_dir == tmp_path / "figures/02_x/_smoke" and cfg.smoke


# 6 -------------------------------------------------------------------------------------------------------------
def _notebook(folder: Path, cell: str, name: str = "01_demo") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(cell, metadata={"tags": ["parameters"]})]
    path = folder / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def test_6_typed_parameters_and_model_names_are_checked_before_any_kernel(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a kernel was started"))
    typed = ("from typing import Optional\nmodel: str = 'smollm2-135m'\nlayers: Optional[list[int]] = None\n"
             "smoke = False\noutput_dir = 'x'\n")
    path = _notebook(tmp_path, typed)
    with pytest.raises(ValueError, match=r"layers='0,10' is a str, but the notebook declares layers: "
                                         r"Optional\[list\[int\]\]"):
        nbs.check_parameters("01_demo", path, {"layers": "0,10"})
    nbs.check_parameters("01_demo", path, {"layers": [0, 10]})
    nbs.check_parameters("01_demo", path, {"layers": None})
    with pytest.raises(ValueError, match="parameter model: unknown model 'smolm2'"):
        nbs.check_parameters("01_demo", path, {"model": "smolm2"})
    untyped = _notebook(tmp_path, "layers = None\nsmoke = False\noutput_dir = 'x'\n", "02_untyped")
    with pytest.raises(ValueError, match=r"default to None without a type annotation"):
        nbs.check_parameters("02_untyped", untyped, {})
    bad_line = _notebook(tmp_path, "layers: list[int] | None = None\nsmoke = False\noutput_dir = 'x'\n", "03_bar")
    with pytest.raises(ValueError, match="papermill cannot read the parameter line"):
        nbs.check_parameters("03_bar", bad_line, {})
    with pytest.raises(ValueError, match="unknown model"):
        nbs.run_notebooks(["01_demo"], notebooks=tmp_path, figures_dir=tmp_path / "figs",
                          parameters={"model": "nope-model"})
    assert not (tmp_path / "figs").exists()
    for stem, nbpath in nbs.available_notebooks().items():  # the committed notebooks pass their own check
        nbs.check_parameters(stem, nbpath, {})


# 7 -------------------------------------------------------------------------------------------------------------
def test_7_a_missing_folder_fails_at_once_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/mymodel", "./mymodel", "a/b/c", str(tmp_path / "nothere"), "a/b"):
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match="unknown model") as e:
            load_model(name)
        assert time.perf_counter() - t0 < 5, name
        assert "smollm2-135m" in str(e.value)  # the registry names are listed
    with pytest.raises(ValueError, match="does not exist"):
        check_model_name("models/mymodel")


# 8 -------------------------------------------------------------------------------------------------------------
def test_8_a_corrupted_shard_of_the_right_size_is_found(tmp_path):
    m = tiny_model("llama")
    out = tmp_path / "store"
    kw = dict(context_length=64, shard_tokens=32, progress=False)
    harvest(m, PROMPTS * 3, SITE, out, **kw)
    reference = {p.name: p.read_bytes() for p in out.glob("shard_*.safetensors")}
    shard = sorted(out.glob("shard_*.safetensors"))[1]
    _flip_byte(shard)
    with pytest.raises(StoreError, match="sha256 differs"):
        ActivationStore(out)
    with pytest.warns(UserWarning, match="does not match its recorded sha256"):
        store = harvest(m, PROMPTS * 3, SITE, out, **kw)  # resume rebuilds from the damaged shard on
    assert {p.name: p.read_bytes() for p in out.glob("shard_*.safetensors")} == reference
    store.verify()


# 9 -------------------------------------------------------------------------------------------------------------
def test_9_probe_and_sae_cards_are_checked(tmp_path, tiny_sae):
    probe = RidgeProbe(alpha=1.0).fit(np.random.default_rng(0).normal(size=(20, 4)), np.arange(20.0))
    folder = save_probe(probe, tmp_path / "p", model={"name": "m", "weights_hash": "0" * 64}, site="s", layer=1,
                        task="t", generator_params=None, seed=0, metrics={})
    card = json.loads((folder / "card.json").read_text())
    for weights_file in ("../elsewhere.safetensors", "/etc/passwd", ".."):
        (folder / "card.json").write_text(json.dumps(card | {"weights_file": weights_file}))
        with pytest.raises(ValueError, match="must be a file name inside"):
            load_probe(folder)
    wrong = json.loads(json.dumps(card))
    key = next(iter(wrong["tensors"]))
    wrong["tensors"][key]["shape"] = [999]
    (folder / "card.json").write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="but the card declares"):
        load_probe(folder)
    (folder / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"card.json is not valid JSON"):
        load_probe(folder)
    m, _, _, sae_folder = tiny_sae
    copy = tmp_path / "sae"
    save_sae(load_sae(sae_folder, m), copy)
    card_file = next(p for p in copy.iterdir() if p.name.endswith("card.json"))
    sae_card = json.loads(card_file.read_text())
    sae_card.pop("files")
    card_file.write_text(json.dumps(sae_card))
    with pytest.raises(SAEError, match="records no sha256"):
        load_sae(copy, m)


# 10 ------------------------------------------------------------------------------------------------------------
def test_10_an_inner_trace_never_swallows_an_outer_stop():
    m = tiny_model("llama")
    enc = m.encode(PROMPTS)
    ran = []
    with trace(m, "blocks.0.hook_resid_post", stop=True) as outer:
        with trace(m, "blocks.1.hook_resid_post") as inner:
            m.hf(**enc)
        ran.append("after the inner block")  # must not run: the outer trace stopped the forward
    assert ran == [] and outer["blocks.0.hook_resid_post"].shape[0] == len(PROMPTS)
    with pytest.raises(KeyError, match="did not fire"):
        inner["blocks.1.hook_resid_post"]  # noqa: B018
    with trace(m, "blocks.1.hook_resid_post") as outer2:
        with trace(m, "blocks.0.hook_resid_post", stop=True):
            m.hf(**enc)
        ran.append("after")  # the inner stop is the inner trace's own: swallowed there
    assert ran == ["after"]
    with pytest.raises(KeyError):
        outer2["blocks.1.hook_resid_post"]  # noqa: B018 - the forward stopped before layer 1


# 11 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/abs/path/to/model", "../../outside", "a/../../b", "..", "C:\\models\\x"])
def test_11_cache_paths_stay_inside_the_cache(name, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    m = tiny_model("llama")
    m.name = name
    key = model_key(m)
    assert "/" not in key and "\\" not in key and Path(key).parts == (key,) and key not in (".", "..")
    assert safe_segment("..") == "_" and safe_segment("/abs") == "abs"
    for path in train_cache_paths(m, SAEStudyConfig.smoke_config(sae="train")):
        assert (tmp_path / "cache") in path.resolve().parents, path


# 12 ------------------------------------------------------------------------------------------------------------
def test_12_weights_packages_are_pinned_and_their_gguf_checked(tmp_path, monkeypatch):
    locked = {line.strip() for line in (repo_root() / "requirements" / "weights.in").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    for entry in zoo.REGISTRY.values():
        assert all("==" in p and p in locked for p in entry.pip), entry.pip
        assert len(entry.source_sha256) == 64 and int(entry.source_sha256, 16) >= 0
    fake = tmp_path / "other.gguf"
    fake.write_bytes(b"GGUF re-published with other bytes")
    entry = zoo.REGISTRY["smollm2-135m"]
    monkeypatch.setitem(zoo.REGISTRY, "smollm2-135m", type(entry)(**{**entry.__dict__, "locate": lambda: fake}))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(IntegrityError, match="refusing to convert"):
        zoo.ensure_packaged("smollm2-135m")
    assert not (tmp_path / "cache" / "models").exists()


# 13 ------------------------------------------------------------------------------------------------------------
def test_13_relative_outputs_resolve_against_the_checkout(monkeypatch, tmp_path):
    monkeypatch.chdir(repo_root() / "notebooks")  # where JupyterLab starts a notebook's kernel
    assert resolve_output_path("figures/01_x") == repo_root() / "figures/01_x"
    assert counting_study.checkout_root() == str(repo_root())
    monkeypatch.chdir(tmp_path)  # outside the checkout: the current directory
    assert resolve_output_path("figures/01_x") == tmp_path / "figures/01_x"
    assert resolve_output_path(tmp_path / "abs") == tmp_path / "abs"


# 14 ------------------------------------------------------------------------------------------------------------
def test_14_an_interrupted_counting_study_resumes_per_unit(tmp_path, monkeypatch):
    m = tiny_model("gpt2")
    cfg = CountingConfig.smoke_config(tasks=("entity", "addition"), n_train=27, n_test=18, seeds=(11, 42),
                                      interventions=("digit_rows",))
    full = run_counting_study(cfg, model=m, progress=False)
    checkpoint_dir_now = counting_study.checkpoint_dir(m, cfg, [1])
    real, calls = counting_study.residual_features_many, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("the machine went away")
        return real(*a, **k)

    monkeypatch.setattr(counting_study, "residual_features_many", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_counting_study(cfg, model=m, progress=False, checkpoint=tmp_path / "ckpt")
    assert len(list((tmp_path / "ckpt").glob("unit-*.json"))) == 2
    calls.clear()
    monkeypatch.setattr(counting_study, "residual_features_many", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = run_counting_study(cfg, model=m, progress=False, checkpoint=tmp_path / "ckpt")
    assert len(calls) == 2 and resumed.timings["resumed_units"] == 2  # only the two unfinished units ran
    for name in ("probes", "geometry", "lens", "accuracy", "extras", "angles"):
        a, b = getattr(full, name), getattr(resumed, name)
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_dtype=False)
    other = CountingConfig.smoke_config(tasks=("entity",), seeds=(11,), interventions=())
    with pytest.raises(ValueError, match="belongs to another study"):
        run_counting_study(other, model=m, progress=False, checkpoint=tmp_path / "ckpt")
    # the same config from changed code: its units were computed differently, so nothing is resumed into the result
    import workbench.io.checkpoint as checkpoint_module

    monkeypatch.setattr(checkpoint_module, "code_fingerprint", lambda: "0" * 64)
    with pytest.raises(ValueError, match="other workbench code"):
        run_counting_study(cfg, model=m, progress=False, checkpoint=tmp_path / "ckpt")
    monkeypatch.setattr(counting_study, "code_fingerprint", lambda: "0" * 64)  # the default folder moves with it
    assert counting_study.checkpoint_dir(m, cfg, [1]) != checkpoint_dir_now


# 15 ------------------------------------------------------------------------------------------------------------
def test_15_testbed_parts_are_checked_under_python_O(tmp_path):
    code = """
import torch
from workbench.testbed.model import apply_parts
from workbench.testing.tiny import tiny_vlm
m = tiny_vlm("llava", processor=False)
proj = m.hf.model.multi_modal_projector
key, param = next(iter(proj.named_parameters()))
try:
    apply_parts(m.hf, {"projector." + key: torch.zeros(3, 3)}, {"config": {"lora_r": 2, "lora_alpha": 4}})
except ValueError as e:
    print("ValueError:", e)
"""
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert "ValueError: testbed parts do not fit" in out.stdout, out.stdout + out.stderr
    assert "parts (3, 3) vs model" in out.stdout


# doctor ---------------------------------------------------------------------------------------------------------
def test_doctor_names_what_is_wrong_with_each_artifact(tmp_path, tiny_sae):
    m, _, _, sae_folder = tiny_sae
    root = tmp_path / "tree"
    good_sae, bad_sae = root / "saes" / "good", root / "saes" / "bad"
    for f in (good_sae, bad_sae):
        save_sae(load_sae(sae_folder, m), f)
    _flip_byte(next(bad_sae.glob("*.safetensors")))
    store = root / "store"
    harvest(m, PROMPTS * 3, SITE, store, context_length=64, shard_tokens=32, progress=False)
    _flip_byte(sorted(store.glob("shard_*.safetensors"))[0])
    figs = root / "figures" / "01_x"
    save_table(pd.DataFrame({"a": [1]}), "t", figs)
    (figs / "t.csv").write_text("a\n2\n")
    (root / ".tmp-sae-1234").mkdir()
    findings = {str(f.path.relative_to(root)): f for f in doctor([root])}
    assert findings["saes/good"].problem is None and findings["saes/good"].kind == "SAE"
    assert "sha256" in findings["saes/bad"].problem
    assert "sha256 differs" in findings["store"].problem
    assert "t.csv (record t): sha256 differs" in findings["figures/01_x"].problem
    assert findings[".tmp-sae-1234"].kind == "temporary"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert {f.path for f in doctor([root], full=True) if f.problem} >= {bad_sae, store}


def test_a_probe_loads_in_a_fresh_process_from_the_base_module_alone():
    """The card's probe_type finds its class even when only ``methods.probes.base`` was imported (the package
    registers the built-in types), as ``workbench doctor`` and a user's script do."""
    folder = next(p.parent for p in sorted((repo_root() / "probes").rglob("card.json")))
    code = f"from workbench.methods.probes.base import load_probe; print(type(load_probe({str(folder)!r})).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() in ("RidgeProbe", "LogisticProbe", "MLPProbe"), out.stderr
