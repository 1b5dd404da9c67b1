"""The logit-lens notebook (01) as a study: its config, result and one run call."""
