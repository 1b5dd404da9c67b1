"""workbench.io.figures (save_figure, manifest, static export), the theme and the lens figures of workbench.plotting
on a tiny model's lens."""

import json
import re
import threading
import warnings

import pandas as pd
import plotly.graph_objects as go
import pytest

from workbench import logit_lens
from workbench.io.atomic import sha256_file
from workbench.io.figures import StaticExportError, find_browser, save_figure, save_table
from workbench.io.gallery import write_gallery
from workbench.io.manifest import read_manifest
from workbench.plotting.lens import lens_heatmap, lens_target_curve, lens_target_summary
from workbench.plotting.theme import PAPER_TEMPLATE, apply_theme
from workbench.testing.tiny import tiny_model

PROMPTS = ["hello world", "abc"]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def lens(model):
    return logit_lens(model, PROMPTS, positions="all", top_k=3, targets=[["o"], ["c"]])


@pytest.fixture
def no_browser(monkeypatch, tmp_path):
    """An invalid $BROWSER_PATH: static export is unavailable (and the tests that use this stay fast)."""
    bad = tmp_path / "no-such-chromium"
    monkeypatch.setenv("BROWSER_PATH", str(bad))
    monkeypatch.delenv("WORKBENCH_REQUIRE_STATIC", raising=False)
    return bad


def _simple_fig():
    return apply_theme(go.Figure(go.Scatter(x=[0, 1, 2], y=[1, 3, 2], name="line")))


# -- save_figure ------------------------------------------------------------------------------------------------

def test_html_opens_offline_and_manifest_has_provenance(tmp_path, model, lens, no_browser):
    out = tmp_path / "figs" / "01_demo"
    fig = lens_heatmap(lens, 0)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        rec = save_figure(fig, "heat", out, model=model, params={"prompts": PROMPTS, "layers": None}, seed=3,
                          notebook="01_demo", wall_time_s=1.25)
    html = (out / "heat.html").read_text()
    srcs = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']([^\"']+)", html)
    assert not [s for s in srcs if "cdn." in s], srcs
    assert "cdn.plot.ly" not in html.split("<body")[0]
    # plotly.js: one shared copy beside the figure (no WORKBENCH_FIGURES_ROOT here), referenced relatively
    assert srcs == ["plotly.min.js"] and (out / "plotly.min.js").stat().st_size > 1_000_000
    assert len(html) < 200_000
    assert "figure-heat" in html

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == read_manifest(out)
    r = manifest["records"]["heat"]
    assert r == json.loads(json.dumps(rec, default=str))  # the returned record is what was stored
    assert r["plotlyjs"] == {"path": "plotly.min.js", "sha256": sha256_file(out / "plotly.min.js")}
    assert r["model"]["name"] == "tiny-llama" and HEX64.match(r["model"]["weights_sha256"])
    assert r["model"]["weights_sha256"] == model.weights_hash
    assert re.match(r"^[0-9a-f]{40}$", r["git"]["commit"]) and isinstance(r["git"]["dirty"], bool)
    for pkg in ("torch", "transformers", "plotly", "kaleido", "workbench", "python"):
        assert r["versions"][pkg], pkg
    assert r["seed"] == 3 and r["params"] == {"prompts": PROMPTS, "layers": None}
    assert r["notebook"] == "01_demo" and r["wall_time_s"] == 1.25 and r["timestamp"]
    assert r["static_export"].startswith("unavailable:") and "BROWSER_PATH" in r["static_export"]
    assert set(r["files"]) == {"heat.html"}

    assert r["files"]["heat.html"]["sha256"] == sha256_file(out / "heat.html")
    assert not (out / "heat.png").exists() and not (out / "heat.svg").exists()


def test_manifest_records_are_updated_not_duplicated(tmp_path, no_browser):
    out = tmp_path / "d"
    with pytest.warns(RuntimeWarning):
        save_figure(_simple_fig(), "a", out, params={"v": 1})
        save_figure(_simple_fig(), "b", out, params={"v": 1})
        save_figure(_simple_fig(), "a", out, params={"v": 2})
    records = read_manifest(out)["records"]
    assert sorted(records) == ["a", "b"]
    assert records["a"]["params"] == {"v": 2}
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # atomic writes leave no temporaries


def test_concurrent_writers_lose_no_record(tmp_path, no_browser):
    out = tmp_path / "shared"
    errors = []

    def work(i):
        try:
            save_figure(_simple_fig(), f"f{i}", out, params={"i": i})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    with warnings.catch_warnings():  # the "unavailable" warnings; filters are process-global, so set them here
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    records = read_manifest(out)["records"]
    assert sorted(records) == [f"f{i}" for i in range(6)]
    assert all(records[f"f{i}"]["params"] == {"i": i} for i in range(6))


def test_require_static_turns_a_missing_browser_into_an_error(tmp_path, no_browser, monkeypatch):
    monkeypatch.setenv("WORKBENCH_REQUIRE_STATIC", "1")
    with pytest.raises(StaticExportError, match="BROWSER_PATH"):
        save_figure(_simple_fig(), "x", tmp_path)


@pytest.mark.skipif(find_browser()[0] is None, reason="no Chrome/Chromium here (apt-get install -y chromium)")
def test_png_written_with_a_browser_and_cleared_without(tmp_path, monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    (tmp_path / "fig.svg").write_text("<svg/>")  # left by a version that also exported SVG: removed as stale
    rec = save_figure(_simple_fig(), "fig", tmp_path, seed=0)
    assert rec["static_export"] == "ok", rec["static_export"]
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "fig.svg").exists()  # one static format: PNG
    assert set(rec["files"]) == {"fig.html", "fig.png"}
    assert all(HEX64.match(f["sha256"]) for f in rec["files"].values())
    assert rec["browser"]["path"]

    # An invalid browser path afterwards: the HTML is rewritten, the stale PNG removed, and it says so.
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "missing"))
    with pytest.warns(RuntimeWarning, match="unavailable"):
        rec = save_figure(_simple_fig(), "fig", tmp_path, seed=0)
    assert (tmp_path / "fig.html").exists()
    assert not (tmp_path / "fig.png").exists()
    assert read_manifest(tmp_path)["records"]["fig"]["static_export"].startswith("unavailable:")


def test_save_figure_rejects_bad_input(tmp_path, no_browser):
    with pytest.raises(TypeError):
        save_figure({"data": []}, "x", tmp_path)
    for name in ("", "../x", "a/b", ".hidden", "manifest"):
        with pytest.raises(ValueError, match="figure name"):
            save_figure(_simple_fig(), name, tmp_path)
    with pytest.raises(TypeError, match="params"):
        save_figure(_simple_fig(), "x", tmp_path, params=[1, 2])
    with pytest.raises(TypeError):
        apply_theme("not a figure")


def test_save_table_and_gallery(tmp_path, lens, model, no_browser):
    out = tmp_path / "01_demo"
    rec = save_table(lens, "lens", out, model=model, seed=0)
    assert rec["kind"] == "table" and rec["shape"] == list(lens.shape)
    assert pd.read_csv(out / "lens.csv").shape == lens.shape
    with pytest.warns(RuntimeWarning):
        save_figure(lens_heatmap(lens), "heat", out, model=model)
    save_table(lens, "other_lens", out / "model-other", model=model, seed=0)  # a parameter-setting subfolder
    save_table(lens, "smoke_lens", out / "_smoke", model=model, seed=0)  # never in the real gallery
    index = write_gallery(tmp_path)
    assert index == tmp_path / "index.html"
    text = index.read_text()
    assert "01_demo" in text and "heat.html" in text and "lens.csv" in text and "unavailable" in text
    assert "01_demo/model-other" in text and "other_lens.csv" in text and "smoke_lens" not in text
    assert write_gallery(tmp_path, smoke=True) == tmp_path / "_smoke" / "index.html"


# -- plots ------------------------------------------------------------------------------------------------------

def test_lens_heatmap_returns_a_themed_figure(lens, model):
    fig = lens_heatmap(lens, prompt_idx=1)
    assert isinstance(fig, go.Figure)
    (heat,) = fig.data
    assert heat.type == "heatmap"
    n_layers, n_pos = model.n_layers + 1, len("abc") + 1  # + <bos>
    assert len(heat.z) == n_layers and len(heat.z[0]) == n_pos
    assert all(0.0 <= v <= 1.0 for row in heat.z for v in row)
    assert heat.texttemplate == "%{text}" and all(isinstance(t, str) for row in heat.text for t in row)
    assert fig.layout.template.layout.paper_bgcolor == PAPER_TEMPLATE.layout.paper_bgcolor == "white"
    logit_fig = lens_heatmap(lens, prompt_idx=0, value="logit")
    assert logit_fig.data[0].zmax is None


def test_lens_target_curve_and_summary(lens, model):
    fig = lens_target_curve(lens, prompts=PROMPTS)
    assert isinstance(fig, go.Figure)
    names = [t.name for t in fig.data]
    assert len(fig.data) == 2 * 2 + 2 and names.count("median") == 2  # prob + rank per line, and the medians
    median = [t for t in fig.data if t.name == "median"]
    assert all(t.line.width >= 3 for t in median)
    assert fig.layout.yaxis2.type == "log"
    assert all(len(t.x) == model.n_layers + 1 for t in fig.data)
    summary = lens_target_summary(lens)
    assert list(summary["prompt_idx"]) == [0, 1]
    assert {"first_rank1_layer", "final_rank", "final_prob"} <= set(summary.columns)
    assert isinstance(lens_target_curve(lens, position=-2), go.Figure)


def test_plots_reject_bad_frames(lens):
    with pytest.raises(TypeError, match="DataFrame"):
        lens_heatmap([1, 2, 3])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['prob'\]"):
        lens_heatmap(lens.drop(columns=["prob"]))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['rank'\]"):
        lens_target_curve(lens.drop(columns=["rank"]))
    with pytest.raises(ValueError, match="empty"):
        lens_heatmap(lens.iloc[:0])
    with pytest.raises(ValueError, match="prompt_idx 7 is not in the frame"):
        lens_heatmap(lens, prompt_idx=7)
    with pytest.raises(ValueError, match="value must be one of"):
        lens_heatmap(lens, value="rank")
    with pytest.raises(ValueError, match="kind == 'target'"):
        lens_target_curve(lens[lens["kind"] == "top"])
    with pytest.raises(ValueError, match="kind == 'top'"):
        lens_heatmap(lens[lens["kind"] == "target"])
    with pytest.raises(ValueError, match="duplicate"):
        lens_target_curve(pd.concat([lens, lens]))
    with pytest.raises(ValueError, match="position"):
        lens_target_curve(lens, position="first")


def test_figures_of_a_tree_share_one_plotlyjs(tmp_path, lens, no_browser, monkeypatch):
    """Under the runner (WORKBENCH_FIGURES_ROOT = the figures tree) every HTML file, however deep, points at the one
    plotly.min.js at the root; the bundle is written once, rewritten only when it differs, and a figure outside
    the tree keeps its own copy."""
    root = tmp_path / "figures"
    monkeypatch.setenv("WORKBENCH_FIGURES_ROOT", str(root))
    fig = lens_heatmap(lens, 0)
    with pytest.warns(RuntimeWarning, match="unavailable"):
        save_figure(fig, "a", root / "01_x")
        save_figure(fig, "b", root / "02_y" / "model-m")
        save_figure(fig, "c", tmp_path / "elsewhere")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("plotly.min.js")) == [
        "elsewhere/plotly.min.js", "figures/plotly.min.js"]
    for html_file, expected in ((root / "01_x" / "a.html", "../plotly.min.js"),
                                (root / "02_y" / "model-m" / "b.html", "../../plotly.min.js")):
        (src,) = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']([^\"']+)", html_file.read_text())
        assert src == expected and (html_file.parent / src).resolve() == (root / "plotly.min.js").resolve()
    js = root / "plotly.min.js"
    js.write_bytes(b"tampered")
    with pytest.warns(RuntimeWarning, match="unavailable"):
        save_figure(fig, "a", root / "01_x")
    assert js.stat().st_size > 1_000_000  # a damaged copy is replaced


def test_png_recompression_keeps_every_pixel():
    import io

    import numpy as np
    from PIL import Image

    from workbench.io.figures import _recompress_png

    rng = np.random.default_rng(0)
    pixels = np.zeros((120, 200, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[20:60, 30:170, :3] = rng.integers(0, 255, (40, 140, 3))  # a noisy band on a flat background
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=0)
    out = _recompress_png(buf.getvalue())
    assert len(out) < len(buf.getvalue())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out))), pixels)
