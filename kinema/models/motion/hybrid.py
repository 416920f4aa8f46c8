"""EasyAnimate V3's Hybrid Motion Module: a temporal attention, then a global attention over all frames x positions.

It is the temporal module with a different attention pattern, so it shares every weight name with it and only
changes the default `attention_kinds`. EasyAnimate alternates it with the plain temporal module block by block;
the DiT expresses that as a per-block list of specs.
"""

from kinema.models.motion.registry import register_motion_module
from kinema.models.motion.temporal import AttentionKind, TemporalMotionModule


@register_motion_module("hybrid")
class HybridMotionModule(TemporalMotionModule):
    """Temporal self-attention followed by global self-attention over the whole clip, `(B, C, F, H, W)` in and out."""

    default_attention_kinds: tuple[AttentionKind, ...] = ("temporal", "global")
