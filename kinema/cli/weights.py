"""`kinema inspect` and `kinema convert`: what a weights file or model folder is, and the same weights in another
layout. Both go through the loaders' front door (`kinema.loaders`: `describe`, `convert`)."""

from __future__ import annotations

import argparse
import logging
import os

from kinema.cli.args import add_command, checked_number, example, positive_int, seed_number
from kinema.errors import KinemaError

# The format registry is plain data (it imports no torch), so `--to` lists exactly what the loaders convert to.
from kinema.loaders.formats import CONVERT_LAYOUTS

logger = logging.getLogger(__name__)

INSPECT_DESCRIPTION = (
    "Recognise an AnimateDiff motion module (file or diffusers MotionAdapter folder), a motion LoRA, an EasyAnimate "
    "V3 folder, transformer or Slice VAE, a Stable Diffusion 1.5 folder or single file, an image LoRA, an IP-Adapter, "
    "a ControlNet or SparseCtrl, or an SD VAE, check every tensor name "
    "and shape against its layout, and print its format, version, key and parameter counts (buffers excluded), "
    "frame-encoding length, dtype, mid block and channels. Reads tensors only; pickles that need code are refused. "
    "A .safetensors file's header is read, not its values: NaN or infinity in them is refused when it loads."
)
CONVERT_DESCRIPTION = (
    "Convert an AnimateDiff motion module between layouts: `original` (.ckpt or .safetensors with the published "
    "names and pos_encoder.pe tables), `diffusers` (a MotionAdapter folder) and `kinema` (.safetensors with its "
    "motion settings in the metadata).\n"
    "Convert a motion LoRA between `original` (processor.to_q_lora.down/up), `diffusers` (what diffusers' "
    "conversion script writes), `diffusers_peft` (lora_A/lora_B, what `load_lora_weights` reads) and `kinema`.\n"
    "Convert an EasyAnimate V3 transformer folder between `original` (V3's config.json and names, with its stored "
    "frame tables) and `kinema` (VideoDiT's config, no tables). Weights are copied exactly."
)
CONVERT_EXAMPLES = (
    "kinema convert models/mm_sd_v15_v2.ckpt models/mm_sd_v15_v2_diffusers --to diffusers",
    "kinema convert models/v2_lora_ZoomIn.ckpt models/zoom_in_peft.safetensors --to diffusers_peft",
    "kinema convert models/EasyAnimateV3-XL-2-InP-512x512 models/v3_kinema_transformer --to kinema",
)


INIT_DESCRIPTION = (
    "Write the untrained starting folder of one of kinema's own models (the first step of the bundled models' "
    "recipe, docs/bundled.md): kinema-tiny (EasyAnimate V3 family: transformer/ and Slice VAE vae/) or "
    "kinema-tiny-ad (AnimateDiff family: unet/, vae/, scheduler/), each with a kinema.json naming its text encoder "
    "(all-MiniLM-L6-v2). Every weight is drawn from --seed; --vae puts a trained VAE (a stage's final/vae) in place "
    "of the fresh one. `kinema train` trains the folder."
)


def add(subparsers: argparse._SubParsersAction) -> None:
    """Register `kinema inspect`, `kinema convert` and `kinema init-model`."""
    inspect = add_command(subparsers, "inspect", run=run_inspect, check=check_inspect,
                          help="say what a weights file or model folder is (format, version, keys, parameters, frames)",
                          description=INSPECT_DESCRIPTION,
                          epilog=example("kinema inspect models/mm_sd_v15_v2.ckpt --json"))
    inspect.add_argument("path", help="weights file, model folder or a bundled model's name (kinema-tiny)")
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")
    inspect.add_argument("--model", metavar="MODEL",
                         help="check a ControlNet, SparseCtrl or motion module against this SD model's UNet, and a "
                              "VAE against its VAE (a folder, or a bundled model's name), instead of Stable "
                              "Diffusion 1.5's")

    convert = add_command(subparsers, "convert", run=run_convert, check=check_convert,
                          help="rewrite a motion module, motion LoRA or EasyAnimate transformer in another layout, "
                               "weights unchanged",
                          description=CONVERT_DESCRIPTION, epilog=example(*CONVERT_EXAMPLES))
    convert.add_argument("input", help="motion-module or motion-LoRA file, MotionAdapter folder or EasyAnimate folder")
    convert.add_argument("output", help="file to write (.safetensors/.ckpt) or, for a MotionAdapter or an EasyAnimate "
                                        "transformer, a folder")
    convert.add_argument("--to", required=True, choices=CONVERT_LAYOUTS, help="target layout")
    convert.add_argument("--overwrite", action="store_true", help="replace an earlier kinema output at OUTPUT "
                         "(never a file or folder kinema did not write)")

    init = add_command(subparsers, "init-model", run=run_init_model, check=check_init_model,
                       help="write the untrained starting folder of kinema-tiny or kinema-tiny-ad, for `kinema train`",
                       description=INIT_DESCRIPTION,
                       epilog=example("kinema init-model kinema-tiny --out runs/kinema-tiny/init",
                                      "kinema init-model kinema-tiny --vae runs/kinema-tiny/vae/final/vae "
                                      "--out runs/kinema-tiny/dit-start",
                                      "kinema init-model kinema-tiny --vae runs/kinema-tiny/vae/final/vae "
                                      "--patch-size 1 --heads 8 --out runs/kinema-tiny/dit-p1-start"))
    init.add_argument("name", choices=("kinema-tiny", "kinema-tiny-ad"), help="which model")
    init.add_argument("--out", required=True, help="folder to create (new or empty)")
    init.add_argument("--seed", type=seed_number, default=0, help="seed of the initial weights (default 0)")
    init.add_argument("--vae", help="a trained VAE folder to use instead of a fresh one")
    init.add_argument("--scale-data", metavar="DATA", help="with --vae: a dataset folder to measure the latents' "
                      "scaling factor on (1 / their std over its first 64 videos)")
    init.add_argument("--overwrite", action="store_true", help="replace an earlier init-model folder at OUT")
    size = init.add_argument_group("kinema-tiny's DiT size (default: the shipped 6 layers of 4 heads, patch 2)")
    # Bounds past which a fresh model would not fit a machine's memory (48 blocks of 32 heads: 0.6 B parameters).
    size.add_argument("--layers", type=checked_number(int, "a whole number", lambda n: 2 <= n <= 48, "from 2 to 48"),
                      help="transformer blocks (temporal and hybrid in turn), 2 to 48")
    size.add_argument("--heads", type=checked_number(int, "a whole number", lambda n: 1 <= n <= 32, "from 1 to 32"),
                      help="attention heads, each 32 wide: the model is 32 x HEADS wide, 1 to 32")
    size.add_argument("--patch-size", type=positive_int, choices=(1, 2, 4),
                      help="latent pixels per token side: 1 gives 4x the tokens of 2, for finer detail")
    image_vae = init.add_argument_group("kinema-tiny-ad's image VAE (default: the shipped 8x)")
    image_vae.add_argument("--vae-downsample", type=positive_int, choices=(4, 8),
                           help="how many times the fresh VAE shrinks each side: 4 gives 16x16 latents at 64x64 "
                                "for finer shapes, at about 3x the UNet's step time")


def check_inspect(args: argparse.Namespace) -> None:
    """Bad usage: the path (or --model) does not exist and is no bundled model's name, or --model has no UNet."""
    from kinema.bundled import is_bundled_name, resolve_model

    if not os.path.lexists(args.path) and not is_bundled_name(args.path):
        raise KinemaError(f"no such file or folder: {args.path}")
    args.unet_config = args.vae_config = None
    if args.model is not None:
        from kinema.pipelines.load import unet_config_of

        model = resolve_model(args.model, f"no such model file or folder: {args.model}")
        if not (model / "unet" / "config.json").is_file():
            raise KinemaError(f"--model {args.model} is not a Stable Diffusion diffusers folder (no unet/config.json): "
                              "give one, or an AnimateDiff model's such as kinema-tiny-ad; a single file's UNet is "
                              "SD1.5's, which is the default")
        args.unet_config = unet_config_of(model)
        if (model / "vae" / "config.json").is_file():
            args.vae_config = unet_config_of(model, part="vae")


# What `inspect --model` checks against the model: a motion module's widths here; the others are read with its UNet's
# or VAE's config (a single file's own config is SD1.5's), which refuses one that does not fit.
CHECKED_AGAINST_MODEL = ("motion_module", "controlnet", "sparsectrl", "image_vae")


def run_inspect(args: argparse.Namespace) -> None:
    """Print what the path holds (checked against --model's UNet and VAE when given)."""
    from kinema.bundled import resolve_model
    from kinema.cli.output import print_report
    from kinema.loaders.source import Source, describe_source

    if args.unet_config is None:
        from kinema.loaders import describe

        print_report(describe(args.path), args.json)
        return
    report = describe_source(Source(resolve_model(args.path), {"unet_config": args.unet_config,
                                                               "vae_config": args.vae_config}))
    widths = list(args.unet_config.get("block_out_channels", ()))
    if report.get("kind") not in CHECKED_AGAINST_MODEL:
        logger.warning("--model checks motion modules, ControlNets, SparseCtrl encoders and VAEs against the "
                       "model; %s is a %s, not checked against %s (`kinema generate` with both checks it whole)",
                       args.path, str(report.get("kind", "file")).replace("_", " "), args.model)
        print_report(report, args.json)
        return
    if report["kind"] == "motion_module" and report.get("channels") != widths:
        raise KinemaError(f"{args.path} is made for a UNet of widths {tuple(report['channels'])}, but {args.model}'s "
                          f"UNet has widths {tuple(widths)}: use a motion module made for this base model")
    print_report({**report, "checked_against": args.model}, args.json)


def check_convert(args: argparse.Namespace) -> None:
    """Bad usage: the input does not exist, or the output is not new (nor, with --overwrite, kinema's own)."""
    from kinema.fileio import check_output

    if not os.path.lexists(args.input):
        raise KinemaError(f"no such file or folder: {args.input}")
    check_output(args.output, None, folder=None, overwrite=args.overwrite, inputs=(args.input,))


def run_convert(args: argparse.Namespace) -> None:
    """Convert, then name what was written and print the converter's notes."""
    from kinema.loaders import convert

    out, notes = convert(args.input, args.output, args.to, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to} layout)")
    for note in notes:
        print(f"note: {note}")


def check_init_model(args: argparse.Namespace) -> None:
    """Bad usage: the VAE folder is missing, or OUT is not new (nor, with --overwrite, kinema's own)."""
    from kinema.fileio import check_output
    from kinema.models.initial import check_size, check_vae_folder

    if args.vae is not None:
        check_vae_folder(args.name, args.vae)
    if args.scale_data is not None and args.vae is None:
        raise KinemaError("--scale-data measures a trained VAE's latents: give --vae too")
    check_size(args.name, _size(args), trained_vae=args.vae is not None)
    check_output(args.out, "model", folder=True, overwrite=args.overwrite,
                 inputs=tuple(path for path in (args.vae, args.scale_data) if path is not None))


def run_init_model(args: argparse.Namespace) -> None:
    """Write the folder and say where."""
    from kinema.models.initial import write_initial_model

    out = write_initial_model(args.name, args.out, seed=args.seed, vae=args.vae, scale_data=args.scale_data,
                              overwrite=args.overwrite, size=_size(args))
    print(f"wrote the untrained {args.name} to {out} (seed {args.seed})")


def _size(args: argparse.Namespace) -> dict[str, int | None]:
    """The size options as `check_size` takes them (None: not given, the shipped value)."""
    return {"layers": args.layers, "heads": args.heads, "patch_size": args.patch_size,
            "vae_downsample": args.vae_downsample}
