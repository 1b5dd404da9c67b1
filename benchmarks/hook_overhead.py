"""Hook overhead on the default model: workbench trace vs a plain forward, nnsight and TransformerLens's bridge.

Same batch for every variant; variants are interleaved (in a shuffled order) within each repetition (so machine noise hits all alike);
medians are reported. The last line printed is one JSON object:

    capture_all_layers_ratio  workbench, hook_resid_post at every layer, last position / plain forward  (target <= 1.05)
    stop_early_ratio          workbench, layer L/4 with stop=True / plain forward          (target <= (L/4+1)/L + 0.10)
    nnsight_all_layers_ratio  nnsight saving every layer's output at the last position / plain forward
    bridge_all_layers_ratio   TransformerLens bridge run_with_cache(resid_post) / plain forward (its own eager copy)
    bridge_plain_ratio        the bridge's plain forward / plain HF forward

Run: ``python benchmarks/hook_overhead.py [--model smollm2-135m] [--batch 8] [--seq 64] [--reps 15]``.
Never run it while another heavy job shares the CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

import workbench as wb


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=wb.DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-interop", action="store_true", help="skip nnsight and the TransformerLens bridge")
    args = ap.parse_args()

    model = wb.load_model(args.model, device="cpu")
    L = model.n_layers
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.arch.vocab_size - 100, (args.batch, args.seq), generator=g)
    inputs = {"input_ids": ids}  # unpadded, identical for every variant
    all_sites = [f"blocks.{i}.hook_resid_post" for i in range(L)]
    quarter = f"blocks.{L // 4}.hook_resid_post"

    def plain():
        model.hf(**inputs)

    def capture_all():
        with wb.trace(model, all_sites, positions=-1):
            model.hf(**inputs)

    def stop_early():
        with wb.trace(model, [quarter], positions=-1, stop=True):
            model.hf(**inputs)

    variants = {"plain": plain, "capture_all": capture_all, "stop_early": stop_early}

    if not args.no_interop:
        import nnsight
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer

        nn_model = nnsight.TransformersModel(model.hf, tokenizer=model.tokenizer)
        layers = nn_model
        for part in model.arch.layers.split("."):
            layers = getattr(layers, part)

        def nnsight_all():
            with nn_model.trace(ids):
                nnsight.save([layers[i].output[:, -1] for i in range(L)])

        folder = model.source.get("path")
        bridge = TransformerBridge.boot_transformers(
            folder, hf_model=copy.deepcopy(model.hf), tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu"
        )
        names = set(all_sites)

        def bridge_all():
            bridge.run_with_cache(ids, names_filter=lambda n: n in names)

        def bridge_plain():
            bridge(ids)

        variants |= {"nnsight_all": nnsight_all, "bridge_all": bridge_all, "bridge_plain": bridge_plain}

    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        order = list(variants)
        rng = random.Random(0)
        for _ in range(args.reps):
            rng.shuffle(order)  # no variant always runs right after another (allocator/cache order effects)
            for name in order:
                times[name].append(_timed(variants[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain"]
    result = {
        "model": args.model,
        "n_layers": L,
        "batch": args.batch,
        "seq": args.seq,
        "reps": args.reps,
        "torch_threads": torch.get_num_threads(),
        "plain_forward_s": round(base, 5),
        "capture_all_layers_ratio": round(med["capture_all"] / base, 4),
        "stop_early_layer": L // 4,
        "stop_early_ratio": round(med["stop_early"] / base, 4),
        "stop_early_target": round((L // 4 + 1) / L + 0.10, 4),
    }
    if "nnsight_all" in med:
        result |= {
            "nnsight_all_layers_ratio": round(med["nnsight_all"] / base, 4),
            "bridge_all_layers_ratio": round(med["bridge_all"] / base, 4),
            "bridge_plain_ratio": round(med["bridge_plain"] / base, 4),
        }
    result["capture_all_within_target"] = result["capture_all_layers_ratio"] <= 1.05
    result["stop_early_within_target"] = result["stop_early_ratio"] <= result["stop_early_target"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
