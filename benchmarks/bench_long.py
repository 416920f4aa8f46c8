"""Long videos: peak memory and time for 16 / 64 / 144 / 512 frames, kinema vs diffusers' FreeNoise.

Usage: python benchmarks/bench_long.py [--quick] [--size PX] [--steps N] [--threads N] [--diffusers-512]

Three ways to make an N-frame AnimateDiff video, each case (way, N) in a fresh subprocess (benchmarks/common.py),
so each peak is that case's own:
- `context.N`: kinema's `generate()` text-to-video with context windows (`ContextSettings(length=16, overlap=4)`,
  uniform schedule, flat fusion): the whole model runs once per window of 16 frames.
- `continuation.N`: kinema's AnimateDiff continuation (repaint: no InP model needed): `generate()` makes 16 frames,
  then `generate()` again with `video` = those frames and `extend_frames = N - 16`, in segments of 16 frames, each
  holding the last 4 frames of what exists (`segment_frames=16, overlap_frames=4`). At N = 16 it is the first call.
- `diffusers.N` (the reference): diffusers' `AnimateDiffPipeline` with `enable_free_noise(context_length=16,
  context_stride=4)` (its defaults: pyramid weights, shuffled-context noise). FreeNoise windows only the motion
  modules; the spatial layers see every frame at once. At 512 frames it is skipped by default: it would add
  about a fifth to the full run's time (its spatial layers run all 1024 guided frames in one batch); pass
  `--diffusers-512` to run it. The JSON says what was skipped.

Both sides use identical weights: seeded random weights built from configs (the values change neither memory nor
time, and nothing is downloaded); diffusers builds its `UNetMotionModel` from the seeded 2D UNet and a seeded
`MotionAdapter`, and kinema's `VideoUNet` carries the same 2D weights and the adapter's motion weights (kinema in
diffusers' norm mode). Same prompt and negative prompt, DDIM, guidance 7.5, batch 1, float32, output as tensors
(`output="tensor"`, `output_type="pt"`): the time and memory are what a user pays for frames, decoding included
(16 frames per VAE call on both sides).

The model: SD1.5's shape scaled to a tenth of its width, at 128x128 px (latents 16x16). The UNet has SD1.5's four
levels, two resnets per level and cross-attention on the first three, widths 32/64/128/128 (SD1.5: 320/640/1280/
1280), 8 heads, text states 64 wide; the motion adapter has AnimateDiff v2's layout (2 modules per down block, 3 per
up block, one in the mid block, 32 positions); the VAE has SD's four levels at an eighth of its width (16/32/64/64,
two resnets per level); CLIP has 2 layers 64 wide. Why: on SD1.5 at 512x512 the per-frame costs a long video adds
(3 MiB of float32 pixels per frame, 64 KiB of latents) are small next to the weights (~5 GiB float32 with the motion
module) and one window's activations; a tenth of the width shrinks the weights a hundredfold but the pixels per
frame only by the size, so at 128x128 px a decoded frame (192 KiB) weighs more against the model (~60 MiB) than on
SD1.5: the benchmark is stricter than real use about memory that grows with the frame count, and activations of a
16-frame guided window (batch 32 at 16x16 latents) are a real share of the peak. And it is small enough for CPUs:
single-threaded, a UNet forward costs ~30 ms per frame, and the full run took 9.5 minutes on a 2-core machine that
was running other work too. One denoising step by default: every step runs windows (or segments) of the same size,
so the peak does not depend on the number of steps and more steps only lengthen the run (`--steps`). `--quick`
stops at 144 frames and runs at 64x64 px (2 minutes on that machine); `--size` changes the frame size.

How memory is measured (CPU): `peak` = the process's resident-memory high-water mark during the generation call(s)
(VmHWM, reset through /proc/self/clear_refs just before, by `kinema.memory`) minus its resident memory after the
libraries were imported and before any model was built: weights plus working memory, the CPU counterpart of CUDA's
`max_memory_allocated`. The libraries' own ~0.4 GiB is left out, since it would flatten every ratio towards 1.
`peak_rss` (whole process) and `working_peak` (above the resident memory just before the call) are kept. The
subprocesses run with glibc's mmap threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`, unless set already), so
a freed large tensor goes back to the system at once instead of staying in the heap; with glibc's moving threshold,
RSS peaks drift by tens of percent between identical runs. For continuation the peak is the higher of its two calls.

Time: `seconds` = wall time of the generation call(s) alone (prompt encoding, sampling, decoding; not building the
models), first call, no warm-up (what a user pays); `seconds_per_frame` = seconds / N. One torch thread by default
(`--threads`): on a small shared machine a second thread mostly waits for the first; both sides get the same.

The last printed line is one JSON object: the harness's figures per case (ratios to `context.16`), and
`peak_ratio_144_16` (kinema context windows: peak at 144 frames / peak at 16; goal <= 1.25, diffusers with FreeNoise
measured 1.65 on the project's machines), `continuation_peak_ratio_144_16`, `diffusers_peak_ratio_144_16`,
`peak_ratios_to_16` (every way and count), `peak_bytes`, `seconds`, `seconds_per_frame`, `time_ratio_to_diffusers`
and `peak_ratio_to_diffusers` per count (kinema / diffusers: below 1 is kinema faster or smaller), `meets_goal`,
`diffusers_skipped` and the settings.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from common import SMALL_SD_TEXT_WIDTH, SMALL_SD_UNET, SMALL_SD_WIDTHS, byte_tokenizer, run_benchmark, seeded

FRAME_COUNTS = (16, 64, 144, 512)
QUICK_FRAME_COUNTS = (16, 64, 144)
METHODS = ("context", "continuation", "diffusers")
REFERENCE = "context.16"
WINDOW, OVERLAP = 16, 4  # kinema: frames per context window / continuation segment, frames shared by neighbours
FREENOISE_STRIDE = 4     # diffusers: frames between FreeNoise window starts (its default)
PROMPT, NEGATIVE, SEED, GUIDANCE, SCHEDULER = "a red fox runs through the snow", "blurry", 5, 7.5, "ddim"
GOAL = 1.25
MMAP_THRESHOLD = str(128 * 1024)

WIDTHS, TEXT_WIDTH, UNET = SMALL_SD_WIDTHS, SMALL_SD_TEXT_WIDTH, SMALL_SD_UNET
ADAPTER: dict[str, Any] = dict(
    block_out_channels=WIDTHS, motion_layers_per_block=2, motion_num_attention_heads=8, motion_norm_num_groups=32,
    motion_max_seq_length=32, use_motion_mid_block=True)
VAE: dict[str, Any] = dict(
    block_out_channels=(16, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=16, layers_per_block=2)
# The byte tokenizer's 512 symbols, then its start (512) and end (513) tokens.
CLIP: dict[str, Any] = dict(
    vocab_size=514, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def frame_counts(options: argparse.Namespace) -> tuple[int, ...]:
    """The frame counts of this run: up to 144 with `--quick`, else up to 512."""
    return QUICK_FRAME_COUNTS if options.quick else FRAME_COUNTS


def frame_size(options: argparse.Namespace) -> int:
    """Height and width in pixels: `--size`, else 64 with `--quick` and 128 otherwise."""
    return options.size or (64 if options.quick else 128)


def sampling_steps(options: argparse.Namespace) -> int:
    """Denoising steps: `--steps`, else 1."""
    return options.steps or 1


def diffusers_counts(options: argparse.Namespace) -> tuple[int, ...]:
    """The frame counts diffusers runs: all but 512, unless `--diffusers-512`."""
    return tuple(n for n in frame_counts(options) if n != 512 or options.diffusers_512)


def case_name(method: str, frames: int) -> str:
    return f"{method}.{frames}"


def cases_for(argv: list[str]) -> list[str]:
    """Every case of a run with these arguments, in the order they run."""
    options = parser_for_cases().parse_known_args(argv)[0]
    return [case_name(method, frames) for method in METHODS
            for frames in (diffusers_counts(options) if method == "diffusers" else frame_counts(options))]


# ---------------------------------------------------------------- memory readings


# ---------------------------------------------------------------- the models, identical on both sides


def base_parts(size: int, folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The seeded 2D UNet, the seeded motion adapter, and the VAE, text encoder and tokenizer (`size` px frames)."""
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet2d = seeded(0, lambda: UNet2DConditionModel(sample_size=size // 8, **UNET))
    adapter = seeded(1, lambda: MotionAdapter(**ADAPTER))
    vae = seeded(2, lambda: AutoencoderKL(sample_size=size, **VAE))
    text_encoder = seeded(3, lambda: CLIPTextModel(CLIPTextConfig(**CLIP)))
    return unet2d, adapter, {"vae": vae, "text_encoder": text_encoder, "tokenizer": byte_tokenizer(folder)}


def kinema_family(size: int, folder: Path) -> Any:
    """kinema's AnimateDiffFamily: a VideoUNet (diffusers' norm mode) with the adapter's motion weights."""
    from kinema.loaders.animatediff.keys import diffusers_to_original_key, is_pe_key
    from kinema.models.video_unet import VideoUNet
    from kinema.pipelines.animatediff import AnimateDiffFamily

    unet2d, adapter, parts = base_parts(size, folder)
    video_unet = VideoUNet.from_unet2d(unet2d, motion_mid_block=True, resnet_norm_mode="per_frame",
                                       motion_module={"type": "temporal", "norm_mode": "across_frames",
                                                      "max_frames": ADAPTER["motion_max_seq_length"]})
    video_unet.load_motion_state_dict({diffusers_to_original_key(key): value
                                       for key, value in adapter.state_dict().items() if not is_pe_key(key)})
    del unet2d, adapter  # the VideoUNet holds its own copy of every weight
    return AnimateDiffFamily(video_unet.eval(), parts["vae"], parts["text_encoder"], parts["tokenizer"])


def diffusers_pipeline(size: int, folder: Path) -> Any:
    """diffusers' AnimateDiffPipeline on the same weights, FreeNoise on."""
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    from kinema.sampling.schedulers import make_scheduler

    unet2d, adapter, parts = base_parts(size, folder)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    del unet2d
    pipe = AnimateDiffPipeline(unet=unet, motion_adapter=adapter, scheduler=make_scheduler(SCHEDULER), **parts)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=WINDOW, context_stride=FREENOISE_STRIDE)
    # Only enable_free_noise reads the adapter (its config's frame limit); the UNet holds copies of its weights.
    # Dropping it keeps a second set of motion weights out of diffusers' peak, as kinema keeps none.
    pipe.register_modules(motion_adapter=None)
    del adapter
    return pipe


# ---------------------------------------------------------------- one case


def _request(size: int, steps: int, frames: int, **changes: Any) -> Any:
    from kinema.pipelines.request import GenerationRequest

    return GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, frames=frames, height=size, width=size,
                             steps=steps, guidance=GUIDANCE, scheduler=SCHEDULER, seeds=[SEED], **changes)


def run_kinema(method: str, frames: int, size: int, steps: int, family: Any) -> dict[str, Any]:
    """Generate with kinema; returns the frames `(1, frames, 3, size, size)`, the peak RSS and the windows/segments."""
    from kinema.memory import peak_memory_bytes
    from kinema.pipelines.generation import generate
    from kinema.pipelines.request import ContextSettings

    if method == "context":
        result = generate(family, _request(size, steps, frames, context=ContextSettings(length=WINDOW,
                                                                                          overlap=OVERLAP)),
                          progress=False, output="tensor")
        return {"frames": result.frames, "peak_rss": peak_memory_bytes(), "windows": result.report["windows"]}
    first = generate(family, _request(size, steps, WINDOW), progress=False, output="tensor")
    peak, segments, video = peak_memory_bytes(), 1, first.frames
    if frames > WINDOW:
        # generate() restarts the high-water mark, so the first call's peak is read before the second begins.
        rest = generate(family, _request(size, steps, WINDOW, video=first.frames[0], extend_frames=frames - WINDOW,
                                         segment_frames=WINDOW, overlap_frames=OVERLAP),
                        progress=False, output="tensor")
        peak, segments, video = max(peak, peak_memory_bytes()), segments + rest.report["segments"], rest.frames
    return {"frames": video, "peak_rss": peak, "segments": segments}


def run_diffusers(frames: int, size: int, steps: int, pipe: Any) -> dict[str, Any]:
    """Generate with diffusers' FreeNoise pipeline; returns the frames `(1, frames, 3, size, size)` and the peak RSS."""
    from kinema.memory import peak_memory_bytes

    with torch.no_grad():
        video = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=frames, height=size, width=size,
                     num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="pt",
                     generator=torch.Generator().manual_seed(SEED)).frames
    return {"frames": video, "peak_rss": peak_memory_bytes()}


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    """Build one side's models, make one `case` video and return its seconds and memory (see the module docstring)."""
    # Every library either side uses is imported before the baseline, so both sides' baselines hold the same code.
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    import kinema.pipelines.animatediff
    import kinema.pipelines.generation  # noqa: F401
    from kinema.memory import reset_peak_memory, resident_bytes

    method, count = case.split(".")
    frames, size, steps = int(count), frame_size(options), sampling_steps(options)
    torch.set_num_threads(options.threads)
    gc.collect()
    library_rss = resident_bytes()
    with tempfile.TemporaryDirectory() as folder:
        model: Any = diffusers_pipeline(size, Path(folder)) if method == "diffusers" else \
            kinema_family(size, Path(folder))
    gc.collect()
    rss_before = resident_bytes()
    load_before = os.getloadavg()[0]
    if not reset_peak_memory("cpu"):
        raise RuntimeError("cannot reset the resident-memory high-water mark (/proc/self/clear_refs); this benchmark "
                           "needs Linux")
    start = time.perf_counter()
    run = run_diffusers(frames, size, steps, model) if method == "diffusers" else \
        run_kinema(method, frames, size, steps, model)
    seconds = round(time.perf_counter() - start, 4)
    video = run.pop("frames")
    if tuple(video.shape) != (1, frames, 3, size, size) or not torch.isfinite(video).all():
        raise RuntimeError(f"{case}: expected finite frames (1, {frames}, 3, {size}, {size}), got "
                           f"{tuple(video.shape)}")
    peak_rss = run.pop("peak_rss")
    return {
        "seconds": seconds,
        "seconds_per_frame": round(seconds / frames, 5),
        "peak": peak_rss - library_rss,
        "peak_rss": peak_rss,
        "working_peak": peak_rss - rss_before,
        "model_rss": rss_before - library_rss,
        "library_rss": library_rss,
        "frames": frames,
        **run,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the figures


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 4)


def summarize(runs: dict[str, dict[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """The headline ratios, each way's peaks and times per frame count, kinema against diffusers, and the settings."""
    counts = frame_counts(options)

    def by_count(method: str, key: str) -> dict[str, Any]:
        return {str(n): runs[case_name(method, n)][key] for n in counts if case_name(method, n) in runs}

    def to_16(method: str, key: str) -> dict[str, float]:
        values = by_count(method, key)
        return {n: _ratio(value, values["16"]) for n, value in values.items()}

    peak_ratios = {method: to_16(method, "peak") for method in METHODS}
    against: dict[str, dict[str, dict[str, float]]] = {"seconds": {}, "peak": {}}
    for n in diffusers_counts(options):
        reference = runs[case_name("diffusers", n)]
        for key in against:
            against[key][str(n)] = {method: _ratio(runs[case_name(method, n)][key], reference[key])
                                    for method in ("context", "continuation")}
    skipped = {str(n): "not run: diffusers at 512 frames batches all 1024 guided frames through the spatial layers "
                       "and adds about a fifth to the run's time; pass --diffusers-512 to run it"
               for n in counts if n not in diffusers_counts(options)}
    headline = peak_ratios["context"]["144"]
    return {
        "peak_ratio_144_16": headline,
        "continuation_peak_ratio_144_16": peak_ratios["continuation"]["144"],
        "diffusers_peak_ratio_144_16": peak_ratios["diffusers"]["144"],
        "goal": {"peak_ratio_144_16": GOAL, "diffusers_measured_elsewhere": 1.65},
        "meets_goal": headline <= GOAL,
        "peak_ratios_to_16": peak_ratios,
        "rss_peak_ratios_to_16": {method: to_16(method, "peak_rss") for method in METHODS},
        "peak_bytes": {method: by_count(method, "peak") for method in METHODS},
        "seconds": {method: by_count(method, "seconds") for method in METHODS},
        "seconds_per_frame": {method: by_count(method, "seconds_per_frame") for method in METHODS},
        "time_ratio_to_diffusers": against["seconds"],
        "peak_ratio_to_diffusers": against["peak"],
        "diffusers_skipped": skipped,
        "settings": {
            "size": frame_size(options), "steps": sampling_steps(options), "frame_counts": list(counts), "batch": 1,
            "guidance": GUIDANCE, "scheduler": SCHEDULER, "dtype": "float32", "device": "cpu",
            "torch_threads": options.threads, "unet_widths": list(WIDTHS),
            "vae_widths": list(VAE["block_out_channels"]), "text_width": TEXT_WIDTH,
            "motion_positions": ADAPTER["motion_max_seq_length"],
            "context": {"length": WINDOW, "overlap": OVERLAP, "schedule": "uniform", "fuse": "flat"},
            "continuation": {"first_frames": WINDOW, "segment_frames": WINDOW, "overlap_frames": OVERLAP,
                             "conditioning": "repaint (AnimateDiff)"},
            "diffusers": {"free_noise": {"context_length": WINDOW, "context_stride": FREENOISE_STRIDE,
                                         "weighting_scheme": "pyramid", "noise_type": "shuffle_context"},
                          "decode_chunk_size": 16},
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "peak": "VmHWM during the call(s) minus VmRSS after imports, before building models",
            "torch": torch.__version__,
        },
    }


def case_line(case: str, figures: Mapping[str, Any]) -> str:
    extra = f", {figures['windows']} windows" if figures.get("windows") else \
        f", {figures['segments']} segments" if figures.get("segments") else ""
    return (f"{case:18s} {figures['seconds']:9.2f} s ({figures['seconds_per_frame']:.3f} s/frame), peak "
            f"{figures['peak'] / 2**20:8.1f} MiB (RSS {figures['peak_rss'] / 2**20:8.1f} MiB){extra}, "
            f"load {figures['load_average'][0]:.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, help="frame height and width in px, a multiple of 8 (default: 128, "
                                                 "64 with --quick)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (default 1)")
    parser.add_argument("--diffusers-512", action=argparse.BooleanOptionalAction, default=False,
                        help="also run diffusers at 512 frames (default: skipped, see the JSON)")


def parser_for_cases() -> argparse.ArgumentParser:
    """The options that decide which cases run (the harness parses the full command line again)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--quick", action="store_true")
    add_arguments(parser)
    return parser


def main(argv: list[str]) -> None:
    options = parser_for_cases().parse_known_args(argv)[0]
    if options.size is not None and (options.size < 8 or options.size % 8):
        raise SystemExit(f"--size must be a positive multiple of 8 (the VAE's downscale), got {options.size}")
    if (options.steps is not None and options.steps < 1) or options.threads < 1:
        raise SystemExit("--steps and --threads must be at least 1")
    # Read by glibc when each case's subprocess starts (this process's own allocator is set up already).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    run_benchmark("long", __doc__, cases=cases_for(argv), reference=REFERENCE, measure=measure,
                  add_arguments=add_arguments, summarize=summarize, case_line=case_line, argv=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
