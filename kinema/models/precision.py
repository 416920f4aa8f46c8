"""Inference precision: a video model's weights and activations in one dtype (the true bf16 path), its convolutions
in the memory layout they run fastest in, and every attention fused through `F.scaled_dot_product_attention`.

This is not autocast. Autocast keeps float32 weights and casts them (and the activations) at every matmul and conv,
on every call; here the weights are cast once, so each layer reads half the bytes and does no casting.

What stays in float32, and why nothing else needs to (measured against the float32 op on the same bf16 inputs,
torch 2.13 CPU; tests/models/test_precision.py checks each):
- GroupNorm and LayerNorm: torch's kernels accumulate half-precision inputs in float32 and round only their
  output (the bf16 result is the float32 op's, rounded: within one bf16 ulp). A float32 copy would buy nothing.
- softmax: SDPA's CPU kernel keeps the softmax statistics in float32 and rounds only the probabilities it
  multiplies with V, for a relative error of 0.18% (one output rounding is 0.2% at most); a softmax taken in bf16
  is 5x worse (0.96%), and running the whole attention in float32 leaves the error of kinema-tiny's bf16 forward
  where it was (0.762% vs 0.761%).
- timestep embeddings and frame encodings: computed in float32 and cast once (diffusers' `get_timestep_embedding`,
  kinema.models.motion.temporal.sinusoidal_frame_encoding).
- the latents, the scheduler and the guidance arithmetic: kinema.sampling.denoisers casts the model's input to its
  dtype and its output back to the latents' float32, so the model's rounding never accumulates over the steps.

What is left of a bf16 model's error is the rounding of the residual stream and of the weights themselves
(relative error ~1e-2 on one forward of the tiny models; the same test states the tolerance).
"""

from __future__ import annotations

import logging
from typing import TypeVar

import torch
from torch import nn

from kinema.errors import KinemaError

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=nn.Module)

INFERENCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cast_module(module: ModelT, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> ModelT:
    """`module.to(device=device, dtype=dtype)` in place, through torch's own `nn.Module.to`, and return it.

    diffusers' `ModelMixin.to` logs "There are modules in X that should be kept in float32: []" on every dtype it is
    given (its keep-in-float32 list defaults to an empty one); its other checks are for quantised and group-offloaded
    models, which kinema's are not when it casts them.
    """
    nn.Module.to(module, device=device, dtype=dtype)
    return module


def prepare_for_inference(model: ModelT, dtype: torch.dtype = torch.bfloat16, *,
                          channels_last: bool = False) -> ModelT:
    """Make `model` run inference in `dtype`, in place, and return it.

    - Every floating parameter and buffer is cast to `dtype` (only when one differs: diffusers warns on each cast).
    - `channels_last`: 4-D weights in `torch.channels_last`, so oneDNN's convolutions run on NHWC without
      reordering their input and output at every call and the GroupNorms beside them use their channels-last
      kernels; the outputs equal the contiguous layout's to float rounding. Off by default: on an AVX2 CPU in
      float32 an SD1.5-size VideoUNet forward was no faster with it (measured on a busy core, 3 runs each, median
      42 s vs 31 s); benchmarks/bench_speed.py measures it in bf16 (`channels_last_speedup`) where bf16 is native.
      Worth it only for models with spatial convolutions (`has_spatial_convolutions`).
    - Every diffusers `Attention` runs a fused-SDPA processor: one still on the classic `AttnProcessor` (softmax of
      a materialised score matrix) is switched to `AttnProcessor2_0`.
    The model's training state (`train()` / `eval()`, `requires_grad`) is left as it is. A channels-last weight is
    not contiguous, so call `model.to(memory_format=torch.contiguous_format)` before saving it with safetensors.

    Args:
        model: a video model (`VideoUNet`, `VideoDiT`), a VAE or a text encoder.
        dtype: `torch.bfloat16` (the fast path on CPUs with AVX-512 BF16 / AMX and on GPUs), `torch.float16`
            (GPUs) or `torch.float32`.
        channels_last: see above.
    """
    if dtype not in INFERENCE_DTYPES:
        raise KinemaError(f"inference dtype must be one of {[str(d) for d in INFERENCE_DTYPES]}, got {dtype}; "
                          "pass torch.bfloat16, torch.float16 or torch.float32")
    floating = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if floating - {dtype}:
        cast_module(model, dtype=dtype)
    if channels_last:
        # Module.to takes memory_format (it converts the 4-D tensors); torch's type stubs do not declare it.
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    use_fused_attention(model)
    return model


def has_spatial_convolutions(model: nn.Module) -> bool:
    """Whether `model` has a `Conv2d` with a kernel of 3x3 or larger (a UNet or a VAE, not a DiT's patch embedding
    or a 1x1 projection)."""
    return any(isinstance(module, nn.Conv2d) and min(module.kernel_size) >= 3 and module.stride == (1, 1)
               for module in model.modules())


def use_fused_attention(model: nn.Module) -> list[str]:
    """Switch every diffusers `Attention` of `model` still on the classic `AttnProcessor` to `AttnProcessor2_0`
    (`F.scaled_dot_product_attention`: flash-style kernels, no score matrix kept); returns the switched modules'
    names. Processors of other kinds (LoRA, IP-Adapter, a user's own) are left alone."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    switched = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and type(module.processor) is AttnProcessor:
            module.set_processor(AttnProcessor2_0())  # type: ignore[arg-type]  # diffusers annotates one class
            switched.append(name)
    if switched:
        logger.info("fused attention (SDPA) for %d attention layers that computed softmax unfused", len(switched))
    return switched
