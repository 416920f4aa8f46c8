"""`--quantize int8` and `--compile` (kinema/models/optimize.py) against the plain float32 forward of a video model.

Usage: python benchmarks/bench_optimize.py [--quick] [--threads N] [--repeats N]

Models: `dit`, the bundled kinema-tiny DiT (its shipped weights) at its defaults under classifier-free guidance: 2
clips of 16 frames at 64x64 (latents (2, 24, 4, 8, 8) with the inpaint channels, 32 text tokens); `unet`, a mid-size
AnimateDiff video UNet with random weights (SD1.5's layout at a fifth of its widths, (64, 128, 256, 256), a v2-style
temporal motion module with a mid block, 768-wide text states), 2 clips of 16 frames at 128x128 (latents (2, 4, 16,
16, 16)). `--quick` runs the `dit` cases only.

Cases (benchmarks/common.py), per model, each in a fresh process:
- `MODEL.fp32` (the DiT's is the reference): eager float32. `forward_s` is the mean of `--repeats` forwards after one
  warm-up (the `seconds` every ratio compares).
- `MODEL.int8`: the same model after `quantize_model(model, "int8")`; also `relative_error`, the relative L2 distance
  of its output from float32's on the same inputs, and `int8_layers` / `float_layers` (how many Linear layers).
- `MODEL.compile`: `compile_model(model)` with an empty cache folder: `first_call_s` (tracing, inductor's code
  generation, the C++ build and one forward; `first_call_cpu_s` its CPU time, C++ builds in subprocesses not
  counted), `second_call_s`, `forward_s`, `compile_s` = first call - forward,
  `max_difference` from eager and inductor's cache `misses` / `hits`.
- `MODEL.compile_cached`: the same in the next process, with the folder the `compile` case filled: what a second run
  of the same shape pays (`first_call_s`), and its cache hits.

Threads: `--threads` (default 1, so that figures on a shared machine are comparable between cases). The last printed
line is one JSON object: the harness's figures plus, per model, `speedup_int8_MODEL` and `speedup_compile_MODEL`
(float32 forward / optimised forward), `int8_relative_error_MODEL`, `compile_s_MODEL` and
`cached_first_call_s_MODEL`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from common import mix_motion_modules, quick_parser, run_benchmark

MODELS = ("dit", "unet")
QUICK_MODELS = ("dit",)
VARIANTS = ("fp32", "int8", "compile", "compile_cached")
REFERENCE = "dit.fp32"
SEED = 0
UNET_WIDTHS = (64, 128, 256, 256)  # SD1.5's (320, 640, 1280, 1280) / 5
UNET_TEXT_WIDTH = 768


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per case (default 5; 3 quick)")
    parser.add_argument("--compile-cache", default=None, help=argparse.SUPPRESS)  # shared by the compile cases


def cases_for(argv: list[str]) -> list[str]:
    """Every case of a run with these arguments, in the order they run (`compile` fills the cache that
    `compile_cached` reads)."""
    options = quick_parser(add_arguments).parse_known_args(argv)[0]
    return [f"{model}.{variant}" for model in (QUICK_MODELS if options.quick else MODELS) for variant in VARIANTS]


def repeats(options: argparse.Namespace) -> int:
    return options.repeats or (3 if options.quick else 5)


# ---------------------------------------------------------------- models and inputs


def dit_model_and_inputs() -> tuple[Any, tuple[Any, ...]]:
    """The bundled kinema-tiny DiT and CFG-sized inputs at its defaults (16 frames at 64x64)."""
    import torch

    from kinema.bundled import bundled_model_path
    from kinema.models.video_dit import VideoDiT

    model = VideoDiT.from_pretrained(bundled_model_path("kinema-tiny") / "transformer").eval()
    gen = torch.Generator().manual_seed(SEED)
    # Sized from the shipped config (16 frames are 4 latent frames), so a retrained layout needs no edit here.
    size = model.config.sample_size
    return model, (torch.randn(2, model.config.in_channels, 4, size, size, generator=gen), torch.tensor(500),
                   torch.randn(2, 32, model.config.caption_channels, generator=gen))


def unet_model_and_inputs() -> tuple[Any, tuple[Any, ...]]:
    """The mid-size AnimateDiff video UNet (random weights, motion modules mixing frames) and CFG-sized inputs."""
    import torch

    from kinema.models.video_unet import VideoUNet

    torch.manual_seed(SEED)
    config = dict(in_channels=4, out_channels=4, block_out_channels=UNET_WIDTHS, layers_per_block=2,
                  cross_attention_dim=UNET_TEXT_WIDTH, norm_num_groups=32, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    model = VideoUNet(config, motion_module={"type": "temporal", "max_frames": 32}, motion_mid_block=True).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    mix_motion_modules(model, gen)
    return model, (torch.randn(2, 4, 16, 16, 16, generator=gen), torch.tensor(500),
                   torch.randn(2, 77, UNET_TEXT_WIDTH, generator=gen))


BUILDERS: dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]] = {"dit": dit_model_and_inputs,
                                                                  "unet": unet_model_and_inputs}


# ---------------------------------------------------------------- one case


def _timed_call(model: Any, inputs: tuple[Any, ...]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = model(*inputs)
    return time.perf_counter() - start, out


def _cpu_timed_call(model: Any, inputs: tuple[Any, ...]) -> tuple[float, float, Any]:
    """Wall and CPU seconds of one call (on a busy machine the CPU seconds say what the call itself costs)."""
    cpu = time.process_time()
    wall, out = _timed_call(model, inputs)
    return wall, time.process_time() - cpu, out


def _mean_forward_s(model: Any, inputs: tuple[Any, ...], count: int) -> float:
    return sum(_timed_call(model, inputs)[0] for _ in range(count)) / count


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kinema.models.optimize import compile_model, int8_float_layers, int8_layers, quantize_model

    torch.set_num_threads(options.threads)
    model_name, variant = case.split(".")
    model, inputs = BUILDERS[model_name]()
    figures: dict[str, Any] = {"model": model_name, "variant": variant, "threads": options.threads,
                               "input_shape": list(inputs[0].shape)}
    with torch.inference_mode():
        if variant == "fp32":
            _timed_call(model, inputs)
        elif variant == "int8":
            reference = model(*inputs)
            figures.update(int8_layers=len(int8_layers(model)), float_layers=len(int8_float_layers(model)))
            quantize_model(model, "int8")
            _, out = _timed_call(model, inputs)
            figures["relative_error"] = round(((out - reference).norm() / reference.norm()).item(), 6)
        else:
            from torch._dynamo.utils import counters

            reference = model(*inputs)
            compile_model(model, cache_dir=options.compile_cache)
            first_s, first_cpu_s, out = _cpu_timed_call(model, inputs)
            figures.update(first_call_s=round(first_s, 4), first_call_cpu_s=round(first_cpu_s, 4),
                           second_call_s=round(_timed_call(model, inputs)[0], 4),
                           max_difference=(out - reference).abs().max().item(),
                           misses=counters["inductor"]["fxgraph_cache_miss"],
                           hits=counters["inductor"]["fxgraph_cache_hit"])
        forward_s = _mean_forward_s(model, inputs, repeats(options))
    figures.update(forward_s=round(forward_s, 5), seconds=round(forward_s, 5))
    if "first_call_s" in figures:
        figures["compile_s"] = round(figures["first_call_s"] - forward_s, 3)
    return figures


def summarize(cases: dict[str, dict[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """Per model: the int8 and compile speedups over float32, int8's error, the compile time and a cached start."""
    summary: dict[str, Any] = {"threads": options.threads}
    for model in MODELS:
        if f"{model}.fp32" not in cases:
            continue
        fp32 = cases[f"{model}.fp32"]["forward_s"]
        summary[f"speedup_int8_{model}"] = round(fp32 / cases[f"{model}.int8"]["forward_s"], 3)
        summary[f"speedup_compile_{model}"] = round(fp32 / cases[f"{model}.compile"]["forward_s"], 3)
        summary[f"int8_relative_error_{model}"] = cases[f"{model}.int8"]["relative_error"]
        summary[f"compile_s_{model}"] = cases[f"{model}.compile"]["compile_s"]
        summary[f"cached_first_call_s_{model}"] = cases[f"{model}.compile_cached"]["first_call_s"]
    return summary


def case_line(case: str, figures: Mapping[str, Any]) -> str:
    line = f"{case}: forward {figures['forward_s'] * 1e3:.1f} ms"
    if "first_call_s" in figures:
        line += f", first call {figures['first_call_s']:.1f} s (cache hits {figures['hits']})"
    if "relative_error" in figures:
        line += f", relative error {figures['relative_error']:.4f}"
    return line + f", peak RSS {figures['max_rss'] / 2**20:.0f} MiB"


def main(argv: list[str]) -> None:
    # The compile cases share one cache folder: `compile` fills it, `compile_cached` reads it. Made here, removed after.
    if "--case" in argv or "--compile-cache" in argv:
        folder = None
    else:
        folder = tempfile.mkdtemp(prefix="kinema-bench-compile-")
        argv = [*argv, "--compile-cache", folder]
    try:
        run_benchmark("optimize", __doc__, cases=cases_for(argv), reference=REFERENCE, measure=measure,
                      add_arguments=add_arguments, summarize=summarize, case_line=case_line, argv=argv)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
