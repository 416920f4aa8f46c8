"""EasyAnimate V3 `transformer/config.json` <-> kinema `VideoDiT` arguments, both ways.

V3 describes its blocks with switches (`basic_block_type`, `motion_module_kwargs_even/_odd`, `in_channels == 12`
meaning CLIP tokens, `enable_uvit` meaning 13 skip linears wired by block index); kinema with one motion-module spec
per block, an explicit `image_embed_dim` and explicit `skip_pairs` / `num_skip_linears`. Fields are sorted into
data tables: same name and meaning, fixed at V3's value (other values switch on code kinema lacks), inert (stored by
V3 without effect). Anything else is refused.
"""

from __future__ import annotations

from typing import Any

from kinema.errors import KinemaError
from kinema.loaders.config_values import FRACTION, POSITIVE_INT, POSITIVE_NUMBER, check_config_values
from kinema.models.video_dit import VideoDiT
from kinema.models.video_dit_blocks import EASYANIMATE_V3_SKIP_LINEARS, easyanimate_v3_skip_pairs

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
# V3's CLIPProjection: ViT-L/14 image embeddings (768) as 8 tokens, hard-coded there for in_channels == 12.
V3_IMAGE_EMBED_DIM, V3_IMAGE_TOKENS, V3_INPAINT_CHANNELS = 768, 8, 12

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
# The attention kinds of kinema's motion-module types that V3 has, both ways.
MOTION_TYPES: dict[tuple[str, ...], str] = {("temporal", "temporal"): "temporal", ("temporal", "global"): "hybrid"}
MOTION_TYPE_KINDS = {motion_type: kinds for kinds, motion_type in MOTION_TYPES.items()}


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
    spec: dict[str, Any] = {"type": MOTION_TYPES.get(kinds, "temporal")}
    if kinds not in MOTION_TYPES:
        spec["attention_kinds"] = list(kinds)
    return {**spec, "num_attention_heads": kwargs["num_attention_heads"],
            "num_transformer_blocks": kwargs["num_transformer_block"],
            "max_frames": kwargs["temporal_position_encoding_max_len"], "norm_mode": "per_frame",
            "norm_num_groups": 32}


_CONFIG_RULES = {
    **dict.fromkeys(("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                     "cross_attention_dim", "sample_size", "patch_size", "caption_channels"), POSITIVE_INT),
    "norm_eps": POSITIVE_NUMBER, "dropout": FRACTION,
}
_CONFIG_FIX = "restore the config.json the transformer came with"


def video_dit_config_from_easyanimate(config: dict[str, Any]) -> dict[str, Any]:
    """EasyAnimate V3 `transformer/config.json` (or a kinema VideoDiT config) -> `VideoDiT(**kwargs)` arguments.

    Same-name fields pass through (`V3_SAME_FIELDS`); `V3_FIXED_FIELDS` are refused at any value but V3's;
    `V3_INERT_FIELDS` have no effect; V3's YAML extras fill in what the file lacks. `basic_block_type` with
    `motion_module_kwargs_even/_odd` (or `motion_module_kwargs` for every block) becomes `motion_modules`, and
    `in_channels == 12` with `enable_clip_in_inpaint` becomes `image_embed_dim=768`, and `enable_uvit` becomes
    V3's skip wiring at this depth (`easyanimate_v3_skip_pairs`, 13 linears). Unknown fields are refused.
    """
    where = "the EasyAnimate transformer's config.json"
    if config.get("_class_name") == VideoDiT.__name__:
        kinema_kwargs = {name: value for name, value in config.items() if not name.startswith("_")}
        check_config_values(kinema_kwargs, _CONFIG_RULES, where, _CONFIG_FIX)
        return kinema_kwargs
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
    check_config_values(kwargs, _CONFIG_RULES, where, _CONFIG_FIX)
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
    kwargs["num_image_tokens"] = V3_IMAGE_TOKENS
    skip_pairs = easyanimate_v3_skip_pairs(layers) if kwargs["enable_uvit"] else []
    kwargs["skip_pairs"] = [list(pair) for pair in skip_pairs]
    kwargs["num_skip_linears"] = EASYANIMATE_V3_SKIP_LINEARS if kwargs["enable_uvit"] else 0
    return kwargs


def _v3_motion_kwargs(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """One kinema motion-module spec -> V3 `motion_module_kwargs`; refuses what V3 cannot express."""
    kinds = tuple(spec.get("attention_kinds") or MOTION_TYPE_KINDS.get(spec["type"], ()))
    block_types = {kind: name for name, kind in V3_ATTENTION_KINDS.items()}
    if spec["type"] not in ("temporal", "hybrid") or not kinds or spec.get("norm_mode", "per_frame") != "per_frame" \
            or spec.get("norm_num_groups", 32) != 32:
        raise KinemaError(f"{where}: motion module {spec} has no EasyAnimate V3 equivalent (V3 uses temporal or "
                          "temporal+global attention with per-frame GroupNorm(32)); keep this model in kinema layout")
    return {
        "num_attention_heads": spec.get("num_attention_heads", 8),
        "num_transformer_block": spec.get("num_transformer_blocks", 1),
        "attention_block_types": [block_types[kind] for kind in kinds],
        "temporal_position_encoding": True,
        "temporal_position_encoding_max_len": spec.get("max_frames", 32),
        "temporal_attention_dim_div": 1,
        "block_size": 1,
        "remove_time_embedding_in_photo": False,
    }


def _v3_enable_uvit(config: dict[str, Any], where: str) -> bool:
    """V3's `enable_uvit` for a kinema config's skips; refuses skips V3 cannot express (it has no skips, or exactly
    its own 13 linears wired by block index)."""
    pairs = [tuple(pair) for pair in config["skip_pairs"]]
    linears, layers = config["num_skip_linears"], config["num_layers"]
    if not pairs and not linears:
        return False
    v3_pairs = easyanimate_v3_skip_pairs(layers)
    if pairs != v3_pairs or linears != EASYANIMATE_V3_SKIP_LINEARS:
        raise KinemaError(f"{where}: skips {pairs} with {linears} linears have no EasyAnimate V3 equivalent: V3 "
                          f"always stores {EASYANIMATE_V3_SKIP_LINEARS} skip linears and at {layers} blocks wires "
                          f"{v3_pairs or 'none of them'}; keep this model in kinema layout")
    return True


def easyanimate_config_from_video_dit(config: dict[str, Any]) -> dict[str, Any]:
    """kinema `VideoDiT` config -> EasyAnimate V3 `transformer/config.json` (the inverse of
    `video_dit_config_from_easyanimate`); refuses settings V3 has no field for."""
    where = "VideoDiT config"
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    layers, specs = config["num_layers"], config["motion_modules"]
    scale = config.get("interpolation_scale")
    if scale is not None and scale != max(config["sample_size"] // 64, 1):
        raise KinemaError(f"{where}: interpolation_scale {scale} differs from V3's sample_size // 64 rule")
    if config.get("num_image_tokens", V3_IMAGE_TOKENS) != V3_IMAGE_TOKENS \
            or config.get("image_embed_dim") not in (None, V3_IMAGE_EMBED_DIM):
        raise KinemaError(f"{where}: V3 has exactly {V3_IMAGE_TOKENS} CLIP image tokens from {V3_IMAGE_EMBED_DIM}-d "
                          "embeddings")
    with_clip = config.get("image_embed_dim") is not None
    if with_clip and config["in_channels"] != V3_INPAINT_CHANNELS:
        raise KinemaError(f"{where}: V3 has CLIP image tokens only in {V3_INPAINT_CHANNELS}-channel (InP) models")
    v3 = {"_class_name": "Transformer3DModel", **{name: config[name] for name in V3_SAME_FIELDS},
          "norm_type": "ada_norm_single", "enable_clip_in_inpaint": with_clip}
    motion = [_v3_motion_kwargs(spec, f"{where} block {i}") for i, spec in enumerate(specs)]
    if all(kwargs == motion[0] for kwargs in motion):
        v3.update(basic_block_type="motionmodule", motion_module_kwargs=motion[0])
    elif all(motion[i] == motion[i % 2] for i in range(layers)):
        v3.update(basic_block_type="global_motionmodule", motion_module_kwargs_even=motion[0],
                  motion_module_kwargs_odd=motion[1])
    else:
        raise KinemaError(f"{where}: V3 repeats one motion module, or alternates two, over its blocks; this model "
                          "varies them otherwise. Keep it in kinema layout")
    v3["enable_uvit"] = _v3_enable_uvit(config, where)
    return v3
