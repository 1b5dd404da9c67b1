"""workbench.ui: explorer structure, view changes that never re-run the model, the static (headless) rule."""

import contextlib
import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import workbench.ui.base as ui_base
from workbench.data.reasoning import make_reasoning_task
from workbench.methods.latent import run_modes
from workbench.methods.probes.base import r2_score
from workbench.studies.counting_readout.explorer import ProbeExplorer, probe_explorer
from workbench.studies.counting_readout.study import CountingConfig, run_counting_study, save_counting_result
from workbench.studies.latent_drift.explorer import LatentScrubber, latent_scrubber
from workbench.studies.latent_drift.study import DriftConfig, run_drift_study, save_drift_result
from workbench.testing.tiny import tiny_model
from workbench.ui.base import StaticFigure, resolve_display
from workbench.ui.lens import LensExplorer, lens_explorer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def other():
    return tiny_model("gpt2")


@contextlib.contextmanager
def forwards(*models):
    """Count the forward passes of the models' transformers modules."""
    calls = []
    handles = [m.hf.register_forward_pre_hook(lambda mod, args: calls.append(1)) for m in models]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(autouse=True)
def _no_headless_env(monkeypatch):
    monkeypatch.delenv("WORKBENCH_HEADLESS", raising=False)


# -- the display rule ----------------------------------------------------------------------------------------------

def test_display_rule(monkeypatch):
    assert resolve_display("widget") == "widget" and resolve_display("static") == "static"
    assert resolve_display("auto") == "static"  # pytest is no IPython kernel
    monkeypatch.setattr(ui_base, "_in_kernel", lambda: True)
    assert resolve_display("auto") == "widget"
    for value in ("1", "true", "YES"):
        monkeypatch.setenv("WORKBENCH_HEADLESS", value)
        assert resolve_display("auto") == "static"
        assert resolve_display("widget") == "widget"  # an explicit choice wins
    monkeypatch.setenv("WORKBENCH_HEADLESS", "0")
    assert resolve_display("auto") == "widget"
    with pytest.raises(ValueError, match=r"display must be one of \['auto', 'widget', 'static'\], got 'gui'"):
        resolve_display("gui")


def test_the_runner_sets_the_headless_variable_for_its_kernels(tmp_path):
    import os

    from workbench.batch.runner import _kernel_environment

    with _kernel_environment("01_x", None, tmp_path):
        assert os.environ["WORKBENCH_HEADLESS"] == "1"
        assert os.environ["WORKBENCH_FIGURES_ROOT"] == str(tmp_path)  # one shared plotly.min.js for the tree
        assert resolve_display("auto") == "static"
    assert "WORKBENCH_HEADLESS" not in os.environ and "WORKBENCH_FIGURES_ROOT" not in os.environ


# -- logit-lens explorer -----------------------------------------------------------------------------------------

def test_lens_explorer_views_never_rerun_the_model(model):
    with forwards(model) as calls:
        ex = lens_explorer(model, "hello world", display="widget")
        assert isinstance(ex, LensExplorer) and isinstance(ex.figure, go.FigureWidget)
        assert len(calls) == 1 and ex.n_computations == 1
        assert ex.layers.min == 0 and ex.layers.max == model.n_layers and ex.layers.value == (0, model.n_layers)
        n_tokens = len(model.tokenizer("hello world")["input_ids"])
        assert ex.positions.value == (0, n_tokens - 1)
        assert list(ex.figure.layout.yaxis.ticktext) == [str(i) for i in range(model.n_layers + 1)]
        z_before = np.array(ex.figure.data[0].z, dtype=float)

        ex.layers.value = (1, 2)
        assert list(ex.figure.layout.yaxis.ticktext) == ["1", "2"]
        assert np.array_equal(np.array(ex.figure.data[0].z, dtype=float), z_before[1:3])
        ex.positions.value = (2, 4)
        assert [t.split("<br>")[0] for t in ex.figure.layout.xaxis.ticktext] == ["e", "l", "l"]  # 0 is <bos>
        assert "layers 1–2, positions 2–4" in ex.figure.layout.title.text
        ex.colour.value = "logit"
        assert ex.figure.data[0].zmin is None and ex.figure.data[0].colorbar.title.text == "top-1 logit"
        ex.colour.value = "prob"
        assert ex.figure.data[0].zmax == 1.0
        assert len(calls) == 1 and ex.n_computations == 1  # views only: no forward

        ex.prompt.value = "abc"  # a new prompt: one forward, positions reset to the new prompt
        assert len(calls) == 2 and ex.positions.value == (0, 3)
        assert "“abc”" in ex.figure.layout.title.text
        ex.prompt.value = "hello world"  # cached
        assert len(calls) == 2 and ex.n_computations == 2


def test_lens_explorer_model_choice_and_errors_in_the_widget(model, other):
    with forwards(model, other) as calls:
        ex = lens_explorer({"a": model, "b": other}, "hi", display="widget")
        assert list(ex.model_choice.options) == ["a", "b"] and len(calls) == 1
        ex.model_choice.value = "b"
        assert len(calls) == 2 and ex.figure.layout.title.text.startswith("b ·")
        ex.prompt.value = "   "  # reported in the widget, the figure keeps the last good view
        assert "non-empty" in ex.status.value and len(calls) == 2
        assert ex.figure.layout.title.text.startswith("b · “hi”")


def test_lens_explorer_bad_input_before_any_forward(model):
    with forwards(model) as calls:
        with pytest.raises(ValueError, match=r"layers must be a \(first, last\) pair .* 0 <= first <= last <= 3"):
            lens_explorer(model, "hi", layers=(2, 9))
        with pytest.raises(ValueError, match="value must be one of"):
            lens_explorer(model, "hi", value="rank")
        with pytest.raises(ValueError, match="prompt must be a non-empty string"):
            lens_explorer(model, "")
        with pytest.raises(ValueError, match="models is empty"):
            lens_explorer({}, "hi")
        with pytest.raises(TypeError, match="workbench Model or a model name"):
            lens_explorer([model, 3], "hi")
        with pytest.raises(ValueError, match="display must be one of"):
            lens_explorer(model, "hi", display="window")
    assert calls == []


def test_static_figure_when_headless(model, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_HEADLESS", "1")
    fig = lens_explorer(model, "hello world", layers=(1, 3))
    assert isinstance(fig, StaticFigure) and isinstance(fig, go.Figure)
    widget = lens_explorer(model, "hello world", layers=(1, 3), display="widget")
    assert json.loads(fig.to_json()) == json.loads(widget.render().to_json())  # the same view
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "none"))
    bundle = fig._repr_mimebundle_()
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["type"] == "heatmap"
    assert bundle["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] == fig.layout.title.text
    assert "image/png" not in bundle and "no PNG" in bundle["text/plain"] and "BROWSER_PATH" in bundle["text/plain"]


def test_static_figure_png_with_a_browser(model, monkeypatch):
    from workbench.io.figures import find_browser

    if find_browser()[0] is None:
        pytest.fail("no Chrome/Chromium: install Debian's chromium (.ci/install-chromium.sh)")
    import base64

    bundle = lens_explorer(model, "hi", display="static")._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


# -- probe explorer ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counting(model):
    cfg = CountingConfig.smoke_config(tasks=("list_length", "addition"), interventions=())
    return run_counting_study(cfg, model=model, progress=False)


def test_probe_explorer_predictions_reproduce_the_study(model, counting):
    with forwards(model) as calls:
        ex = probe_explorer(counting, model=model, display="widget")
        assert isinstance(ex, ProbeExplorer)
        assert list(ex.task.options) == ["list_length", "addition"] and list(ex.seed.options) == [11]
        assert list(ex.layer.options) == counting.config["layers"]
        after_fit = len(calls)
        assert after_fit > 0 and ex.n_computations == 1
        table = counting.probes[(counting.probes.task == "list_length") & (counting.probes.variant == "last_token")]
        r2 = table.set_index("layer").r2_test
        assert ex.layer.value == int(r2.idxmax())  # starts at the best held-out layer
        tp = ex.data.live("list_length", 11)
        for layer in ex.layer.options:  # refitted probes equal the study's: same prompts, split, features
            got = r2_score(torch.as_tensor(tp.predictions[layer]), torch.as_tensor(tp.y_test))
            assert got == pytest.approx(r2[layer], abs=1e-9)
            ex.layer.value = layer
            marker, scatter = ex.figure.data[1], ex.figure.data[6]
            assert marker.x == (layer,) and marker.y[0] == pytest.approx(r2[layer])
            assert np.allclose(scatter.y, tp.predictions[layer]) and np.allclose(scatter.x, tp.y_test)
            assert f"layer {layer}: R² {r2[layer]:.3f}" in ex.figure.layout.title.text
        assert len(calls) == after_fit  # moving the layer never runs the model

        ex.task.value = "addition"  # a new task: one feature pass, then cached
        assert ex.n_computations == 2 and "addition" in ex.figure.layout.title.text
        n = len(calls)
        ex.task.value = "list_length"
        assert len(calls) == n and ex.n_computations == 2


def test_probe_explorer_from_a_folder_and_live(model, other, counting, tmp_path):
    save_counting_result(counting, tmp_path)
    fig = probe_explorer(tmp_path, task="addition", layer=2, display="static")
    assert isinstance(fig, StaticFigure)
    assert fig.layout.annotations[2].text == "predicted vs true: needs the model (model=...)"
    assert len(fig.data[6].x) == 0  # no predictions without the model
    row = counting.probes.query("task == 'addition' and variant == 'last_token' and layer == 2").iloc[0]
    assert fig.data[1].y[0] == pytest.approx(row.r2_test)
    with pytest.raises(ValueError, match="results were made with weights"):
        probe_explorer(tmp_path, model=other)
    with pytest.raises(ValueError, match="unknown task 'entity'"):
        probe_explorer(tmp_path, task="entity")
    with pytest.raises(ValueError, match=r"layer 7 was not probed; probed layers: \[0, 1, 2, 3\]"):
        probe_explorer(tmp_path, layer=7)
    with pytest.raises(TypeError, match="probe_explorer needs"):
        probe_explorer(3.5)

    live = probe_explorer(model, tasks=["list_length"], n_train=27, n_test=18, display="widget")
    assert live.n_computations == 1 and list(live.layer.options) == list(range(model.n_layers + 1))
    assert len(live.figure.data[6].x) == 18


# -- latent-step scrubber ----------------------------------------------------------------------------------------

def test_latent_scrubber_from_runs_never_reruns(model):
    rs = make_reasoning_task("arithmetic", 8, n_hops=2, seed=0)
    runs = run_modes(model, rs, ["coconut", "cot", "direct"], 3)
    with forwards(model) as calls:
        ex = latent_scrubber(runs, model=model, reasoning=rs, display="widget")
        assert isinstance(ex, LatentScrubber)
        assert list(ex.latent_mode.options) == ["coconut", "cot"]  # direct has no steps
        assert ex.step.min == 1 and ex.step.max == 3 and ex.n_computations == 2
        steps = ex.tables.steps[ex.tables.steps["mode"] == "coconut"].set_index("step")
        for k in (1, 2, 3):
            ex.step.value = k
            marker = ex.figure.data[4]  # the max-cos marker (after the 3 lens-by-layer lines and max-cos line)
            assert marker.x == (k,) and marker.y[0] == pytest.approx(steps.max_cos[k])
            bold = [t for t in ex.figure.data[:3] if t.line.width == 3]
            assert [t.name for t in bold] == [f"step {k}"]
            assert f"step {k} of 3" in ex.figure.layout.title.text
        ex.latent_mode.value = "cot"
        assert "cot · step 3" in ex.figure.layout.title.text
        ex.lens_value.value = "median_gold_rank"
        assert ex.figure.layout.yaxis.type == "log"
        ex.lens_value.value = "mean_gold_prob"
        assert ex.figure.layout.yaxis.type is None
    assert calls == []  # the metrics come from the runs: the model never runs again (the lens is a head matmul)


def test_latent_scrubber_from_saved_results(model, tmp_path):
    res = run_drift_study(DriftConfig.smoke_config(model="tiny"), model=model)
    save_drift_result(res, tmp_path)
    fig = latent_scrubber(tmp_path, latent_mode="soft", step=2, display="static")
    assert isinstance(fig, StaticFigure) and "soft · step 2 of 3" in fig.layout.title.text
    with pytest.raises(ValueError, match=r"step must be an int in 1..3 for mode 'coconut', got 4"):
        latent_scrubber(res, step=4)
    with pytest.raises(ValueError, match=r"unknown mode 'direct'"):
        latent_scrubber(res, latent_mode="direct")
    with pytest.raises(ValueError, match="lens_value must be one of"):
        latent_scrubber(res, lens_value="rank")
    with pytest.raises(ValueError, match="need model="):
        latent_scrubber(run_modes(model, make_reasoning_task("arithmetic", 8, n_hops=2), ["cot"], 2))
    with pytest.raises(ValueError, match="lacks"):
        latent_scrubber(tmp_path / "..")
