"""What a study notebook asks of its study, written once: a config built from the notebook's parameters in one
call, and the parameters as every manifest records them.

A study config (a dataclass) mixes in :class:`NotebookConfig` and declares ``NOTEBOOK``, the notebook parameter ->
config field map (a field name; ``(field, convert)`` when the notebook speaks of it otherwise; ``None`` for a
parameter the notebook acts on itself), and ``SMOKE_SIZED``, the parameters a smoke run replaces with the study's
own small sizes (its ``smoke_config``). In the notebook:

    cfg = CountingConfig.from_notebook(globals())   # every parameter named once, in the parameters cell

Fields declare their constraints instead of validating by hand: ``n_train: int = positive_int(600)``,
``lens: str = choice("auto", LENS_SOURCES)``, ``tasks: tuple[str, ...] = each_in(TASKS, TASKS, non_empty=True)``;
relations between fields go to ``RELATIONS`` (``less_than("n_train", "n_prompts")``).
:meth:`NotebookConfig.__post_init__` checks them all in one place (:func:`validate_config`) and raises
:class:`ConfigError` naming the field, the value and what is allowed. A config whose ``__post_init__`` does more
calls ``super().__post_init__()`` first.

Study results follow :class:`StudyResult` (``summary()``, ``tables()``, ``figures()``, ``save(out_dir, model)``,
``timings``), and a ``run_*`` function runs its named phases under :class:`Phases`, which records each phase's wall
seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from workbench.io.paths import resolve_output_path, run_output_dir
from workbench.io.provenance import jsonable


def checkout_root() -> str:
    """``"."`` resolved like every output path (the repository root inside a checkout): where ``probes/`` goes.
    Plain ``"."`` when that is the current directory, so records stay free of machine paths."""
    root = resolve_output_path(".")
    return "." if root == Path.cwd().resolve() else str(root)


# --------------------------------------------------------------------------------------------------------------
# Declared constraints
# --------------------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config value (or a combination of values) that is not allowed; ``fields`` names the config fields."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


@dataclass(frozen=True)
class Constraint:
    """What one field allows: ``check(value)`` true, after ``convert`` (e.g. a list to a tuple); ``allowed`` says it
    in words for the error. ``optional``: ``None`` is allowed too (and never converted)."""

    check: Callable[[Any], bool]
    allowed: str
    convert: Callable[[Any], Any] | None = None
    optional: bool = False


@dataclass(frozen=True)
class Relation:
    """A constraint between fields: ``check(cfg)`` true; ``allowed`` says it in words."""

    fields: tuple[str, ...]
    check: Callable[[Any], bool]
    allowed: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def as_tuple_value(v):
    """A list as a tuple; anything else as it is (for a ``convert``)."""
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _in_range(lo, hi) -> tuple[Callable[[Any], bool], str]:
    if hi is None:
        return (lambda v: _is_int(v) and v >= lo), ("a positive int" if lo == 1 else f"an int >= {lo}")
    return (lambda v: _is_int(v) and lo <= v <= hi), f"an int in {lo}..{hi}"


def constrained(default: Any = dataclasses.MISSING, *, check: Callable[[Any], bool], allowed: str,
                convert: Callable[[Any], Any] | None = None, optional: bool = False,
                default_factory: Any = dataclasses.MISSING, why: str = ""):
    """A dataclass field with a declared constraint (the other helpers are shorthands for it); ``why`` is added to
    the error's ``allowed`` text."""
    meta = {"constraint": Constraint(check, allowed + (f" ({why})" if why else ""), convert, optional)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive_int(default: Any = dataclasses.MISSING, *, minimum: int = 1, optional: bool = False):
    """An int >= ``minimum`` (1 by default; never a bool)."""
    check, allowed = _in_range(minimum, None)
    return constrained(default, check=check, allowed=allowed, optional=optional)


def int_range(default: Any, lo: int, hi: int, *, optional: bool = False):
    """An int in ``lo..hi`` (both included)."""
    check, allowed = _in_range(lo, hi)
    return constrained(default, check=check, allowed=allowed, optional=optional)


def choice(default: Any, options: Sequence[Any], *, optional: bool = False):
    """One of ``options``."""
    options = tuple(options)
    return constrained(default, check=lambda v: isinstance(v, str | int | float | None) and v in options,
                       allowed=f"one of {list(options)}" + (" or None" if optional else ""), optional=optional)


def each_in(default: Any, options: Sequence[Any], *, non_empty: bool = False, optional: bool = False,
            why: str = ""):
    """A sequence (kept as a tuple) whose every element is one of ``options``; ``non_empty``: at least one."""
    options = tuple(options)
    return constrained(default, convert=as_tuple_value, optional=optional, why=why,
                       check=lambda v: isinstance(v, tuple) and (bool(v) or not non_empty)
                       and all(isinstance(x, str | int | float) and x in options for x in v),
                       allowed=f"{'a non-empty' if non_empty else 'a'} list of {list(options)}")


def each_int(default: Any, *, lo: int | None = None, hi: int | None = None, non_empty: bool = False,
             optional: bool = False):
    """A sequence (kept as a tuple) of ints, each in ``lo..hi`` (either bound may be open)."""
    ok = (lambda x: _is_int(x) and (lo is None or x >= lo) and (hi is None or x <= hi))
    bounds = ("" if lo is None and hi is None else f" >= {lo}" if hi is None else f" <= {hi}" if lo is None
              else f" in {lo}..{hi}")

    def convert(v):  # numpy ints become ints; anything else is left for the check
        if not isinstance(v, (list, tuple)):
            return v
        return tuple(int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x for x in v)

    return constrained(default, convert=convert, optional=optional,
                       check=lambda v: isinstance(v, tuple) and (bool(v) or not non_empty) and all(ok(x) for x in v),
                       allowed=f"{'a non-empty' if non_empty else 'a'} list of ints{bounds}")


def each_number(default: Any, *, above: float, non_empty: bool = False):
    """A sequence (kept as a tuple of floats) of numbers, each > ``above``."""
    return constrained(default, convert=lambda v: tuple(float(x) if _is_number(x) else x for x in v)
                       if isinstance(v, (list, tuple)) else v,
                       check=lambda v: isinstance(v, tuple) and (bool(v) or not non_empty)
                       and all(_is_number(x) and x > above for x in v),
                       allowed=f"{'a non-empty' if non_empty else 'a'} list of numbers > {above}")


def non_empty(default: Any, *, of: type | None = None):
    """A non-empty sequence (kept as a tuple), every element an ``of`` when given (and a non-empty one if a str)."""
    ok = (lambda x: True) if of is None else (lambda x: isinstance(x, of) and (not isinstance(x, str) or bool(x)))
    what = "" if of is None else f" of non-empty {of.__name__}s" if of is str else f" of {of.__name__}s"
    return constrained(default, convert=as_tuple_value, allowed=f"a non-empty list{what}",
                       check=lambda v: isinstance(v, tuple) and bool(v) and all(ok(x) for x in v))


def as_tuple(default: Any = dataclasses.MISSING, *, optional: bool = False):
    """A sequence kept as a tuple (no other constraint)."""
    return constrained(default, convert=as_tuple_value, check=lambda v: isinstance(v, tuple), allowed="a list",
                       optional=optional)


def relation(fields: Sequence[str], check: Callable[[Any], bool], allowed: str) -> Relation:
    """A relation between ``fields`` that no single field can declare (``check(cfg)``)."""
    return Relation(tuple(fields), check, allowed)


def less_than(a: str, b: str, why: str = "") -> Relation:
    """``a < b`` (e.g. ``less_than("n_train", "n_prompts")``: held-out rows remain)."""
    return Relation((a, b), lambda c: getattr(c, a) < getattr(c, b), f"{a} < {b}" + (f" ({why})" if why else ""))


def at_most(a: str, b: str, *, when: Callable[[Any], bool] | None = None, why: str = "") -> Relation:
    """``a <= b`` (only when ``when(cfg)``, if given)."""
    return Relation((a, b), lambda c: (when is not None and not when(c)) or getattr(c, a) <= getattr(c, b),
                    f"{a} <= {b}" + (f" ({why})" if why else ""))


def validate_config(cfg) -> None:
    """Check every declared constraint of dataclass ``cfg`` (converting values as declared), then its ``RELATIONS``.
    Raises :class:`ConfigError` naming the field(s), the value(s) and what is allowed."""
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        c = f.metadata.get("constraint")
        if c is None:
            continue
        value = getattr(cfg, f.name)
        if value is None and c.optional:
            continue
        try:
            converted = c.convert(value) if c.convert else value
            ok = bool(c.check(converted))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{name}: {f.name}={value!r} is not allowed: {f.name} must be {c.allowed}"
                              + (" or None" if c.optional and "None" not in c.allowed else ""), [f.name])
        if converted is not value:
            object.__setattr__(cfg, f.name, converted)
    for r in getattr(type(cfg), "RELATIONS", ()):
        try:
            ok = bool(r.check(cfg))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            values = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in r.fields)
            raise ConfigError(f"{name}: {values} is not allowed: need {r.allowed}", r.fields)


class NotebookConfig:
    NOTEBOOK: ClassVar[Mapping[str, str | tuple[str, Callable[[Any], Any]] | None]] = {}
    SMOKE_SIZED: ClassVar[tuple[str, ...]] = ()
    RELATIONS: ClassVar[tuple[Relation, ...]] = ()

    def __post_init__(self):
        validate_config(self)

    @classmethod
    def smoke_config(cls, **overrides):
        """The CI-sized config (a study overrides this with its small sizes)."""
        return cls(**({"smoke": True} if "smoke" in {f.name for f in dataclasses.fields(cls)} else {}) | overrides)

    @classmethod
    def notebook_kwargs(cls, namespace: Mapping[str, Any], *, smoke: bool) -> dict[str, Any]:
        """The config keyword arguments of a notebook's parameters (``SMOKE_SIZED`` ones left out when ``smoke``)."""
        kwargs = {}
        for name, target in cls.NOTEBOOK.items():
            if target is None or (smoke and name in cls.SMOKE_SIZED):
                continue
            field, convert = (target, None) if isinstance(target, str) else target
            value = namespace[name]
            value = tuple(value) if isinstance(value, list) else value
            kwargs[field] = convert(value) if convert else value
        return kwargs

    @classmethod
    def parameter_for(cls, field: str) -> str:
        """The notebook parameter that sets config ``field`` (the field name itself when none maps to it)."""
        for name, target in cls.NOTEBOOK.items():
            if target is not None and (target if isinstance(target, str) else target[0]) == field:
                return name
        return field

    @classmethod
    def check_notebook(cls, namespace: Mapping[str, Any], *, smoke: bool) -> None:
        """Build the configs a notebook run would build, without running anything: the full-size config from every
        parameter (so a value that smoke would replace is still checked) and, with ``smoke``, the smoke config.
        Raises :class:`ConfigError` naming the notebook parameter(s)."""
        builds = [lambda: cls(**cls.notebook_kwargs(namespace, smoke=False))]
        if smoke:
            builds.append(lambda: cls.smoke_config(**cls.notebook_kwargs(namespace, smoke=True)))
        for build in builds:
            try:
                build()
            except ConfigError as e:
                params = [cls.parameter_for(f) for f in e.fields]
                named = [p for p in params if p in cls.NOTEBOOK]
                prefix = f"parameter {', '.join(named)}: " if named else ""
                raise ConfigError(f"{prefix}{e}", e.fields) from None

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
        kwargs = cls.notebook_kwargs(namespace, smoke=smoke)
        cfg = cls.smoke_config(**kwargs) if smoke else cls(**kwargs)
        params = {}
        for name, target in cls.NOTEBOOK.items():
            field = target if isinstance(target, str) else None
            params[name] = getattr(cfg, field) if field else namespace[name]
        object.__setattr__(cfg, "notebook_params", jsonable({**params, "smoke": smoke}))
        # where this run writes: a smoke run into <output_dir>/_smoke/ only; relative paths against the checkout
        object.__setattr__(cfg, "output_dir", run_output_dir(namespace["output_dir"], smoke))
        return cfg


# --------------------------------------------------------------------------------------------------------------
# Results and phases
# --------------------------------------------------------------------------------------------------------------

@runtime_checkable
class StudyResult(Protocol):
    """What every study result offers a notebook: ``summary()`` (a printable table), ``tables()`` and
    ``figures()`` (by name, for ``save_figures``), ``save(out_dir, model)`` (the study's own CSV tables and
    ``study.json``; ``model`` is the loaded model, or ``None`` where the study does not need it) and ``timings``
    (wall seconds per named phase, and ``total``)."""

    timings: dict

    def summary(self) -> Any: ...

    def tables(self) -> dict: ...

    def figures(self) -> dict: ...

    def save(self, out_dir: str | Path, model: Any = None) -> Any: ...


class Phases:
    """Named phases of a study run, each timed into ``timings`` (wall seconds, summed when a phase repeats)::

        phases = Phases()
        with phases("features"):
            ...
        phases.timings   # {"features": 1.23}; phases.finish() adds "total" and rounds
    """

    def __init__(self, timings: dict | None = None):
        self.timings: dict[str, float] = timings if timings is not None else {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def run(self, name: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` as phase ``name``."""
        with self(name):
            return fn(*args, **kwargs)

    def finish(self, digits: int = 2) -> dict[str, float]:
        """The timings with ``total`` (since this object was made), rounded."""
        self.timings["total"] = time.perf_counter() - self._t0
        return {k: round(v, digits) if isinstance(v, float) else v for k, v in self.timings.items()}
