"""Speed (issue 13's acceptance benchmark): kinema's forward and time to a finished video against diffusers on
identical weights, with the matmul peaks and `kinema eval` scores measured in the same run.

Usage: python benchmarks/bench_speed.py [--quick] [--eval-prompts N]

(a) One denoiser forward of an SD1.5-size video UNet (SD1.5's UNet config with an AnimateDiff v2 motion module,
random seeded weights, CFG-free batch of 1, 16 frames at 256 px; `--quick`: a 2-level UNet 64/128 wide, 8 frames at
64 px). Every case builds the same weights from the same seeds: the 2D UNet and a diffusers `MotionAdapter`
(perturbed, so the motion modules are not identities); kinema inflates the UNet and loads the adapter's weights
through kinema.loaders' key map, diffusers builds `UNetMotionModel.from_unet2d` from the same two.
- `kinema_fp32` (the reference), `kinema_bf16` (kinema.models.precision.prepare_for_inference: weights and
  activations in bf16, channels-last; `channels_last_speedup`: the contiguous layout's forward seconds over
  channels-last's, in the same process), `kinema_int8` (kinema.models.optimize.quantize_model, dynamic int8 Linear
  layers), `diffusers_fp32`, `diffusers_bf16_autocast` (fp32 weights under `torch.autocast("cpu", bfloat16)`).
- Each case: one warm-up forward (under `FlopCounterMode`: the forward's FLOPs), then the timed forward(s)
  (`seconds`: the fastest), then a large matmul in the case's dtype (`matmul_gflops`: its peak FLOP/s, measured in
  the same process right after), so `fraction_of_peak` = FLOPs / seconds / peak compares like with like on a busy
  machine. `relative_error` is ||out - kinema_fp32|| / ||kinema_fp32|| on the same input.
- On a CPU without native bf16 (no AVX-512 BF16 / AMX: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`), bf16 runs
  in emulated kernels ~50x slower than fp32; the full-size bf16 cases then report null with that reason, and a
  profile of the fp32 forward stands in for the bf16 one.

(b) Time to a finished video (loading excluded; text encoding, sampling and VAE decode included; one 1-step
warm-up first): kinema's `fast` speed preset (kinema.pipelines.speed) against diffusers' defaults, DDIM 25 steps,
guidance 7.5, fp32.
- `tiny_reference` / `tiny_fast`: the bundled kinema-tiny at its size (16 frames, 64 px; `--quick` 8 frames); diffusers
  cannot run it, so the reference is kinema's `generate()` at diffusers' defaults. Each also scores `kinema eval` on
  the first `--eval-prompts` lines of the bundled prompt set (default 8; `--quick` 1) with the same settings.
- `sd15_reference` / `sd15_fast`: diffusers' `AnimateDiffPipeline` against kinema's `generate()` on an SD1.5-size
  random AnimateDiff model (the UNet and adapter of (a), SD1.5's VAE and a 12-layer CLIP text encoder with a byte
  tokenizer), 8 frames at 128 px (`--quick`: the small UNet, a 2-level VAE, 8 frames at 64 px).

The last line is one JSON object: the harness's figures per case and `bf16_fraction_of_peak`,
`fp32_fraction_of_peak`, `speedup_bf16_vs_diffusers_bf16`, `speedup_int8` (kinema fp32 / int8 forward seconds),
`time_to_video_speedup` (`kinema_tiny`, `sd15_size`), `eval` (both settings' scores), `eval_delta` (the most
colour/shape/motion accuracy points the fast preset loses, negative when it gains),
`vae_decode_speedup_vs_easyanimate_design` (benchmarks/bench_vae_decode.py run here; not under --quick), `goals`,
`notes` (why a figure is null) and `profile` (the top 10 ops of the bf16 forward by self time, when it is under 90%
of the peak; on a CPU without native bf16, of the fp32 forward).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import byte_tokenizer, run_benchmark

PROMPT = "a red circle moving right"
FORWARD_CASES = ("kinema_fp32", "kinema_bf16", "kinema_int8", "diffusers_fp32", "diffusers_bf16_autocast")
VIDEO_CASES = ("tiny_reference", "tiny_fast", "sd15_reference", "sd15_fast")
CASES = (*FORWARD_CASES, *VIDEO_CASES)
GOALS = {"bf16_fraction_of_peak": 0.9, "time_to_video_speedup": 3.0, "eval_delta_max_points": 1.0,
         "vae_decode_speedup_vs_easyanimate_design": 1.5}
# diffusers' AnimateDiffPipeline defaults, the reference of (b).
REFERENCE_SETTINGS = {"scheduler": "ddim", "steps": 25, "guidance": 7.5, "dtype": None}
PROFILE_ROWS = 10
HERE = Path(__file__).resolve().parent

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
# Its 128-wide level is the narrowest whose Linear layers quantize_model turns int8 (MIN_INT8_FEATURES).
QUICK_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=2,
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)
# 4 levels as SD1.5's (8x down), 32 wide.
QUICK_VAE = dict(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32, layers_per_block=1)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
QUICK_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)


def forward_size(quick: bool) -> tuple[int, int]:
    """(frames, pixels) of the forward in (a)."""
    return (8, 64) if quick else (16, 256)


def video_size(quick: bool) -> tuple[int, int]:
    """(frames, pixels) of the SD1.5-size video in (b)."""
    return (8, 64) if quick else (8, 128)


def scratch_folder(benchmark_pid: int) -> Path:
    """Where the reference case leaves its output for the others: named after the benchmark's process (a case's
    parent), which removes it at the end."""
    return Path(tempfile.gettempdir()) / f"kinema-bench-speed-{benchmark_pid}"


# ---------------------------------------------------------------- identical weights in every case


def seeded_parts(quick: bool) -> tuple[Any, Any]:
    """The 2D UNet and the AnimateDiff v2 `MotionAdapter` (mid block, 32 frames), seeded, in eval mode."""
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel

    config = QUICK_UNET if quick else SD15_UNET
    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(**config).eval()
    torch.manual_seed(1)
    adapter = MotionAdapter(block_out_channels=config["block_out_channels"], motion_layers_per_block=2,
                            motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                            use_motion_mid_block=True).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # zero-initialised output projections would make the motion modules identities
        for parameter in adapter.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return unet2d, adapter


def kinema_video_unet(unet2d: Any, adapter: Any) -> Any:
    """kinema's VideoUNet with the adapter's weights: diffusers' motion norms (across frames), v2's mid block."""
    from kinema.loaders.animatediff.keys import diffusers_to_original_key
    from kinema.models.video_unet import VideoUNet

    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=True, resnet_norm_mode="per_frame",
                                  motion_module={"type": "temporal", "norm_mode": "across_frames", "max_frames": 32})
    motion = {diffusers_to_original_key(key): value for key, value in adapter.state_dict().items()
              if not key.endswith("pos_embed.pe")}
    video.load_motion_state_dict(motion)
    return video.eval()


def forward_inputs(quick: bool, text_width: int) -> tuple[Any, Any]:
    """Noisy latents `(1, 4, F, H/8, W/8)` and text states `(1, 77, D)`, seeded."""
    import torch

    frames, pixels = forward_size(quick)
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(1, 4, frames, pixels // 8, pixels // 8, generator=generator),
            torch.randn(1, 77, text_width, generator=generator))


# ---------------------------------------------------------------- (a) one forward


def native_bf16() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def matmul_gflops(dtype: Any, size: int) -> float:
    """The best of 3 timed `size`^3 matmuls in `dtype` after one warm-up, in GFLOP/s."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def profile_table(run: Callable[[], Any]) -> list[dict[str, Any]]:
    """The top ops of one call of `run` by self CPU time: name, self seconds, share of the total, calls."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    events = sorted(profiler.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in events) or 1
    return [{"op": event.key, "self_s": round(event.self_cpu_time_total / 1e6, 4),
             "share": round(event.self_cpu_time_total / total, 4), "calls": event.count}
            for event in events[:PROFILE_ROWS]]


def measure_forward(case: str, options: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file
    from torch.utils.flop_counter import FlopCounterMode

    bf16 = case in ("kinema_bf16", "diffusers_bf16_autocast")
    if bf16 and not options.quick and not native_bf16():
        return {"seconds": None, "skipped": "this CPU has no native bf16 (AVX-512 BF16 / AMX): emulated kernels run "
                                            "~50x slower than float32, so a full-size bf16 forward is not timed"}
    unet2d, adapter = seeded_parts(options.quick)
    if case.startswith("kinema"):
        model = kinema_video_unet(unet2d, adapter)
    else:
        from diffusers import UNetMotionModel

        model = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    del unet2d, adapter
    gc.collect()
    latents, text = forward_inputs(options.quick, model.config["unet_config"]["cross_attention_dim"]
                                   if case.startswith("kinema") else model.config.cross_attention_dim)
    figures: dict[str, Any] = {}
    if case == "kinema_bf16":
        from kinema.models.precision import prepare_for_inference

        prepare_for_inference(model, torch.bfloat16, channels_last=True)
        latents, text = latents.bfloat16(), text.bfloat16()
    elif case == "kinema_int8":
        try:
            from kinema.models.optimize import quantize_model
        except ImportError as err:
            return {"seconds": None, "skipped": f"kinema.models.optimize.quantize_model is not there yet ({err})"}
        quantize_model(model, "int8")

    if case.startswith("diffusers"):
        text = text.repeat_interleave(latents.shape[2], dim=0)  # (B*F, L, D): as diffusers' pipeline passes them

    def forward() -> Any:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=case == "diffusers_bf16_autocast"):
            out = model(latents, 500, text)
        return out if case.startswith("kinema") else out.sample

    counter = FlopCounterMode(display=False)
    with counter:
        forward()  # the warm-up
    flops = counter.get_total_flops()
    times = []
    for _ in range(1 if not options.quick else 3):
        start = time.perf_counter()
        output = forward().float()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    if case == "kinema_bf16":  # the other layout, timed in this same process: which one prepare_for_inference picks
        model.to(memory_format=torch.contiguous_format)
        forward()
        start = time.perf_counter()
        forward()
        figures["channels_last_speedup"] = round((time.perf_counter() - start) / seconds, 3)
        model.to(memory_format=torch.channels_last)
    figures.update(seconds=round(seconds, 4), gflop=round(flops / 1e9, 3), gflops=round(flops / seconds / 1e9, 2),
                   native_bf16=native_bf16())
    if not bf16 or native_bf16():  # emulated bf16 has no peak worth the name: its convs and matmuls differ 10x
        peak = matmul_gflops(torch.bfloat16 if bf16 else torch.float32, 1024 if options.quick else 2048)
        figures.update(matmul_gflops=round(peak, 2), fraction_of_peak=round(flops / seconds / 1e9 / peak, 4))
    scratch = scratch_folder(os.getppid())
    if case == "kinema_fp32":
        scratch.mkdir(exist_ok=True)
        save_file({"output": output.contiguous()}, str(scratch / "kinema_fp32.safetensors"))
    elif (scratch / "kinema_fp32.safetensors").is_file():
        reference = load_file(str(scratch / "kinema_fp32.safetensors"))["output"]
        figures["relative_error"] = round(((output - reference).norm() / reference.norm()).item(), 5)
    if case == "kinema_bf16" and figures.get("fraction_of_peak", 1.0) < GOALS["bf16_fraction_of_peak"]:
        figures["profile"] = profile_table(forward)
    if case == "kinema_fp32" and not options.quick and not native_bf16():
        figures["profile"] = profile_table(forward)  # stands in for the bf16 profile this CPU cannot time
    return figures


# ---------------------------------------------------------------- (b) time to a finished video


def preset_request(request: Any, setting: str) -> Any:
    """`request` at diffusers' defaults (`reference`) or under kinema's `fast` preset on top of them."""
    request = replace(request, **REFERENCE_SETTINGS)
    if setting == "reference":
        return request
    from kinema.pipelines.speed import apply_speed

    return apply_speed(request, "fast")


def timed_generate(family: Any, request: Any) -> float:
    """Seconds of one `generate()` (frames decoded), after a 1-step warm-up of the same request."""
    from kinema.pipelines.generation import generate

    generate(family, replace(request, steps=1), progress=False)
    start = time.perf_counter()
    generate(family, request, progress=False)
    return time.perf_counter() - start


def eval_scores(setting: str, options: argparse.Namespace) -> dict[str, Any]:
    """`kinema eval` of kinema-tiny on the first `--eval-prompts` prompts with the requests of `setting`."""
    import kinema.pipelines.generation as generate_module
    from kinema.eval.run import evaluate

    # Both arms start from diffusers' defaults (REFERENCE_SETTINGS, which `kinema eval --speed` would not set), so
    # every request evaluate() makes goes through this setting here: the same prompts, seeds and sizes.
    plain = generate_module.generate

    def generate_with_setting(family: Any, request: Any, **kwargs: Any) -> Any:
        return plain(family, preset_request(request, setting), **kwargs)

    generate_module.generate = generate_with_setting  # type: ignore[assignment]
    try:
        report = evaluate("kinema-tiny", limit=options.eval_prompts or (1 if options.quick else 8),
                          frames=8 if options.quick else None, progress=False, continuation=False)
    finally:
        generate_module.generate = plain  # type: ignore[assignment]
    return {"n": report.n, "color_acc": report.color_acc, "shape_acc": report.shape_acc,
            "motion_acc": report.motion_acc, "seconds": report.seconds}


def measure_tiny(case: str, options: argparse.Namespace) -> dict[str, Any]:
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import GenerationRequest

    setting = case.removeprefix("tiny_")
    try:
        request = preset_request(GenerationRequest(prompt=PROMPT, frames=8 if options.quick else 16, height=64,
                                                   width=64, seeds=[0]), setting)
    except ImportError as err:
        return {"seconds": None, "skipped": f"kinema.pipelines.speed is not there yet ({err})"}
    family = load_family("kinema-tiny")
    seconds = timed_generate(family, request)
    return {"seconds": round(seconds, 3), "request": {key: getattr(request, key) for key in (
        "scheduler", "steps", "guidance", "dtype", "cache_interval", "cfg_truncation", "quantize", "compile")},
            "eval": eval_scores(setting, options)}


def sd15_parts(quick: bool, tokenizer_folder: Path) -> dict[str, Any]:
    """The SD1.5-size random AnimateDiff model's parts, seeded: unet2d, adapter, vae, text_encoder, tokenizer (its
    files written to `tokenizer_folder`)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet2d, adapter = seeded_parts(quick)
    torch.manual_seed(4)
    vae = AutoencoderKL(**(QUICK_VAE if quick else SD15_VAE)).eval()
    torch.manual_seed(5)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, max_position_embeddings=77,
                                                **(QUICK_TEXT if quick else SD15_TEXT))).eval()
    tokenizer = byte_tokenizer(tokenizer_folder)
    return {"unet2d": unet2d, "adapter": adapter, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def measure_sd15(case: str, options: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kinema-bench-speed-tokenizer-") as folder:
        parts = sd15_parts(options.quick, Path(folder))
    return time_sd15(case, parts, options)


def time_sd15(case: str, parts: dict[str, Any], options: argparse.Namespace) -> dict[str, Any]:
    import torch

    frames, pixels = video_size(options.quick)
    if case == "sd15_reference":
        from diffusers import AnimateDiffPipeline

        from kinema.sampling.schedulers import make_scheduler

        pipe = AnimateDiffPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet2d"], motion_adapter=parts["adapter"],
                                   scheduler=make_scheduler("ddim"))
        pipe.set_progress_bar_config(disable=True)

        def run(steps: int) -> None:
            with torch.no_grad():
                pipe(PROMPT, num_frames=frames, height=pixels, width=pixels, num_inference_steps=steps,
                     guidance_scale=REFERENCE_SETTINGS["guidance"], output_type="pt",
                     generator=torch.Generator().manual_seed(0))

        run(1)
        start = time.perf_counter()
        run(int(REFERENCE_SETTINGS["steps"]))
        return {"seconds": round(time.perf_counter() - start, 3)}

    from kinema.pipelines.animatediff import AnimateDiffFamily
    from kinema.pipelines.request import GenerationRequest

    try:
        request = preset_request(GenerationRequest(prompt=PROMPT, frames=frames, height=pixels, width=pixels,
                                                   seeds=[0]), "fast")
    except ImportError as err:
        return {"seconds": None, "skipped": f"kinema.pipelines.speed is not there yet ({err})"}
    family = AnimateDiffFamily(kinema_video_unet(parts["unet2d"], parts["adapter"]), parts["vae"],
                               parts["text_encoder"], parts["tokenizer"])
    del parts
    gc.collect()
    return {"seconds": round(timed_generate(family, request), 3)}


def measure(case: str, options: argparse.Namespace) -> Mapping[str, Any]:
    if case in FORWARD_CASES:
        return measure_forward(case, options)
    return measure_tiny(case, options) if case.startswith("tiny_") else measure_sd15(case, options)


# ---------------------------------------------------------------- the summary


def ratio(numerator: Any, denominator: Any) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def vae_decode_speedup(options: argparse.Namespace) -> tuple[float | None, str | None]:
    """The Slice VAE decode's speedup over EasyAnimate's design, from the "vae" benchmark's own run."""
    script = HERE / "bench_vae_decode.py"
    if not script.is_file():
        return None, "benchmarks/bench_vae_decode.py is not there yet"
    if options.quick:  # its own --quick is several model-building processes: minutes on a busy 2-core machine
        return None, "not run under --quick: see benchmarks/bench_vae_decode.py --quick"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return None, f"bench_vae_decode.py printed no JSON (exit {done.returncode})"
    for key in ("vae_decode_speedup_vs_easyanimate_design", "speedup_vs_easyanimate_design", "speedup"):
        if isinstance(result.get(key), int | float):
            return result[key], None
    return None, f"bench_vae_decode.py's JSON has none of the expected keys: {sorted(result)}"


def summarize(cases: dict[str, dict[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    scratch = scratch_folder(os.getpid())
    (scratch / "kinema_fp32.safetensors").unlink(missing_ok=True)
    if scratch.is_dir():
        scratch.rmdir()
    notes = {case: figures["skipped"] for case, figures in cases.items() if figures.get("skipped")}
    if cases["kinema_bf16"].get("native_bf16") is False:
        notes["bf16_fraction_of_peak"] = "this CPU has no native bf16: no peak to measure it against"
    seconds = {case: figures.get("seconds") for case, figures in cases.items()}
    reference_eval, fast_eval = cases["tiny_reference"].get("eval"), cases["tiny_fast"].get("eval")
    eval_delta = None
    if reference_eval and fast_eval:
        eval_delta = round(max(100 * (reference_eval[key] - fast_eval[key])
                               for key in ("color_acc", "shape_acc", "motion_acc")), 1)
    speedups = {"kinema_tiny": ratio(seconds["tiny_reference"], seconds["tiny_fast"]),
                "sd15_size": ratio(seconds["sd15_reference"], seconds["sd15_fast"])}
    vae_speedup, vae_note = vae_decode_speedup(options)
    if vae_note:
        notes["vae_decode_speedup_vs_easyanimate_design"] = vae_note
    bf16_fraction = cases["kinema_bf16"].get("fraction_of_peak")
    profile = cases["kinema_bf16"].get("profile") or cases["kinema_fp32"].get("profile")
    measured = [value for value in speedups.values() if value is not None]
    return {
        "bf16_fraction_of_peak": bf16_fraction,
        "fp32_fraction_of_peak": cases["kinema_fp32"].get("fraction_of_peak"),
        "diffusers_fp32_fraction_of_peak": cases["diffusers_fp32"].get("fraction_of_peak"),
        "speedup_bf16_vs_diffusers_bf16": ratio(seconds["diffusers_bf16_autocast"], seconds["kinema_bf16"]),
        "speedup_bf16_vs_fp32": ratio(seconds["kinema_fp32"], seconds["kinema_bf16"]),
        "speedup_fp32_vs_diffusers_fp32": ratio(seconds["diffusers_fp32"], seconds["kinema_fp32"]),
        "speedup_int8": ratio(seconds["kinema_fp32"], seconds["kinema_int8"]),
        "time_to_video_speedup": speedups,
        "eval": {"reference": reference_eval, "fast": fast_eval},
        "eval_delta": eval_delta,
        "vae_decode_speedup_vs_easyanimate_design": vae_speedup,
        "goals": {"bf16_fraction_of_peak": None if bf16_fraction is None
                  else bf16_fraction >= GOALS["bf16_fraction_of_peak"],
                  "time_to_video_speedup": bool(measured) and min(measured) >= GOALS["time_to_video_speedup"],
                  "eval_delta": None if eval_delta is None else eval_delta <= GOALS["eval_delta_max_points"],
                  "vae_decode": None if vae_speedup is None
                  else vae_speedup >= GOALS["vae_decode_speedup_vs_easyanimate_design"]},
        "profile": profile,
        "notes": notes,
        "forward_size": dict(zip(("frames", "pixels"), forward_size(options.quick), strict=True)),
        "video_size": dict(zip(("frames", "pixels"), video_size(options.quick), strict=True)),
        "cpu_count": os.cpu_count(), "load_average": [round(load, 2) for load in os.getloadavg()],
        "median_forward_seconds": statistics.median(
            [value for case, value in seconds.items() if case in FORWARD_CASES and value] or [0]),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help="kinema eval prompts per setting (default 8; --quick 1)")


def case_line(case: str, figures: Mapping[str, Any]) -> str:
    if figures.get("seconds") is None:
        return f"{case}: skipped ({figures.get('skipped')})"
    return f"{case}: {figures['seconds']:.3f} s, peak RSS {figures['max_rss'] / 2**20:.1f} MiB"


if __name__ == "__main__":
    run_benchmark("speed", __doc__, cases=list(CASES), reference="kinema_fp32", measure=measure,
                  add_arguments=add_arguments, summarize=summarize, case_line=case_line)
