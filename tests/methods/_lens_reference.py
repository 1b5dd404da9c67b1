"""The logit lens as it was first written: one Python loop over rows, kept as an independent reference that the
vectorised :class:`workbench.methods.lens.LensResult` must reproduce exactly (ids, ranks) and to float precision."""

import pandas as pd
import torch

from workbench.core.sites import layer_site
from workbench.core.trace import trace
from workbench.methods.lens import LENS_COLUMNS, _positions_index, _target_ids


@torch.no_grad()
def reference_logit_lens(model, prompts, *, layers, positions=-1, top_k=5, targets=None, batch_size=8, layer_chunk=4,
                         lens=None):
    layer_list = list(layers)
    n_prompts = len(prompts)
    target_ids = _target_ids(model, targets, n_prompts)
    sites = [layer_site(l) for l in layer_list]
    tok = model.tokenizer
    rows: list[dict] = []

    for start in range(0, n_prompts, batch_size):
        enc = model.encode(prompts[start : start + batch_size])
        B = int(enc["input_ids"].shape[0])
        lengths = enc["attention_mask"].sum(-1).cpu()
        index, pos = _positions_index(positions, lengths, enc["input_ids"].shape[1])
        with trace(model, sites, positions=index, stop=True) as tr:
            model.hf(**enc)
        ids_cpu = enc["input_ids"].cpu()
        for c in range(0, len(layer_list), layer_chunk):
            group = layer_list[c : c + layer_chunk]
            h = torch.stack([tr[layer_site(l)] for l in group])  # [C, B, k, d]
            if lens is None:
                logits = model.lens_logits(h).float()  # [C, B, k, V]
            else:
                logits = torch.stack([lens.logits(model, h[ci], layer).float() for ci, layer in enumerate(group)])
            logprobs = torch.log_softmax(logits, dim=-1)
            if top_k:
                top_logit, top_id = logits.topk(top_k, dim=-1)
            for ci, layer in enumerate(group):
                for b in range(B):
                    for j in range(index.shape[1]):
                        p = int(pos[b, j])
                        if p < 0:
                            continue
                        base = {
                            "prompt_idx": start + b,
                            "layer": layer,
                            "position": p,
                            "input_token": tok.convert_ids_to_tokens(int(ids_cpu[b, index[b, j]])),
                        }
                        lg = logits[ci, b, j]
                        if top_k:
                            for r in range(top_k):
                                t_id = int(top_id[ci, b, j, r])
                                rows.append(base | {
                                    "kind": "top", "k": r + 1, "token_id": t_id,
                                    "token": tok.convert_ids_to_tokens(t_id),
                                    "prob": float(logprobs[ci, b, j, t_id].exp()),
                                    "logit": float(top_logit[ci, b, j, r]),
                                    "rank": int((lg > lg[t_id]).sum()) + 1,
                                })
                        if target_ids is not None:
                            for t_id in target_ids[start + b]:
                                rows.append(base | {
                                    "kind": "target", "k": None, "token_id": t_id,
                                    "token": tok.convert_ids_to_tokens(t_id),
                                    "prob": float(logprobs[ci, b, j, t_id].exp()),
                                    "logit": float(lg[t_id]),
                                    "rank": int((lg > lg[t_id]).sum()) + 1,
                                })
    frame = pd.DataFrame(rows, columns=LENS_COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    frame["kind"] = pd.Categorical(frame["kind"], categories=["top", "target"], ordered=True)
    # One order whatever the batching/chunking: prompt, layer, position, top-k rows (by k) then targets.
    frame = frame.sort_values(["prompt_idx", "layer", "position", "kind", "k"], kind="stable", na_position="last")
    return frame.reset_index(drop=True)
