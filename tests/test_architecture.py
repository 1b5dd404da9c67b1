"""The package's architecture: import-linter contracts, a light ``workbench.core``, the public names, the plugins."""

import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

import workbench as wb

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept(monkeypatch):
    """Layers (plotting < io < data < core < methods < testbed/testing < ui < studies < batch), no cycles at any
    depth, no _private name across subpackages, inner imports only for optional libraries: the contracts in
    pyproject.toml, checked by import-linter itself."""
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_contracts_catch_a_violation(tmp_path, monkeypatch):
    """The contracts are not vacuous: a copy of the package in which core imports a study breaks the layers, a
    function-level import of the package breaks the inner-imports rule, and a study importing a sibling study breaks
    the studies' independence."""
    import shutil

    pkg = tmp_path / "workbench"
    shutil.copytree(ROOT / "workbench", pkg, ignore=shutil.ignore_patterns("__pycache__", "parts"))
    sites = pkg / "core" / "sites.py"
    sites.write_text(sites.read_text() + "\n\ndef _bad():\n    from workbench.studies.counting_readout import study\n"
                     "    return study\n\nfrom workbench.studies.sae_features import plots as _plots  # noqa\n")
    readout = pkg / "studies" / "tuned_lens_patching" / "study.py"  # a study importing a sibling study
    readout.write_text(readout.read_text()
                       + "\nfrom workbench.studies.counting_readout import plots as _sibling  # noqa\n")
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text((ROOT / "pyproject.toml").read_text())
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          f"sys.exit(lint_imports(config_filename={str(cfg)!r}, no_cache=True))"],
                         cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path),
                                                                            "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "workbench.core.sites -> workbench.studies" in out.stdout.replace("\n", " ") or \
        "workbench.core is not allowed to import workbench.studies" in out.stdout
    assert "imports workbench.studies.counting_readout inside _bad()" in " ".join(out.stdout.split())
    assert "Studies are independent of each other" in out.stdout and "BROKEN" in out.stdout
    assert "workbench.studies.tuned_lens_patching is not allowed to import workbench.studies.counting_readout" in \
        " ".join(out.stdout.split())


def test_core_pulls_in_no_study_ui_or_testbed_code():
    code = ("import sys, workbench.core.models, workbench.core.store, workbench.core.trace, workbench.data.corpus; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('workbench'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = out.stdout.split()
    assert "workbench.core.models" in loaded
    above = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in
             ("methods", "studies", "ui", "batch", "testbed", "testing")]
    assert not above, above


def test_every_public_name_resolves():
    for name in wb.__all__:
        assert getattr(wb, name) is not None, name
    assert wb.load_model.__module__ == "workbench.core.models"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wb.nope  # noqa: B018


def test_the_old_flat_module_paths_are_gone():
    """Version 0.1's flat modules (``workbench.probes``, ...) no longer import: the new paths are the only ones."""
    code = ("import importlib, workbench as wb\n"
            "for old in ('probes', 'models', 'widgets', 'compat'):\n"
            "    try:\n        importlib.import_module('workbench.' + old)\n    except ModuleNotFoundError:\n"
            "        pass\n    else:\n        print('imports', old)\n"
            "print(hasattr(wb, 'probes'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False"], out.stdout


def test_the_testbed_registers_with_the_zoo_through_its_entry_point():
    """The zoo never imports the testbed: its names arrive through the ``workbench.models`` entry point, read on
    the first look-up (and a source checkout without the installed entry point says how to fix it)."""
    code = ("import sys; from workbench.core import zoo; before = 'workbench.testbed.model' in sys.modules; "
            "names = zoo.registry_names(); print(before, 'vlm-testbed' in names, 'vlm-testbed-balanced' in names, "
            "zoo.ENTRY_POINT_GROUP)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "True", "True", "workbench.models"]
