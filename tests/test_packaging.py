"""The conda environment and the pip package pin the same set; setup never pulls a CUDA torch."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        deps += extra
    return deps


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = [p for p in pip_section if not p.startswith("-e")]
    assert sorted(conda_pins) == sorted(_pyproject_pins())
    assert "python=3.11" in env["dependencies"]


def test_every_dependency_is_pinned_exactly():
    loose = [d for d in _pyproject_pins() if "==" not in d]
    assert loose == []


def test_torch_is_the_cpu_pin_everywhere():
    assert "torch==2.13.0" in _pyproject_pins()
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q torch==2.13.0" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
