"""Denoisers: one per model family, each turning a video model's output into the noise (epsilon) prediction, or the
velocity for a v-prediction model (`VideoFamily.prediction_type`: the scheduler reads it as such).

A denoiser is called as `denoiser(latents, timestep, cond)`: latents `(B, C, F, H, W)`, one timestep for all clips
(an int, a float or a 0-d tensor, as schedulers give them) and `cond`, the model's conditioning as a mapping of its
forward keyword arguments, each a tensor batched along dim 0 like the latents (or None: not given). Classifier-free
guidance (kinema.sampling.guidance) joins a conditional and an unconditional `cond` key by key into one batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.models.controlnet import frame_residuals
from kinema.models.video_model import Timestep

Conditioning = Mapping[str, torch.Tensor | None]


class Denoiser:
    """Wraps a video model; subclasses name the conditioning it takes (`condition_names`) and read its output."""

    condition_names: tuple[str, ...] = ()
    required: tuple[str, ...] = ("encoder_hidden_states",)

    def __init__(self, model: nn.Module):
        self.model = model

    def check(self, cond: Conditioning) -> None:
        """One KinemaError line for conditioning this model does not take, or lacks."""
        family = type(self).__name__
        unknown = sorted(set(cond) - set(self.condition_names))
        if unknown:
            raise KinemaError(f"{family} takes no conditioning {', '.join(unknown)}; it takes "
                              f"{', '.join(self.condition_names)}")
        missing = [name for name in self.required if cond.get(name) is None]
        if missing:
            raise KinemaError(f"{family} needs conditioning {', '.join(missing)}")

    def predict(self, latents: torch.Tensor, timestep: Timestep, cond: Conditioning) -> torch.Tensor:
        """The model's output for the given conditioning (None entries left out), read as epsilon."""
        return self.epsilon(self.model(latents, timestep, **{k: v for k, v in cond.items() if v is not None}),
                            latents)

    def epsilon(self, out: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Epsilon from the model's output; models that predict it directly give it as it is."""
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating dtype: what its inputs are cast to."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def __call__(self, latents: torch.Tensor, timestep: Timestep, cond: Conditioning) -> torch.Tensor:
        """Epsilon `(B, C, F, H, W)` for noisy `latents` at `timestep` under `cond`, in the latents' dtype and on their
        device. Floating inputs run in the model's dtype (a half-precision model under a float32 loop)."""
        self.check(cond)
        dtype = self.dtype
        cast = {k: v.to(dtype) if v is not None and v.is_floating_point() else v for k, v in cond.items()}
        return self.predict(latents.to(dtype), timestep, cast).to(latents)  # offloaded models answer elsewhere


class UNetDenoiser(Denoiser):
    """AnimateDiff: a `VideoUNet` predicts epsilon directly; `encoder_hidden_states` are the CLIP text states
    `(B, L, D)` shared by all frames (or per frame, see `VideoUNet.forward`), `ip_image_embeds` an IP-Adapter's
    image prompt `(B, 1, D)` or `(B, 1, T, D)` (kinema.loaders.ip_adapter), for a model with one loaded (or
    `ip_image_frame_embeds` `(B, F, 1, ...)`, one per frame, for an image prompt that travels), and
    `control_frames` a ControlNet's control images `(B, 3, F, H, W)` in [0, 1] (SparseCtrl's keyframes, with
    `control_mask` `(B, 1, F, ...)`), for a denoiser given `controlnet` (a `kinema.models.controlnet.VideoControlNet`
    or `VideoSparseControlNet`). `control_guess` `(B,)` bool turns on guess mode: the clips marked True are steered
    with guess mode's graded residuals, the others (the unprompted half of guidance) not at all, as in ControlNet's
    own guess mode and diffusers' image pipelines. `inpaint_latents` `(B, 5, F, h, w)`, a PIA image animator's mask
    and start-image latents, join the latents along the channels on the way into the UNet."""

    condition_names = ("encoder_hidden_states", "ip_image_embeds", "ip_image_frame_embeds", "control_frames",
                       "control_mask", "control_guess", "inpaint_latents")

    def __init__(self, model: nn.Module, controlnet: nn.Module | None = None):
        super().__init__(model)
        self.controlnet = controlnet

    def check(self, cond: Conditioning) -> None:
        """As `Denoiser.check`, and one line for control images without a ControlNet to read them. A ControlNet
        without control images rests (the steps outside its control_start .. control_end)."""
        super().check(cond)
        if cond.get("control_frames") is not None and self.controlnet is None:
            raise KinemaError("control images (control_frames) were given, and no ControlNet is loaded to read them; "
                              "load one with the model (--controlnet)")

    def predict(self, latents: torch.Tensor, timestep: Timestep, cond: Conditioning) -> torch.Tensor:
        """As `Denoiser.predict`, the image prompt handed to the UNet as diffusers' `added_cond_kwargs` and the
        ControlNet's residuals as its additional residuals."""
        extra = ("ip_image_embeds", "ip_image_frame_embeds", "control_frames", "control_mask", "control_guess",
                 "inpaint_latents")
        kwargs: dict[str, Any] = {k: v for k, v in cond.items() if k not in extra and v is not None}
        image = cond.get("ip_image_embeds")
        per_frame = cond.get("ip_image_frame_embeds")
        if per_frame is not None:  # (B, F, ...): folded, as the VideoUNet takes image prompts per frame
            image = per_frame.flatten(0, 1)
        if image is not None:
            kwargs["added_cond_kwargs"] = {"image_embeds": [image]}
        control = cond.get("control_frames")
        if control is not None and self.controlnet is not None:
            from kinema.models.video_unet import VideoUNet

            batch, _, frames = latents.shape[:3]
            # Folded once, here, for both: the VideoUNet takes per-frame states (B*F, L, D) as they are.
            kwargs["encoder_hidden_states"] = VideoUNet.text_per_frame(kwargs["encoder_hidden_states"], batch, frames)
            guess = cond.get("control_guess")
            if guess is None:
                kwargs.update(self.controlnet(latents, timestep, kwargs["encoder_hidden_states"], control,
                                              cond.get("control_mask")))
            else:
                kwargs.update(self._guessed(guess, latents, timestep, kwargs["encoder_hidden_states"], control,
                                            cond.get("control_mask")))
        inpaint = cond.get("inpaint_latents")
        return self.model(latents if inpaint is None else torch.cat([latents, inpaint], dim=1), timestep, **kwargs)

    def _guessed(self, steered: torch.Tensor, latents: torch.Tensor, timestep: Timestep, text: torch.Tensor,
                 control: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """Guess mode's residuals: the ControlNet runs on the clips `steered` `(B,)` marks, in guess mode, and the
        other clips' residuals are zero (text folded `(B*F, L, D)`, residuals folded `(B*F, ...)`)."""
        batch, frames = latents.shape[0], latents.shape[2]
        if steered.shape != (batch,):
            raise KinemaError(f"control_guess marks each clip: give ({batch},), got {tuple(steered.shape)}")
        clips = steered.to(torch.bool).nonzero().flatten().to(latents.device)
        if len(clips) == 0 or self.controlnet is None:
            return {}
        rows = (clips[:, None] * frames + torch.arange(frames, device=latents.device)).flatten()
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 1 and len(timestep) == batch:
            timestep = timestep[clips.to(timestep.device)]
        out = self.controlnet(latents[clips], timestep, text[rows], control[clips],
                              None if mask is None else mask[clips], guess_mode=True)
        return frame_residuals(out, rows, batch * frames) if out else {}

    @staticmethod
    def conditioning(text_states: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"encoder_hidden_states": text_states}


class DiTDenoiser(Denoiser):
    """EasyAnimate V3: a `VideoDiT` predicts epsilon and a learned variance; epsilon is its first half of channels
    (as many as the latents have). Conditioning: T5 text states and their mask, inpaint latents (mask latents then
    masked-video latents, for InP models) and CLIP image embeddings with their token mask."""

    condition_names = ("encoder_hidden_states", "encoder_attention_mask", "inpaint_latents", "clip_image_embeds",
                       "clip_attention_mask")

    @staticmethod
    def conditioning(text_states: torch.Tensor, text_mask: torch.Tensor | None = None,
                     inpaint_latents: torch.Tensor | None = None, clip_image_embeds: torch.Tensor | None = None,
                     clip_attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        return {"encoder_hidden_states": text_states, "encoder_attention_mask": text_mask,
                "inpaint_latents": inpaint_latents, "clip_image_embeds": clip_image_embeds,
                "clip_attention_mask": clip_attention_mask}

    def predict(self, latents: torch.Tensor, timestep: Timestep, cond: Conditioning) -> torch.Tensor:
        """As `Denoiser.predict`; per-frame text states `(B, F, L, D)` (prompt travel) become their mean over the
        frames, because the DiT cross-attends every frame to one text (with context windows: each window's mean): the
        blend at the clip's middle for a linear travel, where the frame after the middle (an even count has none at
        it) leaned to the later prompt."""
        text = cond.get("encoder_hidden_states")
        if text is not None and text.ndim == 4:
            cond = {**cond, "encoder_hidden_states": text.mean(dim=1)}
        return super().predict(latents, timestep, cond)

    def epsilon(self, out: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        channels = latents.shape[1]
        if out.shape[1] == 2 * channels:  # learned sigma: [epsilon, variance]
            return out[:, :channels]
        if out.shape[1] == channels:
            return out
        raise KinemaError(f"the DiT gives {out.shape[1]} channels for {channels}-channel latents; expected "
                          f"{channels} (epsilon) or {2 * channels} (epsilon and learned variance)")
