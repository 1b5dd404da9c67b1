"""Tiny random models for offline tests."""
