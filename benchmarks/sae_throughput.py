"""SAE harvest and training throughput on the default model (tokens per second), measured in one run.

    harvest_tokens_per_s      activation harvest of the middle-layer site from the sharegpt-en corpus (the forward
                              stops at the site), batch 16 x 128
    plain_forward_tokens_per_s the same windows through the full model with no hook (reference)
    train_tokens_per_s        sae-lens SAETrainer steps of a TopK SAE (16x, k=32, batch 2048) on stored activations
    train_8x_tokens_per_s     the same for 8x (the shipped SAEs)
    minutes_for_2M_train      2,000,000 training tokens at the measured 16x rate

Run: ``python benchmarks/sae_throughput.py [--tokens 16384] [--steps 8]``. Never run it while another heavy job
shares the CPU. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import workbench as wb
from workbench.data.corpus import load_corpus
from workbench.methods.sae.train import SAETrainConfig, train_sae
from workbench.studies.sae_features.study import MIDDLE_SITE
from workbench.core.store import harvest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    model = wb.load_model(args.model)
    corpus = load_corpus("sharegpt-en", max_documents=2000)
    with tempfile.TemporaryDirectory() as tmp:
        harvest(model, corpus, MIDDLE_SITE, f"{tmp}/warm", batch_size=16, context_length=128, max_tokens=2048,
                progress=False)
        t = time.perf_counter()
        store = harvest(model, corpus, MIDDLE_SITE, f"{tmp}/acts", batch_size=16, context_length=128,
                        max_tokens=args.tokens, shard_tokens=args.tokens // 4, progress=False)
        harvest_s = time.perf_counter() - t
        ids = torch.randint(100, 1000, (16, 128))
        with torch.no_grad():
            model.hf(input_ids=ids)
            t = time.perf_counter()
            for _ in range(max(1, args.tokens // 2048)):
                model.hf(input_ids=ids)
            plain_s = (time.perf_counter() - t) / max(1, args.tokens // 2048)
        rates = {}
        for expansion in (16, 8):
            cfg = SAETrainConfig(expansion=expansion, k=32, batch_size=2048, total_tokens=2048 * args.steps,
                                 holdout_shards=1, n_batches_for_norm_estimate=2)
            result = train_sae(store, MIDDLE_SITE, cfg)
            rates[expansion] = result.metrics["train_tokens_per_second"]
    out = {
        "model": model.name, "site": MIDDLE_SITE, "threads": torch.get_num_threads(),
        "harvest_tokens_per_s": args.tokens / harvest_s, "plain_forward_tokens_per_s": 2048 / plain_s,
        "train_tokens_per_s": rates[16], "train_8x_tokens_per_s": rates[8],
        "minutes_for_2M_train": 2_000_000 / rates[16] / 60,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
