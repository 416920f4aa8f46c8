"""FreeU (Si et al. 2023) for kinema's UNet models, set per call: in the two deepest up blocks, half the backbone
channels are multiplied by `b` and the lowest frequencies of the skip features by `s`.

diffusers keeps FreeU's factors on the UNet's blocks (`enable_freeu`), one setting per model; kinema's video models
may run in several threads with different settings, so here the factors are a per-call setting
(kinema.models.run_setting) that a hook before each affected resnet reads. The resnet's input is diffusers'
`cat([backbone, skip])`, so the hook splits it where the backbone's channels end and applies diffusers' own
`fourier_filter`; tests/models/test_freeu.py proves the result equal to `enable_freeu` on identical weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from diffusers.utils.torch_utils import fourier_filter
from torch import nn

from kinema.models.run_setting import RunSetting
from kinema.pipelines.request import FreeUSettings

if TYPE_CHECKING:  # diffusers' UNet module takes seconds to import, which the DiT models do not need
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

_FREEU: RunSetting[FreeUSettings | None] = RunSetting("freeu", None)


@contextmanager
def freeu(settings: FreeUSettings | None) -> Iterator[None]:
    """Within this block, in this thread (or task), UNet models run with FreeU at `settings` (None: off)."""
    with _FREEU.applied(settings):
        yield


class _FreeUBeforeResnet:
    """Forward pre-hook of one up-block resnet: FreeU on its input `(N, backbone + skip, H, W)`."""

    def __init__(self, stage: int, backbone_channels: int):
        self.stage = stage  # 1 or 2: which pair of factors
        self.backbone_channels = backbone_channels

    def __call__(self, resnet: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        settings = _FREEU.current()
        if settings is None:
            return None
        b, s = (settings.b1, settings.s1) if self.stage == 1 else (settings.b2, settings.s2)
        joined = args[0]
        half = self.backbone_channels // 2
        backbone, skip = joined[:, :self.backbone_channels], joined[:, self.backbone_channels:]
        # diffusers annotates fourier_filter's scale as int; it multiplies a mask, and FreeU's factors are floats.
        filtered = fourier_filter(skip, threshold=1, scale=s)  # type: ignore[arg-type]
        freed = torch.cat([backbone[:, :half] * b, backbone[:, half:], filtered], dim=1)
        return (freed, *args[1:])


def install_freeu_hooks(unet: UNet2DConditionModel) -> None:
    """Hook FreeU before every resnet of the first two up blocks (diffusers' `resolution_idx` 0 and 1, the deepest);
    they do nothing outside a `freeu` block."""
    # The backbone entering up block 0 is the deepest down block's output (the mid block keeps its width); within a
    # block, each resnet's backbone is the previous resnet's output, and the upsampler keeps widths.
    backbone = cast(int, unet.config["block_out_channels"][-1])
    for stage, block in enumerate(unet.up_blocks[:2], start=1):
        for resnet in cast(nn.ModuleList, block.resnets):
            resnet.register_forward_pre_hook(_FreeUBeforeResnet(stage, backbone))
            backbone = cast(int, resnet.out_channels)
