"""Primitives: architecture map, sites, trace, swap, VLM inputs, models and the zoo, activation store, remote."""
