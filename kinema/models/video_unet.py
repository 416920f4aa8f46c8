"""Video UNet: a diffusers `UNet2DConditionModel` inflated with motion modules where AnimateDiff places them.

The 2D UNet is reused as it is, not copied. Frames are folded into the batch once at entry, `(B, C, F, H, W) ->
(B*F, C, H, W)`, and unfolded at exit. Each motion module runs as a forward hook on the spatial layer it follows
(the attention of a resnet/attention pair, or the resnet where a block has no attention), so the diffusers blocks'
own loops, gradient checkpointing and skip bookkeeping stay untouched and skip tensors are taken after the module.
Modules live at `down_blocks.i.motion_modules.j` (2 per down block), `up_blocks.i.motion_modules.j` (3 per up block)
and optionally `mid_block.motion_modules.0`: the names of published AnimateDiff checkpoints under the `unet.` prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from torch import nn

from kinema.errors import KinemaError
from kinema.models.motion import build_motion_module, check_frame_count
from kinema.state_dicts import StrictFromPretrained, key_mismatch, shapes

ResnetNormMode = Literal["per_frame", "across_frames"]


class _FrameCount:
    """Frames per clip of the forward pass in progress, shared by the hooks and frame-aware norms."""

    value: int = 1


class AcrossFramesGroupNorm(nn.GroupNorm):
    """GroupNorm on folded video `(B*F, C, H, W)` whose statistics span all F frames of a clip.

    This is how AnimateDiff v1 normalises resnets (a plain GroupNorm on the 5-D tensor); v2/v3 and diffusers
    normalise each frame on its own. Same parameters as `nn.GroupNorm`, so state-dict keys do not change.
    """

    def __init__(self, norm: nn.GroupNorm, frames: _FrameCount):
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        self.load_state_dict(norm.state_dict())
        self._frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        video = rearrange(x, "(b f) c h w -> b c f h w", f=self._frames.value)
        return rearrange(super().forward(video), "b c f h w -> (b f) c h w")


@dataclass(frozen=True)
class MotionSlot:
    """Where one motion module sits: its name, its width and the spatial layer whose output it transforms."""

    name: str
    channels: int
    after: nn.Module


def motion_slots(unet: UNet2DConditionModel, mid_block: bool) -> Iterator[MotionSlot]:
    """AnimateDiff's placement: after each resnet/attention pair of every down and up block, and the mid attention."""
    for kind, blocks in (("down_blocks", unet.down_blocks), ("up_blocks", unet.up_blocks)):
        for i, block in enumerate(blocks):
            layers = block.attentions if hasattr(block, "attentions") else block.resnets
            for j, layer in enumerate(layers):
                yield MotionSlot(f"{kind}.{i}.motion_modules.{j}", block.resnets[j].out_channels, layer)
    if mid_block:
        if not hasattr(unet.mid_block, "attentions"):
            raise KinemaError("a mid-block motion module needs a UNet whose mid block has attention")
        yield MotionSlot("mid_block.motion_modules.0", unet.mid_block.resnets[0].out_channels,
                         unet.mid_block.attentions[0])


class VideoUNet(StrictFromPretrained, ModelMixin, ConfigMixin):
    """A 2D text-to-image UNet that denoises video `(B, C, F, H, W)` through inserted motion modules.

    Args:
        unet_config: the `UNet2DConditionModel` config (a dict), e.g. SD1.5's.
        motion_module: spec of every motion module, `{"type": "temporal", "max_frames": 32, ...}` (registry name
            plus its settings).
        motion_mid_block: also put a motion module in the mid block (AnimateDiff v2).
        resnet_norm_mode: resnet and output GroupNorm statistics `per_frame` (v2/v3, diffusers) or
            `across_frames` (v1).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        motion_module: dict[str, Any] | None = None,
        motion_mid_block: bool = False,
        resnet_norm_mode: ResnetNormMode = "per_frame",
    ):
        super().__init__()
        if resnet_norm_mode not in ("per_frame", "across_frames"):
            raise KinemaError(f"resnet_norm_mode must be 'per_frame' or 'across_frames', got {resnet_norm_mode!r}")
        self.unet = UNet2DConditionModel.from_config(unet_config)
        self._frames = _FrameCount()
        spec = motion_module or {"type": "temporal"}
        for slot in motion_slots(self.unet, motion_mid_block):
            owner = self.unet.get_submodule(slot.name.rsplit(".motion_modules.", 1)[0])
            if not hasattr(owner, "motion_modules"):
                owner.motion_modules = nn.ModuleList()
            module = build_motion_module(spec, slot.channels)
            owner.motion_modules.append(module)
            slot.after.register_forward_hook(self._motion_hook(module))
        if resnet_norm_mode == "across_frames":
            self._norm_across_frames()

    def _motion_hook(self, module: nn.Module):
        frames = self._frames

        def apply_motion(_layer: nn.Module, _inputs: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output  # attentions return a 1-tuple
            video = rearrange(hidden, "(b f) c h w -> b c f h w", f=frames.value)
            hidden = rearrange(module(video), "b c f h w -> (b f) c h w")
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return apply_motion

    def _norm_across_frames(self) -> None:
        for name, module in list(self.unet.named_modules()):
            is_resnet_norm = name.endswith((".norm1", ".norm2")) and ".resnets." in name
            if isinstance(module, nn.GroupNorm) and (is_resnet_norm or name == "conv_norm_out"):
                parent_name, _, attr = name.rpartition(".")
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                setattr(parent, attr, AcrossFramesGroupNorm(module, self._frames))

    # ------------------------------------------------------------------ building and parts

    @classmethod
    def from_unet2d(cls, unet2d: UNet2DConditionModel, **video_config: Any) -> VideoUNet:
        """Inflate a 2D UNet: copy every 2D weight exactly (strict) and add fresh, identity motion modules."""
        config = {k: v for k, v in unet2d.config.items() if not k.startswith("_")}
        model = cls(unet_config=config, **video_config)
        try:
            model.unet.load_state_dict({**unet2d.state_dict(), **model.motion_state_dict()}, strict=True)
        except RuntimeError as err:
            raise KinemaError(f"the 2D UNet's weights do not fit its own config: {str(err)[:300]}") from None
        return model if unet2d.dtype == torch.float32 else model.to(unet2d.dtype)

    def motion_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """`(published name, module)` for every motion module, e.g. `down_blocks.0.motion_modules.1`."""
        for name, module in self.unet.named_modules():
            if name.rpartition(".")[0].endswith("motion_modules"):
                yield name, module

    def motion_state_dict(self) -> dict[str, torch.Tensor]:
        """Motion-module weights alone, named as in published AnimateDiff files (without `pos_encoder.pe`)."""
        return {k: v for k, v in self.unet.state_dict().items() if ".motion_modules." in k}

    def load_motion_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load motion-module weights strictly: every key present, none extra, every shape equal."""
        found = key_mismatch(shapes(self.motion_state_dict()), shapes(state_dict))
        if found:
            raise KinemaError(f"motion-module weights do not fit this UNet: {found}. Check that the motion module "
                              "version (v1/v2/v3, mid block, SD1.5 vs SDXL) matches the base UNet")
        for name, module in self.motion_modules():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)},
                                   strict=True)

    def freeze_base(self) -> None:
        """Train motion modules only: freeze every 2D weight and every loaded (peft) LoRA."""
        from peft.tuners.lora import LoraLayer

        self.unet.requires_grad_(False)
        for _, module in self.motion_modules():
            module.requires_grad_(True)
            for layer in module.modules():
                if isinstance(layer, LoraLayer):  # a loaded motion LoRA is an input, not something to train
                    layer.lora_A.requires_grad_(False)
                    layer.lora_B.requires_grad_(False)

    def set_attention_chunk_size(self, chunk_size: int | None) -> None:
        """Chunk every motion module's attention into at most `chunk_size` sequences (same result, less memory)."""
        for _, module in self.motion_modules():
            module.set_attention_chunk_size(chunk_size)

    @property
    def max_frames(self) -> int:
        return min(getattr(module, "max_frames", 2**31) for _, module in self.motion_modules())

    # ------------------------------------------------------------------ forward

    @staticmethod
    def _text_per_frame(text: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """Text tokens as shared `(B, L, D)`, per-frame `(B, F, L, D)` or folded `(B*F, L, D)` -> `(B*F, L, D)`, the
        frame-folded batch order of the latents; anything else raises one KinemaError line."""
        if text.ndim == 3 and text.shape[0] == batch:  # with F == 1 shared and folded are the same thing
            return text.repeat_interleave(frames, dim=0)
        if text.ndim == 3 and text.shape[0] == batch * frames:
            return text
        if text.ndim == 4 and text.shape[:2] == (batch, frames):
            return rearrange(text, "b f l d -> (b f) l d")
        raise KinemaError(f"encoder_hidden_states of shape {tuple(text.shape)} do not fit {batch} clip(s) of "
                          f"{frames} frames; pass (B, L, D) = ({batch}, L, D) shared by all frames, or per frame "
                          f"({batch}, {frames}, L, D) or ({batch * frames}, L, D) with row b*F + f for frame f of "
                          "clip b")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """Predict noise for a video.

        Args:
            sample: noisy latents `(B, C, F, H, W)`.
            timestep: `()` or `(B,)`.
            encoder_hidden_states: text tokens `(B, L, D)` shared by all frames, or per frame as `(B, F, L, D)` or
                as diffusers' AnimateDiff pipeline passes them, `(B*F, L, D)` with row `b*F + f` for frame f of clip b.
            unet_kwargs: passed to the 2D UNet (e.g. `cross_attention_kwargs`, `added_cond_kwargs`).

        Returns:
            `(B, C_out, F, H, W)`.
        """
        if sample.ndim != 5:
            raise KinemaError(f"VideoUNet expects latents (B, C, F, H, W), got shape {tuple(sample.shape)}")
        batch, channels, frames = sample.shape[:3]
        if channels != self.unet.config.in_channels:
            raise KinemaError(f"latents have {channels} channels, the UNet takes {self.unet.config.in_channels}")
        check_frame_count(frames, self.max_frames)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        encoder_hidden_states = self._text_per_frame(encoder_hidden_states, batch, frames)
        self._frames.value = frames
        out = self.unet(
            rearrange(sample, "b c f h w -> (b f) c h w"),
            timestep.repeat_interleave(frames),
            encoder_hidden_states,
            return_dict=False,
            **unet_kwargs,
        )[0]
        return rearrange(out, "(b f) c h w -> b c f h w", f=frames)
