"""Sparse autoencoders: train with sae-lens on an activation store, save/load in the SAELens format, splice, evaluate.

    store = harvest(model, load_corpus("sharegpt-en"), site, "acts/", max_tokens=2_000_000)
    result = train_sae(store, site, SAETrainConfig(architecture="topk", expansion=16, k=32), model=model,
                       out_dir="saes/smollm2-135m/blocks.14.hook_resid_post/topk-16x")
    handle = load_sae("saes/smollm2-135m/blocks.14.hook_resid_post/topk-16x", model=model)
    metrics = evaluate_sae(model, handle, load_corpus("sharegpt-en"), n_tokens=50_000)
    with splice_sae(model, handle):            # the site's output replaced by the SAE reconstruction
        logits = model.hf(**batch).logits

Training uses sae-lens's own ``SAETrainer`` and training-SAE classes (``TopKTrainingSAE``,
``StandardTrainingSAE``): no hand-written loop. The data provider streams the store's shards (shuffled inside each
shard and across shard order, a fresh permutation every epoch) and leaves out position 0 of every window: the first
token's residual (BOS, an attention sink) has a norm tens of times the others and would dominate the loss and the
FVU. The last ``holdout_shards`` shards are never trained on; FVU / L0 on them are the card's held-out metrics.

On-disk format (an SAE is a folder, ``saes/<model>/<site>/<name>/``):
``cfg.json`` + ``sae_weights.safetensors``  exactly what ``sae_lens.SAE.save_inference_model`` writes, so
    ``sae_lens.SAE.load_from_disk(folder)`` loads it;
``workbench_card.json``  our card: model name and weights sha256, site, corpus name and token counts, the training
    config and seed, metrics, library versions, and the sha256 of the two SAELens files. :func:`load_sae` refuses a
    folder whose files do not match the card. Folders written by SAELens elsewhere (no card) load too, with the
    site taken from ``cfg.json``'s ``metadata.hook_name``.
A folder is written into a temporary sibling and renamed into place: it is complete or absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.store import ActivationStore
from workbench.core.trace import seq_index, trace
from workbench.data.corpus import Corpus
from workbench.io.atomic import IntegrityError, atomic_write_json, sha256_file, usual_permissions, verify_files
from workbench.io.owned import claim_folder, mark_owned
from workbench.io.provenance import package_versions

SAE_CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
CARD_FILE = "workbench_card.json"
CARD_FORMAT = "workbench.sae_card/1"
# sae-lens's training architectures, trained by its own SAETrainer. The saved (inference) architecture can differ:
# sae-lens folds BatchTopK's learned threshold into a JumpReLU SAE, so a "batchtopk" card loads as "jumprelu".
ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated", "standard")
_K_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
B_DEC_INITS = ("zeros", "mean")
DENSE_FREQ = 0.1  # a feature firing on more than 10 % of tokens is "dense" (SAELens dashboards use the same cut)


class SAEError(ValueError):
    """A bad SAE folder, an SAE that does not fit a site, or bad training arguments."""


@dataclass
class SAETrainConfig:
    """How to train one SAE. Defaults: the shipped SAEs' recipe (issue 17) but for width and length: on SmolLM2's
    middle layer, 8x, 1.5M tokens with the last 1,000 steps decaying, it leaves no latent silent on fresh text."""

    # "topk" (k largest pre-activations per token), "batchtopk" (k x batch largest over the batch; a threshold is
    # learned for inference), "matryoshka_batchtopk" (BatchTopK whose nested prefixes must each reconstruct),
    # "jumprelu" (learned per-feature thresholds, L0 penalty), "gated" (gate and magnitude paths, L1 on the gate),
    # "standard" (ReLU + L1 penalty)
    architecture: str = "topk"
    expansion: int = 16  # d_sae = expansion * d_in
    k: int = 32  # the TopK family: active features per token (on average, for BatchTopK)
    aux_loss_coefficient: float = 1.0  # the TopK family: weight of the auxiliary-k loss that revives dead features
    matryoshka_widths: tuple[int, ...] = ()  # matryoshka only: nested prefix widths (empty: d_sae/8, /4, /2, d_sae)
    l1_coefficient: float = 5.0  # standard and gated: weight of the L1 sparsity penalty (on normalised activations)
    l1_warm_up_steps: int = 0  # standard and gated: ramp the L1 weight from 0 (fewer dead features early)
    l0_coefficient: float = 1.0  # jumprelu only: weight of the L0 penalty
    jumprelu_init_threshold: float = 0.01  # jumprelu only: initial threshold of every feature
    jumprelu_bandwidth: float = 0.05  # jumprelu only: the straight-through estimator's kernel width
    # Adam. The number of steps and their size decide how many latents live: at batch 2048 / lr 4e-4, 1.5M tokens
    # are 732 steps of 4e-4 and 65 % of SmolLM2's middle-layer latents never fired on fresh text; batch 512 / lr 1e-3
    # left none silent on the same tokens (docs/results/sae.md). TopK tolerates the rate: its sparsity is structural.
    lr: float = 1e-3
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0  # linear decay to lr / 10 over the last steps (0 = constant)
    batch_size: int = 512  # tokens per step: 4x the steps of 2048 at 86 % of its speed on 2 cores (1,680 tokens/s)
    total_tokens: int = 2_000_000  # training samples (the store is cycled if smaller)
    normalize_activations: str = "expected_average_only_in"  # scale inputs to norm sqrt(d_in); folded in at the end
    seed: int = 0  # SAE init and data order
    holdout_shards: int = 1  # last store shards kept out of training, for held-out FVU / L0
    n_batches_for_norm_estimate: int = 20  # sae-lens's default 1000 costs minutes on CPU
    dead_feature_window: int = 50  # steps without firing before TopK's auxiliary loss treats a feature as dead
    # Where the decoder bias starts. sae-lens starts it at zero, so at step 0 every token's pre-activations share
    # the residual stream's large mean direction and the same few latents win TopK for every token; the rest never
    # fire, get no gradient, and stay dead. "mean": the mean of the training activations (in the scaled space the
    # SAE sees), as EleutherAI's sparsify does; the latents then compete on what varies between tokens.
    b_dec_init: str = "mean"

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        for name in ("expansion", "batch_size", "total_tokens", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SAEError(f"{name} must be a positive int, got {v!r}")
        for name in ("holdout_shards", "l1_warm_up_steps", "lr_warm_up_steps", "lr_decay_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SAEError(f"{name} must be a non-negative int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise SAEError(f"lr must be > 0, got {self.lr!r}")
        for name in ("l1_coefficient", "l0_coefficient", "aux_loss_coefficient"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise SAEError(f"{name} must be a number >= 0, got {v!r}")
        for name in ("jumprelu_init_threshold", "jumprelu_bandwidth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise SAEError(f"{name} must be a number > 0, got {v!r}")
        widths = tuple(self.matryoshka_widths)
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths) or \
                list(widths) != sorted(set(widths)):
            raise SAEError(f"matryoshka_widths must be strictly increasing positive ints, got {widths!r}")
        if widths and self.architecture != "matryoshka_batchtopk":
            raise SAEError(f"matryoshka_widths is for architecture='matryoshka_batchtopk', not {self.architecture!r}")
        if self.b_dec_init not in B_DEC_INITS:
            raise SAEError(f"b_dec_init must be one of {list(B_DEC_INITS)}, got {self.b_dec_init!r}")
        allowed = ("none", "expected_average_only_in")
        if self.normalize_activations not in allowed:
            raise SAEError(f"normalize_activations must be one of {list(allowed)}, got {self.normalize_activations!r}")
        if self.total_tokens < self.batch_size:
            raise SAEError(f"total_tokens ({self.total_tokens}) must be at least one batch ({self.batch_size})")


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


@dataclass
class TrainResult:
    handle: SAEHandle
    metrics: dict  # held-out FVU / L0 / dead / dense, training throughput
    card: dict
    path: Path | None


# -- data -------------------------------------------------------------------------------------------------------
def _shard_tensors(store: ActivationStore, i: int, site: str) -> Tensor:

    with safe_open(str(store.shard_paths[i]), framework="pt") as f:
        x = f.get_tensor(site)
        pos = f.get_tensor("position")
    return x[pos != 0].float()


def activation_batches(
    store: ActivationStore, site: str, batch_size: int, *, shards: Sequence[int], seed: int = 0
) -> Iterator[Float[Tensor, "batch d"]]:
    """Endless [batch_size, d] float32 batches from ``shards`` of the store (position-0 tokens left out): every epoch
    permutes the shard order and the tokens inside each shard with a generator seeded by ``(seed, epoch)``."""
    if not shards:
        raise SAEError("no shards to train on")
    epoch = 0
    carry: Tensor | None = None
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for j in torch.randperm(len(shards), generator=g).tolist():
            x = _shard_tensors(store, shards[j], site)
            x = x[torch.randperm(len(x), generator=g)]
            if carry is not None:
                x = torch.cat([carry, x])
            full = len(x) // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield x[s : s + batch_size]
            carry = x[full:].clone() if full < len(x) else None
        epoch += 1


def _holdout(store: ActivationStore, site: str, n_holdout: int, max_tokens: int = 200_000) -> Tensor:
    xs, n = [], 0
    for i in range(len(store.shards) - n_holdout, len(store.shards)):
        x = _shard_tensors(store, i, site)
        xs.append(x)
        n += len(x)
        if n >= max_tokens:
            break
    return torch.cat(xs)[:max_tokens]


# -- metrics on activations ---------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruction_metrics(handle: SAEHandle, x: Float[Tensor, "n d"], batch: int = 8192) -> dict:
    """FVU (sum of squared errors / total variance around the per-dimension mean), mean L0, dead (never fired on
    ``x``) and dense (firing on > 10 % of tokens) feature counts, and each feature's firing frequency."""
    if x.ndim != 2 or x.shape[1] != handle.d_in:
        raise SAEError(f"activations of shape {tuple(x.shape)} do not fit an SAE with d_in={handle.d_in}")
    device = handle.sae.W_enc.device
    sse = 0.0
    l0 = 0.0
    fires = torch.zeros(handle.d_sae, dtype=torch.float64)
    mean = x.double().mean(0)
    total_var = float(((x.double() - mean) ** 2).sum())
    for s in range(0, len(x), batch):
        xb = x[s : s + batch].to(device)
        f = handle.encode(xb)
        rec = handle.decode(f).float()
        sse += float(((xb.float() - rec) ** 2).double().sum())
        active = f != 0
        l0 += float(active.sum())
        fires += active.sum(0).double().cpu()
    freq = fires / len(x)
    return {
        "fvu": sse / total_var,
        "l0": l0 / len(x),
        "n_dead": int((fires == 0).sum()),
        "n_dense": int((freq > DENSE_FREQ).sum()),
        "n_tokens": len(x),
        "feature_freq": freq.float(),
    }


# -- training -----------------------------------------------------------------------------------------------------
def _site_width(model, site: str) -> int:
    """Width of ``site`` (one one-token forward, stopped at the site)."""
    ids = torch.tensor([[model.tokenizer.bos_token_id or model.tokenizer.eos_token_id or 0]], device=model.device)
    with torch.no_grad(), trace(model, site, stop=True) as tr:
        model.hf(input_ids=ids)
    return int(tr[site].shape[-1])


def _training_sae(cfg: SAETrainConfig, d_in: int, metadata: dict):
    """The sae-lens training SAE of ``cfg.architecture`` (every one is trained by sae-lens's own SAETrainer)."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    d_sae = cfg.expansion * d_in
    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations=cfg.normalize_activations,
                  metadata=SAEMetadata(**metadata))
    arch = cfg.architecture
    if arch in _K_FAMILY:
        if cfg.k > d_sae:
            raise SAEError(f"k={cfg.k} exceeds d_sae={d_sae}")
        common |= dict(k=cfg.k, aux_loss_coefficient=float(cfg.aux_loss_coefficient))
    if arch == "topk":
        return sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(**common))
    if arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(**common))
    if arch == "matryoshka_batchtopk":
        widths = list(cfg.matryoshka_widths) or [d_sae // 8, d_sae // 4, d_sae // 2, d_sae]
        widths = sorted({w for w in widths if w >= 1})
        if widths[-1] != d_sae:
            raise SAEError(f"matryoshka_widths must end at d_sae={d_sae}, got {list(cfg.matryoshka_widths)}")
        return sae_lens.MatryoshkaBatchTopKTrainingSAE(
            sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=widths, **common))
    if arch == "jumprelu":
        return sae_lens.JumpReLUTrainingSAE(sae_lens.JumpReLUTrainingSAEConfig(
            l0_coefficient=float(cfg.l0_coefficient), jumprelu_init_threshold=float(cfg.jumprelu_init_threshold),
            jumprelu_bandwidth=float(cfg.jumprelu_bandwidth), **common))
    if arch == "gated":
        return sae_lens.GatedTrainingSAE(sae_lens.GatedTrainingSAEConfig(
            l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=cfg.l1_warm_up_steps, **common))
    return sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(
        l1_coefficient=cfg.l1_coefficient, l1_warm_up_steps=cfg.l1_warm_up_steps, **common))


@torch.no_grad()
def _init_b_dec_to_mean(trainer, store: ActivationStore, site: str, cfg: SAETrainConfig,
                        train_shards: list[int]) -> None:
    """Set the SAE's decoder bias to the mean training activation, in the space the SAE is trained in.

    The scaling factor is estimated here, on the same number of batches as sae-lens would use, and handed to the
    trainer (``fit`` keeps a factor that is already set), so the bias and the trainer agree on the scale. The
    batches come from a second stream with its own seed: the training stream is left untouched."""
    sae = trainer.sae
    n = cfg.n_batches_for_norm_estimate
    stream = activation_batches(store, site, cfg.batch_size, shards=train_shards, seed=cfg.seed + 7_919)
    batches = [next(stream) for _ in range(n)]
    total = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    for b in batches:
        total += b.double().sum(0)
    mean = total / (n * cfg.batch_size)
    if cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.estimate_scaling_factor(d_in=sae.cfg.d_in, data_provider=iter(batches),
                                                          n_batches_for_norm_estimate=n)
        mean = mean * trainer.activation_scaler.scaling_factor
    if not torch.isfinite(mean).all():
        raise SAEError(f"the mean activation of {site!r} is not finite: the store holds inf or nan")
    sae.b_dec.data.copy_(mean.to(sae.b_dec.dtype))


def train_sae(
    store: ActivationStore | str | os.PathLike,
    site: str,
    cfg: SAETrainConfig | None = None,
    *,
    model=None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    corpus_name: str | None = None,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train an SAE on ``site`` of an activation store with sae-lens's ``SAETrainer``; optionally save it.

    model: the model the store was harvested from (checked by weights hash; recorded in the card). Optional.
    out_dir: where to write the SAE folder: a new or empty folder, or (``overwrite=True``) one that holds an SAE
        this package wrote, replaced atomically; anything else is refused before training starts.
        corpus_name: recorded in the card (default: the store's data source). device: where to train (default:
        CUDA if available, else CPU).
    """
    cfg = cfg or SAETrainConfig()
    cfg.validate()
    if out_dir is not None:
        claim_folder(Path(out_dir).expanduser(), "sae", overwrite=overwrite, legacy=_is_sae_folder)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    if site not in store.sites:
        raise SAEError(f"site {site!r} is not in the store at {str(store.path)!r}; stored sites: {store.sites}")
    n_shards = len(store.shards)
    if cfg.holdout_shards >= n_shards:
        raise SAEError(f"holdout_shards={cfg.holdout_shards} leaves no training shard (the store has {n_shards}); "
                       "harvest more tokens or lower holdout_shards")
    manifest = store.manifest
    if model is not None and model.weights_hash != manifest["model_weights_sha256"]:
        raise SAEError(f"the store was harvested from weights {manifest['model_weights_sha256'][:12]}..., "
                       f"the model given has {model.weights_hash[:12]}...")
    d_in = store.d(site)
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    torch.manual_seed(cfg.seed)
    metadata = {"model_name": manifest["model"]["name"], "hook_name": site,
                "context_size": manifest["context_length"], "dataset_path": corpus_name or manifest["data_source"]}
    sae = _training_sae(cfg, d_in, metadata)
    train_shards = list(range(n_shards - cfg.holdout_shards))
    provider = activation_batches(store, site, cfg.batch_size, shards=train_shards, seed=cfg.seed)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.total_tokens, train_batch_size_samples=cfg.batch_size, lr=cfg.lr, lr_end=cfg.lr,
        lr_scheduler_name="constant", lr_warm_up_steps=cfg.lr_warm_up_steps, lr_decay_steps=cfg.lr_decay_steps,
        device=device, dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(cfg.dead_feature_window, 100),
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate,
    )
    if cfg.lr_decay_steps:
        trainer_cfg.lr_end = cfg.lr / 10
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
    if cfg.b_dec_init == "mean":
        _init_b_dec_to_mean(trainer, store, site, cfg, train_shards)
    t0 = time.perf_counter()
    trained = trainer.fit()  # sae-lens's tqdm bar (tokens)
    train_seconds = time.perf_counter() - t0

    # Round-trip through the inference format so the metrics describe exactly what is saved and loaded.
    tmp = Path(out_dir).expanduser().parent if out_dir else Path(os.environ.get("TMPDIR", "/tmp"))
    tmp.mkdir(parents=True, exist_ok=True)
    staging = tmp / f".tmp-sae-{uuid.uuid4().hex[:8]}"
    try:
        trained.save_inference_model(str(staging))
        from sae_lens import SAE

        handle = SAEHandle(SAE.load_from_disk(str(staging), device=device), site)
        held = reconstruction_metrics(handle, _holdout(store, site, cfg.holdout_shards))
        freq = held.pop("feature_freq")
        metrics = {
            "heldout_" + k: v for k, v in held.items()
        } | {
            "train_tokens": cfg.total_tokens,
            "train_seconds": train_seconds,
            "train_tokens_per_second": cfg.total_tokens / train_seconds,
            "train_l0_window": float(trained.cfg.metadata.l0) if trained.cfg.metadata.l0 is not None else None,
        }
        card = {
            "format": CARD_FORMAT,
            "site": site,
            "model": {"name": manifest["model"]["name"], "weights_sha256": manifest["model_weights_sha256"],
                      "family": manifest["model"].get("family")},
            "corpus": {"name": corpus_name or manifest["data_source"], "store_tokens": store.n_tokens,
                       "store_path": str(store.path), "context_length": manifest["context_length"],
                       "data_sha256": manifest["data"].get("sha256")},
            "architecture": cfg.architecture, "d_in": d_in, "d_sae": cfg.expansion * d_in,
            "train_config": asdict(cfg),
            "metrics": metrics,
            "versions": package_versions() | {"sae_lens": _sae_lens_version()},
            "device": device,
        }
        handle.card = card
        path = None
        if out_dir is not None:
            _finish_folder(staging, Path(out_dir).expanduser(), card, freq)
            staging = None
            path = Path(out_dir).expanduser()
            handle.path = path
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return TrainResult(handle, metrics, card, path)


def _sae_lens_version() -> str:
    import sae_lens

    return sae_lens.__version__


FREQ_FILE = "feature_freq.safetensors"  # held-out firing frequency of every feature (for density plots)


def _is_sae_folder(folder: Path) -> bool:
    """An SAE folder written before owner markers existed: its SAELens files are there."""
    return (folder / SAE_CFG_FILE).is_file() and (folder / SAE_WEIGHTS_FILE).is_file()


def _finish_folder(staging: Path, out: Path, card: dict, freq: Tensor | None) -> None:

    if freq is not None:
        save_file({"feature_freq": freq.contiguous()}, str(staging / FREQ_FILE))
    card["files"] = {name: sha256_file(staging / name) for name in (SAE_CFG_FILE, SAE_WEIGHTS_FILE)}
    atomic_write_json(staging / CARD_FILE, card)
    mark_owned(staging, "sae")
    usual_permissions(staging)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = out.parent / f".old-{out.name}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_sae(handle: SAEHandle, out_dir: str | os.PathLike, card: dict | None = None, *,
             overwrite: bool = False) -> Path:
    """Write ``handle`` as an SAE folder (SAELens files + our card), atomically: into a new or empty folder, or
    (``overwrite=True``) replacing an SAE folder this package wrote; any other folder is refused untouched."""
    out = Path(out_dir).expanduser()
    claim_folder(out, "sae", overwrite=overwrite, legacy=_is_sae_folder)
    staging = out.parent / f".tmp-sae-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save = getattr(handle.sae, "save_inference_model", None) or handle.sae.save_model  # training / inference SAE
        save(str(staging))
        _finish_folder(staging, out, dict(card if card is not None else handle.card), None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    try:
        cfg = json.loads((folder / SAE_CFG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise SAEError(f"{folder / SAE_CFG_FILE} is not valid JSON: {e}") from e
    for key in ("d_in", "d_sae", "architecture"):
        if key not in cfg:
            raise SAEError(f"{folder / SAE_CFG_FILE} has no {key!r}")
    from sae_lens.registry import get_sae_class

    try:
        get_sae_class(cfg["architecture"])
    except (KeyError, ValueError) as e:
        raise SAEError(f"{folder / SAE_CFG_FILE}: unknown SAE architecture {cfg['architecture']!r}") from e
    card: dict = {}
    if (folder / CARD_FILE).is_file():
        try:
            card = json.loads((folder / CARD_FILE).read_text())
        except json.JSONDecodeError as e:
            raise SAEError(f"{folder / CARD_FILE} is not valid JSON: {e}") from e
        files = card.get("files")
        need = {SAE_CFG_FILE, SAE_WEIGHTS_FILE}
        if not isinstance(files, dict) or not need <= set(files):
            raise SAEError(f"{folder / CARD_FILE} records no sha256 of {sorted(need - set(files or {}))}: a card "
                           "must cover the SAE's files; refusing to load an unchecked SAE")
        try:
            verify_files(folder, files)
        except IntegrityError as e:
            raise SAEError(f"refusing to load the SAE in {folder}: {e}") from None
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


# -- evaluation on live forwards ------------------------------------------------------------------------------------
def corpus_token_windows(model, corpus: Corpus | Sequence[str], n_tokens: int, context_length: int) -> Tensor:
    tok = model.tokenizer
    docs = corpus.documents() if isinstance(corpus, Corpus) else iter(corpus)
    bos = tok.bos_token_id
    body = context_length - (bos is not None)
    stream: list[int] = []
    need = math.ceil(n_tokens / body) * body
    for doc in docs:
        stream += tok(doc, add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= need:
            break
    n_windows = len(stream) // body
    if n_windows == 0:
        raise SAEError(f"the corpus holds fewer than {body} tokens")
    ids = torch.tensor(stream[: n_windows * body]).view(n_windows, body)
    if bos is not None:
        ids = torch.cat([torch.full((n_windows, 1), bos), ids], dim=1)
    return ids


@dataclass
class CoreData:
    """What the core metrics of every SAE on one site are measured against, computed once: fresh corpus windows,
    the site's activations on them (position 0 left out, as in training), and the clean and zero-ablated
    next-token cross-entropies (mean over predicted tokens, position 0's prediction included)."""

    site: str
    ids: Tensor  # [n_windows, context_length] BOS + stream tokens
    acts: Tensor  # [n_tokens, d] float32, position 0 of each window left out
    ce_clean: float
    ce_zero_ablation: float
    batch_size: int
    # the first position the SAE (and the zero-ablation) replaces. 1: position 0, the BOS attention sink, keeps its
    # clean residual, as it is left out of training and of FVU (its norm is tens of times the others'; an SAE never
    # trained on it breaks the sink and every later position with it). 0: every position, the protocol before
    # issue 17.
    first_position: int = 1
    n_ce_windows: int | None = None  # the first windows carry the cross-entropies (None: all of them)

    @property
    def ce_ids(self) -> Tensor:
        return self.ids if self.n_ce_windows is None else self.ids[: self.n_ce_windows]

    @property
    def n_pred(self) -> int:
        return self.ce_ids.shape[0] * (self.ids.shape[1] - 1)


def _skip(corpus: Corpus | Sequence[str], skip_documents: int) -> Corpus | Sequence[str]:
    if not skip_documents:
        return corpus
    base = corpus.documents if isinstance(corpus, Corpus) else (lambda: iter(corpus))

    def rest():
        for i, d in enumerate(base()):
            if i >= skip_documents:
                yield d

    return Corpus(rest)


def _ce_sum(logits: Tensor, batch: Tensor) -> float:
    targets = batch[:, 1:].reshape(-1)
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets,
                                                   reduction="sum"))


@torch.no_grad()
def core_data(model, site: str, corpus: Corpus | Sequence[str], *, n_tokens: int = 32_768, context_length: int = 128,
              batch_size: int = 8, skip_documents: int = 0, first_position: int = 1, ce_tokens: int | None = None,
              progress: bool = True) -> CoreData:
    """The shared part of the core metrics (see :class:`CoreData`): two forwards per batch, whatever the number of
    SAEs evaluated on it afterwards. ``skip_documents`` skips the first documents of ``corpus``. ``ce_tokens``: the
    cross-entropies (clean, zero-ablated, and each SAE's spliced forward) use only the first windows holding that many
    tokens, while FVU, L0 and dead / dense latents use all ``n_tokens`` (collected by forwards stopped at the site,
    without the unembedding)."""
    if first_position not in (0, 1):
        raise SAEError(f"first_position must be 0 (splice every position) or 1 (keep position 0, the BOS, clean), "
                       f"got {first_position!r}")
    if ce_tokens is not None and (isinstance(ce_tokens, bool) or not isinstance(ce_tokens, int) or ce_tokens < 1):
        raise SAEError(f"ce_tokens must be a positive int or None, got {ce_tokens!r}")
    ids = corpus_token_windows(model, _skip(corpus, skip_documents), n_tokens, context_length)
    n_ce = len(ids) if ce_tokens is None else min(len(ids), math.ceil(ce_tokens / (ids.shape[1] - 1)))
    ce_clean = ce_zero = 0.0
    xs = []
    for s in tqdm(range(0, len(ids), batch_size), desc=f"clean and zero-ablated {site}", unit="batch",
                  disable=not progress):
        batch = ids[s : min(s + batch_size, n_ce) if s < n_ce else s + batch_size].to(model.device)
        if s < n_ce:
            with trace(model, site) as tr:
                ce_clean += _ce_sum(model.hf(input_ids=batch).logits, batch)
            with zero_ablate(model, site, positions=_spliced(first_position)):
                ce_zero += _ce_sum(model.hf(input_ids=batch).logits, batch)
        else:
            with trace(model, site, stop=True) as tr:
                model.hf(input_ids=batch)
        xs.append(tr[site][:, 1:].reshape(-1, tr[site].shape[-1]).float().cpu())
        if s < n_ce < s + batch_size and n_ce < len(ids):  # the rest of this batch holds no CE windows
            rest = ids[n_ce : s + batch_size].to(model.device)
            with trace(model, site, stop=True) as tr:
                model.hf(input_ids=rest)
            xs.append(tr[site][:, 1:].reshape(-1, tr[site].shape[-1]).float().cpu())
    n_pred = n_ce * (ids.shape[1] - 1)
    return CoreData(site, ids, torch.cat(xs), ce_clean / n_pred, ce_zero / n_pred, batch_size, first_position,
                    None if n_ce == len(ids) else n_ce)


def _spliced(first_position: int):
    return None if first_position == 0 else slice(first_position, None)


@torch.no_grad()
def core_metrics(model, handle: SAEHandle, data: CoreData, *, error_term: bool = False,
                 progress: bool = True) -> dict:
    """FVU, L0, dead / dense features and CE loss recovered of ``handle`` on ``data``: one spliced forward per batch
    (two with ``error_term``, which also checks that the SAE plus its error term leaves the logits as they were)."""
    if handle.site != data.site:
        raise SAEError(f"the SAE reads {handle.site!r} but the data were taken at {data.site!r}")
    ce_sae = ce_err = 0.0
    max_diff = 0.0
    ids = data.ce_ids
    for s in tqdm(range(0, len(ids), data.batch_size), desc=f"evaluate {handle.site}", unit="batch",
                  disable=not progress):
        batch = ids[s : s + data.batch_size].to(model.device)
        with splice_sae(model, handle, positions=_spliced(data.first_position)):
            ce_sae += _ce_sum(model.hf(input_ids=batch).logits, batch)
        if error_term:
            clean = model.hf(input_ids=batch).logits
            with splice_sae(model, handle, error_term=True, positions=_spliced(data.first_position)):
                err_logits = model.hf(input_ids=batch).logits
            ce_err += _ce_sum(err_logits, batch)
            max_diff = max(max_diff, float((err_logits - clean).abs().max()))
    rec = reconstruction_metrics(handle, data.acts)
    freq = rec.pop("feature_freq")
    ce = {"clean": data.ce_clean, "sae": ce_sae / data.n_pred}
    if error_term:
        ce["sae_with_error"] = ce_err / data.n_pred
    ce["zero_ablation"] = data.ce_zero_ablation
    denom = data.ce_zero_ablation - data.ce_clean
    out = {**rec, **{f"ce_{k}": v for k, v in ce.items()},
           "ce_loss_recovered": (data.ce_zero_ablation - ce["sae"]) / denom if denom > 0 else float("nan")}
    if error_term:
        out["max_logit_diff_error_term"] = max_diff
    return out | {"n_windows": len(data.ids), "n_ce_windows": len(ids), "context_length": ids.shape[1],
                  "first_position": data.first_position,
                  "feature_freq": freq}


def evaluate_sae(
    model,
    handle: SAEHandle,
    corpus: Corpus | Sequence[str],
    *,
    n_tokens: int = 32_768,
    context_length: int = 128,
    batch_size: int = 8,
    skip_documents: int = 0,
    first_position: int = 1,
    progress: bool = True,
) -> dict:
    """Reconstruction and downstream metrics of ``handle`` on fresh windows of ``corpus`` (BOS + stream tokens).

    Returns FVU, L0, dead / dense counts (position 0 excluded, as in training), and next-token cross-entropy
    (mean over predicted tokens, position 0's prediction included) of the clean model, with the SAE spliced in at
    every position, with the SAE + error term (must equal clean), and with the site zero-ablated, plus
    ``ce_loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``. ``skip_documents`` skips the first
    documents (to evaluate on text the training store did not see). ``first_position``: 1 keeps position 0 (the BOS
    attention sink, never trained on) clean in the spliced and zero-ablated forwards; 0 replaces every position.
    ``progress``: a tqdm bar over the windows. :func:`core_data` + :func:`core_metrics`, for one SAE.
    """
    data = core_data(model, handle.site, corpus, n_tokens=n_tokens, context_length=context_length,
                     batch_size=batch_size, skip_documents=skip_documents, first_position=first_position,
                     progress=progress)
    return core_metrics(model, handle, data, error_term=True, progress=progress)
