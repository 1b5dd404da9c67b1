"""Transcoders, attribution graphs on the frozen model, their validation and interchange (circuit-tracer)."""
