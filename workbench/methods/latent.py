"""Latent reasoning loops on any causal LM, every step instrumented (research thread 3, methods.md).

One loop serves four modes that differ only in what is fed back as the next input:

- ``coconut`` (continuous thought): the last-layer hidden state of the previous position, after the final norm as
  in Hugging Face's last ``hidden_states`` (``hidden="pre_norm"`` feeds it before the norm; ``rescale=True``
  rescales it to the mean input-embedding norm);
- ``soft`` (Soft Thinking): the probability-weighted mixture of input embeddings, p = softmax(z / T) filtered by
  top-k, top-p, min-p (relative to the top probability), the top ``keep_top_n`` kept and renormalised, optionally
  Gumbel-softmax noise; Cold Stop ends the thinking once the mixture's entropy stays below a threshold for
  ``cold_stop_patience`` consecutive steps;
- ``cot`` (discrete chain of thought): the embedding of the greedy token, i.e. ordinary greedy decoding;
- ``direct``: no thinking steps (``n_steps`` must be 0).

Sequence: ``prompt + marker`` (``bot`` for the latent modes, the task's CoT cue for ``cot``), ``n_steps`` thinking
steps with the KV cache, then ``eot`` (latent modes) and the task's answer cue, then greedy decoding of the answer
for ``answer_tokens`` tokens, parsed by the task's rule. Step k (1..n) is the position whose last-layer output
becomes input k; its residual at every layer is captured through :func:`workbench.core.trace.trace` (one trace per
forward, so a loop that raises leaves no hook behind). Prompts are batched (left padding, explicit position ids);
Cold Stop ends items at different steps, so it runs one prompt at a time. Deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from workbench.core.models import Model
from workbench.core.sites import layer_site
from workbench.core.trace import trace
from workbench.data.reasoning import ReasoningSet

MODES = ("coconut", "soft", "cot", "direct")
MAX_STEPS = 64  # more steps than any curriculum uses; bounds the KV cache and the captured [N, steps, L+1, d] tensor


@dataclass
class LatentConfig:
    mode: str = "coconut"
    n_steps: int = 6
    hidden: str = "post_norm"  # coconut: "post_norm" (HF last hidden state) or "pre_norm" (last block output)
    rescale: bool = False  # coconut: scale each thought to the mean input-embedding norm
    temperature: float = 0.6  # soft: Soft Thinking's defaults from here down
    top_k: int = 30
    top_p: float = 0.95
    min_p: float = 0.001  # relative to the top probability
    keep_top_n: int = 10
    gumbel_tau: float | None = None  # e.g. 0.5: Gumbel-softmax noise on the kept weights (the follow-up's fix)
    cold_stop_entropy: float | None = None  # e.g. 0.01 (nats): end thinking when the mixture is this certain ...
    cold_stop_patience: int = 2  # ... for this many consecutive steps
    bot: str = " <bot>"  # markers around the latent span (plain text: untrained models have no special tokens)
    eot: str = " <eot>"
    answer_tokens: int = 10  # room for "The answer is 7" style continuations
    text_tokens: int = 0  # latent modes: greedy text tokens after ``eot`` before the answer cue (a Coconut model at
    # curriculum stage k writes the remaining steps as text); 0: the answer cue follows ``eot`` at once
    seed: int = 0
    batch_size: int = 50  # decoding is bound by reading the weights: big batches cut the number of passes

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: {list(MODES)}")
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or not 0 <= self.n_steps <= MAX_STEPS:
            raise ValueError(f"n_steps must be an int in 0..{MAX_STEPS}, got {self.n_steps!r}")
        if self.mode == "direct" and self.n_steps != 0:
            raise ValueError(f"mode 'direct' answers without thinking: n_steps must be 0, got {self.n_steps}")
        if self.mode != "direct" and self.n_steps == 0:
            raise ValueError(f"mode {self.mode!r} needs n_steps >= 1 (use mode='direct' for none)")
        if self.hidden not in ("post_norm", "pre_norm"):
            raise ValueError(f"hidden must be 'post_norm' or 'pre_norm', got {self.hidden!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must lie in [0, 1), got {self.min_p!r}")
        if isinstance(self.text_tokens, bool) or not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"text_tokens must be an int >= 0, got {self.text_tokens!r}")
        if self.text_tokens and self.mode not in ("coconut", "soft"):
            raise ValueError(f"text_tokens is for the latent modes (coconut, soft), not {self.mode!r}")
        for name in ("top_k", "keep_top_n", "answer_tokens", "batch_size", "cold_stop_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.gumbel_tau is not None and not self.gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be > 0 or None, got {self.gumbel_tau!r}")
        if self.cold_stop_entropy is not None and not self.cold_stop_entropy > 0:
            raise ValueError(f"cold_stop_entropy must be > 0 or None, got {self.cold_stop_entropy!r}")


@dataclass
class LatentRun:
    """Everything one run produced; :mod:`workbench.studies.latent_drift.metrics` turns it into metrics."""

    config: dict
    items: pd.DataFrame  # item, n_latent, answer_text, parsed, gold, correct, thought_text (cot)
    inputs: Float[torch.Tensor, "n steps d"]  # the vector fed in at step k (NaN after a cold stop)
    states: Float[torch.Tensor, "n steps layers d"]  # residual at every layer (0..L) of step k's position
    valid: Bool[torch.Tensor, "n steps"]  # step k ran for this item
    mixture_entropy: Float[torch.Tensor, "n steps"]  # soft: entropy of the fed weights (nats); NaN otherwise
    top_weight: Float[torch.Tensor, "n steps"]  # soft: the largest fed weight (the top token's share); NaN otherwise
    tokens: Int[torch.Tensor, "n steps"]  # cot: the greedy token; soft: the top-weighted token; coconut: -1
    reliance: pd.DataFrame = field(default_factory=pd.DataFrame)  # soft with ``reliance=``: see run_latent

    @property
    def accuracy(self) -> float:
        return float(self.items.correct.mean())


def input_embeddings(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """What the model feeds its first block for token ``ids`` (the embedding module itself: Gemma's sqrt(d) scale
    included)."""
    return model.module(model.arch.embed)(ids.to(model.device))


def embedding_scale(model: Model) -> float:
    """Factor between the embedding module's output and the rows of W_E (sqrt(d_model) for Gemma, 1 otherwise)."""
    ids = torch.arange(min(16, model.W_E.shape[0]), device=model.device)
    with torch.no_grad():
        out = input_embeddings(model, ids).double()
        raw = model.W_E[ids].double()
    return float((out.norm(dim=-1) / raw.norm(dim=-1).clamp_min(1e-30)).median())


def mean_embedding_norm(model: Model) -> float:
    with torch.no_grad():
        return float(model.W_E.detach().double().norm(dim=-1).mean()) * embedding_scale(model)


def soft_weights(
    logits: Float[torch.Tensor, "b vocab"], cfg: LatentConfig, generator: torch.Generator | None = None
) -> tuple[Int[torch.Tensor, "b n"], Float[torch.Tensor, "b n"]]:
    """Soft Thinking's mixture: (token ids [b, n], weights [b, n] summing to 1), n = keep_top_n (zero weights pad)."""
    p = torch.softmax(logits.double() / cfg.temperature, dim=-1)
    k = min(cfg.top_k, p.shape[-1])
    top_p, top_i = p.topk(k, dim=-1)  # sorted, descending
    keep = torch.ones_like(top_p, dtype=torch.bool)
    cum = top_p.cumsum(-1)
    keep &= (cum - top_p) < cfg.top_p  # top-p: the smallest prefix reaching top_p (the first token always stays)
    keep &= top_p >= cfg.min_p * top_p[:, :1]  # min-p relative to the top probability
    keep[:, cfg.keep_top_n :] = False
    n = min(cfg.keep_top_n, k)
    w = torch.where(keep, top_p, torch.zeros_like(top_p))[:, :n]
    ids = top_i[:, :n]
    w = w / w.sum(-1, keepdim=True)
    if cfg.gumbel_tau is not None:
        u = torch.rand(w.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        g = -torch.log(-torch.log(u))
        logw = torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))
        w = torch.softmax((logw + g.to(w.device)) / cfg.gumbel_tau, dim=-1)
    return ids, w


def _entropy(w: torch.Tensor) -> torch.Tensor:
    return -(torch.where(w > 0, w * w.log(), torch.zeros_like(w))).sum(-1)


@torch.no_grad()
def run_latent(model: Model, rs: ReasoningSet, cfg: LatentConfig | None = None, *,
               patch: Mapping[int, torch.Tensor] | None = None, reliance: Sequence[str] = ()) -> LatentRun:
    """Run ``cfg.mode`` for ``cfg.n_steps`` on every item of ``rs``; see the module docstring.

    patch: ``{step index k (0-based): [len(rs), d] inputs}``: at step k every item is fed its row instead of what the
    loop computed (activation patching along the latent axis; later steps follow from the patched input). The
    step's record (``tokens``, ``mixture_entropy``, ``top_weight``) stays the loop's own, from before the patch;
    ``inputs`` holds what was fed.

    reliance (mode ``soft``): variants of :func:`reliance_weights` (``"top1"``, ``"top3"``, ``"drop1"``,
    ``"gumbel0.5"``, ...). At every step each variant's input is fed on a copy of the loop's history (the KV cache
    is cropped back afterwards, so the loop itself is unchanged) and its next-step distribution is compared with the
    loop's: ``LatentRun.reliance`` gets one row per (item, step, variant) with the KL divergence (loop || variant,
    nats), whether the argmax agrees, and ``defined`` (False where the variant leaves no weight, e.g. ``drop1`` on
    a one-token mixture; KL is then NaN).
    """
    cfg = cfg or LatentConfig()
    reliance = list(reliance)
    for v in reliance:
        parse_reliance_variant(v)
    if reliance and cfg.mode != "soft":
        raise ValueError(f"the reliance test perturbs Soft Thinking's mixture: mode must be 'soft', got {cfg.mode!r}")
    if len(rs) == 0:
        raise ValueError("the reasoning set is empty")
    patch = dict(patch or {})
    for k, value in patch.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < cfg.n_steps:
            raise ValueError(f"patch step {k!r} outside 0..{cfg.n_steps - 1} (the run has {cfg.n_steps} steps)")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (len(rs), model.d_model):
            raise ValueError(f"patch[{k}] must be a [{len(rs)}, {model.d_model}] tensor, got "
                             f"{getattr(value, 'shape', type(value).__name__)}")
    bad = [i for i, a in enumerate(rs.answers) if rs.parse(i, a) != a]
    if bad:
        raise ValueError(f"answers of items {bad[:5]} cannot be parsed back by the task's rule "
                         f"(e.g. {rs.answers[bad[0]]!r}); fix the task before running")
    batch = 1 if (cfg.mode == "soft" and cfg.cold_stop_entropy is not None) else cfg.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    alt_generator = torch.Generator().manual_seed(cfg.seed + 1)  # the variants' noise: the loop's stays its own
    reliance_rows = []
    L, S, d = model.n_layers, cfg.n_steps, model.d_model
    n = len(rs)
    inputs = torch.full((n, S, d), math.nan)
    states = torch.full((n, S, L + 1, d), math.nan)
    valid = torch.zeros(n, S, dtype=torch.bool)
    mix_h = torch.full((n, S), math.nan)
    top_w = torch.full((n, S), math.nan)
    tokens = torch.full((n, S), -1, dtype=torch.long)
    scale = mean_embedding_norm(model) if cfg.rescale else None
    marker = {"coconut": cfg.bot, "soft": cfg.bot, "cot": rs.cot_cue, "direct": ""}[cfg.mode]
    closing = (cfg.eot if cfg.mode in ("coconut", "soft") else "") + rs.answer_cue
    suffix_ids = model.tokenizer(closing, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eot_text = cfg.eot if cfg.mode in ("coconut", "soft") else ""
    eot_ids = model.tokenizer(eot_text, add_special_tokens=False, return_tensors="pt")["input_ids"].long()
    cue_ids = model.tokenizer(rs.answer_cue, add_special_tokens=False, return_tensors="pt")["input_ids"]
    sites = [layer_site(layer) for layer in range(L + 1)]
    rows = []
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        enc = model.encode([rs.prompts[i] + marker for i in idx])
        mask, pos = enc["attention_mask"], enc["position_ids"]
        with trace(model, sites, positions=-1) as tr:
            out = model.hf(**enc, use_cache=True)
        cache = out.past_key_values
        h = torch.stack([tr[s] for s in sites], dim=1)  # [B, L+1, d]
        logits = out.logits[:, -1]
        B = len(idx)
        alive = torch.ones(B, dtype=torch.bool)
        low_streak = torch.zeros(B, dtype=torch.long)
        n_latent = torch.zeros(B, dtype=torch.long)
        for k in range(S):
            if not alive.any():
                break
            x, tok, ent, top, mix = _next_input(model, cfg, h, logits, generator, scale)
            alt_logp = {}
            for v in reliance:  # each variant on the loop's history; the cache is cropped back after it
                w_v, defined = reliance_weights(mix[1], v, alt_generator)
                x_v = _mixture(model, mix[0], torch.where(defined[:, None], w_v, mix[1]))
                length = cache.get_seq_length()
                m_v = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
                o_v = model.hf(inputs_embeds=x_v[:, None].to(model.dtype), attention_mask=m_v,
                               position_ids=pos[:, -1:] + 1, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # back to the loop's history (transformers 5: a negative count removes tokens)
                if cache.get_seq_length() != length:
                    raise RuntimeError(f"the KV cache did not return to its {length} positions after a reliance "
                                       f"variant ({cache.get_seq_length()}): this cache type cannot be cropped")
                alt_logp[v] = (torch.log_softmax(o_v.logits[:, -1].double(), -1), defined)
            if k in patch:
                x = patch[k][idx].to(x.device, x.dtype)
            rows_alive = torch.tensor(idx)[alive]
            states[rows_alive, k] = h[alive].float().cpu()
            inputs[rows_alive, k] = x[alive].float().cpu()
            valid[rows_alive, k] = True
            tokens[rows_alive, k] = tok[alive].cpu()
            mix_h[rows_alive, k] = ent[alive].float().cpu()
            top_w[rows_alive, k] = top[alive].float().cpu()
            n_latent += alive.long()
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            pos = pos[:, -1:] + 1
            with trace(model, sites, positions=-1) as tr:
                out = model.hf(inputs_embeds=x[:, None].to(model.dtype), attention_mask=mask, position_ids=pos,
                               past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            h = torch.stack([tr[s] for s in sites], dim=1)
            logits = out.logits[:, -1]
            if alt_logp:
                lp = torch.log_softmax(logits.double(), -1)
                for v, (lq, defined) in alt_logp.items():
                    kl = (lp.exp() * (lp - lq)).sum(-1)
                    agree = lp.argmax(-1) == lq.argmax(-1)
                    for j in torch.nonzero(alive, as_tuple=True)[0].tolist():
                        ok = bool(defined[j])
                        reliance_rows.append({"item": idx[j], "step": k + 1, "variant": v, "defined": ok,
                                              "kl": float(kl[j]) if ok else math.nan,
                                              "argmax_agree": bool(agree[j]) if ok else None})
            if cfg.mode == "soft" and cfg.cold_stop_entropy is not None:
                low_streak = torch.where(ent.cpu() < cfg.cold_stop_entropy, low_streak + 1, 0)
                alive &= low_streak < cfg.cold_stop_patience
        # closing marker + answer cue (or: the marker, text_tokens of greedy text, the cue), then the greedy answer
        segments = ([(suffix_ids, cfg.answer_tokens)] if not cfg.text_tokens else
                    [(eot_ids, cfg.text_tokens), (cue_ids, cfg.answer_tokens)])
        decoded = []
        for seg_ids, n_new in segments:
            ids = seg_ids.expand(B, -1).to(model.device)
            generated = []
            for t in range(n_new + 1):
                T = ids.shape[1]
                if T:
                    mask = torch.cat([mask, torch.ones(B, T, dtype=mask.dtype, device=mask.device)], dim=1)
                    pos = pos[:, -1:] + 1 + torch.arange(T, device=pos.device)[None]
                    out = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                   use_cache=True)
                    cache = out.past_key_values
                if t == n_new:
                    break
                ids = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(ids)
            decoded.append(torch.cat(generated, 1))
        texts = model.tokenizer.batch_decode(decoded[-1], skip_special_tokens=True)
        tails = (model.tokenizer.batch_decode(decoded[0], skip_special_tokens=True) if cfg.text_tokens
                 else [""] * B)
        for j, i in enumerate(idx):
            thought = (model.tokenizer.decode(tokens[i, : int(n_latent[j])].tolist())
                       if cfg.mode == "cot" else "")
            parsed = rs.parse(i, texts[j])
            rows.append({"item": i, "n_latent": int(n_latent[j]), "answer_text": texts[j], "parsed": parsed,
                         "gold": rs.answers[i], "correct": parsed == rs.answers[i], "thought_text": thought,
                         "text_after_thoughts": tails[j]})
    return LatentRun(config=asdict(cfg), items=pd.DataFrame(rows), inputs=inputs, states=states, valid=valid,
                     mixture_entropy=mix_h, top_weight=top_w, tokens=tokens,
                     reliance=pd.DataFrame(reliance_rows, columns=["item", "step", "variant", "defined", "kl",
                                                                   "argmax_agree"]))


def _next_input(model: Model, cfg: LatentConfig, h: torch.Tensor, logits: torch.Tensor, generator, scale):
    """(next input [B, d], token [B], mixture entropy [B], top weight [B]) from the current step's states and
    logits."""
    B = h.shape[0]
    nan = torch.full((B,), math.nan)
    if cfg.mode == "coconut":
        last = h[:, -1]
        x = model.final_norm(last) if cfg.hidden == "post_norm" else last
        if scale is not None:
            x = x * (scale / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)).to(x.dtype)
        return x, torch.full((B,), -1, dtype=torch.long), nan, nan, None
    if cfg.mode == "cot":
        tok = logits.argmax(-1)
        return input_embeddings(model, tok), tok, nan, nan, None
    ids, w = soft_weights(logits.float(), cfg, generator)
    x = _mixture(model, ids, w)
    return (x, ids.gather(1, w.argmax(-1, keepdim=True).to(ids.device))[:, 0], _entropy(w), w.max(-1).values,
            (ids, w))


def _mixture(model: Model, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_j w_j e(ids_j) in float64, cast to the model's dtype: [B, d]."""
    emb = input_embeddings(model, ids).double()  # [B, n, d]
    return (w[..., None].to(emb.device) * emb).sum(1).to(model.dtype)


def parse_reliance_variant(variant: str) -> tuple[str, float]:
    """``"top<j>"`` (keep the top j tokens, renormalised; ``top1`` is the top token's embedding), ``"drop<m>"``
    (remove the top m, renormalise the rest), ``"gumbel<tau>"`` (Gumbel-softmax noise at temperature tau on the
    weights) -> (kind, number)."""
    for kind in ("top", "drop", "gumbel"):
        if isinstance(variant, str) and variant.startswith(kind):
            try:
                value = float(variant[len(kind):])
            except ValueError:
                break
            if value > 0 and (kind == "gumbel" or value == int(value)):
                return kind, value
    raise ValueError(f"unknown reliance variant {variant!r}; allowed: 'top<j>', 'drop<m>' (j, m >= 1 ints), "
                     "'gumbel<tau>' (tau > 0)")


def reliance_weights(w: Float[torch.Tensor, "b n"], variant: str, generator: torch.Generator | None = None
                     ) -> tuple[Float[torch.Tensor, "b n"], Bool[torch.Tensor, " b"]]:
    """Soft Thinking's weights ``w`` (sorted descending, as :func:`soft_weights` returns them) changed by
    ``variant`` (:func:`parse_reliance_variant`), and per row whether any weight is left (``drop`` on a mixture of
    no more than m tokens leaves none: that row's weights are returned unchanged and flagged False)."""
    kind, value = parse_reliance_variant(variant)
    w = w.double()
    if kind == "gumbel":
        u = torch.rand(w.shape, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        logw = torch.where(w > 0, w.log(), torch.full_like(w, -math.inf))
        return torch.softmax((logw - torch.log(-torch.log(u)).to(w.device)) / value, -1), torch.ones(
            w.shape[0], dtype=torch.bool, device=w.device)
    out = w.clone()
    j = int(value)
    if kind == "top":
        out[:, j:] = 0
    else:
        out[:, :j] = 0
    total = out.sum(-1, keepdim=True)
    defined = total[:, 0] > 0
    return torch.where(defined[:, None], out / total.clamp_min(1e-300), w), defined


def run_modes(model: Model, rs: ReasoningSet, modes: Sequence[str], n_steps: int, **overrides) -> dict[str, LatentRun]:
    """One run per mode on the same items (``direct`` always with 0 steps)."""
    return {mode: run_latent(model, rs, LatentConfig(mode=mode, n_steps=0 if mode == "direct" else n_steps,
                                                     **overrides))
            for mode in modes}


