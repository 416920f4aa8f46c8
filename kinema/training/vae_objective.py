"""The VAE training objective (`kinema train` mode `vae`): reconstruction + KL, and an optional adversarial term, for
both VAEs kinema trains: EasyAnimate V3's Slice VAE (video in, video out) and an SD-style image `AutoencoderKL`
(AnimateDiff's family), which sees a batch of clips `(B, 3, F, H, W)` as `B * F` independent images.

EasyAnimate V3 trained its Slice VAE with latent-diffusion's `LPIPSWithDiscriminator` (kl_weight 1e-6, L1 weight 1,
LPIPS weight 1, discriminator from step 50,001; the decoder-only fine-tune uses L2). That loss sums the pixel error
over each frame and divides by the number of frames, and sums the KL over each clip's latent and divides by the number
of clips. Here the reconstruction is a plain mean over every pixel, so the KL is divided by the pixels of one frame
(C x H x W of the video) as well: `rec + kl_weight * kl` is then exactly the reference's `nll + kl_weight * kl`
divided by C x H x W, and the published kl_weight keeps its meaning at any clip size. The image VAE follows
latent-diffusion's image autoencoder, which divides both sums by the number of images: there the KL is divided by
the pixels of one frame times B * F, so the same kl_weight (SD's VAE also used 1e-6) means the same.

Not implemented: LPIPS (it needs VGG weights), the reference's learnable output log-variance (initialised to 0, i.e. a
no-op at the start), and its adaptive discriminator weight (here `adversarial_weight` is fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from torch import nn

from kinema.errors import KinemaError
from kinema.models.distributions import DiagonalGaussianDistribution
from kinema.models.presets import image_vae_downsample
from kinema.models.slice_vae import SliceVAE

RECONSTRUCTIONS = ("l1", "mse")
# Pixels are expected in [-1, 1]; a little slack lets resampling overshoot through.
RANGE_SLACK = 1e-3


@dataclass
class VAELossSettings:
    """Weights of the VAE objective.

    kl_weight: multiplies the per-pixel KL (see the module docstring; V3's configs: 1e-6).
    reconstruction: "l1" (V3's pretraining) or "mse" (V3's decoder-only fine-tune).
    adversarial_weight: multiplies the generator's hinge term `-mean(D(x̂))`; 0 turns it off.
    adversarial_start: the first training step at which the adversarial term counts (V3: 50,001).
    temporal_weight: multiplies the error of the frame-to-frame changes, `x̂[t+1] - x̂[t]` against `x[t+1] - x[t]`
        (measured as `reconstruction` is); 0 turns it off (V3 has no such term). The per-frame error alone lets the
        decoder jump where one latent frame's 4 frames meet the next's: kinema-tiny's reconstructions changed 2.0x
        the median frame change from frame 7 to 8 (the decoder slices' seam) and 1.2-1.4x at the other joins.
    """

    kl_weight: float = 1e-6
    reconstruction: str = "l1"
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    temporal_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTIONS:
            raise KinemaError(f"VAE reconstruction loss {self.reconstruction!r} is unknown; use one of "
                              f"{list(RECONSTRUCTIONS)}.")
        if not self.kl_weight >= 0:
            raise KinemaError(f"VAE kl_weight must be >= 0; got {self.kl_weight} (EasyAnimate V3 used 1e-6).")
        if not self.adversarial_weight >= 0:
            raise KinemaError(f"VAE adversarial_weight must be >= 0 (0 turns it off); got {self.adversarial_weight}.")
        if not self.temporal_weight >= 0:
            raise KinemaError(f"VAE temporal_weight must be >= 0 (0 turns it off); got {self.temporal_weight}.")
        if isinstance(self.adversarial_start, bool) or not isinstance(self.adversarial_start, int) \
                or self.adversarial_start < 0:
            raise KinemaError(f"VAE adversarial_start must be a step number >= 0; got {self.adversarial_start!r}.")

    def adversarial_on(self, step: int) -> bool:
        """Whether the adversarial term counts at training step `step`."""
        return self.adversarial_weight > 0 and step >= self.adversarial_start


def _check_pixels(video: torch.Tensor) -> None:
    if not torch.is_floating_point(video):
        raise KinemaError(f"VAE training video must be floating point in [-1, 1]; got {video.dtype}. "
                          "Convert uint8 frames with x / 127.5 - 1.")
    low, high = torch.aminmax(video.detach())
    if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise KinemaError(f"VAE training video must be in [-1, 1]; got values from {low.item():.3g} to "
                          f"{high.item():.3g}. Scale frames with x / 127.5 - 1 (uint8) or 2x - 1 ([0, 1]).")


def _is_image_vae(vae: SliceVAE | AutoencoderKL) -> bool:
    """True for an image VAE (`AutoencoderKL`), False for the Slice VAE; anything else is refused."""
    if isinstance(vae, AutoencoderKL):
        return True
    if isinstance(vae, SliceVAE):
        return False
    raise KinemaError(f"mode vae trains a SliceVAE or a diffusers AutoencoderKL, not a {type(vae).__name__}; give an "
                      "EasyAnimate V3 or Stable Diffusion model folder")


def _check_image_shape(vae: AutoencoderKL, video: torch.Tensor) -> None:
    """The image VAE's shape rules (the Slice VAE checks its own): video `(B, C, F, H, W)` with C its input channels
    and H, W multiples of its downsampling factor, so the decoded frames have the input's size."""
    channels = int(vae.config["in_channels"])
    factor = image_vae_downsample(vae.config["block_out_channels"])
    if video.ndim != 5 or video.shape[1] != channels:
        raise KinemaError(f"VAE training video must be (B, {channels}, F, H, W); got shape {tuple(video.shape)}.")
    if video.shape[-2] % factor or video.shape[-1] % factor:
        raise KinemaError(f"this VAE downsamples {factor}x, so frame height and width must be multiples of {factor}; "
                          f"got {video.shape[-2]}x{video.shape[-1]}: set data.size to multiples of {factor}.")


def frames_as_images(video: torch.Tensor) -> torch.Tensor:
    """Video `(B, C, F, H, W)` -> images `(B * F, C, H, W)`, clip-major (clip 0's frames first)."""
    batch, channels, frames, height, width = video.shape
    return video.transpose(1, 2).reshape(batch * frames, channels, height, width)


def images_as_frames(images: torch.Tensor, batch: int) -> torch.Tensor:
    """Images `(B * F, C, H, W)` -> video `(B, C, F, H, W)`: the inverse of `frames_as_images`."""
    count, channels, height, width = images.shape
    return images.reshape(batch, count // batch, channels, height, width).transpose(1, 2)


def discriminator_input(vae: SliceVAE | AutoencoderKL, video: torch.Tensor) -> torch.Tensor:
    """`video` `(B, C, F, H, W)` as the 3D discriminator judges it for `vae`: whole clips for the Slice VAE; for an
    image VAE each frame a one-frame clip `(B * F, C, 1, H, W)`, since it encodes frames independently and has no
    temporal consistency to be judged on."""
    if _is_image_vae(vae):
        return frames_as_images(video).unsqueeze(2)
    return video


def vae_losses(
    vae: SliceVAE | AutoencoderKL,
    video: torch.Tensor,
    settings: VAELossSettings,
    generator: torch.Generator | None = None,
    discriminator: nn.Module | None = None,
    step: int = 0,
    return_decoded: bool = False,
) -> dict[str, torch.Tensor]:
    """One generator-side loss of the VAE on `video` `(B, 3, F, H, W)` in [-1, 1].

    Slice VAE (F = 1 or 8k): encodes slice by slice to the posterior over latents `(B, 4, F', H/8, W/8)`. Image VAE
    (`AutoencoderKL`, any F, H and W multiples of its downsampling): encodes the `B * F` frames as images to latents
    `(B * F, 4, h, w)` (clip-major: `frames_as_images`). Samples `z = mean + std * eps` with eps from `generator`,
    decodes `z` to `x̂` `(B, 3, F, H, W)`, with gradients through both. Tiling is off: a training clip is encoded and
    decoded whole, as V3 trained. Returns float32 scalars:

    - "reconstruction": mean |x - x̂| ("l1") or mean (x - x̂)² ("mse") over every element;
    - "kl": KL(posterior || N(0, I)) summed over each sample's latent (a clip's for the Slice VAE, an image's for the
      image VAE), averaged over the samples (B, or B * F), divided by C*H*W;
    - "adversarial": `adversarial_weight * -mean(discriminator(x̂))` from step `adversarial_start`, else 0 (and the
      discriminator is not called); the discriminator sees `discriminator_input(vae, x̂)`;
    - "temporal": `temporal_weight` times the reconstruction error of the frame differences (along F), 0 for F = 1;
    - "loss": reconstruction + kl_weight * kl + adversarial + temporal;
    - "decoded": `x̂` (still attached to the graph), only with `return_decoded`, e.g. for `discriminator_loss`.

    The adversarial term also puts gradients on the discriminator's parameters: step only the VAE's optimizer with
    this loss. Raises KinemaError for video outside [-1, 1], a shape the VAE does not take, or an adversarial weight
    without a discriminator, before any conv runs.
    """
    _check_pixels(video)
    image_vae = _is_image_vae(vae)
    if image_vae:
        _check_image_shape(vae, video)  # type: ignore[arg-type]  # _is_image_vae: an AutoencoderKL
    if settings.adversarial_weight > 0 and discriminator is None:
        raise KinemaError("VAE adversarial_weight > 0 needs a discriminator (e.g. PatchDiscriminator3D); pass one "
                          "or set adversarial_weight to 0.")
    # The posterior and the losses in float32, so a half-precision VAE does not round the KL's large sums.
    batch, channels, frames, height, width = video.shape
    if image_vae:
        moments = vae.encode(frames_as_images(video)).latent_dist.parameters.float()  # type: ignore[union-attr]
    else:
        moments = vae.encode(video, tiling="off").latent_dist.parameters.float()  # type: ignore[union-attr,call-arg]
    posterior = DiagonalGaussianDistribution(moments)
    latents = posterior.sample(generator=generator)
    if image_vae:
        decoded = images_as_frames(vae.decode(latents).sample, batch)  # type: ignore[union-attr]
    else:
        decoded = vae.decode(latents, tiling="off").sample  # type: ignore[union-attr,call-arg]

    target, estimate = video.float(), decoded.float()
    error = F.l1_loss if settings.reconstruction == "l1" else F.mse_loss
    reconstruction = error(estimate, target)
    if settings.temporal_weight > 0 and frames > 1:
        temporal = settings.temporal_weight * error(estimate.diff(dim=2), target.diff(dim=2))
    else:
        temporal = torch.zeros((), device=reconstruction.device)
    samples = batch * frames if image_vae else batch
    kl = posterior.kl().sum() / (samples * channels * height * width)

    if settings.adversarial_on(step):
        assert discriminator is not None  # checked above
        judged = discriminator_input(vae, decoded)
        adversarial = -settings.adversarial_weight * discriminator(judged).float().mean()
    else:
        adversarial = torch.zeros((), device=reconstruction.device)
    losses = {
        "loss": reconstruction + settings.kl_weight * kl + adversarial + temporal,
        "reconstruction": reconstruction,
        "kl": kl,
        "adversarial": adversarial,
        "temporal": temporal,
    }
    if return_decoded:
        losses["decoded"] = decoded
    return losses


class PatchDiscriminator3D(nn.Module):
    """A small 3D-conv PatchGAN: video `(B, C, F, H, W)` -> logits `(B, 1, F', H', W')`, one per space-time patch.

    The first conv halves H and W; each of the next `num_layers - 1` halves F, H and W (an image, F = 1, keeps one
    frame); a stride-1 conv and the 1-channel output conv follow. Widths are `base_channels * 2**min(i, 3)`.
    GroupNorm rather than PatchGAN's BatchNorm: VAE batches are a clip or two, too few for batch statistics. Weights
    start at N(0, 0.02) (norm scales N(1, 0.02)), as in the taming / latent-diffusion discriminators.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm_num_groups: int = 32):
        super().__init__()
        widths = [base_channels * 2 ** min(i, 3) for i in range(num_layers + 1)]
        if num_layers < 1 or base_channels < 1 or in_channels < 1:
            raise KinemaError(f"PatchDiscriminator3D needs in_channels, base_channels and num_layers >= 1; got "
                              f"{in_channels}, {base_channels}, {num_layers}.")
        if norm_num_groups < 1 or any(w % norm_num_groups for w in widths[1:]):
            raise KinemaError(f"PatchDiscriminator3D norm_num_groups={norm_num_groups} must divide every normalised "
                              f"width {widths[1:]}; pick a divisor of {base_channels * 2}.")
        self.in_channels = in_channels
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, widths[0], kernel_size=3, stride=(1, 2, 2), padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv3d(widths[i - 1], widths[i], kernel_size=3, stride=stride, padding=1),
                nn.GroupNorm(norm_num_groups, widths[i]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv3d(widths[-1], 1, kernel_size=3, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0 if isinstance(module, nn.GroupNorm) else 0.0, 0.02)
                nn.init.zeros_(module.bias)  # type: ignore[arg-type]  # both are built with a bias

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Logits `(B, 1, F', H', W')` for video `(B, C, F, H, W)`; higher means "looks real"."""
        if video.ndim != 5 or video.shape[1] != self.in_channels:
            raise KinemaError(f"PatchDiscriminator3D expects video (B, {self.in_channels}, F, H, W); got shape "
                              f"{tuple(video.shape)}.")
        return self.layers(video)


def discriminator_loss(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: `0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))`, a float32 scalar.

    `real` and `fake` are videos `(B, 3, F, H, W)` (fake: `vae_losses(..., return_decoded=True)["decoded"]`), each
    through `discriminator_input` for the VAE that made it; both are detached, so this loss trains the discriminator
    only. As in the reference, call it only from the step at which
    the adversarial term starts.
    """
    if real.shape != fake.shape or real.ndim != 5:
        raise KinemaError(f"discriminator_loss expects real and fake videos of one shape (B, 3, F, H, W); got "
                          f"{tuple(real.shape)} and {tuple(fake.shape)}.")
    logits_real = discriminator(real.detach()).float()
    logits_fake = discriminator(fake.detach()).float()
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
