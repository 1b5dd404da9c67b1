"""``load_model(name_or_path)`` -> :class:`Model`: a transformers model, its tokenizer, and where its parts are.

Names come from the zoo (:mod:`workbench.core.zoo`: packaged GGUF models and plugin models such as the VLM
testbed). Local Hugging Face folders and hub ids go through the same ``from_pretrained`` path; one whose config is
a supported vision-language family (``workbench.core.arch.SUPPORTED_VLM_FAMILIES``) loads with
``AutoModelForImageTextToText`` and ``AutoProcessor``, and its :class:`Model` carries the processor
(``model.processor``; see :mod:`workbench.core.vlm`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import model_info, try_to_load_from_cache
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from workbench.core.arch import SUPPORTED_VLM_FAMILIES, ArchMap, resolve_arch
from workbench.core.zoo import REGISTRY, ensure_packaged, plugin_models, registry_names
from workbench.io.atomic import combined_sha256, read_marker, sha256_file_cached, verify_files

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
        """Where inputs go: the device the embedding runs on (for a model dispatched over several devices with
        accelerate, its execution device; offloaded weights are brought there for each forward)."""
        return module_device(self.module(self.arch.embed))

    @property
    def head_device(self) -> torch.device:
        """The device the output head runs on (the last one of a dispatched model)."""
        return module_device(self.module(self.arch.unembed))

    @property
    def is_dispatched(self) -> bool:
        """Whether accelerate placed the model over devices (``device_map``), possibly offloading to CPU/disk."""
        return bool(getattr(self.hf, "hf_device_map", None))

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
        dev = self.device
        return {name: _to_device(t, dev) for name, t in
                (("input_ids", enc["input_ids"]), ("attention_mask", mask), ("position_ids", position_ids))}

    # -- provenance ------------------------------------------------------------------------------------------
    # (identity, fingerprint) set by a loader right after reading the weights from files; see bind_weights_files
    _weights_binding: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _weights_memo: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def _fingerprint(self) -> tuple:
        """Which tensors the model holds now: a tensor replaced, moved, cast or changed in place (its version
        counter) changes this, so a stale identity can never be served."""
        # An offloaded weight (meta device; accelerate swaps a real tensor in for each forward, bumping the meta
        # tensor's version) is identified by its place: its value lives in accelerate's offload store.
        return tuple((k, "offloaded", t.dtype, tuple(t.shape)) if t.device.type == "meta" else
                     (k, t.data_ptr(), t._version, t.dtype, tuple(t.shape), str(t.device))
                     for k, t in self.hf.state_dict(keep_vars=True).items())

    def bind_weights_files(self, files_sha256: str) -> None:
        """For loaders: the tensors were just read from files whose (combined) sha256 is ``files_sha256``. Until a
        tensor changes, that is the weights identity (cheap); a load in another dtype than float32 gets an identity
        derived from it and the dtype (the values differ from a float32 load)."""
        if not isinstance(files_sha256, str) or len(files_sha256) != 64:
            raise ValueError(f"files_sha256 must be a sha256 hex digest, got {files_sha256!r}")
        ident = files_sha256 if self.dtype == torch.float32 else hashlib.sha256(
            f"{files_sha256}|{self.dtype}".encode()).hexdigest()
        self._weights_binding = (ident, self._fingerprint())

    @property
    def weights_hash(self) -> str:
        """The identity of the weights as they are now, derived and never copied: the sha256 of the files they were
        loaded from while every tensor is as the loader left it (see :meth:`bind_weights_files`), else the sha256
        of the tensors themselves (see :func:`_tensors_sha256`; memoised until a tensor changes). A merged LoRA, an
        edited module or a cast therefore never reports the weights it came from."""
        fp = self._fingerprint()
        if self._weights_binding is not None and self._weights_binding[1] == fp:
            return self._weights_binding[0]
        if self._weights_memo is None or self._weights_memo[0] != fp:
            state = self.hf.state_dict(keep_vars=True)
            state = {k: _offloaded(self.hf, k) if t.device.type == "meta" else t for k, t in state.items()}
            self._weights_memo = (fp, _tensors_sha256(state))
        return self._weights_memo[1]


# sha256 of tensor bytes by (data_ptr, version, dtype, shape, stride, device) -> (weakref to the tensor, digest):
# shared by every Model of the process, so wrapping the same weights again (from_hf twice, a study's copy) never
# hashes them again. The weak reference must still point at the very tensor: memory freed and reused by another
# tensor at the same address is hashed afresh.
_TENSOR_DIGESTS: dict[tuple, tuple[weakref.ref, str]] = {}
_HASH_CHUNK = 64 << 20  # bytes of a device tensor copied to the host at a time


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.stride(), str(t.device))


def _bytes_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (row-major), read in place on the CPU (no copy) and in 64 MiB host copies from any
    other device, so hashing never holds a CPU copy of more than one chunk."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    h = hashlib.sha256()
    if flat.device.type == "cpu":
        h.update(flat.numpy())  # the buffer itself; hashlib releases the GIL for large buffers
    else:
        for s in range(0, flat.numel(), _HASH_CHUNK):
            h.update(flat[s : s + _HASH_CHUNK].to("cpu").numpy())
    return h.hexdigest()


def _cached_digest(t: torch.Tensor) -> str | None:
    hit = _TENSOR_DIGESTS.get(_tensor_key(t))
    return hit[1] if hit is not None and hit[0]() is t else None


def _tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """The identity of a state dict (``keep_vars=True``: the parameters themselves): sha256 over sorted
    ``name|dtype|shape|sha256(bytes)`` lines. Each distinct tensor is hashed once (tied weights share one digest), on
    a thread pool, and remembered for the process while it lives."""
    todo: dict[tuple, torch.Tensor] = {}
    for t in state.values():
        if _cached_digest(t) is None:
            todo[_tensor_key(t)] = t
    if todo:
        workers = min(8, os.cpu_count() or 1, len(todo))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for (key, t), digest in zip(todo.items(), pool.map(_bytes_sha256, todo.values())):
                _TENSOR_DIGESTS[key] = (weakref.ref(t), digest)
    for key in [k for k, (ref, _) in _TENSOR_DIGESTS.items() if ref() is None]:
        del _TENSOR_DIGESTS[key]
    h = hashlib.sha256(b"workbench.weights/2\n")
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{_cached_digest(t)}\n".encode())
    return h.hexdigest()


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A host tensor on ``dev``; to CUDA through pinned memory without waiting, so encoding the next batch never
    waits for the work already queued on the device (a pageable copy would)."""
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def module_device(module: nn.Module) -> torch.device:
    """The device a module computes on: accelerate's execution device when the module was dispatched (its weights
    may sit on the meta device, offloaded to CPU or disk), else the device of its first real parameter or buffer
    (the meta device for a model built without weights)."""
    hooks = [getattr(module, "_hf_hook", None)]
    hooks += list(getattr(hooks[0], "hooks", ()))  # a SequentialHook holds several
    for hook in hooks:
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    first = None
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type != "meta":
            return t.device
        if first is None:
            first = t
    if first is not None:
        return first.device  # a model built on the meta device (no weights anywhere): that is where it is
    raise ValueError(f"{type(module).__name__} has no parameters or buffers and no accelerate execution device")


def _offloaded(root: nn.Module, key: str) -> torch.Tensor:
    """An offloaded (meta) tensor's value from the accelerate hook of the module that owns it."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = root.get_submodule(".".join(parts[:i]))
        wmap = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if wmap is not None:
            return wmap[".".join(parts[i:])]
    raise ValueError(f"weight {key!r} is on the meta device and no accelerate hook holds its value: the model was "
                     "not dispatched with offloading, or its weights were never loaded")


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


HUB_TIMEOUT_S = 10  # one look-up of a hub id that is neither a folder nor cached; no retries


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name) or Path(name).suffix in (".gguf", ".safetensors", ".bin"))


def check_model_name(name_or_path) -> str:
    """Check a model name before anything heavy: a registry name, an existing local folder, or a hub id that is
    cached or that the hub answers for (one look-up, ``HUB_TIMEOUT_S``, no retries; with ``HF_HUB_OFFLINE`` only
    the cache counts). A path-like name whose folder is missing fails at once, naming the folder and the registry
    names, instead of being sent to the hub."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"model must be a registry name, a local folder or a hub id; got {name_or_path!r}")
    name = str(name_or_path)
    if name in REGISTRY or name in plugin_models() or Path(name).expanduser().is_dir():
        return name
    hint = "" if plugin_models() else (
        "; no plugin model is registered (the VLM testbed's names come from the 'workbench.models' entry point of "
        "an installed workbench: run `pip install -e .` in the checkout)")
    known = f"registry names: {', '.join(registry_names())}{hint}"
    folder = Path(name).expanduser().resolve()
    if _looks_like_path(name) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ValueError(f"unknown model {name!r}: no folder {folder} exists, and it is not a registry name "
                         f"({known})")
    if folder.parent.is_dir() and folder.parent != Path.cwd().resolve():
        raise ValueError(f"unknown model {name!r}: the folder {folder} does not exist (its parent does, so this looks "
                         f"like a local path, not a hub id); {known}")
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name  # a hub id in the local cache
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise ValueError(f"unknown model {name!r}: not a local folder ({folder}), not in the Hugging Face cache, "
                         f"and HF_HUB_OFFLINE is set; {known}")
    try:
        model_info(name, timeout=HUB_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any failure of the one look-up ends here, named
        raise ValueError(f"unknown model {name!r}: not a local folder ({folder}), not in the Hugging Face cache, and "
                         f"the hub did not confirm it within {HUB_TIMEOUT_S} s ({type(e).__name__}: "
                         f"{str(e)[:200]}); {known}") from None
    return name


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


def _load_vlm(target: str, dt: torch.dtype, placement: dict):
    processor = AutoProcessor.from_pretrained(target)
    hf = AutoModelForImageTextToText.from_pretrained(target, dtype=dt, **placement)
    return hf, processor


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None, *, device_map=None,
               max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None) -> Model:
    """Load a registry model, a local Hugging Face folder or a hub id as a :class:`Model` in eval mode.

    A folder or hub id whose config is a supported vision-language family loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``; the model's ``processor`` is then set.

    device_map: for a model that does not fit one device, accelerate's placement (``"auto"``, ``"balanced"``,
    ``"sequential"`` or a dict module path -> device / ``"cpu"`` / ``"disk"``), with its ``max_memory`` per device
    and an ``offload_folder`` for ``"disk"``. Layers then live on different devices; inputs go to the embedding's
    device (``model.device``) and every workbench tool moves what it reads where it is needed. Not with ``device``.
    """
    name = check_model_name(name_or_path)
    if device_map is not None and device is not None:
        raise ValueError(f"give device={device!r} or device_map={device_map!r}, not both")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder go with a device_map")
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map {device_map!r} is not allowed: 'auto', 'balanced', 'balanced_low_0', "
                         "'sequential' or a dict of module path -> device")
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise ValueError(f"device_map must be a str or a dict, got {type(device_map).__name__}")
    dev, dt = (None if device_map is not None else resolve_device(device)), resolve_dtype(dtype)
    placement = {} if device_map is None else {
        "device_map": device_map, "max_memory": max_memory,
        "offload_folder": None if offload_folder is None else str(offload_folder)}
    plugins = plugin_models()
    if name in plugins:
        if device_map is not None:
            raise ValueError(f"{name} is a plugin model: it loads itself and takes no device_map")
        return plugins[name].load(dev, dt)
    source: dict = {}
    files_sha = None
    if name in REGISTRY:
        folder = ensure_packaged(name)
        marker = read_marker(folder)
        files = marker["weights_files"]
        verify_files(folder, files)  # the cached conversion must still be what was recorded (size, mtime, sha256)
        files_sha = combined_sha256(files)
        source = {
            "registry": name,
            "path": str(folder),
            "hub_id": marker["hub_id"],
            "source_sha256": marker["source_sha256"],
            "weights_files": files,
        }
        target = str(folder)
    elif Path(name).expanduser().is_dir():
        target = str(Path(name).expanduser().resolve())
        source = {"path": target}
        found = sorted(Path(target).glob("*.safetensors"))
        if found:
            files = {f.name: sha256_file_cached(f) for f in found}
            files_sha, source["weights_files"] = combined_sha256(files), files
    else:
        target = name
        source = {"hub_id": name}
    hub = "hub_id" in source and "registry" not in source
    processor = None
    try:
        if _config_model_type(target, hub=hub) in SUPPORTED_VLM_FAMILIES:
            hf, processor = _load_vlm(target, dt, placement)
            tok = processor.tokenizer
        else:
            tok = AutoTokenizer.from_pretrained(target)
            try:
                hf = AutoModelForCausalLM.from_pretrained(target, dtype=dt, **placement)
            except ValueError:
                # A hub VLM that was not cached (so its config was unknown above) has no *ForCausalLM class.
                if not hub or AutoConfig.from_pretrained(target).model_type not in SUPPORTED_VLM_FAMILIES:
                    raise
                hf, processor = _load_vlm(target, dt, placement)
                tok = processor.tokenizer
            if processor is None and getattr(hf.config, "model_type", None) in SUPPORTED_VLM_FAMILIES:
                # a VLM that *ForCausalLM maps to its full class (Gemma 3)
                processor = AutoProcessor.from_pretrained(target)
    except OSError as e:
        raise OSError(f"could not load {name!r} (is the hub reachable? registry names work offline: "
                      f"{', '.join(sorted(REGISTRY))}): {e}") from e
    if "path" not in source:
        source["path"] = getattr(hf.config, "_name_or_path", None)
    model = from_hf(hf, tok, name=name, device=dev, source=source, processor=processor)
    if files_sha is not None:
        model.bind_weights_files(files_sha)
    return model


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
        if getattr(hf, "hf_device_map", None):
            placed = sorted({str(d) for d in hf.hf_device_map.values()})
            raise ValueError(f"this model was dispatched over devices by accelerate ({placed}); moving it to "
                             f"device={device!r} would break its placement: give device=None")
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
