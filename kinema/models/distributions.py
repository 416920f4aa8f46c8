"""The VAE posterior and decoder output types, as diffusers defines them in `diffusers.models.autoencoders.vae`.

kinema keeps its own copies because importing that module imports every diffusers UNet and transformer (its
`unet_2d_blocks` import pulls in both packages, and scipy): seconds of start-up on each `kinema generate` with the
Slice VAE, which needs none of them. tests/models/test_distributions.py proves both equal to diffusers'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


class DiagonalGaussianDistribution:
    """A diagonal Gaussian over latents from the encoder's moments `(B, 2C, ...)`: mean and log-variance halves,
    the log-variance clamped to [-30, 20] as in diffusers."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw `(B, C, ...)` with diffusers' `randn_tensor` (same numbers for the same generator)."""
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                             dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL divergence to `other` (default the standard normal), summed over dims 1-3: `(B, ...)`."""
        if self.deterministic:
            return torch.Tensor([0.0])
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.Tensor([0.0])
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=list(dims))

    def mode(self) -> torch.Tensor:
        """The mean `(B, C, ...)`."""
        return self.mean


@dataclass
class DecoderOutput(BaseOutput):
    """What `decode` returns with `return_dict=True`: `sample` `(B, C, F, H, W)`."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None
