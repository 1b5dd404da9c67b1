"""Sparse autoencoders: training, evaluation and artifacts (train), feature scans and selection (features)."""
