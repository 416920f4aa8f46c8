"""Slice VAE decode memory: a 144-frame clip (36 latent frames) vs a 16-frame clip (4 latent frames).

Usage: python benchmarks/bench_slice_vae.py [--quick] [--size PX]

Same model (seeded random weights: memory and time do not depend on the values) and same frame size for both clips.
`--quick` uses a small config (widths 64/64/128/128, one resnet per block) at 48x48 px; the default is the full V3
VAE at 128x128 on CPU (256x256 on CUDA). Each clip runs in a fresh subprocess (benchmarks/common.py).

How peak memory is measured:
- CUDA: `torch.cuda.max_memory_allocated()` during decode minus `torch.cuda.memory_allocated()` just before it, with
  the model and the input latents already on the GPU. The output video counts, as it should.
- CPU: the peak is the high-water mark of bytes held by PyTorch's CPU allocator during decode, read from the
  profiler's memory events (`profile_memory=True`, the "Total Allocated" counter, which starts at zero when profiling
  starts, so the model and the latents made before are excluded). It counts every tensor, including the output video
  and op scratch tensors such as conv3d's vol2col columns, and is deterministic.
  RSS is reported too as a cross-check (`rss_peak_*`: `ru_maxrss` after the decode minus RSS before it),
  but glibc keeps freed blocks in its heap, so RSS high-water marks drift by tens of percent between identical runs;
  the acceptance uses the allocator peak.
Seconds per latent frame = decode wall time / latent frames, first-call overhead included; on CPU the decode runs
under the profiler, whose per-op bookkeeping is small next to the 3D convs.

The last printed line is one JSON object: the harness's figures per case and their ratios to the 16-frame clip,
plus peak_16, peak_144 (bytes), peak_ratio (= peak_144 / peak_16), the seconds per latent frame of each, and the
settings. Acceptance: peak_ratio <= 1.3 (memory is bounded by the slice).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
from common import peak_rss_bytes, run_benchmark
from torch.profiler import ProfilerActivity, profile

from kinema.models.slice_vae import SliceVAE

QUICK = dict(ch=64, ch_mult=(1, 1, 2, 2), layers_per_block=1, norm_num_groups=16)
LATENT_FRAMES = {16: 4, 144: 36}
REFERENCE = "16"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def frame_size(options: argparse.Namespace) -> int:
    return options.size or (48 if options.quick else 256 if device() == "cuda" else 128)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def allocator_peak(trace_events: list[dict]) -> int:
    """Highest "Total Allocated" among the profiler's CPU memory events (bytes)."""
    return max(e["args"]["Total Allocated"] for e in trace_events if e.get("name") == "[memory]")


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    """Decode `case` frames; return the peak bytes above the pre-decode level and the decode's seconds."""
    frames, size, on = int(case), frame_size(options), device()
    torch.manual_seed(0)
    vae = SliceVAE(**(QUICK if options.quick else {})).eval().to(on)
    latents = torch.randn(1, 4, LATENT_FRAMES[frames], size // 8, size // 8, device=on)
    if on == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.inference_mode():
            video = vae.decode(latents, tiling="off").sample
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert video.shape == (1, 3, frames, size, size)
        return {"peak": torch.cuda.max_memory_allocated() - before, "seconds": seconds}
    before, hwm_before = rss_bytes(), peak_rss_bytes()
    start = time.perf_counter()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        video = vae.decode(latents, tiling="off").sample
    seconds = time.perf_counter() - start
    rss_peak = peak_rss_bytes() - before
    assert video.shape == (1, 3, frames, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        with open(f"{tmp}/trace.json") as f:
            peak = allocator_peak(json.load(f)["traceEvents"])
    return {"peak": peak, "seconds": seconds, "rss_peak": rss_peak, "rss_hwm_before": hwm_before - before}


def case_line(case: str, figures: Mapping[str, Any]) -> str:
    latent = LATENT_FRAMES[int(case)]
    return (f"{int(case):4d} frames ({latent:2d} latent): peak {figures['peak'] / 2**20:8.1f} MiB, "
            f"{figures['seconds'] / latent:.3f} s per latent frame")


def summarize(runs: dict[str, dict[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """The headline figures under the names this benchmark has always printed."""
    on = device()
    result: dict[str, Any] = {
        "peak_16": runs["16"]["peak"],
        "peak_144": runs["144"]["peak"],
        "peak_ratio": round(runs["144"]["peak"] / runs["16"]["peak"], 4),
        "sec_per_latent_frame_16": round(runs["16"]["seconds"] / LATENT_FRAMES[16], 4),
        "sec_per_latent_frame_144": round(runs["144"]["seconds"] / LATENT_FRAMES[144], 4),
        "settings": {"config": "quick " + json.dumps(QUICK) if options.quick else "full V3",
                     "size": frame_size(options), "device": on, "batch": 1, "dtype": "float32", "tiling": "off",
                     "smooth_seams": False, "torch_threads": torch.get_num_threads(),
                     "method": "cuda max_memory_allocated" if on == "cuda" else
                     "subprocess, profiler CPU allocator peak (RSS as cross-check)"},
    }
    if on == "cpu":
        result.update({f"rss_peak_{case}": runs[case]["rss_peak"] for case in runs})
        result["rss_hwm_before"] = {case: runs[case]["rss_hwm_before"] for case in runs}
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, help="frame height and width in px (multiple of 8)")


if __name__ == "__main__":
    run_benchmark("slice_vae", __doc__, cases=[str(frames) for frames in LATENT_FRAMES], reference=REFERENCE,
                  measure=measure, add_arguments=add_arguments, summarize=summarize, case_line=case_line)
