"""Interactive explorers: the shared widget skeleton (base) and the logit-lens explorer (lens)."""
