"""Activation store (placeholder replaced below)."""
