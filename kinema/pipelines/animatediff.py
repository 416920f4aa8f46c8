"""The AnimateDiff family for the generation pipeline: a VideoUNet on SD1.5, CLIP text, the SD VAE frame by frame.

The SD VAE is an image VAE, so a video's latents have one latent frame per pixel frame (`latent_frames` and
`pixel_frames` are the identity) and frames are encoded and decoded as a batch of images, `decode_chunk` at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kinema.errors import KinemaError
from kinema.memory import video_bytes
from kinema.models.presets import image_vae_downsample
from kinema.pipelines.decode import decode_latents, overflow_safe
from kinema.pipelines.family import Conditioning, VideoFamily, decode_call_bytes
from kinema.pipelines.text_encoding import PromptWorld, cut_off_text, encode_prompts, text_length
from kinema.sampling.denoisers import Denoiser, UNetDenoiser

# PIA's motion presets (Zhang et al. 2024, "PIA: Your Personalized Image Animator"; diffusers' PIAPipeline
# `motion_scale`): the mask value of each frame by its distance from the start image, the last one repeated. A value
# near 1 holds the frame to the image, a lower one lets it move. By index, named in request.PIA_MOTION_NAMES.
PIA_MOTION_PRESETS: tuple[tuple[float, ...], ...] = (
    (1.0, 0.9, 0.85, 0.85, 0.85, 0.8),
    (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75),
    (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5),
    (1.0, 0.9, 0.85, 0.85, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.85, 0.85, 0.9, 1.0),
    (1.0, 0.8, 0.8, 0.8, 0.79, 0.78, 0.75, 0.75, 0.75, 0.75, 0.75, 0.78, 0.79, 0.8, 0.8, 1.0),
    (1.0, 0.8, 0.7, 0.7, 0.7, 0.7, 0.6, 0.5, 0.5, 0.6, 0.7, 0.7, 0.7, 0.7, 0.8, 1.0),
    (0.5, 0.4, 0.4, 0.4, 0.35, 0.3),
    (0.5, 0.4, 0.4, 0.4, 0.35, 0.35, 0.3, 0.25, 0.2),
    (0.5, 0.2),
)


def pia_mask_values(frames: int, preset: int) -> list[float]:
    """Each frame's mask value for PIA's motion `preset` (an index of `PIA_MOTION_PRESETS`), the start image at
    frame 0."""
    values = PIA_MOTION_PRESETS[preset]
    return [values[min(frame, len(values) - 1)] for frame in range(frames)]


class AnimateDiffFamily(VideoFamily):
    """AnimateDiff's parts for `generate()`.

    Args:
        video_unet: a `VideoUNet` (the SD1.5 UNet inflated with motion modules, LoRAs already applied).
        vae: the SD `AutoencoderKL`: images `(N, 3, H, W)` in [-1, 1] <-> latents `(N, 4, H/8, W/8)`.
        text_encoder, tokenizer: SD1.5's CLIP text model and tokenizer.
        source: the model's folder or file, recorded in the settings.
        vae_tiling: encode and decode each frame in overlapping spatial tiles (diffusers' VAE tiling), for frames
            larger than the VAE's `sample_size`; smaller frames are done whole either way.
        decode_chunk: frames per VAE call when encoding or decoding.
        motion_module, loras: what was loaded into `video_unet` (path, and `(path, weight)` per LoRA), recorded in
            the settings.
        world: a `PromptWorld` whose prompts the model knows (kinema.json "world"); prompts outside it get one
            warning. None: no check.
        ip_adapter: the IP-Adapter loaded into `video_unet` (kinema.loaders.ip_adapter.load_ip_adapter), if any.
        controlnet: a `kinema.models.controlnet.VideoControlNet` (or `VideoSparseControlNet`, or several in a
            `VideoMultiControlNet`) for `video_unet` (kinema.loaders.controlnet), if any: every run then takes
            control images.
        vae_source: the file or folder `vae` was swapped in from, in place of the model's own (recorded in the
            settings as "vae").
    """

    family = "animatediff"
    # The original AnimateDiff inference configs and diffusers' AnimateDiffPipeline example both sample with DDIM.
    default_scheduler = "ddim"
    # No inpaint channels: image-to-video and continuation keep the known frames' latents instead (repaint).
    repaint_fallback = True
    world: PromptWorld | None = None

    def __init__(self, video_unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, source: str | None = None,
                 vae_tiling: bool = False, decode_chunk: int = 16, *, motion_module: str | None = None,
                 loras: Sequence[tuple[str, float]] = (), world: PromptWorld | None = None,
                 ip_adapter: Any = None, controlnet: Any = None, vae_source: str | None = None) -> None:
        if decode_chunk < 1:
            raise KinemaError(f"decode_chunk must be at least 1 frame, got {decode_chunk}")
        self.model = video_unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.source = source
        self.spatial_factor = image_vae_downsample(vae.config.block_out_channels)
        self.decode_chunk = decode_chunk
        self.vae_tiling = vae_tiling
        self.motion_module = motion_module
        self.loras: list[tuple[str, float]] = [(str(path), float(weight)) for path, weight in loras]
        self.world = world
        self.ip_adapter = ip_adapter
        self.controlnet = controlnet
        self.vae_source = vae_source

    @property
    def video_unet(self) -> Any:
        """The `VideoUNet` (the same object as `model`)."""
        return self.model

    @property
    def vae_tiling(self) -> bool:
        """Whether the VAE encodes and decodes in spatial tiles; setting it switches the VAE's own tiling."""
        return bool(self.vae.use_tiling)

    @vae_tiling.setter
    def vae_tiling(self, tiled: bool) -> None:
        if tiled:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    def denoiser(self) -> Denoiser:
        """A `UNetDenoiser` over the VideoUNet (and its ControlNet): latents `(B, 4, F, h, w)` and CLIP states ->
        epsilon."""
        return UNetDenoiser(self.model, self.controlnet)

    @property
    def latent_channels(self) -> int:
        """The VAE's latent channels (4 for SD1.5)."""
        return int(self.vae.config.latent_channels)

    @property
    def animates_image(self) -> bool:
        """Whether the UNet takes more input channels than the latents (PIA's conv_in: a mask and the start image's
        latents besides them)."""
        return int(self.model.unet.config.in_channels) > self.latent_channels

    def image_conditioning(self, image: torch.Tensor, frames: int,
                           pia_motion: int | None = None) -> tuple[Conditioning, Conditioning]:
        """PIA's inputs, as diffusers' PIAPipeline makes them: `inpaint_latents` `(B, 5, F, h, w)`, each frame's mask
        value (`pia_mask_values` of preset `pia_motion`, default 0) then the start image's latents (its posterior
        mean: diffusers draws a sample), the same on both sides of guidance.

        Args:
            image: the start image `(B, 3, H, W)` in [0, 1].
            frames: the clip's frames F.
            pia_motion: an index of `PIA_MOTION_PRESETS` (None: 0, small motion).
        """
        latents = self.encode_frames(image[:, None])  # (B, 4, 1, h, w)
        values = latents.new_tensor(pia_mask_values(frames, pia_motion or 0)).view(1, 1, frames, 1, 1)
        mask = values.expand(latents.shape[0], 1, frames, *latents.shape[3:])
        inputs: dict[str, torch.Tensor | None] = {
            "inpaint_latents": torch.cat([mask, latents.expand(-1, -1, frames, -1, -1)], dim=1)}
        return inputs, dict(inputs)

    def latent_frames(self, frames: int) -> int:
        """One latent frame per pixel frame (an image VAE); frames must be at least 1."""
        if frames < 1:
            raise KinemaError(f"frames must be at least 1, got {frames}")
        return frames

    def pixel_frames(self, latent_frames: int) -> int:
        """One pixel frame per latent frame."""
        return latent_frames

    def cut_off_text(self, prompt: str) -> str | None:
        """The end of `prompt` past CLIP's tokens (77 for SD1.5, with its start and end tokens)."""
        return cut_off_text(self.tokenizer, prompt, text_length(self.tokenizer, self.text_encoder))

    def encode_text(self, prompts: list[str], clip_skip: int = 1) -> Conditioning:
        """`{"encoder_hidden_states": (B, 77, D)}`: CLIP's last hidden states (`clip_skip` 2: the layer before, ...),
        one row per prompt (L = the tokenizer's `model_max_length` when not 77: a kinema.json text encoder's
        max_length)."""
        return {"encoder_hidden_states": encode_prompts(self.text_encoder, self.tokenizer, prompts, clip_skip)}

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Scaled latents `(B, 4, F, H/8, W/8)` float32 (H/8 for SD1.5's VAE) of frames `(B, F, 3, H, W)` in [0, 1]:
        each frame's posterior mean times the VAE's scaling factor, `decode_chunk` frames per VAE call."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise KinemaError(f"encoding takes frames (B, F, 3, H, W) in [0, 1]; got shape {tuple(frames.shape)}")
        self.check_size(frames.shape[-2], frames.shape[-1])
        batch, count = frames.shape[:2]
        images = frames.reshape(batch * count, *frames.shape[2:]) * 2 - 1
        means = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.decode_chunk):
                mean = overflow_safe(self.vae, images[start:start + self.decode_chunk],
                                     lambda chunk: self.vae.encode(chunk).latent_dist.mean)
                means.append(mean.float())
        latents = torch.cat(means) * self.vae.config.scaling_factor
        return latents.reshape(batch, count, *latents.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames `(B, F, 3, H, W)` float32 in [0, 1] from scaled latents `(B, 4, F, h, w)` (see `decode_latents`)."""
        return decode_latents(self.vae, latents, self.decode_chunk)

    def decode_bytes(self, videos: int, frames: int, height: int, width: int) -> int | None:
        """See VideoFamily.decode_bytes: `decode_chunk` frames a call (of every video's frames in a row), each
        chunk moved to the CPU as made (the video and its copy in [0, 1] count there)."""
        widths = self.vae.config.block_out_channels
        tile = int(self.vae.tile_sample_min_size) if self.vae_tiling else None
        parameter = next(self.vae.parameters())
        held = 2 * video_bytes(videos, frames, height, width) if parameter.device.type == "cpu" else 0
        return held + decode_call_bytes(widths[min(1, len(widths) - 1)], min(self.decode_chunk, videos * frames),
                                        height, width, tile, parameter.element_size())

    def settings(self) -> dict[str, Any]:
        """The model, family, and the motion module and LoRAs when known (`loras`: `{"path", "weight"}` each)."""
        recorded = super().settings()
        if self.motion_module is not None:
            recorded["motion_module"] = self.motion_module
        if self.vae_source is not None:
            recorded["vae"] = self.vae_source
        if self.loras:
            recorded["loras"] = [{"path": path, "weight": weight} for path, weight in self.loras]
        if self.ip_adapter is not None:
            recorded["ip_adapter"] = {"path": self.ip_adapter.path, "scale": self.ip_adapter.scale}
            if self.ip_adapter.image_encoder_path is not None:  # given elsewhere than beside the adapter, maybe
                recorded["image_encoder"] = self.ip_adapter.image_encoder_path
        if self.controlnet is not None:
            nets = getattr(self.controlnet, "nets", [self.controlnet])
            steering = [{"path": net.path, "scale": net.scale} for net in nets]
            recorded["controlnet"] = steering[0] if len(steering) == 1 else steering
        return recorded
