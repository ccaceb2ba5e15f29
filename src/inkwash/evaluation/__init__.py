"""Evaluation: FID / KID / precision-recall / SWD / bits-per-dim, their feature networks and reference
data, and the Gaussian-mixture oracle that measures samplers without a trained network."""
