"""Text to video, kinema vs diffusers' AnimateDiffPipeline: seconds per denoising step, peak memory, frame difference.

Usage: python benchmarks/bench_t2v.py [--quick] [--configs tiny sd15] [--precisions float32 bfloat16]
                                      [--controlnet] [--threads N] [--outputs DIR]

Both sides run on identical weights: seeded random weights built from configs (the values do not change the time,
and no download is needed), the same prompt and negative prompt, the same initial noise (kinema draws it from the
seed with `initial_noise`; diffusers gets that tensor as `latents=`), DDIM, guidance 7.5. Configs:
- `tiny`: SD1.5-shaped but 32/64 channels wide, 16x16 px (8x8 latents: its VAE downscales by 2), 4 frames,
  4 steps, one torch thread (for models this small a thread pool costs more than the maths, the more so on a busy
  machine). An untimed one-step run first (a first call's one-off costs would otherwise count), then up to 5 timed
  runs while their steps add up to under 2 s. It measures each side's overhead around small ops more than maths.
  `--quick` runs this config only.
- `sd15`: SD1.5's UNet, VAE and CLIP text encoder (the configs kinema ships, kinema/loaders/configs/sd15) with a
  motion adapter of AnimateDiff v2's layout (`mm_sd_v15_v2`: 2 motion modules per down block, 3 per up block, one in
  the mid block, 32 frame positions), 256x256 px, 16 frames, 2 steps, torch's default threads, one run, no warm-up
  (a step takes a minute or more on a small CPU: first-call costs are noise next to it).
The motion adapter's weights are perturbed so that its zero-initialised output projections stop being identities.
`--controlnet` steers both sides by a ControlNet (diffusers' `ControlNetModel.from_unet` of the same UNet, its
zero-initialised outputs perturbed too) at scale 0.8 with one control image per frame (a bright square moving right,
in whole 255ths so that the PIL images diffusers' `AnimateDiffControlNetPipeline` takes hold the same values):
kinema's VideoControlNet against that pipeline. A step then holds the ControlNet's forward too.
kinema runs the motion modules in diffusers' norm mode (GroupNorm statistics across frames; resnets per frame), the
mode in which both compute the same function.

Each config runs four cases, each in a fresh subprocess (benchmarks/common.py), so each has its own peak memory:
kinema and diffusers in float32, then kinema in bfloat16 (`generate()` with dtype "bfloat16", the models cast to
it beforehand) and diffusers (float32 weights) under `torch.autocast("cpu", torch.bfloat16)`. `--precisions
float32` leaves the two bfloat16 cases out (on a CPU without bfloat16 kernels they take hours at SD1.5 size) and
`--configs` picks configs. kinema is called
through `generate()` with the request's dtype (the whole pipeline's, as `kinema generate --dtype`).

Timing: a step runs from the end of the previous one (the first: from the first UNet call) to the end of its own,
read from the step callbacks both pipelines offer (kinema `callback`, diffusers `callback_on_step_end`) and a
forward pre-hook on the UNet; so a step is the UNet forward, guidance and the scheduler step, and prompt encoding
and VAE decoding stay outside (`other_seconds`: the rest of the call). `s_per_step` is the median over all timed
steps (robust to another process taking the CPU for a moment). The machine's load average is recorded per case.
Memory: `peak_rss` is the process's resident-memory high-water mark during the timed generation calls alone (reset
just before them through /proc/self/clear_refs), so it holds the models plus the calls' working memory, not the
building of the models; `peak_above_start` is that minus the resident memory just before them. glibc keeps freed
blocks, so RSS peaks drift by some percent between identical runs. The harness's `max_rss` (whole process) is kept.

The last printed line is one JSON object: the harness's figures per case, and per config under `configs`:
kinema_s_per_step, diffusers_s_per_step, speedup (diffusers / kinema), max_abs_diff (decoded frames in [0, 1]),
kinema_bf16_s_per_step, diffusers_bf16_s_per_step, speedup_bf16 (diffusers under autocast / kinema bfloat16),
max_abs_diff_bf16 (kinema bfloat16 against diffusers float32), diffusers_autocast_max_abs_diff (diffusers' autocast
against its own float32), the peak memory of each case and the settings; `onednn_bf16` says whether this CPU has
oneDNN's bfloat16 kernels (without them, e.g. on AVX2 alone, bfloat16 convolutions and matmuls take slow fallback
kernels and bfloat16 is slower than float32 on both sides). Acceptance: max_abs_diff <= 1e-3, and kinema not slower
than diffusers (speedup >= 1) on either config.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import byte_tokenizer, run_benchmark, seeded

SEED, GUIDANCE, SCHEDULER = 5, 7.5, "ddim"
CONTROL_SCALE = 0.8
PROMPT, NEGATIVE = "a red fox runs through the snow", "blurry"
SIDES = ("kinema", "diffusers")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class Config:
    """One model size and the video generated with it."""

    unet: dict[str, Any]
    adapter: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    size: int
    frames: int
    steps: int
    warmup: bool
    perturb_scale: float  # std of the noise added to the motion adapter's weights
    threads: int | None  # torch threads unless --threads says otherwise; None: torch's default (one per core)
    repeats: int = 1  # timed runs at most, while their steps took under `repeat_within` seconds
    repeat_within: float = 0.0


def _sd15(component: str) -> dict[str, Any]:
    from kinema.loaders.stable_diffusion import SD15_CONFIGS

    config = json.loads((SD15_CONFIGS / component / "config.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


def configs() -> dict[str, Config]:
    """The benchmark's configs by name (`tiny` first: `--quick` runs it alone)."""
    tiny_unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                     cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32, attention_head_dim=8)
    return {
        "tiny": Config(
            unet=tiny_unet,
            adapter=dict(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                         motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True),
            vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                     layers_per_block=1),
            text_encoder=dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                              num_attention_heads=4, max_position_embeddings=77),
            size=16, frames=4, steps=4, warmup=True, perturb_scale=0.1, threads=1, repeats=5, repeat_within=2.0),
        "sd15": Config(
            unet=_sd15("unet"),
            adapter=dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                         motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                         use_motion_mid_block=True),
            vae=_sd15("vae"), text_encoder=_sd15("text_encoder"),
            size=256, frames=16, steps=2, warmup=False, perturb_scale=0.02, threads=None),
    }


def case_name(config: str, side: str, precision: str) -> str:
    return f"{config}.{side}.{precision}"


# ---------------------------------------------------------------- the models, identical on both sides



def motion_adapter(config: Config) -> Any:
    """The seeded motion adapter with every weight perturbed by seeded Gaussian noise."""
    from diffusers.models.unets.unet_motion_model import MotionAdapter

    adapter = seeded(1, lambda: MotionAdapter(**config.adapter))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * config.perturb_scale)
    return adapter


def base_parts(config: Config, folder: Path, control: bool = False) -> tuple[Any, dict[str, Any]]:
    """The seeded 2D UNet, and the VAE, text encoder and tokenizer (and with `control` the ControlNet)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet2d = seeded(0, lambda: UNet2DConditionModel.from_config(config.unet))
    vae = seeded(3, lambda: AutoencoderKL.from_config(config.vae))
    text_encoder = seeded(4, lambda: CLIPTextModel(CLIPTextConfig(**config.text_encoder)))
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": byte_tokenizer(folder / "tokenizer")}
    if control:
        parts["controlnet"] = controlnet(config, unet2d)
    return unet2d, parts


def controlnet(config: Config, unet2d: Any) -> Any:
    """The UNet's seeded ControlNet, its hint encoder downscaling as the VAE does and every weight perturbed."""
    from diffusers import ControlNetModel

    levels = len(config.vae["block_out_channels"])  # the VAE downscales by 2 ** (levels - 1)
    network = seeded(6, lambda: ControlNetModel.from_unet(
        unet2d, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * config.perturb_scale)
    return network.eval()


def control_frames(config: Config) -> torch.Tensor:
    """`(F, 3, H, W)` in whole 255ths: a bright square moving right on a dark ground."""
    video = torch.full((config.frames, 3, config.size, config.size), 26 / 255)
    side = config.size // 4
    for f in range(config.frames):
        left = f * (config.size - side) // max(config.frames - 1, 1)
        video[f, :, side:2 * side, left:left + side] = 230 / 255
    return video


def kinema_models(config: Config, folder: Path, dtype: torch.dtype,
                  control: bool = False) -> tuple[Any, dict[str, Any]]:
    """kinema's VideoUNet (diffusers' norm mode) carrying the adapter's motion weights, and the other parts (with
    `control` a VideoControlNet), all in `dtype`."""
    from kinema.loaders.animatediff.keys import diffusers_to_original_key, is_pe_key
    from kinema.models.controlnet import VideoControlNet
    from kinema.models.video_unet import VideoUNet

    unet2d, parts = base_parts(config, folder, control)
    if control:
        parts["controlnet"] = VideoControlNet(parts["controlnet"], CONTROL_SCALE).to(dtype)
    video_unet = VideoUNet.from_unet2d(unet2d, motion_mid_block=config.adapter["use_motion_mid_block"],
                                       resnet_norm_mode="per_frame",
                                       motion_module={"type": "temporal", "norm_mode": "across_frames",
                                                      "max_frames": config.adapter["motion_max_seq_length"]})
    del unet2d  # the VideoUNet holds a copy of every 2D weight
    gc.collect()
    adapter = motion_adapter(config)
    video_unet.load_motion_state_dict({diffusers_to_original_key(key): value
                                       for key, value in adapter.state_dict().items() if not is_pe_key(key)})
    del adapter
    gc.collect()
    video_unet.to(dtype)
    parts["vae"].to(dtype)
    parts["text_encoder"].to(dtype)
    return video_unet.eval(), parts


def diffusers_pipeline(config: Config, folder: Path, control: bool = False) -> Any:
    """diffusers' AnimateDiffPipeline on the same weights (its UNetMotionModel built from the 2D UNet and adapter);
    with `control` its AnimateDiffControlNetPipeline."""
    from diffusers import AnimateDiffControlNetPipeline, AnimateDiffPipeline
    from diffusers.models.unets.unet_motion_model import UNetMotionModel

    from kinema.sampling.schedulers import make_scheduler

    unet2d, parts = base_parts(config, folder, control)
    adapter = motion_adapter(config)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    del unet2d  # as on kinema's side, only the video UNet stays (the pipeline would also keep the adapter)
    gc.collect()
    kind = AnimateDiffControlNetPipeline if control else AnimateDiffPipeline
    pipe = kind(unet=unet, motion_adapter=None, scheduler=make_scheduler(SCHEDULER), **parts)
    del adapter
    gc.collect()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- one generation, timed


class StepClock:
    """Times the denoising steps: the first step starts at the first UNet call, each step ends at its callback."""

    def __init__(self, unet: torch.nn.Module):
        self.first_call: float | None = None
        self.step_ends: list[float] = []
        self._hook = unet.register_forward_pre_hook(self._on_unet_call)

    def _on_unet_call(self, *_: Any) -> None:
        if self.first_call is None:
            self.first_call = time.perf_counter()

    def step_done(self) -> None:
        self.step_ends.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        assert self.first_call is not None, "the UNet never ran"
        starts = [self.first_call, *self.step_ends[:-1]]
        return [end - start for start, end in zip(starts, self.step_ends, strict=True)]

    def remove(self) -> None:
        self._hook.remove()


def kinema_generate(video_unet: Any, parts: Mapping[str, Any], config: Config, steps: int, dtype: str,
                    on_step: Callable[[], None]) -> tuple[torch.Tensor, str]:
    """kinema's frames `(1, F, 3, H, W)` in [0, 1] and the dtype its report says ran: the one place the kinema side
    is called. `generate()` with the request's `dtype` (the whole pipeline's, as `kinema generate --dtype`)."""
    from kinema.pipelines.animatediff import AnimateDiffFamily
    from kinema.pipelines.generation import generate
    from kinema.pipelines.request import GenerationRequest

    family = AnimateDiffFamily(video_unet, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                               controlnet=parts.get("controlnet"))
    request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, frames=config.frames, height=config.size,
                                width=config.size, steps=steps, guidance=GUIDANCE, scheduler=SCHEDULER, seeds=[SEED],
                                dtype=dtype, control_video=None if family.controlnet is None else
                                control_frames(config))
    result = generate(family, request, callback=lambda *_: on_step(), progress=False)
    return result.frames, result.report["dtype"]


def diffusers_generate(pipe: Any, config: Config, steps: int, on_step: Callable[[], None],
                       autocast: bool) -> torch.Tensor:
    """diffusers' frames `(1, F, 3, H, W)` in [0, 1], from kinema's initial noise for the same seed."""
    from PIL import Image

    from kinema.sampling.loop import initial_noise

    factor = pipe.vae_scale_factor
    noise = initial_noise((1, pipe.unet.config.in_channels, config.frames, config.size // factor,
                           config.size // factor), [SEED])

    def step_end(_pipe: Any, _step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step()
        return tensors

    control: dict[str, Any] = {}
    if getattr(pipe, "controlnet", None) is not None:
        control = {"conditioning_frames": [Image.fromarray((f.permute(1, 2, 0) * 255).round().byte().numpy())
                                           for f in control_frames(config)],
                   "controlnet_conditioning_scale": CONTROL_SCALE}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, latents=noise, num_frames=config.frames,
                    height=config.size, width=config.size, num_inference_steps=steps,
                    guidance_scale=GUIDANCE, output_type="pt", callback_on_step_end=step_end, **control).frames


def measure(case: str, options: argparse.Namespace) -> dict[str, Any]:
    """Build one side's models, generate one video (after a warm-up where the config has one) and time it; the
    frames go to `options.outputs` for the comparison in `summarize`."""
    from kinema.memory import peak_memory_bytes, reset_peak_memory, resident_bytes

    config_name, side, precision = case.split(".")
    config = configs()[config_name]
    threads = options.threads or config.threads
    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, precision)
    with tempfile.TemporaryDirectory() as folder:
        if side == "kinema":
            video_unet, parts = kinema_models(config, Path(folder), dtype, options.controlnet)
            unet = video_unet

            def generate(steps: int, on_step: Callable[[], None]) -> tuple[torch.Tensor, str]:
                return kinema_generate(video_unet, parts, config, steps, precision, on_step)
        else:
            pipe = diffusers_pipeline(config, Path(folder), options.controlnet)
            unet = pipe.unet
            autocast = precision == "bfloat16"
            ran = "float32 weights under torch.autocast('cpu', torch.bfloat16)" if autocast else "float32"

            def generate(steps: int, on_step: Callable[[], None]) -> tuple[torch.Tensor, str]:
                return diffusers_generate(pipe, config, steps, on_step, autocast), ran

        if config.warmup:
            generate(1, lambda: None)
        gc.collect()
        rss_before = resident_bytes()
        peak_reset = reset_peak_memory()
        load_before = os.getloadavg()[0]
        step_seconds: list[float] = []
        other_seconds: list[float] = []
        while not other_seconds or (len(other_seconds) < config.repeats and sum(step_seconds) < config.repeat_within):
            clock = StepClock(unet)
            start = time.perf_counter()
            frames, ran = generate(config.steps, clock.step_done)
            call_seconds = time.perf_counter() - start
            clock.remove()
            steps = clock.step_seconds()
            if len(steps) != config.steps:
                raise RuntimeError(f"{case}: {len(steps)} step callbacks for {config.steps} steps")
            step_seconds += steps
            other_seconds.append(call_seconds - sum(steps))
        peak_rss = peak_memory_bytes()
    if not torch.isfinite(frames).all():
        raise RuntimeError(f"{case}: the frames are not all finite")
    torch.save(frames.float(), Path(options.outputs) / f"{case}.pt")
    return {
        "s_per_step": round(statistics.median(step_seconds), 4),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "other_seconds": round(statistics.median(other_seconds), 4),
        "runs": len(other_seconds),
        "peak_rss": peak_rss if peak_reset else None,
        "peak_above_start": peak_rss - rss_before if peak_reset else None,
        "dtype": ran,
        "frames_shape": list(frames.shape),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the comparison


def _frames(options: argparse.Namespace, case: str) -> torch.Tensor:
    return torch.load(Path(options.outputs) / f"{case}.pt")


def _max_abs_diff(options: argparse.Namespace, case: str, reference: str) -> float:
    return float((_frames(options, case) - _frames(options, reference)).abs().max())


def summarize(runs: dict[str, dict[str, Any]], options: argparse.Namespace) -> dict[str, Any]:
    """Per config: both sides' seconds per step, their ratios, the frames' differences, peak memory, settings
    (the bfloat16 figures None where bfloat16 was not run)."""
    names, precisions = selection(options)
    summary: dict[str, Any] = {}
    for name in names:
        config = configs()[name]
        figures = {(side, precision): runs[case_name(name, side, precision)]
                   for side in SIDES for precision in precisions}
        reference = case_name(name, "diffusers", "float32")
        kinema_32, diffusers_32 = figures["kinema", "float32"], figures["diffusers", "float32"]
        expected = _frames(options, reference)
        summary[name] = {
            "kinema_s_per_step": kinema_32["s_per_step"],
            "diffusers_s_per_step": diffusers_32["s_per_step"],
            "speedup": round(diffusers_32["s_per_step"] / kinema_32["s_per_step"], 4),
            "max_abs_diff": _max_abs_diff(options, case_name(name, "kinema", "float32"), reference),
            "kinema_bf16_s_per_step": None, "diffusers_bf16_s_per_step": None, "speedup_bf16": None,
            "max_abs_diff_bf16": None, "diffusers_autocast_max_abs_diff": None,
            "frames_std": round(float(expected.std()), 4),
            "peak_rss": {f"{side}_{precision}": figures[side, precision]["peak_rss"] for side, precision in figures},
            "peak_above_start": {f"{side}_{precision}": figures[side, precision]["peak_above_start"]
                                 for side, precision in figures},
            "settings": {"size": config.size, "frames": config.frames, "steps": config.steps,
                         "guidance": GUIDANCE, "scheduler": SCHEDULER, "warmup": config.warmup,
                         "unet_widths": list(config.unet["block_out_channels"]),
                         "motion_mid_block": config.adapter["use_motion_mid_block"],
                         "kinema_dtypes": [figures["kinema", p]["dtype"] for p in precisions],
                         "diffusers_dtypes": [figures["diffusers", p]["dtype"] for p in precisions],
                         "torch_threads": kinema_32["torch_threads"], "device": "cpu",
                         "controlnet": options.controlnet},
        }
        if "bfloat16" in precisions:
            kinema_16, diffusers_16 = figures["kinema", "bfloat16"], figures["diffusers", "bfloat16"]
            summary[name].update({
                "kinema_bf16_s_per_step": kinema_16["s_per_step"],
                "diffusers_bf16_s_per_step": diffusers_16["s_per_step"],
                "speedup_bf16": round(diffusers_16["s_per_step"] / kinema_16["s_per_step"], 4),
                "max_abs_diff_bf16": _max_abs_diff(options, case_name(name, "kinema", "bfloat16"), reference),
                "diffusers_autocast_max_abs_diff": _max_abs_diff(options, case_name(name, "diffusers", "bfloat16"),
                                                                 reference),
            })
    return {"configs": summary, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            # Without it (e.g. AVX2 only) bfloat16 convolutions and matmuls take slow fallback kernels.
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def case_line(case: str, figures: Mapping[str, Any]) -> str:
    peak = figures["peak_rss"]
    memory = f"peak RSS {peak / 2**20:8.1f} MiB" if peak is not None else "peak RSS n/a"
    return (f"{case:28s} {figures['s_per_step']:8.3f} s/step ({figures['dtype']}), {memory}, "
            f"load {figures['load_average'][0]:.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch threads per case (default: each config's own setting)")
    parser.add_argument("--outputs", help="folder for each case's frames (default: a temporary folder)")
    parser.add_argument("--controlnet", action="store_true",
                        help="steer both sides by a ControlNet (kinema's VideoControlNet against diffusers' "
                             "AnimateDiffControlNetPipeline)")
    parser.add_argument("--configs", nargs="+", choices=list(configs()),
                        help="configs to run (default: all; tiny with --quick)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="float32 is always run (it is the reference); add bfloat16 for the bfloat16 figures, "
                             "which take hours at SD1.5 size on a CPU without bfloat16 kernels")


def selection(options: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The configs (in the benchmark's order) and the precisions (float32 first) the options ask for."""
    wanted = options.configs or (["tiny"] if options.quick else list(configs()))
    return ([name for name in configs() if name in wanted],
            [precision for precision in PRECISIONS if precision == "float32" or precision in options.precisions])


def main(argv: list[str]) -> None:
    first_look = argparse.ArgumentParser(add_help=False)
    first_look.add_argument("--quick", action="store_true")
    add_arguments(first_look)
    names, precisions = selection(first_look.parse_known_args(argv)[0])
    cases = [case_name(name, side, precision) for name in names for precision in precisions for side in SIDES]
    reference = case_name(names[-1], "diffusers", "float32")
    with tempfile.TemporaryDirectory() as outputs:
        if "--outputs" not in argv and not any(arg.startswith("--outputs=") for arg in argv):
            argv = [*argv, "--outputs", outputs]
        run_benchmark("t2v", __doc__, cases=cases, reference=reference, measure=measure,
                      add_arguments=add_arguments, summarize=summarize, case_line=case_line, argv=argv)


if __name__ == "__main__":
    main(sys.argv[1:])
