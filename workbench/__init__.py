"""workbench: probing, logit-lens, sparse-autoencoder and layer-replacement tools on PyTorch forward hooks.

``import workbench as wb`` is cheap: the names below load their subpackage on first use (PEP 562), so
``import workbench.core`` pulls in no study, UI or testbed code. Layout (lower layers never import higher ones):
``io`` < ``data`` < ``core`` < ``methods`` < ``ui`` < ``studies``; ``batch`` on top; ``testbed`` and ``testing``
beside them. See docs/index.md.
"""

from __future__ import annotations

import importlib

from workbench.io.provenance import __version__

_EXPORTS = {
    "DEFAULT_MODEL": "workbench.core.models",
    "Model": "workbench.core.models",
    "from_hf": "workbench.core.models",
    "load_model": "workbench.core.models",
    "REGISTRY": "workbench.core.zoo",
    "fetch_models": "workbench.core.zoo",
    "register_model": "workbench.core.zoo",
    "SUPPORTED_FAMILIES": "workbench.core.arch",
    "ArchMap": "workbench.core.arch",
    "ArchitectureError": "workbench.core.arch",
    "SiteError": "workbench.core.sites",
    "check_layers": "workbench.core.sites",
    "layer_site": "workbench.core.sites",
    "site_names": "workbench.core.sites",
    "HookRecord": "workbench.core.trace",
    "StopForward": "workbench.core.trace",
    "Trace": "workbench.core.trace",
    "active_hooks": "workbench.core.trace",
    "add_direction": "workbench.core.trace",
    "patch_from": "workbench.core.trace",
    "replace_with": "workbench.core.trace",
    "trace": "workbench.core.trace",
    "swap_modules": "workbench.core.swap",
    "ActivationStore": "workbench.core.store",
    "StoreError": "workbench.core.store",
    "harvest": "workbench.core.store",
    "Corpus": "workbench.data.corpus",
    "logit_lens": "workbench.methods.lens",
    "read_lens": "workbench.methods.lens",
    "LensResult": "workbench.methods.lens",
    "TunedLens": "workbench.methods.tuned_lens",
    "load_tuned_lens": "workbench.methods.tuned_lens",
    "train_tuned_lens": "workbench.methods.tuned_lens",
    "activation_patching": "workbench.methods.patching",
    "attribution_patching": "workbench.methods.patching",
    "Probe": "workbench.methods.probes.base",
    "load_probe": "workbench.methods.probes.base",
    "save_probe": "workbench.methods.probes.base",
    "RidgeProbe": "workbench.methods.probes.linear",
    "LogisticProbe": "workbench.methods.probes.linear",
    "MLPProbe": "workbench.methods.probes.mlp",
    "save_figure": "workbench.io.figures",
    "save_table": "workbench.io.figures",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
