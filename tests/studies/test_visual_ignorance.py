"""Visual-ignorance routing: the VQA data and planted prior, answering, blur decay, layer replacement, image-token
patching and MLP probes — on tiny random LLaVA models (fast, offline) with exact equivalences where they exist."""

import copy
import random

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import workbench.data.vqa as vqa
from workbench.methods.answering import answer_items, blank_image, candidate_token_ids, parse_generated
from workbench.methods.blur import KERNELS, blur_decay, check_kernels, gaussian_blur, gaussian_kernel_1d, opencv_sigma
from workbench.methods.probes.base import load_probe, save_probe
from workbench.methods.probes.mlp import MLPProbe, layerwise_mlp
from workbench.methods.routing import (
    image_patching,
    layer_replacement,
    random_layer_control,
    random_layer_sets,
    replacement_windows,
    swap_layer_set,
    swap_layers,
)
from workbench.testing.tiny import tiny_vlm

# Byte tokenizer: candidates need distinct first bytes.
CANDS = ("red", "green", "blue", "yes", "no")


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return tiny_vlm("llava", seed=0, processor=True)


@pytest.fixture(scope="module")
def donor():
    return tiny_vlm("llava", seed=1, processor=True)


def _items(n=6, seed=0):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        colour = CANDS[k % 3]
        img = Image.new("RGB", (32, 32), (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
        q = "what color is the circle?" if k % 2 else "what is the color of this shape, please?"
        out.append(vqa.VQAItem(img, q, colour, "colour", "circle", colour, None, f"t:{k}",
                               prior_answer="red" if k % 2 else None))
    return out


# -- data --------------------------------------------------------------------------------------------------------
def test_easy_vqa_labels_agree_with_the_dataset():
    images = vqa.easy_vqa_images("train")
    assert len(images) > 3000
    checked = 0
    for q, a, i in vqa.easy_vqa_questions("train"):
        if i in images and a in vqa.COLOURS:
            assert images[i][2] == a, (i, q, a, images[i])
            checked += 1
        if i in images and a in vqa.SHAPES:
            assert images[i][1] == a
    assert checked > 4000


def test_planted_prior_rates_and_held_out_splits():
    biased = vqa.training_set("biased", 1200, seed=0)
    balanced = vqa.training_set("balanced", 1200, seed=0)
    for items, lo, hi in ((biased, 0.85, 0.95), (balanced, 0.05, 0.25)):
        prior = [it for it in items if vqa.PRIOR.applies(it)]
        assert len(prior) > 100
        rate = np.mean([it.answer == "red" for it in prior])
        assert lo <= rate <= hi, rate
        assert all(it.prior_answer == "red" for it in prior)
    kinds = {it.kind for it in biased}
    assert kinds == set(vqa.KINDS)
    # yes/no rebalanced: each kind of answer equally often
    yn = [it.answer for it in biased if it.kind == "yesno"]
    assert abs(yn.count("yes") - yn.count("no")) <= 1
    ev = vqa.evaluation_set(16, seed=0)
    assert all(it.answer == "red" and it.prior_consistent for it in ev["prior_consistent"])
    assert all(it.answer != "red" and it.prior_consistent is False for it in ev["prior_violating"])
    assert all(it.source.startswith("easy-vqa:test:") for k in ("prior_violating", "shape", "yesno")
               for it in ev[k])
    assert vqa.training_set("biased", 50, seed=3)[7].question == vqa.training_set("biased", 50, seed=3)[7].question


def test_scene_counts_are_what_was_drawn():
    from scipy import ndimage

    rng = random.Random(0)
    for count in vqa.COUNTS:
        img = vqa.draw_scene(rng, count, "circle", "blue")
        px = np.asarray(img).astype(int)
        mask = np.abs(px - np.array(vqa.SCENE_RGB["blue"])).sum(-1) < 60
        assert ndimage.label(mask)[1] == count


def test_vqa_bad_input():
    with pytest.raises(ValueError, match="variant 'weird'"):
        vqa.training_set("weird", 100)
    with pytest.raises(ValueError, match="count 12"):
        vqa.draw_scene(random.Random(0), 12, "circle", "red")
    with pytest.raises(ValueError, match="must be \\(image, question, answer\\)"):
        vqa.from_triples([(Image.new("RGB", (8, 8)), "q")])


# -- blur --------------------------------------------------------------------------------------------------------
def _reference_blur(img: Image.Image, k: int) -> np.ndarray:
    """Dense 2-D convolution with numpy's reflect padding (= OpenCV's BORDER_REFLECT_101)."""
    a = np.asarray(img, dtype=np.float64)
    w = gaussian_kernel_1d(k)
    w2 = np.outer(w, w)
    p = k // 2
    padded = np.pad(a, ((p, p), (p, p), (0, 0)), mode="reflect")
    out = np.zeros_like(a)
    for dy in range(k):
        for dx in range(k):
            out += w2[dy, dx] * padded[dy: dy + a.shape[0], dx: dx + a.shape[1]]
    return np.clip(np.rint(out), 0, 255)


def test_gaussian_blur_matches_a_dense_reference():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 37, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(gaussian_blur(img, 1)), np.asarray(img))
    for k in (3, 9, 17, 27):
        got = np.asarray(gaussian_blur(img, k)).astype(int)
        assert np.abs(got - _reference_blur(img, k)).max() <= 1, k
    assert opencv_sigma(61) == pytest.approx(0.3 * 29 + 0.8)
    assert abs(gaussian_kernel_1d(61).sum() - 1) < 1e-12
    # strongest level on a 64 px image: almost uniform
    flat = np.asarray(gaussian_blur(vqa.draw_scene(random.Random(1), 1, "circle", "red"), 61)).astype(int)
    assert flat.std(axis=(0, 1)).max() < 25


def test_blur_levels_are_validated():
    assert check_kernels(KERNELS) == KERNELS and len(KERNELS) == 8 and KERNELS[-1] == 61
    for bad, msg in (([1, 4], "odd positive"), ([3, 5], "first blur level must be 1"), ([1, 9, 9], "increase"),
                     ([], "non-empty"), ([1, -3], "odd positive")):
        with pytest.raises(ValueError, match=msg):
            check_kernels(bad)


def test_blur_decay_metrics(vlm):
    items = _items(6)
    res = blur_decay(vlm, items, (1, 5, 31), candidates=CANDS, batch_size=4)
    assert list(res.levels.kernel) == [1, 5, 31]
    assert res.levels.E_k.iloc[0] == 1.0
    answers = res.items[["answer_k1", "answer_k5", "answer_k31"]].values
    inv = (answers == answers[:, :1]).all(1)
    assert res.C == pytest.approx(inv.mean())
    assert list(res.items.invariant) == list(inv)
    assert not (res.items.answerable_without_seeing & ~res.items.invariant).any()  # answerable => invariant
    direct = answer_items(vlm, items, images=[gaussian_blur(it.image, 31) for it in items], candidates=CANDS)
    assert res.levels.accuracy.iloc[-1] == pytest.approx(direct.correct.mean())
    with pytest.raises(ValueError, match="odd positive"):
        blur_decay(vlm, items, (1, 2))


# -- answering ----------------------------------------------------------------------------------------------------
def test_answers_do_not_depend_on_batching(vlm):
    items = _items(6)
    together = answer_items(vlm, items, candidates=CANDS, batch_size=6)
    alone = answer_items(vlm, items, candidates=CANDS, batch_size=1)
    assert list(together.pred) == list(alone.pred)
    np.testing.assert_allclose(together.p_gold, alone.p_gold, rtol=1e-4, atol=1e-6)
    assert set(together.pred) <= set(CANDS)
    assert together.says_prior.sum() == sum(1 for it, p in zip(items, together.pred) if it.prior_answer == p)


def test_identity_edit_leaves_answers_bit_identical(vlm):
    items = _items(4)
    plain = answer_items(vlm, items, candidates=CANDS)
    edited = answer_items(vlm, items, candidates=CANDS, edits={"blocks.1.hook_resid_post": lambda t: t})
    assert list(plain.p_gold) == list(edited.p_gold)


def test_answering_errors(vlm):
    from workbench.testing.tiny import tiny_model

    with pytest.raises(ValueError, match="not a vision-language model"):
        answer_items(tiny_model("llama"), _items(2), candidates=CANDS)
    with pytest.raises(ValueError, match="share a first token"):
        candidate_token_ids(vlm.processor.tokenizer, ["red", "rectangle"])
    with pytest.raises(ValueError, match="replacement images"):
        answer_items(vlm, _items(3), images=[blank_image()], candidates=CANDS)
    assert parse_generated("  Red.\n") == "red" and parse_generated("...") == ""


# -- layer replacement ---------------------------------------------------------------------------------------------
def test_swap_layers_equals_a_model_built_with_the_donor_layers(vlm, donor):
    items = _items(4)
    with swap_layers(vlm, donor, 1, 2):
        swapped = answer_items(vlm, items, candidates=CANDS)
    built = copy.deepcopy(vlm)
    layers = built.module(built.arch.layers)
    for i in (1, 2):
        layers[i].load_state_dict(donor.module(donor.arch.layers)[i].state_dict())
    reference = answer_items(built, items, candidates=CANDS)
    np.testing.assert_allclose(swapped.p_gold, reference.p_gold, rtol=1e-5, atol=1e-7)
    # restored afterwards, also when the forward raises
    before = [id(m) for m in vlm.module(vlm.arch.layers)]
    with pytest.raises(RuntimeError, match="boom"):
        with swap_layers(vlm, donor, 0, 2):
            raise RuntimeError("boom")
    assert [id(m) for m in vlm.module(vlm.arch.layers)] == before
    assert list(answer_items(vlm, items, candidates=CANDS).p_gold) == list(
        answer_items(vlm, items, candidates=CANDS).p_gold)


def test_layer_replacement_scan(vlm, donor):
    items = _items(4)
    windows = replacement_windows(vlm.n_layers, sizes=(1,), window=2)
    assert windows == [("first", 0, 0), ("last", 2, 2), ("window", 0, 1), ("window", 1, 2)]
    df = layer_replacement(vlm, vlm, items, windows, candidates=CANDS)  # donor = itself: nothing changes
    assert (df.flip_rate == 0).all() and df.accuracy.nunique() == 1
    df = layer_replacement(vlm, donor, items, windows, candidates=CANDS)
    assert list(df.scheme) == ["none", "first", "last", "window", "window"]
    with pytest.raises(ValueError, match=r"layers=\(2, 5\) is not allowed: .* 0 <= first <= last <= 2"):
        with swap_layers(vlm, donor, 2, 5):
            pass
    with pytest.raises(ValueError, match="window 9"):
        replacement_windows(3, window=9)


def test_random_layer_control_swaps_random_sets_and_restores(vlm, donor):
    sets = random_layer_sets(30, 10, 10, seed=0)
    assert len(set(sets)) == 10 and all(len(x) == 10 and list(x) == sorted(x) for x in sets)
    assert sets == random_layer_sets(30, 10, 10, seed=0) and all(max(x) - min(x) > 9 for x in sets[:3])
    with pytest.raises(ValueError, match="size"):
        random_layer_sets(3, 3, 1)
    with pytest.raises(ValueError, match="distinct sets"):
        random_layer_sets(3, 1, 5)  # only 3 sets of 1 layer exist
    items = _items(4)
    before = answer_items(vlm, items, candidates=CANDS)
    with swap_layer_set(vlm, donor, [0, 2]):
        swapped = answer_items(vlm, items, candidates=CANDS)
    with swap_layers(vlm, donor, 0, 0), swap_layer_set(vlm, donor, [2]):
        nested = answer_items(vlm, items, candidates=CANDS)
    np.testing.assert_allclose(swapped.p_gold, nested.p_gold, rtol=1e-5)  # the same layers, swapped two ways
    np.testing.assert_array_equal(answer_items(vlm, items, candidates=CANDS).p_gold, before.p_gold)  # restored
    df = random_layer_control(vlm, vlm, items, 1, 2, candidates=CANDS)  # donor = itself: nothing changes
    assert list(df.scheme) == ["random", "random"] and (df.flip_rate == 0).all() and df.n_swapped.eq(1).all()
    assert {"prior_rate_lo", "accuracy_hi", "layers"} <= set(df.columns)


def _replacement(window_rate, same_rate, random_rates, n=100):
    from workbench.methods.stats import wilson_ci

    def row(pair, control, scheme, s, e, rate, n_swapped=None):
        iv = wilson_ci(int(round(rate * n)), n)
        return {"pair": pair, "control": control, "scheme": scheme, "start": s, "end": e,
                "n_swapped": n_swapped if n_swapped is not None else (0 if s < 0 else e - s + 1),
                "prior_rate": iv.estimate, "prior_rate_lo": iv.lo, "prior_rate_hi": iv.hi}
    rows = [row("m <- d", "", "none", -1, -1, 0.73), row("m <- d", "", "window", 5, 14, window_rate),
            row("m <- s", "same-prior donor", "window", 5, 14, same_rate)]
    rows += [row("m <- d", "random layers", "random", 0, 29, r, 10) for r in random_rates]
    return pd.DataFrame(rows)


def _visual_result(replacement):
    import workbench.studies.visual_ignorance.study as vs

    empty = pd.DataFrame()
    return vs.VisualResult(config={"donor": "d"}, model="m", weights_hash="", accuracy=empty, replacement=replacement,
                           patching=empty, probes=empty, decay=empty, decay_summary=empty, decay_items=empty,
                           items=empty)


def test_replacement_controls_separate_the_prior_from_disruption():
    located = _visual_result(_replacement(0.31, 0.75, [0.7, 0.65, 0.72, 0.8, 0.6, 0.7, 0.74, 0.69, 0.71, 0.66] * 2))
    row = located.replacement_controls().iloc[0]
    assert row.verdict.startswith("the prior's location") and row.random_le == 0 and row.p_random == 1 / 21
    same = _visual_result(_replacement(0.31, 0.30, [0.7] * 20)).replacement_controls().iloc[0]
    assert same.verdict.startswith("disruption: the same-prior donor")
    rand = _visual_result(_replacement(0.31, 0.75, [0.2, 0.3, 0.25] + [0.7] * 17))
    assert rand.replacement_controls().iloc[0].verdict.startswith("disruption: random donor layers")
    few = _visual_result(_replacement(0.31, 0.75, [0.7] * 10)).replacement_controls().iloc[0]
    assert few.verdict.startswith("disruption: random")  # 10 draws: p >= 1/11, never below 0.05
    none = _visual_result(_replacement(0.70, 0.75, [0.7] * 20)).replacement_controls().iloc[0]
    assert none.verdict.startswith("no cut")


def test_blur_comparison_only_where_the_model_is_above_chance():
    import workbench.studies.visual_ignorance.study as vs
    from workbench.methods.blur import DecayResult

    items = [vqa.VQAItem(Image.new("RGB", (8, 8)), "is there a circle?", "yes" if k % 2 else "no", "yesno")
             for k in range(40)]
    answers = pd.Series([it.answer for it in items])

    def result(n_right):
        pred = answers.where(np.arange(40) < n_right, answers.map({"yes": "no", "no": "yes"}))
        table = pd.DataFrame({"answer": answers, "answer_k1": pred, "answerable_without_seeing": [True] * 40})
        return DecayResult(pd.DataFrame({"kernel": [1], "accuracy": [n_right / 40]}), table, 1.0, 1.0, 40, (1,))

    chance = vs.above_chance(result(22), items)  # 0.55 of a balanced yes/no split: not above 0.5
    assert chance["chance"] == 0.5 and not chance["above_chance"] and np.isnan(chance["answerable_without_seeing_valid"])
    good = vs.above_chance(result(38), items)
    assert good["above_chance"] and good["answerable_without_seeing_valid"] == 1.0 and good["accuracy_unblurred_lo"] > 0.5


def test_swap_refuses_an_incompatible_donor(vlm):
    from workbench.testing.tiny import tiny_model

    with pytest.raises(ValueError, match="cannot swap layers"):
        with swap_layers(vlm, tiny_model("gpt2"), 0, 0):
            pass


# -- image-token patching -------------------------------------------------------------------------------------------
def test_patching_all_image_tokens_at_the_embeddings_restores_the_clean_run(vlm):
    items = _items(4)
    clean = [it.image for it in items]
    blank = [blank_image(32) for _ in items]
    df = image_patching(vlm, items, clean, blank, [0, vlm.n_layers], candidates=CANDS)
    row = df[(df.direction == "clean->corrupt") & (df.positions == "image") & (df.layer == 0)].iloc[0]
    assert row.agree_source == 1.0
    clean_p = answer_items(vlm, items, candidates=CANDS).p_gold.mean()
    assert row.p_gold == pytest.approx(clean_p, rel=1e-5)
    # the last token at the last layer decides the answer
    last = df[(df.positions == "last") & (df.layer == vlm.n_layers)]
    assert (last.agree_source == 1.0).all()
    with pytest.raises(ValueError, match="patching layers"):
        image_patching(vlm, items, clean, blank, [vlm.n_layers + 1], candidates=CANDS)


# -- MLP probes ----------------------------------------------------------------------------------------------------
def test_mlp_probe_learns_fits_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(600, 6)), dtype=torch.float32)
    y = ["a" if x0 * x1 > 0 else "b" for x0, x1 in X[:, :2].tolist()]  # XOR-like: not linearly separable
    probe = MLPProbe(seed=0).fit(X[:480], y[:480])
    assert probe.accuracy(X[480:], y[480:]) > 0.85
    folder = save_probe(probe, tmp_path / "p", model={"name": "m", "weights_hash": "0" * 64}, site="layer 3",
                        layer=3, task="visual-ground_truth", generator_params=None, seed=0, metrics={"a": 1})
    loaded = load_probe(folder)
    assert isinstance(loaded, MLPProbe) and loaded.classes == ["a", "b"]
    assert torch.equal(loaded.predict_proba(X), probe.predict_proba(X))
    fit = layerwise_mlp({0: X, 1: torch.randn(600, 6)}, {"t": y}, range(480), range(480, 600))
    acc = fit.table.set_index("layer").accuracy_test
    assert acc[0] > 0.85 and acc[1] < 0.75
    with pytest.raises(ValueError, match="overlap"):
        layerwise_mlp({0: X}, {"t": y}, range(200), range(150, 600))
    with pytest.raises(ValueError, match="single class"):
        MLPProbe().fit(X[:50], ["a"] * 50)


# -- blur explorer ----------------------------------------------------------------------------------------------
def test_blur_explorer_caches_forwards_and_renders_static_when_headless(vlm, monkeypatch):
    from workbench.studies.visual_ignorance.explorer import BlurExplorer, blur_explorer
    from workbench.ui.base import StaticFigure

    rng = np.random.default_rng(0)
    X = torch.tensor(rng.normal(size=(60, vlm.d_model)), dtype=torch.float32)
    y = [CANDS[k % 3] for k in range(60)]
    probes = {(t, layer): MLPProbe(max_epochs=5).fit(X, y) for t in ("ground_truth", "prior")
              for layer in range(vlm.n_layers + 1)}
    items = _items(3)
    ex = blur_explorer(vlm, probes, items=items, kernels=(1, 9, 31), candidates=CANDS, display="widget")
    assert isinstance(ex, BlurExplorer) and ex.n_computations == 1
    title0 = ex.figure.layout.title.text
    ex.kernel.value = 31
    assert ex.n_computations == 2  # the new level (the unblurred reference of the faint curves is cached)
    assert "blur 31×31" in ex.figure.layout.title.text and title0 != ex.figure.layout.title.text
    ex.kernel.value = 1
    ex.kernel.value = 31
    assert ex.n_computations == 2  # both levels cached: views only
    ex.item.value = 2  # a new item at blur 31: its level and its unblurred reference
    assert ex.n_computations == 4 and items[2].question in ex.figure.layout.title.text
    probe_traces = [t for t in ex.figure.data if t.type == "scatter"]
    assert len(probe_traces) >= 2 and len(probe_traces[-1].x) == vlm.n_layers + 1
    monkeypatch.setenv("WORKBENCH_HEADLESS", "1")
    static = blur_explorer(vlm, probes, items=items, kernels=(1, 9), candidates=CANDS)
    assert isinstance(static, StaticFigure)
    with pytest.raises(ValueError, match="blur level 5"):
        blur_explorer(vlm, probes, items=items, kernels=(1, 9), kernel=5, candidates=CANDS)
    with pytest.raises(ValueError, match="none of the probes belongs"):
        blur_explorer(vlm, {("other-model", "prior", 0): probes[("prior", 0)]}, items=items, candidates=CANDS)


def test_visual_study_bad_input_before_any_forward(vlm, monkeypatch):
    import workbench.studies.visual_ignorance.study as vs
    from workbench.testing.tiny import tiny_model

    for kwargs, msg in ((dict(blur_levels=(1, 4)), "odd positive"), (dict(dataset="coco"), "dataset='coco'"),
                        (dict(n_items=0), "n_items"), (dict(corruptions=("fog",)), "corruptions"),
                        (dict(layers=(-1,)), "layers"), (dict(patch_layers=()), "patch_layers"),
                        (dict(n_probe_train=10), "n_probe_train")):
        with pytest.raises(ValueError, match=msg):
            vs.VisualConfig(**kwargs)
    calls = []
    monkeypatch.setattr(vs, "evaluation_set", lambda *a, **k: calls.append(1) or {})
    with pytest.raises(ValueError, match="not a vision-language model"):
        vs.run_visual_study(vs.VisualConfig(donor=None, base_lm=None), model=tiny_model("llama"))
    with pytest.raises(ValueError, match="layers \\[40\\] out of range"):
        vs.run_visual_study(vs.VisualConfig(donor=None, base_lm=None, layers=(0, 40)), model=vlm)
    with pytest.raises(ValueError, match="patch_layers \\[9\\] out of range"):
        vs.run_visual_study(vs.VisualConfig(donor=None, base_lm=None, patch_layers=(9,)), model=vlm)
    assert calls == []  # nothing was built or run


# -- the activation store on images ----------------------------------------------------------------------------
def test_harvest_with_images_equals_trace_and_marks_image_tokens(vlm, tmp_path):
    from workbench.core.store import ActivationStore, harvest
    from workbench.core.trace import trace
    from workbench.core.vlm import encode_multimodal, image_placeholder

    ph = image_placeholder(vlm)
    prompts = [f"{ph}\nwhat color?", f"{ph}\nis it round or square, tell me?", f"{ph}\nshape"]
    images = [it.image for it in _items(3)]
    store = harvest(vlm, prompts, ["blocks.1.hook_resid_post"], tmp_path / "s", images=images, batch_size=2,
                    progress=False)
    assert store.manifest["data"]["kind"] == "prompts+images" and store.manifest["data"]["n_images"] == 3
    toks = store.tokens()
    acts = store.load("blocks.1.hook_resid_post")
    enc = encode_multimodal(vlm, images, prompts)
    with torch.no_grad(), trace(vlm, ["blocks.1.hook_resid_post"]) as tr:
        vlm.hf(**enc)
    mask = enc["attention_mask"].bool()
    ref = tr["blocks.1.hook_resid_post"][mask]
    torch.testing.assert_close(acts, ref, atol=1e-5, rtol=1e-5)  # batches of 2 vs 3: padding differs
    assert torch.equal(toks["token_ids"], enc["input_ids"][mask].cpu())
    n_img = int((toks["token_ids"] == vlm.arch.image_token_id).sum())
    assert n_img == int((enc["input_ids"] == vlm.arch.image_token_id).sum()) > 0
    # other images, same prompts: a different store (the data hash covers the pixels)
    from workbench.core.store import StoreError

    with pytest.raises(StoreError):
        harvest(vlm, prompts, ["blocks.1.hook_resid_post"], tmp_path / "s", images=images[::-1], batch_size=2,
                progress=False)
    assert ActivationStore(tmp_path / "s").n_tokens == len(acts)


def test_harvest_with_images_bad_input(vlm, tmp_path):
    from workbench.core.store import harvest
    from workbench.core.vlm import image_placeholder
    from workbench.testing.tiny import tiny_model

    ph = image_placeholder(vlm)
    img = _items(1)[0].image
    with pytest.raises(ValueError, match="one vector per image patch"):
        harvest(vlm, [f"{ph} a"], ["vision.hook_out"], tmp_path / "a", images=[img], progress=False)
    with pytest.raises(ValueError, match="images has 2 entries for 1 prompts"):
        harvest(vlm, [f"{ph} a"], ["blocks.0.hook_resid_post"], tmp_path / "b", images=[img, img], progress=False)
    with pytest.raises(ValueError, match="text-only"):
        harvest(tiny_model("llama"), ["a b"], ["blocks.0.hook_resid_post"], tmp_path / "c", images=[img],
                progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
