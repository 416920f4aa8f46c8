"""How strongly motion modules act, set per call: ComfyUI-AnimateDiff-Evolved's motion `scale` and `effect`.

- `effect` scales each motion module's residual: `x + effect * module_residual(x)`. 0 leaves the image model alone
  (every frame its own picture), 1 is the module as trained; in between, less motion.
- `scale` multiplies the keys of every motion-module attention, so the attention logits: a softmax temperature.
  Above 1 each frame attends to fewer frames (sharper, often more motion), below 1 to more (smoother, less).

Both are a per-call setting (kinema.models.run_setting) that `motion_strength` sets around a forward pass, not
stored on the model, so one model can run in several threads with different strengths.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kinema.errors import KinemaError
from kinema.models.run_setting import RunSetting
from kinema.pipelines.request import check_motion_strength


@dataclass(frozen=True)
class MotionStrength:
    """`scale`: factor on the motion attentions' keys (> 0); `effect`: factor on the motion modules' residual
    (>= 0). 1 and 1 run the modules as trained."""

    scale: float = 1.0
    effect: float = 1.0

    def __post_init__(self) -> None:
        check_motion_strength(self.scale, self.effect)


AS_TRAINED = MotionStrength()
_STRENGTH = RunSetting("motion_strength", AS_TRAINED)


@contextmanager
def motion_strength(scale: float = 1.0, effect: float = 1.0) -> Iterator[None]:
    """Within this block, in this thread (or task), every motion module runs at this strength."""
    with _STRENGTH.applied(MotionStrength(scale, effect)):
        yield


def current_motion_strength() -> MotionStrength:
    """The strength set by the enclosing `motion_strength` (`AS_TRAINED` outside one)."""
    return _STRENGTH.current()


class MotionAttnProcessor:
    """diffusers' fused-SDPA attention (`AttnProcessor2_0`) for the `Attention` layers of motion modules, which kinema
    builds without masks, norms or residuals, with the keys multiplied by the running motion `scale`.

    kinema's own because `AttnProcessor2_0` ignores `Attention.scale` (it has no way to change the logits' scale);
    tests/models/motion/test_temporal.py proves the two equal at scale 1. It calls the layer's own projections, so
    LoRA-wrapped and quantised projections work as they do under diffusers' processor.
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **unused: Any) -> torch.Tensor:
        """`(B, L, C)` queries' tokens (and `(B, S, D)` keys' tokens for cross-attention) -> `(B, L, C)`."""
        if attention_mask is not None:
            raise KinemaError("motion-module attentions take no attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        heads = attn.heads
        query, key, value = (projection.view(batch, -1, heads, projection.shape[-1] // heads).transpose(1, 2)
                             for projection in (attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)))
        scale = current_motion_strength().scale
        if scale == 1:  # exactly diffusers' call
            out = F.scaled_dot_product_attention(query, key, value)
        else:  # (q . scale * k) / sqrt(d)
            out = F.scaled_dot_product_attention(query, key, value, scale=scale / math.sqrt(query.shape[-1]))
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))
