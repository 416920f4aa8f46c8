"""kinema's copies of diffusers' VAE posterior and decoder output equal diffusers' own, and `import kinema`'s Slice
VAE path no longer imports diffusers' UNet and transformer packages (the reason for the copies)."""

import subprocess
import sys

import pytest
import torch
from diffusers.models.autoencoders.vae import DecoderOutput as DiffusersDecoderOutput
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as DiffusersGaussian

from kinema.models.distributions import DecoderOutput, DiagonalGaussianDistribution


@pytest.mark.parametrize("shape", [(2, 8, 3, 4, 4), (2, 8, 5, 6)])
def test_posterior_equals_diffusers(shape):
    moments = torch.randn(*shape) * 3  # log-variances past the clamp at both ends
    moments[:, shape[1] // 2:][0, 0] = 40.0
    ours, theirs = DiagonalGaussianDistribution(moments), DiffusersGaussian(moments)
    for name in ("mean", "logvar", "std", "var"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert torch.equal(ours.mode(), theirs.mode())
    assert torch.equal(ours.sample(torch.Generator().manual_seed(3)), theirs.sample(torch.Generator().manual_seed(3)))
    other_moments = torch.randn(*shape)
    assert torch.allclose(ours.kl(), theirs.kl(), rtol=1e-6)
    assert torch.allclose(ours.kl(DiagonalGaussianDistribution(other_moments)),
                          theirs.kl(DiffusersGaussian(other_moments)), rtol=1e-6)
    sample = torch.randn(shape[0], shape[1] // 2, *shape[2:])
    assert torch.allclose(ours.nll(sample), theirs.nll(sample), rtol=1e-6)
    fixed_ours, fixed_theirs = (DiagonalGaussianDistribution(moments, True), DiffusersGaussian(moments, True))
    assert torch.equal(fixed_ours.sample(torch.Generator().manual_seed(1)),
                       fixed_theirs.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(fixed_ours.kl(), fixed_theirs.kl())


def test_decoder_output_behaves_as_diffusers():
    sample = torch.randn(1, 3, 2, 4, 4)
    ours, theirs = DecoderOutput(sample=sample), DiffusersDecoderOutput(sample=sample)
    assert ours[0] is theirs[0] is sample and ours.to_tuple() == theirs.to_tuple()


def test_the_slice_vae_and_video_dit_import_no_diffusers_unet_or_transformer_package():
    code = ("import sys, kinema.models.slice_vae, kinema.models.video_dit, kinema.pipelines.easyanimate; "
            "print(sorted(m for m in ('diffusers.models.unets', 'diffusers.models.transformers', 'scipy.stats') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
