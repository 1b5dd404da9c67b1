"""Remote execution for models too large for this machine: workbench's trace request run on NDIF through nnsight.

    from workbench.core.remote import remote_trace
    out = remote_trace("meta-llama/Llama-3.1-70B", ["The capital of France is"],
                       ["blocks.40.hook_resid_post", "ln_final.hook_normalized"])
    out["blocks.40.hook_resid_post"]                 # [1, d_model], the last position of each prompt

The request is the one :func:`workbench.core.trace` takes: a model, prompts and workbench site names (``hook_embed``,
``blocks.{i}.hook_resid_pre|attn_out|mlp_out|resid_post``, ``ln_final.hook_normalized``, a dotted module path,
``path:input``), plus ``positions`` (``-1``, the last token of every prompt, by default; ``None`` for every position
of the left-padded batch). Sites are mapped onto the Hugging Face modules by the same architecture map as local
traces and read inside an nnsight trace whose block nnsight serialises and ships; the model never leaves the
server, which loads it by its hub id.

model: a hub id (nnsight builds the architecture on the meta device from the hub config: it needs the hub or a
local Hugging Face cache, no weights), a workbench ``Model`` whose registry entry names its upstream hub id (the
architecture is read locally; NDIF runs the upstream weights, not the packaged 4-bit ones), or an nnsight
``TransformersModel``. The id is sent as given (nnsight would canonicalise its spelling through the hub first).

Credentials and host (nnsight's own settings): the API key from ``api_key=``, ``$NDIF_API_KEY`` or nnsight's config
(``nnsight.CONFIG.set_default_api_key``); the host from ``host=``, ``$NDIF_HOST`` or nnsight's config (default
``https://api.ndif.us``). Without a key the call fails before any network use.

No network, no hang: before anything is sent the host's port is probed with ``connect_timeout`` seconds (DNS
included); an unreachable host raises :class:`RemoteUnavailable` naming it. (nnsight's websocket has no connect
timeout of its own.) ``remote="local"`` runs nnsight's local simulation instead: the request is serialised exactly as
for NDIF, deserialised with local modules hidden, and run here on the local model, a dry run of the remote path.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import torch

from workbench.core.arch import resolve_arch
from workbench.core.models import Model
from workbench.core.sites import resolve_site

DEFAULT_CONNECT_TIMEOUT_S = 10.0


class RemoteUnavailable(ConnectionError):
    """The NDIF host cannot be reached (no network, wrong host, service down)."""


class RemoteExecutionError(RuntimeError):
    """The NDIF service received the request and reported an error."""


@dataclass
class RemoteRequest:
    """What :func:`remote_trace` sends: inspectable without a network."""

    repo_id: str  # the checkpoint NDIF loads
    model_key: str  # nnsight's identity of it: "import.path.Class:{json}"
    host: str
    prompts: list[str]
    sites: list[str]  # workbench site names, in forward order
    reads: list[str]  # what the shipped block reads: "<module path>.output" or "<module path>.input"
    positions: int | None
    api_key_set: bool
    envelope: dict  # nnsight's JSON routing envelope (RequestModel.metadata())
    inputs: dict = field(repr=False, default_factory=dict)  # input_ids, attention_mask, position_ids
    nnsight_model: object = field(repr=False, default=None)


def _nnsight():
    import nnsight  # imported lazily: it patches torch on import

    return nnsight


def _encode(tokenizer, prompts: list[str]) -> dict:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _resolve_model(model, remote):
    """(nnsight model, architecture map, hf module, tokenizer, repo id)."""

    nnsight = _nnsight()
    if isinstance(model, Model):
        repo_id = (model.source or {}).get("hub_id")
        if repo_id is None:
            if remote is True:
                raise ValueError(f"model {model.name!r} names no hub id (its source has none): NDIF loads models by "
                                 "hub id; pass the hub id instead")
            repo_id = model.name
        nm = nnsight.TransformersModel(model.hf, tokenizer=model.tokenizer)
        nm.repo_id = repo_id
        return nm, model.arch, model.hf, model.tokenizer, repo_id
    if isinstance(model, str):
        if not model.strip():
            raise ValueError("model must be a hub id like 'meta-llama/Llama-3.1-8B', got an empty string")
        try:
            nm = nnsight.TransformersModel(model)  # meta device: the config and tokenizer, no weights
        except Exception as e:  # noqa: BLE001 - re-raised with what was needed
            raise ValueError(f"cannot build {model!r} on the meta device: nnsight needs its config and tokenizer "
                             f"from the hub or a local Hugging Face cache ({type(e).__name__}: {e})") from e
        return nm, resolve_arch(nm._module), nm._module, nm.tokenizer, model
    if isinstance(model, nnsight.TransformersModel):
        return model, resolve_arch(model._module), model._module, model.tokenizer, model.repo_id
    raise TypeError(f"model must be a hub id, a workbench Model or an nnsight TransformersModel, got "
                    f"{type(model).__name__}")


def _api_key(api_key: str | None) -> str | None:
    from nnsight import CONFIG

    return api_key or os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY  # the variable as it is now


def _host(host: str | None) -> str:
    from nnsight import CONFIG

    host = host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST
    if not isinstance(host, str) or not host.startswith(("http://", "https://")) or not urlsplit(host).hostname:
        raise ValueError(f"host must be an http:// or https:// URL, got {host!r}")
    return host.rstrip("/")


def build_remote_request(model, prompts: Sequence[str], sites: Sequence[str], *, positions: int | None = -1,
                         host: str | None = None, api_key: str | None = None, remote: bool | str = True,
                         ) -> RemoteRequest:
    """Check the request and build it (no network): sites mapped to module reads, prompts tokenised, nnsight's
    model key and routing envelope. ``remote=True`` also requires an API key."""
    from nnsight import CONFIG
    from nnsight.schema.request import RequestModel


    if remote not in (True, "local"):
        raise ValueError(f"remote must be True (NDIF) or 'local' (nnsight's local simulation), got {remote!r}")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    if isinstance(sites, str):
        sites = [sites]
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("sites is empty: name at least one site")
    if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int)):
        raise ValueError(f"positions must be an int (e.g. -1, the last token) or None (all), got {positions!r}")
    key = _api_key(api_key)
    if remote is True and not key:
        raise ValueError("remote execution needs an NDIF API key: set $NDIF_API_KEY, pass api_key=, or store one "
                         "with nnsight.CONFIG.set_default_api_key(...)")
    host = _host(host)
    nm, arch, hf, tokenizer, repo_id = _resolve_model(model, remote)
    names = {n for n, _ in hf.named_modules()}
    resolved = sorted((resolve_site(s, arch, names) for s in sites), key=lambda s: s.order)  # nnsight: forward order
    reads = [f"{s.module}.{s.kind}" if s.module else s.kind for s in resolved]
    from nnsight.modeling import huggingface as _hf

    _hf._ID_CACHE.setdefault(repo_id, repo_id)  # the id as given: no hub round trip to canonicalise its spelling
    model_key = nm.to_model_key()
    envelope = json.loads(RequestModel(model_key=model_key, compress=CONFIG.API.COMPRESS,
                                       env=nm._remoteable_get_env()).metadata())
    return RemoteRequest(repo_id=repo_id, model_key=model_key, host=host, prompts=prompts,
                         sites=[s.name for s in resolved], reads=reads, positions=positions, api_key_set=bool(key),
                         envelope=envelope, inputs=_encode(tokenizer, prompts), nnsight_model=nm)


def check_reachable(host: str, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`RemoteUnavailable` unless a TCP connection to ``host``'s port opens within ``timeout`` s
    (name resolution included)."""
    parts = urlsplit(host)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    box: dict = {}

    def connect():
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            box["ok"] = True
        except OSError as e:
            box["error"] = e

    t = threading.Thread(target=connect, name="workbench-remote-probe", daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if box.get("ok"):
        return
    why = f"{type(box['error']).__name__}: {box['error']}" if "error" in box else f"no answer within {timeout:g} s"
    raise RemoteUnavailable(f"cannot reach the NDIF host {host} ({parts.hostname}:{port}): {why}. Remote execution "
                            "needs network access to it: check your connection, $NDIF_HOST or host=")


def remote_trace(model, prompts: Sequence[str], sites: Sequence[str], *, positions: int | None = -1,
                 host: str | None = None, api_key: str | None = None, remote: bool | str = True,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> dict[str, torch.Tensor]:
    """Read ``sites`` on ``prompts`` remotely (see the module docstring); returns ``{site: tensor}`` on the CPU:
    ``[batch, d]`` for an int ``positions``, ``[batch, seq, d]`` (left-padded) for ``None``."""
    req = build_remote_request(model, prompts, sites, positions=positions, host=host, api_key=api_key, remote=remote)
    nnsight = _nnsight()
    nm = req.nnsight_model
    if remote is True:
        from nnsight.intervention.backends.remote import RemoteBackend

        check_reachable(req.host, connect_timeout)
        backend = RemoteBackend(req.model_key, host=req.host, api_key=_api_key(api_key), env=nm._remoteable_get_env())
    else:
        from nnsight.intervention.backends.local import LocalSimulationBackend

        backend = LocalSimulationBackend(nm)
    reads, pos, enc = req.reads, req.positions, req.inputs
    try:
        with torch.no_grad(), nm.trace(enc["input_ids"], attention_mask=enc["attention_mask"],
                                       position_ids=enc["position_ids"], backend=backend):
            saved = nnsight.save([])
            for read in reads:  # this block is what nnsight ships: plain code, nothing from workbench
                value = nm.get(read)
                if isinstance(value, tuple):
                    value = value[0]
                saved.append(value if pos is None else value[:, pos])
    except (OSError, ConnectionError) as e:
        raise RemoteUnavailable(f"lost the connection to the NDIF host {req.host}: {type(e).__name__}: {e}") from e
    except Exception as e:
        from nnsight.intervention.backends.remote import RemoteError

        if isinstance(e, RemoteError):
            raise RemoteExecutionError(f"NDIF ({req.host}) could not run the request for {req.repo_id!r}: {e}") from e
        if type(e).__module__.startswith("websocket"):  # websocket-client's errors are not OSErrors
            raise RemoteUnavailable(f"the NDIF host {req.host} refused the status connection: "
                                    f"{type(e).__name__}: {e}") from e
        raise
    return {site: value.detach().to("cpu") for site, value in zip(req.sites, saved, strict=True)}
