"""Teaching a causal LM the reasoning tasks: chain of thought, direct answering, and Coconut's curriculum.

Research thread 3 asks whether continuous thoughts drift off the token manifold; on a model never trained to think
in them, any drift is what the loop does to foreign inputs. This module trains the models the thread needs
(methods.md §3; Hao et al. 2024, arXiv 2412.06769), as LoRA adapters (peft) on every attention and MLP projection:

- ``cot``: ``prompt + cot_cue + " b=7. c=9." + answer_cue + " 9"`` (:meth:`ReasoningSet.step_texts`), loss on
  everything after the cue;
- ``direct``: ``prompt + answer_cue + " 9"``, the same budget of examples;
- ``coconut``: the multi-stage curriculum. Stage 0 is ``cot`` (a Coconut run starts from a CoT adapter, ``init``);
  stage k (1..K) feeds ``k x c`` continuous thoughts after ``prompt + bot`` (the last position's last hidden state,
  after the final norm, becomes the next input embedding, as the paper's code does), then ``eot``, the remaining
  steps ``k+1..`` as text, the answer cue and the answer. The loss covers the text after ``eot``; it is
  backpropagated through every thought (the thoughts are computed in sequence on a KV cache that keeps the graph).
  Chains with fewer than k steps get ``k x c`` thoughts all the same (the paper's ``pad_latent_to_max``), so the
  last stage always thinks ``K x c`` thoughts, as :func:`workbench.methods.latent.run_latent` feeds them.

The sequences are exactly the ones :func:`~workbench.methods.latent.run_latent` builds at inference (same pieces,
same markers; :func:`example_pieces` checks that joining the pieces does not change the tokenisation), so a trained
model is evaluated, instrumented and compared by the same loop as the base model. An optimiser (AdamW) starts
fresh at every stage, as in the paper. Training data are drawn with seeds disjoint from evaluation's and every
evaluation prompt is removed from the training draws (``exclude``).

Training resumes: every ``checkpoint_every`` steps and at the end of every stage the adapter, the optimiser's state
and the position in the schedule go to a checkpoint folder (safetensors + JSON, no pickles) owned by the run's
spec; a second call with the same spec continues from there and gives the same adapter as an uninterrupted run.

Artifacts (:func:`save_reasoner`): a folder ``adapter_model.safetensors`` + ``adapter_config.json`` (peft's own
layout: ``PeftModel.from_pretrained`` reads it) + ``card.json`` (base weights hash, data, recipe, measured
accuracy, training time; the sha256 of both files, checked by :func:`load_reasoner`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from workbench.core.models import Model, from_hf, load_model
from workbench.data.reasoning import MAX_HOPS, ReasoningSet, make_reasoning_task
from workbench.io.artifact import ArtifactError, ArtifactKind, read_artifact, read_card, register_kind, write_artifact
from workbench.io.atomic import atomic_write_bytes
from workbench.io.checkpoint import UnitCheckpoint
from workbench.io.owned import FolderOwnershipError, folder_kind
from workbench.io.paths import cache_root, resolve_output_path, safe_segment
from workbench.io.provenance import json_roundtrip, now, package_versions
from workbench.methods.latent import LatentConfig

TRAIN_MODES = ("cot", "direct", "coconut")
KIND = "reasoner"
CARD_FILE = "card.json"
ADAPTER_FILE = "adapter_model.safetensors"  # peft's file names: the folder loads with PeftModel.from_pretrained
ADAPTER_CONFIG_FILE = "adapter_config.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_SEED_OFFSET = 1_000  # training draws use seeds >= this; evaluation sets use seeds below it


class ReasonerError(ArtifactError):
    """A reasoner adapter folder that cannot be used (missing, damaged, or for other weights)."""


@dataclass
class ReasonerConfig:
    """One training run. ``n_train`` examples per stage (``cot`` and ``direct``: one stage; ``coconut``: stages
    1..K, K = ``stages`` or the largest of ``train_hops``), in batches of ``batch_size``."""

    mode: str = "cot"
    task: str = "arithmetic"
    train_hops: tuple[int, ...] = (1, 2, 3)  # each example's hop count is drawn uniformly from these
    n_train: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 10  # linear warm-up steps at the start of every stage
    lora_r: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = LORA_TARGETS
    thoughts_per_step: int = 1  # Coconut's c
    stages: int | None = None  # Coconut's K; None: max(train_hops)
    autocast: bool = True  # bfloat16 autocast for the forward (CPU and CUDA); the adapter and Adam stay float32
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; allowed: {list(TRAIN_MODES)}")
        if self.task not in ("arithmetic", "graph"):
            raise ValueError(f"unknown task {self.task!r}; allowed: ['arithmetic', 'graph']")
        self.train_hops = tuple(self.train_hops)
        if not self.train_hops or any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= MAX_HOPS
                                      for h in self.train_hops):
            raise ValueError(f"train_hops must be ints in 1..{MAX_HOPS}, got {self.train_hops!r}")
        for name in ("n_train", "batch_size", "lora_r", "lora_alpha", "thoughts_per_step", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.stages is not None and (isinstance(self.stages, bool) or not isinstance(self.stages, int)
                                        or not 1 <= self.stages <= MAX_HOPS):
            raise ValueError(f"stages must be None or an int in 1..{MAX_HOPS}, got {self.stages!r}")
        if not self.lr > 0 or not self.clip > 0:
            raise ValueError(f"lr and clip must be > 0, got lr={self.lr!r}, clip={self.clip!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        self.targets = tuple(self.targets)

    @property
    def n_stages(self) -> int:
        """Coconut's K (the number of latent stages); 0 for cot and direct."""
        return 0 if self.mode != "coconut" else (self.stages or max(self.train_hops))

    def stage_list(self) -> list[int]:
        """The stages this run trains: [0] for cot/direct, [1..K] for coconut (stage 0 is its ``init``)."""
        return [0] if self.mode != "coconut" else list(range(1, self.n_stages + 1))

    def latent_config(self, **overrides) -> LatentConfig:
        """How :func:`workbench.methods.latent.run_latent` runs the trained model: ``coconut`` with ``K x c``
        thoughts, ``cot`` / ``direct`` as themselves (``n_steps`` of ``cot`` is set per hop count by the caller)."""
        if self.mode == "coconut":
            return LatentConfig(mode="coconut", n_steps=self.n_stages * self.thoughts_per_step, **overrides)
        if self.mode == "direct":
            return LatentConfig(mode="direct", n_steps=0, **overrides)
        return LatentConfig(mode="cot", **({"n_steps": 1} | overrides))


@dataclass
class Example:
    pre: list[int]  # prompt + marker (tokens)
    n_thoughts: int
    post: list[int]  # eot (coconut) + the remaining steps + answer cue + answer (tokens)
    loss_from: int  # index in ``post`` of the first token the loss covers


def stage_layout(cfg: ReasonerConfig, n_steps: int, stage: int) -> tuple[int, int]:
    """(continuous thoughts, reasoning steps written as text) of an example with ``n_steps`` steps at ``stage``:
    cot ``(0, n)``, direct ``(0, 0)``, coconut stage k ``(k x c, max(n - k, 0))``."""
    if cfg.mode == "direct":
        return 0, 0
    if cfg.mode == "cot" or stage == 0:
        return 0, n_steps
    return stage * cfg.thoughts_per_step, max(n_steps - stage, 0)


def example_pieces(cfg: ReasonerConfig, rs: ReasoningSet, i: int, stage: int, latent: LatentConfig | None = None
                   ) -> tuple[str, int, str, str]:
    """(pre text, thoughts, post text before the answer, answer text) of item ``i`` at ``stage``."""
    latent = latent or LatentConfig()
    n_thoughts, n_text = stage_layout(cfg, len(rs.steps[i]), stage)
    steps = rs.step_texts(i)
    text = "".join(steps[len(steps) - n_text:]) if n_text else ""
    if cfg.mode == "direct":
        return rs.prompts[i], 0, rs.answer_cue, " " + rs.answers[i]
    if cfg.mode == "cot" or stage == 0:
        return rs.prompts[i] + rs.cot_cue, 0, text + rs.answer_cue, " " + rs.answers[i]
    return rs.prompts[i] + latent.bot, n_thoughts, latent.eot + text + rs.answer_cue, " " + rs.answers[i]


def build_examples(tokenizer, cfg: ReasonerConfig, rs: ReasoningSet, stage: int) -> list[Example]:
    """Tokenised examples of ``rs`` at ``stage``. The pieces are tokenised apart (as the loop feeds them); an item
    whose pieces tokenise differently from the joined text would teach a sequence inference never shows: refused."""
    out = []
    for i in range(len(rs)):
        pre, n_thoughts, post, answer = example_pieces(cfg, rs, i, stage)
        ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        pre_ids, post_ids, ans_ids = ids(pre), ids(post), ids(answer)
        if n_thoughts == 0 and ids(pre + post + answer) != pre_ids + post_ids + ans_ids:
            raise ValueError(f"item {i}: {pre + post + answer!r} tokenises differently in pieces; the training "
                             "sequence would differ from what inference feeds")
        if ids(post + answer) != post_ids + ans_ids:
            raise ValueError(f"item {i}: {post + answer!r} tokenises differently in pieces")
        eot_len = len(ids(LatentConfig().eot)) if cfg.mode == "coconut" and stage > 0 else 0
        out.append(Example(pre_ids, n_thoughts, post_ids + ans_ids, loss_from=eot_len))
    return out


def training_set(cfg: ReasonerConfig, stage: int, *, exclude: Sequence[str] = ()) -> ReasoningSet:
    """``n_train`` chains of ``cfg.task`` for ``stage``, hop counts drawn evenly from ``train_hops``, seeded by
    (run seed, stage) above :data:`TRAIN_SEED_OFFSET`, without any prompt of ``exclude`` (the evaluation sets)."""
    banned = set(exclude)
    per = [cfg.n_train // len(cfg.train_hops) + (j < cfg.n_train % len(cfg.train_hops))
           for j in range(len(cfg.train_hops))]
    parts = []
    for j, (hops, n) in enumerate(zip(cfg.train_hops, per)):
        if n == 0:
            continue
        seed = TRAIN_SEED_OFFSET + 100_000 * cfg.seed + 1_000 * stage + j
        rs = make_reasoning_task(cfg.task, 3 * n + 20, n_hops=hops, seed=seed)
        keep = [i for i in range(len(rs)) if rs.prompts[i] not in banned][:n]
        if len(keep) < n:
            raise ValueError(f"only {len(keep)} training chains of {hops} hops outside the evaluation sets; "
                             f"lower n_train ({cfg.n_train}) or evaluate on fewer items")
        parts.append(rs.subset(keep))
    merged = ReasoningSet(cfg.task, [p for r in parts for p in r.prompts], [a for r in parts for a in r.answers],
                          [s for r in parts for s in r.steps], [c for r in parts for c in r.candidates],
                          {"train": True, "seed": cfg.seed, "stage": stage})
    order = torch.randperm(len(merged), generator=torch.Generator().manual_seed(cfg.seed * 7919 + stage))
    return merged.subset(order.tolist())


def chain_tokens(tokenizer, rs: ReasoningSet, skip: int = 0) -> int:
    """Tokens of the written-out reasoning steps after the first ``skip`` (the most over items): how many greedy
    steps a CoT-trained model thinks, or how much text a Coconut stage writes after its thoughts."""
    return max(len(tokenizer("".join(rs.step_texts(i)[skip:]), add_special_tokens=False)["input_ids"])
               if len(rs.steps[i]) > skip else 0 for i in range(len(rs)))


def evaluation_set(task: str, n: int, n_hops: int, *, seed: int = 0) -> ReasoningSet:
    """``n`` distinct chains of ``n_hops`` hops (fewer when fewer exist), seeded below :data:`TRAIN_SEED_OFFSET`."""
    if not 0 <= seed < TRAIN_SEED_OFFSET:
        raise ValueError(f"evaluation seeds lie in 0..{TRAIN_SEED_OFFSET - 1}, got {seed}")
    rs = make_reasoning_task(task, 4 * n, n_hops=n_hops, seed=seed)
    seen, keep = set(), []
    for i, p in enumerate(rs.prompts):
        if p not in seen:
            seen.add(p)
            keep.append(i)
    return rs.subset(keep[:n])


# -- the forward with thoughts ---------------------------------------------------------------------------------------
def _body_and_head(model: Model):
    body = model.arch.layers.rpartition(".")[0]  # the decoder stack that holds the layers (ends with the final norm)
    return model.module(body), model.module(model.arch.unembed)


def sequence_loss(model: Model, batch: Sequence[Example], *, autocast: bool = True) -> torch.Tensor:
    """Mean cross-entropy over the loss tokens of ``batch``: ``pre`` (left-padded), the thoughts (each the previous
    position's last hidden state after the final norm, fed as an input embedding), then ``post`` (right-padded);
    gradients flow through every thought."""
    body, head = _body_and_head(model)
    dev = model.device
    pad = model.tokenizer.pad_token_id or 0
    B = len(batch)
    n_th = {ex.n_thoughts for ex in batch}
    if len(n_th) != 1:
        raise ValueError(f"a batch must share its number of thoughts, got {sorted(n_th)}")
    n_thoughts = n_th.pop()
    P = max(len(ex.pre) for ex in batch)
    T = max(len(ex.post) for ex in batch)
    pre = torch.full((B, P), pad, dtype=torch.long)
    pre_mask = torch.zeros(B, P, dtype=torch.long)
    post = torch.full((B, T), pad, dtype=torch.long)
    post_mask = torch.zeros(B, T, dtype=torch.long)
    target = torch.zeros(B, T, dtype=torch.bool)
    for b, ex in enumerate(batch):
        pre[b, P - len(ex.pre):] = torch.tensor(ex.pre)
        pre_mask[b, P - len(ex.pre):] = 1
        post[b, : len(ex.post)] = torch.tensor(ex.post)
        post_mask[b, : len(ex.post)] = 1
        target[b, ex.loss_from: len(ex.post)] = True
    pre, pre_mask, post, post_mask, target = (t.to(dev) for t in (pre, pre_mask, post, post_mask, target))
    embed = body.get_input_embeddings()
    pos = (pre_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        out = body(inputs_embeds=embed(pre), attention_mask=pre_mask, position_ids=pos, use_cache=True)
        cache, last = out.past_key_values, out.last_hidden_state[:, -1]
        mask = pre_mask
        for _ in range(n_thoughts):
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], 1)
            pos = pos[:, -1:] + 1
            out = body(inputs_embeds=last[:, None].to(embed.weight.dtype), attention_mask=mask, position_ids=pos,
                       past_key_values=cache, use_cache=True)
            cache, last = out.past_key_values, out.last_hidden_state[:, -1]
        mask = torch.cat([mask, post_mask], 1)
        pos = pos[:, -1:] + 1 + torch.arange(T, device=dev)[None]
        out = body(inputs_embeds=embed(post), attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True)
        h = torch.cat([last[:, None], out.last_hidden_state[:, :-1]], 1)  # position t predicts post[t]
        logits = head(h[target]).float()
        if model.arch.logit_softcap:
            logits = torch.tanh(logits / model.arch.logit_softcap) * model.arch.logit_softcap
    return torch.nn.functional.cross_entropy(logits.float(), post[target])


# -- training ------------------------------------------------------------------------------------------------------
@dataclass
class TrainLog:
    stage: int
    step: int
    loss: float
    seconds: float


@dataclass
class ReasonerRun:
    config: dict
    model: Model  # the base with the LoRA layers injected (eval mode)
    peft: torch.nn.Module  # peft's wrapper around model.hf (for the adapter's state)
    log: list[TrainLog] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0  # optimiser steps that came from a checkpoint

    def adapter_state(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The LoRA factors as stored (float16 by default: the shipped adapters are measured as stored)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().to(dtype).contiguous() for k, v in get_peft_model_state_dict(self.peft).items()}


def _wrap(model: Model, cfg: ReasonerConfig, init: dict[str, torch.Tensor] | None) -> Model:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(cfg.seed)
    peft = get_peft_model(model.hf, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                               target_modules=list(cfg.targets), bias="none"))
    if init is not None:
        result = set_peft_model_state_dict(peft, init)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"the init adapter has keys this LoRA does not: {result.unexpected_keys[:3]}")
    peft.eval()  # no dropout anywhere; gradients flow all the same
    return peft  # the LoRA layers live inside model.hf: the Model's module paths stay valid


def _checkpoint(cfg: ReasonerConfig, model: Model, folder: str | Path | None, init_hash: str | None,
                exclude_hash: str) -> UnitCheckpoint | None:
    if folder is None:
        return None
    spec = {"config": asdict(cfg), "weights": model.weights_hash, "init": init_hash, "exclude": exclude_hash}
    return UnitCheckpoint(folder, spec, kind="reasoner-checkpoint")


def save_train_state(store: UnitCheckpoint, name: str, params: dict[str, torch.nn.Parameter], opt, meta: dict) -> None:
    """Parameters and Adam's state as one safetensors file beside the unit ``name``'s JSON (``meta``)."""
    tensors = {f"param.{k}": p.detach().cpu().contiguous() for k, p in params.items()}
    index = {id(p): k for k, p in params.items()}
    for p, st in opt.state.items():
        k = index[id(p)]
        tensors[f"exp_avg.{k}"] = st["exp_avg"].cpu().contiguous()
        tensors[f"exp_avg_sq.{k}"] = st["exp_avg_sq"].cpu().contiguous()
        tensors[f"step.{k}"] = torch.as_tensor(st["step"]).float().reshape(1).cpu()
    atomic_write_bytes(store.path(name, ".safetensors"), save(tensors))
    store.save(name, meta)


def load_train_state(store: UnitCheckpoint, name: str, params: dict[str, torch.nn.Parameter], opt) -> dict | None:
    """Restore what :func:`save_train_state` wrote into ``params`` and ``opt``; the unit's JSON, or None."""
    meta = store.load(name)
    path = store.path(name, ".safetensors")
    if meta is None or not path.is_file():
        return None
    tensors = load_file(str(path))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"].to(p.device))
            if f"exp_avg.{k}" in tensors:
                opt.state[p] = {"step": torch.tensor(float(tensors[f"step.{k}"][0])),
                                "exp_avg": tensors[f"exp_avg.{k}"].to(p.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{k}"].to(p.device)}
    return meta


def train_reasoner(model: Model, cfg: ReasonerConfig, *, init: dict[str, torch.Tensor] | None = None,
                   exclude: Sequence[str] = (), checkpoint: str | Path | None = None, progress: bool = True,
                   max_steps: int | None = None, on_stage: Callable[[int, Model], None] | None = None) -> ReasonerRun:
    """Train ``cfg`` on ``model`` (which is wrapped in place with the LoRA: load a fresh one per run).

    init: a CoT adapter's tensors (Coconut's stage 0; required for ``coconut``). exclude: prompts never trained on.
    checkpoint: a folder to resume from / save to (see the module docstring). max_steps: stop after this many
    optimiser steps in total (a deliberate interruption, for tests). on_stage: called after each stage with the
    stage and the model (e.g. to evaluate Coconut by stage).
    """
    if cfg.mode == "coconut" and init is None:
        raise ValueError("coconut starts from a CoT adapter (stage 0): pass init=<its tensors>, e.g. "
                         "load_reasoner_state(<cot folder>)")
    if cfg.mode != "coconut" and init is not None:
        raise ValueError(f"mode {cfg.mode!r} trains from the base model; init is for coconut")
    init_hash = None if init is None else _tensors_digest(init)
    exclude_hash = _strings_digest(exclude)
    store = _checkpoint(cfg, model, checkpoint, init_hash, exclude_hash)
    peft = _wrap(model, cfg, init)
    wrapped = model
    params = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    steps_per_stage = math.ceil(cfg.n_train / cfg.batch_size)
    stages = cfg.stage_list()
    total = steps_per_stage * len(stages)
    run = ReasonerRun(config=asdict(cfg), model=wrapped, peft=peft)
    start = time.perf_counter()
    done = 0
    bar = tqdm(total=total, desc=f"train {cfg.mode} s{cfg.seed}", unit="step", disable=not progress)
    for stage in stages:
        rs = training_set(cfg, stage, exclude=exclude)
        examples = build_examples(model.tokenizer, cfg, rs, stage)
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
        first = 0
        if store is not None:  # the latest checkpoint of this stage, if any
            latest = None
            for s in range(steps_per_stage, 0, -1):
                meta = store.load(f"stage{stage}-step{s:05d}")
                if meta is not None:
                    latest = s
                    break
            if latest is not None and load_train_state(store, f"stage{stage}-step{latest:05d}", params, opt) is not None:
                first = latest
                run.resumed_from += latest
                run.log += [TrainLog(**r) for r in store.load(f"stage{stage}-step{latest:05d}")["log"]]
        bar.update(first)
        done += first
        g = torch.Generator().manual_seed(cfg.seed * 104_729 + stage)
        orders = [torch.randperm(len(examples), generator=g) for _ in range(math.ceil(
            steps_per_stage * cfg.batch_size / len(examples)) + 1)]
        order = torch.cat(orders)
        for step in range(first, steps_per_stage):
            if max_steps is not None and done >= max_steps:
                bar.close()
                run.seconds = time.perf_counter() - start
                return run
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].tolist()
            for group in opt.param_groups:  # linear warm-up, then constant
                group["lr"] = cfg.lr * min(1.0, (step + 1) / (cfg.warmup + 1))
            loss = sequence_loss(wrapped, [examples[i] for i in idx], autocast=cfg.autocast)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
            opt.step()
            done += 1
            run.log.append(TrainLog(stage, step + 1, float(loss.detach()), time.perf_counter() - start))
            bar.update()
            bar.set_postfix(stage=stage, loss=f"{run.log[-1].loss:.3f}")
            if store is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps_per_stage):
                save_train_state(store, f"stage{stage}-step{step + 1:05d}", params, opt,
                            {"log": [asdict(r) for r in run.log if r.stage == stage]})
        if on_stage is not None:
            on_stage(stage, wrapped)
    bar.close()
    run.seconds = time.perf_counter() - start
    return run


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _strings_digest(strings: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(strings)).encode()).hexdigest()


# -- artifacts -------------------------------------------------------------------------------------------------------
def reasoner_dir(model_name: str, name: str, root: str | Path | None = None) -> Path:
    """``<root>/probes/<model>/reasoning/<name>`` (root None: the checkout's root, as for the tuned lens)."""
    base = resolve_output_path(".") if root is None else Path(root)
    return base / "probes" / safe_segment(model_name) / "reasoning" / safe_segment(name)


def adapter_name(mode: str, seed: int) -> str:
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown training mode {mode!r}; allowed: {list(TRAIN_MODES)}")
    return f"{mode}-s{seed}"


def save_reasoner(run: ReasonerRun, folder: str | Path, *, base_name: str, base_weights_sha256: str,
                  card: dict | None = None, overwrite: bool = False,
                  tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (``tensors``, default ``run.adapter_state()``: float16) in peft's layout with a card
    recording the base weights hash, the recipe and whatever ``card`` adds (the measured accuracy)."""
    cfg = ReasonerConfig(**run.config)
    tensors = run.adapter_state() if tensors is None else tensors
    peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
                "lora_dropout": 0.0, "target_modules": sorted(cfg.targets), "bias": "none",
                "base_model_name_or_path": base_name, "inference_mode": True, "fan_in_fan_out": False}
    out = json_roundtrip({**(card or {}), "base_model": base_name, "base_weights_sha256": base_weights_sha256,
                          "recipe": run.config, "training_seconds": round(run.seconds, 1),
                          "resumed_steps": run.resumed_from, "final_loss": run.log[-1].loss if run.log else None,
                          "versions": package_versions(), "created_at": now()}, strict=False)
    files = {ADAPTER_FILE: save(tensors, metadata={"format": "pt"}),
             ADAPTER_CONFIG_FILE: (json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n").encode()}
    write_artifact(folder, REASONER_KIND, out, files=files, overwrite=overwrite)
    return Path(folder)


def load_reasoner_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(adapter tensors, card) after the card's sha256 checks."""
    folder = Path(folder)
    card = read_artifact(folder, REASONER_KIND, error=ReasonerError)
    return load_file(str(folder / ADAPTER_FILE)), card


def load_reasoner(folder: str | Path, *, model: Model | None = None, device=None) -> Model:
    """The base model with the adapter in ``folder`` merged into its weights, as a :class:`Model` named
    ``<base>+<folder name>``. The base (``model``, loaded fresh when None; it is modified in place) must have
    the weights the card records."""
    tensors, card = load_reasoner_state(folder)
    base = model or load_model(card["base_model"], device=device)
    if base.weights_hash != card["base_weights_sha256"]:
        raise ReasonerError(f"{folder} was trained on weights {card['base_weights_sha256'][:12]}..., not on "
                            f"{base.name}'s {base.weights_hash[:12]}...")
    cfg = read_card(Path(folder) / ADAPTER_CONFIG_FILE, error=ReasonerError)
    return merge_adapter(base, tensors, r=cfg["r"], alpha=cfg["lora_alpha"], targets=cfg["target_modules"],
                         name=f"{base.name}+{Path(folder).name}",
                         source={"adapter": str(folder), "adapter_sha256": card["files"][ADAPTER_FILE]})


def merge_adapter(base: Model, tensors: dict[str, torch.Tensor], *, r: int, alpha: int, targets: Sequence[str],
                  name: str, source: dict | None = None) -> Model:
    """``base`` (modified in place) with the LoRA ``tensors`` merged into its weights, as a new :class:`Model`."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    peft = get_peft_model(base.hf, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                                              bias="none"))
    result = set_peft_model_state_dict(peft, {k: v.float() for k, v in tensors.items()})
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", None):
        raise ReasonerError(f"adapter keys do not fit {base.name} (missing {missing[:2]}, unexpected "
                            f"{list(getattr(result, 'unexpected_keys', []))[:2]})")
    merged = peft.merge_and_unload().eval()
    return from_hf(merged, base.tokenizer, name=name, source=dict(base.source) | dict(source or {}))


def _check(folder: Path) -> None:
    tensors, _ = load_reasoner_state(folder)
    cfg = read_card(folder / ADAPTER_CONFIG_FILE, error=ReasonerError)
    bad = [k for k, t in tensors.items() if "lora_A" in k and t.shape[0] != cfg["r"]]
    if bad:
        raise ReasonerError(f"{folder}: LoRA A factors of rank other than r={cfg['r']}: {bad[:2]}")


REASONER_KIND = register_kind(ArtifactKind(KIND, card_file=CARD_FILE, signature=(ADAPTER_FILE, ADAPTER_CONFIG_FILE),
                                           required=(ADAPTER_FILE, ADAPTER_CONFIG_FILE), check=_check,
                                           label="reasoning adapter"))


def checkpoint_dir(model: Model, name: str, destination: str | Path | None = None) -> Path:
    """Where ``workbench train-reasoner`` keeps a run's resumable state: the user cache, one folder per model,
    adapter name and destination folder (two trainings into different places never share a checkpoint)."""
    where = hashlib.sha256(str(Path(destination or ".").resolve()).encode()).hexdigest()[:10]
    return cache_root() / "reasoner-checkpoints" / safe_segment(model.name) / f"{safe_segment(name)}-{where}"


def remove_checkpoint(folder: str | Path) -> None:
    """Delete a finished run's checkpoint folder, only if it is one this module wrote (owner marker)."""
    folder = Path(folder)
    if folder.is_dir():
        if folder_kind(folder) != "reasoner-checkpoint":
            raise FolderOwnershipError(f"{folder} is not a reasoner checkpoint: not deleting it")
        shutil.rmtree(folder)


__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "CARD_FILE", "LORA_TARGETS", "REASONER_KIND", "TRAIN_MODES", "Example",
    "ReasonerConfig", "ReasonerError", "ReasonerRun", "adapter_name", "build_examples", "checkpoint_dir",
    "chain_tokens", "evaluation_set", "example_pieces", "load_reasoner", "load_reasoner_state", "merge_adapter",
    "reasoner_dir",
    "remove_checkpoint", "save_reasoner",
    "load_train_state", "save_train_state", "sequence_loss", "stage_layout", "train_reasoner", "training_set",
]
