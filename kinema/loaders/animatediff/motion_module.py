"""AnimateDiff motion modules in one import: recognise a file, resolve its settings, load it into a VideoUNet, save
it back, convert it.

Three layouts hold the same weights:
- "animatediff-original": published `.ckpt`/`.safetensors`, names `...motion_modules.N.temporal_transformer...` plus a
  sinusoidal `pos_encoder.pe` buffer `(1, L, C)` per attention.
- "animatediff-diffusers": a `MotionAdapter` folder (config.json + diffusion_pytorch_model.safetensors), diffusers
  names plus one `pos_embed.pe` per transformer block.
- "kinema": `.safetensors` with the original names, no `pe`, and the motion settings in its metadata.
The `pe` buffers only tell the frame-encoding length L; they are checked against the sinusoidal table and dropped,
because kinema recomputes the table.

The work is split by step: `structure` (names and shapes), `settings` (the VideoUNet keyword arguments, the one
form settings take), `detect` (layout, version, settings), `load` (reading, and loading into a VideoUNet) and
`write` (the three layouts, saving, converting).
"""

from kinema.loaders.animatediff.detect import (
    MotionModuleInfo,
    classify_version,
    detect_motion_module,
    motion_label,
    motion_settings,
)
from kinema.loaders.animatediff.load import (
    ADAPTER_WEIGHTS_FILE,
    MotionModuleFile,
    adapter_files,
    load_motion_module,
    read_motion_module,
    to_kinema_motion_state_dict,
)
from kinema.loaders.animatediff.settings import OVERRIDABLE, video_unet_settings
from kinema.loaders.animatediff.structure import (
    KINEMA_LAYOUT_TAG,
    check_frame_tables,
    expected_motion_shapes,
    guess_kind,
)
from kinema.loaders.animatediff.write import (
    MOTION_MODULE_LAYOUTS,
    convert_motion_module,
    save_motion_module,
    write_motion_module,
)

__all__ = [
    "ADAPTER_WEIGHTS_FILE",
    "KINEMA_LAYOUT_TAG",
    "MOTION_MODULE_LAYOUTS",
    "OVERRIDABLE",
    "MotionModuleFile",
    "MotionModuleInfo",
    "adapter_files",
    "check_frame_tables",
    "classify_version",
    "convert_motion_module",
    "detect_motion_module",
    "expected_motion_shapes",
    "guess_kind",
    "load_motion_module",
    "motion_label",
    "motion_settings",
    "read_motion_module",
    "save_motion_module",
    "to_kinema_motion_state_dict",
    "video_unet_settings",
    "write_motion_module",
]
