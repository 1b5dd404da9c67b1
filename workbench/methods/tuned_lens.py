"""Tuned lens (Belrose et al. 2023, arXiv 2303.08112): one affine translator per layer, read through the model's head.

    lens = train_tuned_lens(model, TunedLensTrainConfig.cpu())       # on the offline corpus, seeded, with a bar
    save_tuned_lens(lens, tuned_lens_dir(model.name))                 # cfg.json + translators.safetensors + card
    lens = load_tuned_lens(tuned_lens_dir(model.name), model=model)   # hashes and the model's weights checked
    frame = logit_lens(model, prompts, lens=lens)                     # the logit lens' frame, read through the lens
    kl = lens_kl(model, {"logit": None, "tuned": lens}, windows)      # held-out KL to the final distribution

Layer l (Hugging Face ``hidden_states`` numbering, 0 = embedding output) is read as
``head(final_norm(h + A_l h + b_l))``; A_l and b_l start at zero, so the untrained lens is the logit lens, and the
last layer L has no translator (it is the model's own output). Training minimises, summed over layers, the KL
divergence from the model's final next-token distribution at the same position to the lens' distribution, as the
``tuned-lens`` package does (loss per layer, averaged over tokens; gradient clipped to norm 1; SGD with Nesterov
momentum 0.9 at lr ``lr * (1 - 0.9)`` and weight decay 1e-3, linearly decayed to 0; or Adam with warm-up).

A checkpoint of the ``tuned-lens`` package (its ``config.json`` + ``params.pt``) is read by
:func:`from_tuned_lens_package` with ``torch.load(weights_only=True)`` (never an unrestricted pickle load); its
translator ``i`` is our layer ``i``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from workbench.core.models import Model
from workbench.core.sites import layer_site
from workbench.core.trace import trace
from workbench.data.corpus import DEFAULT_CORPUS, Corpus, as_corpus, token_windows
from workbench.io.artifact import ArtifactError, ArtifactKind, read_artifact, read_card, register_kind, write_artifact
from workbench.io.paths import resolve_output_path, safe_segment
from workbench.io.provenance import json_roundtrip, model_info, now, package_versions

LENS_FORMAT = "workbench-tuned-lens/1"
CONFIG_FILE = "cfg.json"  # what the lens is: shapes, model, training config
WEIGHTS_FILE = "translators.safetensors"  # translators.{i}.weight / .bias, in cfg.json's dtype
CARD_FILE = "card.json"  # provenance and held-out KL; written last, holds the weights' sha256
KIND = "tuned-lens"
OPTIMIZERS = ("sgd", "adam")
INITS = ("identity", "lstsq")
STORE_DTYPES = ("float32", "float16")


class TunedLensError(ArtifactError):
    """A tuned lens that does not fit the model, a damaged artifact, or a bad training config."""


class TunedLens(nn.Module):
    """Affine translators for layers 0..n_layers-1 of one model (layer n_layers is read as is)."""

    def __init__(self, n_layers: int, d_model: int, *, bias: bool = True, model: Mapping | None = None):
        super().__init__()
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise TunedLensError(f"n_layers must be a positive int, got {n_layers!r}")
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise TunedLensError(f"d_model must be a positive int, got {d_model!r}")
        self.n_layers, self.d_model, self.bias = n_layers, d_model, bool(bias)
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model, bias=bias) for _ in range(n_layers))
        for t in self.translators:  # the identity: the untrained lens is the logit lens
            nn.init.zeros_(t.weight)
            if bias:
                nn.init.zeros_(t.bias)
        self.model = dict(model) if model is not None else None  # name, weights_sha256, ... of the model it reads
        self.card: dict = {}
        self.store_dtype = "float32"  # how save_tuned_lens writes the translators (see round_to)

    def round_to(self, dtype: str) -> None:
        """Round the translators to ``dtype`` ("float16" or "float32") in place and store them so; they stay float32
        tensors (every float16 value is exact in float32), so what is measured after this is what is stored."""
        if dtype not in STORE_DTYPES:
            raise TunedLensError(f"dtype must be one of {list(STORE_DTYPES)}, got {dtype!r}")
        with torch.no_grad():
            for p in self.parameters():
                low = p.to(getattr(torch, dtype))
                if not torch.isfinite(low).all():
                    raise TunedLensError(f"the translators overflow {dtype} (max |w| {float(p.abs().max()):.3g})")
                p.copy_(low.float())
        self.store_dtype = dtype

    @classmethod
    def for_model(cls, model: Model, *, bias: bool = True) -> TunedLens:
        """An identity lens shaped for ``model``, on its device, float32."""
        return cls(model.n_layers, model.d_model, bias=bias, model=model_info(model)).to(model.device)

    def check_model(self, model: Model) -> None:
        """Raise unless this lens was made for ``model``: same shapes, and same weights when the lens records them."""
        if (model.n_layers, model.d_model) != (self.n_layers, self.d_model):
            raise TunedLensError(f"the tuned lens has {self.n_layers} layers of width {self.d_model}; {model.name} has "
                                 f"{model.n_layers} of width {model.d_model}")
        want = (self.model or {}).get("weights_sha256")
        if want is not None and want != model.weights_hash:
            raise TunedLensError(f"the tuned lens was trained on {self.model.get('name')} with weights {want[:12]}..., "
                                 f"not on these weights ({model.name}, {model.weights_hash[:12]}...); train one for "
                                 "this model")

    def transform(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """``h + A_layer h + b_layer`` (float32) for layer < n_layers; layer n_layers is returned unchanged."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.n_layers:
            raise TunedLensError(f"layer must be an int in 0..{self.n_layers}, got {layer!r}")
        if layer == self.n_layers:
            return h
        t = self.translators[layer]
        x = h.to(t.weight.device, torch.float32)
        return x + t(x)

    def logits(self, model: Model, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The lens' logits of residual ``h`` at hidden-state layer ``layer`` (final norm once, then the head)."""
        return model.lens_logits(self.transform(h, layer).to(model.dtype))

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.transform(h, layer)

    def extra_repr(self) -> str:
        name = (self.model or {}).get("name")
        return f"n_layers={self.n_layers}, d_model={self.d_model}, bias={self.bias}, model={name!r}"


# -- training ---------------------------------------------------------------------------------------------------------
SMOKE_BUDGET = 6e11  # work units of a smoke run's KL steps (TunedLensTrainConfig.smoke): seconds on 2 CPU cores
SMOKE_LOGIT_OPS = 128  # per logit: the softmax, log and KL terms beside the head's d_model multiply-adds


@dataclass
class TunedLensTrainConfig:
    """How a tuned lens is trained. Defaults: the CPU recipe (``cpu()``); ``gpu()`` is the paper's token budget."""

    corpus: str = DEFAULT_CORPUS  # the offline registry corpus (or a path/Corpus given to train_tuned_lens)
    context_length: int = 128  # tokens per window, BOS included; short windows keep CPU steps small
    batch_size: int = 8  # windows per optimiser step: 8 x 128 = 1,024 tokens a step
    steps: int = 250  # the paper's step count
    optimizer: str = "sgd"  # "sgd" (the paper: Nesterov momentum) or "adam"
    lr: float = 1.0  # the paper's lr scale; SGD runs at lr * (1 - momentum), Adam at lr * 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-3  # pulls the translators towards the identity, as in tuned-lens
    warmup_steps: int = 0  # Adam wants some (tuned-lens: steps // 5); SGD none
    clip_grad: float = 1.0  # global gradient norm, as in tuned-lens
    heldout_windows: int = 16  # the corpus' first windows: never trained on, used for the held-out KL
    seed: int = 0  # shuffles the training windows (within a buffer of shuffle_buffer windows)
    shuffle_buffer: int = 256
    bias: bool = True
    # "identity" (the paper) or "lstsq": start each translator at the least-squares affine map from layer l to the
    # last layer's residual (closed form, forward passes only), so that the costly KL steps (every layer x every
    # token through the 49k-row head) start near a good solution: what makes a CPU budget enough.
    init: str = "identity"
    lstsq_windows: int = 128  # windows for the least-squares fit (forward passes only)
    lstsq_ridge: float = 1e-3  # ridge on the normal equations, relative to their mean diagonal
    # "float16" halves the artifact (20 MB instead of 40 MB for SmolLM2); the translators are rounded to it before
    # the held-out evaluation, so the card's KL is that of the stored weights. Computation is float32 either way.
    store_dtype: str = "float32"

    @classmethod
    def cpu(cls, **overrides) -> TunedLensTrainConfig:
        """SmolLM2-135M on 2 CPU cores in about 15 minutes (docs/results/tuned-lens-patching.md): the least-squares start on
        1,024 windows (131k tokens, forward passes only), then 12 KL steps of 512 tokens with the paper's optimiser
        (each step sends 30 layers x 512 tokens through the 49k-row head and back: ~37 s here), stored as float16."""
        return cls(**{"context_length": 128, "batch_size": 4, "steps": 12, "init": "lstsq", "lstsq_windows": 1024,
                      "store_dtype": "float16", **overrides})

    @classmethod
    def gpu(cls, **overrides) -> TunedLensTrainConfig:
        """The paper's budget: 250 steps of 2^18 tokens (256 windows of 1,024)."""
        return cls(**{"context_length": 1024, "batch_size": 256, "steps": 250, "heldout_windows": 64, **overrides})

    @classmethod
    def smoke(cls, model: Model | None = None, **overrides) -> TunedLensTrainConfig:
        """A seconds-sized run for tests and smoke notebooks (not a useful lens): 10 steps of 4 windows of 64 tokens.

        With ``model``, sized by cost instead of by a fixed recipe: every KL step sends each token of every layer
        through the head and back, about ``n_layers x vocab x (d_model + SMOKE_LOGIT_OPS)`` multiply-adds and
        elementwise operations per token, so the tokens (steps x windows, and the held-out windows) shrink until
        their sum stays within :data:`SMOKE_BUDGET` (at least one step of one window). SmolLM2-135M (30 layers, 49k
        vocabulary) gets 2 steps of 4 windows; a 28-layer model with a 152k vocabulary one step of one window."""
        plan = {"context_length": 64, "batch_size": 4, "steps": 10, "heldout_windows": 4}
        if model is not None:
            per_token = model.n_layers * model.W_U.shape[0] * (model.d_model + SMOKE_LOGIT_OPS)
            windows = int(SMOKE_BUDGET // (per_token * plan["context_length"]))  # training + held-out windows
            held = min(plan["heldout_windows"], max(1, windows // 5))
            train = max(1, min(plan["batch_size"] * plan["steps"], windows - held))
            batch = min(plan["batch_size"], train)
            plan.update(batch_size=batch, steps=max(1, train // batch), heldout_windows=held)
        return cls(**(plan | overrides))

    def validate(self) -> None:
        for name in ("context_length", "batch_size", "steps", "heldout_windows", "shuffle_buffer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TunedLensError(f"{name} must be a positive int, got {v!r}")
        if self.context_length < 2:
            raise TunedLensError(f"context_length must be at least 2, got {self.context_length}")
        if self.init not in INITS:
            raise TunedLensError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if isinstance(self.lstsq_windows, bool) or not isinstance(self.lstsq_windows, int) or self.lstsq_windows < 1:
            raise TunedLensError(f"lstsq_windows must be a positive int, got {self.lstsq_windows!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise TunedLensError(f"store_dtype must be one of {list(STORE_DTYPES)}, got {self.store_dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise TunedLensError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("lr", "weight_decay", "clip_grad"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                    name == "lr" and v == 0):
                raise TunedLensError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        if not 0 <= self.momentum < 1:
            raise TunedLensError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or not (
                0 <= self.warmup_steps < self.steps):
            raise TunedLensError(f"warmup_steps must be an int in 0..steps-1, got {self.warmup_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TunedLensError(f"seed must be an int, got {self.seed!r}")


def _full_windows(model: Model, corpus: Corpus, context_length: int) -> Iterator[list[int]]:
    """The corpus' full windows (:func:`workbench.data.corpus.token_windows`, the shorter last one dropped)."""
    return token_windows(corpus, model.tokenizer, context_length, last="drop")


def heldout_windows(model: Model, corpus: Corpus | str = DEFAULT_CORPUS, *, n: int = 16,
                    context_length: int = 128) -> torch.Tensor:
    """The corpus' first ``n`` full windows [n, context_length]: the held-out set of :func:`train_tuned_lens`."""
    corpus = _as_corpus(corpus)
    out = []
    for w in _full_windows(model, corpus, context_length):
        out.append(w)
        if len(out) == n:
            break
    if len(out) < n:
        raise TunedLensError(f"the corpus {corpus.source()} holds only {len(out)} windows of {context_length} tokens; "
                             f"{n} were asked for")
    return torch.tensor(out)


def _as_corpus(corpus) -> Corpus:
    try:
        return as_corpus(corpus)
    except ValueError as e:
        raise TunedLensError(f"corpus must be a registry corpus name, a path, a Corpus or a list of texts: {e}") \
            from None


def _shuffled(it: Iterator[list[int]], buffer: int, rng: np.random.Generator) -> Iterator[list[int]]:
    buf: list[list[int]] = []
    for w in it:
        buf.append(w)
        if len(buf) == buffer:
            rng.shuffle(buf)
            yield from buf[: buffer // 2]
            buf = buf[buffer // 2 :]
    rng.shuffle(buf)
    yield from buf


def _hidden_and_targets(model: Model, ids: torch.Tensor):
    """Every layer's residual (0..L-1, as captured by the lens' own sites) and the final log-probabilities."""
    ids = ids.to(model.device)
    sites = [layer_site(layer) for layer in range(model.n_layers)]
    with torch.no_grad(), trace(model, sites) as tr:
        logits = model.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return [tr[s] for s in sites], torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def _lstsq_init(model: Model, lens: TunedLens, ids: torch.Tensor, ridge: float, batch_size: int,
                progress: bool) -> int:
    """Set each translator to the ridge least-squares affine map from layer l to the last layer's residual."""
    L, d = model.n_layers, model.d_model
    sites = [layer_site(layer) for layer in range(L + 1)]
    xtx = torch.zeros(L, d + 1, d + 1, dtype=torch.float64, device=model.device)
    xty = torch.zeros(L, d + 1, d, dtype=torch.float64, device=model.device)
    for start in tqdm(range(0, len(ids), batch_size), desc="tuned lens: least-squares init", disable=not progress):
        batch = ids[start : start + batch_size].to(model.device)
        with trace(model, sites, stop=True) as tr:
            model.hf(input_ids=batch, attention_mask=torch.ones_like(batch))
        y = tr[sites[-1]].reshape(-1, d).double()
        for layer in range(L):
            x = tr[sites[layer]].reshape(-1, d).double()
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
            xtx[layer] += x.T @ x
            xty[layer] += x.T @ y
    for layer in range(L):
        a = xtx[layer]
        a = a + ridge * a.diagonal().mean() * torch.eye(d + 1, dtype=a.dtype, device=a.device)
        w = torch.linalg.solve(a, xty[layer])  # [d + 1, d]: y = x @ w[:d] + w[d]
        t = lens.translators[layer]
        t.weight.copy_((w[:d].T - torch.eye(d, dtype=w.dtype, device=w.device)).to(t.weight.dtype))
        if t.bias is not None:
            t.bias.copy_(w[d].to(t.bias.dtype))
    return int(ids.numel())


def _kl(target_logp: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(final || lens), in nats."""
    logq = torch.log_softmax(lens_logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1).mean()


def train_tuned_lens(model: Model, cfg: TunedLensTrainConfig | None = None, *, corpus=None,
                     progress: bool = True) -> TunedLens:
    """Train a tuned lens for ``model`` on the corpus (``cfg.corpus`` unless ``corpus`` is given: a registry name, a
    path, a :class:`Corpus` or a list of texts). The first ``cfg.heldout_windows`` windows are held out; the card
    (``lens.card``) records the config, corpus, token count, wall time and the held-out KL per layer of the tuned and
    the logit lens. The model's weights are never changed and no gradient is left on them."""
    cfg = cfg or TunedLensTrainConfig.cpu()
    cfg.validate()
    label = cfg.corpus if corpus is None else None  # a registry name or path says more than the Corpus' source
    corpus = _as_corpus(cfg.corpus if corpus is None else corpus)
    torch.manual_seed(cfg.seed)
    lens = TunedLens.for_model(model, bias=cfg.bias)
    windows = _full_windows(model, corpus, cfg.context_length)
    held = []
    for w in windows:
        held.append(w)
        if len(held) == cfg.heldout_windows:
            break
    if len(held) < cfg.heldout_windows:
        raise TunedLensError(f"the corpus {corpus.source()} holds only {len(held)} full windows of "
                             f"{cfg.context_length} tokens; the held-out set alone needs {cfg.heldout_windows}")
    train = _shuffled(windows, cfg.shuffle_buffer, np.random.default_rng(cfg.seed))
    t0 = time.perf_counter()
    lstsq_tokens = 0
    if cfg.init == "lstsq":
        fit = [w for _, w in zip(range(cfg.lstsq_windows), train)]
        if len(fit) < cfg.lstsq_windows:
            raise TunedLensError(f"the corpus ran out: {len(fit)} windows for the least-squares fit, "
                                 f"{cfg.lstsq_windows} asked for")
        lstsq_tokens = _lstsq_init(model, lens, torch.tensor(fit), cfg.lstsq_ridge, cfg.batch_size, progress)
    params = list(lens.parameters())
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr * (1 - cfg.momentum), momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr * 1e-3, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 at the last step
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses, n_tokens = [], 0
    bar = tqdm(range(cfg.steps), desc="tuned lens", disable=not progress)
    for step in bar:
        batch = [w for _, w in zip(range(cfg.batch_size), train)]
        if len(batch) < cfg.batch_size:
            raise TunedLensError(f"the corpus ran out after {step} steps ({n_tokens} tokens): lower steps or batch_size, "
                                 "or give a larger corpus")
        ids = torch.tensor(batch)
        hidden, target = _hidden_and_targets(model, ids)
        opt.zero_grad(set_to_none=False)
        total = 0.0
        for layer, h in enumerate(hidden):  # one layer at a time: only one [batch, T, vocab] graph alive
            loss = _kl(target, lens.logits(model, h, layer))
            t = lens.translators[layer]
            grads = torch.autograd.grad(loss, list(t.parameters()))  # never into the model's parameters
            for p, g in zip(t.parameters(), grads, strict=True):
                p.grad = g if p.grad is None else p.grad.add_(g)
            total += float(loss.detach())
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        opt.step()
        sched.step()
        n_tokens += ids.numel()
        losses.append(total / len(hidden))
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    lens.round_to(cfg.store_dtype)
    held_ids = torch.tensor(held)
    kl = lens_kl(model, {"logit": None, "tuned": lens}, held_ids)
    lens.card = {
        "train_config": asdict(cfg),
        "corpus": label or corpus.source(),
        "train_tokens": n_tokens,
        "lstsq_tokens": lstsq_tokens,
        "heldout_tokens": int(held_ids.numel()),
        "heldout_sha256": hashlib.sha256(held_ids.numpy().astype(np.int64).tobytes()).hexdigest(),
        "train_seconds": round(seconds, 1),
        "loss_curve": [round(x, 5) for x in losses],
        "heldout_kl": kl.to_dict("records"),
        "device": str(model.device),
    }
    return lens


@torch.no_grad()
def lens_kl(model: Model, lenses: Mapping[str, TunedLens | None], windows: torch.Tensor, *,
            batch_size: int = 4) -> pd.DataFrame:
    """Mean KL(final || lens) in nats (and bits per token) per layer 0..L on token windows [n, T], for each named lens
    (``None`` = the logit lens). Also the top-1 agreement with the model's own next-token prediction."""
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.dtype != torch.long:
        raise TunedLensError(f"windows must be a long tensor [n_windows, tokens], got {getattr(windows, 'shape', windows)}")
    for name, lens in lenses.items():
        if lens is not None:
            if not isinstance(lens, TunedLens):
                raise TunedLensError(f"lens {name!r} must be a TunedLens or None (the logit lens), got "
                                     f"{type(lens).__name__}")
            lens.check_model(model)
    L = model.n_layers
    sums = {(name, layer): [0.0, 0.0] for name in lenses for layer in range(L + 1)}
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        hidden, target = _hidden_and_targets(model, ids)
        top = target.argmax(-1)
        hidden = [*hidden, None]
        for layer in range(L + 1):
            for name, lens in lenses.items():
                if layer == L:
                    logits = target  # the last layer of every lens is the model's output (log-probs: same argmax)
                else:
                    h = hidden[layer]
                    logits = lens.logits(model, h, layer) if lens is not None else model.lens_logits(h)
                kl = _kl(target, logits) if layer < L else torch.zeros(())
                n = ids.numel()
                sums[(name, layer)][0] += float(kl) * n
                sums[(name, layer)][1] += float((logits.argmax(-1) == top).float().sum())
    n_tok = windows.numel()
    rows = [{"lens": name, "layer": layer, "kl_nats": s[0] / n_tok, "kl_bits": s[0] / n_tok / math.log(2),
             "top1_agreement": s[1] / n_tok, "n_tokens": n_tok} for (name, layer), s in sums.items()]
    return pd.DataFrame(rows).sort_values(["lens", "layer"], kind="stable").reset_index(drop=True)


# -- artifacts ----------------------------------------------------------------------------------------------------------
def tuned_lens_dir(model_name: str, root: str | Path | None = None) -> Path:
    """The folder ``<root>/probes/<model>/tuned-lens/``. ``root=None``: the checkout's root when running inside one
    (a JupyterLab kernel in ``notebooks/`` still finds the shipped lenses), else the current directory."""
    base = resolve_output_path(".") if root is None else Path(root)
    return base / "probes" / safe_segment(model_name) / "tuned-lens"


def save_tuned_lens(lens: TunedLens, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``cfg.json``, ``translators.safetensors`` and ``card.json`` (last; it holds the sha256 of both) as one
    folder by :func:`workbench.io.artifact.write_artifact` (claimed, staged, renamed into place): into a new or empty
    folder, or (``overwrite=True``) one holding a tuned lens this package wrote. Refuses a lens that records no
    model."""
    if not isinstance(lens, TunedLens):
        raise TunedLensError(f"expected a TunedLens, got {type(lens).__name__}")
    if not lens.model or not lens.model.get("weights_sha256"):
        raise TunedLensError("the lens records no model weights hash: make it with TunedLens.for_model(model)")
    dtype = getattr(torch, lens.store_dtype)
    tensors = {f"translators.{i}.{k}": v.detach().to("cpu", dtype).contiguous()
               for i, t in enumerate(lens.translators) for k, v in t.state_dict().items()}
    cfg = {"format": LENS_FORMAT, "lens_type": "linear_tuned_lens", "n_layers": lens.n_layers,
           "d_model": lens.d_model, "bias": lens.bias, "dtype": lens.store_dtype, "model": lens.model}
    data = save(tensors, metadata={"format": "pt", "lens_type": "linear_tuned_lens"})
    card = json_roundtrip({**lens.card, "model": lens.model, "weights_file": WEIGHTS_FILE,
                           "weights_sha256": hashlib.sha256(data).hexdigest(),
                           "config_sha256": _config_sha256(cfg),
                           "versions": package_versions(), "created_at": now()}, strict=False)
    config = (json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n").encode()  # as atomic_write_json writes
    folder = Path(folder)
    write_artifact(folder, LENS_KIND, card, files={CONFIG_FILE: config, WEIGHTS_FILE: data}, overwrite=overwrite)
    return folder


def _config_sha256(cfg: dict) -> str:
    """The hash a card records of ``cfg.json``: of its parsed content (so it survives re-indenting)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def _recorded(card: dict) -> dict:
    """The files a tuned-lens card vouches for: ``files`` (cards written through :mod:`workbench.io.artifact`) and
    the translators under ``weights_sha256`` (every card, the shipped ones included)."""
    files = dict(card["files"]) if isinstance(card.get("files"), dict) else {}
    return files | {WEIGHTS_FILE: card.get("weights_sha256")}


def load_tuned_lens(folder: str | Path, *, model: Model | None = None) -> TunedLens:
    """Load a lens saved by :func:`save_tuned_lens`, checking the sha256 of its weights and config against the card
    and every tensor's shape; with ``model``, also that it was trained on these very weights. On the model's device
    when given."""
    folder = Path(folder)
    card = read_artifact(folder, LENS_KIND, error=TunedLensError)  # the sha256 of the translators (and of cfg.json)
    cfg = read_card(folder / CONFIG_FILE, error=TunedLensError)
    if cfg.get("format") != LENS_FORMAT:
        raise TunedLensError(f"{folder / CONFIG_FILE} has format {cfg.get('format')!r}, expected {LENS_FORMAT!r}")
    cfg_hash = _config_sha256(cfg)
    if cfg_hash != card.get("config_sha256"):
        raise TunedLensError(f"refusing the tuned lens in {folder}: {CONFIG_FILE} does not match its card (sha256 "
                             f"{cfg_hash[:12]}... vs {str(card.get('config_sha256'))[:12]}...)")
    weights = folder / WEIGHTS_FILE
    lens = TunedLens(cfg["n_layers"], cfg["d_model"], bias=cfg["bias"], model=cfg["model"])
    tensors = load_file(str(weights))
    dtype = cfg.get("dtype", "float32")
    wrong = sorted({str(t.dtype) for t in tensors.values()} - {f"torch.{dtype}"})
    if wrong:
        raise TunedLensError(f"{weights}: tensors of dtype {wrong}, but {CONFIG_FILE} declares {dtype}")
    lens.store_dtype = dtype
    _load_translators(lens, {k.removeprefix("translators."): v for k, v in tensors.items()}, str(weights))
    lens.card = card
    if model is not None:
        lens.check_model(model)
        lens.to(model.device)
    return lens


def _load_translators(lens: TunedLens, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``{i}.weight`` / ``{i}.bias`` into the lens, refusing missing, extra or mis-shaped tensors."""
    want = {f"{i}.{k}": tuple(v.shape) for i, t in enumerate(lens.translators) for k, v in t.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise TunedLensError(f"{source}: translator tensors do not match a {lens.n_layers}-layer lens of width "
                             f"{lens.d_model}; missing {missing[:4]}{'...' if len(missing) > 4 else ''}, extra "
                             f"{extra[:4]}{'...' if len(extra) > 4 else ''}")
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    if bad:
        raise TunedLensError(f"{source}: tensors of the wrong shape (got, expected): {bad}")
    with torch.no_grad():
        for i, t in enumerate(lens.translators):
            for k, p in t.named_parameters():
                p.copy_(state[f"{i}.{k}"].to(torch.float32))


def from_tuned_lens_package(folder: str | Path, model: Model) -> TunedLens:
    """Read a checkpoint of the ``tuned-lens`` package (``config.json`` + ``params.pt``) for ``model``.

    ``params.pt`` is opened with ``torch.load(weights_only=True)``: tensors only, never arbitrary pickled objects.
    The config's ``d_model`` and ``num_hidden_layers`` must match the model; the package records no weights hash
    of the model (only of its unembedding), so the lens is tied to ``model`` as given."""
    folder = Path(folder)
    cfg = read_card(folder / "config.json", error=TunedLensError)
    params = folder / "params.pt"
    if not params.is_file():
        raise FileNotFoundError(f"no params.pt in {folder}: not a tuned-lens package checkpoint")
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise TunedLensError(f"{folder}: lens_type {lens_type!r} is not supported (only 'linear_tuned_lens')")
    if (cfg.get("num_hidden_layers"), cfg.get("d_model")) != (model.n_layers, model.d_model):
        raise TunedLensError(f"{folder}: the lens is for {cfg.get('num_hidden_layers')} layers of width "
                             f"{cfg.get('d_model')}; {model.name} has {model.n_layers} of width {model.d_model}")
    try:
        state = torch.load(params, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal becomes one clear error
        raise TunedLensError(f"{params} could not be read as a tensors-only checkpoint ({type(e).__name__}: {e})") \
            from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TunedLensError(f"{params} is not a state dict of tensors")
    lens = TunedLens(model.n_layers, model.d_model, bias=bool(cfg.get("bias", True)), model=model_info(model))
    _load_translators(lens, state, str(params))
    lens.card = {"source": "tuned-lens package", "folder": str(folder),
                 "base_model_name_or_path": cfg.get("base_model_name_or_path"),
                 "unembed_hash": cfg.get("unembed_hash")}
    return lens.to(model.device)


# A tuned-lens folder (cfg.json + translators.safetensors + card.json), written and read through
# workbench.io.artifact; ``workbench doctor`` checks it by loading it.
LENS_KIND = register_kind(ArtifactKind(KIND, card_file=CARD_FILE, signature=(CONFIG_FILE, WEIGHTS_FILE),
                                       recorded=_recorded, check=load_tuned_lens, label="tuned lens"))


__all__ = [
    "CARD_FILE", "CONFIG_FILE", "WEIGHTS_FILE", "TunedLens", "TunedLensError", "TunedLensTrainConfig",
    "from_tuned_lens_package", "heldout_windows", "lens_kl", "load_tuned_lens", "save_tuned_lens",
    "train_tuned_lens", "tuned_lens_dir",
]
