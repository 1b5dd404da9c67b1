"""Which config class each study notebook builds: ``notebooks/<stem>.ipynb`` -> its :class:`NotebookConfig`.

The runner (:mod:`workbench.batch.runner`) builds a notebook's config from its defaults and the user's parameters
before any kernel starts, so a value the config does not allow fails at once, naming the parameter. A test checks
that every committed notebook has an entry here and that each entry's ``NOTEBOOK`` map names only parameters of the
notebook's parameters cell.
"""

from __future__ import annotations

from workbench.studies.attribution_graphs.study import GraphsConfig
from workbench.studies.counting_readout.study import CountingConfig
from workbench.studies.encoded_expressed.study import EncodedExpressedConfig
from workbench.studies.latent_drift.study import DriftConfig
from workbench.studies.logit_lens.study import LogitLensConfig
from workbench.studies.notebook import NotebookConfig
from workbench.studies.sae_features.study import SAEStudyConfig
from workbench.studies.tuned_lens_patching.study import TunedLensPatchingConfig
from workbench.studies.visual_ignorance.study import VisualConfig

NOTEBOOK_CONFIGS: dict[str, type[NotebookConfig]] = {
    "01_logit_lens": LogitLensConfig,
    "02_counting_readout": CountingConfig,
    "03_visual_ignorance": VisualConfig,
    "04_latent_drift": DriftConfig,
    "05_sae_features": SAEStudyConfig,
    "06_tuned_lens_patching": TunedLensPatchingConfig,
    "07_encoded_expressed": EncodedExpressedConfig,
    "08_attribution_graphs": GraphsConfig,
}


def notebook_config(stem: str) -> type[NotebookConfig] | None:
    """The config class of notebook ``stem`` (``None`` for a notebook that is not a registered study)."""
    return NOTEBOOK_CONFIGS.get(stem)
