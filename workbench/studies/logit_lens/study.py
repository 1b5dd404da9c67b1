"""The logit-lens study (notebook 01): every layer's residual stream read through the model's own final norm and
unembedding, for a few prompts, each with one single-token answer.

    cfg = LogitLensConfig()                       # SmolLM2, six prompts and their answers, every layer
    result = run_logit_lens_study(cfg, model=m)
    result.summary(); result.tables(); result.figures(); result.save(out_dir, m)

The logic is :func:`workbench.methods.lens.logit_lens`; the figures are :mod:`workbench.plotting.lens`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.core.models import DEFAULT_MODEL, Model, load_model
from workbench.io.figures import write_result_tables
from workbench.methods.lens import logit_lens
from workbench.plotting.lens import lens_heatmap, lens_target_curve, lens_target_summary
from workbench.studies.notebook import NotebookConfig, Phases, each_int, non_empty, relation

PROMPTS = (
    "The capital of France is",
    "Monday, Tuesday, Wednesday, Thursday,",
    "The capital of Germany is",
    "The opposite of hot is",
    "One, two, three, four,",
    "Two plus two equals",
)
TARGETS = (" Paris", " Friday", " Berlin", " cold", " five", " four")  # one single-token answer per prompt
SMOKE_PROMPTS = 2  # a smoke run keeps the first two prompts (and their targets)


@dataclass
class LogitLensConfig(NotebookConfig):
    # notebook 01's parameters -> fields (see workbench.studies.notebook); a smoke run picks three layers itself
    NOTEBOOK = {"model": "model", "prompts": "prompts", "targets": "targets", "layers": "layers", "seed": "seed"}
    SMOKE_SIZED = ("layers",)
    RELATIONS = (relation(("prompts", "targets"), lambda c: len(c.prompts) == len(c.targets),
                          "one target per prompt (as many targets as prompts)"),)

    model: str = DEFAULT_MODEL
    prompts: tuple[str, ...] = non_empty(PROMPTS, of=str)
    targets: tuple[str, ...] = non_empty(TARGETS, of=str)
    # hidden-state layers, 0 (embeddings) .. n_layers; None: every layer (a smoke run: embeddings, middle, last)
    layers: tuple[int, ...] | None = each_int(None, lo=0, non_empty=True, optional=True)
    positions: str = "all"
    top_k: int = 5
    seed: int = 0
    smoke: bool = False

    @classmethod
    def smoke_config(cls, **overrides) -> LogitLensConfig:
        """Seconds: the first two prompts (and targets), three layers (embeddings, middle, last: picked at run time)."""
        base = dict(prompts=PROMPTS, targets=TARGETS, layers=None, smoke=True) | overrides
        for name in ("prompts", "targets"):
            base[name] = tuple(base[name])[:SMOKE_PROMPTS]
        return cls(**base)


@dataclass
class LogitLensResult:
    config: dict
    model: str
    weights_hash: str
    prompts: list[str]
    lens: pd.DataFrame  # prompt x layer x position x top-k token, with the targets' probability and rank
    target_summary: pd.DataFrame  # per prompt and target: first rank-1 layer, final rank and probability
    timings: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Per prompt and target: the first layer at which it is the lens's top-1 token, its final rank and prob."""
        return self.target_summary

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"lens": self.lens, "lens_target_summary": self.target_summary}

    def figures(self) -> dict[str, go.Figure]:
        return {"lens_heatmap": lens_heatmap(self.lens, prompt_idx=0),
                "lens_target_curve": lens_target_curve(self.lens, prompts=self.prompts)}

    def save(self, out_dir: str | Path, model: Model | None = None) -> dict[str, Path]:
        """The tables as CSV plus ``study.json`` (``model`` is not needed)."""
        return write_result_tables(out_dir, self.tables(), {
            "model": self.model, "weights_hash": self.weights_hash, "config": self.config, "timings": self.timings})


def study_layers(cfg: LogitLensConfig, model: Model) -> list[int] | None:
    """The layers a run reads: ``cfg.layers``; for a smoke run without layers, embeddings, middle and last."""
    if cfg.layers is None and cfg.smoke:
        return [0, model.n_layers // 2, model.n_layers]
    return None if cfg.layers is None else list(cfg.layers)


def run_logit_lens_study(cfg: LogitLensConfig | None = None, *, model: Model | None = None) -> LogitLensResult:
    """The lens table of every prompt (phase ``lens``) and the targets' summary (phase ``summary``)."""
    cfg = cfg or LogitLensConfig()
    phases = Phases()
    torch.manual_seed(cfg.seed)
    model = model or load_model(cfg.model)
    layers = study_layers(cfg, model)
    prompts = list(cfg.prompts)
    with phases("lens"):
        lens = logit_lens(model, prompts, layers=layers, positions=cfg.positions, top_k=cfg.top_k,
                          targets=[[t] for t in cfg.targets])
    with phases("summary"):
        summary = lens_target_summary(lens)
    return LogitLensResult(config=asdict(cfg) | {"layers": layers}, model=model.name, weights_hash=model.weights_hash,
                           prompts=prompts, lens=lens, target_summary=summary, timings=phases.finish())
