"""The papermill runner: every notebook at smoke size, and bad input rejected before any kernel starts."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

import workbench.batch.grid as nbgrid
import workbench.batch.runner as nbs
from workbench.batch.cli import main
from workbench.io.figures import STATIC_EXPORT_ENV
from workbench.io.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb") if nbs._NOTEBOOK_RE.match(p.name))


def _errors(nb) -> list[str]:
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for c in nb.cells if c.cell_type == "code"
        for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail loudly if anything tries to execute a notebook."""
    import papermill

    def refuse(*a, **k):
        raise AssertionError("a kernel was started although the input was invalid")

    monkeypatch.setattr(papermill, "execute_notebook", refuse)


# -- the committed notebooks ------------------------------------------------------------------------------------

def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_name.ipynb found"
    assert list(nbs.available_notebooks()) == NOTEBOOKS


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_committed_notebook_is_clean_and_parameterised(stem):
    nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
    params = nbs.notebook_parameters(ROOT / "notebooks" / f"{stem}.ipynb")
    assert {"smoke", "output_dir"} <= set(params)
    assert params["smoke"] is False and params["output_dir"] == f"figures/{stem}"


# Every notebook at smoke size on the tiny registered models (workbench.testbed.tiny): the fast tier (`make check`).
TINY = {
    "01_logit_lens": {"model": "tiny-smollm2"},
    "02_counting_readout": {"model": "tiny-smollm2"},
    "03_visual_ignorance": {"model": "tiny-vlm", "donor": "tiny-vlm-balanced", "base_lm": "tiny-smollm2",
                            "same_prior_donor": "tiny-vlm-s1", "seed_models": ["tiny-vlm-s1", "tiny-vlm-balanced-s1"]},
    "04_latent_drift": {"model": "tiny-smollm2"},
    "05_sae_features": {"model": "tiny-smollm2", "site": "blocks.2.hook_resid_post", "sae": "train",
                        "bench_architectures": ["topk"], "bench_testbed": "tiny-vlm-balanced"},
    "06_tuned_lens_patching": {"model": "tiny-smollm2"},
    "07_encoded_expressed": {"model": "tiny-smollm2", "vlms": ["tiny-vlm", "tiny-vlm-balanced"],
                             "vip_vlms": ["tiny-vlm", "tiny-vlm-balanced", "tiny-vlm-s1", "tiny-vlm-balanced-s1"]},
    "08_attribution_graphs": {"model": "tiny-smollm2", "transcoders": "train"},
}


TRAINED = ("04_latent_drift", "07_encoded_expressed")  # notebooks with parts on the latent thread's trained models


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    """CoT, Coconut and direct adapters of tiny-smollm2 (workbench train-reasoner's smoke recipe) in a probes/ root."""
    from workbench.studies.latent_drift.training import suite_config, train_suite

    root = tmp_path_factory.mktemp("adapters")
    train_suite(suite_config("smoke", model="tiny-smollm2", root=str(root)), progress=False)
    return root


def _check_smoke_run(stem: str, result, figures_dir: Path, parameters: dict) -> None:
    assert result.ok, result.error
    out = nbs.output_dir_for(stem, figures_dir, smoke=True, parameters=parameters)
    assert result.output_dir == out and result.executed == out / f"{stem}.ipynb"
    executed = nbformat.read(result.executed, as_version=4)
    assert _errors(executed) == []
    for cell in executed.cells:  # explorers render static figures under the runner: a figure, never a widget
        if cell.cell_type == "code" and re.search(r"^(lens_explorer|probe_explorer|latent_scrubber|blur_explorer|patching_explorer|encoded_expressed_explorer|graph_explorer)\(",
                                                  cell.source, re.M):
            data = {k: v for o in cell.outputs for k, v in o.get("data", {}).items()}
            assert "application/vnd.plotly.v1+json" in data and data["application/vnd.plotly.v1+json"]["data"]
            assert "application/vnd.jupyter.widget-view+json" not in data
            assert "image/png" in data or "no PNG" in data["text/plain"], data.get("text/plain")
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "smoke = True" in injected[0].source
    records = read_manifest(out)["records"]
    figures = {k: r for k, r in records.items() if r["kind"] == "figure"}
    assert figures, "the notebook saved no figure"
    assert set(result.records) == set(records)
    for name, r in figures.items():
        assert (out / f"{name}.html").exists()
        assert r["notebook"] == stem and r["params"]["smoke"] is True
        assert r["static_export"] == "ok" or r["static_export"].startswith("unavailable:")
        for f in r["files"]:
            assert (out / f).exists(), f
    assert not (figures_dir / stem / f"{stem}.ipynb").exists()  # smoke runs leave the real folder alone
    assert (figures_dir / "_smoke" / "index.html").exists()


def test_every_notebook_has_a_tiny_smoke_setting():
    assert sorted(TINY) == NOTEBOOKS


@pytest.mark.notebook
@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_runs_at_smoke_size_on_tiny_models(stem, tmp_path, monkeypatch, request):
    monkeypatch.setenv(STATIC_EXPORT_ENV, "0")  # HTML only: the browser export has its own tests (tests/io)
    params = dict(TINY[stem])
    if stem in TRAINED:  # the trained-model parts run on adapters trained for the tiny model (smoke recipe)
        params["adapters_root"] = str(request.getfixturevalue("tiny_adapters"))
    (result,) = nbs.run_notebooks([stem], smoke=True, figures_dir=tmp_path, parameters=params)
    _check_smoke_run(stem, result, tmp_path, params)
    records = read_manifest(result.output_dir)["records"]
    assert all(r["params"]["model"] == TINY[stem]["model"] for r in records.values() if "model" in r["params"])


@pytest.mark.integration
@pytest.mark.notebook
@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_notebook_runs_at_smoke_size(stem, tmp_path, monkeypatch):
    if stem != NOTEBOOKS[0]:  # one notebook exports PNGs end to end; the export itself is tested in tests/io
        monkeypatch.setenv(STATIC_EXPORT_ENV, "0")
    (result,) = nbs.run_notebooks([stem], smoke=True, figures_dir=tmp_path)
    _check_smoke_run(stem, result, tmp_path, {})


# -- bad input, rejected before any kernel ----------------------------------------------------------------------

def test_unknown_notebook_lists_the_available_ones(no_kernel, tmp_path):
    with pytest.raises(ValueError, match="unknown notebook 'no_such_notebook'") as err:
        nbs.run_notebooks(["no_such_notebook"], smoke=True, figures_dir=tmp_path)
    for stem in NOTEBOOKS:
        assert stem in str(err.value)
    assert not any(tmp_path.iterdir())


def test_unknown_parameter_names_it_and_the_allowed_ones(no_kernel, tmp_path):
    with pytest.raises(ValueError, match="unknown parameter") as err:
        nbs.run_notebooks(None, smoke=True, figures_dir=tmp_path, parameters={"modle": "x"})
    assert "modle" in str(err.value) and "model" in str(err.value)
    with pytest.raises(ValueError, match="set by the runner"):
        nbs.run_notebooks(None, figures_dir=tmp_path, parameters={"output_dir": "elsewhere"})
    assert not any(tmp_path.iterdir())


def test_names_resolve_by_stem_prefix_or_name(tmp_path):
    for i, name in enumerate(["01_alpha", "02_beta", "10_alpha2"]):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell("smoke = False\noutput_dir = 'x'", metadata={"tags": ["parameters"]})]
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    found = nbs.available_notebooks(tmp_path)
    assert nbs.resolve_names(["02"], found) == ["02_beta"]
    assert nbs.resolve_names(["beta", "01_alpha.ipynb", "01_alpha"], found) == ["02_beta", "01_alpha"]
    assert nbs.resolve_names(None, found) == list(found)


def test_cli_rejects_bad_input_with_status_2(no_kernel, capsys, tmp_path):
    assert main(["run", "nope", "--figures-dir", str(tmp_path)]) == 2
    assert "unknown notebook 'nope'" in capsys.readouterr().err
    if NOTEBOOKS:
        assert main(["run", NOTEBOOKS[0], "-p", "bogus=1", "--figures-dir", str(tmp_path)]) == 2
        assert "bogus" in capsys.readouterr().err
    assert main(["list"]) == 0
    listed = capsys.readouterr().out  # read once: readouterr() drains the buffer
    assert NOTEBOOKS and all(stem in listed for stem in NOTEBOOKS)


def test_every_notebook_has_a_registered_config():
    from workbench.studies.registry import NOTEBOOK_CONFIGS

    assert sorted(NOTEBOOK_CONFIGS) == NOTEBOOKS, "register each notebook's config in workbench.studies.registry"
    for stem, cls in NOTEBOOK_CONFIGS.items():
        defined = nbs.notebook_parameters(ROOT / "notebooks" / f"{stem}.ipynb")
        assert set(cls.NOTEBOOK) <= set(defined), f"{cls.__name__} reads parameters {stem} does not define"
        assert set(cls.SMOKE_SIZED) <= set(cls.NOTEBOOK)


@pytest.mark.parametrize(("stem", "params", "named"), [
    ("06_tuned_lens_patching", {"lens": "banana"}, r"parameter lens: .*lens='banana'.*one of \['auto'"),
    ("06_tuned_lens_patching", {"n_pairs": -1}, r"parameter n_pairs: .*n_pairs=-1.*positive int"),
    ("07_encoded_expressed", {"n_train": 400}, r"parameter n_train, n_prompts: .*n_train=400, n_prompts=300"),
    # a relation between two fields, neither of them wrong alone
    ("06_tuned_lens_patching", {"site_types": [], "head_positions": []},
     r"parameter site_types, head_positions: .*site_types=\(\), head_positions=\(\).*nothing to patch"),
    ("01_logit_lens", {"targets": [" Paris"]}, r"parameter prompts, targets: .*one target per prompt"),
    ("02_counting_readout", {"n_prompts": 0}, r"parameter n_prompts: .*n_test=0"),
])
@pytest.mark.parametrize("smoke", [True, False])
def test_config_constraints_are_checked_before_any_kernel(no_kernel, tmp_path, stem, params, named, smoke):
    # smoke replaces n_pairs (06) and n_train (07) with its own sizes: the user's values are checked all the same
    with pytest.raises(ValueError, match=f"notebook {stem}: {named}"):
        nbs.run_notebooks([stem], smoke=smoke, figures_dir=tmp_path, parameters=params)
    assert not any(tmp_path.iterdir())


def test_cli_rejects_bad_config_values_with_status_2(no_kernel, capsys, tmp_path):
    for stem, p in (("06_tuned_lens_patching", "lens=banana"), ("06_tuned_lens_patching", "n_pairs=-1"),
                    ("07_encoded_expressed", "n_train=400")):
        assert main(["run", stem, "--smoke", "-p", p, "--figures-dir", str(tmp_path)]) == 2
        assert p.split("=")[0] in capsys.readouterr().err
    cells = [("06_tuned_lens_patching", {"n_pairs": -1})]  # a grid cell is checked the same way
    with pytest.raises(ValueError, match="parameter n_pairs"):
        nbgrid.run_cells(cells, smoke=True, figures_dir=tmp_path)


def test_cli_parses_parameter_values():
    from workbench.batch.cli import _parse_param

    assert _parse_param("layers=[0, 10, 20]") == ("layers", [0, 10, 20])
    assert _parse_param("layers=None") == ("layers", None)
    assert _parse_param("top_k=3") == ("top_k", 3)
    assert _parse_param("model=smollm2-135m") == ("model", "smollm2-135m")
    assert _parse_param('prompts=["a b", "c"]') == ("prompts", ["a b", "c"])


# -- a failing notebook does not stop the others; the kernel is this interpreter ----------------------------

FAILING = "x = 1 / 0"
CHECKING = """\
import json, os, sys
import workbench  # importable without `pip install -e`: the runner puts the repository on PYTHONPATH
from workbench.io.figures import save_figure
import plotly.graph_objects as go
os.makedirs(output_dir, exist_ok=True)
json.dump({"executable": sys.executable, "cwd": os.getcwd(), "workbench": workbench.__file__},
          open(os.path.join(output_dir, "kernel.json"), "w"))
save_figure(go.Figure(go.Bar(y=[1, 2])), "bars", output_dir, params={"n": n})
"""


@pytest.mark.notebook
def test_failure_is_collected_and_the_rest_run(tmp_path, monkeypatch, capsys):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for stem, body in [("01_fails", FAILING), ("02_checks", CHECKING)]:
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                               "display_name": "Python 3"}})
        nb.cells = [
            nbformat.v4.new_code_cell("smoke = False\noutput_dir = 'unset'\nn = 1", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(body),
        ]
        nbformat.write(nb, nb_dir / f"{stem}.ipynb")
    monkeypatch.setattr(nbs, "notebooks_dir", lambda: nb_dir)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))  # keep it fast; HTML only
    figs = tmp_path / "figs"

    status = main(["run", "--smoke", "--figures-dir", str(figs), "-p", "n=5"])
    err = capsys.readouterr().err
    assert status == 1
    assert "FAILED 01_fails: ZeroDivisionError" in err and "FAILED 02_checks" not in err

    # a parameter setting (-p n=5) gets its own folder below the notebook's
    setting = nbs.parameter_slug({"n": 5})
    assert setting.startswith("n-5__")
    failed = nbformat.read(figs / "01_fails" / setting / "_smoke" / "01_fails.ipynb", as_version=4)
    assert any("ZeroDivisionError" in e for e in _errors(failed))  # executed copy kept, with the traceback

    out = figs / "02_checks" / setting / "_smoke"
    info = json.loads((out / "kernel.json").read_text())
    assert Path(info["executable"]).resolve() == Path(sys.executable).resolve()
    assert Path(info["cwd"]).resolve() == ROOT.resolve()
    assert Path(info["workbench"]).resolve().parent == (ROOT / "workbench").resolve()
    rec = read_manifest(out)["records"]["bars"]
    assert rec["notebook"] == "02_checks" and rec["params"] == {"n": 5}
    assert rec["static_export"].startswith("unavailable:")
    assert (out / "bars.html").exists()
    assert "02_checks" in (figs / "_smoke" / "index.html").read_text()


def test_unknown_kernel_is_rejected(no_kernel, tmp_path):
    with pytest.raises(ValueError, match="no kernelspec named 'no-such-kernel'"):
        nbs.run_notebooks(None, smoke=True, figures_dir=tmp_path, kernel="no-such-kernel")


def test_parameter_settings_get_their_own_folder(tmp_path):
    assert nbs.output_dir_for("02_x", tmp_path, False) == tmp_path / "02_x"
    assert nbs.output_dir_for("02_x", tmp_path, False, {"model": "gemma-3-270m"}) == (
        tmp_path / "02_x" / "model-gemma-3-270m__a33410130b")  # the committed grid folder of that setting
    out = nbs.output_dir_for("02_x", tmp_path, True, {"seeds": [11, 42], "model": "qwen2.5-0.5b"})
    assert out.parent.name.startswith("model-qwen2.5-0.5b__seeds-11+42__") and out.name == "_smoke"
    assert nbs.parameter_slug({"interventions": [], "model": "m", "layers": None}).startswith(
        "model-m__interventions-none__layers-None__")


# -- grids --------------------------------------------------------------------------------------------------------

def test_expand_grid_is_a_product_and_nested_lists_are_one_value():
    cells = nbgrid.expand_grid({"02_x": {"model": ["a", "b"], "seeds": [[11, 42]], "n": 3}, "01_y": None})
    assert cells == [("02_x", {"model": "a", "seeds": [11, 42], "n": 3}),
                     ("02_x", {"model": "b", "seeds": [11, 42], "n": 3}), ("01_y", {})]
    assert nbgrid.expand_grid({"02_x": [{"model": "a", "n": [1, 2]}, {"model": "b"}]}) == [
        ("02_x", {"model": "a", "n": 1}), ("02_x", {"model": "a", "n": 2}), ("02_x", {"model": "b"})]
    with pytest.raises(ValueError, match="no values"):
        nbgrid.expand_grid({"02_x": {"model": []}})
    with pytest.raises(ValueError, match="non-empty mapping"):
        nbgrid.expand_grid([])


def _param_notebook(folder, name="01_demo"):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("from typing import Optional\nmodel = 'smollm2-135m'\nn_items = 10\nscale = 1.0\n"
                                          "layers: Optional[list[int]] = None\nsmoke = False\n"
                                          "output_dir = 'x'", metadata={"tags": ["parameters"]})]
    nbformat.write(nb, folder / f"{name}.ipynb")


def test_grid_cells_are_type_checked_before_any_kernel(no_kernel, tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    _param_notebook(src)
    grid = {"01_demo": {"model": ["smollm2-135m", "gemma-3-270m"], "n_items": [5, "many"]}}
    with pytest.raises(ValueError, match=r"n_items='many' is a str, but its default 10 is a int"):
        nbgrid.run_grid(grid, notebooks=src, figures_dir=tmp_path / "figs")
    with pytest.raises(ValueError, match="unknown parameter"):
        nbgrid.run_grid({"01_demo": {"modle": ["a"]}}, notebooks=src, figures_dir=tmp_path / "figs")
    with pytest.raises(ValueError, match="unknown notebook"):
        nbgrid.run_grid({"07_nothing": {}}, notebooks=src, figures_dir=tmp_path / "figs")
    assert not (tmp_path / "figs").exists()
    # ints pass for a float default, None only where the cell declares Optional, a bool is not an int
    nbs.check_parameters("01_demo", src / "01_demo.ipynb", {"scale": 2, "layers": [1, 2]})
    nbs.check_parameters("01_demo", src / "01_demo.ipynb", {"layers": None})
    with pytest.raises(ValueError, match="model=None is a NoneType"):
        nbs.check_parameters("01_demo", src / "01_demo.ipynb", {"model": None})
    with pytest.raises(ValueError, match="is a bool"):
        nbs.check_parameters("01_demo", src / "01_demo.ipynb", {"n_items": True})


def test_completed_grid_cells_are_skipped_unless_forced(no_kernel, tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    _param_notebook(src)
    figs = tmp_path / "figs"
    for model in ("smollm2-135m", "gemma-3-270m"):
        out = nbs.output_dir_for("01_demo", figs, False, {"model": model})
        out.mkdir(parents=True)
        params = {"smoke": False, "output_dir": nbs.relative_to_root(out), "model": model}
        (out / nbs.RUN_RECORD).write_text(json.dumps({"status": "ok", "parameters": params}))
    grid = tmp_path / "grid.yaml"
    grid.write_text("01_demo:\n  model: [smollm2-135m, gemma-3-270m]\n")
    results = nbgrid.run_grid(grid, notebooks=src, figures_dir=figs)
    assert [r.skipped for r in results] == [True, True] and all(r.ok for r in results)
    forced = nbgrid.run_grid(grid, notebooks=src, figures_dir=figs, force=True)  # forced: it really tries to run
    assert all(not r.skipped and not r.ok and "kernel was started" in r.error for r in forced)
    record = json.loads((forced[0].output_dir / nbs.RUN_RECORD).read_text())
    assert record["status"] == "failed" and "kernel was started" in record["error"]


def test_cli_grid_bad_input_is_status_2(no_kernel, capsys, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("02_counting_readout:\n  seeds: [oops]\n")  # a str where the default is a list
    assert main(["run", "--grid", str(grid), "--figures-dir", str(tmp_path / "f")]) == 2
    assert "seeds='oops' is a str" in capsys.readouterr().err
    grid.write_text("02_counting_readout: [\n")
    assert main(["run", "--grid", str(grid)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["run", "01", "--grid", str(grid)]) == 2
    assert "drop the names" in capsys.readouterr().err


def test_a_full_run_that_succeeded_is_stored_without_outputs(tmp_path):
    """The executed copy of a full run is committed under figures/: no outputs, no execution counts; a failed (or
    smoke) run keeps them, and the papermill metadata points at the final name either way."""
    def executed_copy(name: str) -> Path:
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("print(1)", execution_count=3,
                                         outputs=[nbformat.v4.new_output("stream", name="stdout", text="1\n")])
        nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell]
        tmp = tmp_path / f".{name}.tmp.ipynb"
        nbformat.write(nb, tmp)
        return tmp

    nbs._finalise_executed(executed_copy("ok"), tmp_path / "ok.ipynb", strip=True)
    nbs._finalise_executed(executed_copy("failed"), tmp_path / "failed.ipynb", strip=False)
    ok, failed = (nbformat.read(tmp_path / f"{n}.ipynb", as_version=4) for n in ("ok", "failed"))
    assert ok.cells[1].outputs == [] and ok.cells[1].execution_count is None and ok.cells[1].source == "print(1)"
    assert failed.cells[1].outputs[0]["text"] == "1\n" and failed.cells[1].execution_count == 3
    assert ok.metadata["papermill"]["output_path"].endswith("ok.ipynb")
    assert not list(tmp_path.glob(".*.tmp.ipynb"))


def test_committed_executed_notebooks_carry_no_outputs():
    for path in sorted((ROOT / "figures").rglob("*.ipynb")):
        if "_smoke" in path.parts or path.name.startswith("."):
            continue
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert not any(c.outputs or c.execution_count is not None for c in code), f"{path} has outputs"
