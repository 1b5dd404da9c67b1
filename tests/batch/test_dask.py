"""Grid cells on Dask: a local cluster of two worker processes runs three cells of a tiny notebook, one failing."""

import json
import os

import nbformat
import pytest

import workbench.batch.grid as nbgrid
import workbench.batch.runner as nbs
from workbench.batch.cli import main
from workbench.io.manifest import read_manifest

BODY = """\
import json, os
import plotly.graph_objects as go
from workbench.io.figures import save_figure
assert n != 2, "cell n=2 fails on purpose"
os.makedirs(output_dir, exist_ok=True)
json.dump({"kernel_parent": os.getppid(), "n": n}, open(os.path.join(output_dir, "kernel.json"), "w"))
save_figure(go.Figure(go.Bar(y=[n, 2 * n])), "bars", output_dir, params={"n": n}, seed=n)
"""


def _notebook(folder):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    params = nbformat.v4.new_code_cell("smoke = False\noutput_dir = 'unset'\nn = 1", metadata={"tags": ["parameters"]})
    nb.cells = [params, nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, folder / "01_cells.ipynb")


@pytest.mark.notebook
def test_grid_on_a_local_cluster_of_two_workers(tmp_path, monkeypatch):
    src = tmp_path / "nbs"
    src.mkdir()
    _notebook(src)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))  # HTML only: fast
    figs = tmp_path / "figs"
    results = nbgrid.run_grid({"01_cells": {"n": [1, 2, 3]}}, dask="local", workers=2, notebooks=src,
                           figures_dir=figs)

    assert [r.parameters["n"] for r in results] == [1, 2, 3]  # one Result per cell, in grid order
    ok, failed = [r for r in results if r.ok], [r for r in results if not r.ok]
    assert [r.parameters["n"] for r in ok] == [1, 3]
    assert len(failed) == 1 and "cell n=2 fails on purpose" in failed[0].error
    parents = set()
    for r in results:
        out = nbs.output_dir_for("01_cells", figs, False, {"n": r.parameters["n"]})
        assert out.name.startswith(f"n-{r.parameters['n']}__")
        assert r.output_dir == out
        record = json.loads((out / nbs.RUN_RECORD).read_text())
        assert record["status"] == ("ok" if r.ok else "failed") and record["parameters"]["n"] == r.parameters["n"]
        assert (out / "01_cells.ipynb").exists()  # the executed notebook, also for the failing cell
        if r.ok:
            info = json.loads((out / "kernel.json").read_text())
            parents.add(info["kernel_parent"])
            fig = read_manifest(out)["records"]["bars"]
            assert fig["params"] == {"n": r.parameters["n"]} and fig["seed"] == r.parameters["n"]
            assert fig["status"] == "ok" and fig["run"]["parameters"]["n"] == r.parameters["n"]
            assert (out / "bars.html").exists()
    assert os.getpid() not in parents  # kernels were started by the Dask worker processes, not here
    gallery = (figs / "index.html").read_text()
    assert "n-1" in gallery and "n-3" in gallery and "run status" in gallery

    # completed cells are skipped on the second pass; only the failed one runs again (and fails again)
    again = nbgrid.run_grid({"01_cells": {"n": [1, 2, 3]}}, dask="local", workers=2, notebooks=src, figures_dir=figs)
    assert [r.skipped for r in again] == [True, False, True]


def test_dask_bad_input_fails_before_any_cluster(tmp_path, capsys):
    src = tmp_path / "nbs"
    src.mkdir()
    _notebook(src)
    with pytest.raises(ValueError, match="unknown parameter"):
        nbgrid.run_grid({"01_cells": {"m": [1]}}, dask="local", notebooks=src, figures_dir=tmp_path)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        nbgrid.run_grid({"01_cells": {"n": [1]}}, dask="local", workers=0, notebooks=src, figures_dir=tmp_path)
    with pytest.raises(ValueError, match="sizes a local cluster"):
        nbgrid.run_grid({"01_cells": {"n": [1]}}, dask="tcp://127.0.0.1:1", workers=2, notebooks=src,
                     figures_dir=tmp_path)
    with pytest.raises(ValueError, match="pass dask='local'"):
        nbgrid.run_grid({"01_cells": {"n": [1]}}, workers=2, notebooks=src, figures_dir=tmp_path)
    assert main(["run", "--workers", "2", "--figures-dir", str(tmp_path)]) == 2
    assert "add --dask" in capsys.readouterr().err
    assert not (tmp_path / "01_cells").exists()  # nothing ran, nothing was written


def test_unreachable_scheduler_is_a_clear_error(tmp_path, monkeypatch):
    import socket

    src = tmp_path / "nbs"
    src.mkdir()
    _notebook(src)
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(nbgrid, "DASK_CONNECT_TIMEOUT_S", 3)
    with pytest.raises(ValueError, match=rf"cannot connect to the Dask scheduler at 'tcp://127.0.0.1:{port}'"):
        nbgrid.run_grid({"01_cells": {"n": [1]}}, dask=f"tcp://127.0.0.1:{port}", notebooks=src, figures_dir=tmp_path)
