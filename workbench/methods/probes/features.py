"""Residual-stream features of prompts for probes (read by the activation engine, :mod:`workbench.methods.activations`).

:func:`residual_features` gives residual-stream vectors of prompts at chosen layers, at the last token or averaged
over chosen token positions (e.g. the entity mentions). Layer numbering is the one ``layers=`` of the package
(:func:`workbench.core.sites.check_layers`): layer 0 is the embedding output (site ``blocks.0.hook_resid_pre``),
layer l >= 1 the output of block l-1 (``blocks.{l-1}.hook_resid_post``, before any final norm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from jaxtyping import Float

from workbench.core.sites import check_layers
from workbench.methods.activations import features


@torch.no_grad()
def residual_features(
    model,
    prompts: Sequence[str],
    layers: int | Sequence[int] | None,
    *,
    positions: Literal["last"] | int | Sequence[Sequence[int]] = "last",
    batch_size: int = 64,
) -> dict[int, Float[torch.Tensor, "n d"]]:
    """Residual-stream features {layer: [n, d_model] float32 CPU tensor} of ``prompts``.

    layers: hidden-state indices 0..L (0 = embedding output, l = after block l-1; None = all; negative from the
        end). positions: "last" (the last real token), an int (that position in every prompt; negative from its
        end), or one list of token positions per prompt, averaged (e.g. the entity mentions from
        :meth:`workbench.data.tasks.TaskSet.mention_token_positions`). Positions index the unpadded tokenised prompt,
        special tokens included. The forward stops after the deepest requested layer; prompts are batched by
        length (the rows come back in the order of ``prompts``).
    """
    return residual_features_many(model, prompts, layers, {"features": positions}, batch_size=batch_size)["features"]


@torch.no_grad()
def residual_features_many(
    model,
    prompts: Sequence[str],
    layers: int | Sequence[int] | None,
    positions: Mapping[str, Literal["last"] | int | Sequence[Sequence[int]]],
    *,
    batch_size: int = 64,
) -> dict[str, dict[int, Float[torch.Tensor, "n d"]]]:
    """:func:`residual_features` for several position specs from ONE forward per batch: {name: {layer: [n, d]}}.

    E.g. ``{"last_token": "last", "mention_mean": mentions}`` gives both probe variants of the entity task at the
    cost of one pass.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if not isinstance(positions, Mapping) or not positions:
        raise ValueError("positions must be a non-empty dict {name: position spec}")
    return features(model, prompts, check_layers(layers, model.n_layers), positions, batch_size=batch_size)
