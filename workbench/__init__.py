"""workbench: probing, logit-lens, sparse-autoencoder and layer-replacement tools on PyTorch forward hooks."""

from workbench.arch import SUPPORTED_FAMILIES, ArchitectureError, ArchMap
from workbench.lens import logit_lens
from workbench.models import DEFAULT_MODEL, REGISTRY, Model, from_hf, load_model
from workbench.sites import SiteError, layer_site, site_names
from workbench.store import ActivationStore, Corpus, StoreError, harvest
from workbench.swap import swap_modules
from workbench.trace import (
    HookRecord,
    StopForward,
    Trace,
    active_hooks,
    add_direction,
    patch_from,
    replace_with,
    trace,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "SUPPORTED_FAMILIES",
    "ActivationStore",
    "ArchMap",
    "ArchitectureError",
    "Corpus",
    "HookRecord",
    "Model",
    "SiteError",
    "StopForward",
    "StoreError",
    "Trace",
    "active_hooks",
    "add_direction",
    "from_hf",
    "harvest",
    "load_model",
    "logit_lens",
    "patch_from",
    "replace_with",
    "layer_site",
    "site_names",
    "swap_modules",
    "trace",
]
