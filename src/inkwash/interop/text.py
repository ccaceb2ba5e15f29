"""Text prompts to the embeddings a Stable Diffusion UNet attends to, with a CLIP tokenizer and text encoder from
a pipeline folder, in one of two ways:

- ``emphasis=False``: as diffusers' ``StableDiffusionPipeline.encode_prompt`` (padded to the tokenizer's full
  length, truncated past it, the last hidden state), so the same prompt gives the same embeddings.
- ``emphasis=True``: as the Stable Diffusion WebUI (``prompt_syntax``): ``(word:1.3)``, ``(word)``, ``[word]``
  and ``BREAK``; the tokens are laid out in chunks of 75, each encoded as BOS + tokens + EOS + padding (77
  positions, the layout diffusers gives a prompt) and the chunks concatenated, (1, 77 k, D). Each chunk's
  hidden states are multiplied by their tokens' weights, then rescaled so that their mean is what it was. A
  prompt without emphasis of at most 75 tokens gives exactly diffusers' embeddings.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from inkwash.interop.prompt_syntax import chunk_tokens, parse_attention


class PromptEncoder:
    """``encode(prompts, emphasis=...) -> (N, L, D)`` with a CLIP tokenizer and text encoder; embeddings of the
    same prompt are computed once and kept (a server sees the same prompts again and again)."""

    def __init__(self, tokenizer, text_encoder: nn.Module, cache_size: int = 64) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.max_length = int(tokenizer.model_max_length)
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        self.cache: dict[tuple[str, bool], torch.Tensor] = {}
        self.cache_size = cache_size
        self.comma = tokenizer.get_vocab().get(",</w>")

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(self.device) if self.use_attention_mask else None
        with torch.no_grad():
            hidden = self.text_encoder(ids.to(self.device), attention_mask=mask)[0]  # (1, L, D)
        return hidden.float().cpu()

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
        return self._hidden(tokens.input_ids, tokens.attention_mask)

    def chunks(self, prompt: str) -> list[tuple[list[int], list[float]]]:
        """The WebUI's chunks of ``prompt``: ``[(ids, weights), ...]``, each 77 long with BOS, EOS and padding."""
        fragments = parse_attention(prompt)
        texts = [text for text, weight in fragments if weight is not None]
        tokenized = iter(self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"])
        tokens = [(next(tokenized) if weight is not None else [], weight) for _, weight in fragments]
        length = self.max_length - 2
        bos, eos, pad = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        laid_out = []
        for ids, weights in chunk_tokens(tokens, chunk_length=length, comma=self.comma):
            padding = length - len(ids)
            laid_out.append(([bos, *ids, eos] + [pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding))
        return laid_out

    def _encode_weighted(self, prompt: str) -> torch.Tensor:
        out = []
        for ids, weights in self.chunks(prompt):
            ids_tensor = torch.tensor([ids])
            # diffusers' attention mask: BOS, the tokens and EOS (the first EOS; padding may be EOS too)
            first_eos = ids.index(self.tokenizer.eos_token_id, 1)
            mask = (torch.arange(len(ids)) <= first_eos).long()[None]
            z = self._hidden(ids_tensor, mask)  # (1, 77, D)
            if any(weight != 1.0 for weight in weights):
                original_mean = z.mean()
                z = z * torch.tensor(weights, dtype=z.dtype)[None, :, None]
                z = z * (original_mean / z.mean())
            out.append(z)
        return torch.cat(out, dim=1)

    def encode(self, prompts: list[str], *, warn: bool = False, emphasis: bool = False) -> torch.Tensor:
        """(N, L, D) float32 embeddings on the CPU, one row per prompt; with ``emphasis`` the WebUI's syntax and
        chunks (a prompt of fewer chunks than the longest is padded with ``pad_chunks``)."""
        rows = []
        for prompt in prompts:
            key = (prompt, emphasis)
            if key not in self.cache:
                if len(self.cache) >= self.cache_size:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[key] = self._encode_weighted(prompt) if emphasis else self._encode_one(prompt, warn)
            rows.append(self.cache[key])
        longest = max(row.shape[1] for row in rows)
        return torch.cat([self.pad_chunks(row, longest) for row in rows])

    def pad_chunks(self, embeddings: torch.Tensor, length: int) -> torch.Tensor:
        """(N, L, D) -> (N, length, D), appending the empty prompt's chunks, as the WebUI pads the shorter of the
        prompt and the negative prompt."""
        missing = length - embeddings.shape[1]
        if missing <= 0:
            return embeddings
        empty = self.encode([""], emphasis=True)  # (1, 77, D)
        if missing % empty.shape[1]:
            raise ValueError(f"cannot pad {embeddings.shape[1]} positions to {length} with chunks of {empty.shape[1]}")
        filler = empty.repeat(embeddings.shape[0], missing // empty.shape[1], 1)
        return torch.cat([embeddings, filler], dim=1)
