"""Load EasyAnimate V3 model folders: the transformer strictly by its own key names, plus T5, CLIP and the VAE.

A V3 folder (`alibaba-pai/EasyAnimateV3-XL-2-InP-*`) holds `transformer/` (config.json and an fp32
`diffusion_pytorch_model.safetensors` that also stores the motion modules' frame encodings as `pos_encoder.pe`
buffers), `vae/`, `text_encoder/` + `tokenizer/` (T5-v1.1-XXL) and `image_encoder/` (CLIP vision with projection).
kinema's `VideoDiT` uses V3's parameter names, so the key map is the identity; the `pe` buffers are checked against
the encoding kinema computes on the fly, then dropped. Anything missing, extra or mis-shaped stops the load.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from kinema.errors import KinemaError
from kinema.fileio import atomic_folder, read_json_object
from kinema.loaders.animatediff.keys import check_frame_table, with_pe_tables
from kinema.loaders.checkpoint_io import SAFETENSORS_DTYPES, iter_safetensors, read_safetensors_header
from kinema.loaders.easyanimate.config import (
    V3_INPAINT_CHANNELS,
    easyanimate_config_from_video_dit,
    video_dit_config_from_easyanimate,
)
from kinema.models.video_dit import VideoDiT
from kinema.state_dicts import key_mismatch

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Frame-encoding buffers stored by V3's motion attentions; kinema recomputes them.
PE_BUFFER = re.compile(r"^(?P<attention>.*\.attn_temporal\..*\.attention_blocks\.\d+)\.pos_encoder\.pe$")
PE_ATOL = 1e-3

# ---------------------------------------------------------------- transformer weights


def _transformer_dir(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    if (folder / "config.json").is_file():
        return folder
    raise KinemaError(f"{folder} has no config.json (nor transformer/config.json); point at an EasyAnimate model "
                      "folder or its transformer/ subfolder")


def _read_transformer_config(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / "config.json", "the transformer's config")


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single or an index-sharded diffusers weights file."""
    if (folder / WEIGHTS_NAME).is_file():
        return dict.fromkeys(read_safetensors_header(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        index_path = folder / WEIGHTS_INDEX_NAME
        weight_map = read_json_object(index_path, "the sharded weights' index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
            raise KinemaError(f'{index_path} has no "weight_map" object (tensor name -> shard file), so the shards '
                              "cannot be found; it is not a diffusers weights index: restore it from the download")
        missing = sorted({file for file in weight_map.values() if not (folder / file).is_file()})
        if missing:
            raise KinemaError(f"{index_path} lists shard(s) {missing[:3]} that are not in {folder}; download them")
        return {name: folder / file for name, file in weight_map.items()}
    found = sorted(p.name for p in folder.iterdir())
    raise KinemaError(f"{folder} has no {WEIGHTS_NAME}; it holds {found[:8]}. kinema reads safetensors only: convert "
                      "a .bin checkpoint to safetensors first")


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


def check_video_dit_keys(
    model: VideoDiT, header: dict[str, tuple[tuple[int, ...], str]], source: str
) -> set[str]:
    """Compare a file's tensor names/shapes with the model's; return the `pe` buffer names to check and drop.

    Raises one KinemaError naming the first missing, unexpected and mis-shaped keys and what the file looks like.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # Each motion attention may carry a (1, max_frames, C) encoding buffer.
    pe_shapes = {}
    for name, shape in expected.items():
        if ".attn_temporal." in name and ".attention_blocks." in name and name.endswith(".to_q.weight"):
            max_frames = model.transformer_blocks[int(name.split(".")[1])].attn_temporal.max_frames
            pe_shapes[name.removesuffix(".to_q.weight")] = (1, max_frames, shape[1])
    pe_names = {name for name in header if (match := PE_BUFFER.match(name)) and match["attention"] in pe_shapes}
    wanted = {**expected, **{name: pe_shapes[PE_BUFFER.match(name)["attention"]] for name in pe_names}}
    found = key_mismatch(wanted, {name: shape for name, (shape, _) in header.items()})
    if found:
        raise KinemaError(f"{source} does not match the video DiT its config describes: {found}. "
                          f"The file has {len(header)} tensors and looks like {looks_like(set(header))}")
    return pe_names


def load_video_dit(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    mmap: bool = False,
) -> VideoDiT:
    """Load an EasyAnimate V3 `transformer/` folder (or a kinema-saved VideoDiT folder) strictly.

    Accepts the model root or its `transformer/` folder. The V3 config is translated by
    `video_dit_config_from_easyanimate`; stored `pos_encoder.pe` buffers `(1, max_frames, C)` are checked and
    dropped. `dtype` casts the weights (default: as stored). The weights are read into memory; `mmap=True` leaves
    uncast CPU weights as views of the memory-mapped file instead (less memory, but the first forward pass then
    pages the whole file in, several times slower). Returns the model in eval mode.
    """
    folder = _transformer_dir(folder)
    config = _read_transformer_config(folder)
    kwargs = video_dit_config_from_easyanimate(config)
    files = _weight_files(folder)
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(set(files.values())):
        header.update(read_safetensors_header(path))
    with init_empty_weights():
        model = VideoDiT(**kwargs)
    source = f"transformer weights in {folder}"
    pe_names = check_video_dit_keys(model, header, source)

    state = {}
    for path in sorted(set(files.values())):
        for name, tensor in iter_safetensors(path, device):
            if name in pe_names:
                try:
                    check_frame_table(name, tensor, PE_ATOL)
                except KinemaError as err:
                    raise KinemaError(f"{source}: {err}") from None
                continue
            state[name] = tensor.to(dtype or tensor.dtype, copy=not mmap)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


@dataclass
class EasyAnimateModel:
    """The parts of an EasyAnimate V3 folder. `image_encoder` / `image_processor` are None without `image_encoder/`."""

    transformer: VideoDiT
    vae: Any
    text_encoder: Any
    tokenizer: Any
    image_encoder: Any | None
    image_processor: Any | None


# Weight files transformers reads without a variant; V3 ships T5 only as the "fp16" variant.
PLAIN_WEIGHTS = {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"}
FP16_WEIGHTS = re.compile(r"^(model|pytorch_model)\.fp16[-.]|\.index\.fp16\.json$")


def _variant(folder: Path) -> str | None:
    """transformers weight variant of a folder: V3's T5 is `model.fp16-0000N-of-0000M.safetensors` + index."""
    names = {p.name for p in folder.iterdir()}
    if names & PLAIN_WEIGHTS:
        return None
    return "fp16" if any(FP16_WEIGHTS.search(name) for name in names) else None


def _require_dir(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_dir():
        found = sorted(p.name for p in folder.iterdir())
        raise KinemaError(f"{folder} has no {name}/ folder (it holds {found}); an EasyAnimate V3 model folder has "
                          "transformer/, vae/, text_encoder/, tokenizer/ and, for InP models, image_encoder/")
    return path


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    if (folder / "spiece.model").is_file() and not (folder / "tokenizer.json").is_file() \
            and not (is_sentencepiece_available() or is_protobuf_available()):
        raise KinemaError(f"{folder} holds only a SentencePiece spiece.model; reading it needs the sentencepiece "
                          "package: pip install sentencepiece")
    return AutoTokenizer.from_pretrained(folder)


def _into_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Give every weight of `module` memory of its own. transformers maps float32 weights zero-copy from the
    safetensors file: the first pass then pages them in from disk, and a weight lying at an unaligned offset in the
    file makes MKL sum in another order than for the same weight in memory."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.data = tensor.data.clone()
    return module


def load_easyanimate(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    mmap: bool = False,
) -> EasyAnimateModel:
    """Load a whole EasyAnimate V3 folder: transformer, Slice VAE, T5 encoder + tokenizer, CLIP image encoder.

    All models are cast to `dtype` and moved to `device`; the encoders are returned in eval mode. Weights are read
    into memory; `mmap=True` leaves every part's weights mapped from its file (less memory, a slow first pass).
    """
    # The PIL image processor is the one EasyAnimate's pipeline used (transformers 4's CLIPImageProcessor); the
    # default CLIPImageProcessor of transformers 5 wants torchvision and prints a notice when falling back to it.
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection, T5EncoderModel

    from kinema.loaders.easyanimate.vae import load_slice_vae

    # Every folder and the tokenizer are checked before the multi-GB weights are read.
    folder = Path(folder)
    dirs = {name: _require_dir(folder, name) for name in ("transformer", "vae", "text_encoder", "tokenizer")}
    transformer_config = video_dit_config_from_easyanimate(_read_transformer_config(_transformer_dir(
        dirs["transformer"])))
    image_dir = folder / "image_encoder"
    if transformer_config.get("image_embed_dim") is not None and not image_dir.is_dir():
        raise KinemaError(f"{folder} is an InP model (its transformer takes CLIP image tokens) but has no "
                          "image_encoder/ folder; restore it from the original download")
    tokenizer = _load_tokenizer(dirs["tokenizer"])

    transformer = load_video_dit(dirs["transformer"], dtype=dtype, device=device, mmap=mmap)
    vae = load_slice_vae(dirs["vae"], torch_dtype=dtype, mmap=mmap).to(device)
    text_dir = dirs["text_encoder"]
    in_memory = (lambda module: module) if mmap else _into_memory
    text_encoder = in_memory(T5EncoderModel.from_pretrained(text_dir, dtype=dtype, variant=_variant(text_dir)))
    image_encoder = image_processor = None
    if image_dir.is_dir():
        image_encoder = in_memory(CLIPVisionModelWithProjection.from_pretrained(image_dir, dtype=dtype,
                                                                                variant=_variant(image_dir)))
        image_encoder = image_encoder.to(device).eval()
        image_processor = CLIPImageProcessorPil.from_pretrained(image_dir)
    return EasyAnimateModel(transformer, vae, text_encoder.to(device).eval(), tokenizer, image_encoder,
                            image_processor)


def describe_easyanimate(path: str | os.PathLike) -> dict[str, Any] | None:
    """What `kinema inspect` prints for an EasyAnimate V3 folder or transformer file; None if it is not one.

    Reads config.json (when present) and the safetensors header only, never tensor data. With a config, every
    tensor name and shape is checked against the VideoDiT it builds (`check_video_dit_keys`, as a load does).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        weights, config_path = path, path.parent / "config.json"
    elif path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        weights, config_path = folder / WEIGHTS_NAME, folder / "config.json"
    else:
        return None
    if not weights.is_file():
        return None
    header = read_safetensors_header(weights)
    if "adaln_single.linear.weight" not in header or not any(".attn_temporal." in n for n in header):
        return None
    config = _read_transformer_config(config_path.parent) if config_path.is_file() else {}
    if config:  # every name and shape against the model the config builds, on the meta device (no memory)
        with init_empty_weights():
            model = VideoDiT(**video_dit_config_from_easyanimate(config))
        check_video_dit_keys(model, header, f"transformer weights in {config_path.parent}")
    pe = {name: shape for name, (shape, _) in header.items() if PE_BUFFER.match(name)}
    params = {name: shape for name, (shape, _) in header.items() if name not in pe}
    width, in_channels, patch, _ = params["pos_embed.proj.weight"]
    pe_length = next(iter(pe.values()))[1] if pe else _pe_length_from_config(config)
    dtypes = sorted({SAFETENSORS_DTYPES.get(dtype, dtype) for _, dtype in header.values()})
    return {
        "kind": "easyanimate_transformer",
        "format": "easyanimate-v3",
        "layout": "kinema" if config.get("_class_name") == VideoDiT.__name__ else "original",
        "path": str(weights),
        "variant": "InP" if in_channels == V3_INPAINT_CHANNELS else "T2V",
        "blocks": len({name.split(".")[1] for name in params if name.startswith("transformer_blocks.")}),
        "width": width,
        "in_channels": in_channels,
        "out_channels": params["proj_out.weight"][0] // (patch * patch),
        "skips": len({name.split(".")[1] for name in params if name.startswith("long_connect_fc.")}),
        "keys": len(header),
        "parameters": sum(math.prod(shape) for shape in params.values()),
        "pe_buffers": len(pe),
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed: " + ", ".join(dtypes),
        "pe_length": pe_length,
        **({} if config else {"not_checked": f"no {config_path.name} beside the file, so its names and shapes were "
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
        lengths = {spec["max_frames"] for spec in model.config.motion_modules}
        if len(lengths) != 1:
            raise KinemaError(f"V3 gives every motion module one frame-encoding length; this model has {lengths}")
        # V3 keeps its frame tables in float32 whatever the weights' dtype, and EasyAnimate reads them as they are.
        state = with_pe_tables(model.state_dict(), "original", lengths.pop(), table_dtype=torch.float32)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME))
    return Path(target), notes


def _pe_length_from_config(config: dict[str, Any]) -> int | None:
    """Frame-encoding length of the first motion module, read through the one V3/kinema config translation;
    None when the folder has no config.json."""
    if not config:
        return None
    return video_dit_config_from_easyanimate(config)["motion_modules"][0].get("max_frames")
