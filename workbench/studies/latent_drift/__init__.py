"""Latent-reasoning drift (thread 3): study driver, drift metrics, plots, explorer."""
