"""kinema's models: the video-model contract, the AnimateDiff `VideoUNet`, the EasyAnimate V3 `VideoDiT` and
`SliceVAE`, the motion modules they carry and the published architectures as presets.

Each name is imported from its module on first use (kinema.lazy), so `kinema.models.motion` alone stays light.
"""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".video_model": ("VideoModel", "timesteps_per_clip"),
    ".video_unet": ("VideoUNet",),
    ".video_dit": ("VideoDiT", "VIDEO_DIT_PRESETS"),
    ".slice_vae": ("SliceVAE",),
    ".presets": ("ANIMATEDIFF_VERSIONS", "easyanimate_v3_xl_2"),
    ".motion": ("register_motion_module", "build_motion_module"),
})
