"""The readout study's config, figures and explorer, on results made from a tiny model (the notebook's smoke run
covers run_tuned_lens_patching_study on the real model)."""

import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench.methods.patching import activation_patching, attribution_patching, patching_agreement
from workbench.methods.plots import patching_map_figure
from workbench.methods.tuned_lens import TunedLens, lens_kl
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
