"""Sampling: the samplers (pure functions over sigmas), batched generation with per-image seeds,
classifier-free guidance and img2img / inpainting, all through the denoiser contract."""
