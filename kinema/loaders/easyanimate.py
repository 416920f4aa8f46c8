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
from safetensors import safe_open

from kinema.errors import KinemaError
from kinema.models.motion import sinusoidal_frame_encoding
from kinema.models.video_dit import VideoDiT

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Frame-encoding buffers stored by V3's motion attentions; kinema recomputes them.
PE_BUFFER = re.compile(r"^(?P<attention>.*\.attn_temporal\..*\.attention_blocks\.\d+)\.pos_encoder\.pe$")
PE_ATOL = 1e-3
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# ---------------------------------------------------------------- V3 config.json -> VideoDiT settings

# `transformer_additional_kwargs` of config/easyanimate_video_slicevae_motion_module_v3.yaml, which EasyAnimate adds
# to transformer/config.json when it loads V3. Used as defaults: values in the config.json itself win.
V3_YAML_EXTRAS: dict[str, Any] = {
    "patch_3d": False,
    "fake_3d": False,
    "basic_block_type": "global_motionmodule",
    "time_position_encoding_before_transformer": False,
    "motion_module_type": "Vanilla",
    "enable_uvit": True,
    "motion_module_kwargs_even": {
        "num_attention_heads": 16, "num_transformer_block": 1, "attention_block_types": ["Temporal_Self"] * 2,
        "temporal_position_encoding": True, "temporal_position_encoding_max_len": 4096,
        "temporal_attention_dim_div": 1, "block_size": 1, "remove_time_embedding_in_photo": False,
    },
    "motion_module_kwargs_odd": {
        "num_attention_heads": 16, "num_transformer_block": 1,
        "attention_block_types": ["Temporal_Self", "Global_Self"],
        "temporal_position_encoding": True, "temporal_position_encoding_max_len": 4096,
        "temporal_attention_dim_div": 1, "block_size": 1, "remove_time_embedding_in_photo": False,
    },
}
# Fields VideoDiT takes under the same name and meaning.
V3_SAME_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "dropout",
                  "cross_attention_dim", "attention_bias", "sample_size", "patch_size", "activation_fn",
                  "upcast_attention", "norm_elementwise_affine", "norm_eps", "caption_channels", "enable_uvit")
V3_REQUIRED_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "cross_attention_dim",
                      "sample_size", "patch_size", "caption_channels")
# V3 Transformer3DModel defaults for same-meaning fields a config.json may leave out.
V3_CLASS_DEFAULTS: dict[str, Any] = {"out_channels": None, "dropout": 0.0, "attention_bias": False,
                                     "activation_fn": "geglu", "upcast_attention": False,
                                     "norm_elementwise_affine": True, "norm_eps": 1e-5}
# Accepted only at V3's value: other values switch on code paths (3D patches, KV compression, ...) kinema lacks.
V3_FIXED_FIELDS: dict[str, Any] = {
    "norm_type": "ada_norm_single", "num_vector_embeds": None, "only_cross_attention": False,
    "double_self_attention": False, "attention_type": "default", "patch_3d": False, "fake_3d": False,
    "casual_3d": False, "casual_3d_upsampler_index": None, "motion_module_type": "Vanilla",
    "time_position_encoding_before_transformer": False, "qk_norm": False, "after_norm": False,
    "resize_inpaint_mask_directly": False, "enable_text_attention_mask": True, "add_noise_in_inpaint_model": False,
}
# Stored by V3 but without effect on its transformer (unused branch sizes, checked-only values).
V3_INERT_FIELDS = ("norm_num_groups", "use_linear_projection", "num_embeds_ada_norm", "time_patch_size",
                   "enable_clip_in_inpaint", "basic_block_type", "motion_module_kwargs", "motion_module_kwargs_even",
                   "motion_module_kwargs_odd")
V3_BLOCK_TYPES = ("global_motionmodule", "motionmodule")
# V3's CLIPProjection: ViT-L/14 image embeddings (768), hard-coded there for in_channels == 12.
V3_IMAGE_EMBED_DIM, V3_INPAINT_CHANNELS = 768, 12

# VanillaTemporalModule defaults (V3 motion_module.py), for keys a motion_module_kwargs dict leaves out.
V3_MOTION_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 8, "num_transformer_block": 2, "attention_block_types": ["Temporal_Self"] * 2,
    "cross_frame_attention_mode": None, "temporal_position_encoding": False,
    "temporal_position_encoding_max_len": 4096, "temporal_attention_dim_div": 1, "zero_initialize": True,
    "block_size": 1, "remove_time_embedding_in_photo": False, "global_num_attention_heads": 16,
    "global_attention": False, "qk_norm": False,
}
V3_MOTION_FIXED: dict[str, Any] = {
    "cross_frame_attention_mode": None, "temporal_position_encoding": True, "temporal_attention_dim_div": 1,
    "block_size": 1, "remove_time_embedding_in_photo": False, "global_attention": False, "qk_norm": False,
}
V3_ATTENTION_KINDS = {"Temporal_Self": "temporal", "Global_Self": "global"}
MOTION_TYPES = {("temporal", "temporal"): "temporal", ("temporal", "global"): "hybrid"}


def _check_fixed(config: dict[str, Any], fixed: dict[str, Any], where: str) -> None:
    for name, value in fixed.items():
        if name in config and config[name] != value:
            raise KinemaError(f"{where}: {name}={config[name]!r} is not supported (EasyAnimate V3 uses {value!r}); "
                              "kinema loads EasyAnimate V3 transformers only")


def _motion_spec(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """One V3 `motion_module_kwargs` dict -> a kinema motion-module spec."""
    unknown = sorted(set(kwargs) - set(V3_MOTION_DEFAULTS))
    if unknown:
        raise KinemaError(f"{where}: unknown motion-module settings {unknown}; kinema loads EasyAnimate V3 only")
    kwargs = {**V3_MOTION_DEFAULTS, **kwargs}
    _check_fixed(kwargs, V3_MOTION_FIXED, where)
    blocks = kwargs["attention_block_types"]
    if any(block not in V3_ATTENTION_KINDS for block in blocks):
        raise KinemaError(f"{where}: attention_block_types {blocks} are not supported; use "
                          f"{sorted(V3_ATTENTION_KINDS)}")
    kinds = tuple(V3_ATTENTION_KINDS[block] for block in blocks)
    spec = {"type": MOTION_TYPES.get(kinds, "temporal")}
    if kinds not in MOTION_TYPES:
        spec["attention_kinds"] = list(kinds)
    return {**spec, "num_attention_heads": kwargs["num_attention_heads"],
            "num_transformer_blocks": kwargs["num_transformer_block"],
            "max_frames": kwargs["temporal_position_encoding_max_len"], "norm_mode": "per_frame",
            "norm_num_groups": 32}


def video_dit_config_from_easyanimate(config: dict[str, Any]) -> dict[str, Any]:
    """EasyAnimate V3 `transformer/config.json` (or a kinema VideoDiT config) -> `VideoDiT(**kwargs)` arguments.

    Same-name fields pass through (`V3_SAME_FIELDS`); `V3_FIXED_FIELDS` are refused at any value but V3's;
    `V3_INERT_FIELDS` have no effect; V3's YAML extras fill in what the file lacks. `basic_block_type` with
    `motion_module_kwargs_even/_odd` (or `motion_module_kwargs` for every block) becomes `motion_modules`, and
    `in_channels == 12` with `enable_clip_in_inpaint` becomes `image_embed_dim=768`. Unknown fields are refused.
    """
    if config.get("_class_name") == VideoDiT.__name__:
        return {name: value for name, value in config.items() if not name.startswith("_")}
    where = "EasyAnimate transformer config"
    config = {**V3_YAML_EXTRAS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    known = set(V3_SAME_FIELDS) | set(V3_FIXED_FIELDS) | set(V3_INERT_FIELDS)
    unknown = sorted(set(config) - known)
    if unknown:
        raise KinemaError(f"{where}: unknown fields {unknown}; is this an EasyAnimate V3 transformer?")
    missing = [name for name in V3_REQUIRED_FIELDS if config.get(name) is None]
    if missing:
        raise KinemaError(f"{where}: missing {missing}; is this an EasyAnimate V3 transformer config.json?")
    _check_fixed(config, V3_FIXED_FIELDS, where)
    if config["sample_size"] == 128:
        raise KinemaError(f"{where}: sample_size 128 turns on PixArt's resolution conditioning, which V3 does not "
                          "use and kinema does not support")
    kwargs = {name: config.get(name, V3_CLASS_DEFAULTS.get(name)) for name in V3_SAME_FIELDS}
    kwargs["out_channels"] = kwargs["out_channels"] or kwargs["in_channels"]
    layers, block_type = config["num_layers"], config["basic_block_type"]
    if block_type == "global_motionmodule":
        even = _motion_spec(config["motion_module_kwargs_even"] or {}, f"{where} motion_module_kwargs_even")
        odd = _motion_spec(config["motion_module_kwargs_odd"] or {}, f"{where} motion_module_kwargs_odd")
        kwargs["motion_modules"] = [dict(even if index % 2 == 0 else odd) for index in range(layers)]
    elif block_type == "motionmodule":
        spec = _motion_spec(config.get("motion_module_kwargs") or {}, where)
        kwargs["motion_modules"] = [dict(spec) for _ in range(layers)]
    else:
        raise KinemaError(f"{where}: basic_block_type {block_type!r} is not supported; kinema loads "
                          f"{list(V3_BLOCK_TYPES)} (EasyAnimate V3 uses 'global_motionmodule')")
    with_clip = config["in_channels"] == V3_INPAINT_CHANNELS and config.get("enable_clip_in_inpaint", True)
    kwargs["image_embed_dim"] = V3_IMAGE_EMBED_DIM if with_clip else None
    return kwargs


# ---------------------------------------------------------------- transformer weights


def _transformer_dir(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    if (folder / "config.json").is_file():
        return folder
    raise KinemaError(f"{folder} has no config.json (nor transformer/config.json); point at an EasyAnimate model "
                      "folder or its transformer/ subfolder")


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single or an index-sharded diffusers weights file."""
    if (folder / WEIGHTS_NAME).is_file():
        return dict.fromkeys(read_safetensors_header(folder / WEIGHTS_NAME), folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        weight_map = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    found = sorted(p.name for p in folder.iterdir())
    raise KinemaError(f"{folder} has no {WEIGHTS_NAME}; it holds {found[:8]}. kinema reads safetensors only: convert "
                      "a .bin checkpoint to safetensors first")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype name) from a safetensors file's header, without reading tensor data."""
    with safe_open(str(path), framework="pt") as f:
        return {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}


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


def _examples(items: list[str]) -> str:
    return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")


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
    pe_names, unexpected, misshaped = set(), [], []
    for name, (shape, _) in header.items():
        match = PE_BUFFER.match(name)
        want = pe_shapes.get(match["attention"]) if match else expected.get(name)
        if want is None:
            unexpected.append(name)
        elif shape != want:
            misshaped.append(f"{name} {list(shape)} vs model {list(want)}")
        elif match:
            pe_names.add(name)
    missing = [name for name in expected if name not in header]
    if missing or unexpected or misshaped:
        parts = [f"{label} {len(items)} ({_examples(items)})" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if items]
        raise KinemaError(f"{source} does not match the video DiT its config describes: {'; '.join(parts)}. "
                          f"The file has {len(header)} tensors and looks like {looks_like(set(header))}")
    return pe_names


def _check_frame_encoding(name: str, pe: torch.Tensor, source: str) -> None:
    table = sinusoidal_frame_encoding(pe.shape[1], pe.shape[2], device=pe.device).to(pe.dtype)
    error = (pe[0].float() - table.float()).abs().max().item()
    if error > PE_ATOL:
        raise KinemaError(f"{source}: buffer {name} differs from the sinusoidal frame encoding by {error:.3g}; "
                          "kinema recomputes that encoding, so this checkpoint's motion modules would behave "
                          "differently here")


def load_video_dit(
    folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> VideoDiT:
    """Load an EasyAnimate V3 `transformer/` folder (or a kinema-saved VideoDiT folder) strictly.

    Accepts the model root or its `transformer/` folder. The V3 config is translated by
    `video_dit_config_from_easyanimate`; stored `pos_encoder.pe` buffers `(1, max_frames, C)` are checked and
    dropped. `dtype` casts the weights (default: as stored). Returns the model in eval mode.
    """
    folder = _transformer_dir(folder)
    config = json.loads((folder / "config.json").read_text())
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
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if name in pe_names:
                    _check_frame_encoding(name, tensor, source)
                    continue
                state[name] = tensor.to(dtype) if dtype is not None else tensor
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


def load_easyanimate(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> EasyAnimateModel:
    """Load a whole EasyAnimate V3 folder: transformer, Slice VAE, T5 encoder + tokenizer, CLIP image encoder.

    All models are cast to `dtype` and moved to `device`; the encoders are returned in eval mode.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, T5EncoderModel

    from kinema.loaders.easyanimate_vae import load_slice_vae

    # Every folder and the tokenizer are checked before the multi-GB weights are read.
    folder = Path(folder)
    dirs = {name: _require_dir(folder, name) for name in ("transformer", "vae", "text_encoder", "tokenizer")}
    transformer_config = video_dit_config_from_easyanimate(
        json.loads((_transformer_dir(dirs["transformer"]) / "config.json").read_text()))
    image_dir = folder / "image_encoder"
    if transformer_config.get("image_embed_dim") is not None and not image_dir.is_dir():
        raise KinemaError(f"{folder} is an InP model (its transformer takes CLIP image tokens) but has no "
                          "image_encoder/ folder; restore it from the original download")
    tokenizer = _load_tokenizer(dirs["tokenizer"])

    transformer = load_video_dit(dirs["transformer"], dtype=dtype, device=device)
    vae = load_slice_vae(dirs["vae"], torch_dtype=dtype).to(device)
    text_dir = dirs["text_encoder"]
    text_encoder = T5EncoderModel.from_pretrained(text_dir, dtype=dtype, variant=_variant(text_dir))
    image_encoder = image_processor = None
    if image_dir.is_dir():
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(image_dir, dtype=dtype,
                                                                      variant=_variant(image_dir))
        image_encoder = image_encoder.to(device).eval()
        image_processor = CLIPImageProcessor.from_pretrained(image_dir)
    return EasyAnimateModel(transformer, vae, text_encoder.to(device).eval(), tokenizer, image_encoder,
                            image_processor)


def describe_easyanimate(path: str | os.PathLike) -> dict[str, Any] | None:
    """What `kinema inspect` prints for an EasyAnimate V3 folder or transformer file; None if it is not one.

    Reads config.json (when present) and the safetensors header only, never tensor data.
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
    pe = {name: shape for name, (shape, _) in header.items() if PE_BUFFER.match(name)}
    params = {name: shape for name, (shape, _) in header.items() if name not in pe}
    width, in_channels, patch, _ = params["pos_embed.proj.weight"]
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    pe_length = next(iter(pe.values()))[1] if pe else _pe_length_from_config(config)
    dtypes = sorted({SAFETENSORS_DTYPES.get(dtype, dtype) for _, dtype in header.values()})
    return {
        "format": "easyanimate-v3",
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
    }


def _pe_length_from_config(config: dict[str, Any]) -> int | None:
    """Frame-encoding length from a kinema config (`motion_modules`) or a V3 one (`motion_module_kwargs_even`)."""
    spec = (config.get("motion_modules") or [None])[0]
    if isinstance(spec, dict) and "max_frames" in spec:
        return spec["max_frames"]
    return (config.get("motion_module_kwargs_even") or {}).get("temporal_position_encoding_max_len")
