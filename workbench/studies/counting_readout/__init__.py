"""Counting readout geometry (thread 1): study driver, answer evaluation, geometry, interventions, plots, explorer."""
