"""A trained SAE and its folder: the handle, saving and loading in the SAELens format (+ our card), splicing.

    handle = load_sae("saes/smollm2-135m/blocks.14.hook_resid_post/topk-8x-k32", model=model)   # checked
    save_sae(handle, "my-sae")                       # SAELens files + workbench_card.json, one atomic folder
    with splice_sae(model, handle):                  # the site's output replaced by the SAE reconstruction
        logits = model.hf(**batch).logits

On-disk format (an SAE is a folder, ``saes/<model>/<site>/<name>/``):
``cfg.json`` + ``sae_weights.safetensors``  exactly what ``sae_lens.SAE.save_inference_model`` writes, so
    ``sae_lens.SAE.load_from_disk(folder)`` loads it;
``feature_freq.safetensors``  (SAEs trained here) the held-out firing frequency of every feature;
``workbench_card.json``  our card: model name and weights sha256, site, corpus name and token counts, the training
    config and seed, metrics, library versions, and the sha256 of the folder's files (``files``). :func:`load_sae`
    refuses a folder whose files do not match the card. Folders written by SAELens elsewhere (no card) load too,
    with the site taken from ``cfg.json``'s ``metadata.hook_name``.
The folder is written and read through :mod:`workbench.io.artifact` (claimed, staged, card last, renamed into
place: complete or absent). Training is :mod:`workbench.methods.sae.train`, evaluation
:mod:`workbench.methods.sae.evaluate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from workbench.core.trace import seq_index, trace
from workbench.io.artifact import ArtifactError, ArtifactKind, read_artifact, read_card, register_kind, write_artifact

SAE_CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
CARD_FILE = "workbench_card.json"
CARD_FORMAT = "workbench.sae_card/1"
FREQ_FILE = "feature_freq.safetensors"  # held-out firing frequency of every feature (for density plots)


class SAEError(ArtifactError):
    """A bad SAE folder, an SAE that does not fit a site, or bad training arguments."""


@dataclass
class SAEHandle:
    """A loaded SAE (a ``sae_lens.SAE``) with the site it reads and writes and our card (``{}`` if none)."""

    sae: object
    site: str
    card: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def architecture(self) -> str:
        return self.sae.cfg.architecture()

    @property
    def W_dec(self) -> Float[Tensor, "d_sae d_in"]:
        return self.sae.W_dec

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        return self.sae.encode(x.to(self.sae.W_enc.dtype))

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return self.sae.decode(f)

    def reconstruct(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        return self.decode(self.encode(x)).to(x.dtype)

    def __repr__(self) -> str:
        return f"SAEHandle({self.architecture}, site={self.site!r}, d_in={self.d_in}, d_sae={self.d_sae}, path={self.path})"


def _site_width(model, site: str) -> int:
    """Width of ``site`` (one one-token forward, stopped at the site)."""
    ids = torch.tensor([[model.tokenizer.bos_token_id or model.tokenizer.eos_token_id or 0]], device=model.device)
    with torch.no_grad(), trace(model, site, stop=True) as tr:
        model.hf(input_ids=ids)
    return int(tr[site].shape[-1])


def write_sae_folder(out_dir: str | os.PathLike, card: dict, fill: Callable[[Path], None], *,
                     freq: Tensor | None = None, overwrite: bool = False) -> dict:
    """Write an SAE folder by :func:`workbench.io.artifact.write_artifact`: ``fill(staging)`` writes the SAELens
    files, ``freq`` (optional) the features' firing frequency; the card records the sha256 of every file. Returns
    the card as written."""

    def fill_all(staging: Path) -> None:
        fill(staging)
        if freq is not None:
            save_file({"feature_freq": freq.contiguous()}, str(staging / FREQ_FILE))

    return write_artifact(out_dir, SAE_KIND, card, fill=fill_all, overwrite=overwrite)


def save_sae(handle: SAEHandle, out_dir: str | os.PathLike, card: dict | None = None, *,
             overwrite: bool = False) -> Path:
    """Write ``handle`` as an SAE folder (SAELens files + our card), atomically: into a new or empty folder, or
    (``overwrite=True``) replacing an SAE folder this package wrote; any other folder is refused untouched."""
    out = Path(out_dir).expanduser()
    save = getattr(handle.sae, "save_inference_model", None) or handle.sae.save_model  # training / inference SAE
    handle.card = write_sae_folder(out, dict(card if card is not None else handle.card),
                                   lambda staging: save(str(staging)), overwrite=overwrite)
    handle.path = out
    return out


# -- loading ------------------------------------------------------------------------------------------------------
def load_sae(path: str | os.PathLike, model=None, *, site: str | None = None, device=None,
             dtype: str | None = "float32", check_model: bool = True) -> SAEHandle:
    """Load an SAE folder (ours, or SAELens's own format from elsewhere) and check it.

    Checks, each a clear :class:`SAEError`: the folder and both SAELens files exist; ``cfg.json`` parses and names
    a known architecture; our card (if present) matches the files' sha256; tensor shapes agree with ``d_in`` /
    ``d_sae``; with ``model``: the site exists and its width equals ``d_in``, and (``check_model``) the card's
    weights hash is the model's. ``site`` overrides the card / ``cfg.json`` hook name. ``dtype``: the dtype to
    compute in (float32 by default, whatever the file stores; None keeps ``cfg.json``'s).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SAEError(f"no SAE folder at {str(folder)!r}")
    missing = [n for n in (SAE_CFG_FILE, SAE_WEIGHTS_FILE) if not (folder / n).is_file()]
    if missing:
        raise SAEError(f"the SAE folder {str(folder)!r} is incomplete: missing {missing} (an SAELens SAE folder holds "
                       f"{SAE_CFG_FILE} and {SAE_WEIGHTS_FILE})")
    cfg = read_card(folder / SAE_CFG_FILE, error=SAEError)
    for key in ("d_in", "d_sae", "architecture"):
        if key not in cfg:
            raise SAEError(f"{folder / SAE_CFG_FILE} has no {key!r}")
    from sae_lens.registry import get_sae_class

    try:
        get_sae_class(cfg["architecture"])
    except (KeyError, ValueError) as e:
        raise SAEError(f"{folder / SAE_CFG_FILE}: unknown SAE architecture {cfg['architecture']!r}") from e
    card = read_artifact(folder, SAE_KIND, error=SAEError)  # {} for an SAELens folder from elsewhere (no card)
    site = site or card.get("site") or (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    if not site:
        raise SAEError(f"{folder}: no site recorded (card or cfg.json metadata.hook_name); pass site=...")

    try:
        with safe_open(str(folder / SAE_WEIGHTS_FILE), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise SAEError(f"{folder / SAE_WEIGHTS_FILE} is not a readable safetensors file: {e}") from e
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    want = {"W_enc": [d_in, d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in]}
    per_feature = {"gated": ("b_gate", "b_mag", "r_mag"), "jumprelu": ("b_enc", "threshold")}
    want |= {k: [d_sae] for k in per_feature.get(cfg["architecture"], ("b_enc",))}
    bad = [f"{k} is {shapes.get(k)} (expected {v})" for k, v in want.items() if shapes.get(k) != v]
    if bad:
        raise SAEError(f"{folder / SAE_WEIGHTS_FILE} does not match cfg.json (d_in={d_in}, d_sae={d_sae}): "
                       + "; ".join(bad))
    if model is not None:
        width = _site_width(model, site)  # raises SiteError for an unknown site
        if width != d_in:
            raise SAEError(f"the SAE at {str(folder)!r} has d_in={d_in} but site {site!r} of {model.name} has width "
                           f"{width}")
        want_hash = (card.get("model") or {}).get("weights_sha256")
        if check_model and want_hash and want_hash != model.weights_hash:
            raise SAEError(f"the SAE at {str(folder)!r} was trained on weights {want_hash[:12]}... "
                           f"({card['model'].get('name')}), not on {model.name} ({model.weights_hash[:12]}...); "
                           "pass check_model=False to use it anyway")
        device = device or model.device
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder), device=str(device or "cpu"), dtype=dtype)
    sae.requires_grad_(False)  # loaded for analysis: outputs carry no autograd graph unless the input does
    sae.eval()
    return SAEHandle(sae, site, card, folder)


# -- splicing -----------------------------------------------------------------------------------------------------
def _sae_edit(handle: SAEHandle, error_term: bool, positions=None):
    def edit(t: Tensor) -> Tensor:
        if t.shape[-1] != handle.d_in:
            raise SAEError(f"site {handle.site!r} has width {t.shape[-1]}, the SAE d_in={handle.d_in}")
        rec = handle.reconstruct(t)
        if error_term:
            rec = rec + (t - rec).detach()  # = t up to rounding; gradients flow through the SAE
        if positions is None:
            return rec
        out = t.clone()
        out[:, positions] = rec[:, positions]
        return out

    return edit


def splice_sae(model, handle: SAEHandle, *, error_term: bool = False, positions=None):
    """Context manager: the site's output is replaced by the SAE reconstruction in every forward inside the block
    (``error_term=True`` adds back ``x - x_hat``, which reproduces the clean forward up to rounding). ``positions``
    (int, list or slice of sequence positions) limits the splice to those positions. Hooks are removed on exit,
    even when the forward raises."""

    index = None if positions is None else seq_index(positions)
    return trace(model, edits={handle.site: _sae_edit(handle, error_term, index)})


def zero_ablate(model, site: str, *, positions=None):
    """Context manager: the site's output replaced by zeros (the reference point of CE loss recovered); ``positions``
    as in :func:`splice_sae`."""
    if positions is None:
        return trace(model, edits={site: lambda t: torch.zeros_like(t)})
    index = seq_index(positions)

    def edit(t: Tensor) -> Tensor:
        out = t.clone()
        out[:, index] = 0
        return out

    return trace(model, edits={site: edit})


# An SAE folder, written and read through workbench.io.artifact. SAELens folders from elsewhere have no card.
SAE_KIND = register_kind(ArtifactKind("sae", card_file=CARD_FILE, signature=(SAE_CFG_FILE, SAE_WEIGHTS_FILE),
                                      required=(SAE_CFG_FILE, SAE_WEIGHTS_FILE), card_optional=True, label="SAE"))
