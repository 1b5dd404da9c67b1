"""Probes: one Probe interface (base), ridge and logistic (linear), MLP (mlp), per-layer fits, features."""
