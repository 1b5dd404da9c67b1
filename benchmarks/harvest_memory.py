"""Peak memory of an activation harvest: it must not grow with the corpus (target: model size + 1 GiB).

    python benchmarks/harvest_memory.py                       # 200k tokens of a synthetic corpus, smollm2-135m
    python benchmarks/harvest_memory.py --tokens 5000 --corpus my.txt --site blocks.3.hook_resid_post

Harvests ``--tokens`` tokens at one site (default: the middle layer's ``hook_resid_post``) of the default model into a
temporary folder (deleted afterwards), then prints one JSON object as the LAST line of stdout: model_size_bytes
(parameter bytes), peak_rss_bytes (``ru_maxrss`` of this process, so model loading is included),
rss_over_model_bytes, tokens, tokens_per_second, within_target (peak RSS <= model size + 1 GiB) and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 1 << 30
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can who out up some time them "
    "into only could new about two other then these first any may after over most also made did many before must "
    "through back years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take three model layer token "
    "residual stream attention head neuron feature probe sparse autoencoder activation corpus window shard"
).split()


def synthetic_documents(n_docs: int, seed: int = 0):
    """A function returning a fresh iterator of ``n_docs`` seeded pseudo-English documents (streamed, never stored)."""

    def documents():
        rng = random.Random(seed)
        for _ in range(n_docs):
            n = rng.randint(20, 120)
            words = rng.choices(WORDS, k=n)
            yield " ".join(words).capitalize() + "."

    return documents


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens to harvest (default 200000)")
    parser.add_argument("--model", default=None, help="registry name or folder (default: workbench.DEFAULT_MODEL)")
    parser.add_argument("--site", default=None, help="site (default: blocks.{n_layers // 2}.hook_resid_post)")
    parser.add_argument("--corpus", default=None, help="a local .txt file (default: a synthetic corpus)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--shard-tokens", type=int, default=65536)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens must be >= 1")

    import torch

    import workbench
    from workbench.data.corpus import Corpus
    from workbench.core.store import harvest

    t0 = time.perf_counter()
    model = workbench.load_model(args.model or workbench.DEFAULT_MODEL, device=args.device)
    load_s = time.perf_counter() - t0
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.hf.parameters()}  # tied weights once
    model_bytes = sum(params.values())
    rss_after_load = rss_now()
    site = args.site or f"blocks.{model.n_layers // 2}.hook_resid_post"
    if args.corpus:
        corpus = Corpus(Path(args.corpus))
    else:
        corpus = Corpus(synthetic_documents(args.tokens // 40 + 64))  # ~70 words (>= 70 tokens) a document

    with tempfile.TemporaryDirectory(prefix="harvest_memory_") as tmp:
        t1 = time.perf_counter()
        store = harvest(
            model, corpus, site, Path(tmp) / "store", batch_size=args.batch_size, context_length=args.context_length,
            shard_tokens=args.shard_tokens, max_tokens=args.tokens, progress=sys.stderr.isatty(),
        )
        seconds = time.perf_counter() - t1
        n_tokens, n_shards = store.n_tokens, len(store.shards)
        store_bytes = sum(s["bytes"] for s in store.shards)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {
        "model": model.name,
        "site": site,
        "device": str(model.device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "context_length": args.context_length,
        "shard_tokens": args.shard_tokens,
        "corpus": args.corpus or "synthetic",
        "tokens": n_tokens,
        "shards": n_shards,
        "store_bytes": store_bytes,
        "load_seconds": round(load_s, 3),
        "harvest_seconds": round(seconds, 3),
        "tokens_per_second": round(n_tokens / seconds, 1),
        "model_size_bytes": model_bytes,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak,
        "rss_over_model_bytes": peak - model_bytes,
        "target_bytes": model_bytes + GIB,
        "within_target": peak <= model_bytes + GIB,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
