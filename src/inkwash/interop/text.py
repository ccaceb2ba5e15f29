"""Text prompts to the embeddings a Stable Diffusion UNet attends to: a CLIP tokenizer and text encoder from a
pipeline folder, used as diffusers' ``StableDiffusionPipeline.encode_prompt`` uses them (padded to the
tokenizer's full length, truncated past it, the last hidden state), so the same prompt gives the same
embeddings."""

from __future__ import annotations

import sys

import torch
from torch import nn


class PromptEncoder:
    """``encode(prompts) -> (N, L, D)`` with a CLIP tokenizer and text encoder; embeddings of the same prompt are
    computed once and kept (a server sees the same prompts again and again)."""

    def __init__(self, tokenizer, text_encoder: nn.Module, cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.max_length = int(tokenizer.model_max_length)
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        self.cache: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def _encode_one(self, prompt: str, warn: bool) -> torch.Tensor:
        tokens = self.tokenizer(
            prompt, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        if warn:
            full = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] > self.max_length:
                print(
                    f"note: the prompt is {full.shape[-1]} tokens long; only the first {self.max_length} are used",
                    file=sys.stderr,
                )
        mask = tokens.attention_mask.to(self.device) if self.use_attention_mask else None
        with torch.no_grad():
            hidden = self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]  # (1, L, D)
        return hidden.float().cpu()

    def encode(self, prompts: list[str], *, warn: bool = False) -> torch.Tensor:
        """(N, L, D) float32 embeddings on the CPU, one row per prompt."""
        rows = []
        for prompt in prompts:
            if prompt not in self.cache:
                if len(self.cache) >= self.cache_size:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[prompt] = self._encode_one(prompt, warn)
            rows.append(self.cache[prompt])
        return torch.cat(rows)
