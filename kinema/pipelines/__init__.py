"""Generation pipelines: text to video for the AnimateDiff family (library functions; no files written).

Each name is imported from its module on first use (kinema.lazy), so importing this package imports no torch.
"""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".text_encoding": ("encode_prompts",),
    ".decode": ("decode_latents",),
    ".text_to_video": ("text_to_video",),
})
