"""Motion modules: AnimateDiff's temporal module, EasyAnimate's hybrid module, and the registry for custom ones."""

from kinema.models.motion.hybrid import HybridMotionModule
from kinema.models.motion.norms import NORM_MODES, NormMode, check_norm_mode, video_group_norm
from kinema.models.motion.registry import (
    MOTION_MODULES,
    UNLIMITED_FRAMES,
    MotionModule,
    build_motion_module,
    initialize_motion_weights,
    motion_max_frames,
    motion_takes_text,
    register_motion_module,
    run_motion_module,
    set_motion_attention_chunk_size,
)
from kinema.models.motion.strength import MotionStrength, current_motion_strength, motion_strength
from kinema.models.motion.temporal import (
    TemporalMotionModule,
    check_frame_count,
    sinusoidal_frame_encoding,
)

__all__ = [
    "MOTION_MODULES",
    "NORM_MODES",
    "UNLIMITED_FRAMES",
    "HybridMotionModule",
    "MotionModule",
    "MotionStrength",
    "NormMode",
    "TemporalMotionModule",
    "build_motion_module",
    "check_frame_count",
    "check_norm_mode",
    "current_motion_strength",
    "initialize_motion_weights",
    "motion_max_frames",
    "motion_strength",
    "motion_takes_text",
    "register_motion_module",
    "run_motion_module",
    "set_motion_attention_chunk_size",
    "sinusoidal_frame_encoding",
    "video_group_norm",
]
