"""The three threads as gap-panel tasks: counting prompts, the VLM testbed's colour questions, latent loops.

Each builder returns a :class:`workbench.methods.encoded_expressed.GapTask` with its patching column filled:

- :func:`counting_task`: last-token residuals at every layer of one counting task (the counting study's answer
  set-up: the next token is the digit); classes are the counts 1-9, candidates their digit tokens. A row is
  "answered right" when the model's own digit-restricted answer (the lens at the last layer) is the gold count.
- :func:`visual_task`: last-token residuals of colour questions; probes train on the visual study's probe items
  (every shape x colour, training images), everything is scored on held-out prior-violating, prior-consistent and
  other-shape colour items; candidates are the eight colour tokens.
- :func:`latent_task`: the states of a latent loop per latent step at one layer (default: the last, what the loop
  feeds back); classes are the arithmetic answers 0-9. Patching along the step axis feeds a right item's latent
  input into a wrong item's loop at that step and asks whether the final answer becomes the right item's.

Patching: with at least ``min_pairs`` rows answered right, exact patching from them (clean = a right row, corrupt =
a row of another class); otherwise attribution patching over arbitrary pairs of different classes (text and VLM
tasks). The latent loop has no gradient path through its decoding, so it is patched exactly or not at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from workbench.core.models import Model
from workbench.core.sites import check_layers
from workbench.data.reasoning import ReasoningSet
from workbench.data.tasks import answered_task, check_single_token_answers, split_indices
from workbench.data.vqa import COLOURS, evaluation_set, probe_training_items
from workbench.methods.activations import last_token
from workbench.methods.answering import candidate_token_ids, vqa_batches, vqa_inputs
from workbench.methods.encoded_expressed import GapTask, lens_answers, make_pairs
from workbench.methods.latent import LatentConfig, LatentRun, run_latent
from workbench.methods.patching import residual_patching
from workbench.methods.probes.features import residual_features_many

VISUAL_SPLITS = ("prior_violating", "prior_consistent", "colour")


def _stack(feats: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    return torch.stack([feats[layer] for layer in layers])


def _pairs_and_method(labels, right, n_pairs: int, min_pairs: int, seed: int) -> tuple[list, str]:
    pairs = make_pairs(labels, right, n_pairs=n_pairs, seed=seed)
    if len(pairs) >= min_pairs:
        return pairs, "exact"
    return make_pairs(labels, np.ones(len(labels), bool), n_pairs=n_pairs, seed=seed, require_right=False), "atp"


def counting_task(model: Model, task: str, *, n: int, n_train: int, seed: int = 0, layers=None, n_pairs: int = 32,
                  min_pairs: int = 8, batch_size: int = 32, patch: bool = True, name: str | None = None,
                  **options) -> tuple[GapTask, dict]:
    """The gap task of counting ``task`` and what the replications reuse (prompts, counts, digit ids, split)."""
    if not 0 < n_train < n:
        raise ValueError(f"n_train must lie in 1..{n - 1} (n={n}), got {n_train}")
    layer_list = check_layers(layers, model.n_layers)
    if model.n_layers not in layer_list:
        layer_list = [*layer_list, model.n_layers]  # the last layer decides which rows the model answers right
    ts, digit_ids = answered_task(model, task, n, seed=seed, **options)
    prompts, counts = ts.prompts, np.asarray(ts.counts)
    tr, te = split_indices(counts, [n_train, n - n_train], seed=seed, groups=prompts)[:2]
    feats = residual_features_many(model, prompts, layer_list, {"last": "last"}, batch_size=batch_size)["last"]
    labels = counts - 1
    pred = lens_answers(model, feats[model.n_layers], model.n_layers, digit_ids)[0].numpy()  # the model's answer
    right = pred == labels
    patching = None
    if patch:
        pairs, method = _pairs_and_method(labels[te], right[te], n_pairs, min_pairs, seed)
        c, x = [int(te[i]) for i, _ in pairs], [int(te[j]) for _, j in pairs]
        patching = residual_patching(model, [prompts[i] for i in c], [prompts[j] for j in x],
                                     [digit_ids[labels[i]] for i in c], [digit_ids[labels[j]] for j in x],
                                     model.encode, layers=layer_list, method=method, batch_size=batch_size)
    gt = GapTask(name=name or task, features=_stack(feats, layer_list), labels=labels,
                 classes=[str(c) for c in range(1, 10)], candidate_ids=digit_ids, train_idx=tr, test_idx=te,
                 axis_values=layer_list, patching=patching, groups=prompts)
    extra = {"prompts": prompts, "counts": counts, "digit_ids": digit_ids, "train_idx": tr, "test_idx": te,
             "accuracy": float(right[te].mean()), "right": right, "layers": layer_list}
    return gt, extra


def visual_task(model: Model, *, n_train: int, n_items: int, seed: int = 0, layers=None, n_pairs: int = 32,
                min_pairs: int = 8, batch_size: int = 32, patch: bool = True) -> tuple[GapTask, dict]:
    """The gap task of the testbed's colour questions (see the module docstring)."""
    layer_list = check_layers(layers, model.n_layers)
    if model.n_layers not in layer_list:
        layer_list = [*layer_list, model.n_layers]
    train = probe_training_items(n_train, seed=seed)
    splits = evaluation_set(n_items, seed=seed)
    test = [it for name in VISUAL_SPLITS for it in splits[name]]
    split_of = [name for name in VISUAL_SPLITS for _ in splits[name]]
    items = train + test
    feats = last_token(model, layers=layer_list, batches=vqa_batches(model, items, batch_size))
    classes = list(COLOURS)
    ids = candidate_token_ids(model.processor.tokenizer, classes)
    labels = np.array([classes.index(it.answer) for it in items])
    pred = lens_answers(model, feats[model.n_layers], model.n_layers, ids)[0].numpy()  # the model's answer
    right = pred == labels
    tr, te = np.arange(len(train)), np.arange(len(train), len(items))
    patching = None
    if patch:
        pairs, method = _pairs_and_method(labels[te], right[te], n_pairs, min_pairs, seed)
        c, x = [int(te[i]) for i, _ in pairs], [int(te[j]) for _, j in pairs]

        def encode(chunk):
            return vqa_inputs(model, [it.image for it in chunk], [it.question for it in chunk])

        patching = residual_patching(model, [items[i] for i in c], [items[j] for j in x],
                                     [ids[labels[i]] for i in c], [ids[labels[j]] for j in x], encode,
                                     layers=layer_list, method=method, batch_size=batch_size)
    gt = GapTask(name="colour", features=_stack(feats, layer_list), labels=labels, classes=classes,
                 candidate_ids=ids, train_idx=tr, test_idx=te, axis_values=layer_list, patching=patching)
    by_split = pd.DataFrame({"split": split_of, "right": right[te], "says": [classes[p] for p in pred[te]]})
    extra = {"splits": {name: splits[name] for name in VISUAL_SPLITS},
             "accuracy": by_split.groupby("split").right.mean().to_dict(),
             "says_red_violating": float((by_split[by_split.split == "prior_violating"].says == "red").mean())
             if "prior_violating" in split_of else math.nan}
    return gt, extra


def answer_token_ids(model: Model, answers: Sequence[str]) -> list[int]:
    """One token per distinct answer (as text), in the order given; raises naming an answer that is not one."""
    ids = check_single_token_answers(model.tokenizer, list(answers))
    return [ids[a] for a in answers]


def latent_task(model: Model, rs: ReasoningSet, cfg: LatentConfig, *, n_train: int, seed: int = 0,
                read_layer: int | None = None, n_pairs: int = 32, min_pairs: int = 8, patch: bool = True,
                run: LatentRun | None = None) -> tuple[GapTask, dict]:
    """The gap task of a latent loop on an arithmetic set: one slice per latent step (see the module docstring)."""
    if rs.task != "arithmetic":
        raise ValueError(f"the latent gap task needs the arithmetic task (answers 0-9), got {rs.task!r}")
    if cfg.cold_stop_entropy is not None:
        raise ValueError("Cold Stop ends items at different steps; the per-step panel needs every step of every item")
    n = len(rs)
    if not 0 < n_train < n:
        raise ValueError(f"n_train must lie in 1..{n - 1} ({n} items), got {n_train}")
    layer = model.n_layers if read_layer is None else int(read_layer)
    if not 0 <= layer <= model.n_layers:
        raise ValueError(f"read_layer {layer} outside 0..{model.n_layers}")
    run = run or run_latent(model, rs, cfg)
    classes = [str(v) for v in range(10)]
    ids = answer_token_ids(model, classes)
    labels = np.array([int(a) for a in rs.answers])
    right = run.items.sort_values("item").correct.to_numpy(bool)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    tr, te = np.sort(order[:n_train]), np.sort(order[n_train:])
    S = cfg.n_steps
    features = run.states[:, :, layer].transpose(0, 1).contiguous()  # [steps, n, d]
    patching = None
    if patch:
        pairs = make_pairs(labels[te], right[te], n_pairs=n_pairs, seed=seed)
        if len(pairs) >= min_pairs:
            c, x = np.array([te[i] for i, _ in pairs]), np.array([te[j] for _, j in pairs])
            sub = rs.subset(x.tolist())
            parsed = run.items.set_index("item").parsed
            base = np.mean([parsed[j] == rs.answers[i] for i, j in zip(c, x)])
            rows = []
            for k in range(S):
                patched = run_latent(model, sub, cfg, patch={k: run.inputs[c, k]})
                hit = np.mean([p == rs.answers[i] for p, i in zip(patched.items.sort_values("item").parsed, c)])
                rows.append({"index": k + 1, "patch_recovery": (hit - base) / (1 - base) if base < 1 else math.nan,
                             "patch_method": "exact", "n_pairs": len(pairs), "clean_metric": 1.0,
                             "corrupt_metric": base})
            patching = pd.DataFrame(rows)
    gt = GapTask(name=f"{rs.task}/{cfg.mode}", features=features, labels=labels, classes=classes, candidate_ids=ids,
                 train_idx=tr, test_idx=te, axis="step", axis_values=list(range(1, S + 1)), read_layers=[layer] * S,
                 patching=patching)
    return gt, {"run": run, "accuracy": float(right.mean()), "n_right": int(right.sum())}
