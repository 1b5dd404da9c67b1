"""Tuned lens: identity = logit lens, training lowers held-out KL, artifacts checked at load, tuned-lens equality."""

import importlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import workbench as wb
from tests.conftest import PROMPTS
from workbench.io.owned import FolderOwnershipError
from workbench.methods.tuned_lens import (
    CARD_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    TunedLens,
    TunedLensError,
    TunedLensTrainConfig,
    from_tuned_lens_package,
    lens_kl,
    load_tuned_lens,
    save_tuned_lens,
    train_tuned_lens,
)
from workbench.testing.tiny import tiny_model

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog, and the cat sat on mat number {i * 7}. " * 6
         for i in range(80)]


def _random_lens(model, seed=0, scale=0.05):
    lens = TunedLens.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return lens


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def trained(llama):
    cfg = TunedLensTrainConfig.smoke(optimizer="adam", lr=10.0, steps=40, context_length=32, heldout_windows=8)
    return train_tuned_lens(llama, cfg, corpus=TEXTS, progress=False)


def test_identity_lens_is_the_logit_lens_bit_for_bit(tiny):
    lens = TunedLens.for_model(tiny)
    plain = wb.logit_lens(tiny, PROMPTS, positions="all", top_k=3, targets=["a"])
    tuned = wb.logit_lens(tiny, PROMPTS, positions="all", top_k=3, targets=["a"], lens=lens)
    pd.testing.assert_frame_equal(plain, tuned)


def test_tuned_lens_frame_matches_manual_translator(llama):
    lens = _random_lens(llama)
    df = wb.logit_lens(llama, PROMPTS, top_k=2, lens=lens)
    with torch.no_grad():
        hs = llama.hf(**llama.encode(PROMPTS), output_hidden_states=True).hidden_states
        for layer in range(llama.n_layers):
            h = hs[layer][:, -1]
            t = lens.translators[layer]
            manual = llama.unembed(llama.final_norm(h + h @ t.weight.T + t.bias)).float()
            top = manual.topk(2, dim=-1)
            for b in range(len(PROMPTS)):
                rows = df[(df.prompt_idx == b) & (df.layer == layer)].sort_values("k")
                assert rows.token_id.tolist() == top.indices[b].tolist()
                torch.testing.assert_close(torch.tensor(rows.logit.values, dtype=torch.float32), top.values[b],
                                           rtol=1e-5, atol=1e-5)
    last = df[df.layer == llama.n_layers]
    plain = wb.logit_lens(llama, PROMPTS, top_k=2, layers=[llama.n_layers])
    assert last.token_id.tolist() == plain.token_id.tolist()  # the last layer has no translator


def test_training_lowers_heldout_kl_at_every_layer(trained, llama):
    kl = pd.DataFrame(trained.card["heldout_kl"]).pivot(index="layer", columns="lens", values="kl_nats")
    inner = kl.loc[: llama.n_layers - 1]
    assert (inner["tuned"] < inner["logit"]).all(), kl
    assert kl.loc[llama.n_layers].eq(0).all()
    assert trained.card["train_tokens"] == 40 * 4 * 32 and len(trained.card["loss_curve"]) == 40
    assert all(p.grad is None for p in llama.hf.parameters())  # no gradient left on the model


def test_lens_kl_agrees_with_an_independent_computation(trained, llama):
    ids = torch.tensor([llama.tokenizer.encode(TEXTS[0], add_special_tokens=False)[:24]])
    kl = lens_kl(llama, {"tuned": trained}, ids)
    with torch.no_grad():
        out = llama.hf(input_ids=ids, output_hidden_states=True)
        p = out.logits.float().log_softmax(-1)
        for layer in (0, 2):
            h = out.hidden_states[layer]
            q = trained.logits(llama, h, layer).float().log_softmax(-1)
            want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()
            got = kl[(kl.layer == layer)].kl_nats.item()
            assert got == pytest.approx(float(want), rel=1e-5)


def test_training_is_seeded(llama):
    cfg = TunedLensTrainConfig.smoke(steps=3, context_length=32, heldout_windows=2, seed=3)
    a = train_tuned_lens(llama, cfg, corpus=TEXTS, progress=False)
    b = train_tuned_lens(llama, cfg, corpus=TEXTS, progress=False)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_lstsq_init_fits_the_last_residual(llama):
    cfg = TunedLensTrainConfig.smoke(init="lstsq", lstsq_windows=16, steps=1, lr=1e-12, context_length=32,
                                     heldout_windows=4)
    lens = train_tuned_lens(llama, cfg, corpus=TEXTS, progress=False)
    kl = pd.DataFrame(lens.card["heldout_kl"]).pivot(index="layer", columns="lens", values="kl_nats")
    assert (kl.loc[: llama.n_layers - 1, "tuned"] < kl.loc[: llama.n_layers - 1, "logit"]).all(), kl
    assert lens.card["lstsq_tokens"] == 16 * 32


def test_save_load_roundtrip_and_refusals(tmp_path, trained, llama):
    folder = save_tuned_lens(trained, tmp_path / "lens")
    assert {p.name for p in folder.iterdir()} >= {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE}
    back = load_tuned_lens(folder, model=llama)
    for pa, pb in zip(trained.parameters(), back.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert back.card["heldout_kl"] == json.loads(json.dumps(trained.card["heldout_kl"]))
    with pytest.raises(FolderOwnershipError, match="already holds a tuned-lens"):
        save_tuned_lens(trained, folder)
    assert load_tuned_lens(save_tuned_lens(trained, folder, overwrite=True)).card["weights_sha256"]
    # another model's weights: refused at load and by the lens
    other = tiny_model("llama", seed=1)
    with pytest.raises(TunedLensError, match="not on these weights"):
        load_tuned_lens(folder, model=other)
    with pytest.raises(TunedLensError, match="not on these weights"):
        wb.logit_lens(other, PROMPTS, lens=back)
    with pytest.raises(TunedLensError, match="layers of width"):
        wb.logit_lens(tiny_model("gpt2"), PROMPTS, lens=TunedLens(5, 64))
    # a changed weights file or config: refused
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 1
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(TunedLensError, match="sha256"):
        load_tuned_lens(folder)
    folder2 = save_tuned_lens(trained, tmp_path / "lens2")
    cfg = json.loads((folder2 / CONFIG_FILE).read_text())
    cfg["n_layers"] = 2
    (folder2 / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(TunedLensError, match="cfg.json: sha256"):  # the card records every file's sha256
        load_tuned_lens(folder2)
    card = json.loads((folder2 / CARD_FILE).read_text())
    (folder2 / CARD_FILE).write_text(json.dumps({k: v for k, v in card.items() if k != "files"}))  # an older card
    with pytest.raises(TunedLensError, match="does not match its card"):  # its config_sha256 still holds
        load_tuned_lens(folder2)


def test_bad_configs_fail_before_any_work(llama):
    for bad in ({"steps": 0}, {"optimizer": "lbfgs"}, {"lr": float("nan")}, {"momentum": 1.0}, {"init": "random"},
                {"warmup_steps": 500}, {"context_length": 1}):
        with pytest.raises(TunedLensError, match=next(iter(bad))):
            train_tuned_lens(llama, TunedLensTrainConfig.smoke(**bad), corpus=TEXTS, progress=False)
    with pytest.raises(TunedLensError, match="holds only"):
        train_tuned_lens(llama, TunedLensTrainConfig.smoke(heldout_windows=10_000), corpus=TEXTS[:2], progress=False)


def test_equals_the_tuned_lens_package_on_the_same_weights(tmp_path, llama):
    """The tuned-lens package's own TunedLens, given weights, saved by its own save(); we read params.pt with
    weights_only=True and must give the same logits at every layer to 1e-5."""
    tl = _reference_tuned_lens()
    theirs = tl.TunedLens.from_model(llama.hf)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.layer_translators.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save(tmp_path / "pkg")
    ours = from_tuned_lens_package(tmp_path / "pkg", llama)
    h = torch.randn(2, 5, llama.d_model, generator=g)
    with torch.no_grad():
        for layer in range(llama.n_layers):
            torch.testing.assert_close(ours.logits(llama, h, layer), theirs(h, idx=layer), rtol=1e-5, atol=1e-5)


def test_package_checkpoint_is_never_unpickled(tmp_path, llama):
    """A params.pt holding an arbitrary object is refused by torch.load(weights_only=True), not executed."""
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": llama.n_layers, "d_model": llama.d_model}))
    torch.save({"0.weight": torch.zeros(1), "payload": _Boom()}, folder / "params.pt")
    with pytest.raises(TunedLensError, match="tensors-only"):
        from_tuned_lens_package(folder, llama)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 99, "d_model": llama.d_model}))
    with pytest.raises(TunedLensError, match="99 layers"):
        from_tuned_lens_package(folder, llama)


def _reference_tuned_lens():
    """``tuned_lens.nn`` from .venv/reference (requirements/reference.txt, installed by make setup), imported with
    that folder on sys.path for this import only (its wheel also holds a top-level ``tests`` package)."""
    folder = Path(sys.prefix) / "reference"
    assert (folder / "tuned_lens").is_dir(), f"no tuned-lens in {folder}: run `make setup` (requirements/reference.txt)"
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("tuned_lens.nn")
    finally:
        sys.path.remove(str(folder))


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_float16_storage_is_what_was_measured(tmp_path, llama):
    cfg = TunedLensTrainConfig.smoke(steps=3, context_length=32, heldout_windows=2, store_dtype="float16")
    lens = train_tuned_lens(llama, cfg, corpus=TEXTS, progress=False)
    for p in lens.parameters():  # rounded before the held-out evaluation: the card measures the stored weights
        assert p.dtype == torch.float32 and torch.equal(p, p.half().float())
    folder = save_tuned_lens(lens, tmp_path / "half")
    assert json.loads((folder / CONFIG_FILE).read_text())["dtype"] == "float16"
    back = load_tuned_lens(folder, model=llama)
    for pa, pb in zip(lens.parameters(), back.parameters(), strict=True):
        assert torch.equal(pa, pb)
    ids = torch.tensor([llama.tokenizer.encode(TEXTS[1], add_special_tokens=False)[:32]])
    pd.testing.assert_frame_equal(lens_kl(llama, {"t": lens}, ids), lens_kl(llama, {"t": back}, ids))


def test_doctor_checks_tuned_lens_folders(tmp_path, trained):
    from workbench.batch.doctor import doctor

    folder = save_tuned_lens(trained, tmp_path / "probes" / "m" / "tuned-lens")
    (found,) = [f for f in doctor([tmp_path]) if f.path == folder]
    assert found.kind == "tuned lens" and found.problem is None
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 1
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    (found,) = [f for f in doctor([tmp_path]) if f.path == folder]
    assert "sha256" in found.problem
