"""workbench.io.gallery: one block per notebook run with its parameters once, figures as a grid of thumbnails,
tables as preview rows, no 'None' for an unknown wall time."""

import re

import pandas as pd
import plotly.graph_objects as go
import pytest

import workbench.io.figures as figures_mod
from workbench.io.figures import save_figure, save_table
from workbench.io.gallery import PREVIEW_ROWS, write_gallery
from workbench.io.manifest import annotate_records

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
PARAMS = {"model": "tiny", "prompts": ["a b c", "d e f"], "smoke": False, "marker_param": 123}


@pytest.fixture
def fake_png(monkeypatch):
    """Static export without a browser: every figure gets a small PNG."""
    monkeypatch.delenv("WORKBENCH_REQUIRE_STATIC", raising=False)
    monkeypatch.setattr(figures_mod, "find_browser", lambda: ("/bin/true", ""))
    monkeypatch.setattr(figures_mod, "export_static", lambda fig, browser, *a, **k: {"png": PNG})


def _fig():
    return go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))


def _run(out, stem, *, wall=None):
    frame = pd.DataFrame({"layer": range(40), "value": [i / 10 for i in range(40)], "token": ["␣x"] * 40})
    save_figure(_fig(), "curve", out, params=PARAMS, seed=0, notebook=stem, wall_time_s=wall)
    save_figure(_fig(), "heat", out, params=PARAMS | {"value": "logit"}, seed=0, notebook=stem)
    save_table(frame, "values", out, params=PARAMS, seed=0, notebook=stem)
    save_table(frame.iloc[:0], "empty", out, params=PARAMS, seed=0, notebook=stem)
    annotate_records(out, ["curve", "heat", "values", "empty"], {
        "status": "ok", "run": {"error": None, "executed_notebook": f"{stem}.ipynb", "wall_time_s": 12.345,
                                "parameters": {"smoke": False}}})


def test_gallery_groups_by_run_with_parameters_once(tmp_path, fake_png):
    _run(tmp_path / "01_demo", "01_demo", wall=1.5)
    _run(tmp_path / "01_demo" / "model-other__abc", "01_demo")
    text = write_gallery(tmp_path).read_text()

    # one parameter block per run (two runs: the default folder and a parameter-setting subfolder)
    assert text.count("<table class='params'>") == 2
    assert text.count("marker_param") == 2
    assert text.count("run status") == 2 and "ok, 12.3 s" in text
    # the parameter that differs for one figure is listed under that figure only
    assert text.count("&quot;logit&quot;") == 2
    # figures as a grid of thumbnails
    assert text.count("<div class='grid'>") == 2
    assert len(re.findall(r"<div class='card'><a href='01_demo/curve.html'><img src='01_demo/curve.png'", text)) == 1
    assert "01_demo/model-other__abc/heat.png" in text
    # no unknown wall time printed as None
    assert "None" not in text and "wall time 1.5 s" in text  # only "curve" has one: under that figure
    assert "wall time</b></td><td>" not in text
    assert "<h2>01_demo/model-other__abc</h2>" in text


def test_gallery_previews_table_rows(tmp_path, fake_png):
    _run(tmp_path / "02_demo", "02_demo")
    text = write_gallery(tmp_path).read_text()
    start = text.index("<b>values</b>")
    block = text[start:text.index("</table></div>", start)]
    assert "40 rows × 3 columns" in block
    assert "<th>layer</th><th>value</th><th>token</th>" in block
    rows = re.findall(r"<tr><td>(\d+)</td><td>([\d.]+)</td><td>␣x</td></tr>", block)
    assert rows == [(str(i), str(i / 10)) for i in range(PREVIEW_ROWS)]
    assert "0 rows × 3 columns, no rows" in text[text.index("<b>empty</b>"):start]


def test_gallery_states_a_shared_wall_time_once(tmp_path, fake_png):
    out = tmp_path / "05_demo"
    for name in ("a", "b"):
        save_figure(_fig(), name, out, params={"x": 1}, wall_time_s=7.25)
    text = write_gallery(tmp_path).read_text()
    assert text.count("7.2 s") == 1 and "<b>wall time</b>" in text


def test_gallery_without_runner_stamp_and_unreadable_manifest(tmp_path, fake_png):
    save_figure(_fig(), "lonely", tmp_path / "03_demo", params={"a": 1})  # saved by hand: no run, no wall time
    (tmp_path / "04_broken").mkdir()
    (tmp_path / "04_broken" / "manifest.json").write_text("{not json")
    text = write_gallery(tmp_path).read_text()
    assert "lonely.png" in text and "run status" not in text and "None" not in text
    assert "unreadable manifest" in text
