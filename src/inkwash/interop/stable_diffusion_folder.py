"""Reading a Stable Diffusion pipeline folder (``StableDiffusionPipeline.save_pretrained``): its components,
configs and safetensors weights checked, each problem a one-line ``InkwashError``, then loaded with diffusers'
and transformers' own classes into an ``inkwash.interop.stable_diffusion.StableDiffusion`` pipeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from inkwash.errors import InkwashError
from inkwash.interop.diffusers_folder import INDEX_FILE, read_json, sampling_from_config, schedule_from_config
from inkwash.interop.stable_diffusion import StableDiffusion
from inkwash.interop.text import PromptEncoder

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
COMPONENTS = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "scheduler": ("diffusers", None),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _weights_variant(folder: Path, stem: str, root: Path) -> str | None:
    """The weights variant to load ("fp16" for ``stem.fp16.safetensors``; None for ``stem.safetensors``, sharded
    or not); a one-line error for pickled-only or missing weights."""
    for variant in (None, "fp16"):
        name = stem if variant is None else f"{stem}.{variant}"
        if (folder / f"{name}.safetensors").is_file() or (folder / f"{name}.safetensors.index.json").is_file():
            return variant
    if any(folder.glob("*.bin")) or any(folder.glob("*.ckpt")):
        raise InkwashError(f"{folder} has only pickled .bin weights; convert them to safetensors")
    raise InkwashError(f"{root}: missing the {folder.name} weights ({folder.name}/{stem}.safetensors)")


def _check_index(path: Path, index: dict) -> None:
    kind = index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise InkwashError(f"{path}: {kind} folders are not supported yet (only {' / '.join(SUPPORTED_PIPELINES)})")
    for name, (_, cls) in COMPONENTS.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise InkwashError(f"{path}: {INDEX_FILE} names no {name} component")
        if not (path / name).is_dir():
            raise InkwashError(f"{path}: missing the {name}/ folder")
        if cls is not None and entry[1] not in (cls, cls + "Fast"):
            raise InkwashError(f"{path}: {name} is a {entry[1]}; only {cls} is supported")


def _check_unet(unet: dict, vae: dict, text: dict, where: str) -> None:
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels") != latent:
        raise InkwashError(
            f"{where}: the unet takes {unet.get('in_channels')} input channels, not the VAE's {latent} latent channels"
            " (inpainting UNets with 9 input channels are not supported)"
        )
    if unet.get("out_channels") != latent:
        raise InkwashError(f"{where}: the unet has {unet.get('out_channels')} output channels for {latent} latents")
    for field in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim", "encoder_hid_dim"):
        if unet.get(field) is not None:
            raise InkwashError(f"{where}: unet field {field}={unet[field]!r} is not supported (SDXL and variants)")
    width = unet.get("cross_attention_dim")
    if isinstance(width, int) and width != text.get("hidden_size"):
        given = text.get("hidden_size")
        raise InkwashError(f"{where}: the unet attends to {width}-wide text embeddings, the text encoder gives {given}")
    for field in ("latents_mean", "latents_std"):
        if vae.get(field) is not None:
            raise InkwashError(f"{where}: vae field {field} is not supported (SDXL-style latent normalization)")


def _quiet_loading() -> None:
    """No progress bars or advice from diffusers and transformers while loading: inkwash shows its own."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _load(cls, folder: Path, stem: str, root: Path, dtype: torch.dtype):
    variant = _weights_variant(folder, stem, root)
    # accelerate (where installed) lets the weights load without first initializing a random model
    low_memory = importlib.util.find_spec("accelerate") is not None
    try:
        return cls.from_pretrained(
            folder, use_safetensors=True, torch_dtype=dtype, variant=variant, low_cpu_mem_usage=low_memory
        )
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise InkwashError(f"cannot load {folder} (do its config and weights match?): {message}") from None


def load_stable_diffusion(
    path: str | Path, device: torch.device | str = "cpu", precision: str = "fp32"
) -> StableDiffusion:
    """A ``StableDiffusion`` pipeline for a Stable Diffusion folder; ``precision`` (fp32, fp16, bf16) is the dtype
    its weights are held in."""
    path = Path(path)
    if precision not in DTYPES:
        raise InkwashError(f"precision must be one of {', '.join(DTYPES)} for a Stable Diffusion folder's weights")
    index = read_json(path / INDEX_FILE, INDEX_FILE)
    _check_index(path, index)
    unet_config = read_json(path / "unet" / "config.json", "the unet config")
    vae_config = read_json(path / "vae" / "config.json", "the vae config")
    text_config = read_json(path / "text_encoder" / "config.json", "the text encoder config")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json", "the scheduler config")
    _check_unet(unet_config, vae_config, text_config, str(path))
    schedule, prediction = schedule_from_config(scheduler_config, str(path))
    sampling = sampling_from_config(scheduler_config, str(path))
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise InkwashError(
            "loading a Stable Diffusion folder needs diffusers and transformers (pip install 'inkwash[diffusers]')"
        ) from None
    _quiet_loading()
    dtype = DTYPES[precision]
    unet = _load(UNet2DConditionModel, path / "unet", "diffusion_pytorch_model", path, dtype)
    vae = _load(AutoencoderKL, path / "vae", "diffusion_pytorch_model", path, dtype)
    text_encoder = _load(CLIPTextModel, path / "text_encoder", "model", path, dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    except (OSError, ValueError, TypeError) as exc:
        raise InkwashError(f"cannot load {path / 'tokenizer'}: {str(exc).splitlines()[0]}") from None
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    config = {
        "format": "diffusers",
        "pipeline": index["_class_name"],
        "prediction": prediction,
        "schedule": schedule.config.to_dict(),
        "sampling": {**sampling, "clip_denoised": False},  # latents are not in [-1, 1]
        "unet": {"num_classes": 0},
        "data": {"shape": [3, height * downsample, width * downsample], "class_names": []},
        "latent": {
            "channels": int(vae.config.latent_channels),
            "downsample": downsample,
            "scaling_factor": float(vae.config.scaling_factor),
            "shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0),
        },
        "weights_precision": precision,
    }
    return StableDiffusion(
        unet, vae, PromptEncoder(tokenizer, text_encoder), schedule, config, device=device, checkpoint=path
    )
