"""Mode vae on a Stable Diffusion model: its image AutoencoderKL trains on the clips' frames as images. The loss
against L1 + KL computed by hand with diffusers' AutoencoderKL, the adversarial terms with each frame judged as a
one-frame clip, a short run whose loss falls and whose export diffusers loads back, and the refusals."""

import pytest
import torch
from diffusers import AutoencoderKL
from loaders.test_stable_diffusion import TINY_VAE
from tiny_models import perturb
from training.test_trainer import first_batch, fixed_loss, make_config

from kinema.errors import KinemaError
from kinema.training.tasks import make_task
from kinema.training.trainer import train
from kinema.training.vae_objective import PatchDiscriminator3D, VAELossSettings, discriminator_loss, vae_losses

# Any frame count works for an image VAE (3 is neither 1 nor 8k, which the Slice VAE would refuse).
SD_VAE_DATA = {"frames": 3, "size": [16, 16], "text_dropout": 0.0}


def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return perturb(AutoencoderKL(**TINY_VAE), 3).eval()


def random_video(b: int, f: int, hw: int) -> torch.Tensor:
    return torch.rand(b, 3, f, hw, hw, generator=torch.Generator().manual_seed(1)) * 2 - 1


def frame_clips(video: torch.Tensor) -> torch.Tensor:
    """`(B, C, F, H, W)` -> `(B * F, C, 1, H, W)`, clip 0's frames first: each frame its own one-frame clip."""
    return torch.stack([video[b, :, f:f + 1] for b in range(video.shape[0]) for f in range(video.shape[2])])


def test_image_vae_losses_equal_l1_and_kl_by_hand() -> None:
    vae = tiny_autoencoder()
    video = random_video(2, 3, 16)
    losses = vae_losses(vae, video, VAELossSettings(kl_weight=0.3), torch.Generator().manual_seed(5),
                        return_decoded=True)
    with torch.no_grad():
        images = frame_clips(video)[:, :, 0]  # (6, 3, 16, 16), clip-major
        posterior = vae.encode(images).latent_dist
        mean, logvar = posterior.mean, posterior.logvar
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
        decoded = vae.decode(mean + torch.exp(0.5 * logvar) * eps).sample  # (6, 3, 16, 16)
        l1 = (decoded - images).abs().mean()
        # latent-diffusion's image autoencoder: KL summed per image, over the 6 images, per pixel of one image.
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum() / (6 * 3 * 16 * 16)
    assert kl > 0.01 and l1 > 0.1  # both terms matter
    torch.testing.assert_close(losses["reconstruction"].detach(), l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["kl"].detach(), kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["loss"].detach(), l1 + 0.3 * kl, rtol=1e-5, atol=1e-6)
    # The decoded video keeps each frame in its place: frame f of clip b is image b * F + f.
    torch.testing.assert_close(frame_clips(losses["decoded"].detach())[:, :, 0], decoded, rtol=1e-5, atol=1e-6)


def test_image_vae_adversarial_terms_judge_each_frame_as_a_one_frame_clip() -> None:
    vae = tiny_autoencoder()
    video = random_video(2, 3, 16)
    torch.manual_seed(0)
    discriminator = PatchDiscriminator3D(base_channels=8, num_layers=2, norm_num_groups=4)
    settings = VAELossSettings(kl_weight=0.0, adversarial_weight=0.5)
    losses = vae_losses(vae, video, settings, torch.Generator().manual_seed(5), discriminator, return_decoded=True)
    fake = frame_clips(losses["decoded"].detach())
    torch.testing.assert_close(losses["adversarial"].detach(), -0.5 * discriminator(fake).mean().detach())
    real = frame_clips(video)
    expected = 0.5 * (torch.relu(1 - discriminator(real)).mean() + torch.relu(1 + discriminator(fake)).mean())
    torch.testing.assert_close(discriminator_loss(discriminator, real, fake), expected)


def test_sd_vae_task_adds_the_discriminator_hinge_loss_on_frame_clips(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, {"path": str(sd_model["path"])}, synth_videos, "vae", SD_VAE_DATA,
                         vae={"adversarial_weight": 0.5})
    task = make_task(config)
    batch = first_batch(config)
    inputs = task.inputs(batch, torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = task.module(**inputs)
        losses = vae_losses(task.model, inputs["video"], task.module.settings, torch.Generator().manual_seed(2),
                            task.discriminator, return_decoded=True)
        hinge = discriminator_loss(task.discriminator, frame_clips(inputs["video"]), frame_clips(losses["decoded"]))
    assert hinge > 0
    torch.testing.assert_close(loss, losses["loss"] + hinge)


def test_sd_vae_mode_trains_the_autoencoder_and_exports_it(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, {"path": str(sd_model["path"])}, synth_videos, "vae", SD_VAE_DATA,
                         train={"steps": 10, "learning_rate": 3e-3})
    task = make_task(config)
    assert isinstance(task.model, AutoencoderKL)
    batch = first_batch(config)
    before_loss = fixed_loss(task, batch)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    result = train(config, progress=False)
    after_loss = fixed_loss(result.task, batch)
    assert after_loss < 0.5 * before_loss, (before_loss, after_loss)
    trained = result.task.model.state_dict()
    assert sum(not torch.equal(before[k], trained[k]) for k in trained) > 0.9 * len(trained)
    exported = AutoencoderKL.from_pretrained(result.final / "vae").state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert sorted(p.name for p in result.final.iterdir()) == ["config.yaml", "export.json", "kinema-output.json", "vae"]


def test_sd_vae_mode_refusals(tmp_path, sd_model, synth_videos):
    model = {"path": str(sd_model["path"]), "motion_module": str(sd_model["motion_module"])}
    with_motion = make_config(tmp_path, model, synth_videos, "vae", SD_VAE_DATA)
    with pytest.raises(KinemaError, match="mode vae trains the VAE alone: remove model.motion_module"):
        make_task(with_motion)
    vae = tiny_autoencoder()  # downsamples 2x
    with pytest.raises(KinemaError, match="multiples of 2"):
        vae_losses(vae, random_video(1, 2, 15), VAELossSettings())
