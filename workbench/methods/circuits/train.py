"""Training per-layer transcoders on activations streamed from the model, and their quality on held-out text.

    run = train_transcoders(model, RECIPES["cpu"])            # one forward per batch feeds every layer's transcoder
    quality = evaluate_transcoders(model, run.transcoders, heldout_windows(model, RECIPES["cpu"]))
    save_transcoders(run.transcoders, "saes/smollm2-135m/transcoders/topk-4x-k32", card)

Why a loop here and not a library's: sae-lens trains autoencoders only (its MSE target is the SAE's own input;
SAELens#182), and eai-sparsify (which installs beside the lock) reads a Hugging Face ``datasets`` table, writes its
optimiser state with ``torch.save`` (pickles) and logs to wandb; its recipe is what this loop follows: encoder bias
centred on the mean input, decoder bias at the mean output, a zero skip, TopK on ReLU, an FVU loss per layer,
AuxK on dead latents (Gao et al. 2024), Adam at ``2e-4 / sqrt(d_transcoder / 2**14)``.

A store of every layer's MLP input and output would be ~70 kB per token for SmolLM2-135M, so nothing is stored:
each batch of corpus windows runs one forward of the model with the MLPs' inputs and outputs captured, and every
layer's transcoder takes one step on them. Position 0 (BOS, the attention sink, whose MLP output is tens of times
the others') is left out, as in the SAE path. The first ``heldout_windows`` windows of the stream are never trained
on: they are the held-out text of :func:`evaluate_transcoders`. Training windows are shuffled within chunks of
``shuffle_windows`` (seeded), so a resumed run reads the same batches.

The backward touches only the k active rows of W_enc and W_dec per token (the k values are recomputed from
gathered rows), as sparsify's fused encoder does; the dense pre-activations that choose them run without grad.
Resumable: parameters, Adam's state and the step go to a checkpoint folder (safetensors + JSON) every
``checkpoint_every`` steps.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.models import Model, load_model
from workbench.core.trace import trace
from workbench.data.corpus import token_windows
from workbench.io.checkpoint import UnitCheckpoint
from workbench.io.owned import claim_folder, folder_kind
from workbench.io.paths import cache_root, resolve_output_path, safe_segment
from workbench.methods.circuits.transcoder import (
    TRANSCODER_KIND,
    Transcoder,
    TranscoderError,
    TranscoderSet,
    load_transcoders,
    replaced_mlps,
    save_transcoders,
)
from workbench.methods.reasoner import load_train_state, save_train_state


@dataclass
class TranscoderTrainConfig:
    """One training run of a set of per-layer transcoders."""

    expansion: int = 4  # d_transcoder = expansion * d_model
    k: int = 32  # active features per token
    skip: bool = True  # a linear skip connection W_skip (x @ W_skip.T), trained with the rest
    skip_init: str = "ridge"  # "ridge": the skip starts as the ridge regression of output on input (first batch);
    # "zeros": sparsify's start. On a short CPU budget the ridge start saves the steps the skip needs to grow.
    init_batches: int = 8  # the first training batches, read once more for the initial statistics
    skip_lr_scale: float = 1.0  # the skip's learning rate relative to lr (a ridge start needs small steps)
    layers: tuple[int, ...] | None = None  # None: every layer
    corpus: str = "sharegpt-en"
    context_length: int = 128
    batch_windows: int = 16  # windows per step (tokens per step: batch_windows * (context_length - 1))
    total_tokens: int = 400_000  # training tokens (position 0 excluded)
    lr: float | None = None  # None: sparsify's 2e-4 / sqrt(d_transcoder / 2**14)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # linear decay to lr / 10 over the last fraction of the steps
    auxk_alpha: float = 1 / 32  # weight of the AuxK loss (dead latents reconstruct the residual error)
    auxk_k: int = 64  # latents the AuxK loss uses per token
    dead_tokens: int = 40_000  # a latent that has not fired for this many training tokens is dead for AuxK
    heldout_windows: int = 64  # the first windows of the stream: never trained on, evaluated on
    massive: float = 30.0  # leave out sink tokens: MLP output norm > massive x the layer's median (sink_tokens)
    shuffle_windows: int = 256
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        for name in ("init_batches", "expansion", "k", "batch_windows", "total_tokens", "warmup_steps", "auxk_k", "dead_tokens",
                     "heldout_windows", "shuffle_windows", "checkpoint_every", "context_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup_steps" else 1):
                raise TranscoderError(f"{name} must be a positive int, got {v!r}")
        if self.context_length < 3:
            raise TranscoderError(f"context_length must be >= 3, got {self.context_length}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise TranscoderError(f"lr must be > 0 or None, got {self.lr!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise TranscoderError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if not (isinstance(self.auxk_alpha, (int, float)) and self.auxk_alpha >= 0):
            raise TranscoderError(f"auxk_alpha must be >= 0, got {self.auxk_alpha!r}")
        if self.skip_init not in ("ridge", "zeros"):
            raise TranscoderError(f"skip_init must be 'ridge' or 'zeros', got {self.skip_init!r}")
        if self.layers is not None and (not self.layers or any(isinstance(i, bool) or not isinstance(i, int)
                                                               for i in self.layers)):
            raise TranscoderError(f"layers must be None or a non-empty tuple of ints, got {self.layers!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_windows * (self.context_length - 1)

    @property
    def steps(self) -> int:
        return math.ceil(self.total_tokens / self.tokens_per_step)

    def layer_list(self, model: Model) -> list[int]:
        layers = list(range(model.n_layers)) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not 0 <= i < model.n_layers]
        if bad or len(set(layers)) != len(layers):
            raise TranscoderError(f"layers {self.layers} are not distinct layers of {model.name} "
                                  f"(0..{model.n_layers - 1})")
        return sorted(layers)

    def learning_rate(self, d_transcoder: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_transcoder / 2**14)


# cpu: the shipped set (2 cores; time in docs/benchmarks.md); gpu: more tokens and width for one CUDA device;
# smoke: seconds, for tests and notebook smoke runs.
RECIPES = {
    "cpu": TranscoderTrainConfig(batch_windows=8, total_tokens=250_000, lr=2e-3, skip_lr_scale=0.05, warmup_steps=10),
    "gpu": TranscoderTrainConfig(expansion=8, batch_windows=64, total_tokens=20_000_000, heldout_windows=256,
                                 dead_tokens=1_000_000, checkpoint_every=500),
    "smoke": TranscoderTrainConfig(expansion=2, k=4, context_length=16, batch_windows=4, total_tokens=600,
                                   heldout_windows=4, shuffle_windows=8, dead_tokens=120, warmup_steps=2,
                                   checkpoint_every=5, auxk_k=4),
}


@dataclass
class TrainLog:
    step: int
    tokens: int
    fvu: list[float]  # per trained layer, this step
    dead_fraction: float  # over all layers: latents dead for AuxK


@dataclass
class TranscoderRun:
    transcoders: TranscoderSet
    config: TranscoderTrainConfig
    log: list[TrainLog] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0

    def to_frame(self) -> pd.DataFrame:
        layers = self.transcoders.layers
        return pd.DataFrame([{"step": r.step, "tokens": r.tokens, "layer": layer, "fvu": f,
                              "dead_fraction": r.dead_fraction}
                             for r in self.log for layer, f in zip(layers, r.fvu)])


def _mlp_sites(model: Model, layers: Sequence[int]) -> tuple[list[str], list[str]]:
    return ([f"{model.arch.mlp_path(i)}:input" for i in layers], [f"blocks.{i}.hook_mlp_out" for i in layers])


def mlp_io(model: Model, ids: Tensor, layers: Sequence[int], *, massive: float | None = None
           ) -> tuple[list[Tensor], list[Tensor]]:
    """Every layer's MLP input and output on ``ids`` (one forward, no grad), position 0 left out, flattened to
    ``[n_tokens, d_model]`` float32. ``massive``: also leave out the tokens whose MLP output, at any of ``layers``,
    has a norm above ``massive`` times that layer's median (see :func:`sink_tokens`)."""
    ins, outs = _mlp_sites(model, layers)
    dev = model.device
    with torch.no_grad(), trace(model, ins + outs) as tr:
        model.hf(input_ids=ids.to(dev))
    flat = [tr[s][:, 1:].reshape(-1, model.d_model).float() for s in ins + outs]
    if massive is not None:
        keep = ~sink_tokens(flat[len(layers):], massive)
        flat = [t[keep] for t in flat]
    return flat[: len(layers)], flat[len(layers):]


def sink_tokens(outs: Sequence[Tensor], factor: float) -> Tensor:
    """Tokens whose MLP output norm, at any layer, exceeds ``factor`` x that layer's median: the massive
    activations of attention-sink tokens. On SmolLM2-135M the first tokens of a document in mid-window write MLP
    outputs of norm ~12,000 at layers 11 and 28 (median ~30 and ~180): two tokens of a batch then hold 97 % of
    layer 11's variance. Like position 0 they are left out of training and of the held-out FVU (the card records
    how many); in a graph their MLP outputs are error nodes like every other."""
    out = torch.zeros(outs[0].shape[0], dtype=torch.bool)
    for y in outs:
        n = y.norm(dim=-1)
        out |= n.cpu() > factor * n.median().cpu()
    return out


def _windows(model: Model, cfg: TranscoderTrainConfig) -> Iterator[list[int]]:
    return token_windows(cfg.corpus, model.tokenizer, cfg.context_length, last="drop")


def heldout_windows(model: Model, cfg: TranscoderTrainConfig) -> Tensor:
    """The first ``cfg.heldout_windows`` windows of the training corpus: never trained on."""
    ids = list(itertools.islice(_windows(model, cfg), cfg.heldout_windows))
    if len(ids) < cfg.heldout_windows:
        raise TranscoderError(f"the corpus {cfg.corpus!r} holds only {len(ids)} windows of {cfg.context_length}")
    return torch.tensor(ids, dtype=torch.long)


def _train_batches(model: Model, cfg: TranscoderTrainConfig, first_step: int) -> Iterator[Tensor]:
    it = _windows(model, cfg)
    for _ in itertools.islice(it, cfg.heldout_windows):
        pass
    chunk_i, step = 0, 0
    while True:
        chunk = list(itertools.islice(it, cfg.shuffle_windows))
        if len(chunk) < cfg.batch_windows:
            it, chunk_i = _windows(model, cfg), chunk_i + 1  # the corpus is exhausted: start again (past held-out)
            for _ in itertools.islice(it, cfg.heldout_windows):
                pass
            continue
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + chunk_i)
        perm = torch.randperm(len(chunk), generator=g)
        chunk_i += 1
        for s in range(0, len(chunk) - cfg.batch_windows + 1, cfg.batch_windows):
            if step >= first_step:
                yield torch.tensor([chunk[j] for j in perm[s: s + cfg.batch_windows].tolist()], dtype=torch.long)
            step += 1


def _gathered_acts(tc: Transcoder, x: Tensor, idx: Tensor) -> Tensor:
    """relu(W_enc[idx] . x + b_enc[idx]) [n, k]: embedding lookups, whose backward is a segment sum (3x faster on
    CPU than indexing's scatter)."""
    rows = F.embedding(idx, tc.W_enc)  # [n, k, d]
    return torch.relu(torch.bmm(rows, x.unsqueeze(-1)).squeeze(-1) + F.embedding(idx, tc.b_enc.unsqueeze(1))[..., 0])


def _gathered_decode(tc: Transcoder, vals: Tensor, idx: Tensor) -> Tensor:
    return F.embedding_bag(idx, tc.W_dec, per_sample_weights=vals, mode="sum")


def _layer_loss(tc: Transcoder, x: Tensor, y: Tensor, dead: Tensor | None, auxk_k: int) -> tuple[Tensor, Tensor,
                                                                                                   Tensor, Tensor]:
    with torch.no_grad():
        pre = tc.pre_acts(x)
        idx = pre.topk(tc.k, dim=-1).indices
    vals = _gathered_acts(tc, x, idx)
    y_hat = _gathered_decode(tc, vals, idx) + tc.b_dec + tc.skip(x)
    err = y - y_hat
    total_var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = err.pow(2).sum() / total_var
    aux = torch.zeros((), dtype=fvu.dtype)
    if dead is not None and bool(dead.any()):
        k_aux = min(auxk_k, int(dead.sum()))
        with torch.no_grad():
            aux_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1).indices
        aux_rec = _gathered_decode(tc, _gathered_acts(tc, x, aux_idx), aux_idx)
        e = err.detach()
        aux = (e - aux_rec).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
    fired = idx[vals.detach() > 0]
    return fvu, aux, fired, idx


def _init_set(model: Model, cfg: TranscoderTrainConfig, layers: list[int], batches: list[Tensor]) -> TranscoderSet:
    """sparsify's start (encoder bias centring the mean input, decoder bias the mean output), and with
    ``skip_init="ridge"`` the skip as the ridge regression of output on input over ``batches`` (the first
    training batches, never held-out text)."""
    g = torch.Generator().manual_seed(cfg.seed)
    d, F = model.d_model, cfg.expansion * model.d_model
    L = len(layers)
    n, sx, sy = 0, torch.zeros(L, d, dtype=torch.float64), torch.zeros(L, d, dtype=torch.float64)
    xx, xy = torch.zeros(L, d, d, dtype=torch.float64), torch.zeros(L, d, d, dtype=torch.float64)
    for ids in batches:
        ins, outs = mlp_io(model, ids, layers, massive=cfg.massive)
        for j in range(L):
            x, y = ins[j].double(), outs[j].double()
            sx[j] += x.sum(0)
            sy[j] += y.sum(0)
            if cfg.skip and cfg.skip_init == "ridge":
                xx[j] += x.T @ x
                xy[j] += x.T @ y
        n += ins[0].shape[0]
    tcs = {}
    for j, layer in enumerate(layers):
        tc = Transcoder(d, F, k=cfg.k, skip=cfg.skip).init_weights(g)
        mx, my = sx[j] / n, sy[j] / n
        with torch.no_grad():
            tc.b_enc.copy_(-(mx.float() @ tc.W_enc.T))
            tc.b_dec.copy_(my.float())
            if tc.W_skip is not None and cfg.skip_init == "ridge":
                cov = xx[j] / n - torch.outer(mx, mx)
                cross = xy[j] / n - torch.outer(mx, my)
                cov += 1e-2 * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype)
                W = torch.linalg.solve(cov, cross).T  # [d_out, d_in]
                tc.W_skip.copy_(W.float())
                tc.b_dec.copy_((my - W @ mx).float())
        tcs[layer] = tc
    return TranscoderSet(tcs, model_name=model.name)


def _spec(model: Model, cfg: TranscoderTrainConfig) -> dict:
    return {"model": model.name, "weights": model.weights_hash, "config": asdict(cfg)}


def train_transcoders(model: Model, cfg: TranscoderTrainConfig, *, checkpoint=None, progress: bool = True,
                      max_steps: int | None = None) -> TranscoderRun:
    """Train one transcoder per layer of ``cfg.layers`` on ``cfg.total_tokens`` streamed corpus tokens.

    checkpoint: a folder to resume from / save to (refused when it belongs to another model, config or code).
    max_steps: stop after this many steps of this call (an interrupted run, for tests)."""
    cfg.validate()
    layers = cfg.layer_list(model)
    start = time.perf_counter()
    store = UnitCheckpoint(checkpoint, _spec(model, cfg), kind=CHECKPOINT_KIND) if checkpoint else None
    init_batches = list(itertools.islice(_train_batches(model, cfg, 0), cfg.init_batches))
    tcs = _init_set(model, cfg, layers, init_batches)
    lr = cfg.learning_rate(tcs.d_transcoder)
    params = {f"{i}.{n}": p for i in layers for n, p in tcs[i].named_parameters()}
    skip_params = [p for n, p in params.items() if n.endswith("W_skip")]
    other = [p for n, p in params.items() if not n.endswith("W_skip")]
    opt = torch.optim.Adam([{"params": other, "scale": 1.0}, {"params": skip_params, "scale": cfg.skip_lr_scale}],
                           lr=lr)
    since_fired = torch.zeros(len(layers), tcs.d_transcoder, dtype=torch.long)
    params["since_fired"] = since_fired  # saved with the parameters (not optimised)
    run = TranscoderRun(tcs, cfg)
    first = 0
    if store is not None:
        done = sorted(int(p.stem.split("-")[-1]) for p in store.folder.glob("unit-step-*.safetensors"))
        for s in reversed(done):
            meta = load_train_state(store, f"step-{s:06d}", params, opt)
            if meta is not None:
                first, run.resumed_from = s, s
                run.log = [TrainLog(**r) for r in meta["log"]]
                break
    batches = _train_batches(model, cfg, first)
    decay_start = int(cfg.steps * (1 - cfg.decay_fraction))
    bar = tqdm(total=cfg.steps, initial=first, desc=f"transcoders x{len(layers)}", disable=not progress)
    for step in range(first, cfg.steps):
        if max_steps is not None and step - first >= max_steps:
            break
        ids = next(batches)
        ins, outs = mlp_io(model, ids, layers, massive=cfg.massive)
        scale = min(1.0, (step + 1) / (cfg.warmup_steps + 1))
        if step >= decay_start and cfg.steps > decay_start:
            scale *= 1 - 0.9 * (step - decay_start) / (cfg.steps - decay_start)
        for group in opt.param_groups:
            group["lr"] = lr * scale * group["scale"]
        fvus = []
        dead_all = since_fired >= cfg.dead_tokens
        for j, layer in enumerate(layers):
            dead = dead_all[j] if cfg.auxk_alpha > 0 else None
            fvu, aux, fired, _ = _layer_loss(tcs[layer], ins[j], outs[j], dead, cfg.auxk_k)
            (fvu + cfg.auxk_alpha * aux).backward()
            fvus.append(float(fvu.detach()))
            since_fired[j] += ins[j].shape[0]
            since_fired[j, fired.unique()] = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not all(math.isfinite(f) for f in fvus):
            raise TranscoderError(f"training diverged at step {step}: FVU {fvus}; lower the learning rate")
        run.log.append(TrainLog(step + 1, (step + 1) * cfg.tokens_per_step, fvus,
                                float((since_fired >= cfg.dead_tokens).float().mean())))
        bar.update(1)
        bar.set_postfix(fvu=f"{np.mean(fvus):.3f}", dead=f"{run.log[-1].dead_fraction:.3f}")
        if store is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            save_train_state(store, f"step-{step + 1:06d}", params, opt, {"log": [asdict(r) for r in run.log]})
    bar.close()
    run.seconds = time.perf_counter() - start
    tcs.requires_grad_(False)
    return run


def _ce(model: Model, ids: Tensor) -> Tensor:
    """Per-token next-token cross-entropy [n_windows, T-1] (float64)."""
    logits = model.hf(input_ids=ids.to(model.device)).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(logits.device),
                                             reduction="none").double().cpu()


@torch.no_grad()
def evaluate_transcoders(model: Model, tcs: TranscoderSet, ids: Tensor, *, ce_windows: int | None = 16,
                         batch_windows: int = 8, massive: float | None = 30.0, progress: bool = True) -> pd.DataFrame:
    """Quality of every layer's transcoder on the windows ``ids`` (held-out text), one row per layer plus a row
    ``layer = "all"``: FVU of the MLP output (position 0 left out), L0, the fraction of latents that never fired
    (``dead_fraction``), and on the first ``ce_windows`` windows the next-token cross-entropy with that layer's
    MLP replaced by its transcoder (``ce_replaced``; ``all``: every layer at once), with it zero-ablated
    (``ce_ablated``), clean (``ce_clean``), and the share of the ablation's loss the transcoder recovers
    (``ce_recovered`` = (ablated - replaced) / (ablated - clean)), with a bootstrap 95 % CI over windows.
    ``massive``: sink tokens (:func:`sink_tokens`) are left out of FVU and keep their MLP output when replaced or
    ablated (``n_sink``: how many were left out); None: every token after position 0 counts."""
    tcs.check_fits(model)
    layers = tcs.layers
    sse = torch.zeros(len(layers), dtype=torch.float64)
    s1 = torch.zeros(len(layers), model.d_model, dtype=torch.float64)
    s2 = torch.zeros(len(layers), dtype=torch.float64)
    l0 = torch.zeros(len(layers), dtype=torch.float64)
    fired = torch.zeros(len(layers), tcs.d_transcoder, dtype=torch.bool)
    n, n_all = 0, 0
    for s in tqdm(range(0, len(ids), batch_windows), desc="held-out FVU", disable=not progress):
        ins, outs = mlp_io(model, ids[s: s + batch_windows], layers)
        n_all += ins[0].shape[0]
        if massive is not None:
            keep = ~sink_tokens(outs, massive)
            ins, outs = [t[keep] for t in ins], [t[keep] for t in outs]
        for j, layer in enumerate(layers):
            tc = tcs[layer]
            acts = tc.encode(ins[j])
            err = outs[j] - (tc.decode(acts) + tc.skip(ins[j]))
            sse[j] += err.double().pow(2).sum()
            s1[j] += outs[j].double().sum(0)
            s2[j] += outs[j].double().pow(2).sum()
            l0[j] += (acts > 0).sum()
            fired[j] |= (acts > 0).any(0)
        n += ins[0].shape[0]
    total_var = s2 - s1.pow(2).sum(-1) / n
    rows = [{"layer": str(layer), "fvu": float(sse[j] / total_var[j]), "l0": float(l0[j] / n),
             "dead_fraction": float(1 - fired[j].float().mean()), "n_tokens": n, "n_sink": n_all - n}
            for j, layer in enumerate(layers)]
    rows.append({"layer": "all", "fvu": float(sse.sum() / total_var.sum()), "l0": float(l0.sum() / n / len(layers)),
                 "dead_fraction": float(1 - fired.float().mean()), "n_tokens": n, "n_sink": n_all - n})
    frame = pd.DataFrame(rows)
    if ce_windows:
        ce_ids = ids[:ce_windows]
        clean = _ce(model, ce_ids)
        ce = {}
        for what in tqdm([[i] for i in layers] + [layers], desc="CE recovered", disable=not progress):
            key = str(what[0]) if len(what) == 1 else "all"
            with replaced_mlps(model, tcs, what, massive=massive):
                rep = _ce(model, ce_ids)
            with replaced_mlps(model, None, what, massive=massive):
                abl = _ce(model, ce_ids)
            ce[key] = (rep, abl)
        frame = frame.merge(pd.DataFrame([_ce_row(key, clean, rep, abl) for key, (rep, abl) in ce.items()]),
                            on="layer")
    return frame


def _ce_row(key: str, clean: Tensor, rep: Tensor, abl: Tensor, n_boot: int = 2000) -> dict:
    w_clean, w_rep, w_abl = clean.mean(1).numpy(), rep.mean(1).numpy(), abl.mean(1).numpy()
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(w_clean), len(w_clean))
        den = w_abl[i].mean() - w_clean[i].mean()
        boots.append((w_abl[i].mean() - w_rep[i].mean()) / den if den > 0 else np.nan)
    den = w_abl.mean() - w_clean.mean()
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return {"layer": key, "ce_clean": float(w_clean.mean()), "ce_replaced": float(w_rep.mean()),
            "ce_ablated": float(w_abl.mean()),
            "ce_recovered": float((w_abl.mean() - w_rep.mean()) / den) if den > 0 else float("nan"),
            "ce_recovered_lo": float(lo), "ce_recovered_hi": float(hi), "ce_tokens": int(clean.numel())}


def build_transcoders(model: Model, cfg: TranscoderTrainConfig, folder, *, recipe_name: str = "", checkpoint=None,
                      overwrite: bool = False, progress: bool = True) -> tuple[TranscoderSet, pd.DataFrame]:
    """Train (resumably), evaluate on the held-out windows and save a set with its card: what
    ``workbench train-transcoders`` runs. Returns the set (as loaded back from ``folder``) and the quality frame."""
    cfg.validate()
    folder = Path(folder)
    check_transcoder_destination(folder, overwrite)
    run = train_transcoders(model, cfg, checkpoint=checkpoint, progress=progress)
    t0 = time.perf_counter()
    quality = evaluate_transcoders(model, run.transcoders, heldout_windows(model, cfg), massive=cfg.massive,
                                   progress=progress)
    card = {"model": {"name": model.name, "weights_sha256": model.weights_hash, "family": model.arch.family},
            "recipe": recipe_name, "train_config": asdict(cfg), "corpus": cfg.corpus,
            "train_tokens": cfg.steps * cfg.tokens_per_step, "train_seconds": run.seconds,
            "train_tokens_per_second": (cfg.steps - run.resumed_from) * cfg.tokens_per_step / max(run.seconds, 1e-9),
            "resumed_from_step": run.resumed_from, "eval_seconds": time.perf_counter() - t0,
            "device": str(model.device), "quality": quality.to_dict(orient="records"),
            "train_log_tail": [asdict(r) for r in run.log[-5:]]}
    save_transcoders(run.transcoders, folder, card, overwrite=overwrite)
    return load_transcoders(folder, model=model), quality


def recipe(name: str, **overrides) -> TranscoderTrainConfig:
    if name not in RECIPES:
        raise TranscoderError(f"unknown recipe {name!r}; recipes: {sorted(RECIPES)}")
    return replace(RECIPES[name], **overrides)


CHECKPOINT_KIND = "transcoder-checkpoint"


def transcoder_folder(model_name: str, cfg: TranscoderTrainConfig, out=None) -> Path:
    """Where ``workbench train-transcoders`` writes a set: ``out``, or ``saes/<model>/transcoders/topk-<E>x-k<k>``
    in the checkout."""
    from_cfg = f"topk-{cfg.expansion}x-k{cfg.k}"
    return Path(out) if out is not None else resolve_output_path(f"saes/{safe_segment(model_name)}/transcoders/{from_cfg}")


def check_transcoder_destination(folder: Path, overwrite: bool) -> None:
    """Raise before any model loads when ``folder`` exists and may not be replaced."""
    claim_folder(folder, TRANSCODER_KIND.name, overwrite=overwrite)


def train_transcoder_set(model_name: str, recipe_name: str = "cpu", *, device=None, out=None,
                         overwrite: bool = False, progress: bool = True) -> tuple[TranscoderSet, pd.DataFrame, Path]:
    """``workbench train-transcoders``: the recipe's set for ``model_name``, resumable (a checkpoint in the user
    cache, removed once the set is written), evaluated on held-out text and saved with its card."""
    cfg = recipe(recipe_name)
    folder = transcoder_folder(model_name, cfg, out)
    check_transcoder_destination(folder, overwrite)
    model = load_model(model_name, device=device)
    where = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
    ckpt = cache_root() / "transcoder-checkpoints" / safe_segment(model.name) / f"{recipe_name}-{where}"
    tcs, quality = build_transcoders(model, cfg, folder, recipe_name=recipe_name, checkpoint=ckpt,
                                     overwrite=overwrite, progress=progress)
    if ckpt.is_dir() and folder_kind(ckpt) == CHECKPOINT_KIND:
        shutil.rmtree(ckpt)
    return tcs, quality, folder
