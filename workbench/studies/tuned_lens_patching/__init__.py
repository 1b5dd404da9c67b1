"""Tuned lens and patching (notebook 06): study driver and explorer."""
