"""Per-layer transcoders (MLP input -> MLP output; TopK, optional linear skip) and their folders.

    tcs = load_transcoders("saes/smollm2-135m/transcoders/topk-4x-k32", model=model)   # checked against the card
    tc = tcs[12]                      # one Transcoder
    acts = tc.encode(x)               # [..., d_transcoder], k nonzeros per row
    y_hat = tc(x)                     # decode(acts) + x @ W_skip.T

A transcoder reads the input of a layer's MLP module (the normalised residual) and predicts the MLP module's output:
``acts = TopK(ReLU(x @ W_enc.T + b_enc))``, ``y_hat = acts @ W_dec + b_dec + x @ W_skip.T`` (no decoder bias
subtracted from the input, as in circuit-tracer's and sparsify's transcoders).

On-disk format: a folder in circuit-tracer's layout, so that ``circuit_tracer`` (and anyone who reads its
transcoder sets) loads it and so that a published set in that layout loads here:

``config.yaml``  ``model_kind: transcoder_set``, ``feature_input_hook: mlp.hook_in``, ``feature_output_hook:
    mlp.hook_out``, ``transcoders: [layer_0.safetensors, ...]`` (relative paths), ``activation: topk`` and
    ``k`` (and ours: ``topk_relu: true``, TopK of the ReLU; circuit-tracer's TopK keeps the raw top k), ``scan``
    (a name for the set), ``model_name``, ``layers``;
``layer_{i}.safetensors``  ``W_enc`` [d_transcoder, d_model], ``b_enc`` [d_transcoder], ``W_dec`` [d_transcoder,
    d_model], ``b_dec`` [d_model], optionally ``W_skip`` [d_model, d_model];
``workbench_card.json``  (sets written here) the model and its weights sha256, the training recipe, per-layer
    quality on held-out text, and the sha256 of every file; :func:`load_transcoders` refuses a folder whose files
    do not match it. A folder without our card (circuit-tracer's) loads without the hash check.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import yaml
from jaxtyping import Float
from safetensors.torch import load_file, save
from torch import Tensor, nn

from workbench.core.swap import swap_modules
from workbench.io.artifact import ArtifactError, ArtifactKind, read_artifact, register_kind, write_artifact

KIND = "transcoders"
CONFIG_FILE = "config.yaml"
CARD_FILE = "workbench_card.json"
CARD_FORMAT = "workbench.transcoder_card/1"
INPUT_HOOK = "mlp.hook_in"  # circuit-tracer's names for the MLP module's input and output
OUTPUT_HOOK = "mlp.hook_out"
ACTIVATIONS = ("topk", "relu")


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


class TranscoderError(ArtifactError):
    """A bad transcoder folder, transcoders that do not fit a model, or bad training arguments."""


class Transcoder(nn.Module):
    """One layer's transcoder. ``k``: active features per token (TopK); ``k=None``: ReLU."""

    def __init__(self, d_model: int, d_transcoder: int, *, k: int | None = 32, skip: bool = True,
                 topk_relu: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.topk_relu = topk_relu  # TopK of ReLU(pre) (ours, sparsify's); False: TopK of pre (circuit-tracer's)
        if k is not None and not (isinstance(k, int) and 1 <= k <= d_transcoder):
            raise TranscoderError(f"k must be an int in [1, {d_transcoder}] or None (ReLU), got {k!r}")
        self.d_model, self.d_transcoder, self.k = d_model, d_transcoder, k
        self.W_enc = nn.Parameter(torch.zeros(d_transcoder, d_model, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, dtype=dtype)) if skip else None

    def init_weights(self, generator: torch.Generator) -> Transcoder:
        """sparsify's start for transcoders: encoder rows uniform in +-1/sqrt(d_model), decoder and skip zero."""
        bound = 1.0 / math.sqrt(self.d_model)
        with torch.no_grad():
            self.W_enc.copy_(torch.rand(self.W_enc.shape, generator=generator) * 2 * bound - bound)
            self.W_dec.zero_()
        return self

    @property
    def has_skip(self) -> bool:
        return self.W_skip is not None

    def pre_acts(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... f"]:
        return x.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc

    def encode(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... f"]:
        pre = self.pre_acts(x)
        if self.k is None or self.topk_relu:
            pre = torch.relu(pre)
        if self.k is None:
            return pre
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    def decode(self, acts: Float[Tensor, "... f"]) -> Float[Tensor, "... d"]:
        return acts @ self.W_dec + self.b_dec

    def skip(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_model, dtype=self.W_dec.dtype, device=x.device)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        return self.decode(self.encode(x)) + self.skip(x)

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        return {n: t.detach().to(dtype or t.dtype).cpu().contiguous() for n, t in out.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], *, k: int | None, topk_relu: bool = True,
                     dtype: torch.dtype = torch.float32, where: str = "") -> Transcoder:
        missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
        if missing:
            raise TranscoderError(f"{where}: missing tensors {missing}; a transcoder file holds W_enc, b_enc, W_dec, "
                                  f"b_dec and optionally W_skip (got {sorted(tensors)})")
        F, d = tensors["W_enc"].shape
        if tensors["W_dec"].shape != (F, d):
            if tensors["W_dec"].shape == (d, F):  # some writers store W_dec as [d_model, d_transcoder]
                tensors = {**tensors, "W_dec": tensors["W_dec"].T}
            else:
                raise TranscoderError(f"{where}: W_dec has shape {tuple(tensors['W_dec'].shape)}, W_enc {(F, d)}")
        shapes = {"b_enc": (F,), "b_dec": (d,), "W_skip": (d, d)}
        for n, s in shapes.items():
            if n in tensors and tuple(tensors[n].shape) != s:
                raise TranscoderError(f"{where}: {n} has shape {tuple(tensors[n].shape)}, expected {s}")
        extra = sorted(set(tensors) - {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"})
        if extra:
            raise TranscoderError(f"{where}: tensors {extra} are not supported (JumpReLU thresholds, cross-layer "
                                  "decoders); this loader reads TopK / ReLU per-layer transcoders")
        tc = cls(d, F, k=k, skip="W_skip" in tensors, topk_relu=topk_relu, dtype=dtype)
        with torch.no_grad():
            for n, t in tensors.items():
                getattr(tc, n).copy_(t.to(dtype))
        return tc


class TranscoderSet(nn.Module):
    """One transcoder per layer (``layers``: which layers have one; the others keep their MLP)."""

    def __init__(self, transcoders: Mapping[int, Transcoder], *, model_name: str = "", card: dict | None = None,
                 path: Path | None = None):
        super().__init__()
        if not transcoders:
            raise TranscoderError("a transcoder set needs at least one layer")
        dims = {(t.d_model, t.d_transcoder, t.k) for t in transcoders.values()}
        d_models = {d for d, _, _ in dims}
        if len(d_models) != 1:
            raise TranscoderError(f"transcoders of one set must share d_model, got {sorted(d_models)}")
        self.layers = sorted(int(i) for i in transcoders)
        self.tcs = nn.ModuleDict({str(i): transcoders[i] for i in self.layers})
        self.model_name, self.card, self.path = model_name, card or {}, path

    def __getitem__(self, layer: int) -> Transcoder:
        if layer not in self.layers:
            raise KeyError(f"no transcoder for layer {layer}; layers: {self.layers}")
        return self.tcs[str(layer)]

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return next(iter(self.tcs.values())).d_model

    @property
    def d_transcoder(self) -> int:
        return max(t.d_transcoder for t in self.tcs.values())

    @property
    def k(self) -> int | None:
        return next(iter(self.tcs.values())).k

    def check_fits(self, model) -> None:
        """Raise unless every layer exists in ``model`` and ``d_model`` matches (and the card's weights do)."""
        bad = [i for i in self.layers if not 0 <= i < model.n_layers]
        if bad:
            raise TranscoderError(f"transcoders for layers {bad}, but {model.name} has {model.n_layers} layers")
        if self.d_model != model.d_model:
            raise TranscoderError(f"transcoders read d_model={self.d_model}, {model.name} has {model.d_model}")
        want = self.card.get("model", {}).get("weights_sha256")
        if want and want != model.weights_hash:
            raise TranscoderError(f"{self.path} was trained on weights {want[:12]}..., not on {model.name}'s "
                                  f"{model.weights_hash[:12]}...")


def _config(tcs: TranscoderSet, scan: str) -> dict:
    k = tcs.k
    return {"model_kind": "transcoder_set", "model_name": tcs.model_name, "scan": scan,
            "feature_input_hook": INPUT_HOOK, "feature_output_hook": OUTPUT_HOOK,
            "activation": "topk" if k is not None else "relu", **({"k": k, "topk_relu": True} if k is not None else {}),
            "transcoders": [layer_file(i) for i in tcs.layers], "layers": list(tcs.layers)}


def save_transcoders(tcs: TranscoderSet, folder: str | os.PathLike, card: Mapping | None = None, *,
                     dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Write ``tcs`` as a folder in circuit-tracer's layout plus our card (atomic; hashed)."""
    folder = Path(folder)
    files = {layer_file(i): save(tcs[i].tensors(dtype)) for i in tcs.layers}
    files[CONFIG_FILE] = yaml.safe_dump(_config(tcs, folder.name), sort_keys=False).encode()
    out = {"format": CARD_FORMAT, "stored_dtype": str(dtype).removeprefix("torch."), "layers": list(tcs.layers),
           "d_model": tcs.d_model, "d_transcoder": tcs.d_transcoder, "k": tcs.k,
           "skip": all(tcs[i].has_skip for i in tcs.layers), **dict(card or {})}
    write_artifact(folder, TRANSCODER_KIND, out, files=files, overwrite=overwrite)
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise TranscoderError(f"no {CONFIG_FILE} in {folder}: a transcoder set folder holds {CONFIG_FILE} and "
                              "layer_{i}.safetensors files")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TranscoderError(f"{path} is not valid YAML ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("model_kind", "transcoder_set") != "transcoder_set":
        raise TranscoderError(f"{path}: model_kind {cfg.get('model_kind') if isinstance(cfg, dict) else cfg!r} is "
                              "not supported; only per-layer sets (model_kind: transcoder_set) load here")
    for key, want in (("feature_input_hook", ("mlp.hook_in", "ln2.hook_normalized")),
                      ("feature_output_hook", ("mlp.hook_out", "hook_mlp_out"))):
        if key in cfg and cfg[key] not in want:
            raise TranscoderError(f"{path}: {key} {cfg[key]!r} is not the MLP's input/output ({list(want)})")
    if not isinstance(cfg.get("transcoders"), list) or not cfg["transcoders"]:
        raise TranscoderError(f"{path}: 'transcoders' must be a non-empty list of per-layer files")
    return cfg


def _layer_of(entry: str, position: int) -> int:
    stem = Path(str(entry)).stem
    digits = stem.rsplit("_", 1)[-1]
    return int(digits) if digits.isdigit() else position


def load_transcoders(folder: str | os.PathLike, *, model=None, dtype: torch.dtype = torch.float32,
                     device=None) -> TranscoderSet:
    """The set in ``folder`` (ours: hash-checked against the card; circuit-tracer's: as it is). ``model``: check
    that the set fits it (layers, d_model, and for ours the weights it was trained on)."""
    folder = Path(folder)
    card = read_artifact(folder, TRANSCODER_KIND, error=TranscoderError)
    cfg = _read_config(folder)
    act = cfg.get("activation", "relu")
    if act not in ACTIVATIONS:
        raise TranscoderError(f"{folder}: activation {act!r} is not supported here (supported: {list(ACTIVATIONS)})")
    k = int(cfg["k"]) if act == "topk" else None
    layers = cfg.get("layers") or [_layer_of(e, i) for i, e in enumerate(cfg["transcoders"])]
    tcs = {}
    for layer, entry in zip(layers, cfg["transcoders"]):
        path = Path(str(entry).removeprefix("file://"))
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise TranscoderError(f"{folder}: transcoder file {entry!r} (layer {layer}) is missing")
        tc = Transcoder.from_tensors(load_file(str(path)), k=k, topk_relu=bool(cfg.get("topk_relu", False)),
                                     dtype=dtype, where=str(path))
        tcs[int(layer)] = tc.to(device) if device is not None else tc
    out = TranscoderSet(tcs, model_name=cfg.get("model_name", ""), card=card, path=folder)
    out.requires_grad_(False)
    if model is not None:
        out.check_fits(model)
    return out


def _check(folder: Path) -> None:
    load_transcoders(folder)


TRANSCODER_KIND = register_kind(ArtifactKind(KIND, card_file=CARD_FILE, signature=(CONFIG_FILE,), card_optional=True,
                                             check=_check, label="transcoder set"))




class ReplacedMLP(nn.Module):
    """An MLP module whose output, from ``first_position`` on, is its transcoder's reconstruction (``tc=None``:
    zero, the ablation baseline). Earlier positions keep the MLP's own output: position 0, the BOS attention sink,
    is never trained on."""

    def __init__(self, mlp: nn.Module, tc: Transcoder | None, first_position: int = 1, massive: float | None = None):
        super().__init__()
        self.mlp, self.tc, self.first_position, self.massive = mlp, tc, first_position, massive

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        out = self.mlp(x, *args, **kwargs)
        tail = x[:, self.first_position:]
        rec = self.tc(tail).to(out.dtype) if self.tc is not None else torch.zeros_like(out[:, self.first_position:])
        if self.massive is not None:  # sink tokens keep the MLP's own output (they are left out of training)
            norm = out[:, self.first_position:].float().norm(dim=-1)
            sink = norm > self.massive * norm.median()
            rec = torch.where(sink[..., None], out[:, self.first_position:], rec)
        return torch.cat([out[:, : self.first_position], rec], dim=1)


@contextlib.contextmanager
def replaced_mlps(model, tcs: TranscoderSet | None, layers: Sequence[int] | None = None, *,
                  first_position: int = 1, massive: float | None = None) -> Iterator[None]:
    """While the block runs, the MLPs of ``layers`` (default: every layer of the set) output their transcoders'
    reconstructions from ``first_position`` on (``tcs=None``: zero); ``massive``: tokens whose MLP output norm
    exceeds ``massive`` x the median keep it (sink tokens, left out of training). Restored in ``finally``."""
    if tcs is None and layers is None:
        raise TranscoderError("replaced_mlps(model, None) zero-ablates MLPs and needs their layers")
    layers = tcs.layers if layers is None else list(layers)
    missing = [i for i in layers if tcs is not None and i not in tcs]
    if missing:
        raise TranscoderError(f"no transcoder for layers {missing}; the set has {tcs.layers}")
    swaps = {model.arch.mlp_path(i): ReplacedMLP(model.module(model.arch.mlp_path(i)),
                                                  tcs[i] if tcs is not None else None, first_position, massive)
             for i in layers}
    with swap_modules(model, swaps):
        yield
