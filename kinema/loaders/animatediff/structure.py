"""What a motion-module state dict is, from its names and shapes alone: its layout, its UNet placement, and whether
every tensor is where and as big as that placement says.

Works on meta tensors (a .safetensors header), so a file of GBs is checked without reading its data; only the frame
tables' values (`check_frame_tables`) need data.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from kinema.errors import KinemaError, count_words
from kinema.loaders.animatediff.keys import check_frame_table, is_pe_key, pe_places, rename_state_dict
from kinema.loaders.animatediff.motion_lora_keys import SPATIAL_PROCESSOR_KEY
from kinema.models.motion import build_motion_module
from kinema.state_dicts import check_fits, key_problems, problems_phrase, shapes

KINEMA_LAYOUT_TAG = "motion-module"  # the `kinema_layout` metadata of kinema-layout files

# Related files kinema cannot load yet: (regex searched in the keys, what the file is). First match wins.
UNSUPPORTED: list[tuple[str, str]] = [
    (r"temporal_attentions\.|pos_encoder\.positional_encoding", "a HotShot-XL temporal module"),
]
# PIA's image-conditioning input convolution, stored beside its motion modules (the UNet's conv_in with 5 more input
# channels: the mask and the image's latents).
IMAGE_CONV_KEYS = ("conv_in.weight", "conv_in.bias")
# Guesses for files that are not motion modules: (regex searched in the keys, what the file looks like).
LOOKS_LIKE: list[tuple[str, str]] = [
    (r"\.(hada_w[12]_[ab]|lokr_w[12](_[ab])?)$", "a LyCORIS LoHa or LoKr (hada_ or lokr_ matrices), which kinema "
                                                "does not apply: use a plain LoRA (lora_down and lora_up)"),
    (r"^module\.", "a model saved from DataParallel or DDP training, every name starting with `module.`: save its "
                   "state dict again without that prefix"),
    (r"^lora_(unet|te\d?)_", "a LoRA for Stable Diffusion images (kohya/civitai layout), which kinema applies with "
                            "generate --lora on an SD1.5 model"),
    (SPATIAL_PROCESSOR_KEY.pattern, "AnimateDiff v3's domain adapter (an image LoRA, e.g. v3_sd15_adapter.ckpt), "
                                    "which kinema applies with generate --lora on an SD1.5 model"),
    (r"(?i)lora", "a LoRA, which kinema applies with generate --lora"),
    (r"^model\.diffusion_model\.", "a full Stable Diffusion checkpoint (original layout)"),
    (r"^(first_stage_model\.|encoder\.down(_blocks)?\.|decoder\.up(_blocks)?\.)", "a VAE"),
    (r"^(cond_stage_model\.|text_model\.|conditioner\.)", "a text encoder"),
    (r"^(down_blocks|up_blocks|mid_block)\.\d*\.?(resnets|attentions)\.", "an image UNet (diffusers layout)"),
    (r"^(transformer_blocks|blocks)\.\d+\.", "a transformer (DiT) checkpoint"),
]
# What each kind of difference from the layout a file's structure describes usually means.
LIKELY_CAUSES = {
    "missing": "the file is incomplete (an interrupted download, or an export that skipped tensors)",
    "unexpected": "the file holds tensors AnimateDiff motion modules do not have (another architecture, or another "
                  "model's tensors saved with them)",
    "mismatched": "tensors were reshaped or replaced (a faulty merge or edit), or the file is damaged",
}
_MODULE = re.compile(r"^(?P<module>(?:down_blocks\.(?P<down>\d+)|up_blocks\.(?P<up>\d+)|mid_block)"
                     r"\.motion_modules\.\d+)\.temporal_transformer\.")


def _first_match(keys: list[str], table: list[tuple[str, str]]) -> str | None:
    return next((what for pattern, what in table if any(re.search(pattern, k) for k in keys)), None)


def guess_kind(keys: list[str]) -> str:
    """`"it looks like a LoRA (12 tensors, e.g. ...)"`: a best guess at what a non-motion-module file is."""
    what = _first_match(keys, LOOKS_LIKE) or "an unknown kind of checkpoint"
    return f"it looks like {what} ({len(keys)} tensors, e.g. {', '.join(keys[:2]) or 'none'})"


def refuse_other_kinds(keys: list[str]) -> None:
    """Refuse tensor names that are not a motion module's, naming what the file is (SparseCtrl, HotShot-XL, PIA, a
    motion LoRA) or looks like (an image UNet, a VAE, ...)."""
    motion_keys = [k for k in keys if ".motion_modules." in k]
    if motion_keys and any(k.startswith("controlnet_cond_embedding.") for k in keys):
        raise KinemaError("this is AnimateDiff v3's SparseCtrl (a keyframe encoder with motion modules of its own), "
                          "not a motion module: load it as a ControlNet (--controlnet, controlnet=) beside the v3 "
                          "motion module")
    # Only files with temporal layers are checked: an image UNet has a conv_in.weight too.
    unsupported = _first_match(keys, UNSUPPORTED) if motion_keys or any("temporal" in k for k in keys) else None
    if unsupported:
        raise KinemaError(f"this is {unsupported}; it is not supported yet (kinema loads AnimateDiff v1/v2/v3, "
                          "SDXL beta, AnimateLCM and PIA motion modules)")
    if not motion_keys:
        raise KinemaError(f"this is not an AnimateDiff motion module: {guess_kind(keys)}. Give a motion module file "
                          "(e.g. mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt) or a diffusers MotionAdapter folder")
    lora = [k for k in motion_keys if "lora" in k.lower()]
    if lora:
        raise KinemaError(f"this is a motion LoRA ({len(lora)} LoRA tensors, e.g. {lora[0]}), not a motion module: "
                          "load a motion module first and apply the LoRA on top of it "
                          "(kinema.loaders.animatediff.motion_lora)")


def layout_of(keys: list[str], metadata: dict[str, str] | None) -> str:
    """"animatediff-original", "animatediff-diffusers" or "kinema", from the names and a kinema file's metadata."""
    keys = [k for k in keys if ".motion_modules." in k]
    original = any(".temporal_transformer." in k for k in keys)
    diffusers = any(re.search(r"\.(attn1|norm3)\.", k) for k in keys)
    if original and diffusers:
        raise KinemaError("this file mixes original AnimateDiff names (temporal_transformer.) and diffusers names "
                          "(attn1/norm3); re-export it in one layout")
    if diffusers:
        return "animatediff-diffusers"
    if not original:
        raise KinemaError(f"motion-module keys in an unknown layout (e.g. {keys[0]}); "
                          "expected original AnimateDiff (temporal_transformer.) or diffusers (attn1/norm3) names")
    is_kinema = (metadata or {}).get("kinema_layout") == KINEMA_LAYOUT_TAG
    return "kinema" if is_kinema else "animatediff-original"


def names_of(fmt: str) -> str:
    """The key names (as `keys.rename_state_dict` calls them) a layout of `layout_of` uses."""
    return "diffusers" if fmt == "animatediff-diffusers" else "kinema"


def split_image_conv(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(motion tensors, PIA's `conv_in` weight and bias, empty for other modules) of a motion-module state dict. An
    image UNet has a conv_in too, so it counts only beside motion modules; the two come together."""
    conv = {key: state_dict[key] for key in IMAGE_CONV_KEYS if key in state_dict}
    if not conv or not any(".motion_modules." in key for key in state_dict):
        return state_dict, {}
    if len(conv) != len(IMAGE_CONV_KEYS) or conv["conv_in.weight"].dim() != 4:
        raise KinemaError(f"a PIA motion adapter holds conv_in.weight (out, in, k, k) and conv_in.bias; this file "
                          f"has {', '.join(f'{k} {tuple(v.shape)}' for k, v in conv.items())}: it is incomplete or "
                          "damaged")
    return {k: v for k, v in state_dict.items() if k not in conv}, conv


def split_pe(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, stored frame tables `pe`) of a motion-module state dict."""
    weights = {k: v for k, v in state_dict.items() if not is_pe_key(k)}
    return weights, {k: v for k, v in state_dict.items() if is_pe_key(k)}


def motion_structure(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`{"channels": width C per level, "mid_block", "modules_per_level": (down, up), "transformer_blocks",
    "attention_kinds", "cross_attention_dim"}` of kinema-named motion weights (no `pe`); KinemaError for stray
    tensors or a placement AnimateDiff never has."""
    modules: dict[str, tuple[str | None, str | None]] = {}
    stray = []
    for key in weights:
        m = _MODULE.match(key)
        if m:
            modules[m["module"]] = (m["down"], m["up"])
        else:
            stray.append(key)
    if stray and not modules:
        raise KinemaError(f"the file holds no motion module (no tensor is named like one); {guess_kind(stray)}. "
                          "kinema loads bare motion modules: save them alone (VideoUNet.motion_state_dict)")
    if stray:
        raise KinemaError(f"besides motion modules the file holds {count_words(len(stray), 'other tensor')}; "
                          f"{guess_kind(stray)}. "
                          "kinema loads bare motion modules: save them alone (VideoUNet.motion_state_dict)")
    down = Counter(int(d) for d, _ in modules.values() if d is not None)
    up = Counter(int(u) for _, u in modules.values() if u is not None)
    levels = len(down)
    if sorted(down) != list(range(levels)) or sorted(up) != list(range(levels)) or len(set(down.values())) != 1:
        raise KinemaError(f"unexpected motion-module placement: down levels {dict(down)}, up levels {dict(up)}; "
                          "AnimateDiff has the same number of modules on every down level and up level")
    blocks = {k.split(".transformer_blocks.")[1].split(".")[0] for k in weights
              if k.startswith("down_blocks.0.motion_modules.0.") and ".transformer_blocks." in k}
    channels = _level_widths(weights, levels)
    kinds, text_width = _attention_kinds(weights, channels)
    return {"channels": channels, "mid_block": "mid_block.motion_modules.0" in modules,
            "modules_per_level": (down[0], up[0]), "transformer_blocks": max(len(blocks), 1),
            "attention_kinds": kinds, "cross_attention_dim": text_width}


def _attention_kinds(weights: dict[str, torch.Tensor], channels: tuple[int, ...]) -> tuple[list[str], int | None]:
    """(attention kinds of a block, prompt-token width or None), by the majority of modules, as the level widths
    are, so one damaged tensor is reported by `check_weights` rather than read as another layout: an attention whose
    keys are projected from another width than its module's level is a `text` one (AnimateDiff's Temporal_Cross).
    Only a prompt as wide as every level could pass for a temporal attention."""
    levels = len(channels)
    votes: dict[int, Counter] = {}  # attention index -> Counter of the keys' input width, None where it is C
    for key, tensor in weights.items():
        found = _MODULE.match(key)
        rest = key[found.end():] if found else ""
        m = re.fullmatch(r"transformer_blocks\.0\.attention_blocks\.(\d+)\.to_k\.weight", rest)
        if found and m and tensor.ndim == 2:
            width = tensor.shape[1]
            same = width == channels[_level_of(found, levels)]
            votes.setdefault(int(m[1]), Counter())[None if same else width] += 1
    if not votes or sorted(votes) != list(range(len(votes))):
        return ["temporal", "temporal"], None  # check_weights names what is missing
    read = [votes[index].most_common(1)[0][0] for index in range(len(votes))]
    text_widths = Counter(width for width in read if width is not None)
    kinds = ["temporal" if width is None else "text" for width in read]
    return kinds, text_widths.most_common(1)[0][0] if text_widths else None


def _level_of(module: re.Match, levels: int) -> int:
    """The UNet level of a `_MODULE` match: down level i, up level L-1-i, the mid block the deepest."""
    if module["down"] is not None:
        return int(module["down"])
    return levels - 1 - int(module["up"]) if module["up"] is not None else levels - 1


def _level_widths(weights: dict[str, torch.Tensor], levels: int) -> tuple[int, ...]:
    """Width C of each UNet level: the most common length of its modules' `temporal_transformer.norm.weight` (C,)
    (down level i, up level L-1-i, and the mid block for the deepest). Taking the majority means one damaged or
    missing tensor is reported as such, rather than setting the width every other tensor is compared with."""
    votes: list[Counter] = [Counter() for _ in range(levels)]
    for key, tensor in weights.items():
        found = _MODULE.match(key)
        if found and key.endswith(".temporal_transformer.norm.weight") and tensor.ndim == 1:
            votes[_level_of(found, levels)][tensor.shape[0]] += 1
    unread = [level for level, count in enumerate(votes) if not count]
    if unread:
        raise KinemaError(f"no motion module of UNet level {unread[0]} has a temporal_transformer.norm.weight of "
                          "shape (C,), which gives the level's width C: the file is incomplete or damaged")
    return tuple(count.most_common(1)[0][0] for count in votes)


def expected_motion_shapes(structure: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """`{kinema name: shape}` of every weight of the motion modules `structure` describes (see `motion_structure`),
    taken from kinema's own module built on the meta device: no memory, so checking a full-size SD1.5 module is
    quick."""
    channels = structure["channels"]
    down, up = structure["modules_per_level"]
    # AnimateDiff's placement (kinema.models.video_unet.motion_slots): up level i is as wide as down level L-1-i.
    places = [(f"down_blocks.{i}.motion_modules.{j}", c) for i, c in enumerate(channels) for j in range(down)]
    places += [(f"up_blocks.{i}.motion_modules.{j}", c) for i, c in enumerate(reversed(channels)) for j in range(up)]
    if structure["mid_block"]:
        places.append(("mid_block.motion_modules.0", channels[-1]))
    # Heads and norm groups change no shape; one of each builds a module of any width.
    spec = {"type": "temporal", "num_transformer_blocks": structure["transformer_blocks"],
            "num_attention_heads": 1, "norm_num_groups": 1, "attention_kinds": structure["attention_kinds"],
            "cross_attention_dim": structure["cross_attention_dim"]}
    with torch.device("meta"):
        per_width = {c: shapes(build_motion_module(spec, c).state_dict()) for c in dict.fromkeys(channels)}
    return {f"{prefix}.{name}": shape for prefix, c in places for name, shape in per_width[c].items()}


def check_weights(weights: dict[str, torch.Tensor], structure: dict[str, Any], fmt: str, label: str) -> None:
    """Refuse weights (`pe` buffers left out) whose names or shapes differ from the modules `structure` describes,
    named in the file's own layout."""
    expected = rename_state_dict(expected_motion_shapes(structure), "kinema", names_of(fmt))
    problems = key_problems(expected, shapes(weights))
    if problems:
        down, up = structure["modules_per_level"]
        mid = " and a mid-block module" if structure["mid_block"] else ""
        raise KinemaError(
            f"the weights do not match detected {label}, checked against {len(structure['channels'])} levels of "
            f"widths {structure['channels']} with {down} down / {up} up modules each{mid}: "
            f"{problems_phrase(problems)}. Likely cause: {'; '.join(LIKELY_CAUSES[kind] for kind in problems)}. "
            "Download the file again, or re-export it from the original")


def frame_table_length(pe: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], fmt: str) -> int | None:
    """The frame-encoding length L of the stored tables `pe` `(1, L, C)` (None when there are none), once they are
    checked to sit where the layout puts them, with one length and the widths of the weights beside them."""
    if not pe:
        return None
    places = pe_places(list(weights), "diffusers" if fmt == "animatediff-diffusers" else "original")
    # Names only here: the tables' lengths are what is being found out, their widths are checked below.
    check_fits(dict.fromkeys(places, ()), dict.fromkeys(pe, ()), "frame-encoding buffers do not match the modules")
    lengths: Counter[int] = Counter()
    for key, table in pe.items():
        width = weights[places[key]].shape[0]
        if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != width:
            raise KinemaError(f"{key} has shape {tuple(table.shape)}, expected [1, L, {width}]")
        lengths[table.shape[1]] += 1
    if len(lengths) > 1:
        raise KinemaError(f"frame-encoding lengths disagree between modules: {dict(lengths)} (length: count)")
    return next(iter(lengths))


def common_pe_length(pe: dict[str, torch.Tensor]) -> int | None:
    """The frame-encoding length most `pe` tables `(1, L, C)` have (all of them, once `frame_table_length` has
    passed); None without tables."""
    lengths = Counter(table.shape[1] for table in pe.values() if table.ndim == 3)
    return lengths.most_common(1)[0][0] if lengths else None


def check_frame_tables(pe: dict[str, torch.Tensor]) -> None:
    """Refuse stored `pe` buffers `(1, L, C)` that are not the sinusoidal table kinema computes, at the precision
    of their dtype."""
    for key, table in pe.items():
        tolerance = max(1e-4, torch.finfo(table.dtype).eps) if table.is_floating_point() else 1e-4
        check_frame_table(key, table, tolerance)
