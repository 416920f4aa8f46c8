"""Video UNet: a diffusers `UNet2DConditionModel` inflated with motion modules where AnimateDiff places them.

The 2D UNet is reused as it is, not copied. Frames are folded into the batch once at entry, `(B, C, F, H, W) ->
(B*F, C, H, W)`, and unfolded at exit. Each motion module runs as a forward hook on the spatial layer it follows
(the attention of a resnet/attention pair, or the resnet where a block has no attention), so the diffusers blocks'
own loops, gradient checkpointing and skip bookkeeping stay untouched and skip tensors are taken after the module.
The hooks keep no per-call state: each holds its module (so a deep copy runs the copy's modules), and the frame count
and prompt tokens of the call in progress are a context variable that `forward` sets for its own thread
(`frames_per_clip`).
Modules live at `down_blocks.i.motion_modules.j` (2 per down block), `up_blocks.i.motion_modules.j` (3 per up block)
and optionally `mid_block.motion_modules.0`: the names of published AnimateDiff checkpoints under the `unet.` prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from kinema.errors import KinemaError
from kinema.models.freeu import install_freeu_hooks
from kinema.models.motion import (
    NormMode,
    build_motion_module,
    check_frame_count,
    check_norm_mode,
    run_motion_module,
    video_group_norm,
)
from kinema.models.video_model import Timestep, VideoModel, timesteps_per_clip
from kinema.sampling.step_cache import StepCache, active_step_cache
from kinema.state_dicts import StrictFromPretrained, load_strict


@dataclass(frozen=True)
class _Clip:
    """What the forward pass running in this thread knows about its clips: frames per clip, and the prompt tokens of
    every frame `(B*F, L, D)` (None where no layer needs them)."""

    frames: int
    text: torch.Tensor | None = None


# The clips of the forward pass running in this thread (or task): the hooks and frame-aware norms see folded
# `(B*F, ...)` tensors and need F to unfold them, and a motion module that reads the prompt needs its tokens. A
# context variable, not an attribute of the model, so that calls in several threads at once never see each other's.
_CLIP: ContextVar[_Clip | None] = ContextVar("kinema_video_unet_clip", default=None)


@contextmanager
def frames_per_clip(frames: int, text: torch.Tensor | None = None) -> Iterator[None]:
    """Within this block, in this thread, the folded tensors `(B*F, C, H, W)` a VideoUNet's layers see hold clips of
    `frames` frames, whose prompt tokens are `text` `(B*F, L, D)`. `VideoUNet.forward` sets it; set it yourself only
    to call one of its layers directly."""
    token = _CLIP.set(_Clip(frames, text))
    try:
        yield
    finally:
        _CLIP.reset(token)


def _current_clip() -> _Clip:
    clip = _CLIP.get()
    if clip is None:
        raise KinemaError("a VideoUNet layer ran outside VideoUNet.forward, so it cannot tell how many frames a clip "
                          "has; call the VideoUNet itself, or wrap the call in "
                          "kinema.models.video_unet.frames_per_clip(F)")
    return clip


def current_frames_per_clip() -> int:
    """The frame count set by the enclosing `frames_per_clip` (i.e. by the running `VideoUNet.forward`)."""
    return _current_clip().frames


class AcrossFramesGroupNorm(nn.GroupNorm):
    """GroupNorm on folded video `(B*F, C, H, W)` whose statistics span all F frames of a clip.

    This is how AnimateDiff v1 normalises resnets (a plain GroupNorm on the 5-D tensor); v2/v3 and diffusers
    normalise each frame on its own. Same parameters as `nn.GroupNorm`, so state-dict keys do not change.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        self.load_state_dict(norm.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B*F, C, H, W)` -> `(B*F, C, H, W)`, F from the running forward (`frames_per_clip`)."""
        video = rearrange(x, "(b f) c h w -> b c f h w", f=current_frames_per_clip())
        return rearrange(video_group_norm(self, video, "across_frames"), "b c f h w -> (b f) c h w")


class MotionHook:
    """Forward hook that runs one motion module on a spatial layer's folded output `(B*F, C, H, W)`.

    An object holding its module, not a closure: `copy.deepcopy` of the model then maps `motion_module` to the copy's
    own module (through deepcopy's memo) and the model pickles. It keeps no per-call state; F comes from the running
    forward.
    """

    def __init__(self, motion_module: nn.Module):
        self.motion_module = motion_module

    def __call__(self, layer: nn.Module, inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # attentions return a 1-tuple
        clip = _current_clip()
        video = rearrange(hidden, "(b f) c h w -> b c f h w", f=clip.frames)
        video = run_motion_module(self.motion_module, video, clip.text)
        hidden = rearrange(video, "b c f h w -> (b f) c h w")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _RunWithFrames:
    """A layer call that sets the clips' frame count and prompt tokens first: what a checkpoint reruns during the
    backward pass."""

    def __init__(self, layer: Callable[..., Any], clip: _Clip):
        self.layer = layer
        self.clip = clip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with frames_per_clip(self.clip.frames, self.clip.text):
            return self.layer(*args, **kwargs)


class FrameCountCheckpoint:
    """Wraps a diffusers gradient-checkpointing function `func(layer, *args)` so that the recomputation sees the
    frame count of the forward that first ran the layer.

    The backward pass reruns checkpointed layers after `VideoUNet.forward` has returned (on a GPU, in autograd's own
    thread), where no frame count is set; the wrapper captures F (and the prompt tokens) at forward time and sets
    them inside the rerun.
    """

    def __init__(self, checkpoint_func: Callable[..., Any]):
        self.checkpoint_func = checkpoint_func

    def __call__(self, layer: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        clip = _CLIP.get()
        if clip is None:  # the 2D UNet called on its own: nothing frame-aware runs
            return self.checkpoint_func(layer, *args, **kwargs)
        return self.checkpoint_func(_RunWithFrames(layer, clip), *args, **kwargs)


@dataclass(frozen=True)
class MotionSlot:
    """Where one motion module sits: its name, its width, the spatial layer whose output it transforms, and whether
    that layer is a resnet (which diffusers' blocks run through their gradient-checkpointing function)."""

    name: str
    channels: int
    after: nn.Module
    after_resnet: bool = False


def motion_slots(unet: UNet2DConditionModel, mid_block: bool) -> Iterator[MotionSlot]:
    """AnimateDiff's placement: after each resnet/attention pair of every down and up block, and the mid attention."""
    for kind, blocks in (("down_blocks", unet.down_blocks), ("up_blocks", unet.up_blocks)):
        for i, block in enumerate(blocks):
            has_attention = hasattr(block, "attentions")
            # nn.Module types attributes as `Tensor | Module`: diffusers' blocks hold their layers in ModuleLists, and
            # every resnet's width is an int.
            resnets = cast(nn.ModuleList, block.resnets)
            layers = cast(nn.ModuleList, block.attentions) if has_attention else resnets
            for j, layer in enumerate(layers):
                channels = cast(int, resnets[j].out_channels)
                yield MotionSlot(f"{kind}.{i}.motion_modules.{j}", channels, layer, after_resnet=not has_attention)
    if mid_block:
        if not hasattr(unet.mid_block, "attentions"):
            raise KinemaError("a mid-block motion module needs a UNet whose mid block has attention")
        yield MotionSlot("mid_block.motion_modules.0", unet.mid_block.resnets[0].out_channels,
                         unet.mid_block.attentions[0])


# Two base-class conflicts mypy reports here, neither a fault of this class: diffusers' ModelMixin sets config_name
# to a str where its ConfigMixin declares it None, and StrictFromPretrained requires the folder path that diffusers'
# from_pretrained lets be None (kinema loads local folders only).
class VideoUNet(VideoModel, StrictFromPretrained, ModelMixin, ConfigMixin):  # type: ignore[misc]
    """A 2D text-to-image UNet that denoises video `(B, C, F, H, W)` through inserted motion modules.

    Motion-module names (`motion_modules`, `motion_state_dict`) are those of published AnimateDiff files without the
    `unet.` prefix, e.g. `down_blocks.0.motion_modules.1`; their frame tables (`pos_encoder.pe`) are not stored.

    Args:
        unet_config: the `UNet2DConditionModel` config (a dict), e.g. SD1.5's.
        motion_module: spec of every motion module, `{"type": "temporal", "max_frames": 32, ...}` (registry name
            plus its settings).
        motion_mid_block: also put a motion module in the mid block (AnimateDiff v2).
        resnet_norm_mode: resnet and output GroupNorm statistics `per_frame` (v2/v3, diffusers) or
            `across_frames` (v1).
    """

    _supports_gradient_checkpointing = True
    supports_freeu = True  # kinema.models.freeu's hooks, installed in __init__
    motion_mismatch_advice = ("Check that the motion module version (v1/v2/v3, mid block, SD1.5 vs SDXL) matches "
                              "the base UNet")

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        motion_module: dict[str, Any] | None = None,
        motion_mid_block: bool = False,
        resnet_norm_mode: NormMode = "per_frame",
    ):
        super().__init__()
        check_norm_mode("resnet_norm_mode", resnet_norm_mode)
        self.unet = UNet2DConditionModel.from_config(unet_config)
        spec = motion_module or {"type": "temporal"}
        for slot in motion_slots(self.unet, motion_mid_block):
            owner = self.unet.get_submodule(slot.name.rsplit(".motion_modules.", 1)[0])
            if not hasattr(owner, "motion_modules"):
                owner.motion_modules = nn.ModuleList()
            module = build_motion_module(spec, slot.channels)
            owner.motion_modules.append(module)
            slot.after.register_forward_hook(MotionHook(module))
        if resnet_norm_mode == "across_frames":
            self._norm_across_frames()
        install_freeu_hooks(self.unet)

    def _norm_across_frames(self) -> None:
        for name, module in list(self.unet.named_modules()):
            is_resnet_norm = name.endswith((".norm1", ".norm2")) and ".resnets." in name
            if isinstance(module, nn.GroupNorm) and (is_resnet_norm or name == "conv_norm_out"):
                parent_name, _, attr = name.rpartition(".")
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                setattr(parent, attr, AcrossFramesGroupNorm(module))

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable[..., Any] = checkpoint
    ) -> None:
        # diffusers calls this from enable/disable_gradient_checkpointing; the rerun of a checkpointed layer needs F.
        super()._set_gradient_checkpointing(enable, FrameCountCheckpoint(gradient_checkpointing_func))
        # A motion module after a resnet already reruns inside the resnet's checkpoint; its own checkpointing (set by
        # diffusers' walk over all submodules) would make the backward pass run it a third time.
        for slot in motion_slots(self.unet, self.config["motion_mid_block"]):
            if slot.after_resnet:
                for part in self.unet.get_submodule(slot.name).modules():
                    if hasattr(part, "gradient_checkpointing"):
                        part.gradient_checkpointing = False

    # ------------------------------------------------------------------ building and parts

    @classmethod
    def from_unet2d(cls, unet2d: UNet2DConditionModel, **video_config: Any) -> VideoUNet:
        """Inflate a 2D UNet: copy every 2D weight exactly (strict) and add fresh, identity motion modules."""
        config = {k: v for k, v in unet2d.config.items() if not k.startswith("_")}
        model = cls(unet_config=config, **video_config)
        load_strict(model.unet, {**unet2d.state_dict(), **model.motion_state_dict()},
                    "the 2D UNet's weights do not fit its own config")
        return model if unet2d.dtype == torch.float32 else model.to(unet2d.dtype)

    def motion_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """`(published name, module)` for every motion module, e.g. `down_blocks.0.motion_modules.1`."""
        for name, module in self.unet.named_modules():
            if name.rpartition(".")[0].endswith("motion_modules"):
                yield name, module

    # ------------------------------------------------------------------ forward

    @staticmethod
    def text_per_frame(text: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
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

    @staticmethod
    def _image_prompt_per_frame(unet_kwargs: dict[str, Any], batch: int, frames: int) -> dict[str, Any]:
        """IP-Adapter image embeddings given per clip (`added_cond_kwargs["image_embeds"]`, each `(B, ...)`) repeated
        for every frame, as diffusers' UNetMotionModel repeats them; `(B*F, ...)` ones pass as they are."""
        added = unet_kwargs.get("added_cond_kwargs") or {}
        if "image_embeds" not in added:
            return unet_kwargs
        embeds = [embed.repeat_interleave(frames, dim=0) if embed.shape[0] == batch else embed
                  for embed in added["image_embeds"]]
        return {**unet_kwargs, "added_cond_kwargs": {**added, "image_embeds": embeds}}

    def _check_latents(self, sample: torch.Tensor) -> None:
        if sample.ndim != 5:
            raise KinemaError(f"VideoUNet expects latents (B, C, F, H, W), got shape {tuple(sample.shape)}")
        channels, frames = sample.shape[1:3]
        if channels != self.unet.config.in_channels:
            raise KinemaError(f"latents have {channels} channels, the UNet takes {self.unet.config.in_channels}")
        check_frame_count(frames, self.max_frames)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Timestep,
        encoder_hidden_states: torch.Tensor,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """Predict noise for a video.

        Args:
            sample: noisy latents `(B, C, F, H, W)`.
            timestep: an int, a float, a 0-d tensor or `(B,)`.
            encoder_hidden_states: text tokens `(B, L, D)` shared by all frames, or per frame as `(B, F, L, D)` or
                as diffusers' AnimateDiff pipeline passes them, `(B*F, L, D)` with row `b*F + f` for frame f of clip b.
            unet_kwargs: passed to the 2D UNet (e.g. `cross_attention_kwargs`, `added_cond_kwargs`).

        Returns:
            `(B, C_out, F, H, W)`.
        """
        self._check_latents(sample)
        step_cache = active_step_cache()
        if step_cache is not None:
            return self._forward_step_cached(step_cache, sample, timestep, encoder_hidden_states, unet_kwargs)
        batch, _, frames = sample.shape[:3]
        timestep = timesteps_per_clip(timestep, batch, sample.device)
        encoder_hidden_states = self.text_per_frame(encoder_hidden_states, batch, frames)
        unet_kwargs = self._image_prompt_per_frame(unet_kwargs, batch, frames)
        with frames_per_clip(frames, encoder_hidden_states):
            out = self.unet(
                rearrange(sample, "b c f h w -> (b f) c h w"),
                timestep.repeat_interleave(frames),
                encoder_hidden_states,
                return_dict=False,
                **unet_kwargs,
            )[0]
        return rearrange(out, "(b f) c h w -> b c f h w", f=frames)

    # ------------------------------------------------------------------ step caching (DeepCache)

    def _forward_step_cached(self, step_cache: StepCache, sample: torch.Tensor, timestep: Timestep,
                             text: torch.Tensor, unet_kwargs: dict[str, Any]) -> torch.Tensor:
        """`forward` under a sampling run's step cache: reuse the deep features it kept for this call, or compute
        everything and keep them."""
        depth = 1 if step_cache.depth is None else step_cache.depth
        slot, deep = step_cache.lookup(tuple(sample.shape))
        out, kept = self.forward_deep_cached(sample, timestep, text, depth=depth, deep_features=deep, **unet_kwargs)
        if deep is None:
            step_cache.keep(slot, tuple(sample.shape), kept)
        return out

    def forward_deep_cached(
        self,
        sample: torch.Tensor,
        timestep: Timestep,
        encoder_hidden_states: torch.Tensor,
        *,
        depth: int = 1,
        deep_features: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        **unsupported: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward pass split where DeepCache splits it: the outermost `depth` levels (input conv, the first
        `depth` down blocks, the last `depth` up blocks, output) and the deep rest, whose output (the input of up
        block `len(up_blocks) - depth`) is the deep feature.

        Written out (not diffusers' `UNet2DConditionModel.forward`) because that forward cannot start at an up
        block; for the SD1.5-style configs it supports it runs the same calls in the same order, so a full pass
        equals `forward` (tests/sampling/test_step_cache.py).

        Args:
            sample, timestep, encoder_hidden_states: as `forward`.
            depth: outer levels a shallow pass runs (1 to the number of up blocks).
            deep_features: `(B, C_deep, F, h, w)` deep features to use in place of the deep part (a shallow pass),
                or None to compute them (a full pass).
            cross_attention_kwargs: as diffusers' UNet takes them.
            added_cond_kwargs: `{"image_embeds": [...]}`, an IP-Adapter's image prompt (per clip or per frame).
            down_block_additional_residuals, mid_block_additional_residual: a ControlNet's, folded `(B*F, ...)`, added
                where diffusers' forward adds them (a shallow pass adds those of the skips it runs).

        Returns:
            The prediction `(B, C_out, F, H, W)` and the deep features `(B, C_deep, F, h, w)` (those given, on a
            shallow pass).
        """
        unet = self.unet
        # The parts of diffusers' forward this one leaves out: refused rather than silently dropped.
        refused = [name for name in ("class_embedding", "add_embedding") if getattr(unet, name, None) is not None]
        image_prompt = unet.config.encoder_hid_dim_type == "ip_image_proj"  # an IP-Adapter's, which runs below
        refused += ["encoder_hid_proj"] if unet.encoder_hid_proj is not None and not image_prompt else []
        refused += ["center_input_sample"] if unet.config.center_input_sample else []
        refused += sorted(unsupported)
        if refused:
            raise KinemaError(f"step caching runs SD1.5-style UNets only, and this call uses {', '.join(refused)}; "
                              "turn step caching off (cache_interval 1)")
        if not 1 <= depth <= len(unet.up_blocks):
            raise KinemaError(f"cache depth {depth} is not between 1 and the UNet's {len(unet.up_blocks)} levels")
        self._check_latents(sample)
        batch, _, frames = sample.shape[:3]
        timestep = timesteps_per_clip(timestep, batch, sample.device)
        text = self.text_per_frame(encoder_hidden_states, batch, frames)
        states: Any = text
        if unet.encoder_hid_proj is not None:  # the IP-Adapter's (text, image tokens), as diffusers' forward makes them
            added = self._image_prompt_per_frame({"added_cond_kwargs": added_cond_kwargs}, batch, frames)
            states = unet.process_encoder_hidden_states(text, added["added_cond_kwargs"] or {})
        # As diffusers' forward, the residuals count only as a pair.
        residuals = (None if down_block_additional_residuals is None or mid_block_additional_residual is None
                     else (down_block_additional_residuals, mid_block_additional_residual))
        cut = len(unet.up_blocks) - depth  # the up blocks from here on run on every step
        text_kwargs = dict(encoder_hidden_states=states, cross_attention_kwargs=cross_attention_kwargs)
        with frames_per_clip(frames, text):
            hidden = rearrange(sample, "b c f h w -> (b f) c h w")
            up_factor = 2**unet.num_upsamplers
            forward_upsample_size = any(size % up_factor for size in hidden.shape[-2:])
            emb = unet.time_embedding(unet.get_time_embed(sample=hidden, timestep=timestep.repeat_interleave(frames)),
                                      None)
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)

            hidden = unet.conv_in(hidden)
            skips: tuple[torch.Tensor, ...] = (hidden,)
            for down_block in unet.down_blocks if deep_features is None else unet.down_blocks[:depth]:
                if getattr(down_block, "has_cross_attention", False):
                    hidden, res = down_block(hidden_states=hidden, temb=emb, **text_kwargs)
                else:
                    hidden, res = down_block(hidden_states=hidden, temb=emb)
                skips += res
            if residuals is not None:
                # zip stops at the skips a shallow pass has: the first ones, which the outer levels take.
                skips = tuple(skip + extra for skip, extra in zip(skips, residuals[0], strict=False))
            if deep_features is None:
                if unet.mid_block is not None and getattr(unet.mid_block, "has_cross_attention", False):
                    hidden = unet.mid_block(hidden, emb, **text_kwargs)
                elif unet.mid_block is not None:
                    hidden = unet.mid_block(hidden, emb)
                if residuals is not None:
                    hidden = hidden + residuals[1]
                first_up = 0
            else:
                # The outer up blocks take the first skips: the input conv's and the outer down blocks' resnets'.
                skips = skips[:sum(len(cast(nn.ModuleList, block.resnets)) for block in unet.up_blocks[cut:])]
                first_up = cut

            upsample_size = None
            for index in range(first_up, len(unet.up_blocks)):
                up_block = unet.up_blocks[index]
                if index == cut and deep_features is None:
                    deep_features = rearrange(hidden, "(b f) c h w -> b c f h w", f=frames)
                elif index == cut and deep_features is not None:
                    hidden = rearrange(deep_features, "b c f h w -> (b f) c h w")
                resnet_count = len(cast(nn.ModuleList, up_block.resnets))
                res, skips = skips[-resnet_count:], skips[:-resnet_count]
                if index < len(unet.up_blocks) - 1 and forward_upsample_size:
                    upsample_size = skips[-1].shape[2:]
                if getattr(up_block, "has_cross_attention", False):
                    hidden = up_block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                                      upsample_size=upsample_size, **text_kwargs)
                else:
                    hidden = up_block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                                      upsample_size=upsample_size)

            if unet.conv_norm_out is not None:
                hidden = unet.conv_act(unet.conv_norm_out(hidden))
            out = unet.conv_out(hidden)
        assert deep_features is not None  # kept or given at up block `cut`, which always runs
        return rearrange(out, "(b f) c h w -> b c f h w", f=frames), deep_features
