"""One subpackage per research thread: counting, visual, drift, sae. Each owns its config, result, plots, explorer."""
