"""The probe interface, the registry of probe types, the shared input checks, and a probe's folder on disk.

Every probe (:class:`~workbench.methods.probes.linear.RidgeProbe`, :class:`~.linear.LogisticProbe`,
:class:`~.mlp.MLPProbe`, and any type a user adds) is a :class:`Probe`: ``fit(X, y)``, ``predict(X)``,
``score(X, y)`` (R² for regressors, accuracy for classifiers), ``save(folder, ...)`` and ``Probe.load(folder)``.
A type becomes loadable by decorating it with :func:`register_probe_type`; the card's ``probe_type`` picks the
class at load, as SAELens picks an SAE class from its config.

On disk a probe is a folder: ``probe.safetensors`` (tensors only, no pickles) and ``card.json`` (model, weights
hash, site, task and generator parameters, metrics, hyper-parameters, library versions, and the sha256 of the
tensors file). It is written and read through :mod:`workbench.io.artifact` (:data:`PROBE_KIND`): one atomic folder,
and loading recomputes the hashes and refuses a mismatch with an ``ArtifactError``.
"""

from __future__ import annotations

import abc
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save

from workbench.data.tasks import split_indices
from workbench.io.artifact import ArtifactError, ArtifactKind, read_artifact, register_kind, write_artifact
from workbench.io.artifact import read_card as read_json_card
from workbench.io.paths import safe_segment
from workbench.io.provenance import json_roundtrip, now, package_versions

PROBE_WEIGHTS_FILE = "probe.safetensors"
PROBE_CARD_FILE = "card.json"
CARD_FORMAT = 1
STD_FLOOR = 1e-12  # a feature whose training std is below this is constant: left unscaled (std := 1), weight 0

Array = np.ndarray | torch.Tensor


class Probe(abc.ABC):
    """What every probe type implements. ``probe_type`` names the class in saved cards."""

    probe_type: ClassVar[str]
    card: dict[str, Any] | None = None  # set by :meth:`load`

    @abc.abstractmethod
    def fit(self, X, y) -> Probe:
        """Fit on features ``X`` [n, d] and targets ``y`` [n]; returns ``self``."""

    @abc.abstractmethod
    def predict(self, X):
        """Predictions for ``X`` [n, d]: values (regressors) or labels (classifiers)."""

    @abc.abstractmethod
    def score(self, X, y) -> float:
        """The probe's own quality measure on held-out data: R² for regressors, accuracy for classifiers."""

    @abc.abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted tensors, as saved in ``probe.safetensors``."""

    @abc.abstractmethod
    def hyperparams(self) -> dict[str, Any]:
        """JSON-able settings and fitted scalars, as saved in the card."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], hyper: Mapping[str, Any]) -> Probe:
        """Rebuild a fitted probe from :meth:`state_tensors` and :meth:`hyperparams`."""

    def save(self, folder: str | Path, **card) -> Path:
        """:func:`save_probe` of this probe (``model=``, ``site=``, ``layer=``, ``task=``, ... as keywords)."""
        return save_probe(self, folder, **card)

    @classmethod
    def load(cls, folder: str | Path) -> Probe:
        """:func:`load_probe`, checked to give an instance of ``cls``."""
        probe = load_probe(folder)
        if not isinstance(probe, cls):
            raise ValueError(f"the probe in {folder} is a {type(probe).__name__}, not a {cls.__name__}")
        return probe


PROBE_TYPES: dict[str, type[Probe]] = {}


def register_probe_type(cls: type) -> type:
    """Make ``cls`` loadable by :func:`load_probe` under ``cls.probe_type`` (usable as a decorator)."""
    if not isinstance(cls, type) or not issubclass(cls, Probe):
        raise ValueError(f"{getattr(cls, '__name__', cls)!r} cannot be registered: probe types subclass "
                         "workbench.methods.probes.base.Probe (fit, predict, score, state_tensors, hyperparams, "
                         "from_state)")
    if not isinstance(getattr(cls, "probe_type", None), str) or not cls.probe_type:
        raise ValueError(f"{cls.__name__} cannot be registered: it lacks a 'probe_type' name")
    if getattr(cls, "__abstractmethods__", None):
        raise ValueError(f"{cls.__name__} cannot be registered: it does not implement "
                         f"{sorted(cls.__abstractmethods__)}")
    PROBE_TYPES[cls.probe_type] = cls
    return cls


# -- input checks ----------------------------------------------------------------------------------------------
def as_features(X, name: str = "X") -> torch.Tensor:
    """Any [n, d] array or tensor -> float64 CPU tensor, checked."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or torch tensor of shape [n, d], got {type(X).__name__}")
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} must have shape [n, d] with n, d >= 1, got {tuple(X.shape)}")
    X = X.detach().to("cpu", torch.float64)
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite values ({int((~torch.isfinite(X)).sum())} entries)")
    return X


def as_target(y, n: int, name: str = "y") -> torch.Tensor:
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.ascontiguousarray(y))
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a 1-d array, tensor or list of numbers, got {type(y).__name__}")
    y = y.detach().to("cpu", torch.float64).reshape(-1) if y.ndim <= 1 else y
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] (one value per row of X), got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return y


def check_grid(name: str, grid) -> tuple[float, ...]:
    try:
        values = tuple(float(a) for a in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-empty list of positive numbers, got {grid!r}") from None
    if not values or not all(math.isfinite(a) and a > 0 for a in values):
        raise ValueError(f"{name} must be a non-empty list of positive finite numbers, got {grid!r}")
    return tuple(sorted(set(values)))


def check_fraction(val_fraction) -> float:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    return float(val_fraction)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def val_split(n: int, val_fraction: float, seed: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) row indices. ``groups``: items with the same key (e.g. the prompt text) stay on one side,
    so a repeated prompt cannot choose its own alpha (:func:`workbench.data.tasks.split_indices`)."""
    n_val = int(round(val_fraction * n))
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"{n} training rows are too few for a {val_fraction:.0%} validation split (each part needs "
                         "at least 2 rows); give more data or a fixed alpha / C")
    if groups is not None:
        fit, val = split_indices(np.zeros(n, dtype=np.int64), [n - n_val, n_val], seed=seed, groups=groups)
        if len(fit) < 2 or len(val) < 2:
            raise ValueError(f"the {len(set(groups))} distinct groups cannot make a {val_fraction:.0%} validation "
                             "split with at least 2 rows a side")
        return fit, val
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def standardise_stats(X: Float[torch.Tensor, "n d"]) -> tuple[Float[torch.Tensor, " d"], Float[torch.Tensor, " d"]]:
    """Per-feature mean and (population) std of X; constant features get std 1 so they standardise to 0."""
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    std = torch.where(std < STD_FLOOR, torch.ones_like(std), std)
    return mean, std


def r2_score(pred: Array, y: Array) -> float:
    """Coefficient of determination 1 - SS_res / SS_tot (SS_tot around the mean of y); NaN when y is constant."""
    pred_t = as_target(pred, len(pred), "pred")
    y_t = as_target(y, len(pred_t), "y")
    ss_tot = float(((y_t - y_t.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(((y_t - pred_t) ** 2).sum()) / ss_tot


def probe_round_accuracy(pred: Array, y: Array, lo: int = 1, hi: int = 9) -> float:
    """Mean of ``clip(round(pred), lo, hi) == y``: the count a probe would answer, read as a digit."""
    pred_t = as_target(pred, len(pred), "pred")
    y_t = as_target(y, len(pred_t), "y")
    return float((torch.round(pred_t).clamp(lo, hi) == y_t).double().mean())




# -- a probe's folder ------------------------------------------------------------------------------------------
def _card_json(obj):
    """Round-trip through JSON now, so a value the card cannot hold fails before anything is written."""
    try:
        return json_roundtrip(obj, strict=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"card fields must be JSON-serialisable: {e}") from e


def probe_dir(model: str, task: str, site_or_layer: str | int, root: str | Path = ".") -> Path:
    """The default folder ``<root>/probes/<model>/<task>/<site or layer_NN>/`` (names made path-safe)."""
    name = f"layer_{site_or_layer:02d}" if isinstance(site_or_layer, int) else safe_segment(site_or_layer)
    return Path(root) / "probes" / safe_segment(model) / safe_segment(task) / name


def _model_card(model) -> dict[str, Any]:
    if isinstance(model, Mapping):
        missing = [k for k in ("name", "weights_hash") if k not in model]
        if missing:
            raise ValueError(f"model mapping lacks {missing}; give a workbench Model or {{'name', 'weights_hash'}}")
        return dict(model)
    if not hasattr(model, "name") or not hasattr(model, "weights_hash"):
        raise ValueError(f"model must be a workbench Model or a mapping with name and weights_hash, got "
                         f"{type(model).__name__}")
    card = {"name": model.name, "weights_hash": model.weights_hash}
    arch = getattr(model, "arch", None)
    if arch is not None:
        card.update(family=arch.family, tied_head=arch.tied, n_layers=arch.n_layers, d_model=arch.d_model,
                    vocab_size=arch.vocab_size)
    source = getattr(model, "source", None) or {}
    for key in ("registry", "hub_id", "source_sha256"):
        if source.get(key):
            card[key] = source[key]
    return card


def save_probe(
    probe,
    folder: str | Path,
    *,
    model,
    site: str,
    layer: int | None,
    task: str,
    generator_params: Mapping[str, Any] | None,
    seed: int | None,
    metrics: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write ``probe.safetensors`` and ``card.json`` as one folder by :func:`workbench.io.artifact.write_artifact`
    (claimed, staged, card last, renamed into place); return the folder.

    model: the :class:`workbench.Model` the features came from (its name, weights hash, family, tied head), or a
    mapping with at least ``name`` and ``weights_hash``. The card records the sha256 of the tensors file
    (``weights_sha256`` and ``files``); a crash leaves the old folder (or none) and a ``.tmp-probe-*`` sibling,
    never a mix of old and new.
    """
    if type(probe).probe_type not in PROBE_TYPES or PROBE_TYPES[type(probe).probe_type] is not type(probe):
        raise ValueError(f"probe type {type(probe).__name__} is not registered; registered: {sorted(PROBE_TYPES)}")
    if not isinstance(site, str) or not site:
        raise ValueError(f"site must be a non-empty site name, got {site!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"layer must be a non-negative int or None, got {layer!r}")
    if not isinstance(task, str) or not task:
        raise ValueError(f"task must be a non-empty string, got {task!r}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in probe.state_tensors().items()}
    card = _card_json({
        "format": CARD_FORMAT,
        "probe_type": probe.probe_type,
        "hyperparams": probe.hyperparams(),
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()
        },
        "model": _model_card(model),
        "site": site,
        "layer": layer,
        "task": task,
        "generator_params": dict(generator_params) if generator_params is not None else None,
        "seed": seed,
        "metrics": dict(metrics),
        "versions": package_versions(),
        "created_at": now(),
    })
    data = save(tensors, metadata={"probe_type": probe.probe_type, "format": "pt"})
    card["weights_file"] = PROBE_WEIGHTS_FILE
    card["weights_sha256"] = hashlib.sha256(data).hexdigest()  # as cards before io.artifact recorded it
    folder = Path(folder)
    write_artifact(folder, PROBE_KIND, card, files={PROBE_WEIGHTS_FILE: data}, overwrite=overwrite)
    return folder


def _recorded(card: dict) -> dict:
    """The files a probe card vouches for: ``files`` (cards written through :mod:`workbench.io.artifact`) and the
    tensors file under ``weights_file`` / ``weights_sha256`` (every card, the committed ones included)."""
    files = dict(card["files"]) if isinstance(card.get("files"), dict) else {}
    name = card.get("weights_file", PROBE_WEIGHTS_FILE)
    return files | {name if isinstance(name, str) else repr(name): card.get("weights_sha256")}


def read_card(folder: str | Path) -> dict[str, Any]:
    """The card of a saved probe (no hash check; :func:`load_probe` checks): :func:`workbench.io.artifact.read_card`
    of its ``card.json``, so a missing card, invalid JSON or anything but an object is an ``ArtifactError``."""
    return read_json_card(Path(folder) / PROBE_CARD_FILE)


def load_probe(folder: str | Path):
    """Load a probe saved by :func:`save_probe`; the card is attached as ``probe.card``.

    Reads the folder through :func:`workbench.io.artifact.read_artifact`: the card, and the sha256 of every file it
    records (the tensors file included), must match, else :class:`~workbench.io.artifact.ArtifactError` (a
    ``ValueError``) naming both hashes; the tensors must be the ones the card declares; the card's ``probe_type``
    picks the class from :data:`PROBE_TYPES`.
    """
    folder = Path(folder)
    card = read_artifact(folder, PROBE_KIND)
    weights = folder / card.get("weights_file", PROBE_WEIGHTS_FILE)
    ptype = card.get("probe_type")
    if ptype not in PROBE_TYPES:
        raise ArtifactError(f"probe card in {folder} has probe_type {ptype!r}; known types: {sorted(PROBE_TYPES)}")
    tensors = load_file(str(weights))
    declared = card.get("tensors")
    if not isinstance(declared, dict) or not declared:
        raise ArtifactError(f"probe card in {folder} declares no tensors; refusing an unchecked probe")
    if set(declared) != set(tensors):
        raise ArtifactError(f"{weights.name} holds tensors {sorted(tensors)} but the card lists {sorted(declared)}")
    for key, spec in declared.items():
        got = {"shape": list(tensors[key].shape), "dtype": str(tensors[key].dtype).removeprefix("torch.")}
        if not isinstance(spec, dict) or {"shape": spec.get("shape"), "dtype": spec.get("dtype")} != got:
            spec = spec if isinstance(spec, dict) else {}
            raise ArtifactError(f"{weights.name}: tensor {key!r} is {got['dtype']} {got['shape']} but the card "
                                f"declares {spec.get('dtype')} {spec.get('shape')}")
    if not isinstance(card.get("hyperparams"), dict):
        raise ArtifactError(f"probe card in {folder} has no hyperparams object; the folder is damaged")
    probe = PROBE_TYPES[ptype].from_state(tensors, card["hyperparams"])
    probe.card = card
    return probe


# A probe folder (probe.safetensors + card.json), written and read through workbench.io.artifact.
PROBE_KIND = register_kind(ArtifactKind("probe", card_file=PROBE_CARD_FILE, signature=(PROBE_CARD_FILE,),
                                        recorded=_recorded, check=load_probe, label="probe"))
