"""Models from other libraries: diffusers pipeline folders loaded as inkwash pipelines (pixel-space DDPM /
DDIM folders in ``diffusers_folder``, Stable Diffusion in ``stable_diffusion`` with its prompts in ``text``),
inkwash runs written as diffusers folders (``export``), and small random folders of each kind built locally
for tests and benchmarks (``random_folders``). diffusers and transformers are imported only when used."""
