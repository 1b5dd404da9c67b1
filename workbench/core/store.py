"""Activation store: harvest activations at named sites to sharded safetensors files, and read them back lazily.

    store = harvest(model, ["The cat sat", "Paris is"], ["blocks.3.hook_resid_post"], "acts/")        # prompts
    store = harvest(model, Corpus("corpus.txt"), "blocks.3.hook_resid_post", "acts/", max_tokens=10**6)  # corpus
    for x in store.iter_batches("blocks.3.hook_resid_post", 4096, shuffle=True):                     # [4096, d]
        ...

Data
----
* a list of prompts (strings): each prompt is one *row*, tokenised by :meth:`Model.encode` (the tokenizer's special
  tokens, left padding inside a batch). ``positions="all"`` stores every real (non-pad) token of the prompt,
  ``positions="last"`` only its last token. A prompt longer than ``context_length`` tokens is an error.
* a :class:`Corpus` (or a registry corpus name or a local ``.txt`` / ``.jsonl`` file, coerced by
  :func:`workbench.data.corpus.as_corpus`): cut into windows of ``context_length`` tokens by
  :func:`workbench.data.corpus.token_windows` (documents tokenised without special tokens, each followed by EOS,
  one stream; every window starts with BOS under the BOS rule of :func:`~workbench.data.corpus.window_bos`); each
  window is one row and every token is stored. Only the last window may be shorter (``last="keep"``). Documents
  are read lazily, so a corpus of any size streams through.

On-disk format (``out_dir``)
----------------------------
``shard_00000.safetensors``, ``shard_00001.safetensors``, ... each holding, for the ``n`` tokens of that shard:

* one tensor per site, named by the site name, ``[n, d_site]`` (float32 by default; see ``dtype``);
* ``token_ids`` ``[n]`` int64: the input token;
* ``row`` ``[n]`` int64: the prompt / window index in the data;
* ``position`` ``[n]`` int64: the position of the token within its prompt / window (0 = first real token).

Tokens are in data order: row by row, and position by position inside a row. A shard holds whole batches (except
when ``max_tokens`` cuts the last one): it is written as soon as it holds at least ``shard_tokens`` tokens, so its
boundaries depend only on the data and the arguments, never on when a run was interrupted.

``manifest.json`` (rewritten atomically after every shard) records the format version, the model (name, family,
weights sha256, source), the tokenizer (class, vocab size, bos/eos/pad ids), the data (kind, number of prompts or
documents, sha256 of the texts, how a file is split, whether windows start with BOS; ``data_source`` says where it
came from), ``sites`` and ``d`` of each, ``context_length``, ``batch_size``, ``positions``, ``shard_tokens``,
``max_tokens``, ``dtype``, ``device``, the totals ``n_tokens`` / ``n_rows``, and per shard ``{file, n_tokens,
n_rows, first_row, last_row, first_token, bytes, sha256}``; ``status`` is ``"partial"`` until the last shard is
written, then ``"complete"``; ``versions`` (python, torch, transformers, safetensors, workbench) and ``created_at`` /
``updated_at`` timestamps. A hidden ``.harvest.lock`` serialises harvests into the same folder.

Vision-language models: ``harvest(vlm, prompts, sites, out, images=[...])`` runs each prompt with its image(s)
(``workbench.core.vlm.encode_multimodal``: every prompt carries the image placeholder once per image); the stored
``token_ids`` hold the image token at image positions, so ``store.tokens()["token_ids"] == image_token_id`` selects
them. The data hash covers the images' pixels. Without ``images`` the data is text only and a VLM's language model
runs on it without images (exactly what the VLM computes for a text-only prompt). Vision-tower sites (``vision.*``,
``projector.hook_out``) hold one vector per image patch, not per token, and are refused with a ValueError;
capture those with :func:`workbench.core.trace` on ``encode_multimodal`` batches.

Activations are moved to the CPU as float32 by default (``dtype="bfloat16"``/``"float16"`` halve the disk; ``None``
keeps the model's dtype). A background thread writes each shard while the next batches run forward; at most one
shard waits for it, so a harvest holds at most two shards of activations (about ``shard_tokens + batch_size *
context_length`` tokens each: the one being filled and the one being written), whatever the size of the data. On
CUDA the activations are cast on the device and copied into pinned host memory without waiting.

Every file appears under its final name complete or not at all (temporary file + ``os.replace``). Re-running an
interrupted harvest with the same arguments resumes after the last complete shard, and the finished store is
byte-identical to an uninterrupted one (manifest timestamps aside). An existing store made with other arguments is
never mixed into: ``harvest`` raises (``resume=False`` deletes it and starts over).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.models import _to_device
from workbench.core.sites import resolve_site
from workbench.core.trace import trace
from workbench.core.vlm import check_multimodal, encode_multimodal
from workbench.data.corpus import Corpus, as_corpus, token_windows, window_bos
from workbench.io.atomic import atomic_write_json, file_lock, remember_sha256, sha256_file, sha256_file_cached
from workbench.io.provenance import now, package_versions

FORMAT = "workbench.activation_store/1"
MANIFEST = "manifest.json"
LOCK = ".harvest.lock"
TOKEN_FIELDS = ("token_ids", "row", "position")
POSITIONS = ("all", "last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Arguments that define the content of a store: a resume must match every one of them.
_SPEC_KEYS = (
    "format", "model_weights_sha256", "tokenizer", "data", "sites", "context_length", "batch_size", "positions",
    "shard_tokens", "max_tokens", "dtype",
)


class StoreError(ValueError):
    """An activation store is incomplete, damaged, or was made with other arguments than the ones given."""


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def _text_hasher():
    """sha256 over length-prefixed UTF-8 texts (so ["ab", "c"] and ["a", "bc"] differ)."""
    h = hashlib.sha256()

    def add(text: str) -> None:
        b = text.encode("utf-8")
        h.update(struct.pack("<Q", len(b)))
        h.update(b)

    return h, add


def _describe_prompts(prompts: list, images: list[list] | None = None) -> dict:
    if not prompts:
        raise ValueError("data is empty: give at least one prompt (or a non-empty Corpus)")
    h, add = _text_hasher()
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"every prompt must be a non-empty string; prompt {i} is {p!r}")
        add(p)
    if images is None:
        return {"kind": "prompts", "n_items": len(prompts), "sha256": h.hexdigest()}
    hi = hashlib.sha256()
    for row in images:
        hi.update(str(len(row)).encode())
        for im in row:
            hi.update(f"{im.mode}{im.size}".encode())
            hi.update(im.tobytes())
    return {"kind": "prompts+images", "n_items": len(prompts), "sha256": h.hexdigest(),
            "images_sha256": hi.hexdigest(), "n_images": sum(len(r) for r in images)}


def _describe_corpus(corpus: Corpus, bos_id: int | None) -> dict:
    """One streaming pass over the documents: type checks, counts, sha256."""
    h, add = _text_hasher()
    n = nonempty = 0
    for doc in corpus.documents():
        if not isinstance(doc, str):
            raise ValueError(f"corpus document {n} is a {type(doc).__name__}, not a string")
        add(doc)
        n += 1
        nonempty += bool(doc)
    if not nonempty:
        raise ValueError(f"data is empty: the corpus {corpus.source()} has no non-empty document ({n} documents)")
    return {
        "kind": "corpus",
        "n_items": n,
        "sha256": h.hexdigest(),
        "split": corpus.split if corpus.path is not None else None,
        "prepend_bos": bos_id is not None,
    }


def _as_data(data) -> list[str] | Corpus:
    """A list of prompts stays prompts; a Corpus, a registry corpus name or a file is a corpus (:func:`as_corpus`)."""
    if isinstance(data, (Corpus, str, os.PathLike)):
        return as_corpus(data)
    if isinstance(data, Iterable) and not isinstance(data, (bytes, dict)):
        if iter(data) is data:
            raise ValueError(
                "data is a one-shot iterator; give a list of prompts, or wrap documents in Corpus(...) (a list, a "
                "file path, or a function returning a fresh iterator)"
            )
        return list(data)
    raise ValueError(f"data must be a list of prompts, a Corpus or a .txt path; got {type(data).__name__}")


def _batched(it: Iterable, n: int) -> Iterator[list]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _pad_left(windows: list[list[int]], pad_id: int, device) -> dict[str, Tensor]:
    """Left-padded input_ids / attention_mask / position_ids, like :meth:`Model.encode`."""
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, width - len(w) :] = torch.tensor(w, dtype=torch.long)
        mask[i, width - len(w) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}


# ---------------------------------------------------------------------------------------------------------------
# Harvest
# ---------------------------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_sites(model, sites, images: bool = False) -> list[str]:
    site_list = [sites] if isinstance(sites, str) else list(sites) if isinstance(sites, Iterable) else None
    if not site_list:
        raise ValueError(
            f"sites must be a site name or a non-empty list of them, got {sites!r}; e.g. "
            f"'blocks.0.hook_resid_post' (see workbench.site_names(model.arch))"
        )
    dupes = sorted({s for s in site_list if site_list.count(s) > 1})
    if dupes:
        raise ValueError(f"sites listed more than once: {dupes}")
    reserved = [s for s in site_list if s in TOKEN_FIELDS]
    if reserved:
        raise ValueError(f"site names {reserved} clash with the store's token fields {list(TOKEN_FIELDS)}")
    trace(model, site_list)  # resolves every name (raises SiteError listing valid sites); installs nothing
    modules = {name for name, _ in model.hf.named_modules()}
    vision = [s for s in site_list if resolve_site(s, model.arch, modules).stream == "vision"]
    if vision:
        why = ("they hold one vector per image patch, not per token" if images else
               "harvest feeds text only here (no images=), so they would never fire")
        raise ValueError(
            f"sites {vision} are in the vision tower of {getattr(model, 'name', 'the model')}: {why}; harvest a VLM's "
            "language-model sites (blocks.*, hook_embed, ln_final.*), or capture vision sites with workbench.core.trace "
            "on encode_multimodal batches"
        )
    return site_list


def _tokenizer_info(tok) -> dict:
    return {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def _write_shard(path: Path, tensors: dict[str, list[Tensor]]) -> tuple[str, int]:
    """Write a safetensors shard atomically from each tensor's parts (CPU, contiguous, concatenated along dim 0 in
    the file, never in memory); return (sha256, size in bytes). The sha256 is taken from the bytes as they are
    written, so the file is never read back."""
    header: dict[str, dict] = {}
    offset = 0
    for name, parts in tensors.items():
        rows = sum(int(p.shape[0]) for p in parts)
        nbytes = sum(p.numel() * p.element_size() for p in parts)
        header[name] = {"dtype": _ST_DTYPES[parts[0].dtype], "shape": [rows, *parts[0].shape[1:]],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for block in (struct.pack("<Q", len(text)), text):
                f.write(block)
                h.update(block)
            for parts in tensors.values():
                for part in parts:
                    buf = part.contiguous().reshape(-1).view(torch.uint8).numpy()
                    f.write(buf)
                    h.update(buf)
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        if size != 8 + len(text) + offset:
            raise OSError(f"shard {path.name}: wrote {size} bytes, expected {8 + len(text) + offset}")
        digest = h.hexdigest()
        os.replace(tmp, path)
        remember_sha256(path, digest)  # opening or resuming the store checks the shard without reading it again
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest, size


class _ShardWriter:
    """Writes shards on a background thread while the next batches run forward.

    At most one shard is handed over at a time (``submit`` waits for the previous one to be on disk), so a harvest
    holds at most two shards of activations: the one being filled and the one being written. A shard's manifest
    entry is appended and the manifest rewritten only after its file is complete, in order. An error in the writer
    is raised in the harvesting thread at the next ``submit`` or at ``close``.
    """

    def __init__(self, out: Path, manifest: dict):
        self.out, self.manifest = out, manifest
        self._idle = threading.Semaphore(1)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="workbench-harvest-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            path, parts, entry, ready = item
            try:
                if self._error is None:
                    if ready is not None:
                        ready.synchronize()  # the device-to-host copies into these buffers are done
                    digest, size = _write_shard(path, parts)
                    self.manifest["shards"].append(entry | {"bytes": size, "sha256": digest})
                    _write_manifest(self.out, self.manifest, "partial")
            except BaseException as e:  # noqa: BLE001 - handed to the harvesting thread
                self._error = e
            finally:
                del parts
                self._idle.release()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, path: Path, parts: dict[str, list[Tensor]], entry: dict, ready) -> None:
        self._idle.acquire()  # the previous shard is written: memory stays at two shards
        try:
            self._raise()
        except BaseException:
            self._idle.release()
            raise
        self._queue.put((path, parts, entry, ready))

    def close(self) -> None:
        """Wait for the shard in flight (a shard already handed over is always finished, even on an interrupt)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()


def _own_files(out: Path) -> list[Path]:
    """Files of a store in ``out``: shards, the manifest, temporaries left by a crash."""
    return [
        p for p in out.iterdir()
        if p.is_file() and (
            (p.name.startswith("shard_") and p.name.endswith(".safetensors"))
            or p.name == MANIFEST
            or (p.name.startswith((".shard_", f".{MANIFEST}.")) and p.name.endswith(".tmp"))
        )
    ]


def _spec_diff(old: dict, new: dict) -> list[str]:
    def short(v) -> str:
        s = json.dumps(v, sort_keys=True, default=str)
        return s if len(s) <= 160 else s[:157] + "..."

    return [f"{k}: store has {short(old.get(k))}, now {short(new[k])}" for k in _SPEC_KEYS if old.get(k) != new[k]]


def _prepare(out: Path, spec: dict, resume: bool) -> dict | None:
    """Return the manifest to resume from (None: start fresh), after checking it matches ``spec``."""
    manifest_path = out / MANIFEST
    if not resume:
        for p in _own_files(out):
            p.unlink()
    if not manifest_path.exists():
        stray = [p.name for p in out.iterdir() if p.name != LOCK and p not in _own_files(out)]
        if stray:
            raise ValueError(
                f"out_dir {str(out)!r} is not empty and holds no activation store (found {stray[:5]}); "
                "give an empty or new folder"
            )
        for p in _own_files(out):
            p.unlink()  # shards or temporaries without a manifest: never described, so never trusted
        return None
    try:
        old = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{manifest_path} is not valid JSON ({e}); pass resume=False to start over") from e
    if old.get("format") != FORMAT:
        raise StoreError(f"{manifest_path} is not a {FORMAT} manifest (format {old.get('format')!r})")
    diff = _spec_diff(old, spec)
    if diff:
        raise StoreError(
            f"out_dir {str(out)!r} holds a store made with other arguments; refusing to mix:\n  "
            + "\n  ".join(diff)
            + "\npass resume=False to delete it and start over, or choose another out_dir"
        )
    # Keep the listed shards that are present with the recorded size and sha256 (read again only when the file
    # changed since it was written); rebuild from the first that is not.
    kept = []
    for rec in old["shards"]:
        p = out / rec["file"]
        if not p.is_file() or p.stat().st_size != rec["bytes"]:
            warnings.warn(f"shard {rec['file']} is missing or truncated; harvesting again from row {rec['first_row']}")
            break
        if sha256_file_cached(p) != rec["sha256"]:
            warnings.warn(f"shard {rec['file']} does not match its recorded sha256 (damaged); harvesting again from "
                          f"row {rec['first_row']}")
            break
        kept.append(rec)
    if len(kept) < len(old["shards"]):
        old["status"] = "partial"
    old["shards"] = kept
    listed = {rec["file"] for rec in kept}
    for p in _own_files(out):
        if p.name != MANIFEST and p.name not in listed:
            p.unlink()
    return old


@torch.no_grad()
def harvest(
    model,
    data: Sequence[str] | Corpus | str | os.PathLike,
    sites: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    context_length: int = 128,
    positions: str = "all",
    shard_tokens: int = 65536,
    max_tokens: int | None = None,
    dtype: str | torch.dtype | None = "float32",
    progress: bool = True,
    resume: bool = True,
    images: Sequence | None = None,
) -> ActivationStore:
    """Run ``data`` through ``model`` and store the activations at ``sites`` in ``out_dir`` (see the module doc).

    model: a workbench :class:`~workbench.core.models.Model`.
    data: a list of prompts (one row each), a :class:`Corpus` (fixed ``context_length`` windows, one row each), or
        a registry corpus name or the path of a ``.txt`` / ``.jsonl`` file (= ``as_corpus(data)``).
    sites: one site name or a list (``workbench.site_names(model.arch)``, or raw module paths); every name is
        checked before any forward pass. The forward stops right after the last site fires.
    batch_size: rows per forward pass. context_length: window length of a corpus; the longest prompt allowed.
    positions: ``"all"`` (every real token of each row) or ``"last"`` (the last token of each row).
    shard_tokens: a shard is written as soon as it holds at least this many tokens (whole batches), so memory is
        bounded by about ``shard_tokens + batch_size * context_length`` tokens of activations, whatever the size
        of the data.
    max_tokens: stop after this many tokens (the last batch is cut to make the total exact); None = all the data.
    dtype: dtype of the stored activations: "float32" (default), "bfloat16", "float16", or None for the model's
        own dtype. Activations are always moved to the CPU.
    progress: show a tqdm bar (tokens). resume: continue an interrupted harvest into ``out_dir`` (arguments must
        match the existing manifest, else :class:`StoreError`); ``resume=False`` deletes an existing store there.
    images: for a VLM with a processor, one entry per prompt (an image or a list of images; see
        ``workbench.core.vlm.encode_multimodal``); ``data`` must then be a list of prompts. Checked before any forward.

    Returns the :class:`ActivationStore` of ``out_dir``.
    """
    # -- validate everything before a forward pass or a file is written ---------------------------------------
    if not (hasattr(model, "hf") and hasattr(model, "tokenizer") and hasattr(model, "arch")):
        raise TypeError(f"harvest needs a workbench Model (load_model / from_hf), got {type(model).__name__}")
    site_list = _check_sites(model, sites, images=images is not None)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    _check_int("batch_size", batch_size, 1)
    _check_int("context_length", context_length, 1)
    _check_int("shard_tokens", shard_tokens, 1)
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 1)
    if dtype is None:
        store_dtype = model.dtype
    elif isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        store_dtype = dtype
    elif isinstance(dtype, str) and dtype in DTYPES:
        store_dtype = DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtypes) or None, got {dtype!r}")
    text_config = model.hf.config.get_text_config() if hasattr(model.hf.config, "get_text_config") else model.hf.config
    max_pos = getattr(text_config, "max_position_embeddings", None)  # a VLM's is its language model's
    if isinstance(max_pos, int) and context_length > max_pos:
        raise ValueError(f"context_length {context_length} exceeds the model's max_position_embeddings {max_pos}")
    tok = model.tokenizer
    source = _as_data(data)
    if isinstance(source, Corpus) and images is not None:
        raise ValueError("images go with a list of prompts (one entry per prompt), not with a Corpus")
    if isinstance(source, Corpus):
        token_windows(source, tok, context_length)  # checks EOS, the BOS rule and the length now, reads nothing
        data_desc = _describe_corpus(source, window_bos(source, tok))
        total_hint = max_tokens
    else:
        if images is not None:

            if not getattr(model.arch, "is_vlm", False):
                raise ValueError(f"images given to the text-only {model.arch.family} model {model.name}")
            if len(images) != len(source):
                raise ValueError(f"images has {len(images)} entries for {len(source)} prompts: give one per prompt")
            source, per_prompt = check_multimodal(model, list(images), source)  # placeholders, modes, sizes
            data_desc = _describe_prompts(source, per_prompt)
            lengths: list[int] = []
            for start in range(0, len(source), 64):
                enc = model.processor(images=[im for row in per_prompt[start: start + 64] for im in row],
                                      text=source[start: start + 64], padding=False)
                lengths += [len(ids) for ids in enc["input_ids"]]
            source = list(zip(source, per_prompt))
        else:
            data_desc = _describe_prompts(source)
            lengths = []
            for start in range(0, len(source), 256):
                lengths += [len(ids) for ids in tok(source[start : start + 256], verbose=False)["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > context_length]
        if too_long:
            i, n = too_long[0]
            raise ValueError(
                f"prompt {i} is {n} tokens, longer than context_length={context_length} ({len(too_long)} prompts are); "
                "raise context_length"
            )
        total = sum(lengths) if positions == "all" else len(lengths)
        total_hint = min(total, max_tokens) if max_tokens else total

    spec = {
        "format": FORMAT,
        "model_weights_sha256": model.weights_hash,
        "tokenizer": _tokenizer_info(tok),
        "data": data_desc,
        "sites": site_list,
        "context_length": context_length,
        "batch_size": batch_size,
        "positions": positions,
        "shard_tokens": shard_tokens,
        "max_tokens": max_tokens,
        "dtype": str(store_dtype).removeprefix("torch."),
    }

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / LOCK):
        old = _prepare(out, spec, resume)
        if old is not None and old.get("status") == "complete":
            return ActivationStore(out)
        versions = package_versions()
        if old is not None and old.get("versions") != versions:
            warnings.warn(f"resuming a store begun with {old.get('versions')} under {versions}")
        if old is not None and old.get("device") != str(model.device):
            warnings.warn(f"resuming a store begun on {old.get('device')} on {model.device}: results may differ in "
                          "the last bits from an uninterrupted run")
        manifest = {
            **spec,
            "model": {"name": model.name, "family": model.arch.family, "n_layers": model.n_layers,
                      "d_model": model.d_model, "source": dict(model.source),
                      "tokenizer_name_or_path": getattr(tok, "name_or_path", None)},
            "data_source": source.source() if isinstance(source, Corpus) else "prompts",
            "d": dict(old["d"]) if old else {},
            "device": str(model.device),
            "versions": versions,
            "shards": list(old["shards"]) if old else [],
            "status": "partial",
            "created_at": old.get("created_at", now()) if old else now(),
        }
        _run(model, source, site_list, out, manifest,
             store_dtype, total_hint, progress)
    return ActivationStore(out)


def _write_manifest(out: Path, manifest: dict, status: str) -> None:
    shards = manifest["shards"]
    manifest["status"] = status
    manifest["n_tokens"] = sum(s["n_tokens"] for s in shards)
    manifest["n_rows"] = shards[-1]["last_row"] + 1 if shards else 0
    manifest["updated_at"] = now()
    atomic_write_json(out / MANIFEST, manifest)


def _run(model, source, site_list, out, manifest, store_dtype, total_hint, progress) -> None:

    batch_size, positions = manifest["batch_size"], manifest["positions"]
    shard_tokens, max_tokens = manifest["shard_tokens"], manifest["max_tokens"]
    shards = manifest["shards"]
    next_row = shards[-1]["last_row"] + 1 if shards else 0
    done = sum(s["n_tokens"] for s in shards)  # tokens in written shards
    first_shard = len(shards)  # the writer thread appends to ``shards``: name new ones from this count
    _write_manifest(out, manifest, "partial")  # claims the folder before the first forward

    tok = model.tokenizer
    if isinstance(source, Corpus):
        rows: Iterator = token_windows(source, tok, manifest["context_length"])
        for _ in range(next_row):  # the windows before the resume point: tokenised again, not run
            if next(rows, None) is None:
                break
    else:
        rows = iter(source[next_row:])

    buf: dict[str, list[Tensor]] = {name: [] for name in (*site_list, *TOKEN_FIELDS)}
    buffered = 0
    staged = 0  # tokens handed to the writer (its manifest entries may still be on their way)
    submitted = 0  # shards handed to the writer
    cuda = model.device.type == "cuda"
    writer = _ShardWriter(out, manifest)

    def to_host(t: Tensor, dtype: torch.dtype) -> Tensor:
        """Cast on the device, then copy into pinned host memory without waiting (CUDA); the writer waits for the
        copies (an event) before it reads the shard."""
        t = t.to(dtype)
        if not cuda:
            return t if t.device.type == "cpu" else t.to("cpu")
        host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def flush() -> None:
        nonlocal buffered, staged, submitted, buf
        parts, buf = buf, {name: [] for name in buf}
        first_row, last_row = int(parts["row"][0][0]), int(parts["row"][-1][-1])
        entry = {"file": shard_name(first_shard + submitted), "n_tokens": buffered,
                 "n_rows": last_row - first_row + 1, "first_row": first_row, "last_row": last_row,
                 "first_token": done + staged}
        ready = None
        if cuda:
            ready = torch.cuda.Event()
            ready.record()
        writer.submit(out / entry["file"], parts, entry, ready)
        submitted += 1
        staged += buffered
        buffered = 0

    tpos = -1 if positions == "last" else None
    bar = tqdm(total=total_hint, initial=done, unit="tok", desc="harvest", disable=not progress, dynamic_ncols=True)
    try:
        row0 = next_row
        finished = max_tokens is not None and done >= max_tokens
        for batch in (() if finished else _batched(rows, batch_size)):
            if isinstance(batch[0], tuple):  # (prompt, images) of a VLM

                enc = encode_multimodal(model, [imgs for _, imgs in batch], [p for p, _ in batch])
            elif isinstance(batch[0], str):
                enc = model.encode(batch)
            else:
                enc = _pad_left(batch, tok.pad_token_id, model.device)
            # Which tokens to keep is known before the forward: index them on the host, so nothing after the
            # forward waits for the device (a boolean mask on a CUDA tensor would).
            mask = enc["attention_mask"].bool().cpu()
            ids = enc["input_ids"].cpu()
            # M-RoPE families (Qwen-VL) compute 3-D positions themselves; the store records the sequence position
            pos = enc["position_ids"].cpu() if "position_ids" in enc else (mask.long().cumsum(-1) - 1).clamp(min=0)
            row = torch.arange(row0, row0 + len(batch))
            row0 += len(batch)
            if positions == "all":
                flat = mask.flatten().nonzero().flatten()
                fields = {"token_ids": ids[mask], "row": row[:, None].expand_as(ids)[mask], "position": pos[mask]}
            else:
                fields = {"token_ids": ids[:, -1], "row": row, "position": pos[:, -1]}
            n = len(fields["row"])
            keep = n if max_tokens is None else min(n, max_tokens - done - staged - buffered)
            with trace(model, site_list, positions=tpos, stop=True) as tr:
                model.hf(**enc)
            for name in site_list:
                h = tr[name]
                expect = (*ids.shape, h.shape[-1]) if positions == "all" else (ids.shape[0], h.shape[-1])
                if h.ndim != len(expect) or tuple(h.shape) != expect:
                    raise ValueError(
                        f"site {name!r} gave a tensor of shape {tuple(h.shape)}; the store needs one vector per token "
                        f"(expected {expect})"
                    )
                if manifest["d"].setdefault(name, h.shape[-1]) != h.shape[-1]:
                    raise StoreError(f"site {name!r} has width {h.shape[-1]}, the store recorded {manifest['d'][name]}")
                if positions == "all":
                    sel = h.flatten(0, 1).index_select(0, _to_device(flat[:keep], h.device))
                else:
                    sel = h[:keep]
                buf[name].append(to_host(sel, store_dtype))
            for name, value in fields.items():
                buf[name].append(value[:keep].to(torch.int64).contiguous())
            buffered += keep
            bar.update(keep)
            if max_tokens is not None and done + staged + buffered >= max_tokens:
                break
            if buffered >= shard_tokens:
                flush()
        if buffered:
            flush()
        writer.close()
        _write_manifest(out, manifest, "complete")
    except BaseException:
        # An interrupt still finishes the shard already handed over, so a resume starts after it; the error that
        # stopped the harvest is the one raised (the writer's own, if it failed, was raised at submit/close).
        try:
            writer.close()
        except BaseException:  # noqa: BLE001, S110
            pass
        raise
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
class ActivationStore:
    """Lazy reader of a harvested store: the manifest is read on open, shards only when asked for.

    ``ActivationStore(path)`` raises :class:`FileNotFoundError` when ``path`` holds no manifest and
    :class:`StoreError` when the harvest did not finish (``allow_partial=True`` opens its written shards) or a
    listed shard file is missing, has the wrong size, or has changed since it was written (its sha256 is checked
    against the manifest, reading a shard again only when its size or mtime changed). :meth:`verify` re-hashes
    every shard and checks every tensor shape.
    """

    def __init__(self, path: str | os.PathLike, *, allow_partial: bool = False):
        self.path = Path(path).expanduser()
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no activation store at {str(self.path)!r}: {MANIFEST} is missing")
        try:
            self.manifest: dict = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{manifest_path} is not valid JSON: {e}") from e
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{manifest_path} is not a {FORMAT} manifest (format {self.manifest.get('format')!r})")
        if self.manifest.get("status") != "complete" and not allow_partial:
            raise StoreError(
                f"the store at {str(self.path)!r} is incomplete (status {self.manifest.get('status')!r}, "
                f"{len(self.manifest.get('shards', []))} shards written): the harvest was interrupted; run harvest "
                "again with the same arguments to resume it (or open with allow_partial=True)"
            )
        bad = []
        for rec in self.manifest["shards"]:
            p = self.path / rec["file"]
            if not p.is_file():
                bad.append(f"{rec['file']} (missing)")
            elif p.stat().st_size != rec["bytes"]:
                bad.append(f"{rec['file']} ({p.stat().st_size} bytes, manifest says {rec['bytes']})")
            elif sha256_file_cached(p) != rec["sha256"]:  # cheap unless the file changed since it was hashed
                bad.append(f"{rec['file']} (sha256 differs from the manifest's)")
        if bad:
            raise StoreError(f"the store at {str(self.path)!r} is damaged: {', '.join(bad)}; harvest again with the "
                             "same arguments to rebuild the damaged shards")

    # -- description --------------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def shards(self) -> list[dict]:
        return list(self.manifest["shards"])

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / rec["file"] for rec in self.manifest["shards"]]

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.manifest['model']['name']!r}, sites={self.sites}, "
                f"n_tokens={self.n_tokens}, shards={len(self.shards)})")

    def _check_site(self, site: str) -> None:
        if site not in self.manifest["sites"]:
            raise KeyError(f"site {site!r} is not in this store; stored sites: {self.sites}")

    def d(self, site: str) -> int:
        """Width of the stored vectors of ``site``."""
        self._check_site(site)
        return int(self.manifest["d"][site])

    # -- integrity ----------------------------------------------------------------------------------------------
    def verify(self) -> None:
        """Re-hash every shard and check its tensor shapes; raise :class:`StoreError` listing every mismatch."""

        bad = []
        for rec, p in zip(self.shards, self.shard_paths):
            if not p.is_file():
                bad.append(f"{rec['file']}: missing")
                continue
            digest = sha256_file(p)
            if digest != rec["sha256"]:
                bad.append(f"{rec['file']}: sha256 {digest[:12]}..., manifest says {rec['sha256'][:12]}...")
                continue
            with safe_open(str(p), framework="pt") as f:
                for name in (*self.sites, *TOKEN_FIELDS):
                    shape = f.get_slice(name).get_shape()
                    want = [rec["n_tokens"], self.d(name)] if name in self.manifest["sites"] else [rec["n_tokens"]]
                    if list(shape) != want:
                        bad.append(f"{rec['file']}: {name} has shape {shape}, expected {want}")
        total = sum(rec["n_tokens"] for rec in self.shards)
        if total != self.n_tokens:
            bad.append(f"shards hold {total} tokens, manifest says {self.n_tokens}")
        if bad:
            raise StoreError(f"the store at {str(self.path)!r} failed verification:\n  " + "\n  ".join(bad))

    # -- reading ------------------------------------------------------------------------------------------------
    def _read(self, i: int, name: str) -> Tensor:

        with safe_open(str(self.shard_paths[i]), framework="pt") as f:
            return f.get_tensor(name)

    def load(self, site: str) -> Float[Tensor, "n_tokens d"]:
        """Every stored vector of ``site`` in data order, in memory (for small stores; else :meth:`iter_batches`)."""
        self._check_site(site)
        return torch.cat([self._read(i, site) for i in range(len(self.shards))])

    def tokens(self) -> dict[str, Int[Tensor, " n_tokens"]]:
        """``{"token_ids", "row", "position"}``, each [n_tokens] int64, aligned with :meth:`load`."""
        return {name: torch.cat([self._read(i, name) for i in range(len(self.shards))]) for name in TOKEN_FIELDS}

    def iter_batches(
        self, site: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[Float[Tensor, "batch d"]]:
        """Batches [batch_size, d] of ``site``, reading one shard at a time; every token exactly once per pass.

        Without shuffle the order is data order. With shuffle, the shard order and the order inside each shard are
        permuted by a ``torch.Generator`` seeded with ``seed`` (deterministic for a seed); mixing is therefore
        within a shard plus across shard order, not global. Batches straddle shard boundaries; the last one is
        smaller unless ``drop_last``. Yielded tensors may be views of a whole shard: clone one to keep it long.
        """
        self._check_site(site)
        _check_int("batch_size", batch_size, 1)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=g).tolist() if shuffle else range(len(self.shards))
        carry: Tensor | None = None
        for i in order:
            x = self._read(i, site)
            if shuffle:
                x = x[torch.randperm(len(x), generator=g)]
            if carry is not None:
                x = torch.cat([carry, x])
                carry = None
            full = len(x) // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield x[s : s + batch_size]
            if full < len(x):
                carry = x[full:].clone()
        if carry is not None and not drop_last:
            yield carry
