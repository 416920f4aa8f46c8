"""Load, describe and convert EasyAnimate V3 transformers, strictly by their own key names.

A V3 `transformer/` folder holds config.json and an fp32 `diffusion_pytorch_model.safetensors` (or shards named by
its index) that also stores the motion modules' frame encodings as `pos_encoder.pe` buffers. kinema's `VideoDiT`
uses V3's parameter names, so the key map is the identity; the `pe` buffers are checked against the encoding kinema
computes on the fly, then dropped. Anything missing, extra or mis-shaped stops the load. Whole model folders (T5,
CLIP, VAE) are folder.py's.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from kinema.errors import KinemaError
from kinema.fileio import atomic_folder, read_json_object
from kinema.loaders.animatediff.keys import check_frame_table, with_pe_tables
from kinema.loaders.checkpoint_io import WeightFiles, dtype_report, find_weights, iter_safetensors
from kinema.loaders.easyanimate.config import (
    V3_INPAINT_CHANNELS,
    easyanimate_config_from_video_dit,
    video_dit_config_from_easyanimate,
)
from kinema.models.motion import motion_max_frames
from kinema.models.video_dit import VideoDiT
from kinema.state_dicts import check_fits, load_strict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Frame-encoding buffers stored by V3's motion attentions; kinema recomputes them.
PE_BUFFER = re.compile(r"^(?P<attention>.*\.attn_temporal\..*\.attention_blocks\.\d+)\.pos_encoder\.pe$")
PE_ATOL = 1e-3
Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype name), as WeightFiles.header


def transformer_folder(path: str | os.PathLike) -> Path:
    """The transformer folder of a V3 model root (its `transformer/`) or the transformer folder itself."""
    path = Path(path)
    if (path / "transformer" / CONFIG_NAME).is_file():
        return path / "transformer"
    if (path / CONFIG_NAME).is_file():
        return path
    raise KinemaError(f"{path} has no {CONFIG_NAME} (nor transformer/{CONFIG_NAME}); point at an EasyAnimate model "
                      "folder or its transformer/ subfolder")


def read_transformer_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The transformer folder's config.json as it is written (V3's or kinema's fields)."""
    return read_json_object(Path(folder) / CONFIG_NAME, "the transformer's config")


def transformer_weights(folder: Path) -> WeightFiles:
    """A transformer folder's safetensors weights: one file, or the shards its index names (all checked present).
    Names and shapes are read from their headers before any tensor, so a .bin is refused."""
    weights = find_weights(folder, suffixes=(".safetensors", ".bin"))
    if weights.files[0].suffix != ".safetensors":
        found = sorted(p.name for p in folder.iterdir())
        raise KinemaError(f"{folder} has no {WEIGHTS_NAME}; it holds {found[:8]}. kinema reads safetensors only: "
                          "convert a .bin checkpoint to safetensors first")
    return weights


def _config_folder(path: Path) -> Path:
    """The folder holding the transformer's config.json: a model root's `transformer/`, a transformer folder, or
    the folder of one weights file."""
    if not path.is_file():
        return transformer_folder(path)
    if not (path.parent / CONFIG_NAME).is_file():
        raise KinemaError(f"{path} has no {CONFIG_NAME} beside it, and kinema builds the transformer from it: put "
                          f"the transformer's {CONFIG_NAME} next to the file, or load the folder it came from")
    return path.parent


def looks_like(names: set[str]) -> str:
    """A few words on what a checkpoint with these tensor names probably is, for error messages."""
    if any(".attn_temporal." in name for name in names):
        blocks = {name.split(".")[1] for name in names if name.startswith("transformer_blocks.")}
        return f"an EasyAnimate V3-style video DiT with {len(blocks)} blocks"
    if "adaln_single.linear.weight" in names:
        return "a PixArt-alpha image DiT without motion modules (inflate it with VideoDiT.from_image_dit)"
    if any(".motion_modules." in name for name in names):
        return "an AnimateDiff motion module or UNet (use kinema's AnimateDiff loader)"
    if any(name.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for name in names):
        return "a VAE"
    if any("text_embedder" in name or "time_extra_emb" in name for name in names):
        return "an EasyAnimate V4/V5 transformer (Hunyuan-DiT or MMDiT), which kinema does not load"
    return "no checkpoint kinema recognises"


def _mismatch_context(source: str) -> str:
    return f"{source} does not match the video DiT its config describes"


def check_video_dit_keys(model: VideoDiT, header: Header, source: str) -> set[str]:
    """Compare a file's tensor names/shapes with the model's; return the `pe` buffer names to check and drop.

    Raises one KinemaError naming the first missing, unexpected and mis-shaped keys and what the file looks like.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # Each motion attention may carry a (1, max_frames, C) encoding buffer.
    max_frames = {f"{name}.": motion_max_frames(module) for name, module in model.motion_modules()}
    pe_shapes = {}
    for name, shape in expected.items():
        if ".attn_temporal." in name and ".attention_blocks." in name and name.endswith(".to_q.weight"):
            frames = next(frames for module, frames in max_frames.items() if name.startswith(module))
            pe_shapes[name.removesuffix(".to_q.weight")] = (1, frames, shape[1])
    pe_attentions = {name: match["attention"] for name in header
                     if (match := PE_BUFFER.match(name)) and match["attention"] in pe_shapes}
    wanted = {**expected, **{name: pe_shapes[attention] for name, attention in pe_attentions.items()}}
    check_fits(wanted, {name: shape for name, (shape, _) in header.items()}, _mismatch_context(source),
               advice=f"The file has {len(header)} tensors and looks like {looks_like(set(header))}")
    return set(pe_attentions)


def load_video_dit(
    path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    mmap: bool = False,
) -> VideoDiT:
    """Load an EasyAnimate V3 transformer (or a kinema-saved VideoDiT) strictly.

    `path`: the model root, its `transformer/` folder (one weights file or index + shards), or one safetensors file
    with the config.json beside it. The V3 config is translated by `video_dit_config_from_easyanimate`; stored
    `pos_encoder.pe` buffers `(1, max_frames, C)` are checked and dropped. `dtype` casts the weights (default: as
    stored). The weights are read into memory; `mmap=True` leaves uncast CPU weights as views of the memory-mapped
    file instead (less memory, but the first forward pass then pages the whole file in, several times slower).
    Returns the model in eval mode.
    """
    path = Path(path)
    folder = _config_folder(path)
    kwargs = video_dit_config_from_easyanimate(read_transformer_config(folder))
    weights = WeightFiles(folder, (path,)) if path.is_file() else transformer_weights(folder)
    header = weights.header()
    with init_empty_weights():
        model = VideoDiT(**kwargs)
    source = f"transformer weights in {folder}"
    pe_names = check_video_dit_keys(model, header, source)

    state = {}
    for file in weights.files:
        for name, tensor in iter_safetensors(file, device):
            if name in pe_names:
                try:
                    check_frame_table(name, tensor, PE_ATOL)
                except KinemaError as err:
                    raise KinemaError(f"{source}: {err}") from None
                continue
            state[name] = tensor.to(dtype or tensor.dtype, copy=not mmap)
    load_strict(model, state, _mismatch_context(source), assign=True)
    return model.to(device).eval()


def _describable(path: Path) -> tuple[Path, WeightFiles] | None:
    """The config folder and safetensors weights `describe_easyanimate` reads at `path`; None when there are none
    (a weights file of another type, a folder without diffusers weights)."""
    if path.is_file():  # known by its bytes, as every other kind is: a safetensors file named .ckpt is one
        from kinema.sniff import Kind, sniff

        return (path.parent, WeightFiles(path.parent, (path,))) if sniff(path).kind is Kind.SAFETENSORS else None
    if not path.is_dir():
        return None
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    weights = find_weights(folder, suffixes=(".safetensors",), missing_ok=True)
    if weights is None and folder != path and (folder / CONFIG_NAME).is_file():
        # A model folder whose transformer has a config and no safetensors weights (a partial download, a .bin):
        # said here, where the other entries would take it for its vae/ alone.
        transformer_weights(folder)
    return None if weights is None else (folder, weights)


def describe_easyanimate(path: str | os.PathLike) -> dict[str, Any] | None:
    """What `kinema inspect` prints for an EasyAnimate V3 folder or transformer file; None if it is not one.

    Reads config.json (when present) and the safetensors headers (one file, or every shard an index names) only,
    never tensor data. With a config, every tensor name and shape is checked against the VideoDiT it builds
    (`check_video_dit_keys`, as a load does).
    """
    found = _describable(Path(path))
    if found is None:
        return None
    folder, weights = found
    header = weights.header()
    if "adaln_single.linear.weight" not in header or not any(".attn_temporal." in n for n in header):
        return None
    config = read_transformer_config(folder) if (folder / CONFIG_NAME).is_file() else {}
    if folder != Path(path) and (Path(path) / "text_encoder").is_dir():
        # A whole V3 folder: its T5 shards, which the load would miss only after the transformer, are all there.
        find_weights(Path(path) / "text_encoder", stems=("model", "pytorch_model"), variants=("fp16", None),
                     missing_ok=True)
    if config:  # every name and shape against the model the config builds, on the meta device (no memory)
        with init_empty_weights():
            model = VideoDiT(**video_dit_config_from_easyanimate(config))
        check_video_dit_keys(model, header, f"transformer weights in {folder}")
    pe = {name: shape for name, (shape, _) in header.items() if PE_BUFFER.match(name)}
    params = {name: shape for name, (shape, _) in header.items() if name not in pe}
    width, in_channels, patch, _ = params["pos_embed.proj.weight"]
    pe_length = next(iter(pe.values()))[1] if pe else _pe_length_from_config(config)
    return {
        "kind": "easyanimate_transformer",
        "format": "easyanimate-v3",
        "layout": "kinema" if config.get("_class_name") == VideoDiT.__name__ else "original",
        "path": str(weights.index or weights.files[0]),
        "variant": "InP" if in_channels == V3_INPAINT_CHANNELS else "T2V",
        "blocks": len({name.split(".")[1] for name in params if name.startswith("transformer_blocks.")}),
        "width": width,
        "in_channels": in_channels,
        "out_channels": params["proj_out.weight"][0] // (patch * patch),
        "skips": len({name.split(".")[1] for name in params if name.startswith("long_connect_fc.")}),
        "keys": len(header),
        "parameters": sum(math.prod(shape) for shape in params.values()),
        "pe_buffers": len(pe),
        "dtype": dtype_report(dtype for _, dtype in header.values()),
        "pe_length": pe_length,
        **({} if config else {"not_checked": f"no {CONFIG_NAME} beside the file, so its names and shapes were "
                                              "not checked against a model"}),
    }


def convert_easyanimate_transformer(
    source: str | os.PathLike, target: str | os.PathLike, to: str, *, overwrite: bool = False
) -> tuple[Path, list[str]]:
    """Rewrite an EasyAnimate transformer folder as `original` (V3's config.json and names, with the `pe` frame
    tables it stores) or `kinema` (`VideoDiT.save_pretrained`: kinema's config, no tables). Weights are copied
    exactly. Only the transformer is written; the other parts of a model folder are used as they are. `target`
    follows kinema's output policy: `overwrite` replaces only an earlier kinema transformer, never `source`."""
    model = load_video_dit(source)
    notes = []
    if Path(source, "transformer").is_dir():
        notes.append(f"only the transformer was converted; {source}'s other folders (vae/, text_encoder/, ...) "
                     "are used as they are")
    with atomic_folder(target, "easyanimate_transformer", overwrite=overwrite, inputs=(source,)) as folder:
        if to == "kinema":
            model.save_pretrained(folder)
            return Path(target), notes
        config = easyanimate_config_from_video_dit(dict(model.config))
        lengths = {spec["max_frames"] for spec in model.config["motion_modules"]}
        if len(lengths) != 1:
            raise KinemaError(f"V3 gives every motion module one frame-encoding length; this model has {lengths}")
        # V3 keeps its frame tables in float32 whatever the weights' dtype, and EasyAnimate reads them as they are.
        state = with_pe_tables(model.state_dict(), "original", lengths.pop(), table_dtype=torch.float32)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME))
    return Path(target), notes


def _pe_length_from_config(config: dict[str, Any]) -> int | None:
    """Frame-encoding length of the first motion module, read through the one V3/kinema config translation;
    None when the folder has no config.json."""
    if not config:
        return None
    return video_dit_config_from_easyanimate(config)["motion_modules"][0].get("max_frames")
