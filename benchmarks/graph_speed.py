"""One attribution graph of a 20-token prompt on the shipped transcoders: time, memory, and how both grow with
the number of feature rows explored, in one run.

For each budget (``--budgets``, default 256 512 1024 2048; 2048 is the default node budget) one graph of the same
prompt is built; its wall time, its backward passes and the peak resident memory above the loaded model (sampled
every 10 ms) are printed, with the seconds per explored row. The hardware reference is the model's own forward at
the graph's batch size (``batch_size`` rows x 20 tokens, no grad): ``backward_per_forward`` is the time of one
backward batch of the graph over it. The last line printed is one JSON object:

    seconds[budget], rows[budget], peak_mb[budget]     per budget
    seconds_per_row_slope, linear_r2                   a line through (rows, seconds): linear in rows explored
    default_seconds, default_peak_mb                   the default budget (target: <= 120 s on 2 cores)
    forward_batch_s, backward_per_forward              one plain forward of 64 x 20 tokens; a graph batch / it

Run: ``python benchmarks/graph_speed.py [--model smollm2-135m] [--transcoders saes/smollm2-135m/transcoders/topk-4x-k32]``.
Never run it while another heavy job shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np
import psutil
import torch

import workbench as wb
from workbench.methods.circuits.attribution import AttributionConfig, attribute
from workbench.methods.circuits.transcoder import load_transcoders

PROMPT = "When Mary and John went to the store, John gave a drink to her because she was thirsty and"


class PeakRSS:
    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(os.getpid()), 0, threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    @property
    def mb(self) -> float:
        return max(0, self.peak - self.base) / 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--transcoders", default="saes/smollm2-135m/transcoders/topk-4x-k32")
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--tokens", type=int, default=20)
    args = ap.parse_args(argv)
    model = wb.load_model(args.model)
    tcs = load_transcoders(args.transcoders, model=model)
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"][:, : args.tokens]
    assert ids.shape[1] == args.tokens, f"the prompt has {ids.shape[1]} tokens"
    B = AttributionConfig().batch_size
    with torch.no_grad():
        model.hf(input_ids=ids.expand(B, -1))
        t = time.perf_counter()
        for _ in range(3):
            model.hf(input_ids=ids.expand(B, -1))
        fwd = (time.perf_counter() - t) / 3
    out = {"seconds": {}, "rows": {}, "peak_mb": {}, "backward_batches": {}, "n_active": None, "tokens": args.tokens,
           "torch_threads": torch.get_num_threads()}
    for budget in args.budgets:
        with PeakRSS() as mem:
            g = attribute(model, ids, tcs, cfg=AttributionConfig(max_feature_nodes=budget), progress=False)
        g.check_exact()
        out["seconds"][budget], out["rows"][budget] = g.seconds, g.stats["n_rows"]
        out["peak_mb"][budget], out["backward_batches"][budget] = mem.mb, g.stats["n_backward"]
        out["n_active"] = g.n_active
        print(f"budget {budget}: {g.stats['n_rows']} rows, {g.stats['n_backward']} backward batches, "
              f"{g.seconds:.1f} s, peak +{mem.mb:.0f} MB, {g.n_active} active features", flush=True)
    rows = np.array([out["rows"][b] for b in args.budgets], dtype=float)
    secs = np.array([out["seconds"][b] for b in args.budgets])
    slope, icpt = np.polyfit(rows, secs, 1)
    pred = slope * rows + icpt
    out["seconds_per_row_slope"], out["intercept_s"] = float(slope), float(icpt)
    out["linear_r2"] = float(1 - ((secs - pred) ** 2).sum() / ((secs - secs.mean()) ** 2).sum())
    default = AttributionConfig().max_feature_nodes
    if default in out["seconds"]:
        out["default_seconds"], out["default_peak_mb"] = out["seconds"][default], out["peak_mb"][default]
    out["forward_batch_s"] = fwd
    last = args.budgets[-1]
    out["backward_per_forward"] = (out["seconds"][last] / out["backward_batches"][last]) / fwd
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
