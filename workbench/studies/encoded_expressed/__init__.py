"""Encoded vs expressed (all three threads): the gap panel per layer or latent step, and three replications."""
