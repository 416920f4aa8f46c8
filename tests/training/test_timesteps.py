"""The training timestep draw against closed forms: the quantiles of sigmoid(N(mean, std)) and V3's own draw."""

import math

import pytest
import torch

from kinema.training.tasks import draw_timesteps


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (-1.0, 1.0), (0.5, 0.6)])
def test_logit_normal_timesteps_follow_their_quantiles(mean, std):
    drawn = draw_timesteps("logit_normal", 200_000, 1000, torch.Generator().manual_seed(0), mean, std).double()
    for q in (0.1, 0.5, 0.9):
        z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1.0)).item()  # the standard normal's q-quantile
        expected = 1000 / (1 + math.exp(-(mean + std * z)))
        assert torch.quantile(drawn, q).item() == pytest.approx(expected, abs=4)


def test_the_default_draw_is_v3s_and_uniform_covers_every_step():
    # V3 draws sigmoid(randn) * 1000: the defaults keep its numbers, so a run resumed across versions draws the same.
    v3 = (torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(5))) * 1000).long()
    assert torch.equal(draw_timesteps("logit_normal", 64, 1000, torch.Generator().manual_seed(5)), v3)
    uniform = draw_timesteps("uniform", 100_000, 1000, torch.Generator().manual_seed(0))
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.double().mean().item() - 499.5) < 3
