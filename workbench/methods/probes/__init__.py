"""Probes: one Probe interface (base), ridge and logistic (linear), MLP (mlp), per-layer fits, features."""

from workbench.methods.probes import linear, mlp  # noqa: F401 - registers the built-in probe types for load_probe
