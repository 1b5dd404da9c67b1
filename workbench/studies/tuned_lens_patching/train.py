"""Build a shipped tuned lens: ``workbench train-lens smollm2-135m [--recipe gpu]`` calls :func:`build_tuned_lens`.

Trains with a recipe of :class:`workbench.methods.tuned_lens.TunedLensTrainConfig` (``cpu`` by default) and writes
the folder ``probes/<model>/tuned-lens`` of the checkout (``out`` elsewhere), replacing an earlier lens only with
``overwrite``. :func:`lens_summary` is the held-out KL per layer of the tuned and the logit lens, as text.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from workbench.core.models import check_model_name, load_model, resolve_device
from workbench.io.owned import claim_folder
from workbench.methods.tuned_lens import (
    KIND,
    TunedLens,
    TunedLensTrainConfig,
    save_tuned_lens,
    train_tuned_lens,
    tuned_lens_dir,
)
from workbench.studies.notebook import checkout_root
from workbench.studies.tuned_lens_patching.study import RECIPES


def lens_config(recipe: str = "cpu", *, steps: int | None = None, seed: int = 0) -> TunedLensTrainConfig:
    """The recipe's training config with the overrides, checked (a ``ValueError`` names a bad recipe or value)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; allowed: {sorted(RECIPES)}")
    cfg = RECIPES[recipe](seed=seed, **({"steps": steps} if steps is not None else {}))
    cfg.validate()
    return cfg


def build_tuned_lens(model: str, recipe: str = "cpu", *, steps: int | None = None, seed: int = 0,
                     device: str | None = None, out: str | Path | None = None,
                     overwrite: bool = False) -> tuple[TunedLens, Path]:
    """Train a tuned lens for ``model`` (a registry name, a hub id or a local folder) and write it to ``out``
    (default ``probes/<model>/tuned-lens`` of the checkout); returns the lens and its folder. Everything cheap is
    checked first, before the model loads: the recipe and its overrides, the model name, the device and the folder
    (:class:`workbench.io.owned.FolderOwnershipError` when it may not be replaced)."""
    cfg = lens_config(recipe, steps=steps, seed=seed)
    name = check_model_name(model)
    resolve_device(device)
    out = Path(out) if out is not None else tuned_lens_dir(name, checkout_root())
    claim_folder(out, KIND, overwrite=overwrite)  # refuse before the training, not after it
    lens = train_tuned_lens(load_model(name, device=device), cfg)
    return lens, save_tuned_lens(lens, out, overwrite=overwrite)


def lens_summary(lens: TunedLens, folder: str | Path) -> str:
    """The held-out KL (bits) per layer of the tuned and the logit lens, then the folder and the training budget."""
    kl = pd.DataFrame(lens.card["heldout_kl"]).pivot(index="layer", columns="lens", values="kl_bits")
    return (f"{kl.round(3).to_string()}\n{folder}: {lens.card['train_tokens']} KL tokens + "
            f"{lens.card['lstsq_tokens']} least-squares tokens, {lens.card['train_seconds'] / 60:.1f} min")
