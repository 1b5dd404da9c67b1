"""Methods: activations, logit/tuned lens, patching, probes, SAEs, latent loops, gap panel, routing, VQA, blur."""
