"""AnimateDiff's formats: motion modules (original v1/v2/v3 files, diffusers MotionAdapter folders, kinema files) and
motion LoRAs, read, checked, loaded into a `VideoUNet` and written in each layout.

Everything in `__all__` can be imported from here; each name is imported from its module on first use, so that
importing one light module of this package (the key maps, the registry's describers) does not import torch models,
diffusers and peft with it.
"""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".detect": ("MotionModuleInfo", "detect_motion_module", "motion_settings"),
    ".load": ("MotionModuleFile", "adapter_files", "load_motion_module", "read_motion_module"),
    ".write": ("MOTION_MODULE_LAYOUTS", "convert_motion_module", "save_motion_module", "write_motion_module"),
    ".settings": ("OVERRIDABLE", "video_unet_settings"),
    ".structure": ("check_frame_tables", "expected_motion_shapes", "guess_kind"),
    ".keys": ("diffusers_to_original_key", "original_to_diffusers_key"),
    ".motion_lora": ("load_motion_lora", "loaded_motion_loras", "set_motion_lora_strength", "unload_motion_lora"),
    ".motion_lora_keys": ("MotionLora", "convert_motion_lora", "describe_motion_lora", "parse_motion_lora"),
})
