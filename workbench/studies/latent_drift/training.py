"""The trained models of the latent thread: CoT, direct and Coconut adapters per seed, evaluated on held-out chains.

``workbench train-reasoner`` runs :func:`train_suite`: for every seed, a CoT adapter (which is also Coconut's stage
0), Coconut's curriculum from it (evaluated after every stage), and a direct-answer adapter with the CoT run's
budget of examples. Every adapter is evaluated, as stored (float16, merged into a fresh base), on
:func:`evaluation_sets` (hop counts inside and beyond the training range, prompts never trained on) through
:func:`workbench.methods.latent.run_latent`, and written with its accuracy to ``probes/<model>/reasoning/``.
Runs resume from their checkpoints in the user cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.data.reasoning import MAX_HOPS, ReasoningSet, arithmetic_operands
from workbench.io.figures import write_result_tables
from workbench.methods.latent import LatentConfig, run_latent
from workbench.methods.reasoner import (
    CARD_FILE,
    ReasonerConfig,
    adapter_name,
    chain_tokens,
    checkpoint_dir,
    remove_checkpoint,
    evaluation_set,
    load_reasoner_state,
    merge_adapter,
    reasoner_dir,
    save_reasoner,
    train_reasoner,
)
from workbench.methods.stats import wilson_ci

ANSWER_TOKENS = 3  # " 9" and a little: the trained models answer at once


@dataclass
class SuiteConfig:
    """What ``workbench train-reasoner`` trains (defaults: the shipped CPU recipe)."""

    model: str = DEFAULT_MODEL
    seeds: tuple[int, ...] = (0, 1, 2)
    modes: tuple[str, ...] = ("cot", "coconut", "direct")
    train_hops: tuple[int, ...] = (1, 2, 3)
    n_train: int = 1600  # cot and direct: examples; coconut: ``coconut_n_train`` per stage
    coconut_n_train: int = 1280
    batch_size: int = 16
    lr: float = 2e-3
    lora_r: int = 8
    eval_hops: tuple[int, ...] = (2, 3, 4, 5)
    n_eval: int = 100
    eval_seed: int = 0
    root: str | None = None  # where probes/ is (None: the checkout)
    overwrite: bool = False
    device: str | None = None

    def __post_init__(self):
        self.seeds, self.modes = tuple(self.seeds), tuple(self.modes)
        self.train_hops, self.eval_hops = tuple(self.train_hops), tuple(self.eval_hops)
        if not self.modes or any(m not in ("cot", "coconut", "direct") for m in self.modes):
            raise ValueError(f"modes must be some of ['cot', 'coconut', 'direct'], got {self.modes!r}")
        if not self.eval_hops or any(not isinstance(h, int) or not 1 <= h <= MAX_HOPS for h in self.eval_hops):
            raise ValueError(f"eval_hops must be ints in 1..{MAX_HOPS}, got {self.eval_hops!r}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 100:
                raise ValueError(f"seeds must be ints in 0..99, got {s!r}")
        self.run_config("cot", self.seeds[0] if self.seeds else 0)  # bad training options fail here

    def run_config(self, mode: str, seed: int) -> ReasonerConfig:
        n = self.coconut_n_train if mode == "coconut" else self.n_train
        return ReasonerConfig(mode=mode, train_hops=self.train_hops, n_train=n, batch_size=self.batch_size,
                              lr=self.lr, lora_r=self.lora_r, lora_alpha=2 * self.lora_r, seed=seed)


# The recipes of ``workbench train-reasoner``: "cpu" is the shipped one (its time is in the cards and in
# docs/benchmarks.md); "gpu" has five times the examples per stage and twice the evaluation items (not measured
# here: no GPU was lent); "smoke" checks the pipeline in a minute.
RECIPES = {
    "cpu": {},
    "gpu": {"n_train": 8000, "coconut_n_train": 4000, "batch_size": 32, "n_eval": 200, "device": "cuda"},
    "smoke": {"n_train": 48, "coconut_n_train": 32, "n_eval": 10, "eval_hops": (2, 4), "seeds": (0,)},
}


def suite_config(recipe: str = "cpu", **overrides) -> SuiteConfig:
    """The recipe's :class:`SuiteConfig` with ``overrides`` (None values ignored)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; allowed: {sorted(RECIPES)}")
    return SuiteConfig(**(RECIPES[recipe] | {k: v for k, v in overrides.items() if v is not None}))


def evaluation_sets(task: str, hops: Sequence[int], n: int, *, seed: int = 0) -> dict[int, ReasoningSet]:
    """One held-out set per hop count (distinct prompts; seeds below the training draws')."""
    return {h: evaluation_set(task, n, h, seed=seed + h) for h in hops}


def evaluate(model: Model, cfg: ReasonerConfig, sets: dict[int, ReasoningSet], *, stage: int | None = None,
             thoughts: str = "trained", batch_size: int = 50, answer_tokens: int = ANSWER_TOKENS) -> pd.DataFrame:
    """Accuracy of a trained model on every set, with Wilson intervals: one row per hop count.

    cot: greedy for exactly the steps' tokens, then the answer cue. direct: the cue at once. coconut at ``stage``
    (default the last): ``stage x c`` thoughts, the remaining steps' tokens of greedy text, the cue;
    ``thoughts="hops"`` gives a final-stage model ``hops x c`` thoughts instead (chains longer than trained on).
    """
    rows = []
    for hops, rs in sets.items():
        if cfg.mode == "cot":
            lc = LatentConfig(mode="cot", n_steps=chain_tokens(model.tokenizer, rs),
                              answer_tokens=answer_tokens,
                              batch_size=batch_size)
            n_thoughts = 0
        elif cfg.mode == "direct":
            lc = LatentConfig(mode="direct", n_steps=0, answer_tokens=answer_tokens, batch_size=batch_size)
            n_thoughts = 0
        else:
            k = cfg.n_stages if stage is None else stage
            n_thoughts = (hops if thoughts == "hops" else k) * cfg.thoughts_per_step
            latent_steps = n_thoughts // cfg.thoughts_per_step
            lc = LatentConfig(mode="coconut", n_steps=n_thoughts, answer_tokens=answer_tokens, batch_size=batch_size,
                              text_tokens=chain_tokens(model.tokenizer, rs, skip=latent_steps))
        run = run_latent(model, rs, lc)
        k_right, n = int(run.items.correct.sum()), len(rs)
        ci = wilson_ci(k_right, n)
        rows.append({"mode": cfg.mode, "seed": cfg.seed, "stage": stage if cfg.mode == "coconut" else None,
                     "thoughts": thoughts if cfg.mode == "coconut" else None, "n_thoughts": n_thoughts,
                     "hops": hops, "in_training_range": hops <= max(cfg.train_hops), "n": n, "correct": k_right,
                     "accuracy": k_right / n, "ci_low": ci.lo, "ci_high": ci.hi})
    return pd.DataFrame(rows)


def base_accuracy(model: Model, sets: dict[int, ReasoningSet]) -> pd.DataFrame:
    """The untrained baseline on the same held-out sets: the base model with the CoT cue and as many greedy tokens
    as the written-out chain (``cot``), and answering at once (``direct``), each with the base protocol's 10 answer
    tokens (an untrained model does not answer at once); rows as :func:`evaluate`'s, ``seed`` None."""
    rows = [evaluate(model, ReasonerConfig(mode=mode), sets, answer_tokens=LatentConfig().answer_tokens)
            for mode in ("cot", "direct")]
    return pd.concat(rows, ignore_index=True).assign(seed=None, in_training_range=None)


def heuristic_accuracy(sets: dict[int, ReasoningSet]) -> pd.DataFrame:
    """What answering without computing gets on the same sets (arithmetic): the most frequent answer of the set
    (``majority``) and copying the last hop's constant (``last constant``: ``...; d=c-4; d=?`` -> 4), with Wilson
    intervals; the floor any trained accuracy is read against."""
    rows = []
    for hops, rs in sets.items():
        _, _, consts = arithmetic_operands(rs)
        top = max(set(rs.answers), key=rs.answers.count)
        for mode, right in (("majority", [a == top for a in rs.answers]),
                            ("last constant", [a == str(c[-1]) for a, c in zip(rs.answers, consts)])):
            k, n = int(sum(right)), len(rs)
            ci = wilson_ci(k, n)
            rows.append({"mode": mode, "hops": hops, "n": n, "correct": k, "accuracy": k / n, "ci_low": ci.lo,
                         "ci_high": ci.hi})
    return pd.DataFrame(rows)


@dataclass
class SuiteResult:
    config: dict
    accuracy: pd.DataFrame  # every evaluation: mode, seed, stage, thoughts, hops, n, correct, accuracy, CI
    timings: pd.DataFrame  # mode, seed, training seconds, steps, resumed steps
    folders: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        return write_result_tables(out_dir, {"accuracy": self.accuracy, "timings": self.timings},
                                   {"config": self.config, "folders": self.folders})


def _fresh(cfg: SuiteConfig) -> Model:
    return load_model(cfg.model, device=cfg.device)


def check_suite(cfg: SuiteConfig) -> None:
    """What :func:`train_suite` refuses, found before any model loads: an adapter folder that exists (without
    ``overwrite``), a Coconut run without its seed's CoT adapter (trained in the same run or already there)."""
    for seed in cfg.seeds:
        for mode in cfg.modes:
            folder = reasoner_dir(cfg.model, adapter_name(mode, seed), cfg.root)
            if folder.exists() and not cfg.overwrite:
                raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to retrain it")
        cot = reasoner_dir(cfg.model, adapter_name("cot", seed), cfg.root)
        if "coconut" in cfg.modes and "cot" not in cfg.modes and not (cot / CARD_FILE).is_file():
            raise ValueError(f"coconut starts from the CoT adapter of the same seed, and there is none at {cot}: "
                             "include 'cot' in modes")


def train_suite(cfg: SuiteConfig | None = None, *, progress: bool = True) -> SuiteResult:
    """Train, evaluate (as stored) and write every adapter of ``cfg``; see the module docstring."""
    cfg = cfg or SuiteConfig()
    check_suite(cfg)
    sets = evaluation_sets("arithmetic", cfg.eval_hops, cfg.n_eval, seed=cfg.eval_seed)
    exclude = [p for rs in sets.values() for p in rs.prompts]
    in_range = {h: rs for h, rs in sets.items() if h <= max(cfg.train_hops)}
    acc, timings, folders = [], [], {}
    for seed in cfg.seeds:
        for mode in [m for m in ("cot", "coconut", "direct") if m in cfg.modes]:
            rc = cfg.run_config(mode, seed)
            name = adapter_name(mode, seed)
            folder = reasoner_dir(cfg.model, name, cfg.root)
            base = _fresh(cfg)
            base_hash = base.weights_hash  # before the LoRA goes in
            init = None
            if mode == "coconut":
                init, _ = load_reasoner_state(reasoner_dir(cfg.model, adapter_name("cot", seed), cfg.root))
            stage_rows = []

            def on_stage(stage, model, rc=rc, stage_rows=stage_rows, name=name):
                if rc.mode == "coconut" and stage < rc.n_stages:
                    stage_rows.append(evaluate(model, rc, in_range, stage=stage))
                    if progress:
                        tqdm.write(f"{name} stage {stage}: " + ", ".join(
                            f"{r.hops} hops {r.accuracy:.2f}" for r in stage_rows[-1].itertuples()))

            start = time.perf_counter()
            ckpt = checkpoint_dir(base, name, folder)
            run = train_reasoner(base, rc, init=init, exclude=exclude, checkpoint=ckpt,
                                 progress=progress, on_stage=on_stage)
            tensors = run.adapter_state()
            stored = merge_adapter(_fresh(cfg), tensors, r=rc.lora_r, alpha=rc.lora_alpha, targets=rc.targets,
                                   name=f"{cfg.model}+{name}")
            rows = stage_rows + [evaluate(stored, rc, sets)]
            if mode == "coconut":
                beyond = {h: rs for h, rs in sets.items() if h > rc.n_stages}
                if beyond:
                    rows.append(evaluate(stored, rc, beyond, thoughts="hops"))
            table = pd.concat(rows, ignore_index=True)
            acc.append(table)
            seconds = time.perf_counter() - start
            timings.append({"mode": mode, "seed": seed, "train_seconds": round(run.seconds, 1),
                            "with_evaluation_seconds": round(seconds, 1), "steps": len(run.log),
                            "resumed_steps": run.resumed_from, "final_loss": run.log[-1].loss if run.log else None})
            card = {"task": rc.task, "train_hops": list(rc.train_hops), "eval_hops": list(cfg.eval_hops),
                    "n_eval_per_hop": cfg.n_eval, "eval_seed": cfg.eval_seed,
                    "data": "workbench.data.reasoning.arithmetic_chains; training draws seeded >= 1000, every "
                            "evaluation prompt removed",
                    "accuracy": table.to_dict(orient="records"),
                    "retrain": f"workbench train-reasoner --model {cfg.model} --modes {mode} --seeds {seed}"
                               + (" (needs cot of the same seed)" if mode == "coconut" else "")}
            folders[name] = str(save_reasoner(run, folder, base_name=cfg.model, base_weights_sha256=base_hash,
                                              card=card, overwrite=cfg.overwrite, tensors=tensors))
            remove_checkpoint(ckpt)  # the adapter is written: its resumable state is spent
            if progress:
                tqdm.write(f"{name}: " + ", ".join(f"{r.hops} hops {r.accuracy:.2f}" for r in table.itertuples()
                                                   if r.stage is None or pd.isna(r.stage)))
    return SuiteResult(config=asdict(cfg), accuracy=pd.concat(acc, ignore_index=True),
                       timings=pd.DataFrame(timings), folders=folders)
