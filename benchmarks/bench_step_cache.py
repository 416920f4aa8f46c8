"""Step caching and CFG truncation: sampling time per video and how far the result moves, against caching off.

Usage: python benchmarks/bench_step_cache.py [--quick] [--steps N] [--threads N]

Two models, each sampled the same way in several modes, every (model, mode) case in a fresh subprocess
(benchmarks/common.py):
- `tiny`: the bundled kinema-tiny transformer (trained weights; 6 blocks, U-ViT skips) at its default video, 16
  frames at 64x64 px (latents 4 x 8 x 8), text-to-video: seeded random text states stand in for its text encoder
  and zeros for the inpaint latents of nothing kept (neither changes what is timed: the denoising loop).
- `sd`: a small SD1.5-shaped AnimateDiff UNet with seeded random weights: SD1.5's four levels, two resnets per level
  and cross-attention on the first three, at a tenth of its width (32/64/128/128), 8 heads, 64-wide text states,
  v2-style motion modules (2 per down block, 3 per up block, one in the mid block) perturbed so frames interact; 16
  frames at 128x128 px (latents 16 x 16; `--quick`: 8 frames at 64x64).
Modes: `off` (the reference: every step in full), `cache2` / `cache3` (`sample(cache_interval=2 / 3)`: deep features
every 2nd / 3rd step, default depth), `cfg0.6` (`cfg_truncation=0.6`: guidance on the first 60% of the steps, the
rest at batch B), and `cache2+cfg0.6` (both; not with `--quick`).

Every case: batch 1, DDIM, guidance 6 (kinema-tiny's default), 10 steps (`--steps`; 25 for `sd` without
`--quick`), seed 0, one torch thread (`--threads`), float32; the model is built (or loaded) and run once on the
guided batch before the clock starts (a fresh process's first forward pays one-time set-up). `seconds` is the
`sample` call alone; `model_calls` counts the model's forward calls and `model_calls_reused` those that skipped its
deep part (forward hooks on the model and on a deep block). Each case writes its final latents into a temporary
folder, and the summary reads them back: `relative_l2` = ||latents - off's|| / ||off's|| per mode. For scale, each
model also runs `half_steps` (off at half the steps): fewer steps is the other way to buy time, and a mode that
moves the result less than halving the steps does buys its time more cheaply.

The last printed line is one JSON object: the harness's figures per case (ratios to `tiny.off`: read the per-model
figures instead), and per model `speedup` (off's seconds / the mode's) and `relative_l2` per mode, plus `settings`.
Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import (
    CASE_OPTION,
    SMALL_SD_TEXT_WIDTH,
    SMALL_SD_UNET,
    mix_motion_modules,
    quick_parser,
    run_benchmark,
)

MODELS = ("tiny", "sd")
MODES: dict[str, dict[str, Any]] = {
    "off": {},
    "cache2": {"cache_interval": 2},
    "cache3": {"cache_interval": 3},
    "cfg0.6": {"cfg_truncation": 0.6},
    "cache2+cfg0.6": {"cache_interval": 2, "cfg_truncation": 0.6},
    "half_steps": {},
}
QUICK_MODES = ("off", "cache2", "cache3", "cfg0.6", "half_steps")
REFERENCE = "tiny.off"
GUIDANCE, SEED = 6.0, 0

TEXT_WIDTH, UNET = SMALL_SD_TEXT_WIDTH, SMALL_SD_UNET


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 10; 25 for sd without "
                                                                "--quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (default 1)")
    parser.add_argument("--latents-dir", default=None, help=argparse.SUPPRESS)


def cases_for(argv: list[str]) -> list[str]:
    """`MODEL.MODE` for every model and the modes of this run (fewer with `--quick`)."""
    options, _ = quick_parser(add_arguments).parse_known_args(argv)
    modes = QUICK_MODES if options.quick else tuple(MODES)
    return [f"{model}.{mode}" for model in MODELS for mode in modes]


def sampling_steps(model: str, options: argparse.Namespace) -> int:
    """`--steps`, else 10 (25 for `sd` without `--quick`)."""
    if options.steps is not None:
        return int(options.steps)
    return 25 if model == "sd" and not options.quick else 10


def check_options(options: argparse.Namespace) -> None:
    """One line (SystemExit) for settings no case can run."""
    if options.steps is not None and options.steps < 2:
        raise SystemExit(f"bench_step_cache: --steps must be at least 2, got {options.steps}")
    if options.threads < 1:
        raise SystemExit(f"bench_step_cache: --threads must be at least 1, got {options.threads}")


def tiny_inputs() -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """kinema-tiny's denoiser, 16 frames of noise at 64x64 px and its text-to-video (cond, uncond)."""
    import torch

    from kinema.bundled import bundled_model_path
    from kinema.models.video_dit import VideoDiT
    from kinema.sampling.denoisers import DiTDenoiser
    from kinema.sampling.loop import initial_noise

    model = VideoDiT.from_pretrained(bundled_model_path("kinema-tiny") / "transformer").eval()
    latent_channels = model.config["in_channels"] // 3  # latents, mask latents, masked-video latents
    gen = torch.Generator().manual_seed(SEED + 1)
    text = torch.randn(2, 1, 32, model.config["caption_channels"], generator=gen)
    inpaint = torch.zeros(1, 2 * latent_channels, 4, 8, 8)
    cond, uncond = (DiTDenoiser.conditioning(states, inpaint_latents=inpaint) for states in text)
    return DiTDenoiser(model), initial_noise((1, latent_channels, 4, 8, 8), [SEED]), cond, uncond


def sd_inputs(quick: bool) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """The small SD1.5-shaped AnimateDiff UNet's denoiser, noise and (cond, uncond)."""
    import torch

    from kinema.models.video_unet import VideoUNet
    from kinema.sampling.denoisers import UNetDenoiser
    from kinema.sampling.loop import initial_noise

    torch.manual_seed(SEED)
    model = VideoUNet(UNET, motion_module={"type": "temporal", "max_frames": 32}, motion_mid_block=True).eval()
    gen = torch.Generator().manual_seed(SEED + 2)
    mix_motion_modules(model, gen)
    frames, side = (8, 8) if quick else (16, 16)
    text = torch.randn(2, 1, 77, TEXT_WIDTH, generator=gen)
    cond, uncond = (UNetDenoiser.conditioning(states) for states in text)
    return UNetDenoiser(model), initial_noise((1, 4, frames, side, side), [SEED]), cond, uncond


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    import time

    import torch
    from safetensors.torch import save_file

    from kinema.sampling.guidance import join_conditioning
    from kinema.sampling.loop import sample
    from kinema.sampling.schedulers import make_scheduler

    torch.set_num_threads(options.threads)
    model_name, mode = case.split(".", 1)
    denoiser, noise, cond, uncond = tiny_inputs() if model_name == "tiny" else sd_inputs(options.quick)
    steps = sampling_steps(model_name, options)
    run_steps = max(1, steps // 2) if mode == "half_steps" else steps
    family = "easyanimate" if model_name == "tiny" else "animatediff"

    with torch.no_grad():  # a fresh process's first forward pays one-time set-up (kernels, allocations)
        denoiser(torch.cat([noise, noise]), torch.tensor(500), join_conditioning(uncond, cond))
    # Model calls, and those that ran the deep part (the UNet's mid block, the DiT's middle block): the rest reused.
    model = denoiser.model
    deep_part = model.unet.mid_block if model_name == "sd" else model.transformer_blocks[3]  # inside (1, 4)
    calls = {"model": 0, "deep": 0}
    handles = [module.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
               for key, module in (("model", model), ("deep", deep_part))]
    start = time.perf_counter()
    with torch.no_grad():
        latents = sample(denoiser, make_scheduler("ddim", family), noise, cond, uncond, run_steps, GUIDANCE,
                         progress=False, **MODES[mode])
    seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    save_file({"latents": latents.contiguous()}, str(Path(options.latents_dir) / f"{case}.safetensors"))
    return {"seconds": round(seconds, 4), "steps": run_steps, "seconds_per_step": round(seconds / run_steps, 5),
            "model_calls": calls["model"], "model_calls_reused": calls["model"] - calls["deep"]}


def summarize(cases: Mapping[str, Mapping[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """Per model: each mode's speedup over `off` and its relative L2 distance from off's latents."""
    from safetensors.torch import load_file

    folder = Path(options.latents_dir)
    models: dict[str, Any] = {}
    for model in MODELS:
        off = cases[f"{model}.off"]
        reference = load_file(str(folder / f"{model}.off.safetensors"))["latents"]
        speedup: dict[str, float] = {}
        distance: dict[str, float] = {}
        for name in cases:
            owner, mode = name.split(".", 1)
            if owner != model or mode == "off":
                continue
            latents = load_file(str(folder / f"{name}.safetensors"))["latents"]
            speedup[mode] = round(off["seconds"] / cases[name]["seconds"], 4)
            distance[mode] = round(float((latents - reference).norm() / reference.norm()), 5)
        models[model] = {"speedup": speedup, "relative_l2": distance, "steps": off["steps"]}
    return {"models": models, "settings": {"guidance": GUIDANCE, "scheduler": "ddim", "seed": SEED,
                                           "threads": options.threads, "quick": options.quick}}


def main(argv: list[str]) -> None:
    options, _ = quick_parser(add_arguments).parse_known_args(argv)
    check_options(options)
    if CASE_OPTION in argv or options.latents_dir is not None:
        run_benchmark("step_cache", __doc__, cases=cases_for(argv), reference=REFERENCE, measure=measure,
                      add_arguments=add_arguments, summarize=summarize, argv=argv, script=__file__)
        return
    with tempfile.TemporaryDirectory(prefix="kinema-bench-step-cache-") as folder:
        argv = [*argv, "--latents-dir", folder]  # every case's subprocess gets the same folder
        run_benchmark("step_cache", __doc__, cases=cases_for(argv), reference=REFERENCE, measure=measure,
                      add_arguments=add_arguments, summarize=summarize, argv=argv, script=__file__)


if __name__ == "__main__":
    main(sys.argv[1:])
