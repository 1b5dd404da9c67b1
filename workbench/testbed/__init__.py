"""The built-in VLM testbed: a LLaVA model assembled from packaged parts; registers its names with the zoo."""

from workbench.testbed.model import *  # noqa: F401,F403 - `from workbench.testbed import load_testbed` keeps working
