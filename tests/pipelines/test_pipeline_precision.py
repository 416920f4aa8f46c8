"""Precision of the AnimateDiff pipeline on the CPU: generate() in bfloat16 and float16 (`GenerationRequest.dtype`,
the CLI's --dtype) runs in that dtype end to end, keeps the sampling loop's latents in float32, and gives frames
close to the float32 run, with errors that scale with each format's rounding; the motion modules' norms and
attention compute in float32 inside (only their outputs are rounded).

Tolerances, measured on these tiny models (16x16 px, 4 frames, 2 steps; torch 2.13 on an AVX2 CPU): the frames (in
[0, 1], std 0.16) differ from the float32 run by 0.0091 on average for bfloat16 (max 0.054) and 0.00105 for float16.
That is well above one rounding of the frames, because every activation is rounded and guidance 7.5 multiplies the
difference of the conditional and unconditional predictions, rounding errors included, by 7.5. Two facts make the
tolerances (mean 0.02, max 0.1 for bfloat16) sound rather than merely observed: the error ratio bfloat16 / float16
is 8.7, the ratio of the formats' unit roundoffs (2^-8 / 2^-11 = 8), so the error grows as rounding does (a part
of the float16 run done in a coarser format would pull the ratio toward 1); and another seed lands 0.18 away on
average, so "close" is 19x closer than an unrelated video.
"""

import copy

import pytest
import torch
from sampling.test_parity import pair  # noqa: F401  (the fixture: diffusers' pipeline and kinema's VideoUNet)

from kinema.models.motion import TemporalMotionModule, video_group_norm
from kinema.pipelines.animatediff import AnimateDiffFamily
from kinema.pipelines.generation import generate
from kinema.pipelines.request import GenerationRequest

FRAMES, STEPS, SIZE, SEED = 4, 2, 16, 5
BF16_ROUNDOFF, FP16_ROUNDOFF = 2.0**-8, 2.0**-11  # unit roundoffs: the largest relative error of one rounding


def run(pair, dtype, seed=SEED):  # noqa: F811
    """generate() on fresh copies of the tiny models (it casts them in place) in `dtype`; returns the result and the
    dtypes of the latents the VideoUNet was called with."""
    pipe, video = pair
    video, vae, text_encoder = (copy.deepcopy(m) for m in (video, pipe.vae, pipe.text_encoder))
    seen = []
    video.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    tokenizer = copy.copy(pipe.tokenizer)
    tokenizer.model_max_length = 77
    request = GenerationRequest(prompt="a red fox runs", negative_prompt="blurry", frames=FRAMES, height=SIZE,
                                width=SIZE, steps=STEPS, guidance=7.5, seeds=[seed], dtype=dtype)
    result = generate(AnimateDiffFamily(video, vae, text_encoder, tokenizer), request, progress=False)
    return result, set(seen)


@pytest.fixture(scope="module")
def runs(pair):  # noqa: F811
    return {dtype: run(pair, dtype) for dtype in ("float32", "bfloat16", "float16")}


def frame_error(runs, dtype):
    return (runs[dtype][0].frames - runs["float32"][0].frames).abs()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_end_to_end_with_float32_latents(runs, dtype):
    result, unet_inputs = runs[dtype]
    assert result.report["dtype"] == dtype
    assert unet_inputs == {getattr(torch, dtype)}  # every UNet call, not a float32 model fed half inputs
    assert result.latents.dtype == torch.float32  # the scheduler steps in float32
    frames = result.frames
    assert frames.dtype == torch.float32 and frames.shape == (1, FRAMES, 3, SIZE, SIZE)
    assert torch.isfinite(frames).all() and frames.min() >= 0 and frames.max() <= 1


def test_bfloat16_frames_are_close_to_float32(runs, pair):  # noqa: F811
    error = frame_error(runs, "bfloat16")
    print(f"bfloat16: mean abs difference {error.mean():.4f}, max {error.max():.4f}")
    assert error.mean().item() <= 0.02 and error.max().item() <= 0.1
    assert error.max().item() > 0  # it did run in bfloat16
    other_seed = (run(pair, "float32", seed=SEED + 1)[0].frames - runs["float32"][0].frames).abs().mean().item()
    print(f"another seed: mean abs difference {other_seed:.4f}")
    assert other_seed > 5 * error.mean().item()


def test_float16_works_on_cpu_and_is_closer_than_bfloat16(runs):
    """float16 on the CPU runs in torch 2.13 (no error to give): its error is bfloat16's scaled by the formats'
    roundoffs (8x smaller)."""
    bf16, fp16 = frame_error(runs, "bfloat16").mean().item(), frame_error(runs, "float16").mean().item()
    print(f"float16: mean abs difference {fp16:.5f}; bfloat16 / float16 = {bf16 / fp16:.2f}")
    assert fp16 <= 0.003 and frame_error(runs, "float16").max().item() <= 0.02
    expected_ratio = BF16_ROUNDOFF / FP16_ROUNDOFF
    assert expected_ratio / 2.5 <= bf16 / fp16 <= expected_ratio * 2.5


def to_bf16_and_back(tensor):
    return tensor.to(torch.bfloat16).float()


@pytest.mark.parametrize("mode", ["per_frame", "across_frames"])
def test_video_group_norm_in_bfloat16_is_the_float32_result_rounded(mode):
    """Statistics accumulate in float32 inside the kernel: the bfloat16 output is within one bfloat16 rounding of the
    float32 computation on the same (bfloat16) numbers; large-mean inputs would show 16-bit accumulation."""
    gen = torch.Generator().manual_seed(0)
    x = to_bf16_and_back(torch.randn(2, 64, 4, 8, 8, generator=gen) * 3 + 20)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(to_bf16_and_back(torch.randn(64, generator=gen)))
        norm.bias.copy_(to_bf16_and_back(torch.randn(64, generator=gen)))
        expected = video_group_norm(norm, x, mode)
        ours = video_group_norm(norm.to(torch.bfloat16), x.to(torch.bfloat16), mode)
    assert ours.dtype == torch.bfloat16
    assert ((ours.float() - expected).abs() <= expected.abs() * BF16_ROUNDOFF + 1e-6).all()


def test_motion_module_in_bfloat16_is_within_a_few_roundings_of_float32():
    """A whole temporal motion module (GroupNorm, LayerNorms, attention softmax, GEGLU) in bfloat16 against its
    float32 twin on the same bfloat16-representable weights and input: every layer's output is rounded once, so the
    error stays a few roundoffs of the output's scale."""
    torch.manual_seed(0)
    module = TemporalMotionModule(64, num_attention_heads=8, norm_mode="across_frames").eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(to_bf16_and_back(parameter + 0.05 * torch.randn_like(parameter)))
        x = to_bf16_and_back(torch.randn(2, 64, 8, 4, 4))
        expected = module(x) - x  # the module's own contribution, without the residual input
        half = copy.deepcopy(module).to(torch.bfloat16)
        ours = half(x.to(torch.bfloat16)).float() - x
    relative = ((ours - expected).abs().max() / expected.abs().max()).item()
    print(f"motion module bfloat16: max error {relative:.4f} of the output's max")
    assert relative <= 8 * BF16_ROUNDOFF


def test_text_to_video_keeps_the_dtype_the_models_were_cast_to(pair):  # noqa: F811
    from kinema.pipelines.from_parts import text_to_video

    pipe, video = pair
    video, vae, text_encoder = (copy.deepcopy(m).to(torch.bfloat16) for m in (video, pipe.vae, pipe.text_encoder))
    tokenizer = copy.copy(pipe.tokenizer)
    tokenizer.model_max_length = 77
    text_to_video(video, {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}, "a red fox runs",
                  frames=FRAMES, height=SIZE, width=SIZE, steps=1, seeds=[SEED], progress=False, output="latent")
    assert next(video.parameters()).dtype == torch.bfloat16
