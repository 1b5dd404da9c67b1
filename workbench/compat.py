"""Old flat module paths (``workbench.probes``, ``workbench.models``, ...) keep importing, with a
DeprecationWarning that names the new home. Each old module is a thin forwarder: an attribute is looked up in the
new modules in turn, so ``from workbench.probes import RidgeProbe`` and ``workbench.models.load_model`` still
work. Nothing inside the package uses these paths (an import-linter contract forbids it)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED: dict[str, tuple[str, ...]] = {
    "arch": ("core.arch",), "sites": ("core.sites",), "trace": ("core.trace",), "swap": ("core.swap",),
    "vlm": ("core.vlm",), "models": ("core.models", "core.zoo"), "store": ("core.store", "data.corpus"),
    "remote": ("core.remote",), "tasks": ("data.tasks",), "reasoning": ("data.reasoning",), "vqa": ("data.vqa",),
    "corpus": ("data.corpus",), "cache": ("io.atomic", "io.paths"),
    "figures": ("io.figures", "io.manifest", "io.gallery", "io.provenance", "io.paths"),
    "notebooks": ("batch.runner", "batch.grid"), "cli": ("batch.cli",), "lens": ("methods.lens",),
    "plots": ("methods.plots", "studies.counting.plots", "studies.drift.plots", "studies.sae.plots",
              "studies.visual.plots"),
    "probes": ("methods.probes.base", "methods.probes.linear", "methods.probes.layerwise",
               "methods.probes.features"),
    "mlp_probe": ("methods.probes.mlp",), "sae": ("methods.sae.train",), "sae_features": ("methods.sae.features",),
    "latent": ("methods.latent",), "routing": ("methods.routing",), "answering": ("methods.answering",),
    "blur": ("methods.blur",), "evaluation": ("studies.counting.evaluation", "methods.probes.features"),
    "counting": ("studies.counting.study",), "geometry": ("studies.counting.geometry",),
    "interventions": ("studies.counting.interventions",), "visual_study": ("studies.visual.study",),
    "drift_study": ("studies.drift.study",), "drift": ("studies.drift.metrics",), "sae_study": ("studies.sae.study",),
    "widgets": ("ui.base", "ui.lens", "studies.counting.explorer", "studies.drift.explorer",
                "studies.visual.explorer"),
    "tiny": ("testing.tiny",),
}


class Forwarder(types.ModuleType):
    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name)
        self.__targets = tuple(f"workbench.{t}" for t in targets)
        self.__doc__ = f"Moved: see {', '.join(self.__targets)}."

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self.__targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"{self.__name__} has no attribute {attr!r} (it moved to {', '.join(self.__targets)})")

    def __dir__(self) -> list[str]:
        return sorted({n for t in self.__targets for n in dir(importlib.import_module(t)) if not n.startswith("_")})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        head, _, old = fullname.partition(".")
        if head == "workbench" and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        old = spec.name.partition(".")[2]
        new = ", ".join(f"workbench.{t}" for t in MOVED[old])
        warnings.warn(f"{spec.name} moved to {new}; the old path will be removed", DeprecationWarning, stacklevel=2)
        return Forwarder(spec.name, MOVED[old])

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
