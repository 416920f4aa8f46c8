"""A ControlNet steering a VideoUNet frame by frame: diffusers' `ControlNetModel` run on the frames folded into the
batch, as diffusers' `AnimateDiffControlNetPipeline` runs it. Its residuals go to the VideoUNet's forward as
diffusers' UNet takes them (`down_block_additional_residuals`, `mid_block_additional_residual`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from einops import rearrange
from torch import nn

from kinema.errors import KinemaError
from kinema.models.video_model import Timestep, timesteps_per_clip


def frame_residuals(residuals: dict[str, Any], rows: torch.Tensor, total: int,
                    weights: torch.Tensor | None = None) -> dict[str, Any]:
    """ControlNet residuals computed for some folded frames, placed at their `rows` of `total` rows (zeros
    elsewhere) and, given `weights` `(len(rows),)`, each row's multiplied by its weight."""

    def placed(residual: torch.Tensor) -> torch.Tensor:
        full = residual.new_zeros(total, *residual.shape[1:])
        full[rows] = residual if weights is None else residual * weights.view(-1, *[1] * (residual.ndim - 1))
        return full

    return {"down_block_additional_residuals": tuple(placed(r) for r in residuals["down_block_additional_residuals"]),
            "mid_block_additional_residual": placed(residuals["mid_block_additional_residual"])}


class VideoControlNet(nn.Module):
    """A loaded ControlNet and the weight of its residuals.

    Args:
        controlnet: a diffusers `ControlNetModel` for the VideoUNet's 2D UNet.
        scale: what its residuals are multiplied by (diffusers' `controlnet_conditioning_scale`): 0 no control,
            1 as trained.
        path: where it was loaded from, recorded in the settings.
    """

    def __init__(self, controlnet: nn.Module, scale: float = 1.0, path: str | None = None):
        super().__init__()
        self.controlnet: Any = controlnet  # typed Any: nn.Module types its attributes as `Tensor | Module`
        self.scale = scale
        self.path = path

    @property
    def conditioning_channels(self) -> int:
        """Channels of the control images (3: RGB)."""
        return int(self.controlnet.config.conditioning_channels)

    @property
    def pools_globally(self) -> bool:
        """Whether its residuals are pooled over the image (`global_pool_conditions`, as in the shuffle ControlNet):
        such a ControlNet is trained for guess mode, which diffusers then turns on whatever was asked."""
        return bool(self.controlnet.config.global_pool_conditions)

    def forward(self, sample: torch.Tensor, timestep: Timestep, text: torch.Tensor, control: torch.Tensor,
                mask: torch.Tensor | None = None, guess_mode: bool = False) -> dict[str, Any]:
        """The residuals for one VideoUNet call, as its keyword arguments.

        Args:
            sample: noisy latents `(B, C, F, h, w)`.
            timestep: as `VideoUNet.forward` takes it.
            text: text states per frame, folded `(B*F, L, D)` (row `b*F + f`).
            control: control images `(B, 3, F, H, W)` in [0, 1], H and W the video's (8h, 8w).
            mask: how strongly each frame is steered, `(B, 1, F, 1, 1)`: 1 as `scale` says, 0 not at all (the
                ControlNet skips those frames), between for the neighbours of keyframes (`control_weights`); None:
                every frame fully.
            guess_mode: scale the residuals from 0.1 at the first level to 1 at the middle block (diffusers'
                `guess_mode`; ControlNet's guess mode also leaves the unprompted half of guidance unsteered, which
                the denoiser does).

        Returns:
            `{"down_block_additional_residuals": (...), "mid_block_additional_residual": ...}`, each folded
            `(B*F, ...)`.
        """
        batch, _, frames = sample.shape[:3]
        if control.ndim != 5 or control.shape[:3] != (batch, self.conditioning_channels, frames):
            raise KinemaError(f"control images {tuple(control.shape)} do not fit latents {tuple(sample.shape)}; give "
                              f"(B, {self.conditioning_channels}, F, H, W) = ({batch}, {self.conditioning_channels}, "
                              f"{frames}, H, W), one image per frame")
        if mask is not None and mask.shape != (batch, 1, frames, 1, 1):
            raise KinemaError(f"a ControlNet's frame weights are (B, 1, F, 1, 1) = ({batch}, 1, {frames}, 1, 1), one "
                              f"per frame; got {tuple(mask.shape)}")
        timestep = timesteps_per_clip(timestep, batch, sample.device).repeat_interleave(frames)
        latents = rearrange(sample, "b c f h w -> (b f) c h w")
        images = rearrange(control, "b c f h w -> (b f) c h w")
        weights = None if mask is None else mask.reshape(batch * frames).to(sample.device)
        if weights is not None:
            rows = weights.nonzero().flatten()
            if len(rows) == 0:
                return {}
            latents, timestep, text, images = latents[rows], timestep[rows], text[rows], images[rows]
        down, mid = self.controlnet(latents, timestep, encoder_hidden_states=text, controlnet_cond=images,
                                    conditioning_scale=self.scale, guess_mode=guess_mode, return_dict=False)
        residuals = {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
        return residuals if weights is None else frame_residuals(residuals, rows, batch * frames,
                                                                 weights[rows].to(mid))


class VideoSparseControlNet(VideoControlNet):
    """AnimateDiff v3's SparseCtrl: a diffusers `SparseControlNetModel` (a ControlNet with motion modules of its
    own) steering a video from a few keyframes, each marked in a 0/1 mask; the other frames' condition is zero.

    Args:
        controlnet: the `SparseControlNetModel`.
        scale, path: as `VideoControlNet`'s.
    """

    @property
    def latent_condition(self) -> bool:
        """Whether the keyframes are given as VAE latents (the RGB variant) rather than pixels (scribble)."""
        return bool(self.controlnet.config.use_simplified_condition_embedding)

    def forward(self, sample: torch.Tensor, timestep: Timestep, text: torch.Tensor, control: torch.Tensor,
                mask: torch.Tensor | None = None, guess_mode: bool = False) -> dict[str, Any]:
        """The residuals for one VideoUNet call, as its keyword arguments.

        Args:
            sample: noisy latents `(B, C, F, h, w)` (SparseCtrl reads only their shape: it zeroes them).
            timestep: as `VideoUNet.forward` takes it.
            text: text states per frame, folded `(B*F, L, D)`.
            control: the keyframes in place, zeros elsewhere: latents `(B, 4, F, h, w)` (RGB) or images
                `(B, 3, F, H, W)` in [0, 1] (scribble).
            mask: `(B, 1, F, ...)` of control's size, 1 at the keyframes.
            guess_mode: as `VideoControlNet.forward`'s.

        Returns:
            `{"down_block_additional_residuals": (...), "mid_block_additional_residual": ...}`, folded `(B*F, ...)`.
        """
        batch, _, frames = sample.shape[:3]
        channels = self.conditioning_channels
        if mask is None or control.ndim != 5 or control.shape[:3] != (batch, channels, frames) \
                or mask.shape != (batch, 1, *control.shape[2:]):
            raise KinemaError(f"SparseCtrl takes keyframes (B, {channels}, F, ...) = ({batch}, {channels}, {frames}, "
                              f"...) and their mask (B, 1, F, ...); got {tuple(control.shape)} and "
                              f"{None if mask is None else tuple(mask.shape)}")
        down, mid = self.controlnet(
            sample, timesteps_per_clip(timestep, batch, sample.device), encoder_hidden_states=text,
            controlnet_cond=control, conditioning_mask=mask, conditioning_scale=self.scale, guess_mode=guess_mode,
            return_dict=False)
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


class VideoMultiControlNet(nn.Module):
    """Several ControlNets steering one VideoUNet at once (a pose and a depth map, say): each reads its own control
    images, given one after another along the channels of `control`, and their residuals add up, as diffusers'
    `MultiControlNetModel` adds them.

    Args:
        nets: the `VideoControlNet`s, each at its own scale (SparseCtrl, whose keyframes and mask are its own, is
            not among them).
    """

    def __init__(self, nets: Sequence[VideoControlNet]):
        super().__init__()
        if len(nets) < 2 or any(isinstance(net, VideoSparseControlNet) for net in nets):
            raise KinemaError("several ControlNets steer together when there are two or more and none is SparseCtrl, "
                              "whose keyframes are its own; give SparseCtrl alone")
        self.nets = nn.ModuleList(nets)

    @property
    def _nets(self) -> list[VideoControlNet]:
        """`nets`, typed: a ModuleList gives its items as plain Modules."""
        return [cast(VideoControlNet, net) for net in self.nets]

    @property
    def path(self) -> list[str | None]:
        """Where each was loaded from."""
        return [net.path for net in self._nets]

    @property
    def scale(self) -> list[float]:
        """Each one's scale."""
        return [net.scale for net in self._nets]

    @property
    def conditioning_channels(self) -> int:
        """Channels of all the control images together (3 per ControlNet)."""
        return sum(net.conditioning_channels for net in self._nets)

    @property
    def pools_globally(self) -> bool:
        """The first ControlNet's `pools_globally`: diffusers' MultiControlNet reads guess mode's default there."""
        return self._nets[0].pools_globally

    def forward(self, sample: torch.Tensor, timestep: Timestep, text: torch.Tensor, control: torch.Tensor,
                mask: torch.Tensor | None = None, guess_mode: bool = False) -> dict[str, Any]:
        """The summed residuals for one VideoUNet call; `control` `(B, 3K, F, H, W)` holds the K ControlNets'
        control images in their order, and `mask` `(B, K, F, 1, 1)`, if given, their frame weights (see
        `VideoControlNet.forward`)."""
        if control.ndim != 5 or control.shape[1] != self.conditioning_channels:
            raise KinemaError(f"control images {tuple(control.shape)} do not hold the {len(self.nets)} ControlNets' "
                              f"{self.conditioning_channels} channels; give (B, {self.conditioning_channels}, F, H, W)")
        if mask is not None and (mask.ndim != 5 or mask.shape[1] != len(self.nets)):
            raise KinemaError(f"frame weights {tuple(mask.shape)} do not hold one channel per ControlNet; give (B, "
                              f"{len(self.nets)}, F, 1, 1)")
        widths = [net.conditioning_channels for net in self._nets]
        weights = [None] * len(self.nets) if mask is None else list(mask.split(1, dim=1))
        total: dict[str, Any] = {}
        for net, part, weight in zip(self._nets, control.split(widths, dim=1), weights, strict=True):
            out = net(sample, timestep, text, part, weight, guess_mode=guess_mode)
            if not total or not out:  # a ControlNet that steers none of these frames adds nothing
                total = total or out
                continue
            total = {"down_block_additional_residuals": tuple(
                a + b for a, b in zip(total["down_block_additional_residuals"], out["down_block_additional_residuals"],
                                      strict=True)),
                "mid_block_additional_residual": total["mid_block_additional_residual"]
                + out["mid_block_additional_residual"]}
        return total
