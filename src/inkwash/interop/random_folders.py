"""Random-weight diffusers folders built here, with no download: the test suite's tiny pipelines and the
benchmarks' full-size Stable Diffusion 1.5 layout. The weights are random, so the images mean nothing; the
folders exercise the same loading, sampling and decoding code as a real model of the same shape.

The CLIP tokenizer's vocabulary is written here too: every printable byte as its own token and as a word end
(``"a"`` and ``"a</w>"``), the two special tokens, and no merges, so any prompt tokenizes, one token per
character.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Stable Diffusion 1.5's component configurations (the fields that set its shape; the rest are diffusers'
# and transformers' defaults). The scheduler is SD 1.5's PNDMScheduler config.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
}
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# A tiny pipeline of the same layout: 64x64 images, 8x8 latents (the VAE still downsamples 8 times).
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 4,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (4, 4, 8, 8),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 2,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TINY_TEXT = {
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "vocab_size": 600,
    "hidden_act": "quick_gelu",
}
SIZES = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT)}


def _byte_characters() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) stands for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters, extra = [], 0
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + extra))
            extra += 1
    return characters


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> int:
    """A CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) whose vocabulary is every byte
    character alone and as a word end; returns the vocabulary's size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for character in _byte_characters():
        vocab[character] = len(vocab)
    for character in _byte_characters():
        vocab[character + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


def build_stable_diffusion(path: str | Path, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """Write a ``StableDiffusionPipeline`` folder with random weights (safetensors) to ``path`` and return the
    diffusers pipeline. ``size`` is "tiny" (64x64 images, a few hundred kB) or "sd15" (Stable Diffusion 1.5's
    shapes: about 1.07 billion parameters)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    unet_config, vae_config, text_config = SIZES[size]
    path = Path(path)
    tokenizer_dir = path / "tokenizer"
    vocab_size = write_clip_tokenizer(tokenizer_dir, text_config["max_position_embeddings"])
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**vae_config)
    text_config = {**text_config, "vocab_size": max(text_config["vocab_size"], vocab_size)}
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text_config, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    # As SD 1.5 ships it: its PNDMScheduler config carries DDIM's clip_sample and set_alpha_to_one too.
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    saved = json.loads(scheduler_file.read_text(encoding="utf-8"))
    scheduler_file.write_text(json.dumps({**saved, **SD15_SCHEDULER}, indent=2) + "\n", encoding="utf-8")
    return pipe
