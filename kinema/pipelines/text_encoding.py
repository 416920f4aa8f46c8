"""Prompt encoding: CLIP for Stable Diffusion 1.5 (AnimateDiff), tokenized as diffusers' SD pipelines do, and masked
encoders for EasyAnimate V3 (T5, tokenized as its pipeline does (PixArt-alpha's), or a BERT such as the MiniLM that
kinema's bundled models name in their kinema.json)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from kinema.errors import KinemaError, shorten

logger = logging.getLogger(__name__)

SD_TEXT_LENGTH = 77
# T5 tokens per prompt in EasyAnimate V3 (its pipeline's max_sequence_length and its training's tokenizer_max_length).
T5_TEXT_LENGTH = 120


# transformers' fast tokenizers set padding and truncation on the shared Rust tokenizer before each call, so two
# threads sharing a model (a server's) could pad one's prompts by the other's settings: every call here takes turns.
_TOKENIZER_LOCK = threading.Lock()


def _tokenize(tokenizer: Any, text: Any, **options: Any) -> Any:
    with _TOKENIZER_LOCK:
        return tokenizer(text, **options)


def text_length(tokenizer: Any, text_encoder: Any) -> int:
    """Tokens per prompt: the tokenizer's `model_max_length` (77 for SD1.5), at most the encoder's positions."""
    positions = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", SD_TEXT_LENGTH)
    return int(min(tokenizer.model_max_length, positions))


def cut_off_text(tokenizer: Any, prompt: str, max_length: int) -> str | None:
    """The end of `prompt` that an encoder reading `max_length` tokens (its special tokens included, as the encoders
    here tokenize) never sees, as text; None when the whole prompt fits."""
    special = len(_tokenize(tokenizer, "", add_special_tokens=True).input_ids)  # CLIP and BERT: 2, T5: 1
    # verbose=False: transformers' own warning names token indices, not the words that are lost.
    ids = _tokenize(tokenizer, prompt, add_special_tokens=False, verbose=False).input_ids
    kept = max(max_length - special, 0)
    return None if len(ids) <= kept else tokenizer.decode(ids[kept:]).strip()


WORLD_WARNING = ("the bundled models only know coloured shapes: a circle, square or triangle in red, green, blue, "
                 "yellow, white, purple, orange or cyan, moving left, right, up or down, growing, shrinking, rotating "
                 "or still (e.g. \"a red circle moving right\"); the video for %r will not show what it asks for")


class PromptWorld:
    """The prompts a model knows, from the world its kinema.json declares ("synth": the synthetic dataset's coloured
    shapes). `check` logs one warning for a prompt outside it; the video is made either way."""

    def __init__(self, world: str) -> None:
        if world != "synth":
            raise KinemaError(f"unknown model world {world!r}; kinema knows synth")
        self.world = world

    def check(self, prompts: Sequence[str]) -> None:
        """Warn (kinema's logger) once for the first non-empty prompt of `prompts` outside the world: the prompts
        of one video, asked for (not the negative prompt, which the video avoids)."""
        from kinema.data.synth import in_synth_world

        outside = next((p for p in prompts if p.strip() and not in_synth_world(p)), None)
        if outside is not None:
            logger.warning(WORLD_WARNING, shorten(outside, 200))


def _prompt_batch(prompts: str | Sequence[str]) -> list[str]:
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch or not all(isinstance(p, str) for p in batch):
        raise KinemaError("prompts must be a string or a non-empty list of strings")
    return batch


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: str | Sequence[str], clip_skip: int = 1
                   ) -> torch.Tensor:
    """CLIP text states `(B, L, D)` for a prompt or a batch of prompts: each padded to the maximum length and
    truncated to it (L = 77 for SD1.5), the text encoder's last hidden state (`text_encoder(ids)[0]`), in the
    encoder's dtype on its device. `clip_skip` N > 1 takes the hidden state N layers from the end instead (2: the
    one before the last), through CLIP's final layer norm, as A1111 and animatediff-cli-prompt-travel count it
    (diffusers' `clip_skip` is N - 1)."""
    batch = _prompt_batch(prompts)
    check_clip_skip(text_encoder, clip_skip)
    ids = _tokenize(tokenizer, batch, padding="max_length", max_length=text_length(tokenizer, text_encoder),
                    truncation=True, return_tensors="pt").input_ids
    parameter = next(text_encoder.parameters())
    with torch.no_grad():
        if clip_skip == 1:
            states = text_encoder(ids.to(parameter.device))[0]
        else:
            hidden = text_encoder(ids.to(parameter.device), output_hidden_states=True).hidden_states[-clip_skip]
            states = _final_layer_norm(text_encoder)(hidden)
    return states.to(parameter.dtype)


def _final_layer_norm(text_encoder: Any) -> Any:
    """A CLIP text model's final layer norm: transformers 5 holds it on the model itself, 4 on its `text_model`
    (where diffusers' `encode_prompt` still looks, so its clip_skip fails with transformers 5); None for others."""
    return getattr(getattr(text_encoder, "text_model", text_encoder), "final_layer_norm", None)


def check_clip_skip(text_encoder: Any, clip_skip: int) -> None:
    """One KinemaError line unless `clip_skip` is 1, or a layer count from the end that `text_encoder`, a CLIP text
    model, has."""
    if clip_skip == 1:
        return
    if _final_layer_norm(text_encoder) is None:
        raise KinemaError(f"clip_skip {clip_skip} skips layers of a CLIP text encoder, and this model's is "
                          f"{type(text_encoder).__name__}: drop clip_skip (--clip-skip)")
    layers = int(text_encoder.config.num_hidden_layers)
    if not 1 <= clip_skip <= layers:
        raise KinemaError(f"clip_skip {clip_skip} is more layers than the text encoder's {layers}; give 1 (the last "
                          f"layer) to {layers}, usually 2")


def encode_masked_prompts(text_encoder: Any, tokenizer: Any, prompts: str | Sequence[str],
                          max_length: int = T5_TEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states `(B, max_length, D)` and their attention mask `(B, max_length)` for a prompt or a batch, from an
    encoder that takes token ids and an attention mask and gives `last_hidden_state` (T5's encoder, BERT).

    Each prompt is tokenized with the tokenizer's special tokens (T5: the end-of-sequence token; BERT: [CLS] and
    [SEP]), truncated to `max_length` tokens and padded to it; the mask is 1 on the real tokens (special tokens
    included) and 0 on the padding. The encoder runs with that mask, so the padding does not change the real tokens'
    states, and the states are its last hidden state in the encoder's dtype on its device (the mask is int64, on the
    same device). Prompts are encoded as given: EasyAnimate's lower-casing is `EasyAnimateFamily.encode_text`'s.
    """
    batch = _prompt_batch(prompts)
    if max_length < 1:
        raise KinemaError(f"max_length must be at least 1 token, got {max_length}")
    tokens = _tokenize(tokenizer, batch, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    parameter = next(text_encoder.parameters())
    ids, mask = tokens.input_ids.to(parameter.device), tokens.attention_mask.to(parameter.device)
    with torch.no_grad():
        states = text_encoder(ids, attention_mask=mask).last_hidden_state
    return states.to(parameter.dtype), mask


# The name EasyAnimate's T5 path has always used; the same function.
encode_t5_prompts = encode_masked_prompts
