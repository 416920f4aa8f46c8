"""Tiny model configs and weight perturbation shared by the tests (seconds on a CPU)."""

import torch

# An SD1.5-shaped UNet2DConditionModel: one cross-attention level and one plain level, 16x16 latents.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32, attention_head_dim=8,
)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded Gaussian noise to every parameter, so zero-initialised parts stop being identities."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module
