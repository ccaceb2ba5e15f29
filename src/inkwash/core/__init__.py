"""The core every other part builds on: the noise schedule, the network, the denoiser contract
``D(x, sigma, cond) -> x0_hat``, step schedules (sigmas), per-sample random streams and precision."""
