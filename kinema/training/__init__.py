"""Training: `kinema train CONFIG.yaml` (motion modules, LoRAs, the V3 transformer, the Slice VAE) on accelerate.
Each name is imported from its module on first use (kinema.lazy)."""

from __future__ import annotations

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".config": ("TrainConfig", "load_config", "config_from_dict", "MODES"),
    ".trainer": ("train", "TrainResult"),
})
