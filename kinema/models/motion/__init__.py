"""Motion modules: AnimateDiff's temporal module, EasyAnimate's hybrid module, and the registry for custom ones."""

from kinema.models.motion.hybrid import HybridMotionModule
from kinema.models.motion.registry import MOTION_MODULES, build_motion_module, register_motion_module
from kinema.models.motion.temporal import (
    TemporalMotionModule,
    check_frame_count,
    sinusoidal_frame_encoding,
    video_group_norm,
)

__all__ = [
    "MOTION_MODULES",
    "HybridMotionModule",
    "TemporalMotionModule",
    "build_motion_module",
    "check_frame_count",
    "register_motion_module",
    "sinusoidal_frame_encoding",
    "video_group_norm",
]
