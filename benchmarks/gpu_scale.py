"""Scale benchmark: the hook core, the logit lens and the harvest against the model's own forward, in one run.

    python benchmarks/gpu_scale.py --shape 1b            # random-init Llama of the 1B shape, bf16, 8 x 1024 (GPU)
    python benchmarks/gpu_scale.py --shape 8b            # the 8B shape (needs ~20 GiB of device memory)
    python benchmarks/gpu_scale.py --shape tiny          # a few seconds on CPU: CI runs this one
    python benchmarks/gpu_scale.py --model smollm2-135m --batch 8 --seq 96   # a registry model (real weights)

Weights are random (real ones of these sizes cannot travel to a GPU machine here); the timings depend only on the
shapes. Each variant runs ``--reps`` times, interleaved in a shuffled order (machine noise hits all alike), after a
warm-up; medians are reported, with ``torch.cuda.synchronize()`` around every timing on a GPU. The last line printed
is one JSON object:

    plain_s                    forward with the full head (logits of every position)
    body_s                     forward with logits_to_keep=1 (what a harvest or a stopped trace competes with)
    trace_all_ratio            trace of hook_resid_post at every layer, every position / plain   (issue: ~1.01-1.05)
    stop_early_ratio           trace of layer 4 with stop=True / plain
    nnsight_all_ratio          nnsight saving every layer's output / plain (absent when nnsight is not installed)
    lens_last_ratio            read_lens + to_frame, all layers x last position / plain      (target <= 1.3)
    lens_all_s, head_all_s     read_lens + to_frame, all layers x all positions (top-5 + one target), and the same
                               (L+1) x tokens rows through final norm + unembedding + top-5 alone
    lens_all_ratio             lens_all_s / head_all_s                                        (target <= 1.5)
    lens_frame_s               the to_frame part of lens_all_s
    harvest_tok_s, plain_tok_s harvest of one site (the last layer's resid_post, float32 store) and the plain forward
                               of the same batches, tokens per second
    harvest_ratio              harvest_tok_s / plain_tok_s                                    (target >= 0.8 on GPU)
    harvest_peak_extra_shards  the harvest's peak host memory (RSS sampled every 5 ms) above the peak of forwards of
                               the same batches without the head, in shards (target <= 2); measured first, before
                               the other variants grow the heap
    last_pos_mem_ratio         extra memory of trace(positions=-1) over all layers / of all positions (target <= 0.05):
                               peak CUDA allocation on a GPU, the captures' storage bytes on CPU
    weights_hash_s             Model.weights_hash of the fresh random model (tensor hashing, first time)
    study_s                    with --study full|smoke: the counting study (default protocol, or its smoke size) on a
                               random model of the default model's shape, with its phase times

Never run it while another heavy job shares the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=4096),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000),
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
}
DEFAULT_BATCH = {"tiny": (2, 64), "small": (4, 128), "smollm2": (8, 96), "1b": (8, 1024), "8b": (8, 1024)}


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.core.models import from_hf
    from workbench.testing.tiny import byte_tokenizer

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(cfg).to(dtype)
    return from_hf(hf, byte_tokenizer(), name=f"random-llama-{shape}")


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


class RssPeak:
    """Peak resident memory of this process above its level at entry, sampled every 5 ms on a thread."""

    def __enter__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.base


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--model", default=None, help="a registry model instead of a random shape")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--harvest-batches", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--study", choices=("full", "smoke"), default=None,
                    help="also time the counting study on a random model of the default model's shape: the default "
                         "protocol (full) or its smoke configuration")
    args = ap.parse_args(argv)
    if (args.shape is None) == (args.model is None):
        ap.error("give --shape or --model")

    import workbench as wb
    from workbench.core.store import harvest
    from workbench.data.corpus import Corpus

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.model:
        model = wb.load_model(args.model, device=str(device), dtype=str(dtype).removeprefix("torch."))
        B, T = args.batch or 8, args.seq or 96
    else:
        model = random_model(args.shape, device, dtype)
        B, T = args.batch or DEFAULT_BATCH[args.shape][0], args.seq or DEFAULT_BATCH[args.shape][1]
    L, V = model.n_layers, model.arch.vocab_size
    timer = Timer(device)
    t0 = time.perf_counter()
    weights_hash_s = (model.weights_hash, time.perf_counter() - t0)[1]

    def measure_harvest() -> dict:
        """Run first, on a fresh process heap: RSS growth is then the harvest's own buffers."""
        n_batches = args.harvest_batches
        words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
        rng_w = random.Random(1)
        docs = [" ".join(rng_w.choices(words, k=400)) for _ in range(2 * (n_batches + 1) * B * T // 300 + 8)]
        corpus = Corpus(docs)
        site = f"blocks.{L - 1}.hook_resid_post"
        shard_tokens = max(B * T * 2, 4096)
        from workbench.core.store import _pad_left
        from workbench.data.corpus import token_windows

        tok = model.tokenizer
        windows = token_windows(corpus, tok, T)
        batches = [_pad_left([next(windows) for _ in range(B)], tok.pad_token_id, device) for _ in range(n_batches)]
        n_tok = n_batches * B * T

        def plain_batches():
            for b in batches:
                model.hf(**b)

        with torch.inference_mode():
            plain_batches()  # warm-up
            plain_s = timer(plain_batches)
            with RssPeak() as rss_body:  # the memory a harvest competes with: the forward without the head
                for b in batches:
                    model.hf(**b, logits_to_keep=1)
        with tempfile.TemporaryDirectory() as tmp:
            harvest(model, corpus, site, Path(tmp) / "warm", batch_size=B, context_length=T, max_tokens=B * T,
                    progress=False, shard_tokens=shard_tokens)
            with RssPeak() as rss:
                start = time.perf_counter()
                store = harvest(model, corpus, site, Path(tmp) / "h", batch_size=B, context_length=T, max_tokens=n_tok,
                                progress=False, shard_tokens=shard_tokens)
                harvest_s = time.perf_counter() - start
            assert store.n_tokens == n_tok, (store.n_tokens, n_tok)
            # a shard holds whole batches: up to shard_tokens + one batch; count in the largest one written
            shard_bytes = max(sh["n_tokens"] for sh in store.shards) * model.d_model * 4
        # above what forwards of the same batches without the head peaked at (on CPU activations are host memory)
        extra = max(rss.peak - max(rss_body.peak, rss.base), 0)

        return {"harvest_tok_s": round(n_tok / harvest_s), "plain_tok_s": round(n_tok / plain_s),
                "harvest_ratio": round(plain_s / harvest_s, 3), "harvest_peak_extra_bytes": extra,
                "harvest_peak_extra_shards": round(extra / shard_bytes, 2), "shard_bytes": shard_bytes}

    harvest_result = measure_harvest()

    g = torch.Generator().manual_seed(0)
    hi = min(V, 256) if model.name.startswith("random") else V - 100  # byte tokenizer: ids it can name
    ids = torch.randint(3, hi, (B, T), generator=g)
    enc = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    all_sites = [f"blocks.{i}.hook_resid_post" for i in range(L)]
    early = f"blocks.{min(4, L - 1)}.hook_resid_post"
    target = [int(ids[0, 0])]
    frame_s: list[float] = []

    def plain():
        model.hf(**enc)

    def body():
        model.hf(**enc, logits_to_keep=1)

    def trace_all():
        with wb.trace(model, all_sites):
            model.hf(**enc, logits_to_keep=1)

    def stop_early():
        with wb.trace(model, [early], stop=True):
            model.hf(**enc)

    def lens_last():
        wb.read_lens(model, inputs=enc, positions=-1, top_k=5, targets=target).to_frame()

    def lens_all():
        res = wb.read_lens(model, inputs=enc, positions="all", top_k=5, targets=target)
        frame_s.append(timer(res.to_frame))

    with torch.inference_mode():
        out = model.hf(**enc, output_hidden_states=True, logits_to_keep=1)
        H = torch.cat([h.reshape(-1, h.shape[-1]) for h in out.hidden_states[:-1]]
                      + [out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1])])
        del out
    from workbench.methods.lens import _budget_rows

    rows = _budget_rows(model, V, None, model.head_device)

    def head_all():  # the lens' own arithmetic: (L+1) x tokens rows through norm + head, top-5
        for s in range(0, H.shape[0], rows):
            # the last hidden state is already normed in HF's output; the norm costs the same either way
            logits = model.lens_logits(H[s : s + rows]).float()
            logits.topk(5, dim=-1)
            torch.logsumexp(logits, dim=-1)

    variants = {"plain": plain, "body": body, "trace_all": trace_all, "stop_early": stop_early,
                "lens_last": lens_last, "lens_all": lens_all, "head_all": head_all}
    nnsight_missing = None
    try:
        import nnsight

        nn_model = nnsight.NNsight(model.hf)
        layers = nn_model
        for part in model.arch.layers.split("."):
            layers = getattr(layers, part)

        def nnsight_all():
            with nn_model.trace(**enc, logits_to_keep=1):
                nnsight.save([layers[i].output for i in range(L)])

        variants["nnsight_all"] = nnsight_all
    except ImportError as e:
        nnsight_missing = str(e)

    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn()
        frame_s.clear()
        order, rng = list(variants), random.Random(0)
        for _ in range(args.reps):
            rng.shuffle(order)
            for name in order:
                times[name].append(timer(variants[name]))
    med = {k: statistics.median(v) for k, v in times.items()}
    H = None  # the hidden states of the head-only variant: free them before the memory measurements

    # -- memory of positions=-1 captures against all positions ------------------------------------------------
    def captured_bytes(positions) -> int:
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                with wb.trace(model, all_sites, positions=positions) as tr:
                    model.hf(**enc, logits_to_keep=1)
                peak = torch.cuda.max_memory_allocated(device) - before
                del tr
                return peak
            with wb.trace(model, all_sites, positions=positions) as tr:
                model.hf(**enc, logits_to_keep=1)
            return sum(tr[s].untyped_storage().nbytes() for s in all_sites)

    mem_all, mem_last = captured_bytes(None), captured_bytes(-1)
    if device.type == "cuda":  # extra over the forward's own peak
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model.hf(**enc, logits_to_keep=1)
        fwd_peak = torch.cuda.max_memory_allocated(device) - before
        mem_all, mem_last = max(mem_all - fwd_peak, 1), max(mem_last - fwd_peak, 0)

    result = {
        "model": model.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "n_layers": L, "d_model": model.d_model, "vocab": V, "batch": B, "seq": T,
        "reps": args.reps,
        "plain_s": round(med["plain"], 4), "body_s": round(med["body"], 4),
        "trace_all_ratio": round(med["trace_all"] / med["body"], 3),
        "stop_early_ratio": round(med["stop_early"] / med["plain"], 3),
        "lens_last_ratio": round(med["lens_last"] / med["plain"], 3),
        "lens_all_s": round(med["lens_all"], 4), "head_all_s": round(med["head_all"], 4),
        "lens_all_ratio": round(med["lens_all"] / med["head_all"], 3),
        "lens_frame_s": round(statistics.median(frame_s), 4), "lens_rows": (L + 1) * B * T,
        **harvest_result,
        "last_pos_mem_bytes": int(mem_last), "all_pos_mem_bytes": int(mem_all),
        "last_pos_mem_ratio": round(mem_last / mem_all, 4),
        "mem_measure": "peak CUDA allocation above the forward's" if device.type == "cuda" else "capture storage",
        "weights_hash_s": round(weights_hash_s, 3),
    }
    if "nnsight_all" in med:
        result["nnsight_all_ratio"] = round(med["nnsight_all"] / med["body"], 3)
    else:
        result["nnsight_missing"] = nnsight_missing
    if args.study:
        from workbench.studies.counting_readout.study import CountingConfig, run_counting_study

        study_model = random_model("smollm2", device, torch.float32)
        cfg = CountingConfig(model=study_model.name) if args.study == "full" else CountingConfig.smoke_config(
            model=study_model.name)
        start = time.perf_counter()
        res = run_counting_study(cfg, model=study_model, progress=False)
        result["study_s"] = round(time.perf_counter() - start, 1)
        result["study_phases_s"] = {k: v for k, v in res.timings.items() if isinstance(v, (int, float))}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
