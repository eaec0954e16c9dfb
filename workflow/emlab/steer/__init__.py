"""Steering with named directions: direction sets, steered sampling of many conditions, and the
analysis of the graded samples (the latent screen and strength sweeps)."""
