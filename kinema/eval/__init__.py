"""Scoring generated videos (`kinema eval`): frame detectors that read the colour, shape and motion of the one shape
in a synthetic-style clip (kinema.data.synth), weight-free video metrics, prompt sets with their ground truth, and
`evaluate`, which generates a video per prompt and scores it. Each name is imported from its module on first use
(kinema.lazy)."""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".detectors": ("segment_object", "detect_colour", "detect_shape", "track", "motion_scores", "detect_motion",
                   "detect"),
    ".metrics": ("temporal_flicker", "dynamic_degree", "seam_score", "first_frame_psnr", "optical_flow",
                 "DynamicDegree"),
    ".prompts": ("read_prompts", "PromptEntry", "write_synth_prompt_set", "DEFAULT_PROMPTS",
                 "HELD_OUT_COMBINATIONS"),
    ".run": ("evaluate", "EvalReport", "format_report"),
})
