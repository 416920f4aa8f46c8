"""Noise schedulers by kinema name, each family's training noise schedule filled in.

`SCHEDULERS` and `FAMILIES` are plain data (names, diffusers class names, settings), so a CLI can offer them as
choices without importing torch; `make_scheduler` imports diffusers and builds one.
"""

from __future__ import annotations

import inspect
from typing import Any

from kinema.errors import KinemaError

# kinema name -> (diffusers scheduler class, its settings beyond the family's noise schedule)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lcm": ("LCMScheduler", {}),
}

# diffusers' ways of placing the sampling steps over the training steps (each scheduler's `timestep_spacing`).
# `trailing` starts at the last training step and spaces evenly from it, what few-step distilled models such as
# AnimateDiff-Lightning are sampled with (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps Are
# Flawed"); each scheduler's own default is `leading` or `linspace`.
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
# Schedulers that place their steps themselves, whatever the spacing: Karras sigmas, and LCM's own schedule
# (tests/sampling/test_schedulers.py checks that the spacing moves every other scheduler's steps and not these).
SPACING_FIXED = {"dpmpp_2m_karras": "Karras sigmas", "lcm": "LCM's own step schedule"}

# model family -> the noise schedule it was trained with (epsilon prediction, 1000 training steps)
FAMILIES: dict[str, dict[str, Any]] = {
    # AnimateDiff's inference configs: linear betas 0.00085 .. 0.012 (not SD's scaled_linear), steps_offset 1.
    "animatediff": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "linear",
                    "steps_offset": 1, "prediction_type": "epsilon"},
    # EasyAnimate V3's inference settings: DDPM's linear betas 1e-4 .. 0.02, steps_offset 1.
    "easyanimate": {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                    "steps_offset": 1, "prediction_type": "epsilon"},
}


def _unknown(what: str, plural: str, name: str, known: list[str]) -> KinemaError:
    return KinemaError(f"unknown {what} {name!r}; known {plural}: {', '.join(known)}")


def check_timestep_spacing(spacing: str | None, scheduler: str | None) -> None:
    """One KinemaError line for a spacing that is not one of `TIMESTEP_SPACINGS`, or that `scheduler` (when known)
    would ignore, so that no video records a setting that did nothing."""
    if spacing is None:
        return
    if spacing not in TIMESTEP_SPACINGS:
        raise KinemaError(f"unknown timestep spacing {spacing!r}; known: {', '.join(TIMESTEP_SPACINGS)}")
    if scheduler in SPACING_FIXED:
        raise KinemaError(f"timestep spacing has no effect on the {scheduler} scheduler, which places its steps by "
                          f"{SPACING_FIXED[scheduler]}: leave the spacing out, or choose another scheduler (a speed "
                          "preset's counts too)")


def make_scheduler(name: str, family: str = "animatediff", **overrides: Any) -> Any:
    """A fresh diffusers scheduler for kinema scheduler `name` (a key of `SCHEDULERS`) with `family`'s noise schedule
    (a key of `FAMILIES`); `overrides` change any setting the scheduler class takes (e.g. `timestep_spacing`)."""
    if name not in SCHEDULERS:
        raise _unknown("scheduler", "schedulers", name, list(SCHEDULERS))
    if family not in FAMILIES:
        raise _unknown("model family", "model families", family, list(FAMILIES))
    import diffusers

    class_name, settings = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    accepted = set(inspect.signature(scheduler_class.__init__).parameters) - {"self"}
    wrong = sorted(set(overrides) - accepted)
    if wrong:
        raise KinemaError(f"scheduler {name!r} ({class_name}) has no setting {', '.join(wrong)}; its settings: "
                          f"{', '.join(sorted(accepted))}")
    config = {key: value for key, value in {**FAMILIES[family], **settings}.items() if key in accepted}
    return scheduler_class(**{**config, **overrides})
