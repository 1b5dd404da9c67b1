"""What the counting study's evaluation saves by sharing one prompt pass, and the tiled logit lens, in one run.

On one task's held-out prompts (default: character counting, 200 prompts, seed 11) three evaluations are run the
way the study runs them -- baseline, a swapped head (digit-row repair with a random delta), steering at a middle
layer -- first each on its own (each runs the prompts), then all three from one shared ``PrefixCache``. The lens
is timed against the direct computation (full [rows, vocab] logits from the head module, chunked by rows) on the
same residuals, and its ranks must agree. The last line printed is one JSON object:

    separate_s, shared_s, shared_ratio      three evaluations each with its own prompt pass / sharing one
    lens_direct_s, lens_tiled_s, lens_ratio  gold rank + probability at every layer: tiled / direct
    lens_rank_mismatches                     rows whose rank differs between the two (expected 0)
    answers_equal                            the shared and separate evaluations give the same answers

Run: ``python benchmarks/counting_eval.py [--model smollm2-135m] [--task character] [--n 200]``.
Never run it while another heavy job shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import workbench as wb
from workbench.studies.counting_readout.study import CountingConfig, _make_sets
from workbench.methods.activations import PrefixCache
from workbench.studies.counting_readout.evaluation import _gold_rank_prob, evaluate_answers
from workbench.studies.counting_readout.interventions import DigitRowHead, steering_edit
from workbench.core.sites import layer_site
from workbench.core.swap import swap_modules


def _direct_rank_prob(model, H, gold_ids, chunk=1 << 26):
    """The plain computation: full logits from the head module for a block of rows, compared with the gold's."""
    rows = max(1, chunk // model.W_U.shape[0])
    ranks, probs = [], []
    for s in range(0, H.shape[0], rows):
        logits = model.lens_logits(H[s : s + rows]).float()
        gold = logits.gather(1, gold_ids[s : s + rows, None])
        ranks.append((logits > gold).sum(-1) + 1)
        probs.append((gold[:, 0] - torch.logsumexp(logits, -1)).exp())
    return torch.cat(ranks), torch.cat(probs)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=wb.DEFAULT_MODEL)
    ap.add_argument("--task", default="character")
    ap.add_argument("--n", type=int, default=200, help="held-out prompts")
    args = ap.parse_args()

    model = wb.load_model(args.model)
    cfg = CountingConfig(model=args.model, tasks=(args.task,), n_train=50, n_test=args.n, n_lora_train=50)
    _, _, test, digit_ids = _make_sets(model, args.task, 11, cfg)
    torch.manual_seed(0)
    head = DigitRowHead(model.module(model.arch.unembed), digit_ids)
    head.delta.normal_(0, 0.05)
    direction = torch.randn(model.d_model)
    steer = {layer_site(model.n_layers // 2): steering_edit(direction, 5.0)}

    def three(cache):
        out = [evaluate_answers(model, test.prompts, test.counts, digit_ids, cache=cache)]
        with swap_modules(model, {model.arch.unembed: head}):
            out.append(evaluate_answers(model, test.prompts, test.counts, digit_ids, cache=cache))
        out.append(evaluate_answers(model, test.prompts, test.counts, digit_ids, edits=steer, cache=cache))
        return out

    t = time.perf_counter()
    separate = three(None)
    separate_s = time.perf_counter() - t
    t = time.perf_counter()
    shared = three(PrefixCache.build(model, test.prompts))
    shared_s = time.perf_counter() - t
    same = all(a.items.drop(columns="gen_text").equals(b.items.drop(columns="gen_text"))
               for a, b in zip(separate, shared))

    cache = PrefixCache.build(model, test.prompts)
    H = torch.cat([b.residuals(cache.layers) for b in cache.batches], dim=1).flatten(0, 1)
    gold = torch.tensor(digit_ids)[torch.randint(0, 9, (H.shape[0],))]
    t = time.perf_counter()
    r0, p0 = _direct_rank_prob(model, H, gold)
    direct_s = time.perf_counter() - t
    t = time.perf_counter()
    r1, p1 = _gold_rank_prob(model, H, gold)
    tiled_s = time.perf_counter() - t

    result = {
        "model": model.name, "task": args.task, "prompts": len(test), "lens_rows": int(H.shape[0]),
        "separate_s": round(separate_s, 2), "shared_s": round(shared_s, 2),
        "shared_ratio": round(shared_s / separate_s, 3),
        "lens_direct_s": round(direct_s, 2), "lens_tiled_s": round(tiled_s, 2),
        "lens_ratio": round(tiled_s / direct_s, 3),
        "lens_rank_mismatches": int((r0 != r1).sum()),
        "lens_prob_max_abs_diff": float((p0 - p1).abs().max()),
        "answers_equal": bool(same),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
