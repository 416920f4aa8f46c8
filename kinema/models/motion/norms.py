"""Frame-aware GroupNorm: the one declaration of the norm modes shared by motion modules and video UNets.

A video GroupNorm either takes its statistics over each frame on its own (`per_frame`) or over all frames of a clip
together (`across_frames`). Motion modules choose with their `norm_mode` setting, a `VideoUNet` its resnets with
`resnet_norm_mode`; both names and both values are stored in saved configs, so they never change.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kinema.errors import KinemaError

NormMode = Literal["per_frame", "across_frames"]
NORM_MODES: tuple[str, ...] = get_args(NormMode)


def check_norm_mode(setting: str, mode: object) -> None:
    """Refuse a value of the norm-mode setting named `setting` (e.g. `resnet_norm_mode`) that is not a `NormMode`."""
    if mode not in NORM_MODES:
        raise KinemaError(f"{setting} must be 'per_frame' or 'across_frames', got {mode!r}")


def video_group_norm(norm: nn.GroupNorm, x: torch.Tensor, mode: NormMode) -> torch.Tensor:
    """GroupNorm of a video `(B, C, F, H, W)` with `norm`'s groups and affine weights, statistics per frame or across
    all frames of a clip; returns `(B, C, F, H, W)`.

    It calls `F.group_norm` rather than `norm` itself, so a GroupNorm subclass can use it in its own `forward`.
    """
    if torch.is_grad_enabled() and not x.requires_grad and not x.is_contiguous():
        # torch 2.13's CPU group_norm backward crashes the process (a segfault) for an input with channels-last
        # strides that needs no gradient while the weights do: a DiT's motion modules training on its frozen tokens.
        x = x.contiguous()
    if mode == "across_frames":
        return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    frames = x.shape[2]
    per_frame = F.group_norm(rearrange(x, "b c f h w -> (b f) c h w"), norm.num_groups, norm.weight, norm.bias,
                             norm.eps)
    return rearrange(per_frame, "(b f) c h w -> b c f h w", f=frames)
