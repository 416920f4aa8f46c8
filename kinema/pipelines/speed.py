"""Speed presets: `--speed fast|balanced|quality`, each a set of GenerationRequest settings.

A preset fills only the settings a user left unset (a front end passes the ones given as `keep`), so
`--speed fast --steps 20` keeps 20 steps. `quality` is the model's own defaults (its kinema.json, or the family's
scheduler at 25 steps, float32). bfloat16 is chosen only where the device runs it natively: a CPU without
AVX-512 BF16 / AMX emulates it about 100x slower than float32 (kinema.pipelines.generation warns of the same), so
there `fast` quantises the video model's Linear layers to int8 instead.
The figures behind each choice are in docs/speed.md (benchmarks/bench_speed.py measures them).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from kinema.errors import KinemaError
from kinema.pipelines.request import SPEEDS, GenerationRequest

logger = logging.getLogger(__name__)

# preset -> GenerationRequest settings. DPM++ 2M with Karras sigmas reaches at 10-15 steps what DDIM does at 25;
# step caching and guidance truncation cut the model calls of those steps further.
SPEED_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"scheduler": "dpmpp_2m_karras", "steps": 10, "dtype": "bfloat16", "cache_interval": 2,
             "cfg_truncation": 0.6},
    "balanced": {"scheduler": "dpmpp_2m_karras", "steps": 15, "dtype": "bfloat16", "cfg_truncation": 0.8},
    "quality": {},
}
assert tuple(SPEED_PRESETS) == SPEEDS
# What a preset uses in place of bfloat16 on a CPU that lacks it: int8 Linear layers run on any x86 CPU (fbgemm),
# 1.2-2x faster than float32 with outputs within ~1% (kinema.models.optimize; benchmarks/bench_optimize.py).
CPU_WITHOUT_BFLOAT16: dict[str, dict[str, Any]] = {"fast": {"quantize": "int8"}}


def _here(device: Any) -> Any:
    """The torch device `device` (one, or a kinema.devices name such as auto) is on this machine; None where this
    machine lacks it, and for None (a device of machines not this one: Ray workers')."""
    import torch

    from kinema.devices import resolve_device

    if device is None:
        return None
    try:
        return resolve_device(device) if isinstance(device, str) else torch.device(device)
    except KinemaError:
        return None


def native_bfloat16(device: Any = "cpu") -> bool:
    """Whether `device` (a torch device, or a kinema.devices name such as auto) runs bfloat16 matmuls natively
    (CUDA: compute capability 8+; CPU: AVX-512 BF16 or AMX); False for a device this machine lacks."""
    import torch

    device = _here(device)
    if device is None:  # another machine's (a Ray worker's): no bfloat16 assumed
        return False
    if device.type == "cuda":
        # torch counts pre-Ampere GPUs' emulated bfloat16 as supported by default; emulated is slow, so not native.
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def preset_settings(name: str, device: Any = "cpu") -> dict[str, Any]:
    """The settings of preset `name` on `device` (a new dict): bfloat16 only where it runs natively."""
    if name not in SPEED_PRESETS:
        raise KinemaError(f"unknown speed preset {name!r}; known presets: {', '.join(SPEED_PRESETS)}")
    settings = dict(SPEED_PRESETS[name])
    if settings.get("dtype") == "bfloat16" and not native_bfloat16(device):
        logger.info("speed %s: this device has no native bfloat16, so the models stay in float32", name)
        del settings["dtype"]

        if getattr(_here(device), "type", None) == "cpu":
            settings.update(CPU_WITHOUT_BFLOAT16.get(name, {}))
    return settings


def chosen_settings(name: str, given: Mapping[str, Any], device: Any = "cpu") -> dict[str, Any]:
    """What preset `name` sets when the user gave `given` (setting -> value; those win): its settings less the
    given ones, no int8 when the user asked for half precision, and no half precision when the user asked for int8
    (int8 takes a float32 model)."""
    chosen = {key: value for key, value in preset_settings(name, device).items() if key not in given}
    if given.get("dtype") not in (None, "float32"):
        chosen.pop("quantize", None)
    if given.get("quantize") is not None and chosen.get("dtype") not in (None, "float32"):
        chosen.pop("dtype")
    return chosen


def apply_speed(request: GenerationRequest, name: str, *, keep: Collection[str] = (),
                device: Any = "cpu") -> GenerationRequest:
    """`request` with preset `name`'s settings, except the fields named in `keep` (those the user set), and
    `speed=name` recorded."""
    given = {key: getattr(request, key) for key in keep}
    return replace(request, **chosen_settings(name, given, device), speed=name)


def describe_speed(name: str, settings: Mapping[str, Any]) -> str:
    """One line saying what a preset's settings do, for the run's log: e.g. `speed fast: dpmpp_2m_karras, 10 steps,
    bfloat16, deep features every 2 steps, guidance on the first 60% of steps`."""
    parts = []
    if settings.get("scheduler"):
        parts.append(str(settings["scheduler"]))
    if settings.get("steps"):
        parts.append(f"{settings['steps']} steps")
    if settings.get("dtype"):
        parts.append(str(settings["dtype"]))
    if settings.get("quantize"):
        parts.append(f"{settings['quantize']} Linear layers")
    if settings.get("compile"):
        parts.append("torch.compile")
    if settings.get("cache_interval") and settings["cache_interval"] > 1:
        parts.append(f"deep features every {settings['cache_interval']} steps")
    if settings.get("cfg_truncation") is not None:
        parts.append(f"guidance on the first {round(100 * settings['cfg_truncation'])}% of steps")
    return f"speed {name}: " + (", ".join(parts) if parts else "the model's own settings")
