"""Training sparse autoencoders with sae-lens on an activation store.

    store = harvest(model, load_corpus("sharegpt-en"), site, "acts/", max_tokens=2_000_000)
    result = train_sae(store, site, SAETrainConfig(architecture="topk", expansion=16, k=32), model=model,
                       out_dir="saes/smollm2-135m/blocks.14.hook_resid_post/topk-16x")

Training uses sae-lens's own ``SAETrainer`` and training-SAE classes (``TopKTrainingSAE``,
``StandardTrainingSAE``): no hand-written loop. The data provider streams the store's shards (shuffled inside each
shard and across shard order, a fresh permutation every epoch) and leaves out position 0 of every window: the first
token's residual (BOS, an attention sink) has a norm tens of times the others and would dominate the loss and the
FVU. The last ``holdout_shards`` shards are never trained on; FVU / L0 on them are the card's held-out metrics.

The module layout follows SAELens: training here, the SAE and its folder (:class:`SAEHandle`, ``save_sae``,
``load_sae``, ``splice_sae``) in :mod:`workbench.methods.sae.handle`, evaluation (``evaluate_sae``, ``core_data``,
``core_metrics``, ``reconstruction_metrics``) in :mod:`workbench.methods.sae.evaluate`.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor

from workbench.core.store import ActivationStore
from workbench.io.owned import claim_folder
from workbench.io.provenance import package_versions
from workbench.methods.sae.evaluate import reconstruction_metrics
from workbench.methods.sae.handle import (
    CARD_FORMAT,
    SAE_CFG_FILE,
    SAE_KIND,
    SAE_WEIGHTS_FILE,
    SAEError,
    SAEHandle,
    write_sae_folder,
)

# sae-lens's training architectures, trained by its own SAETrainer. The saved (inference) architecture can differ:
# sae-lens folds BatchTopK's learned threshold into a JumpReLU SAE, so a "batchtopk" card loads as "jumprelu".
ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated", "standard")
_K_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
B_DEC_INITS = ("zeros", "mean")


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
    # Adam. The number of steps and their size decide how many latents live: sae-lens's batch 2048 / lr 4e-4 leave
    # many latents that never fire on fresh text, more and larger steps on the same tokens keep them alive (the
    # numbers: docs/results/sae-features.md). TopK tolerates the rate: its sparsity is structural.
    lr: float = 1e-3
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0  # linear decay to lr / 10 over the last steps (0 = constant)
    batch_size: int = 512  # tokens per step: 4x the steps of batch 2048 on the same tokens, for a little throughput
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


# -- training -----------------------------------------------------------------------------------------------------
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
        claim_folder(Path(out_dir).expanduser(), SAE_KIND.name, overwrite=overwrite, legacy=SAE_KIND.is_legacy)
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
    staging = tmp / f".tmp-sae-scratch-{uuid.uuid4().hex[:8]}"  # the round trip; the folder is written below
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
            path = Path(out_dir).expanduser()
            scratch = staging

            def copy_sae_files(dest: Path) -> None:
                for name in (SAE_CFG_FILE, SAE_WEIGHTS_FILE):
                    shutil.copyfile(scratch / name, dest / name)

            card = handle.card = write_sae_folder(path, card, copy_sae_files, freq=freq, overwrite=overwrite)
            handle.path = path
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return TrainResult(handle, metrics, card, path)


def _sae_lens_version() -> str:
    import sae_lens

    return sae_lens.__version__
