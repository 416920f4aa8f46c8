"""Scoring generated videos: frame detectors that read the colour, shape and motion of the one shape in a
synthetic-style clip (kinema.data.synth). Each name is imported from its module on first use (kinema.lazy)."""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".detectors": ("segment_object", "detect_colour", "detect_shape", "track", "motion_scores", "detect_motion",
                   "detect"),
})
