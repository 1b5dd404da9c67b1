"""Methods on top of the core: logit lens, probes, SAEs, latent loops, routing, VQA answering, blur."""
