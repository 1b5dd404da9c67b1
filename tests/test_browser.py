"""The lens explorer in a real browser: JupyterLab served headless on loopback, driven by Playwright in Debian's
chromium (no browser download). The test opens a notebook, runs it, types a prompt into the explorer, moves its
layer slider, and reads from the page that the plot changed.

Screenshots (one per stage) go to ``tests/artifacts/browser/`` (git-ignored; ``$WORKBENCH_TEST_ARTIFACTS`` moves
it), kept after the run so that a failure can be looked at. A missing ``/usr/bin/chromium`` fails the test with the
command that installs it: CI must not pass without having run it.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Chromium on these machines: no sandbox (root), no GPU, and none of its background connections (the network is
# closed; without these flags it keeps retrying them).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
EXPLORER = ".workbench-lens-explorer"
NOTEBOOK_SOURCE = """\
from workbench.testing.tiny import tiny_model
from workbench.ui.lens import lens_explorer

lens_explorer({"tiny-llama": tiny_model("llama"), "tiny-gpt2": tiny_model("gpt2")}, "hello world")
"""

GRAPH_EXPLORER = ".wb-graph-explorer"
GRAPH_SOURCE = """\
import torch
from workbench.testing.tiny import random_transcoders, tiny_model
from workbench.methods.circuits.attribution import AttributionConfig, attribute
from workbench.methods.circuits.graph_io import feature_cards, graph_json
from workbench.ui.circuits import graph_explorer

m = tiny_model("llama")
tcs = random_transcoders(m)
g = attribute(m, torch.tensor([[1, 5, 9, 23, 7, 11, 40, 3]]), tcs, cfg=AttributionConfig(max_feature_nodes=20),
              progress=False)
data = graph_json(g, "tiny", vocab_size=m.arch.vocab_size)
feats = [(int(n["layer"]), int(n["node_id"].split("_")[1])) for n in data["nodes"]
         if n["feature_type"] == "cross layer transcoder"]
cards = feature_cards(m, tcs, feats, torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0)),
                      progress=False)
ex = graph_explorer(data, cards, display="widget")
ex
"""
READBACK_SOURCE = "print('QPARAMS', ex.qparams())"

pytestmark = pytest.mark.browser


def _artifacts() -> Path:
    folder = Path(os.environ.get("WORKBENCH_TEST_ARTIFACTS", ROOT / "tests" / "artifacts")) / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer {url} within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started (its own process group)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def lab(tmp_path):
    """(base url, token, notebook name) of a JupyterLab serving a temporary folder holding the test notebook."""
    yield from _serve(tmp_path, [NOTEBOOK_SOURCE])


@pytest.fixture
def graph_lab(tmp_path):
    """The same, with the attribution-graph explorer's notebook (the explorer, then a cell reading it back)."""
    yield from _serve(tmp_path, [GRAPH_SOURCE, READBACK_SOURCE])


def _serve(tmp_path, sources):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(nb, tmp_path / "explorer.ipynb")
    port, token = _free_port(), uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_HEADLESS"}  # a real front end: widgets
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    labconfig = tmp_path / "jupyter-config" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(json.dumps(  # no "news?" toast over the page
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    log = tmp_path / "jupyter.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={tmp_path}", f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           "--LabApp.news_url=", "--LabApp.extension_manager=readonly", "--ServerApp.allow_root=True"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, "explorer.ipynb"
    finally:
        _stop(proc)
        shutil.copy(log, _artifacts() / "jupyter.log")


def _plot_state(page) -> dict:
    """What the page shows of the explorer's plot: its title and tick labels, read from plotly's SVG."""
    return page.evaluate(
        """(sel) => {
            const root = document.querySelector(sel);
            const texts = (q) => Array.from(root.querySelectorAll(q)).map(e => e.textContent);
            return {title: texts('.js-plotly-plot .gtitle').join(' '),
                    x: texts('.js-plotly-plot .xtick text'), y: texts('.js-plotly-plot .ytick text')};
        }""", EXPLORER)


def _wait_until(page, predicate, what: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _plot_state(page)
        if predicate(state):
            return state
        page.wait_for_timeout(250)
    page.screenshot(path=str(_artifacts() / "failure.png"), full_page=True)
    pytest.fail(f"the plot never showed {what}; last seen: {json.dumps(state)}")


def _run_first_cell(page) -> None:
    """Run the notebook's cell once its kernel is up (the status bar reads "<kernel> | Idle"; before the kernel
    connects it reads "No Kernel", and a run then would open JupyterLab's kernel chooser)."""
    page.wait_for_function(
        """() => Array.from(document.querySelectorAll('.jp-StatusBar-TextItem')).some(
               e => /\\| Idle$/.test(e.textContent.trim()) && !/No Kernel/.test(e.textContent))""", timeout=120_000)
    page.click(".jp-Notebook .jp-Cell .jp-InputArea-editor")
    page.keyboard.press("Shift+Enter")


def _playwright():
    """playwright's ``sync_playwright``, after checking that Debian's chromium is there (CI must run these)."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium (`bash .ci/install-chromium.sh`, "
                    "or `apt-get install -y chromium`)")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def _open(page, base: str, token: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}?token={token}", wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    _run_first_cell(page)


def test_lens_explorer_in_jupyterlab(lab):
    sync_playwright = _playwright()

    base, token, name = lab
    shots = _artifacts()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open(page, base, token, name)
            page.wait_for_selector(f"{EXPLORER} .js-plotly-plot .gtitle", timeout=180_000)
            first = _wait_until(page, lambda s: "hello world" in s["title"], "the first prompt")
            page.screenshot(path=str(shots / "1-opened.png"), full_page=True)
            assert first["title"].startswith("tiny-llama")
            assert first["y"] == ["0", "1", "2", "3"]  # layers 0..3 of the tiny model
            assert [t[0] for t in first["x"][1:]] == list("hello world".replace(" ", "␣"))

            box = page.locator(f"{EXPLORER} .widget-text input")
            box.fill("abc")
            box.press("Enter")  # the text box sends its value on Enter
            typed = _wait_until(page, lambda s: "abc" in s["title"], "the typed prompt")
            page.screenshot(path=str(shots / "2-typed.png"), full_page=True)
            assert typed["x"] != first["x"] and [t[0] for t in typed["x"][1:]] == ["a", "b", "c"]

            upper = page.locator(f"{EXPLORER} .widget-hslider").first.locator(".noUi-handle-upper")
            upper.focus()
            upper.press("ArrowLeft")  # layers (0, 3) -> (0, 2)
            moved = _wait_until(page, lambda s: "layers 0–2" in s["title"], "the moved layer slider")
            page.screenshot(path=str(shots / "3-slider.png"), full_page=True)
            assert moved["y"] == ["0", "1", "2"] and moved["x"] == typed["x"]
            assert re.search(r"layers 0–2, positions 0–3", moved["title"])

            drag = page.locator(f"{EXPLORER} .js-plotly-plot .nsewdrag").first
            box = drag.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.375, box["y"] + box["height"] * 0.5)  # position 1, layer 1
            hover = page.locator(f"{EXPLORER} .js-plotly-plot .hoverlayer .hovertext")
            hover.first.wait_for(timeout=30_000)
            text = hover.first.text_content()
            page.screenshot(path=str(shots / "4-hover.png"), full_page=True)
            assert "layer 1, input token a" in text and "top-1 token" in text, text
        except BaseException:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def test_graph_explorer_in_jupyterlab(graph_lab):
    """The attribution-graph explorer (anywidget, inline JavaScript, nothing fetched): click a feature for its card,
    shift-click to pin, group the pinned nodes, and read the groups back in Python."""
    sync_playwright = _playwright()

    base, token, name = graph_lab
    shots = _artifacts()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        external = []
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: external.append(r.url) if not r.url.startswith(base) and
                    not r.url.startswith(("data:", "blob:")) else None)
            _open(page, base, token, name)
            page.wait_for_selector(f"{GRAPH_EXPLORER} circle.wb-node", timeout=180_000)
            page.screenshot(path=str(shots / "graph-1-opened.png"), full_page=True)
            nodes = page.locator(f"{GRAPH_EXPLORER} circle.wb-node")
            kinds = nodes.evaluate_all("els => els.map(e => e.getAttribute('data-type'))")
            assert {"embedding", "logit", "cross layer transcoder"} <= set(kinds)
            features = page.locator(f"{GRAPH_EXPLORER} circle.wb-node[data-type='cross layer transcoder']")
            first_id = features.first.get_attribute("data-id")
            features.first.click()
            page.wait_for_function("(sel) => document.querySelector(sel + ' .wb-panel').textContent.includes("
                                   "'top logits')", arg=GRAPH_EXPLORER, timeout=30_000)
            panel = page.locator(f"{GRAPH_EXPLORER} .wb-panel").text_content()
            assert first_id in panel and "Top activations" in panel, panel
            page.screenshot(path=str(shots / "graph-2-card.png"), full_page=True)
            features.nth(0).click(modifiers=["Shift"])
            features.nth(1).click(modifiers=["Shift"])
            page.wait_for_function("(sel) => document.querySelectorAll(sel + ' circle.wb-pinned').length === 2",
                                   arg=GRAPH_EXPLORER, timeout=30_000)
            page.locator(f"{GRAPH_EXPLORER} .wb-group-btn").click()
            page.wait_for_function("(sel) => document.querySelectorAll(sel + ' circle.wb-grouped').length === 2",
                                   arg=GRAPH_EXPLORER, timeout=30_000)
            assert "group 1" in page.locator(f"{GRAPH_EXPLORER} .wb-groups").text_content()
            page.screenshot(path=str(shots / "graph-3-grouped.png"), full_page=True)
            cells = page.locator(".jp-Notebook .jp-Cell")
            cells.nth(1).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            page.wait_for_function("() => Array.from(document.querySelectorAll('.jp-OutputArea-output')).some("
                                   "e => e.textContent.includes('QPARAMS'))", timeout=60_000)
            out = [t for t in page.locator(".jp-OutputArea-output").all_text_contents() if "QPARAMS" in t][0]
            assert "'group 1'" in out and first_id in out, out
            assert external == [], f"the explorer fetched from outside the server: {external}"
        except BaseException:
            page.screenshot(path=str(shots / "graph-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
