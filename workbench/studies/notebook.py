"""What a study notebook asks of its study, written once: a config built from the notebook's parameters in one
call, and the parameters as every manifest records them.

A study config (a dataclass) mixes in :class:`NotebookConfig` and declares ``NOTEBOOK``, the notebook parameter ->
config field map (a field name; ``(field, convert)`` when the notebook speaks of it otherwise; ``None`` for a
parameter the notebook acts on itself), and ``SMOKE_SIZED``, the parameters a smoke run replaces with the study's
own small sizes (its ``smoke_config``). In the notebook:

    cfg = CountingConfig.from_notebook(globals())   # every parameter named once, in the parameters cell
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from workbench.io.paths import resolve_output_path, run_output_dir
from workbench.io.provenance import jsonable


def checkout_root() -> str:
    """``"."`` resolved like every output path (the repository root inside a checkout): where ``probes/`` goes.
    Plain ``"."`` when that is the current directory, so records stay free of machine paths."""
    root = resolve_output_path(".")
    return "." if root == Path.cwd().resolve() else str(root)


class NotebookConfig:
    NOTEBOOK: ClassVar[Mapping[str, str | tuple[str, Callable[[Any], Any]] | None]] = {}
    SMOKE_SIZED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_notebook(cls, namespace: Mapping[str, Any]):
        """The config of a notebook run: ``namespace`` is the notebook's ``globals()`` (its parameters cell ran).
        With ``smoke`` true, the ``SMOKE_SIZED`` parameters give way to ``smoke_config``'s sizes. The result carries
        ``notebook_params`` (every notebook parameter with the value the run uses, for manifests) and ``output_dir``
        (:func:`workbench.io.paths.run_output_dir`: a smoke run never writes into a full-size folder)."""
        names = [*cls.NOTEBOOK, "smoke", "output_dir"]
        missing = [n for n in names if n not in namespace]
        if missing:
            raise ValueError(f"{cls.__name__}.from_notebook: the notebook defines no {missing}; its parameters "
                             f"cell must define {names}")
        smoke = namespace["smoke"]
        if not isinstance(smoke, bool):
            raise ValueError(f"smoke must be True or False, got {smoke!r}")
        kwargs = {}
        for name, target in cls.NOTEBOOK.items():
            if target is None or (smoke and name in cls.SMOKE_SIZED):
                continue
            field, convert = (target, None) if isinstance(target, str) else target
            value = namespace[name]
            value = tuple(value) if isinstance(value, list) else value
            kwargs[field] = convert(value) if convert else value
        cfg = cls.smoke_config(**kwargs) if smoke else cls(**kwargs)
        params = {}
        for name, target in cls.NOTEBOOK.items():
            field = target if isinstance(target, str) else None
            params[name] = getattr(cfg, field) if field else namespace[name]
        object.__setattr__(cfg, "notebook_params", jsonable({**params, "smoke": smoke}))
        # where this run writes: a smoke run into <output_dir>/_smoke/ only; relative paths against the checkout
        object.__setattr__(cfg, "output_dir", run_output_dir(namespace["output_dir"], smoke))
        return cfg
