"""Slice VAE decode speed: kinema's decode against EasyAnimate V3's decode design, same weights, same latents.

Usage: python benchmarks/bench_vae_decode.py [--quick] [--config v3|kinema-tiny] [--size PX]
       [--layout contiguous|channels_last]

The reference is `easyanimate_design.decode_like_easyanimate_v3`: V3's own decode order and copies (post_quant_conv
on the whole clip, every slice's conv_in + mid block recomputed on its concatenated neighbours, a time pad before
every conv, the slices' videos concatenated at the end), built on kinema's modules; tests/models/test_slice_vae.py
proves it equals EasyAnimate V3's real outputs. Cases, each in a fresh subprocess
(benchmarks/common.py), for 16 and 144 frames (16 and 48 with --quick):
- `F.easyanimate`: the reference, float32;
- `F.kinema`: `SliceVAE.decode`, float32, in the memory layout `--layout` names (the model and the latents);
- `F.kinema_bf16`: `SliceVAE.decode` with the model and latents in bfloat16 (an extra figure: not equal output),
  only where oneDNN runs bfloat16 convolutions natively (AVX512-BF16 or AMX; `--bf16` forces it): elsewhere torch's
  bfloat16 3D conv is a plain loop, hundreds of times slower than float32, and the JSON says it was left out.

Default: the full V3 VAE (seeded random weights: time and memory do not depend on the values) at 64x64, float32, on
CPU; `--config kinema-tiny` the bundled model's VAE layout (16-wide, 8 latent channels); `--quick` uses
bench_slice_vae's small config at 48x48. Each decode runs once under torch's profiler with
`profile_memory=True`: `seconds` is its wall time, `cpu_seconds` the process's CPU time over it (steadier than wall
time on a shared machine; the same on an idle one with one thread), `peak` the high-water mark of PyTorch's CPU
allocator during it (bytes, the output video included; see bench_slice_vae.py). The reference case saves its video
to a scratch folder and the kinema cases read it back for `max_abs_diff` (kinema minus reference, float32).

The last printed line is one JSON object: the harness's figures, then `vae_decode_speedup_vs_easyanimate_design`
(reference wall seconds / kinema wall seconds, the smaller of the two clip lengths), the same per clip length
(`speedup_by_frames`), the CPU-time ratios (`cpu_speedup_by_frames`), `bf16_speedup_by_frames`, `max_abs_diff` and
`bf16_max_abs_diff` per clip length (null, with `bf16_note`, where the bfloat16 case was left out), peaks per case,
and the settings. Goal: speedup >= 1.5 with max_abs_diff within
float32 rounding (about 1e-5 of outputs of size 1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_slice_vae import QUICK, allocator_peak
from common import quick_parser, run_benchmark
from easyanimate_design import decode_like_easyanimate_v3
from safetensors.torch import load_file, save_file
from torch.profiler import ProfilerActivity, profile

from kinema.models.presets import KINEMA_TINY_SLICE_VAE
from kinema.models.slice_vae import SliceVAE

CONFIGS = {"v3": {}, "kinema-tiny": KINEMA_TINY_SLICE_VAE}
FRAMES, QUICK_FRAMES = (16, 144), (16, 48)
SIDES = ("easyanimate", "kinema", "kinema_bf16")
BF16_LEFT_OUT = "this CPU has no native bfloat16 convolutions in oneDNN (no AVX512-BF16/AMX); --bf16 runs it anyway"
SCRATCH_OPTION = "--scratch"


def frame_counts(quick: bool) -> tuple[int, ...]:
    return QUICK_FRAMES if quick else FRAMES


def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cases(quick: bool, bf16: bool) -> list[str]:
    sides = SIDES if bf16 else SIDES[:2]
    return [f"{frames}.{side}" for frames in frame_counts(quick) for side in sides]


def frame_size(options: argparse.Namespace) -> int:
    return options.size or (48 if options.quick else 64)


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    """Decode one clip as `case` says; its wall and CPU seconds, allocator peak and difference from the reference."""
    frames, side = case.split(".")
    size = frame_size(options)
    torch.manual_seed(0)
    vae = SliceVAE(**(QUICK if options.quick else CONFIGS[options.config])).eval()
    latents = torch.randn(1, vae.config.latent_channels, int(frames) // 4, size // 8, size // 8)
    if side == "kinema_bf16":
        vae, latents = vae.to(torch.bfloat16), latents.to(torch.bfloat16)
    if side != "easyanimate" and options.layout == "channels_last":
        vae, latents = vae.to(memory_format=torch.channels_last_3d), latents.contiguous(
            memory_format=torch.channels_last_3d)
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if side == "easyanimate":
            video = decode_like_easyanimate_v3(vae, latents)
        else:
            video = vae.decode(latents, tiling="off").sample
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert video.shape == (1, 3, int(frames), size, size)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            peak = allocator_peak(json.load(f)["traceEvents"])
    reference_file = Path(options.scratch) / f"{frames}.safetensors"
    figures: dict[str, Any] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak": peak}
    if side == "easyanimate":
        save_file({"video": video.contiguous()}, reference_file)
    else:
        reference = load_file(reference_file)["video"]
        figures["max_abs_diff"] = (video.float() - reference).abs().max().item()
        figures["reference_abs_max"] = reference.abs().max().item()
    return figures


def case_line(case: str, figures: dict[str, Any]) -> str:
    diff = f", max |diff| {figures['max_abs_diff']:.2e}" if "max_abs_diff" in figures else ""
    return (f"{case:18s} {figures['seconds']:8.2f} s (CPU {figures['cpu_seconds']:8.2f} s), "
            f"peak {figures['peak'] / 2**20:8.1f} MiB{diff}")


def summarize(runs: dict[str, dict[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """The headline speedups and differences per clip length."""
    def ratio(frames: int, side: str, key: str) -> float:
        return round(runs[f"{frames}.easyanimate"][key] / runs[f"{frames}.{side}"][key], 3)

    counts = frame_counts(options.quick)
    speedup = {str(f): ratio(f, "kinema", "seconds") for f in counts}
    bf16 = all(f"{f}.kinema_bf16" in runs for f in counts)
    return {
        "vae_decode_speedup_vs_easyanimate_design": min(speedup.values()),
        "speedup_by_frames": speedup,
        "cpu_speedup_by_frames": {str(f): ratio(f, "kinema", "cpu_seconds") for f in counts},
        "bf16_speedup_by_frames": {str(f): ratio(f, "kinema_bf16", "seconds") for f in counts} if bf16 else None,
        "max_abs_diff": {str(f): runs[f"{f}.kinema"]["max_abs_diff"] for f in counts},
        "bf16_max_abs_diff": {str(f): runs[f"{f}.kinema_bf16"]["max_abs_diff"] for f in counts} if bf16 else None,
        "bf16_note": None if bf16 else BF16_LEFT_OUT,
        "peak_ratio_by_frames": {str(f): round(runs[f"{f}.kinema"]["peak"] / runs[f"{f}.easyanimate"]["peak"], 3)
                                 for f in counts},
        "settings": {"config": "quick " + json.dumps(QUICK) if options.quick else options.config,
                     "size": frame_size(options), "frames": list(counts), "device": "cpu", "batch": 1,
                     "layout": options.layout, "tiling": "off", "smooth_seams": False,
                     "torch_threads": torch.get_num_threads(),
                     "method": "subprocess per case, one decode under the profiler (allocator peak)"},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=list(CONFIGS), default="v3",
                        help="the VAE's layout: V3's full size (default) or the bundled kinema-tiny's")
    parser.add_argument("--size", type=int, help="frame height and width in px (multiple of 8)")
    parser.add_argument("--layout", choices=["contiguous", "channels_last"], default="contiguous",
                        help="memory layout of kinema's model and latents (the reference runs as V3 does)")
    parser.add_argument("--bf16", action="store_true", help="run the bfloat16 case even without native support")
    parser.add_argument(SCRATCH_OPTION, help=argparse.SUPPRESS)


if __name__ == "__main__":
    import sys

    argv = sys.argv[1:]
    options, _ = quick_parser(add_arguments).parse_known_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if options.scratch is None:  # the parent: every case shares one scratch folder for the reference videos
            argv = [*argv, SCRATCH_OPTION, scratch]
        run_benchmark("vae_decode", __doc__, cases=cases(options.quick, options.bf16 or native_bf16()),
                      reference=f"{FRAMES[0]}.easyanimate", measure=measure, add_arguments=add_arguments,
                      summarize=summarize, case_line=case_line, argv=argv)
