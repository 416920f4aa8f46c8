"""CLIP prompt encoding for Stable Diffusion 1.5 (AnimateDiff), tokenized as diffusers' SD pipelines do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kinema.errors import KinemaError

SD_TEXT_LENGTH = 77


def text_length(tokenizer: Any, text_encoder: Any) -> int:
    """Tokens per prompt: the tokenizer's `model_max_length` (77 for SD1.5), at most the encoder's positions."""
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", SD_TEXT_LENGTH)
    return int(min(tokenizer.model_max_length, positions))


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: str | Sequence[str]) -> torch.Tensor:
    """CLIP text states `(B, L, D)` for a prompt or a batch of prompts: each padded to the maximum length and
    truncated to it (L = 77 for SD1.5), the text encoder's last hidden state (`text_encoder(ids)[0]`), in the
    encoder's dtype on its device."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch or not all(isinstance(p, str) for p in batch):
        raise KinemaError("prompts must be a string or a non-empty list of strings")
    ids = tokenizer(batch, padding="max_length", max_length=text_length(tokenizer, text_encoder), truncation=True,
                    return_tensors="pt").input_ids
    parameter = next(text_encoder.parameters())
    with torch.no_grad():
        states = text_encoder(ids.to(parameter.device))[0]
    return states.to(parameter.dtype)
