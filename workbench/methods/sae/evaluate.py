"""Evaluating an SAE: reconstruction metrics on activations, and FVU / L0 / dead and dense latents / CE loss
recovered on live forwards over fresh corpus windows.

    metrics = evaluate_sae(model, handle, load_corpus("sharegpt-en"), n_tokens=32_768, skip_documents=20_000)
    data = core_data(model, site, corpus)             # shared by every SAE of a site: clean + zero-ablated forwards
    metrics = core_metrics(model, handle, data)        # one spliced forward per batch

The windows are :func:`workbench.data.corpus.token_windows` (the package's one windowing rule and BOS rule), full
windows only. Position 0 (the BOS attention sink) is left out of FVU / L0 as in training, and by default keeps its
clean residual in the spliced and zero-ablated forwards (``first_position=1``). The pooled FVU can rest on a handful of
massive residuals at position 1 (:func:`first_token_fvu`), so the metrics also give ``fvu_from_pos2`` (positions 2..)
with position 1's and the massive residuals' shares of the variance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from workbench.core.trace import trace
from workbench.data.corpus import Corpus, as_corpus, token_windows, window_bos
from workbench.methods.sae.handle import SAEError, SAEHandle, splice_sae, zero_ablate

DENSE_FREQ = 0.1  # a feature firing on more than 10 % of tokens is "dense" (SAELens dashboards use the same cut)


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


# -- evaluation on live forwards ------------------------------------------------------------------------------------
def corpus_token_windows(model, corpus, n_tokens: int, context_length: int) -> Tensor:
    """At least ``n_tokens`` stream tokens of ``corpus`` as full windows ``[n_windows, context_length]``:
    :func:`workbench.data.corpus.token_windows` with ``last="drop"``, reading documents until the stream holds
    ``ceil(n_tokens / body) * body`` tokens (``body``: stream tokens per window, ``context_length - 1`` with BOS).
    ``corpus``: anything :func:`workbench.data.corpus.as_corpus` takes."""
    tok = model.tokenizer
    corpus = as_corpus(corpus)
    body = context_length - (window_bos(corpus, tok) is not None)
    windows = list(token_windows(corpus, tok, context_length, last="drop",
                                 until_tokens=math.ceil(n_tokens / max(body, 1)) * body))
    if not windows:
        raise SAEError(f"the corpus holds fewer than {body} tokens")
    return torch.tensor(windows, dtype=torch.long)


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


def _skip(corpus, skip_documents: int) -> Corpus:
    """``corpus`` without its first ``skip_documents`` documents (its BOS setting kept)."""
    corpus = as_corpus(corpus)
    if not skip_documents:
        return corpus
    return Corpus(lambda: itertools.islice(corpus.documents(), skip_documents, None), prepend_bos=corpus.prepend_bos)


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


MASSIVE_NORM = 10.0  # a residual whose norm exceeds 10x the median is a "massive activation"


@torch.no_grad()
def first_token_fvu(handle: SAEHandle, data: CoreData) -> dict:
    """FVU without position 1 either (``fvu_from_pos2``: the first stream token after BOS), with what the pooled FVU
    rests on: position 1's share of the total variance, and the number and variance share of massive residuals
    (norm > ``MASSIVE_NORM`` x the median).

    Why: in SmolLM2 a few tokens at position 1 (``<|im_end|>``, ``" Float"``, ``"\\n   "`` right after the BOS, i.e.
    a window that starts at such a token) get residual norms ~100x the median, a second attention sink. Five of them
    carry 56 % of the variance of the training store's 20k-token held-out shard; the SAE reconstructs them to ~0.5 %
    of their variance, so they pull the pooled FVU down by an amount that depends on how many a sample happens to
    hold (0.093 on that shard, 0.052 on fresh text; both ~0.20 without them)."""
    n_windows, ctx = data.ids.shape
    pos = torch.arange(1, ctx).repeat(n_windows)  # the position of each row of data.acts
    x = data.acts.double()
    dev = (x - x.mean(0)).pow(2).sum(1)
    total = float(dev.sum())
    norm = data.acts.norm(dim=1)
    massive = norm > MASSIVE_NORM * norm.median()
    share = (lambda m: float(dev[m].sum()) / total if total > 0 else float("nan"))
    out = {"pos1_var_share": share(pos == 1), "n_massive": int(massive.sum()), "massive_var_share": share(massive)}
    keep = pos >= 2
    out["fvu_from_pos2"] = reconstruction_metrics(handle, data.acts[keep])["fvu"] if int(keep.sum()) > 1 \
        else float("nan")
    return out


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
    rec |= first_token_fvu(handle, data)
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
    error_term: bool = True,
    progress: bool = True,
) -> dict:
    """Reconstruction and downstream metrics of ``handle`` on fresh windows of ``corpus`` (BOS + stream tokens).

    Returns FVU, L0, dead / dense counts (position 0 excluded, as in training), and next-token cross-entropy
    (mean over predicted tokens, position 0's prediction included) of the clean model, with the SAE spliced in at
    every position, with the SAE + error term (must equal clean), and with the site zero-ablated, plus
    ``ce_loss_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``. ``skip_documents`` skips the first
    documents (to evaluate on text the training store did not see). ``first_position``: 1 keeps position 0 (the BOS
    attention sink, never trained on) clean in the spliced and zero-ablated forwards; 0 replaces every position.
    ``error_term``: also run the SAE + error forward (a check that costs one forward per batch). ``progress``: a tqdm
    bar over the windows. :func:`core_data` + :func:`core_metrics`, for one SAE. ``fvu_from_pos2`` leaves position 1
    out of the FVU as well (see :func:`first_token_fvu`: the pooled FVU can rest on a few massive residuals there).
    """
    data = core_data(model, handle.site, corpus, n_tokens=n_tokens, context_length=context_length,
                     batch_size=batch_size, skip_documents=skip_documents, first_position=first_position,
                     progress=progress)
    return core_metrics(model, handle, data, error_term=error_term, progress=progress)
