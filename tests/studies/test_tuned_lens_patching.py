"""The readout study's config, figures and explorer, on results made from a tiny model (the notebook's smoke run
covers run_tuned_lens_patching_study on the real model)."""

import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench.methods.patching import activation_patching, attribution_patching, patching_agreement
from workbench.methods.tuned_lens import TunedLens, lens_kl
from workbench.plotting.patching import patching_map_figure
from workbench.studies.tuned_lens_patching.explorer import PatchingExplorer, explorer_figure, patching_explorer
from workbench.studies.tuned_lens_patching.study import TunedLensPatchingConfig, TunedLensPatchingResult
from workbench.testing.tiny import tiny_model
from workbench.ui.base import StaticFigure

PAIRS = pd.DataFrame([
    {"clean": "abcdef", "corrupt": "abxdef", "answer": "a", "wrong": "b"},
    {"clean": "hello there", "corrupt": "jello there", "answer": "o", "wrong": "e"},
])


@pytest.fixture(scope="module")
def result():
    m = tiny_model("llama")
    kinds = ("resid", "mlp", "head")
    patching = {"exact": activation_patching(m, PAIRS, site_types=kinds, progress=False),
                "atp": attribution_patching(m, PAIRS, site_types=kinds, progress=False),
                "ig": attribution_patching(m, PAIRS, method="ig", site_types=kinds, progress=False)}
    import torch

    kl = lens_kl(m, {"logit": None, "tuned": TunedLens.for_model(m)}, torch.randint(0, 250, (2, 12)))
    counting = pd.DataFrame({"lens": ["logit", "tuned"] * 2, "layer": [0, 0, 3, 3],
                             "digit_accuracy": [0.1, 0.2, 0.3, 0.3], "gold_prob_digits": [0.1, 0.2, 0.3, 0.3],
                             "gold_rank_median": [5, 3, 1, 1]})
    return TunedLensPatchingResult(config={}, model={"name": m.name}, lens_source="test", lens_card={}, kl=kl, counting=counting,
                         pairs=PAIRS, patching=patching,
                         agreement=patching_agreement(patching["exact"], patching["atp"], patching["ig"]))


def test_figures_and_tables(result):
    figs = result.figures()
    assert set(figs) == {"heldout_kl", "counting_digit_accuracy", "patching_agreement", "patching_map_exact",
                         "patching_map_atp"}
    assert all(isinstance(f, go.Figure) and f.data for f in figs.values())
    assert set(result.tables()["patching_scores"].method) == {"exact", "atp", "ig"}
    assert not set(figs) & set(result.tables())  # save_figures refuses a name that is both
    assert {"kl_bits_logit", "kl_bits_tuned", "digit_acc_logit", "digit_acc_tuned"} <= set(result.summary().columns)
    per_pair = patching_map_figure(result.patching["exact"], pair=1)
    assert len(per_pair.data) == 3  # resid, mlp, head panels
    with pytest.raises(ValueError, match="pair 7"):
        patching_map_figure(result.patching["exact"], pair=7)


def test_explorer_static_and_widget(result):
    fig = patching_explorer(result, display="static")
    assert isinstance(fig, StaticFigure) and fig.data
    ex = patching_explorer(result, display="widget", method="atp", pair=1)
    assert isinstance(ex, PatchingExplorer) and "abxdef" not in ex.prompts.value and "jello" in ex.prompts.value
    ex.pair.value = -1
    assert "2 IOI pairs" in ex.prompts.value and ex.status.value == ""
    ex.method.value = "ig"
    assert ex.status.value == ""
    with pytest.raises(ValueError, match="method must be one of"):
        explorer_figure(result, "gradient", 0)
    with pytest.raises(ValueError, match="pair must be an int"):
        patching_explorer(result, pair=5, display="static")


def test_config_checks_before_any_work():
    for bad, match in [({"lens": "hub"}, "lens must be"), ({"lens_recipe": "tpu"}, "lens_recipe"),
                       ({"site_types": ("resid", "head")}, "head_positions"), ({"n_pairs": 0}, "n_pairs"),
                       ({"counting_task": "sheep"}, "counting_task"),
                       ({"site_types": (), "head_positions": ()}, "nothing to patch")]:
        with pytest.raises(ValueError, match=match):
            TunedLensPatchingConfig(**bad)
    smoke = TunedLensPatchingConfig.smoke_config()
    assert smoke.smoke and smoke.n_pairs < TunedLensPatchingConfig().n_pairs


def test_counting_by_layer_last_layer_is_the_models_own_digit_choice(smollm2):
    import numpy as np
    import torch

    from workbench.data.tasks import digit_token_ids, make_task
    from workbench.studies.tuned_lens_patching.study import counting_by_layer

    table = counting_by_layer(smollm2, None, "entity", 18, seed=3)
    ts = make_task("entity", 18, seed=3, answer_prefix="")
    prompts = [p + " " for p in ts.prompts]  # SmolLM2 splits " 3": the prompt ends with the space, as in counting
    digits = digit_token_ids(smollm2.tokenizer, "", context=prompts[0])
    with torch.no_grad():
        logits = smollm2.hf(**smollm2.encode(prompts)).logits[:, -1, digits].float()
    want = float((logits.argmax(-1).numpy() == np.asarray(ts.counts) - 1).mean())
    last = table[table.layer == smollm2.n_layers]
    assert last.digit_accuracy.item() == pytest.approx(want)
    assert table.layer.tolist() == list(range(smollm2.n_layers + 1))
    assert table.gold_prob_digits.between(0, 1).all()


def test_the_smoke_recipe_is_sized_by_cost():
    """The smoke lens shrinks with layers x vocabulary x width instead of running a fixed recipe."""
    from workbench.methods.tuned_lens import SMOKE_BUDGET, SMOKE_LOGIT_OPS, TunedLensTrainConfig

    small = TunedLensTrainConfig.smoke(tiny_model("llama"))
    assert (small.steps, small.batch_size, small.heldout_windows) == (10, 4, 4)  # cheap: the cap
    big = _deep_wide_model()
    cfg = TunedLensTrainConfig.smoke(big)
    per_token = big.n_layers * big.W_U.shape[0] * (big.d_model + SMOKE_LOGIT_OPS)
    tokens = (cfg.steps * cfg.batch_size + cfg.heldout_windows) * cfg.context_length
    assert tokens * per_token <= SMOKE_BUDGET or (cfg.steps, cfg.batch_size, cfg.heldout_windows) == (1, 1, 1)
    assert cfg.steps * cfg.batch_size < small.steps * small.batch_size
    assert TunedLensTrainConfig.smoke(big, steps=7).steps == 7  # overrides win


def _deep_wide_model(tokenizer=None):
    """Random weights with Qwen2.5-1.5B's depth and vocabulary (28 layers, 151,936 tokens) at width 64: larger than
    every registry model where the smoke cost grows (layers x vocabulary)."""
    import torch
    import transformers as T

    from workbench.core.models import from_hf
    from workbench.testing.tiny import byte_tokenizer

    cfg = T.Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=28,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return from_hf(hf, tokenizer or byte_tokenizer(), name="deep-wide")


@pytest.mark.integration
@pytest.mark.notebook
def test_notebook_06_smoke_on_a_model_larger_than_the_registrys(tmp_path, monkeypatch):
    """`workbench run 06 --smoke -p model=<folder>` on a 28-layer, 152k-vocabulary model finishes (it trained the
    cost-sized smoke lens, not the 15-minute CPU recipe)."""
    from transformers import AutoTokenizer

    import workbench.batch.runner as nbs
    from workbench.io.figures import STATIC_EXPORT_ENV
    from workbench.testbed.tiny import ensure_tiny_lm

    tok = AutoTokenizer.from_pretrained(ensure_tiny_lm())  # SmolLM2's tokenizer: IOI names are single tokens
    folder = tmp_path / "deep-wide"
    m = _deep_wide_model(tok)
    m.hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    monkeypatch.setenv(STATIC_EXPORT_ENV, "0")
    (result,) = nbs.run_notebooks(["06_tuned_lens_patching"], smoke=True, figures_dir=tmp_path / "figures",
                                  parameters={"model": str(folder)})
    assert result.ok, result.error
    text = (result.output_dir / "06_tuned_lens_patching.ipynb").read_text()
    assert "tuned lens: trained here" in text
