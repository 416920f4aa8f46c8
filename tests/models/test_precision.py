"""kinema.models.precision: the bf16 path against the float32 model on fixed seeds, the rule behind what stays in
float32 (torch's bf16 norm and attention kernels accumulate in float32), channels-last and fused attention changing
nothing but rounding, and a bf16 model under the float32 sampling loop.

Tolerances are relative errors, ||bf16 - fp32|| / ||fp32|| over the whole output. bf16 keeps 8 significant bits
(rounding error up to 2^-9 = 0.2% per value); measured on these models (torch 2.13 CPU): 0.76% (kinema-tiny's DiT)
and 1.5% (the tiny video UNet) for one forward, 3.3% after 3 DDIM steps; the bounds leave 2.5x room or more. The
norm and attention kernels are held to the rounding of their output: a norm that accumulated in bf16 would fail.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from tiny_models import perturb, tiny_video_unet

from kinema.bundled import bundled_model_path
from kinema.errors import KinemaError
from kinema.models.precision import has_spatial_convolutions, prepare_for_inference, use_fused_attention
from kinema.models.video_dit import VideoDiT
from kinema.sampling.denoisers import DiTDenoiser
from kinema.sampling.loop import initial_noise, sample
from kinema.sampling.schedulers import make_scheduler

ONE_FORWARD_TOLERANCE = 0.04
SAMPLING_TOLERANCE = 0.08
BF16_ULP = 2.0**-8  # the spacing of bf16 values relative to their size: twice the worst rounding error


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.float() - reference).norm() / reference.norm()).item()


def within_one_ulp(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Every value of the bf16 `output` is the float32 `reference` up to the rounding of a bf16 result."""
    return bool(((output.float() - reference).abs() <= reference.abs() * BF16_ULP + 1e-6).all())


@pytest.fixture(scope="module")
def kinema_tiny_dit() -> VideoDiT:
    return VideoDiT.from_pretrained(bundled_model_path("kinema-tiny") / "transformer").eval()


def dit_inputs(model: VideoDiT) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy latents `(1, C_in, 4, h, w)` at the model's latent size and text states `(1, 32, D)`, seeded."""
    generator = torch.Generator().manual_seed(5)
    config = model.config
    latents = torch.randn(1, config.in_channels, 4, config.sample_size, config.sample_size, generator=generator)
    return latents, torch.randn(1, 32, config.caption_channels, generator=generator)


def unet_with_motion(unet2d):
    """The tiny video UNet with perturbed (non-identity) motion modules, so they count in the output."""
    return perturb(tiny_video_unet(unet2d), seed=4, scale=0.02).eval()


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    return torch.randn(1, 4, 4, 8, 8, generator=generator), torch.randn(1, 7, 32, generator=generator)


# ---------------------------------------------------------------- the rule: no norm or softmax needs a float32 copy


def test_bf16_norm_and_attention_kernels_round_only_their_output():
    # Inputs already in bf16, so the float32 op on the same values is the exact answer the kernel should round.
    generator = torch.Generator().manual_seed(0)
    image = (torch.randn(4, 64, 16, 16, generator=generator) * 3 + 1).bfloat16()
    tokens = (torch.randn(512, 96, generator=generator) * 3 + 1).bfloat16()
    weight, bias = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = image.contiguous(memory_format=layout)
        assert within_one_ulp(F.group_norm(x, 32, weight.bfloat16(), bias.bfloat16()),
                              F.group_norm(x.float(), 32, weight.bfloat16().float(), bias.bfloat16().float()))
    assert within_one_ulp(F.layer_norm(tokens, (96,)), F.layer_norm(tokens.float(), (96,)))
    # SDPA rounds the probabilities it multiplies with V too, so the bound is one ulp over the whole output: 0.18%
    # measured; a softmax taken in bf16 gives 0.96%.
    q, k, v = (torch.randn(8, 4, 64, 32, generator=generator).bfloat16() * 2 for _ in range(3))
    error = relative_error(F.scaled_dot_product_attention(q, k, v),
                           F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    assert error <= BF16_ULP


# ---------------------------------------------------------------- whole models


def test_bf16_dit_within_tolerance_of_float32(kinema_tiny_dit):
    latents, text = dit_inputs(kinema_tiny_dit)
    with torch.no_grad():
        reference = kinema_tiny_dit(latents, 500, text)
        fast = prepare_for_inference(copy.deepcopy(kinema_tiny_dit), torch.bfloat16)
        output = fast(latents.bfloat16(), 500, text.bfloat16())
    assert {p.dtype for p in fast.parameters()} == {torch.bfloat16}
    assert output.dtype == torch.bfloat16
    error = relative_error(output, reference)
    print(f"kinema-tiny DiT bf16 vs fp32: relative error {error:.4f}")
    assert error <= ONE_FORWARD_TOLERANCE
    assert not has_spatial_convolutions(fast)  # a DiT's one conv is its patch embedding: no use for channels-last


def test_bf16_video_unet_within_tolerance_of_float32(unet2d):
    model = unet_with_motion(unet2d)
    latents, text = unet_inputs()
    with torch.no_grad():
        reference = model(latents, 500, text)
        fast = prepare_for_inference(copy.deepcopy(model), torch.bfloat16, channels_last=True)
        output = fast(latents.bfloat16(), 500, text.bfloat16())
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    error = relative_error(output, reference)
    print(f"tiny VideoUNet bf16 (channels-last) vs fp32: relative error {error:.4f}")
    assert error <= ONE_FORWARD_TOLERANCE


def test_channels_last_and_fused_attention_change_only_rounding(unet2d):
    model = unet_with_motion(unet2d)
    model.unet.set_attn_processor(AttnProcessor())  # the classic, unfused softmax everywhere (motion modules too)
    latents, text = unet_inputs()
    with torch.no_grad():
        reference = model(latents, 500, text)
        prepared = prepare_for_inference(copy.deepcopy(model), torch.float32, channels_last=True)
        output = prepared(latents, 500, text)
    assert has_spatial_convolutions(prepared)
    assert {type(p) for p in prepared.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert use_fused_attention(prepared) == []  # nothing left to switch
    assert (output - reference).abs().max().item() <= 1e-4


def test_a_bf16_model_in_the_float32_sampling_loop(kinema_tiny_dit):
    """The latents and the scheduler stay float32 around a bf16 model (a loop run in bf16 returns bf16 latents),
    and 3 DDIM steps with guidance stay within tolerance of the float32 model's."""
    latents, text = dit_inputs(kinema_tiny_dit)
    channels = kinema_tiny_dit.config.out_channels  # the InP channels beyond these are conditioning
    noise = initial_noise((1, channels, *latents.shape[2:]), seeds=[3])
    inpaint = latents[:, channels:]
    cond = DiTDenoiser.conditioning(text, inpaint_latents=inpaint)
    uncond = DiTDenoiser.conditioning(torch.zeros_like(text), inpaint_latents=inpaint)

    def run(model: VideoDiT) -> torch.Tensor:
        with torch.no_grad():
            return sample(DiTDenoiser(model), make_scheduler("ddim"), noise, cond, uncond, 3, 6.0, progress=False)

    reference = run(kinema_tiny_dit)
    output = run(prepare_for_inference(copy.deepcopy(kinema_tiny_dit), torch.bfloat16))
    assert output.dtype == torch.float32
    error = relative_error(output, reference)
    print(f"3 DDIM steps, bf16 model vs fp32: relative error {error:.4f}")
    assert error <= SAMPLING_TOLERANCE


def test_refuses_a_dtype_it_cannot_run():
    with pytest.raises(KinemaError, match="inference dtype"):
        prepare_for_inference(torch.nn.Linear(4, 4), torch.int8)
