"""Readout interventions: repair the digit rows of the output head, LoRA on attention Q/V, steering.

Each returns something that can be *applied* to a model without touching its stored weights:

- :func:`train_digit_rows` -> :class:`DigitRowRepair`; ``with repair.applied(model): ...`` swaps the output head
  for one whose digit rows carry a trained delta (only ``n_digits x d_model`` parameters). For a tied head the
  embedding is left untouched: the delta lives in the head only.
- :func:`train_lora_qv` -> a new :class:`~workbench.core.models.Model` with the LoRA update merged into a copy of the
  weights (the original model is not modified).
- :func:`steering_edit` -> a ``trace`` edit that adds ``alpha * direction`` at one site.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import nn

from workbench.core.models import Model, from_hf
from workbench.core.swap import swap_modules
from workbench.core.trace import Edit, add_direction


class DigitRowHead(nn.Module):
    """The original head plus a trainable delta on a few rows: logits[..., ids] += h @ delta.T."""

    def __init__(self, base: nn.Module, ids: Sequence[int]):
        super().__init__()
        weight = base.weight
        self.base = base
        self.register_buffer("ids", torch.tensor(list(ids), dtype=torch.long, device=weight.device))
        self.delta = nn.Parameter(torch.zeros(len(ids), weight.shape[1], dtype=weight.dtype, device=weight.device))

    @property
    def weight(self) -> torch.Tensor:
        """The effective head matrix (a copy with the repaired rows), for lens/geometry code that reads .weight."""
        w = self.base.weight.detach().clone()
        w[self.ids] += self.delta.detach()
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)
        return logits.index_add_(-1, self.ids, h @ self.delta.T)  # in place: no second [.., vocab] tensor


@dataclass
class DigitRowRepair:
    head: DigitRowHead
    unembed_path: str
    losses: list[float] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return self.head.delta.numel()

    @contextlib.contextmanager
    def applied(self, model: Model) -> Iterator[Model]:
        with swap_modules(model, {self.unembed_path: self.head}):
            yield model


def train_digit_rows(
    model: Model,
    features: Float[torch.Tensor, "n d_model"],
    gold: Int[torch.Tensor, " n"],
    digit_ids: Sequence[int],
    *,
    steps: int = 500,
    lr: float = 0.1,
    decay: float = 0.99,
    margin: float = 2.0,
    seed: int = 0,
) -> DigitRowRepair:
    """Train only the head rows of ``digit_ids`` with the hinge objective of the counting paper:

        mean_i max(0, max_{v not in digits} W_v . h_i + margin - W_{d_i} . h_i)

    features: the final-normed last-token states (``ln_final.hook_normalized``); gold: index into ``digit_ids``
    of each item's answer. Adam with lr ``lr`` decayed by ``decay`` per step. The non-digit maximum does not
    depend on the trained rows, so it is computed once: a step costs 9 x d, not vocab x d.
    """
    if features.ndim != 2 or features.shape[1] != model.d_model:
        raise ValueError(f"features must be [n, {model.d_model}], got {tuple(features.shape)}")
    if gold.shape != (features.shape[0],):
        raise ValueError(f"gold must be [{features.shape[0]}], got {tuple(gold.shape)}")
    if int(gold.min()) < 0 or int(gold.max()) >= len(digit_ids):
        raise ValueError(f"gold indices must lie in 0..{len(digit_ids) - 1}")
    if steps < 1 or lr <= 0 or not 0 < decay <= 1:
        raise ValueError(f"need steps >= 1, lr > 0, 0 < decay <= 1; got {steps}, {lr}, {decay}")
    torch.manual_seed(seed)
    base = model.module(model.arch.unembed)
    head = DigitRowHead(base, digit_ids)
    h = features.to(base.weight.device, base.weight.dtype)
    with torch.no_grad():
        logits = base(h).float()
        logits[:, head.ids] = -math.inf
        other_max = logits.max(-1).values  # [n]
        gold_rows = base.weight[head.ids[gold.to(head.ids.device)]].float()  # [n, d]
        gold_base = (gold_rows * h.float()).sum(-1)
    opt = torch.optim.Adam([head.delta], lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    gold_dev = gold.to(h.device)
    losses = []
    for _ in range(steps):
        gold_logit = gold_base + (head.delta[gold_dev].float() * h.float()).sum(-1)
        loss = torch.clamp(other_max + margin - gold_logit, min=0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    head.requires_grad_(False)
    return DigitRowRepair(head=head, unembed_path=model.arch.unembed, losses=losses)


# The attention projections LoRA targets in each family ("the family's equivalent" of q_proj / v_proj).
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],  # fused q, k, v
    "gpt_neox": ["query_key_value"],  # fused q, k, v
}


@dataclass
class LoraResult:
    model: Model  # a copy with the LoRA update merged into its weights
    losses: list[float]
    n_params: int  # trainable LoRA parameters
    seconds: float


def train_lora_qv(
    model: Model,
    prompts: Sequence[str],
    answer_ids: Sequence[int],
    *,
    r: int = 16,
    alpha: int = 32,
    steps: int = 200,
    batch_size: int = 4,
    lr: float = 2e-4,
    clip: float = 1.0,
    seed: int = 0,
    targets: Sequence[str] | None = None,
) -> LoraResult:
    """LoRA (peft) on the attention Q and V projections; cross-entropy of the last-position logits on the answer.

    Trains a deep copy; returns it merged (``merge_and_unload``) and wrapped as a Model, so every tool (trace, lens)
    sees the same module paths as in the original. AdamW, gradient clipping, batches drawn with a seeded generator.
    """

    from peft import LoraConfig, get_peft_model

    if len(prompts) != len(answer_ids) or not prompts:
        raise ValueError(f"need as many answers as prompts (got {len(prompts)} prompts, {len(answer_ids)} answers)")
    targets = list(targets or LORA_TARGETS.get(model.arch.family, []))
    if not targets:
        raise ValueError(f"no LoRA targets known for family {model.arch.family!r}; pass targets=[...]")
    start = time.perf_counter()
    torch.manual_seed(seed)
    hf = copy.deepcopy(model.hf)
    peft_model = get_peft_model(
        hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, bias="none")
    )
    n_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    answers = torch.tensor(list(answer_ids), dtype=torch.long)
    # Eval mode: no dropout anywhere (the protocol's LoRA dropout is 0, and base-model dropout, e.g. GPT-2's 0.1,
    # would make the run depend on the device's RNG); gradients flow all the same.
    peft_model.eval()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(prompts), (batch_size,), generator=g)
        enc = model.encode([prompts[i] for i in idx])  # the copy lives on the model's device
        logits = peft_model(**enc, logits_to_keep=1).logits[:, -1].float()
        target = answers[idx]
        target = target.pin_memory().to(logits.device, non_blocking=True) if logits.is_cuda else target
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], clip)
        opt.step()
        losses.append(loss.detach())  # kept on the device: no host round trip per step
    losses = torch.stack(losses).tolist() if losses else []
    merged = peft_model.merge_and_unload()
    merged.eval()
    out = from_hf(merged, model.tokenizer, name=f"{model.name}+lora", source=dict(model.source) | {"lora": True})
    return LoraResult(model=out, losses=losses, n_params=n_params, seconds=time.perf_counter() - start)


def steering_edit(direction: Float[torch.Tensor, " d_model"], alpha: float, positions=-1) -> Edit:
    """A ``trace`` edit adding ``alpha`` times the unit ``direction`` (at the last position by default)."""
    unit = direction / direction.norm()
    return add_direction(unit, alpha, positions=[positions] if isinstance(positions, int) else positions)
