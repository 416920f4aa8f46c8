"""Tests for kinema/training/vae_objective.py: the Slice VAE losses against plain-torch and diffusers computations, the
differentiable decode against vae.decode() and a plain slice-by-slice decode, an overfit check, and the hinge losses.
"""

import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from kinema.errors import KinemaError
from kinema.models.slice_vae import SliceVAE
from kinema.training.vae_objective import (
    PatchDiscriminator3D,
    VAELossSettings,
    discriminator_loss,
    vae_losses,
)


def random_video(b: int, f: int, hw: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, f, hw, hw, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_video() -> torch.Tensor:
    """One 8-frame 32x32 clip of moving colour waves in [-0.8, 0.8]: learnable, unlike noise."""
    f = torch.arange(8).view(1, 1, 8, 1, 1) / 8
    h = torch.arange(32).view(1, 1, 1, 32, 1) / 32
    w = torch.arange(32).view(1, 1, 1, 1, 32) / 32
    phase = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1, 1)
    return 0.8 * torch.sin(2 * math.pi * (h + 0.5 * w + f / 4) + phase)


def randomise(vae: SliceVAE) -> SliceVAE:
    # Fresh GroupNorms are identities and biases start near zero; noise makes every weight matter.
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return vae


def plain_decode(vae: SliceVAE, latents: torch.Tensor) -> torch.Tensor:
    """V3's slice decode rewritten with torch.cat: slice s (2 latents) decoded with slices s-1 and s+1 as context."""
    n = latents.shape[2] // 2
    pieces = []
    for s in range(n):
        lo, hi = max(s - 1, 0), min(s + 2, n)
        shared = vae.decoder.mid_block(vae.decoder.conv_in(vae.post_quant_conv(latents[:, :, 2 * lo:2 * hi])))
        start = 2 * (s - lo)
        pieces.append(vae.decoder.upsample(shared[:, :, start:start + 2]))
    return torch.cat(pieces, dim=2)


def test_terms_equal_plain_torch_and_diffusers(slice_vae: SliceVAE) -> None:
    vae = randomise(slice_vae)
    video = random_video(2, 16, 32)
    settings = VAELossSettings(kl_weight=0.3)
    losses = vae_losses(vae, video, settings, generator=torch.Generator().manual_seed(5), return_decoded=True)

    with torch.no_grad():
        moments = vae.encode(video, tiling="off").latent_dist.parameters
        mean, logvar = moments.chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
        expected_video = vae.decode(mean + torch.exp(0.5 * logvar) * eps).sample
    assert losses["decoded"].shape == video.shape
    torch.testing.assert_close(losses["decoded"].detach(), expected_video, atol=1e-5, rtol=0)

    l1 = (video - expected_video).abs().sum().item() / video.numel()
    # Per clip: 0.5 * sum(mu^2 + var - 1 - logvar) over the latent; then mean over 2 clips, per pixel of one frame.
    kl_sum = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum().item()
    kl = kl_sum / 2 / (3 * 32 * 32)
    assert losses["reconstruction"].item() == pytest.approx(l1, rel=1e-5)
    assert losses["kl"].item() == pytest.approx(kl, rel=1e-5)
    diffusers_kl = DiagonalGaussianDistribution(moments).kl()  # (B, W): diffusers sums dims 1-3 only
    assert losses["kl"].item() == pytest.approx(diffusers_kl.sum().item() / 2 / (3 * 32 * 32), rel=1e-5)
    assert losses["adversarial"].item() == 0
    assert losses["loss"].item() == pytest.approx(l1 + 0.3 * kl, rel=1e-5)

    # The reference's normalisation: (sum |x - x̂| / (B * F) + w * KL_sum / B), divided by C * H * W.
    reference = ((video - expected_video).abs().sum().item() / (2 * 16) + 0.3 * kl_sum / 2) / (3 * 32 * 32)
    assert losses["loss"].item() == pytest.approx(reference, rel=1e-5)

    mse = vae_losses(vae, video, VAELossSettings(reconstruction="mse"), generator=torch.Generator().manual_seed(5))
    assert mse["reconstruction"].item() == pytest.approx(((video - expected_video) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("reconstruction", ["l1", "mse"])
def test_the_temporal_term_is_the_error_of_frame_changes(slice_vae: SliceVAE, reconstruction: str) -> None:
    vae = randomise(slice_vae)
    video = random_video(2, 16, 32)
    settings = VAELossSettings(kl_weight=0.3, reconstruction=reconstruction, temporal_weight=0.7)
    losses = vae_losses(vae, video, settings, generator=torch.Generator().manual_seed(5), return_decoded=True)
    decoded = losses["decoded"].detach()

    errors = []
    for t in range(15):  # frame t to t + 1 of both clips, one pair at a time
        change = (decoded[:, :, t + 1] - decoded[:, :, t]) - (video[:, :, t + 1] - video[:, :, t])
        errors.append(change.abs() if reconstruction == "l1" else change**2)
    temporal = 0.7 * torch.stack(errors).mean().item()
    assert temporal > 0.01
    assert losses["temporal"].item() == pytest.approx(temporal, rel=1e-5)
    untimed = vae_losses(vae, video, VAELossSettings(kl_weight=0.3, reconstruction=reconstruction),
                         generator=torch.Generator().manual_seed(5))
    assert untimed["temporal"].item() == 0
    assert losses["loss"].item() == pytest.approx(untimed["loss"].item() + temporal, rel=1e-5)
    # One frame (an image) has no change to match.
    image = vae_losses(vae, random_video(1, 1, 32), settings, generator=torch.Generator().manual_seed(5))
    assert image["temporal"].item() == 0


def test_decode_is_differentiable_and_matches_plain_slice_decode(slice_vae: SliceVAE) -> None:
    vae = randomise(slice_vae)
    # 3 slices, so the middle one has context on both sides.
    latents = torch.randn(1, 4, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(1, 3, 24, 32, 32, generator=torch.Generator().manual_seed(4))

    z = latents.clone().requires_grad_()
    (vae.decode(z, tiling="off").sample * weights).sum().backward()
    z_plain = latents.clone().requires_grad_()
    plain = plain_decode(vae, z_plain)
    (plain * weights).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(latents).sample, plain, atol=1e-5, rtol=0)
    assert z.grad is not None and z_plain.grad is not None
    torch.testing.assert_close(z.grad, z_plain.grad, atol=1e-5, rtol=1e-4)


def test_gradients_equal_a_plain_torch_objective(slice_vae: SliceVAE) -> None:
    vae = randomise(slice_vae).train()
    video = random_video(1, 16, 32)
    checked = {"encoder.conv_in": vae.encoder.conv_in.weight, "quant_conv": vae.quant_conv.weight,
               "decoder.conv_in": vae.decoder.conv_in.weight, "decoder.conv_out": vae.decoder.conv_out.weight}
    settings = VAELossSettings(kl_weight=0.01)
    vae_losses(vae, video, settings, generator=torch.Generator().manual_seed(0))["loss"].backward()
    grads = {name: weight.grad.clone() for name, weight in checked.items()}
    vae.zero_grad()

    mean, logvar = vae.encode(video, tiling="off").latent_dist.parameters.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    decoded = plain_decode(vae, mean + torch.exp(0.5 * logvar) * eps)
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / (3 * 32 * 32)
    ((decoded - video).abs().mean() + 0.01 * kl).backward()
    for name, weight in checked.items():
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], weight.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_images_take_the_one_frame_path(slice_vae: SliceVAE) -> None:
    vae = randomise(slice_vae)
    losses = vae_losses(vae, random_video(1, 1, 16), VAELossSettings(), return_decoded=True)
    assert losses["decoded"].shape == (1, 3, 1, 16, 16)


def test_training_never_tiles(slice_vae: SliceVAE) -> None:
    vae = randomise(slice_vae)
    vae.register_to_config(use_tiling=True)
    vae.config_tiling = type(vae.config_tiling)(16, 0.25)
    video = random_video(1, 8, 32)
    losses = vae_losses(vae, video, VAELossSettings(), generator=torch.Generator().manual_seed(2), return_decoded=True)
    with torch.no_grad():
        posterior = vae.encode(video, tiling="off").latent_dist
        whole = vae.decode(posterior.sample(torch.Generator().manual_seed(2)), tiling="off").sample
        tiled = vae.decode(posterior.sample(torch.Generator().manual_seed(2))).sample
    assert (whole - tiled).abs().max() > 1e-3  # tiling does change the result here
    torch.testing.assert_close(losses["decoded"].detach(), whole, atol=1e-5, rtol=0)


def test_overfits_one_clip(slice_vae: SliceVAE) -> None:
    vae = slice_vae.train()
    video = smooth_video()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        # The same noise every step: one fixed objective, so the loss falls steadily rather than in spikes.
        loss = vae_losses(vae, video, VAELossSettings(), generator=torch.Generator().manual_seed(0))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] / 2, history


class FixedLogits(nn.Module):
    """A stand-in discriminator: logits `scale * mean(video) + offset` over a fixed (B, 1, 2, 2, 2) pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.pattern = torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.9, 1.5, 3.0, -1.2]).view(1, 1, 2, 2, 2)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.pattern + video.mean()


def test_discriminator_hinge_loss_by_hand() -> None:
    real = torch.full((1, 3, 8, 16, 16), 0.5)
    fake = torch.full((1, 3, 8, 16, 16), -0.25, requires_grad=True)
    pattern = [-2.0, -0.5, 0.0, 0.25, 0.9, 1.5, 3.0, -1.2]
    real_term = sum(max(0.0, 1 - (p + 0.5)) for p in pattern) / 8
    fake_term = sum(max(0.0, 1 + (p - 0.25)) for p in pattern) / 8
    loss = discriminator_loss(FixedLogits(), real, fake)
    assert loss.item() == pytest.approx(0.5 * (real_term + fake_term), rel=1e-6)
    assert not loss.requires_grad  # fake is detached: the VAE gets nothing from this loss


def test_adversarial_term(slice_vae: SliceVAE) -> None:
    vae = randomise(slice_vae)
    video = random_video(1, 8, 32)
    discriminator = FixedLogits()
    off = VAELossSettings(adversarial_weight=0.0)
    losses = vae_losses(vae, video, off, discriminator=discriminator, step=10**6)
    assert losses["adversarial"].item() == 0 and discriminator.calls == 0

    later = VAELossSettings(adversarial_weight=0.5, adversarial_start=100)
    early = vae_losses(vae, video, later, torch.Generator().manual_seed(1), discriminator, step=99)
    assert early["adversarial"].item() == 0 and discriminator.calls == 0
    on = vae_losses(vae, video, later, torch.Generator().manual_seed(1), discriminator, step=100, return_decoded=True)
    assert discriminator.calls == 1
    expected = -0.5 * (discriminator.pattern.mean() + on["decoded"].mean()).item()
    assert on["adversarial"].item() == pytest.approx(expected, rel=1e-5)
    assert on["loss"].item() == pytest.approx(early["loss"].item() + expected, rel=1e-5)


def test_patch_discriminator_shapes_and_gradients() -> None:
    discriminator = PatchDiscriminator3D(base_channels=8, num_layers=3, norm_num_groups=4)
    assert discriminator(random_video(2, 8, 32)).shape == (2, 1, 2, 4, 4)
    assert discriminator(random_video(1, 1, 32)).shape == (1, 1, 1, 4, 4)
    fake = random_video(1, 8, 32).requires_grad_()
    discriminator(fake).mean().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_bad_input_raises(slice_vae: SliceVAE) -> None:
    with pytest.raises(KinemaError, match="reconstruction"):
        VAELossSettings(reconstruction="l2")
    with pytest.raises(KinemaError, match="kl_weight"):
        VAELossSettings(kl_weight=-1.0)
    with pytest.raises(KinemaError, match="adversarial_start"):
        VAELossSettings(adversarial_start=-5)
    with pytest.raises(KinemaError, match="temporal_weight must be >= 0"):
        VAELossSettings(temporal_weight=-0.1)
    with pytest.raises(KinemaError, match=r"\[-1, 1\]"):
        vae_losses(slice_vae, random_video(1, 8, 32) * 127.5 + 127.5, VAELossSettings())
    with pytest.raises(KinemaError, match="multiple of 8"):
        vae_losses(slice_vae, random_video(1, 6, 32), VAELossSettings())
    with pytest.raises(KinemaError, match="discriminator"):
        vae_losses(slice_vae, random_video(1, 8, 32), VAELossSettings(adversarial_weight=0.1))
    with pytest.raises(KinemaError, match="norm_num_groups"):
        PatchDiscriminator3D(base_channels=6, norm_num_groups=8)
    with pytest.raises(KinemaError, match="one shape"):
        discriminator_loss(FixedLogits(), random_video(1, 8, 32), random_video(1, 8, 16))


def test_vae_trains_decoder_keeps_the_encoder(tmp_path, v3_model, synth_videos):
    """vae.trains decoder: the decoder and post-quant conv learn; the encoder and quant conv (latent space) stay."""
    from kinema.training.config import config_from_dict
    from kinema.training.trainer import train

    config = config_from_dict({
        "mode": "vae", "output": str(tmp_path / "run"), "model": {"path": str(v3_model)},
        "data": {"root": str(synth_videos), "frames": 8, "size": [32, 32]}, "vae": {"trains": "decoder"},
        "train": {"steps": 2, "batch_size": 2, "learning_rate": 1e-2}, "log": {"tensorboard": False}})
    import kinema

    before = kinema.load(v3_model / "vae").state_dict()
    train(config, progress=False)
    after = SliceVAE.from_pretrained(tmp_path / "run" / "final" / "vae").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("decoder.", "post_quant_conv.")) for name in changed)
    assert any(name.startswith("post_quant_conv.") for name in changed)
