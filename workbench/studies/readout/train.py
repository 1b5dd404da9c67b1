"""Build a shipped tuned lens: ``python -m workbench.studies.readout.train smollm2-135m [--recipe gpu]``.

Trains with a recipe of :class:`workbench.methods.tuned_lens.TunedLensTrainConfig` (``cpu`` by default) and writes
the folder ``probes/<model>/tuned-lens`` of the checkout (``--out`` elsewhere), replacing an earlier lens only with
``--overwrite``. Prints the held-out KL per layer of the tuned and the logit lens.
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from workbench.core.models import load_model
from workbench.io.owned import claim_folder
from workbench.methods.tuned_lens import KIND, save_tuned_lens, train_tuned_lens, tuned_lens_dir
from workbench.studies.notebook import checkout_root
from workbench.studies.readout.study import RECIPES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m workbench.studies.readout.train", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a registry name, a hub id or a local folder")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's number of KL steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="folder (default: probes/<model>/tuned-lens of the checkout)")
    ap.add_argument("--overwrite", action="store_true", help="replace a tuned lens already in the folder")
    args = ap.parse_args(argv)
    overrides = {"seed": args.seed} | ({"steps": args.steps} if args.steps is not None else {})
    cfg = RECIPES[args.recipe](**overrides)
    cfg.validate()
    model = load_model(args.model, device=args.device)
    out = args.out or tuned_lens_dir(model.name, checkout_root())
    claim_folder(out, KIND, overwrite=args.overwrite)  # refuse before the training, not after it
    lens = train_tuned_lens(model, cfg)
    folder = save_tuned_lens(lens, out, overwrite=args.overwrite)
    kl = pd.DataFrame(lens.card["heldout_kl"]).pivot(index="layer", columns="lens", values="kl_bits")
    print(kl.round(3).to_string())
    print(f"{folder}: {lens.card['train_tokens']} KL tokens + {lens.card['lstsq_tokens']} least-squares tokens, "
          f"{lens.card['train_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
