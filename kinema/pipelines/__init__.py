"""Generation pipelines: `generate()` over either model family (text-, image-, video-to-video, continuation),
the request it takes, loading a model for it, and writing its outputs.

Each name is imported from its module on first use (kinema.lazy), so importing this package imports no torch.
"""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".request": ("GenerationRequest", "ContextSettings", "FreeInitSettings", "FreeUSettings"),
    ".generation": ("generate", "GenerationResult", "decode_saved"),
    ".family": ("VideoFamily",),
    ".animatediff": ("AnimateDiffFamily",),
    ".easyanimate": ("EasyAnimateFamily",),
    ".load": ("load_family",),
    ".outputs": ("write_result", "save_latents", "load_latents"),
    ".text_encoding": ("encode_prompts",),
    ".decode": ("decode_latents",),
    ".from_parts": ("text_to_video",),
})
