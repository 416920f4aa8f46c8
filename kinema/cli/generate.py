"""`kinema generate`, `kinema v2v`, `kinema extend` and `kinema decode`: make videos from a prompt, a video or saved
latents. Each command builds a `GenerationRequest` and calls the library (`load_family`, `generate`, and
kinema.pipelines.outputs for the files), so the CLI does nothing the Python API cannot.

Before anything heavy is imported, `check` refuses bad usage (exit 2): numbers, missing files, a prompt schedule that
does not parse, and outputs the output policy would refuse (every video, its settings sidecar and the latents file).

The model is `--model` (a path, or a bundled model's name), else the bundled default, kinema-tiny. Options left unset
(size, frames, steps, guidance, scheduler) take the model's kinema.json "defaults" when it has them (kinema-tiny:
16 frames at 64x64), else the library's (`LIBRARY_DEFAULTS`); reading them is plain JSON, before any heavy import.

Where the files go (`-o OUT`, see kinema.pipelines.outputs): one seed writes OUT, several write `STEM-seedS.SUFFIX`
beside it (an OUT ending in a path separator, or `.`, is the folder the default names below go in); the final
latents are saved before decoding to `OUT.latents.safetensors` (one file for all seeds), so
`kinema decode` can redo a failed or different decode without sampling again. `extend` saves no latents: its video
is decoded segment by segment. Without `-o`, videos go to `out/`: `out/<prompt words>-seed<S>.mp4` for `generate`
(`out/<video name>-v2v-seed<S>.mp4`, `out/<video name>-extended-seed<S>.mp4`), and `decode` writes
`<latents name>-decoded.mp4` beside the latents file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from kinema.bundled import DEFAULT_MODEL
from kinema.cli.args import (
    add_command,
    add_device_option,
    checked_number,
    example,
    fraction,
    frame_rate,
    non_negative_int,
    output_in,
    output_path,
    positive_int,
    seed_number,
)
from kinema.data.probe import STILL_IMAGE_KINDS
from kinema.errors import KinemaError
from kinema.fileio import slug
from kinema.pipelines.jobs import (
    check_image_file,
    check_model_request,
    check_sparsectrl_falloff,
    model_defaults_for,
)

# The request fields a model's kinema.json "defaults" fill when unset, per command (v2v and extend take their size,
# and extend its frame count, from the input), and the library's values otherwise (plain data, no torch).
from kinema.pipelines.request import (
    BLEND_SETTINGS,
    CONTINUATION_DEFAULTS,
    DEFAULT_FPS,
    DTYPES,
    GENERATE_DEFAULTS,
    INPUT_DEFAULTS,
    LIBRARY_DEFAULTS,
    PIA_MOTION_NAMES,
    QUANTIZATIONS,
    SPEEDS,
    check_image_keyframes,
    check_pia_module,
    image_prompt_keyframes,
    stored_prompt_settings,
)

# Plain data (kinema.sampling.schedulers imports no torch at module level), so --help lists the real names.
from kinema.sampling.prompt_travel import INTERPOLATIONS, parse_prompt_schedule
from kinema.sampling.schedulers import SCHEDULERS, TIMESTEP_SPACINGS

logger = logging.getLogger(__name__)

# kinema.sampling.context imports torch, so its SCHEDULES and FUSE_METHODS are repeated here for the choices;
# tests/cli/test_generate_cli.py checks that the two stay equal.
CONTEXT_SCHEDULES = ("uniform", "static")
FUSE_METHODS = ("flat", "pyramid", "overlap-linear")
DEFAULT_OUTPUT_FOLDER = Path("out")
DEFAULT_SUFFIX = ".mp4"
# A prompt schedule for video-to-video and extend is checked for its form before the input's length is known:
# parsed against a length no keyframe reaches (frame numbers have at most 18 digits), so only the keyframes' syntax
# and order are judged here, and a keyframe past the video is named against its real length later.
_ANY_LENGTH = 10**18
MAX_GIF_FPS = 50

GENERATE_DESCRIPTION = (
    "Make one video per --seed from PROMPT: text to video, or image to video with --image (and --end-image). "
    "PROMPT is text, a prompt schedule as JSON text ({\"0\": \"a cat\", \"16\": \"a dog\"}, or head_prompt / "
    "prompt_map / tail_prompt), or the path of a .json file holding one (a PROMPT ending in .json is read as a "
    "file). Videos longer than the model's window use context windows (--context-*), or on an InP model continue "
    "segment by segment. The final latents are saved to OUT.latents.safetensors before decoding (see `kinema "
    "decode`), except a continuation's, decoded segment by segment; each video's settings go into OUT.json "
    "beside it. With several seeds, OUT names STEM-seedS.SUFFIX files. Without -o: out/<prompt>-seed<S>.mp4. "
    f"Without --model: the bundled {DEFAULT_MODEL}; size, frames, steps, guidance and scheduler left unset come from "
    f"the model's kinema.json defaults ({DEFAULT_MODEL}: 16 frames at 64x64)."
)
MAX_PRINTED_FRAMES = 100_000  # --print-schedule's longest video: an hour at 24 fps, and more
V2V_DESCRIPTION = (
    "Remake VIDEO after PROMPT (SDEdit): its latents are noised by --strength (0 keeps the input, 1 ignores it) "
    "and denoised from there. With --mask, only the mask's white pixels are remade and the rest is held (video "
    "inpainting). The size defaults to the input's. Without -o: out/<video name>-v2v-seed<S>.mp4."
)
EXTEND_DESCRIPTION = (
    "Append --frames frames to VIDEO (or extend it to --to frames in all), segment by segment, each conditioned on "
    "the last --overlap frames of what exists. The prompt defaults to the one stored in VIDEO's settings (kinema's "
    "sidecar or embedded settings). "
    "The output holds the whole video; no latents are saved. Without -o: out/<video name>-extended-seed<S>.mp4."
)
CONFIG_HELP = (
    "run a prompt config instead of PROMPT: AnimateDiff's configs/prompts YAML or an animatediff-cli-prompt-travel "
    "JSON/YAML file (docs/configs.md). Writes one subfolder of videos per prompt into -o OUT_DIR (default "
    "out/<config name>/) and OUT_DIR/config.yaml, the config with the seeds used, which makes the same videos again. "
    "--steps, --frames, --height, --width, --guidance, --scheduler, --fps, --dtype, --tokenizer, --vae, "
    "--motion-scale, --motion-effect, --timestep-spacing and --freeu apply to every entry (and are written into "
    "config.yaml); other options belong in the file"
)
# kinema generate --config: options set for every entry, as the config keys they become.
CONFIG_OVERRIDES = {"steps": "steps", "frames": "L", "height": "H", "width": "W", "guidance": "guidance_scale",
                    "scheduler": "scheduler", "fps": "fps", "dtype": "dtype", "tokenizer": "tokenizer",
                    "vae": "vae_path",
                    "motion_scale": "motion_scale", "motion_effect": "motion_effect",
                    "timestep_spacing": "timestep_spacing", "freeu": "freeu"}
# ... and the options refused with --config (they belong in the file), with their defaults (what "not given" is).
# Every value option's parser default is None, so that one given at its effective default is still seen.
NOT_WITH_CONFIG: dict[str, Any] = {
    "--model": None, "--motion-module": None, "--lora": [], "--ip-adapter": None, "--image-encoder": None,
    "--ip-image": None, "--controlnet": None, "--control-video": None, "--control-indices": None,
    "--control-falloff": None, "--control-loop": False,
    "--control-preprocess": None, "--control-start": None, "--control-end": None, "--guess-mode": False,
    "--pia-motion": None, "--image": None,
    "--end-image": None, "--negative": None,
    "--seed": None, "--free-init": None, "--interpolation": None, "--prompt-hold": None, "--prompt-loop": False,
    "--clip-skip": None,
    "--resize": False, "--vae-tiling": False,
    "--decode-chunk": None, "--attention-chunk": None, "--offload": False, "--context-length": None,
    "--context-overlap": None, "--context-stride": None, "--context-schedule": None, "--closed-loop": False,
    "--fuse": None, "--freenoise": False, "--print-schedule": False, "--speed": None, "--compile": None,
    "--quantize": None, "--cache-interval": None, "--cfg-truncation": None, "--guidance-rescale": None}
# What those options are when not given.
OPTION_DEFAULTS: dict[str, Any] = {"seed": [0], "negative": "", "interpolation": "linear", "decode_chunk": 16,
                                   "prompt_hold": 0.0, "clip_skip": 1}
DECODE_DESCRIPTION = (
    "Decode latents saved by `kinema generate` or `kinema v2v` (OUT.latents.safetensors) with the model's VAE and "
    "write the videos with the settings stored with the latents (their seeds name the files, their fps is the "
    "default). Without -o: <latents name>-decoded.mp4 beside the latents file."
)


# ---------------------------------------------------------------- argument types


def parse_lora(text: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> `(path, weight)`, weight 1.0 when not given. Only the last colon can start a weight, and
    only when what follows it is a number, so Windows drive letters and colons inside a path stay in the path
    (`C:\\loras\\zoom.safetensors:0.8` -> `("C:\\loras\\zoom.safetensors", 0.8)`)."""
    from kinema.pipelines.request import check_lora_weight

    return _path_and_scale(text, "the LoRA weight", check_lora_weight)


def parse_ip_adapter(text: str) -> tuple[str, float]:
    """--ip-adapter `PATH[:SCALE]` -> `(path, scale)`, scale 1.0 when not given (split as `parse_lora` splits)."""
    from kinema.loaders.ip_adapter import check_ip_adapter_scale

    return _path_and_scale(text, "the IP-Adapter scale", check_ip_adapter_scale)


def parse_controlnet(text: str) -> tuple[str, float]:
    """--controlnet `PATH[:SCALE]` -> `(path, scale)`, scale 1.0 when not given (split as `parse_lora` splits)."""
    from kinema.loaders.controlnet import check_controlnet_scale

    return _path_and_scale(text, "the ControlNet scale", check_controlnet_scale)


def _path_and_scale(text: str, what: str, check: Any) -> tuple[str, float]:
    path, scale = _path_and_number(text, what)
    try:
        return path, check(scale)
    except KinemaError as err:
        raise argparse.ArgumentTypeError(f"{err} in {text!r}") from None


def _comma_list(text: str, kind: type, words: str) -> list[Any]:
    """`text` split at commas, each part read as `kind`; argparse's one line (`words`: what was expected) if not."""
    try:
        return [kind(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {words} separated by commas, got {text!r}") from None


def parse_indices(text: str) -> list[int]:
    """--control-indices `0,8,-1` -> `[0, 8, -1]`."""
    return _comma_list(text, int, "whole numbers (e.g. 0,15 or 0,-1)")


def parse_ip_image(text: str) -> str | dict[str, str]:
    """--ip-image `style.png`, or an image prompt schedule as JSON `{"0": "a.png", "16": "b.png"}`."""
    if not text.lstrip().startswith("{"):
        return text
    from kinema.sampling.prompt_travel import schedule_json

    try:
        schedule = schedule_json(text, "image prompt schedule", '{"0": "a.png", "16": "b.png"}')
    except KinemaError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not isinstance(schedule, dict) or not all(isinstance(image, str) and image for image in schedule.values()):
        raise argparse.ArgumentTypeError(f"an image prompt schedule maps frame numbers to image paths, such as "
                                         f"'{{\"0\": \"a.png\", \"16\": \"b.png\"}}', got {text!r}")
    try:
        image_prompt_keyframes(schedule)
    except KinemaError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return schedule


def _ip_images(args: argparse.Namespace) -> list[str]:
    """The image files of --ip-image: one, or a schedule's."""
    given = getattr(args, "ip_image", None)
    return [] if given is None else list(given.values()) if isinstance(given, dict) else [given]


def parse_falloff(text: str) -> list[float]:
    """--control-falloff `0.5,0.4,0.3` -> `[0.5, 0.4, 0.3]`."""
    return _comma_list(text, float, "weights from 0 to 1 (e.g. 0.5,0.4,0.3)")


def _path_and_number(text: str, what: str) -> tuple[str, float]:
    path, weight = text, 1.0
    head, colon, tail = text.rpartition(":")
    if colon:
        try:
            weight, path = float(tail), head
        except ValueError:
            pass
    if not path:
        raise argparse.ArgumentTypeError(f"expected PATH or PATH:WEIGHT, got {text!r}")
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"{what} must be a finite number, got {weight} in {text!r}")
    return path, weight


number = checked_number(float, "a number", math.isfinite, "a finite number")
unit_fraction = checked_number(float, "a number", lambda value: 0 < value <= 1, "a number in (0, 1]")


def freeu_factors(text: str) -> Any:
    """--freeu: "on" (`FreeUSettings()`, Stable Diffusion 1.5's factors) or B1,B2,S1,S2 -> FreeUSettings."""
    from kinema.pipelines.request import FreeUSettings

    if text.strip().lower() == "on":
        return FreeUSettings()
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected on, or four numbers B1,B2,S1,S2 (e.g. 1.5,1.6,0.9,0.2), got "
                                         f"{text!r}")
    try:
        return FreeUSettings(*values)
    except KinemaError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ---------------------------------------------------------------- the commands


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema generate`, `kinema v2v`, `kinema extend` and `kinema decode`."""
    generate = add_command(
        subparsers, "generate", run=run_generate, check=check_generate,
        help="make videos from a prompt (text to video, or image to video with --image)",
        description=GENERATE_DESCRIPTION,
        epilog=example(
            "kinema generate \"a red circle moving right\"",
            "kinema generate \"a red fox running through snow\" --model models/stable-diffusion-v1-5 "
            "--motion-module models/mm_sd_v15_v2.ckpt --frames 16 --seed 1 2 -o out/fox.mp4",
            "kinema generate prompts/day_to_night.json --model models/EasyAnimateV3-XL-2-InP-512x512 --frames 72 "
            "--print-schedule",
            "kinema generate --config configs/prompts/kinema-tiny-animatediff.yaml -o out/shapes",
        ),
    )
    generate.add_argument("prompt", nargs="?", help="text, JSON prompt schedule, or a .json file holding one")
    generate.add_argument("--config", metavar="FILE.yaml", help=CONFIG_HELP)
    _add_model_options(generate)
    _add_size_options(generate, "(default: the model's kinema.json defaults, else 512)")
    generate.add_argument("--frames", type=positive_int,
                          help="frames of each video (default: the model's kinema.json defaults, else 16)")
    generate.add_argument("--image", help="image to video: the first frame (an image file)")
    generate.add_argument("--end-image", help="image to video: the last frame too (needs --image)")
    _add_sampling_options(generate)
    _add_context_options(generate)
    generate.add_argument("--print-schedule", action="store_true",
                          help="print which prompt each frame gets (a prompt schedule's blend per frame), and "
                               "which image prompt for --ip-image {frame: image}, and exit without loading a model")
    _add_output_options(generate, latents=True)

    v2v = add_command(
        subparsers, "v2v", run=run_v2v, check=check_v2v,
        help="remake a video after a prompt (video to video, SDEdit)", description=V2V_DESCRIPTION,
        epilog=example("kinema v2v clips/walk.mp4 \"a robot walking, neon city\" --strength 0.6 --model "
                       "models/stable-diffusion-v1-5 --motion-module models/mm_sd_v15_v2.ckpt -o out/robot.mp4"),
    )
    v2v.add_argument("video", help="the input video (mp4, webm, gif, webp or a folder of frames)")
    v2v.add_argument("prompt", help="text, JSON prompt schedule, or a .json file holding one")
    v2v.add_argument("--strength", type=number, required=True,
                     help="how much of the input is noised away, in (0, 1]: 0.3 keeps its look, 0.8 keeps only its "
                          "layout")
    v2v.add_argument("--mask", metavar="MASK",
                     help="video inpainting: an image (for every frame) or a video of one frame per input frame, "
                          "at the input's size (or --resize); its white pixels are remade and its black ones held, "
                          "so --strength 1 makes the masked part anew; the held pixels come back as they are")
    v2v.add_argument("--mask-blur", type=number, default=0.0, metavar="PX",
                     help="with --mask: feather the mask's edge by a Gaussian blur of this radius in pixels, so the "
                          "remade part blends into the held one (default 0: a hard edge; A1111 uses 4 at 512x512)")
    _add_model_options(v2v)
    _add_size_options(v2v, "(default: the input's)")
    _add_sampling_options(v2v)
    _add_context_options(v2v)
    _add_output_options(v2v, latents=True)

    extend = add_command(
        subparsers, "extend", run=run_extend, check=check_extend,
        help="append frames to a video, segment by segment", description=EXTEND_DESCRIPTION,
        epilog=example("kinema extend out/fox.mp4 --frames 32 --overlap 4 --model models/stable-diffusion-v1-5 "
                       "--motion-module models/mm_sd_v15_v2.ckpt -o out/fox-longer.mp4"),
    )
    extend.add_argument("video", help="the video to continue (mp4, webm, gif, webp or a folder of frames)")
    length = extend.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=positive_int, help="how many frames to append")
    length.add_argument("--to", dest="total_frames", metavar="TOTAL", type=positive_int,
                        help="the length to extend to, in frames: VIDEO's own frames count (--to 256 on a 16-frame "
                             "clip appends 240)")
    extend.add_argument("--prompt", help="text or JSON prompt schedule (default: the prompt in VIDEO's settings)")
    extend.add_argument("--overlap", dest="overlap_frames", metavar="N", type=positive_int,
                        help="frames of the video each new segment is conditioned on (and cross-faded over; default: "
                             "the model's kinema.json defaults, else 4; kinema-tiny-ad: 8)")
    extend.add_argument("--segment-frames", type=positive_int,
                        help="frames generated per segment, overlap included (default: the model's window)")
    _add_model_options(extend, stored_model_default=f"the model VIDEO was made with, as its settings name it, else "
                       f"{DEFAULT_MODEL}")
    _add_size_options(extend, "(default: the input's)")
    _add_sampling_options(extend)
    _add_output_options(extend, latents=False)

    decode = add_command(
        subparsers, "decode", run=run_decode, check=check_decode,
        help="decode saved latents into videos", description=DECODE_DESCRIPTION,
        epilog=example("kinema decode out/fox.mp4.latents.safetensors --model models/stable-diffusion-v1-5 "
                       "--motion-module models/mm_sd_v15_v2.ckpt -o out/fox-frames"),
    )
    decode.add_argument("latents", help="a .latents.safetensors file kinema saved")
    _add_model_options(decode, samples=False, stored_model_default=f"the model the latents were made with, as their "
                       f"settings name it, else {DEFAULT_MODEL}")
    decode.add_argument("-o", "--output", type=output_path,
                        help="video file (.mp4, .webm, .gif, .webp, .png for one frame) or frames folder (no "
                             "extension); default <latents name>-decoded.mp4 (a folder ending in /: inside it)")
    decode.add_argument("--fps", type=frame_rate, help="frames per second (default: the stored settings')")
    decode.add_argument("--overwrite", action="store_true",
                        help="replace earlier kinema outputs at OUT (never files kinema did not write)")


def _add_model_options(parser: argparse.ArgumentParser, *, samples: bool = True,
                       stored_model_default: str | None = None) -> None:
    """The model and its memory options; with `samples` False (decode) only those that change the VAE's decode:
    no LoRA, attention chunks, offload or speed options. `stored_model_default`: --model's default where the
    command takes the model its input's settings name (extend, decode)."""
    group = parser.add_argument_group("model")
    default = stored_model_default or f"{DEFAULT_MODEL}, bundled with kinema; kinema-tiny-ad is the AnimateDiff one"
    group.add_argument("--model", help="Stable Diffusion 1.5 folder or single file, EasyAnimate V3 folder, or a "
                                       f"bundled model's name (default: {default})")
    group.add_argument("--motion-module", help="AnimateDiff motion module file or MotionAdapter folder (SD models)")
    group.add_argument("--tokenizer", help="for an SD1.5 single file, which holds none: an SD1.5 diffusers folder "
                                           "or CLIP tokenizer folder")
    group.add_argument("--vae", metavar="PATH",
                       help="another VAE for an SD model's own: an SD1.x VAE file (e.g. "
                            "vae-ft-mse-840000-ema-pruned.safetensors, original or diffusers names) or an "
                            "AutoencoderKL folder; it encodes the input images and decodes the video")
    if samples:
        group.add_argument("--lora", type=parse_lora, action="append", default=[], metavar="PATH[:W]",
                           help="motion LoRA or SD1.5 image LoRA (AnimateDiff v3's domain adapter is one) at weight W "
                                "(default 1.0; -100 to 100, negative pushes away from it); repeat for several")
        group.add_argument("--ip-adapter", type=parse_ip_adapter, metavar="PATH[:S]",
                           help="IP-Adapter (h94/IP-Adapter's ip-adapter_sd15 and its plus and full-face variants, "
                                "SD models) at scale S (default 1.0): --ip-image then prompts with an image")
        group.add_argument("--image-encoder", metavar="DIR",
                           help="the IP-Adapter's CLIP image encoder folder (default: image_encoder/ beside the "
                                "adapter file, as h94/IP-Adapter's models/ holds it)")
        group.add_argument("--ip-image", type=parse_ip_image, metavar="IMAGE",
                           help="the image prompt of --ip-adapter (any size: CLIP's processor crops it); "
                                "'{\"0\": \"a.png\", \"16\": \"b.png\"}' makes it travel, blended from keyframe to "
                                "keyframe as a prompt schedule is (--interpolation)")
        group.add_argument("--controlnet", type=parse_controlnet, action="append", metavar="PATH[:S]",
                           help="SD1.5 ControlNet (a diffusers folder such as lllyasviel/control_v11p_sd15_openpose, "
                                "or an original single file), or AnimateDiff v3's SparseCtrl "
                                "(v3_sd15_sparsectrl_rgb.ckpt, _scribble.ckpt), at scale S (default 1.0), for SD "
                                "models: --control-video then steers the frames; repeat both for ControlNets that "
                                "steer together")
        group.add_argument("--control-video", action="append", metavar="VIDEO",
                           help="the control images of --controlnet, already made (pose, depth, edge maps; "
                                "SparseCtrl keyframes): a video, animation or folder of frames with one per frame, or "
                                "one image for all (SparseCtrl: for frame 0); sized as the video (or --resize)")
        group.add_argument("--control-preprocess", action="append", metavar="METHOD",
                           help="make the control images from ordinary frames: canny (OpenCV's Canny edges, for canny "
                                "ControlNets; canny:LOW:HIGH for other thresholds than 100:200), tile_resample:RATE "
                                "(the frame at 1/RATE resolution, for the tile ControlNet) or blur:SIGMA (Gaussian), "
                                "invert, or none; one per --controlnet when there are several")
        group.add_argument("--control-indices", type=parse_indices, metavar="I,J,...",
                           help="the frames the control images are keyframes of, one per image (-1: the last; "
                                "default: one image per frame, or SparseCtrl's one image at frame 0); a ControlNet "
                                "then steers only those frames, and their neighbours by --control-falloff")
        group.add_argument("--control-falloff", type=parse_falloff, metavar="W,W,...",
                           help="a ControlNet's keyframes also steer the frames 1, 2, ... away at these weights "
                                "(e.g. 0.5,0.4,0.3,0.2,0.1, prompt travel's control_scale_list; default: keyframes "
                                "only)")
        group.add_argument("--control-loop", action="store_true",
                           help="--control-falloff wraps around the video's ends, for looping videos")
        group.add_argument("--control-start", type=float, metavar="F",
                           help="the share of the steps after which the ControlNet starts steering (default 0)")
        group.add_argument("--control-end", type=float, metavar="F",
                           help="the share of the steps after which it stops (default 1: to the end)")
        group.add_argument("--pia-motion", type=int, choices=range(len(PIA_MOTION_NAMES)), metavar="N",
                           help="PIA image animators (a PIA motion module, with --image): the motion preset, 0-2 "
                                "small / moderate / large motion, 3-5 the same looping back, 6-8 style transfer "
                                "(default 0)")
        group.add_argument("--guess-mode", action="store_true",
                           help="ControlNet's guess mode: the control images lead, so the prompt may be empty "
                                "(guidance 3 to 5 suits it); shuffle ControlNets turn it on themselves")
    else:
        parser.set_defaults(lora=[], ip_adapter=None, image_encoder=None, ip_image=None, controlnet=None,
                            control_video=None, control_indices=None, control_falloff=None, control_loop=False,
                            control_start=None, control_end=None,
                            guess_mode=False, pia_motion=None, control_preprocess=None)
    add_device_option(group)
    group.add_argument("--dtype", choices=DTYPES, help="precision of every model (default float32)")
    group.add_argument("--vae-tiling", action="store_true", help="decode (and encode) in spatial tiles")
    group.add_argument("--decode-chunk", type=positive_int,
                       help="frames per VAE call (SD VAE; default 16)")
    if not samples:
        return
    group.add_argument("--attention-chunk", type=positive_int,
                       help="run the motion modules' attention over this many sequences (pixel positions) at a "
                            "time: less memory for long clips, same result; spatial attention is not chunked")
    group.add_argument("--offload", action="store_true", help="keep each model on the CPU until its stage runs")

    group = parser.add_argument_group("speed (docs/speed.md)")
    group.add_argument("--speed", choices=SPEEDS,
                       help="a preset of the options below and of --scheduler, --steps and --dtype, for those not "
                            "given: fast (DPM++ 2M Karras, 10 steps, bfloat16 where native, else int8 on CPU, step "
                            "cache 2, guidance on the first 60%% of steps), balanced (15 steps, guidance on 80%%) or "
                            "quality (the model's own settings); printed with the run")
    group.add_argument("--compile", action="store_true", default=None,
                       help="torch.compile the video model (cached on disk: only the first run of a size pays)")
    group.add_argument("--quantize", choices=QUANTIZATIONS,
                       help="int8: dynamic int8 quantisation of the video model's Linear layers")
    group.add_argument("--cache-interval", type=positive_int, metavar="N",
                       help="step caching: recompute the model's deep features every N steps, reuse them between "
                            "(1: off)")
    group.add_argument("--cfg-truncation", type=unit_fraction, metavar="F",
                       help="stop classifier-free guidance after this fraction of the steps (0 < F <= 1); the rest "
                            "run the conditional half only")


def _add_size_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--height", type=positive_int, help=f"height in pixels, a multiple of 8 {default}")
    parser.add_argument("--width", type=positive_int, help=f"width in pixels, a multiple of 8 {default}")
    parser.add_argument("--resize", action="store_true",
                        help="resize input images / video to height x width instead of refusing another size")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--steps", type=positive_int,
                       help="denoising steps (default: the model's kinema.json defaults, else 25)")
    group.add_argument("--guidance", type=number,
                       help="classifier-free guidance scale, >= 1 (1 turns it off; default: the model's kinema.json "
                            "defaults, else 7.5)")
    group.add_argument("--guidance-rescale", type=fraction, metavar="F",
                       help="rescale the guided prediction towards the conditional one's spread by this share (0 to "
                            "1; diffusers' guidance_rescale): against the washed-out, over-saturated look of strong "
                            "guidance, above all on v-prediction models (0.7 there; default 0: off)")
    group.add_argument("--seed", type=seed_number, nargs="+", metavar="N",
                       help="one video per seed (default 0)")
    group.add_argument("--scheduler", choices=list(SCHEDULERS),
                       help="sampler (default: the model's kinema.json defaults, else the model family's)")
    group.add_argument("--negative", help="negative prompt (default none)")
    group.add_argument("--free-init", type=positive_int, metavar="N",
                       help="FreeInit: sample N times in all, each run after the first from the last one's low "
                            "frequencies (N times the time; 1 is plain sampling)")
    group.add_argument("--interpolation", choices=INTERPOLATIONS,
                       help="how a prompt schedule blends between keyframes (default linear)")
    group.add_argument("--prompt-hold", type=float, metavar="F",
                       help="a prompt schedule holds each keyframe's prompt for this share of the way to the next "
                            "before blending, 0 to 1 (prompt travel's prompt_fixed_ratio; default 0)")
    group.add_argument("--prompt-loop", action="store_true",
                       help="a prompt schedule is circular: after the last keyframe it blends back to the first, "
                            "for looping videos (as prompt travel's schedules do)")
    group.add_argument("--clip-skip", type=positive_int, metavar="N",
                       help="the CLIP layer the text comes from, counted from the end: 2 for models trained on the "
                            "layer before the last (A1111's and prompt travel's clip skip; default 1, the last; "
                            "AnimateDiff models)")
    group.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS,
                       help="where the sampling steps fall among the training steps (default: the scheduler's "
                            "own); trailing for few-step distilled models, e.g. AnimateDiff-Lightning with "
                            "--scheduler euler --steps 4 --guidance 1")
    group.add_argument("--motion-scale", type=number, metavar="F",
                       help="factor on the motion modules' attention keys, as ComfyUI-AnimateDiff's motion scale: "
                            "above 1 sharper attention over frames, below 1 smoother (default 1: as trained)")
    group.add_argument("--motion-effect", type=number, metavar="F",
                       help="factor on what the motion modules add, as ComfyUI-AnimateDiff's effect: 0 makes each "
                            "frame its own picture, 0.5 half the motion (default 1: as trained)")
    group.add_argument("--freeu", type=freeu_factors, metavar="on|B1,B2,S1,S2",
                       help="FreeU, for AnimateDiff (UNet) models: B1, B2 multiply half the backbone features of the "
                            "two deepest up blocks, S1, S2 the low frequencies of their skip features; on: Stable "
                            "Diffusion 1.5's factors, 1.5,1.6,0.9,0.2 (default off)")


def _add_context_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("context windows (videos longer than the model's window)")
    group.add_argument("--context-length", type=positive_int, help="frames per window (default 16)")
    group.add_argument("--context-overlap", type=non_negative_int, help="frames shared by neighbouring windows "
                                                                        "(default 4)")
    group.add_argument("--context-stride", type=positive_int, help="uniform schedule: window spacings 1, 2, ... "
                                                                   "2^(n-1) (default 1)")
    group.add_argument("--context-schedule", choices=CONTEXT_SCHEDULES,
                       help="uniform (windows shift every step) or static (default uniform)")
    group.add_argument("--closed-loop", action="store_true", help="windows wrap around: a looping video")
    group.add_argument("--fuse", choices=FUSE_METHODS, help="how overlapping windows are averaged (default flat)")
    group.add_argument("--freenoise", action="store_true", help="FreeNoise: start from noise shuffled across windows")


def _add_output_options(parser: argparse.ArgumentParser, *, latents: bool) -> None:
    saved = " and OUT.latents.safetensors" if latents else ""
    group = parser.add_argument_group("output")
    group.add_argument("-o", "--output", type=output_path,
                       help="video file (.mp4, .webm, .gif, .webp, .png for one frame) or frames folder (no "
                            "extension); several seeds write STEM-seedS.SUFFIX beside it. A folder ending in / "
                            "(or .) gets the default name inside it")
    group.add_argument("--fps", type=frame_rate, help="frames per second (default 8; v2v and extend: the input "
                                                      "video's)")
    group.add_argument("--overwrite", action="store_true",
                       help=f"replace earlier kinema outputs at OUT{saved} (never files kinema did not write)")


# ---------------------------------------------------------------- prompts and names


def read_prompt(text: str) -> str | dict[str, Any]:
    """PROMPT as the request takes it: plain text as is; JSON text (starting with "{") or the contents of a file
    named `*.json` (a schedule object, or a JSON string for a plain prompt) as the parsed value."""
    import json

    from kinema.fileio import read_json

    stripped = text.strip()
    if stripped.startswith("{"):
        from kinema.sampling.prompt_travel import parse_prompt_schedule

        parse_prompt_schedule(stripped, _ANY_LENGTH)  # its one-line errors for bad JSON and repeated keys
        return json.loads(stripped)
    if stripped.lower().endswith(".json"):
        if os.path.isdir(stripped):
            raise KinemaError(f"the prompt file {stripped} is a folder; give a .json file holding a prompt schedule")
        if not os.path.isfile(stripped):
            raise KinemaError(f"no such prompt file: {stripped} (a PROMPT ending in .json is read as a prompt "
                              "schedule file)")
        value = read_json(stripped, "a prompt schedule")
        if isinstance(value, (str, dict)):
            return value
        raise KinemaError(f"{stripped} holds {type(value).__name__}, not a prompt schedule: write an object like "
                          "{\"0\": \"a cat\", \"16\": \"a dog\"} or a string")
    return text


def _first_prompt(prompt: str | dict[str, Any]) -> str:
    """The prompt the default file name is made of: the text, or a schedule's first prompt."""
    if isinstance(prompt, str):
        return prompt
    values = prompt.get("prompt_map", prompt)
    first = next(iter(values.values()), "") if isinstance(values, dict) else ""
    return first if isinstance(first, str) else ""


def default_output(name: str, seeds: list[int]) -> Path:
    """`out/NAME-seedS.mp4` for one seed; `out/NAME.mp4` for several (each video then gets its `-seedS`)."""
    tail = f"-seed{seeds[0]}" if len(seeds) == 1 else ""
    return DEFAULT_OUTPUT_FOLDER / f"{name}{tail}{DEFAULT_SUFFIX}"


# ---------------------------------------------------------------- checks (no torch)


def _require_path(path: str | None, what: str) -> None:
    if path is not None and not os.path.lexists(path):
        raise KinemaError(f"no such {what}: {path}")


def _require_weights(path: str | None, what: str, scaled: bool = False) -> None:
    """A weights option names a path that exists and, for a file, holds weights as its first bytes tell (a text
    file, an image or an archive named .safetensors is refused here, torch-free, rather than once torch has loaded
    it); what kind of weights is the loader's to say. `scaled`: given as PATH[:WEIGHT]."""
    from kinema.sniff import sniff

    head, colon, tail = (path or "").rpartition(":")
    if scaled and colon and not os.path.lexists(path or "") and os.path.lexists(head):
        # PATH:WEIGHT whose weight is no number was read as one path, and refused as a missing file
        raise KinemaError(f"{tail!r} after {head}: is not a number; give the {what} as PATH or PATH:WEIGHT with a "
                          "number (e.g. :0.8)")
    _require_path(path, what)
    if path is not None and os.path.isfile(path):
        found = sniff(path)
        if not found.is_weights:
            raise KinemaError(f"the {what} {found.diagnosis}")


def _check_image(path: str | None, what: str) -> tuple[int, int] | None:
    """An image option names an image file PIL can read; its `(width, height)` (None: no image given)."""
    _require_path(path, what)
    if path is None:
        return None
    if os.path.isdir(path):
        raise KinemaError(f"the {what} {path} is a folder; give an image file ({STILL_IMAGE_KINDS})")
    return check_image_file(path, what)


def _check_input_size(args: argparse.Namespace, size: tuple[int, int] | None, what: str,
                      folder: Path | None = None) -> None:
    """An input of frames (a start or end image, a control video) of `size` (width, height) is at the video's size
    unless --resize: refused here, before the model loads, where generate() would refuse it only after. `folder`:
    the model, whose sizes the fix offered is one of."""
    from kinema.pipelines.jobs import model_shape, size_multiple_below

    if size is None or args.resize:
        return
    width, height = size
    # Unset by the options and the model's kinema.json: generate() takes the library's size.
    video = (args.height or LIBRARY_DEFAULTS["height"], args.width or LIBRARY_DEFAULTS["width"])
    if (height, width) != video:
        shape = None if folder is None else model_shape(folder)
        makes_it = shape is None or size_multiple_below(height, width, shape.size_multiple) == (height, width)
        # With an input video (v2v), the video's size is the input's: --width/--height would not match it either;
        # nor would a size the model cannot make.
        other = f"give a {what} of {video[1]}x{video[0]}" if getattr(args, "video", None) is not None or \
            not makes_it else f"set --width {width} --height {height}"
        raise KinemaError(f"the {what} is {width}x{height} but the video is {video[1]}x{video[0]}; pass --resize to "
                          f"resize it, or {other}")


def _check_model(args: argparse.Namespace, defaults: tuple[str, ...] = ()) -> Path:
    """The model (`--model`, or the bundled default) exists as a path or a bundled name, and so do the other model
    files; options among `defaults` left unset take the model's kinema.json defaults. Returns the model's path."""
    if args.model is None:
        args.model = DEFAULT_MODEL
    _apply_speed(args)
    # `kinema generate` has no --overlap, but continues past the model's window with the model's overlap.
    unset = [key for key in defaults + CONTINUATION_DEFAULTS if getattr(args, key, None) is None]
    folder, found = model_defaults_for(args.model, unset, f"no such model file or folder: {args.model}")
    for key, value in found.items():
        setattr(args, key, value)
    _require_weights(args.motion_module, "motion module")
    _require_path(args.tokenizer, "tokenizer")
    _require_weights(args.vae, "VAE")
    for path, _ in args.lora:
        _require_weights(path, "LoRA file", scaled=True)
    if args.ip_adapter is not None:
        from kinema.loaders.ip_adapter import image_encoder_folder

        _require_weights(args.ip_adapter[0], "IP-Adapter file", scaled=True)
        if _may_be_ip_adapter(args.ip_adapter[0]):  # else the load names what it is, not its missing encoder
            image_encoder_folder(args.ip_adapter[0], args.image_encoder)
    elif args.image_encoder is not None:
        raise KinemaError("--image-encoder is the CLIP image encoder of an IP-Adapter: give --ip-adapter too")
    if (args.ip_image is None) != (args.ip_adapter is None):
        raise KinemaError("--ip-adapter and --ip-image come together (the adapter conditions on the image prompt): "
                          "give both, or neither")
    for image in _ip_images(args):
        _check_image(image, "image prompt")
    for path, _ in args.controlnet or []:
        _require_weights(path, "ControlNet", scaled=True)
    if len(args.control_video or []) != len(args.controlnet or []):
        raise KinemaError("--controlnet and --control-video come together (the ControlNet steers by the control "
                          "images): give one --control-video per --controlnet, in their order, or neither")
    for video in args.control_video or []:
        _require_path(video, "control video")
    return folder


def _may_be_ip_adapter(path: str) -> bool:
    """False for a folder or a safetensors file without IP-Adapter tensors (`image_proj.*`), told torch-free from
    its header; True otherwise (a pickle is told once it is read)."""
    from kinema.loaders.ip_adapter import IMAGE_PROJ
    from kinema.sniff import Kind, sniff

    if Path(path).is_dir():
        return False
    found = sniff(path)
    return found.kind is not Kind.SAFETENSORS or any(name.startswith(IMAGE_PROJ) for name in found.names)


def _check_control_frames(args: argparse.Namespace, frames: int, input_video: bool = False) -> None:
    """--control-video holds one image per frame of the `frames` made (an `input_video`'s, remade frame for frame),
    or one for all, at the video's size unless --resize (torch-free reads)."""
    from kinema.data.probe import frame_count, video_size
    from kinema.pipelines.control_maps import preprocessors_for
    from kinema.pipelines.request import check_control_falloff, control_places

    check_control_falloff(args.control_falloff, args.control_loop, args.control_indices is not None)
    check_image_keyframes(getattr(args, "ip_image", None), frames,
                          "give a longer input video" if input_video else "make more frames (--frames)")
    check_sparsectrl_falloff([path for path, _ in args.controlnet or []], args.control_falloff)
    if args.control_preprocess is not None:  # names, their count, and OpenCV for Canny
        preprocessors_for(_one_or_list(args.control_preprocess), max(len(args.controlnet or []), 1))

    for video in args.control_video or []:
        have = frame_count(video, "control video")
        fix = f"an input video of {have} frames" if input_video else f"make {have} frames (--frames {have})"
        control_places(have, frames, args.control_indices, what=f"the control video {video}", fix=fix)
        height, width = video_size(video, "control video")
        _check_input_size(args, (width, height), "control video")


def _check_model_takes(args: argparse.Namespace, folder: Path, frames: int | None = None,
                       input_video: bool = False) -> None:
    """What the model folder cannot take, from its configs read once (`check_model_request`): the frame count, the
    size, a context window or segment past its window, and a motion module, LoRA, tokenizer, FreeU or VAE given
    with an EasyAnimate model."""
    if getattr(args, "size_of_input", False):
        _check_input_video_size(folder, args.height, args.width)
    check_model_request(folder, frames=frames, height=getattr(args, "height", None), width=getattr(args, "width", None),
                        motion_module=args.motion_module, loras=args.lora, tokenizer=args.tokenizer,
                        input_video=input_video, freeu=getattr(args, "freeu", None) is not None,
                        ip_adapter=args.ip_adapter, controlnet=args.controlnet,
                        clip_skip=getattr(args, "clip_skip", None) or 1, vae=args.vae,
                        # Any --context-* option makes windows, of ContextSettings' defaults where not given
                        # (decode has none).
                        context=_context(args) if hasattr(args, "context_length") else None,
                        segment_frames=getattr(args, "segment_frames", None),
                        overlap_frames=getattr(args, "overlap_frames", None) if hasattr(args, "segment_frames")
                        else None)  # extend's: continuation segments


def _check_frames_fit(args: argparse.Namespace, frames: int, fewer: str) -> None:
    """Videos whose finished frames alone outgrow the free memory, refused before the model loads (generate()
    refuses them too, once it has); `fewer`: the command's way to fewer frames."""
    from kinema.memory import check_frames_fit

    height, width = (args.height or LIBRARY_DEFAULTS["height"], args.width or LIBRARY_DEFAULTS["width"])
    check_frames_fit(len(args.seed), frames, height, width, f"{fewer}, a smaller --width and --height, or fewer seeds")


def _check_input_video_size(folder: Path, height: int, width: int) -> None:
    """An input video (the size of the video made) whose size the model cannot make: refused with the size it can
    make nearest below, which --resize takes the input to."""
    from kinema.pipelines.jobs import model_shape, size_multiple_below

    shape = model_shape(folder)
    if shape is None:
        return
    near_height, near_width = size_multiple_below(height, width, shape.size_multiple)
    if (near_height, near_width) != (height, width):
        raise KinemaError(f"the input video is {width}x{height}, and the model makes sizes in multiples of "
                          f"{shape.size_multiple} ({shape.why}): add --width {near_width} --height {near_height} "
                          "--resize to resize it to the nearest size below")


def _apply_speed(args: argparse.Namespace) -> None:
    """--speed: the preset's settings for the options left unset (given ones win), and the line that says so."""
    args.speed_line = None
    if getattr(args, "speed", None) is None:
        return
    from kinema.devices import resolve_device
    from kinema.pipelines.speed import CPU_WITHOUT_BFLOAT16, SPEED_PRESETS, chosen_settings, describe_speed

    settings = {key for preset in (SPEED_PRESETS, CPU_WITHOUT_BFLOAT16) for values in preset.values() for key in values}
    given = {key: getattr(args, key) for key in settings if getattr(args, key) is not None}
    try:
        device = resolve_device(args.device)
    except KinemaError:  # a device this machine lacks: the run refuses it before loading, as it does without --speed
        return
    chosen = chosen_settings(args.speed, given, device)  # bfloat16 where the device has it
    for key, value in chosen.items():
        setattr(args, key, value)
    args.speed_line = describe_speed(args.speed, chosen)


def _context(args: argparse.Namespace) -> Any:
    """ContextSettings when any --context-* / --closed-loop / --fuse / --freenoise option is given, else None
    (the pipeline then uses windows only past the model's limit)."""
    from kinema.pipelines.request import ContextSettings

    given = {"length": args.context_length, "overlap": args.context_overlap, "stride": args.context_stride,
             "schedule": args.context_schedule, "fuse": args.fuse,
             "closed_loop": args.closed_loop or None, "freenoise": args.freenoise or None}
    chosen = {key: value for key, value in given.items() if value is not None}
    return ContextSettings(**chosen) if chosen else None


def _one_or_list(given: list[Any] | None) -> Any:
    """A repeatable option's values as the request and model take them: one value alone, several as a list."""
    if given is None:
        return None
    return given[0] if len(given) == 1 else list(given)


def _request(args: argparse.Namespace, **fields: Any) -> Any:
    """The GenerationRequest of the options every generating command shares, plus `fields`."""
    from kinema.pipelines.request import FreeInitSettings, GenerationRequest

    free_init = None if args.free_init is None else FreeInitSettings(iterations=args.free_init)
    shared: dict[str, Any] = dict(
        negative_prompt=args.negative, scheduler=args.scheduler,
        seeds=list(args.seed), resize=args.resize, interpolation=args.interpolation, free_init=free_init,
        prompt_hold=args.prompt_hold, prompt_loop=args.prompt_loop, clip_skip=args.clip_skip,
        timestep_spacing=args.timestep_spacing, freeu=args.freeu, ip_image=args.ip_image,
        control_video=_one_or_list(args.control_video), control_indices=args.control_indices,
        control_falloff=args.control_falloff, control_loop=args.control_loop,
        control_preprocess=_one_or_list(args.control_preprocess),
        guess_mode=args.guess_mode, pia_motion=args.pia_motion, dtype=args.dtype, vae_tiling=args.vae_tiling,
        decode_chunk=args.decode_chunk,
        attention_chunk=args.attention_chunk, offload=args.offload, compile=bool(args.compile),
        quantize=args.quantize, cache_interval=args.cache_interval, cfg_truncation=args.cfg_truncation,
        guidance_rescale=args.guidance_rescale, speed=args.speed)
    # Options unset, and not in the model's defaults either, take the request's.
    for key in ("height", "width", "steps", "guidance", "fps", "overlap_frames", "motion_scale", "motion_effect",
                "control_start", "control_end"):
        if getattr(args, key, None) is not None:
            shared[key] = getattr(args, key)
    return GenerationRequest(**{**shared, **fields}).with_defaults()


def _check_not_inside_an_output(path: Path) -> None:
    """One KinemaError line when `path` goes inside a folder kinema wrote with a manifest of its files (a frames
    folder, a synth dataset, an export): a video written there would make the folder hold files kinema did not
    write, which its own --overwrite then refuses."""
    from kinema.fileio import MANIFEST, kind_words, output_kind

    for folder in Path(os.path.abspath(path)).parents:
        kind = output_kind(folder) if (folder / MANIFEST).is_file() else None
        if kind is not None:
            raise KinemaError(f"{path} is inside {folder}, an earlier kinema {kind_words(kind)} whose files kinema "
                              "lists; a video written there would make it hold files kinema did not write: write it "
                              "elsewhere")


def _check_outputs(args: argparse.Namespace, default: Path, frames: int | None, inputs: tuple[str, ...],
                   latents: bool) -> None:
    """Settle OUT (its default when -o is not given) and refuse, before any work, whatever the output policy
    would refuse: each video, its sidecar and, for `latents`, the latents file. A latents file kinema saved beside
    videos not all written (a run stopped while decoding) is resumed instead (`args.resume`): generate() checks it
    is this run's, and the videos of that run are written again."""
    from kinema.fileio import check_output
    from kinema.pipelines.outputs import check_video_outputs, latents_path, video_paths

    args.output = output_in(args.output, default)
    _check_not_inside_an_output(args.output)
    fps = getattr(args, "fps", None) or DEFAULT_FPS
    if args.output.suffix.lower() == ".gif" and fps > MAX_GIF_FPS:
        raise KinemaError(f"a GIF keeps frame delays in hundredths of a second and players slow any under 2 to a "
                          f"tenth of a second, so it plays at most {MAX_GIF_FPS} fps, not {fps:g}; write .mp4, .webm "
                          "or .webp, or lower --fps")
    args.resume = None
    paths = video_paths(args.output, args.seed)
    saved = latents_path(args.output)
    stored = _kinema_latents(saved) if latents and not args.overwrite else None
    if stored is not None and not all(path.exists() for path in paths):
        _check_resumable(args, saved, stored)
        args.resume = saved
        # Replacing kinema's own videos of this run, still never a file kinema did not write.
        check_video_outputs(paths, overwrite=True, frames=frames, inputs=inputs)
        return
    check_video_outputs(paths, overwrite=args.overwrite, frames=frames, inputs=inputs)
    if latents:
        check_output(saved, "latents", folder=False, overwrite=args.overwrite, inputs=inputs)


def _not_resumable(path: Path, why: str) -> KinemaError:
    """The refusal of saved latents that are not this run's, with the two ways on."""
    return KinemaError(f"{path}: {why}; pass --overwrite to sample anew and replace it, or `kinema decode {path}` "
                       "(with the same --model, --motion-module and --vae) for its own videos")


def _check_resumable(args: argparse.Namespace, saved: Path, stored: list[dict[str, Any]]) -> None:
    """Before any model loads: the seeds and settings this run was given (those the model does not fill) against
    those `stored` with the latents at `saved`; generate() checks every setting again once they are filled."""
    from kinema.bundled import is_bundled_name, resolve_model
    from kinema.pipelines.outputs import differing_settings
    from kinema.pipelines.request import changed_since_saved, input_digests

    # As the run records its model: a bundled one by name, a folder or file by absolute path.
    model = args.model if is_bundled_name(args.model) else os.path.abspath(resolve_model(args.model))
    given = {**args.request.settings(), "model": model}
    # What the command line (with the model's kinema.json defaults) says; the rest (sizes from an input, guess mode)
    # the input or the model may fill, checked once they are filled.
    # An input video's frames are its own (the request holds the library's default until generate() reads it).
    frames = ("frames",) if args.request.video is None else ()
    differ = differing_settings([{**given, "seed": seed} for seed in args.seed], stored,
                                keys=(*frames, "seed", "model", "prompt", "negative_prompt", "steps", "guidance",
                                      "scheduler", "height", "width", "dtype",
                                      "fps", "strength", "image", "end_image", "video", "mask", "mask_blur",
                                      "ip_image", "control_video", "interpolation", "prompt_hold", "prompt_loop",
                                      "clip_skip", "guidance_rescale", "cfg_truncation", "motion_scale",
                                      "motion_effect", "timestep_spacing", "free_init", "freeu", "context"))
    if differ:
        raise _not_resumable(saved, f"the saved latents are another run's: their settings differ in "
                                    f"{', '.join(differ)}")
    changed = changed_since_saved(input_digests(args.request), stored)
    if changed:
        raise _not_resumable(saved, f"the saved latents were made from another {changed[0]}: the file changed "
                                    "since they were saved")


def _kinema_latents(path: Path) -> list[dict[str, Any]] | None:
    """The settings stored with the latents kinema saved at `path` (read from the header); None for anything else
    (the output checks then refuse what kinema did not write). Latents kinema saved whose header is damaged are
    refused here, as nothing to resume from."""
    from kinema.fileio import output_kind
    from kinema.pipelines.outputs import LATENTS_KIND, read_latents_settings

    try:
        return read_latents_settings(path)
    except KinemaError as err:
        if output_kind(path) == LATENTS_KIND:
            raise KinemaError(f"{err} (pass --overwrite to replace it)") from None
        return None


def _check_config(args: argparse.Namespace) -> None:
    """`kinema generate --config`: the whole config read and checked, and the output folder, before any model
    loads; options other than CONFIG_OVERRIDES belong in the file."""
    from kinema.pipelines.prompt_configs import check_config_output, read_config

    if args.prompt is not None:
        raise KinemaError("give PROMPT or --config, not both (a config file holds its prompts)")
    given = [option for option, default in NOT_WITH_CONFIG.items()
             if getattr(args, option.removeprefix("--").replace("-", "_")) != default]
    if given == ["--print-schedule"]:
        raise KinemaError("--print-schedule shows one PROMPT's schedule; it cannot be combined with --config")
    if given:
        raise KinemaError(f"{given[0]} cannot be combined with --config; set it in the config file where it has a "
                          "key (docs/configs.md lists them), or run without --config")
    # Values as the file would hold them: FreeU's factors as a mapping.
    overrides = {key: vars(value) if key == "freeu" else value for option, key in CONFIG_OVERRIDES.items()
                 if (value := getattr(args, option)) is not None}
    args.config_run = read_config(args.config, overrides=overrides)
    args.output = Path(args.output) if args.output is not None else DEFAULT_OUTPUT_FOLDER / slug(Path(args.config).stem)
    if args.output.suffix:
        raise KinemaError(f"with --config, -o names a folder (one subfolder per prompt), not {args.output.name}")
    check_config_output(args.output, overwrite=args.overwrite)


def _fill_option_defaults(args: argparse.Namespace) -> None:
    """The effective defaults of the options whose parser default is None (see NOT_WITH_CONFIG)."""
    for name, value in OPTION_DEFAULTS.items():
        if getattr(args, name, "absent") is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)


def _schedule(args: argparse.Namespace, frames: int | None = None) -> Any:
    """The prompt schedule of the options (`PromptSchedule`) over `frames` (default --frames), checked: its
    keyframes, hold and loop."""
    return parse_prompt_schedule(args.prompt, frames or args.frames, args.interpolation, args.prompt_hold,
                                 args.prompt_loop)


def _image_schedule(args: argparse.Namespace) -> Any:
    """The image prompt schedule of --ip-image {frame: image} as a `PromptSchedule` of the images' paths, blended as
    the prompts are (`VideoFamily.image_prompt_frames`); None for one image or none."""
    from kinema.sampling.prompt_travel import PromptSchedule

    keyframes = image_prompt_keyframes(getattr(args, "ip_image", None))
    if keyframes is None:
        return None
    check_image_keyframes(args.ip_image, args.frames, "make more frames (--frames)")
    return PromptSchedule(tuple((frame, str(image)) for frame, image in keyframes), args.interpolation,
                          args.prompt_hold, args.prompt_loop)


def check_generate(args: argparse.Namespace) -> None:
    """Bad usage of `kinema generate`, refused before any heavy import."""
    if args.config is not None:
        _check_config(args)
        return
    _fill_option_defaults(args)
    if args.prompt is None:
        raise KinemaError("give a PROMPT (or a prompt config with --config FILE.yaml)")
    args.prompt = read_prompt(args.prompt)
    if args.print_schedule:  # no model is read: --frames or the library's default
        args.frames = args.frames or LIBRARY_DEFAULTS["frames"]
        if args.frames > MAX_PRINTED_FRAMES:  # the blend is worked out frame by frame
            raise KinemaError(f"--print-schedule works out the blend of every frame, and --frames {args.frames} is "
                              f"past the {MAX_PRINTED_FRAMES} it prints; give fewer frames")
        _schedule(args)
        _image_schedule(args)
        return
    if args.end_image is not None and args.image is None:
        raise KinemaError("--end-image needs --image (the first frame) too")
    sizes = _check_image(args.image, "image"), _check_image(args.end_image, "end image")
    model = _check_model(args, GENERATE_DEFAULTS)
    args.frames = args.frames or LIBRARY_DEFAULTS["frames"]
    _check_model_takes(args, model, args.frames)
    _check_frames_fit(args, args.frames, "ask for fewer --frames")
    _check_input_size(args, sizes[0], "start image", model)
    _check_input_size(args, sizes[1], "end image", model)
    _check_control_frames(args, args.frames)
    args.request = _request(args, prompt=args.prompt, frames=args.frames, image=args.image,
                            end_image=args.end_image, context=_context(args))
    args.request.check()
    check_pia_module(args.motion_module, args.request)
    if not isinstance(args.prompt, str):
        _schedule(args)
    inputs = tuple(path for path in (args.image, args.end_image, *_ip_images(args), *(args.control_video or []))
                   if path is not None)
    _check_outputs(args, default_output(slug(_first_prompt(args.prompt)), args.seed), args.frames, inputs,
                   latents=True)


def _check_video_input(args: argparse.Namespace) -> int:
    """VIDEO's frame count; its size fills --height / --width and its frame rate --fps where they are not given
    (torch-free reads), so the frames kept or remade play at the input's speed."""
    from kinema.data.probe import frame_count, video_fps, video_size

    if not os.path.exists(args.video):
        raise KinemaError(f"no such video: {args.video}")
    frames = frame_count(args.video)
    height, width = video_size(args.video)
    asked = (args.height or height, args.width or width)
    if asked != (height, width) and not args.resize:
        raise KinemaError(f"the input video is {width}x{height} but --width/--height ask for {asked[1]}x{asked[0]}; "
                          "add --resize to resize it to that size, or drop --width and --height")
    # Taken from the input: a size the model cannot make is the input's, which only --resize changes.
    args.size_of_input = asked == (height, width) and (args.height is None or args.width is None)
    args.height, args.width = asked
    if args.fps is None:
        args.fps = video_fps(args.video)
    return frames


def check_v2v(args: argparse.Namespace) -> None:
    """Bad usage of `kinema v2v`, refused before any heavy import."""
    _fill_option_defaults(args)
    frames = _check_video_input(args)
    args.prompt = read_prompt(args.prompt)
    _check_model_takes(args, _check_model(args, INPUT_DEFAULTS), frames, input_video=True)
    _check_frames_fit(args, frames, "give a shorter input video")
    _check_control_frames(args, frames, input_video=True)
    if args.mask is not None:
        from kinema.pipelines.request import check_mask_file

        _require_path(args.mask, "mask")
        height, width = check_mask_file(args.mask, frames)
        _check_input_size(args, (width, height), "mask")
    args.request = _request(args, prompt=args.prompt, video=args.video, strength=args.strength, mask=args.mask,
                            mask_blur=args.mask_blur, context=_context(args))
    args.request.check()
    check_pia_module(args.motion_module, args.request)
    _check_outputs(args, default_output(slug(Path(args.video).stem) + "-v2v", args.seed), frames,
                   tuple(path for path in (args.video, args.mask, *_ip_images(args), *(args.control_video or []))
                         if path is not None),
                   latents=True)


def check_extend(args: argparse.Namespace) -> None:
    """Bad usage of `kinema extend`, refused before any heavy import."""
    from kinema.data.probe import stored_settings
    from kinema.pipelines.request import check_video_holds_overlap

    blend_given = [key for key in BLEND_SETTINGS if getattr(args, key, None) not in (None, False)]
    if args.negative is not None:
        blend_given.append("negative_prompt")
    _fill_option_defaults(args)
    have = _check_video_input(args)
    if args.prompt is not None:
        args.prompt = read_prompt(args.prompt)
    args.stored_settings = stored_settings(args.video)
    if args.model is None:  # continued alike: with the model that made it, as its settings name it
        _take_stored_model(args, args.stored_settings, continued=True)
    _check_model_takes(args, _check_model(args, INPUT_DEFAULTS))
    extend_frames = args.frames if args.total_frames is None else _frames_to_append(args.video, args.total_frames,
                                                                                      have)
    _check_frames_fit(args, have + extend_frames, "append fewer frames (--frames, --to)")
    _inherit_prompt(args, blend_given, have + extend_frames)
    args.request = _request(args, prompt=args.prompt or "", video=args.video, extend_frames=extend_frames,
                            segment_frames=args.segment_frames)
    args.request.check()
    check_pia_module(args.motion_module, args.request)
    check_video_holds_overlap(have, args.request.with_defaults().overlap_frames or 0)
    _check_outputs(args, default_output(slug(Path(args.video).stem) + "-extended", args.seed), None, (args.video,),
                   latents=False)


def _inherit_prompt(args: argparse.Namespace, blend_given: list[str], total: int) -> None:
    """Without --prompt, the prompt stored with the video (and how its schedule blended, where the options do not
    say: `stored_prompt_settings`); the schedule and an image prompt schedule checked against the `total` frames of
    the whole video, over which they run (keyframes numbered in it)."""
    own = stored_prompt_settings(args.stored_settings, blend_given) if args.prompt is None else {}
    if args.prompt is None and not own:
        raise KinemaError(f"{args.video} holds no prompt kinema can read (no settings kinema stored with it); pass "
                          "--prompt TEXT, or --prompt '' to continue it without one")
    inherited = bool(own)
    for key, value in own.items():
        setattr(args, "negative" if key == "negative_prompt" else key, value)
    if isinstance(args.prompt, dict):
        try:
            _schedule(args, total)
        except KinemaError as err:
            where = f"the prompt stored with {args.video}" if inherited else "the prompt schedule"
            raise KinemaError(f"{where} runs over the whole video's {total} frames: {err}") from None
    check_image_keyframes(getattr(args, "ip_image", None), total, "append more frames (--frames or --to)")


def _frames_to_append(video: str, total: int, have: int) -> int:
    """How many frames `kinema extend --to TOTAL` appends to `video` of `have` frames; a KinemaError when it is
    already that long."""
    if total <= have:
        raise KinemaError(f"{video} already has {have} frames, so --to {total} appends nothing; give --to more than "
                          f"{have}, or --frames N to append N frames")
    return total - have


def check_decode(args: argparse.Namespace) -> None:
    """Bad usage of `kinema decode`: the latents file is not kinema's, no model, or outputs the policy refuses."""
    _fill_option_defaults(args)
    from kinema.pipelines.jobs import model_shape
    from kinema.pipelines.outputs import LATENTS_SUFFIX, another_familys_latents, read_latents_settings
    from kinema.pipelines.request import MAX_FPS, MIN_FPS

    settings = read_latents_settings(args.latents)
    if args.model is None:
        _take_stored_model(args, settings[0])
    folder = _check_model(args)
    _check_model_takes(args, folder)
    shape = model_shape(folder)
    refusal = None if shape is None or not settings else another_familys_latents(settings[0], args.model, shape.family)
    if refusal is not None:  # from the model's configs: its weights need not load to tell
        raise refusal
    stored_fps = next((entry.get("fps") for entry in settings if entry.get("fps") is not None), None)
    if args.fps is None and stored_fps is not None and (isinstance(stored_fps, bool) or not isinstance(
            stored_fps, int | float) or not MIN_FPS <= stored_fps <= MAX_FPS):
        raise KinemaError(f"the settings saved with {args.latents} give fps {stored_fps!r}, which is no frame rate; "
                          "pass --fps")
    args.seed = [entry.get("seed") for entry in settings]
    if len(args.seed) > 1 and not all(isinstance(seed, int) for seed in args.seed):
        raise KinemaError(f"{args.latents} holds several videos but not an integer seed for each to name their files "
                          f"({args.seed}); save the latents again with kinema")
    latents = Path(args.latents)
    name = latents.name.removesuffix(LATENTS_SUFFIX) if latents.name.endswith(LATENTS_SUFFIX) else latents.stem
    base = Path(name)
    default = latents.with_name(f"{base.stem}-decoded{base.suffix or DEFAULT_SUFFIX}")
    frames = {entry.get("frames") for entry in settings}  # a .png output holds one frame: refused before decoding
    known = frames.pop() if len(frames) == 1 else None
    _check_outputs(args, default, known if isinstance(known, int) else None, (args.latents,), latents=False)


def _another_model(subject: str, made_by: str, now: str, purpose: str) -> str:
    """The warning that an input made by the model `made_by` is used with another (`now`), with the fix where that
    model is still here."""
    from kinema.bundled import is_bundled_name

    if is_bundled_name(made_by) or os.path.exists(made_by):
        return f"{subject} by {made_by} and {now}: pass --model {made_by} (or no --model) {purpose}"
    return f"{subject} by {made_by}, which is not here any more, and {now}"


def _take_stored_model(args: argparse.Namespace, recorded: dict[str, Any], continued: bool = False) -> None:
    """decode and extend without --model: the model (and motion module and VAE, unless given; an extended video's
    LoRAs, unless --lora is) that made the latents or video, as their settings `recorded` name them, where it is
    still here; else the default model."""
    from kinema.pipelines.jobs import stored_model_parts, warn_continued_without

    parts = stored_model_parts(recorded, continued=continued)
    if continued:
        given = ["loras"] * bool(args.lora) + ["ip_adapter"] * (args.ip_adapter is not None)
        warn_continued_without(recorded, parts, given,
                               {"loras": "--lora", "ip_adapter": "--ip-adapter and --ip-image"})
    for key, value in parts.items():
        if key == "loras":
            if not args.lora:
                args.lora = [(entry["path"], entry.get("weight", 1.0)) for entry in value]
        elif getattr(args, key) is None:
            setattr(args, key, value)


# ---------------------------------------------------------------- running


def _load(args: argparse.Namespace) -> Any:
    """The model on --device; with --offload, in CPU memory, each part moved to the device for its own stage."""
    from kinema.devices import resolve_device
    from kinema.pipelines.load import load_family

    device = resolve_device(args.device)
    if getattr(args, "quantize", None) is not None:
        from kinema.models.optimize import check_int8_device

        check_int8_device(args.quantize, device)
    offload = getattr(args, "offload", False) and device.type != "cpu"
    family = load_family(args.model, motion_module=args.motion_module, loras=args.lora,
                         dtype=args.dtype or "float32", device="cpu" if offload else device, tokenizer=args.tokenizer,
                         ip_adapter=args.ip_adapter, image_encoder=args.image_encoder,
                         controlnet=_one_or_list(args.controlnet), vae=args.vae)
    if offload:
        family.offload_device = device
    return family


def _print_summary(paths: list[Path], report: dict[str, Any], latents: Path | None) -> None:
    from kinema.errors import count_words
    from kinema.memory import memory_words

    for path in paths:
        print(f"wrote {path}: {count_words(report.get('frames') or 0, 'frame')} in {report.get('seconds', 0):.1f} s on "
              f"{report.get('device', 'cpu')}, {report.get('dtype')}, peak memory "
              f"{memory_words(report.get('peak_memory_bytes'))}")
    if latents is not None:
        print(f"saved latents to {latents} (`kinema decode` decodes them again)")


def _generate_and_write(args: argparse.Namespace, request: Any, latents: bool) -> None:
    """Load the model, generate (saving the final latents first when `latents`), write and summarise."""
    from kinema.pipelines.generation import NotThisRun, generate
    from kinema.pipelines.outputs import (
        latents_path,
        remove_replaced_videos,
        save_latents,
        video_paths,
        write_result,
    )

    if getattr(args, "speed_line", None):
        print(args.speed_line)
    resume = None
    if getattr(args, "resume", None) is not None:  # read (and their digest checked) before the model loads
        from kinema.pipelines.outputs import load_latents

        try:
            resume = load_latents(args.resume)
        except KinemaError as err:
            raise KinemaError(f"{err} (or pass --overwrite to sample anew and replace it)") from None
        print(f"resuming: {args.resume} holds the final latents of a run stopped before writing its videos; they "
              "are decoded, not sampled again (--overwrite samples anew)", file=sys.stderr)
    family = _load(args)
    saved: list[Path] = []
    target = latents_path(args.output)

    def keep_latents(final: Any, settings: list[dict[str, Any]]) -> None:
        saved.append(save_latents(final, settings, target, overwrite=args.overwrite))
        if args.overwrite:  # no videos of the replaced run beside these latents, should this one stop before its own
            remove_replaced_videos(video_paths(args.output, args.seed))

    try:
        try:
            result = generate(family, request, progress=not args.quiet,
                              on_latents=keep_latents if latents else None, resume=resume)
        except NotThisRun as err:
            raise _not_resumable(args.resume, str(err)) from None
        paths = write_result(result, args.output, fps=request.fps, overwrite=args.overwrite or resume is not None)
    except BaseException:  # stopped or failed after sampling: what was kept, and how to finish without sampling
        if saved:
            again = "the same command without --overwrite" if args.overwrite else "the same command again"
            print(f"the final latents are kept in {saved[0]}: {again} writes its videos without sampling again (or "
                  f"`kinema decode {saved[0]}`, under the decoded videos' own names)", file=sys.stderr)
        raise
    _print_summary(paths, result.report, saved[0] if saved else None)


def run_generate(args: argparse.Namespace) -> None:
    """Run a prompt config (--config), print the prompt schedule (--print-schedule), or generate and write the
    videos and latents."""
    if args.config is not None:
        from kinema.pipelines.jobs import FamilyCache
        from kinema.pipelines.prompt_configs import CONFIG_FILE, run_config

        cache = FamilyCache(max_models=1, device=args.device)
        for path in run_config(args.config_run, args.output, cache=cache, overwrite=args.overwrite,
                               progress=not args.quiet):
            print(f"wrote {path}")
        print(f"wrote {args.output / CONFIG_FILE}: the config with the seeds used (run it again for the same videos)")
        return
    if args.print_schedule:
        from kinema.sampling.prompt_travel import schedule_table

        print(schedule_table(_schedule(args), args.frames))
        images = _image_schedule(args)
        if images is not None:
            print("image prompt:")
            print(schedule_table(images, args.frames))
        return
    _generate_and_write(args, args.request, latents=True)


def run_v2v(args: argparse.Namespace) -> None:
    """Remake the video and write the results and latents."""
    _generate_and_write(args, args.request, latents=True)


def run_extend(args: argparse.Namespace) -> None:
    """Continue the video (with the prompt stored in its settings unless --prompt, as check_extend set it) and write
    the results."""
    from kinema.bundled import is_bundled_name

    stored = args.stored_settings
    model = args.model if is_bundled_name(args.model) else os.path.abspath(args.model)  # as a run records it
    if isinstance(stored.get("model"), str) and stored["model"] != model:
        logger.warning("%s", _another_model(f"{args.video} was made", stored["model"], f"is continued by {model}",
                                            "to continue it alike"))
    given = None if args.vae is None else os.path.abspath(args.vae)
    if stored.get("vae") is not None and stored["vae"] != given:  # its frames are re-encoded for the held ones
        logger.warning("%s was made with the VAE %s and is continued with %s: pass --vae %s to continue it alike",
                       args.video, stored["vae"], "the model's own" if given is None else given, stored["vae"])
    _generate_and_write(args, args.request, latents=False)


def run_decode(args: argparse.Namespace) -> None:
    """Decode the saved latents and write each video with its stored settings."""
    import time

    from kinema.memory import peak_memory_bytes, reset_peak_memory
    from kinema.pipelines.generation import GenerationResult, decode_saved, set_vae_options
    from kinema.pipelines.outputs import load_latents, write_result

    latents, settings = load_latents(args.latents)
    family = _load(args)
    # The videos record the VAE that decodes them, which may not be the one the latents were made with.
    used = family.settings().get("vae")

    def named(vae: str | None) -> str:
        return "the model's own" if vae is None else vae

    decoder = family.settings()
    made_by = sorted({str(entry["model"]) for entry in settings if entry.get("model") is not None} -
                     {decoder["model"]})
    if made_by:
        logger.warning("%s", _another_model("these latents were made", made_by[0], f"are decoded by {decoder['model']}",
                                            "for the frames that run made"))
    made_with = sorted({entry.get("vae") for entry in settings} - {used}, key=str)
    if made_with:
        logger.warning("these latents were made with %s VAE and are decoded with %s: pass %s for the frames that run "
                       "made", " and ".join(map(named, made_with)), named(used),
                       "no --vae" if made_with == [None] else f"--vae {made_with[0]}")
    for entry in settings:  # freshly read: each video records the VAE that decodes it
        entry.pop("vae", None)
        if used is not None:
            entry["vae"] = used
    set_vae_options(family, vae_tiling=args.vae_tiling, decode_chunk=args.decode_chunk)
    device = next(family.model.parameters()).device
    reset_peak_memory(device)
    began = time.perf_counter()
    frames = decode_saved(family, latents, settings).cpu()
    report = {"mode": "decode", "family": family.family, "device": str(device), "dtype": args.dtype or "float32",
              "seconds": round(time.perf_counter() - began, 3), "peak_memory_bytes": peak_memory_bytes(device),
              "frames": frames.shape[1], "latents": os.path.abspath(args.latents), "vae_tiling": args.vae_tiling,
              "decode_chunk": args.decode_chunk,
              "decoder": decoder}  # the settings are the run's that made the latents; this model decoded them
    fps = args.fps or next((entry["fps"] for entry in settings if entry.get("fps")), 8.0)
    if args.fps is not None:  # the settings say what the video plays at
        settings = [{**entry, "fps": args.fps} for entry in settings]
    # ... and how it was decoded (DECODE_SETTINGS: the sampling settings above are the latents' run's, dtype too).
    settings = [{**entry, "vae_tiling": args.vae_tiling, "decode_chunk": args.decode_chunk} for entry in settings]
    result = GenerationResult(frames, latents, settings, report)
    paths = write_result(result, args.output, fps=fps, overwrite=args.overwrite)
    _print_summary(paths, report, None)
