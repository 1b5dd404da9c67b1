import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist the cores are shared out between the workers (and the notebook kernels they start, which inherit
# this environment): two workers of two threads each on two cores spin against each other, and the tiny notebook
# runs took ten times longer.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = _threads
    torch.set_num_threads(int(_threads))

import workbench  # noqa: E402
from workbench.core.arch import SUPPORTED_FAMILIES
from workbench.testing.tiny import tiny_model

FAMILIES = sorted(SUPPORTED_FAMILIES)
PROMPTS = ["hello world, this is a test", "hi", "the cat sat on the mat"]


@pytest.fixture(autouse=True)
def _no_leaked_hooks():
    """Every test must leave the workbench hook ledger empty."""
    assert workbench.active_hooks() == []
    yield
    assert workbench.active_hooks() == [], f"leaked hooks: {workbench.active_hooks()}"


@pytest.fixture(params=FAMILIES)
def tiny(request):
    torch.manual_seed(0)
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once into the user cache; `make test` converts it first)."""
    return workbench.load_model("smollm2-135m", device="cpu")
