"""EasyAnimate V3's formats: the transformer folder (V3's config and names, or kinema's), the Slice VAE folder and the
whole model folder with its T5 and CLIP encoders.

config.py translates V3's transformer config into `VideoDiT` arguments and back; transformer.py loads, describes and
converts transformers; vae.py translates, loads and describes Slice VAE folders; folder.py loads whole model
folders; formats.py holds their entries in kinema's format registry (`kinema.loaders.load` and friends).
Each name below is imported from its module on first use (kinema.lazy), so the registry's entries stay light.
"""

from kinema.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    ".config": ("easyanimate_config_from_video_dit", "video_dit_config_from_easyanimate"),
    ".folder": ("EasyAnimateModel", "is_model_folder", "load_easyanimate"),
    ".transformer": ("check_video_dit_keys", "convert_easyanimate_transformer", "describe_easyanimate",
                     "load_video_dit", "looks_like"),
    ".vae": ("describe_slice_vae", "is_slice_vae_folder", "load_slice_vae", "read_slice_vae_config",
             "slice_vae_config_from_easyanimate"),
})
