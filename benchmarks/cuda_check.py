"""CUDA check: the core paths on a GPU agree with the same paths on CPU (tiny random models, no downloads).

    python benchmarks/cuda_check.py        # prints one line per check and exits 1 on any failure

Run on a machine with a CUDA device (CI has none). Each check builds a tiny model of a family, runs it on CPU and
on CUDA, and compares: trace captures against HF ``output_hidden_states``, the logit lens, answer evaluation,
residual features, LoRA training, the latent loops, tuned-lens training and reading, and exact / attribution
patching. Tolerances are those of float32 on different kernels.
"""

from __future__ import annotations

import sys
import time
import traceback

import pandas as pd
import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    import workbench as wb
    from workbench.studies.counting_readout.evaluation import evaluate_answers
    from workbench.studies.counting_readout.interventions import train_lora_qv
    from workbench.methods.latent import LatentConfig, run_latent
    from workbench.core.models import from_hf
    from workbench.methods.probes.features import residual_features
    from workbench.data.reasoning import arithmetic_chains
    from workbench.testing.tiny import tiny_hf, tiny_model

    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    failures = 0
    prompts = ["hello world, this is a test", "hi", "the cat sat on the mat"]

    def to_cuda(m):
        return from_hf(tiny_hf(m.arch.family).to("cuda"), m.tokenizer, name=m.name + "-cuda")

    def check(name, fn):
        nonlocal failures
        t0 = time.perf_counter()
        try:
            fn()
            print(f"ok    {name} ({time.perf_counter() - t0:.1f} s)")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            failures += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")

    for family in ("llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox"):
        cpu = tiny_model(family)
        gpu = to_cuda(cpu)
        assert gpu.device.type == "cuda"

        def captures():
            sites = [wb.layer_site(l) for l in range(gpu.n_layers + 1)]
            enc = gpu.encode(prompts)
            with wb.trace(gpu, sites) as tr, torch.no_grad():
                hs = gpu.hf(**enc, output_hidden_states=True).hidden_states
            for l, s in enumerate(sites[:-1]):
                assert torch.equal(tr[s], hs[l]), f"layer {l}"
            assert wb.active_hooks() == []

        def lens():
            a = wb.logit_lens(cpu, prompts, top_k=3)
            b = wb.logit_lens(gpu, prompts, top_k=3)
            assert (a.token == b.token).mean() > 0.99
            assert (a.prob - b.prob).abs().max() < 1e-4

        def evaluation():
            ids = [cpu.tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 10)]
            a = evaluate_answers(cpu, prompts, [1, 2, 3], ids, gen_tokens=3)
            b = evaluate_answers(gpu, prompts, [1, 2, 3], ids, gen_tokens=3)
            assert a.items.gen_text.tolist() == b.items.gen_text.tolist()
            assert (a.ranks["rank"] == b.ranks["rank"]).mean() > 0.99

        def features():
            a = residual_features(cpu, prompts, None)
            b = residual_features(gpu, prompts, None)
            for l in a:
                torch.testing.assert_close(a[l], b[l], rtol=1e-4, atol=1e-5)

        def lora():
            ids = [cpu.tokenizer.convert_tokens_to_ids(str(d)) for d in (1, 2, 3)]
            a = train_lora_qv(cpu, prompts, ids, r=4, alpha=8, steps=5, batch_size=2, lr=1e-2, seed=0)
            b = train_lora_qv(gpu, prompts, ids, r=4, alpha=8, steps=5, batch_size=2, lr=1e-2, seed=0)
            assert abs(a.losses[-1] - b.losses[-1]) < 1e-3, (a.losses, b.losses)
            assert next(b.model.hf.parameters()).device.type == "cuda"

        def latent():
            rs = arithmetic_chains(4, n_hops=2, seed=0)
            for mode in ("coconut", "soft", "cot"):
                cfg = LatentConfig(mode=mode, n_steps=3, answer_tokens=3)
                a, b = run_latent(cpu, rs, cfg), run_latent(gpu, rs, cfg)
                torch.testing.assert_close(a.states, b.states, rtol=1e-3, atol=1e-4)
            assert wb.active_hooks() == []

        def tuned_lens():
            from workbench.methods.tuned_lens import TunedLensTrainConfig, lens_kl, train_tuned_lens

            texts = [f"the quick brown fox {i} jumps over the lazy dog {i * 3}. " * 5 for i in range(40)]
            cfg = TunedLensTrainConfig.smoke(steps=5, context_length=32, heldout_windows=2, init="lstsq",
                                             lstsq_windows=8)
            a = train_tuned_lens(cpu, cfg, corpus=texts, progress=False)
            b = train_tuned_lens(gpu, cfg, corpus=texts, progress=False)
            assert next(b.parameters()).device.type == "cuda"
            ka, kb = (pd.DataFrame(x.card["heldout_kl"]) for x in (a, b))
            assert (ka.kl_nats - kb.kl_nats).abs().max() < 1e-3, (ka, kb)
            ids = torch.tensor([cpu.tokenizer.encode(texts[0], add_special_tokens=False)[:24]])
            fa = wb.logit_lens(cpu, prompts, top_k=3, lens=a)
            fb = wb.logit_lens(gpu, prompts, top_k=3, lens=b)
            assert (fa.token == fb.token).mean() > 0.95
            assert lens_kl(gpu, {"tuned": b}, ids).kl_nats.notna().all()

        def patching():
            from workbench.methods.patching import activation_patching, attribution_patching

            pairs = [{"clean": "abcdef", "corrupt": "abxdef", "answer": "a", "wrong": "b"}]
            kinds = ("resid", "attn", "mlp", "head")
            for run in (lambda m: activation_patching(m, pairs, site_types=kinds, progress=False),
                        lambda m: attribution_patching(m, pairs, site_types=kinds, progress=False),
                        lambda m: attribution_patching(m, pairs, method="ig", steps=4, site_types=kinds,
                                                       progress=False)):
                a, b = run(cpu), run(gpu)
                assert (a.frame.score - b.frame.score).abs().max() < 1e-3
            assert wb.active_hooks() == []

        def harvest_and_probes():
            import tempfile

            from workbench.core.store import harvest
            from workbench.methods.probes.layerwise import layerwise_logistic, layerwise_ridge

            with tempfile.TemporaryDirectory() as tmp:
                site = f"blocks.{cpu.n_layers - 1}.hook_resid_post"
                a = harvest(cpu, prompts * 4, site, f"{tmp}/a", progress=False, shard_tokens=16)
                b = harvest(gpu, prompts * 4, site, f"{tmp}/b", progress=False, shard_tokens=16)
                assert torch.allclose(a.load(site), b.load(site), atol=1e-4)
                assert torch.equal(a.tokens()["token_ids"], b.tokens()["token_ids"])
            g = torch.Generator().manual_seed(0)
            y = torch.arange(1, 5).repeat(30)
            feats = {l: torch.randn(120, 16, generator=g, dtype=torch.float64) + l * y[:, None] for l in range(3)}
            tr, te = list(range(90)), list(range(90, 120))
            ra = layerwise_ridge(feats, y.double(), tr, te).table
            rb = layerwise_ridge(feats, y.double(), tr, te, device="cuda").table
            assert (ra.r2_test - rb.r2_test).abs().max() < 1e-8 and ra.alpha.equals(rb.alpha)
            la = layerwise_logistic(feats, y, tr, te).logistic_acc
            lb = layerwise_logistic(feats, y, tr, te, device="cuda").logistic_acc
            assert (la - lb).abs().max() <= 1 / 30

        def dispatched():
            # layers split between the GPU and the CPU (and, with two GPUs, over both): same captures and lens
            from accelerate import dispatch_model

            hf = tiny_hf(family)
            n_gpu = torch.cuda.device_count()
            layers = {cpu.arch.layer_path(i): (i % n_gpu if i % 2 == 0 else "cpu") for i in range(cpu.n_layers)}
            dmap = dict(layers)
            for name, _ in [*hf.named_parameters(), *hf.named_buffers()]:
                owner = name.rsplit(".", 1)[0] if "." in name else ""
                if not any(owner == p or owner.startswith(p + ".") for p in layers):
                    dmap[owner] = 0  # everything outside the decoder layers on the first GPU
            hf = dispatch_model(hf, dmap, main_device=0)
            m = from_hf(hf, cpu.tokenizer, name=cpu.name + "-dispatched")
            enc = cpu.encode(prompts)
            sites = [wb.layer_site(l) for l in range(1, cpu.n_layers)]
            with wb.trace(cpu, sites) as ta, torch.no_grad():
                cpu.hf(**enc)
            with wb.trace(m, sites) as tb, torch.no_grad():
                m.hf(**{k: v.to(m.device) for k, v in enc.items()})
            for site in sites:
                assert torch.allclose(ta[site], tb[site].cpu(), atol=1e-4), site
            fa, fb = wb.logit_lens(cpu, prompts, top_k=3), wb.logit_lens(m, prompts, top_k=3)
            assert (fa.token_id == fb.token_id).mean() > 0.99

        for name, fn in [("captures == hidden_states", captures), ("logit lens vs CPU", lens),
                         ("harvest and layerwise probes on CUDA vs CPU", harvest_and_probes),
                         ("model dispatched over GPU and CPU vs CPU", dispatched),
                         ("tuned lens training and reading vs CPU", tuned_lens),
                         ("exact / AtP / IG patching vs CPU", patching),
                         ("answer evaluation vs CPU", evaluation), ("residual features vs CPU", features),
                         ("LoRA Q/V vs CPU", lora), ("latent loops vs CPU", latent)]:
            check(f"{family}: {name}", fn)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
