"""Motion LoRAs on a `VideoUNet`: load several at once with their own strengths, change them, unload them exactly.

Two ways to apply a LoRA, chosen per LoRA:
- as a peft adapter (default): peft wraps each targeted projection and adds `strength * scale * up(down(x))` to its
  output; the strength changes for free, and unloading removes the wrapper, so the original layer is back untouched.
- merged (`merge=True`), as the original AnimateDiff repo does: `W += strength * scale * up @ down` on the weights,
  no run-time cost. The weights a merge changes are first copied (on the CPU) once, so that unloading or re-weighting
  rebuilds them from that copy plus the merges still loaded, in load order: the result is bit-exact, never a
  subtraction. That copy costs the targeted weights' size (~660 MB fp32 for SD1.5 motion modules with a mid block).

`scale` is 1 for files without alpha (the MotionLoRA rule: strength 1 is exactly the original `W += up @ down`) and
alpha / r for peft-style files carrying alpha. Key layouts and conversion live in `motion_lora_keys.py`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, cast

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from kinema.errors import KinemaError
from kinema.loaders.animatediff.motion_lora_keys import (
    LoraPair,
    MotionLora,
    convert_motion_lora,
    describe_motion_lora,
    parse_motion_lora,
    summarize_motion_lora,
)
from kinema.loaders.checkpoint_io import check_weight_values, read_checkpoint
from kinema.models.video_unet import VideoUNet
from kinema.state_dicts import problems_phrase

__all__ = [
    "convert_motion_lora",
    "describe_motion_lora",
    "load_motion_lora",
    "loaded_motion_loras",
    "set_motion_lora_strength",
    "unload_motion_lora",
]

_STATE_ATTR = "_kinema_motion_loras"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class _Loaded:
    lora: MotionLora
    strength: float
    merged: bool

    @cached_property
    def pairs(self) -> dict[str, LoraPair]:
        """LoRA factors by module path inside `VideoUNet.unet`."""
        return {slot.module_path: pair for slot, pair in self.lora.layers.items()}


@dataclass
class _State:
    """What is loaded on one VideoUNet, in load order, and the pre-merge copies of merged weights."""

    loaded: dict[str, _Loaded] = field(default_factory=dict)
    pristine: dict[str, torch.Tensor] = field(default_factory=dict)


def _state(video_unet: VideoUNet) -> _State:
    if not isinstance(video_unet, VideoUNet):
        raise KinemaError(f"motion LoRAs apply to a kinema VideoUNet, got {type(video_unet).__name__}")
    state = getattr(video_unet, _STATE_ATTR, None)
    if state is None:
        state = _State()
        setattr(video_unet, _STATE_ATTR, state)
    return state


def _check_strength(strength: float) -> float:
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise KinemaError(f"motion LoRA strength must be a number, got {strength!r}") from None
    from kinema.pipelines.request import check_lora_weight

    return check_lora_weight(value, "motion LoRA strength")


def _entry(state: _State, name: str) -> _Loaded:
    if name not in state.loaded:
        raise KinemaError(f"no motion LoRA named {name!r} is loaded; loaded: {sorted(state.loaded) or 'none'}")
    return state.loaded[name]


def _base_layer(unet: nn.Module, path: str) -> nn.Module:
    """The layer at `path`, or the one a peft wrapper there wraps."""
    layer = unet.get_submodule(path)
    return layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer


def _base_linear(unet: nn.Module, path: str) -> nn.Linear:
    layer = _base_layer(unet, path)
    if not isinstance(layer, nn.Linear):  # _check_fits refuses such a LoRA before anything is merged
        raise KinemaError(f"{path} is a {type(layer).__name__}, not a Linear a motion LoRA can merge into")
    return layer


def _lora_layer(unet: nn.Module, path: str) -> LoraLayer:
    """The peft LoRA wrapper at `path`, one that `_inject` targeted (so the cast is what is there)."""
    return cast(LoraLayer, unet.get_submodule(path))


def _check_fits(unet: nn.Module, lora: MotionLora) -> None:
    problems = []
    for slot, pair in lora.layers.items():
        try:
            base = _base_layer(unet, slot.module_path)
        except AttributeError:
            problems.append(f"{lora.keys[slot]} (the UNet has no {slot.module_path})")
            continue
        if not isinstance(base, nn.Linear):
            problems.append(f"{lora.keys[slot]} ({slot.module_path} is a {type(base).__name__}, not a Linear)")
        elif (pair.down.shape[1], pair.up.shape[0]) != (base.in_features, base.out_features):
            problems.append(f"{lora.keys[slot]} (LoRA maps {pair.down.shape[1]}->{pair.up.shape[0]} channels, the "
                            f"layer {base.in_features}->{base.out_features})")
    if problems:
        raise KinemaError(
            f"the motion LoRA does not fit this UNet's motion modules: {len(problems)} of {len(lora.layers)} layers, "
            f"e.g. {'; '.join(problems[:3])}. Use a LoRA made for this motion module (SD1.5 vs SDXL; a mid-block "
            "LoRA needs a UNet built with motion_mid_block=True)")


# ---------------------------------------------------------------- merged into the weights


def _merge_delta(strength: float, pair: LoraPair, weight: torch.Tensor) -> torch.Tensor:
    """`strength * scale * up @ down` in fp32 on the weight's device, `(C_out, C_in)`."""
    up = pair.up.to(weight.device, torch.float32)
    down = pair.down.to(weight.device, torch.float32)
    # The original repo's `W += alpha * torch.mm(up, down)`, kept in that form (and added in fp32, cast on the way
    # in) so that results match it bit for bit.
    return (strength * pair.scale) * torch.mm(up, down)


@torch.no_grad()
def _rebuild_merged(unet: nn.Module, state: _State, paths: Iterable[str]) -> None:
    """Set each weight in `paths` to its pre-merge copy plus every merged LoRA still loaded, in load order."""
    for path in dict.fromkeys(paths):
        weight = _base_linear(unet, path).weight
        if path not in state.pristine:
            state.pristine[path] = weight.detach().to("cpu", copy=True)
        weight.copy_(state.pristine[path])
        merged = [e for e in state.loaded.values() if e.merged and path in e.pairs]
        for entry in merged:
            weight.add_(_merge_delta(entry.strength, entry.pairs[path], weight))
        if not merged:
            del state.pristine[path]


# ---------------------------------------------------------------- peft adapters


@contextmanager
def _trainability_kept(unet: nn.Module) -> Iterator[None]:
    """Undo peft's changes to which existing parameters train (its first adapter freezes the whole model)."""
    before = [(param, param.requires_grad) for param in unet.parameters()]
    try:
        yield
    finally:
        for param, flag in before:
            param.requires_grad_(flag)


def _tuner_layers(unet: nn.Module) -> dict[str, BaseTunerLayer]:
    return {path: module for path, module in unet.named_modules() if isinstance(module, BaseTunerLayer)}


class _LoadResult(Protocol):
    """What `set_peft_model_state_dict` returns: torch's `load_state_dict` result (peft annotates it as a bare
    namedtuple, which tells a type checker none of its fields)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _inject(unet: nn.Module, name: str, entry: _Loaded) -> None:
    pairs = entry.pairs
    ranks = {path: pair.rank for path, pair in pairs.items()}
    alphas = {path: float(pair.alpha) if pair.alpha is not None else float(pair.rank) for path, pair in pairs.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        # peft annotates lora_alpha as an int, but uses it as `alpha / r` and so takes the float alphas files hold
        r=rank, lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=0.0, target_modules=sorted(pairs), inference_mode=True,
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha},
    )
    # peft makes the new adapter the only active one on every LoRA layer of the model; note what was active.
    active = {path: list(layer.active_adapters) for path, layer in _tuner_layers(unet).items()}
    try:
        with _trainability_kept(unet):
            with warnings.catch_warnings():
                # peft warns whenever a second adapter joins a model; several motion LoRAs at once are the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(config, unet, adapter_name=name)
            weights = {f"{path}.{part}.weight": tensor for path, pair in pairs.items()
                       for part, tensor in (("lora_A", pair.down), ("lora_B", pair.up))}
            result = cast(_LoadResult, set_peft_model_state_dict(unet, weights, adapter_name=name))
            own = re.compile(rf"\.lora_[AB]\.{re.escape(name)}\.weight$")
            problems = {"unexpected": list(result.unexpected_keys),
                        "not loaded": [k for k in result.missing_keys if own.search(k)]}
            if any(problems.values()):
                raise KinemaError(f"peft did not take every motion-LoRA weight: {problems_phrase(problems)}")
            for path, layer in _tuner_layers(unet).items():
                layer.set_adapter(active.get(path, []) + ([name] if path in pairs else []))
    except Exception:  # undo whatever peft had done, so a failed load changes nothing
        with _trainability_kept(unet):
            for path, layer in _tuner_layers(unet).items():
                layer.set_adapter(active.get(path, [name]))
        _remove_adapter(unet, name, [path for path, layer in _tuner_layers(unet).items()
                                     if isinstance(layer, LoraLayer) and name in layer.lora_A])
        raise
    for path in pairs:
        layer = _lora_layer(unet, path)
        # Loaded LoRAs stay frozen, so that freeze_base() + training never picks them up by accident.
        layer.lora_A[name].requires_grad_(False)
        layer.lora_B[name].requires_grad_(False)
        layer.set_scale(name, entry.strength)


def _remove_adapter(unet: nn.Module, name: str, paths: Iterable[str]) -> None:
    with _trainability_kept(unet):
        for path in paths:
            layer = _lora_layer(unet, path)
            remaining = [a for a in layer.active_adapters if a != name]
            layer.delete_adapter(name)
            if layer.lora_A:
                layer.set_adapter(remaining)
            else:  # no adapter left: put the original Linear back, so the module tree is as before any LoRA
                parent, _, child = path.rpartition(".")
                setattr(unet.get_submodule(parent), child, layer.get_base_layer())
    configs = getattr(unet, "peft_config", {})
    configs.pop(name, None)
    if not configs and hasattr(unet, "peft_config"):
        del unet.peft_config


# ---------------------------------------------------------------- public API


def load_motion_lora(
    video_unet: VideoUNet,
    lora: str | os.PathLike | Mapping[str, torch.Tensor],
    name: str,
    strength: float = 1.0,
    merge: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Apply a motion LoRA (file or state dict, any layout) to a VideoUNet's motion modules under `name`.

    Several LoRAs can be loaded at once; their updates add up. At strength s, a projection's weight becomes
    `W + s * up @ down` (times alpha / r for files with alpha): strength 1 is the original MotionLoRA merge.
    `merge=True` writes that into the weights (as the original repo does) instead of adding a peft adapter; both
    compute the same function. `metadata`: a state dict's safetensors metadata (read from the file for a path),
    where diffusers keeps the alpha of peft-named files. The VideoUNet's forward keeps its shapes, `(B, C, F, H, W)`
    in and out.

    Returns the LoRA's summary (see `describe_motion_lora`). Raises `KinemaError`, before changing anything, for a
    bad name or strength, a malformed file, or a LoRA whose layers or channel sizes do not fit the motion modules.

    While a peft adapter is loaded, the targeted projections are peft wrappers (`to_q.base_layer.weight`, ...), so
    `VideoUNet.motion_state_dict()` has other names: save motion-module weights after unloading, or merge instead.
    """
    state = _state(video_unet)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KinemaError(f"motion LoRA name {name!r} must be letters, digits, '_' or '-' (it names a peft adapter)")
    if name in state.loaded:
        raise KinemaError(f"a motion LoRA named {name!r} is already loaded; unload it first or pick another name")
    strength = _check_strength(strength)
    state_dict: Mapping[str, torch.Tensor] = lora if not isinstance(lora, (str, os.PathLike)) else {}
    if isinstance(lora, (str, os.PathLike)):
        checkpoint = read_checkpoint(lora)
        state_dict, metadata = checkpoint.tensors, checkpoint.metadata
    check_weight_values(state_dict, f"{lora} (a motion LoRA)" if isinstance(lora, (str, os.PathLike)) else
                        "the motion LoRA")
    parsed = parse_motion_lora(state_dict, metadata)
    _check_fits(video_unet.unet, parsed)
    entry = _Loaded(parsed, strength, bool(merge))
    state.loaded[name] = entry
    try:
        if entry.merged:
            _rebuild_merged(video_unet.unet, state, entry.pairs)
        else:
            _inject(video_unet.unet, name, entry)
    except Exception:
        del state.loaded[name]
        if entry.merged:
            _rebuild_merged(video_unet.unet, state, entry.pairs)
        raise
    return summarize_motion_lora(parsed, len(state_dict))


def set_motion_lora_strength(video_unet: VideoUNet, name: str, strength: float) -> None:
    """Change a loaded motion LoRA's strength (a merged one is rebuilt from the pre-merge weights, exactly)."""
    state = _state(video_unet)
    entry = _entry(state, name)
    entry.strength = _check_strength(strength)
    if entry.merged:
        _rebuild_merged(video_unet.unet, state, entry.pairs)
    else:
        for path in entry.pairs:
            _lora_layer(video_unet.unet, path).set_scale(name, entry.strength)


def unload_motion_lora(video_unet: VideoUNet, name: str) -> None:
    """Remove a motion LoRA; the weights and outputs are exactly what they would be had it never been loaded."""
    state = _state(video_unet)
    entry = _entry(state, name)
    del state.loaded[name]
    if entry.merged:
        _rebuild_merged(video_unet.unet, state, entry.pairs)
    else:
        _remove_adapter(video_unet.unet, name, entry.pairs)


def loaded_motion_loras(video_unet: VideoUNet) -> dict[str, dict[str, Any]]:
    """`{name: {"strength": s, "merged": bool, "layers": n}}` for every loaded motion LoRA, in load order."""
    return {name: {"strength": e.strength, "merged": e.merged, "layers": len(e.lora.layers)}
            for name, e in _state(video_unet).loaded.items()}
