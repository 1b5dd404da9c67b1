"""Sparse-autoencoder study: train/load, evaluate and scan the SAEs of a model; plots."""
