"""``load_model(name_or_path)`` -> :class:`Model`: a transformers model, its tokenizer, and where its parts are.

Names come from the zoo (:mod:`workbench.core.zoo`: packaged GGUF models and plugin models such as the VLM
testbed). Local Hugging Face folders and hub ids go through the same ``from_pretrained`` path; one whose config is
a supported vision-language family (``workbench.core.arch.SUPPORTED_VLM_FAMILIES``) loads with
``AutoModelForImageTextToText`` and ``AutoProcessor``, and its :class:`Model` carries the processor
(``model.processor``; see :mod:`workbench.core.vlm`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from workbench.core.arch import SUPPORTED_VLM_FAMILIES, ArchMap, resolve_arch
from workbench.core.zoo import REGISTRY, ensure_packaged, plugin_models, registry_names
from workbench.io.atomic import read_marker, sha256_file_cached

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Model:
    """A loaded model: the transformers module, its tokenizer, and where its parts are."""

    hf: nn.Module  # the transformers *ForCausalLM (or *ForConditionalGeneration VLM), in eval mode
    tokenizer: object  # a transformers tokenizer (left padding); a VLM's is its processor's tokenizer
    name: str
    arch: ArchMap
    source: dict = field(default_factory=dict)  # provenance: registry entry, path, source sha256, weights sha256
    processor: object | None = None  # a VLM's transformers processor (images + text -> inputs); None for text models
    # A fixed prompt format with a ``{question}`` field, for models trained on one (the VLM testbed); None: the
    # processor's chat template is used (see workbench.methods.answering.format_prompt).
    prompt_template: str | None = None

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
            return hashlib.sha256("".join(sha256_file_cached(f) for f in files).encode()).hexdigest()
        h = hashlib.sha256()
        for key, tensor in sorted(self.hf.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def resolve_device(device) -> torch.device:
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


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; allowed: {sorted(DTYPES)} (or the torch dtypes)")


def _check_name(name_or_path) -> str:
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be a registry name, a local folder or a hub id; got {name_or_path!r}")
    name = str(name_or_path)
    if name in REGISTRY or name in plugin_models() or Path(name).expanduser().is_dir():
        return name
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name  # a hub id
    hint = "" if plugin_models() else (
        "; no plugin model is registered (the VLM testbed's names come from the 'workbench.models' entry point of "
        "an installed workbench: run `pip install -e .` in the checkout)")
    raise ValueError(
        f"unknown model {name!r}: not a registry name ({', '.join(registry_names())}), "
        "not a local folder, "
        f"and not a hub id of the form 'org/name'{hint}"
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
    try:
        return AutoConfig.from_pretrained(target, local_files_only=True).model_type
    except (OSError, ValueError):
        return None


def _load_vlm(target: str, dt: torch.dtype):
    processor = AutoProcessor.from_pretrained(target)
    hf = AutoModelForImageTextToText.from_pretrained(target, dtype=dt)
    return hf, processor


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None) -> Model:
    """Load a registry model, a local Hugging Face folder or a hub id as a :class:`Model` in eval mode.

    A folder or hub id whose config is a supported vision-language family loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``; the model's ``processor`` is then set.
    """
    name = _check_name(name_or_path)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    plugins = plugin_models()
    if name in plugins:
        return plugins[name].load(dev, dt)
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
                if not hub or AutoConfig.from_pretrained(target).model_type not in SUPPORTED_VLM_FAMILIES:
                    raise
                hf, processor = _load_vlm(target, dt)
                tok = processor.tokenizer
            if processor is None and getattr(hf.config, "model_type", None) in SUPPORTED_VLM_FAMILIES:
                # a VLM that *ForCausalLM maps to its full class (Gemma 3)
                processor = AutoProcessor.from_pretrained(target)
    except OSError as e:
        raise OSError(f"could not load {name!r} (is the hub reachable? registry names work offline: "
                      f"{', '.join(sorted(REGISTRY))}): {e}") from e
    if "path" not in source:
        source["path"] = getattr(hf.config, "_name_or_path", None)
    return from_hf(hf, tok, name=name, device=dev, source=source, processor=processor)


def from_hf(
    hf: nn.Module, tokenizer, *, name: str | None = None, device=None, source: dict | None = None, processor=None,
    prompt_template: str | None = None,
) -> Model:
    """Wrap an already-built transformers model (e.g. a tiny random one) as a :class:`Model`.

    processor: a VLM's transformers processor (optional; ``workbench.core.vlm.encode_multimodal`` needs it). A text
    model takes none.
    """
    arch = resolve_arch(hf)  # raises before anything else is touched
    if processor is not None and not arch.is_vlm:
        raise ValueError(f"a processor was given for the text-only {arch.family} model {name or type(hf).__name__}")
    if device is not None:
        hf = hf.to(resolve_device(device))
    hf.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if processor is not None and getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return Model(
        hf=hf, tokenizer=tokenizer, name=name or type(hf).__name__, arch=arch, source=dict(source or {}),
        processor=processor, prompt_template=prompt_template,
    )
