"""EasyAnimate V3's formats: the transformer folder (V3's config and names, or kinema's), the Slice VAE folder and the
whole model folder with its T5 and CLIP encoders.

config.py translates V3's transformer config into `VideoDiT` arguments and back; transformer.py loads, describes and
converts transformers; vae.py translates, loads and describes Slice VAE folders; folder.py loads whole model
folders; formats.py holds their entries in kinema's format registry (`kinema.loaders.load` and friends).
"""

from kinema.loaders.easyanimate.config import easyanimate_config_from_video_dit, video_dit_config_from_easyanimate
from kinema.loaders.easyanimate.folder import EasyAnimateModel, is_model_folder, load_easyanimate
from kinema.loaders.easyanimate.transformer import (
    check_video_dit_keys,
    convert_easyanimate_transformer,
    describe_easyanimate,
    load_video_dit,
    looks_like,
)
from kinema.loaders.easyanimate.vae import (
    describe_slice_vae,
    is_slice_vae_folder,
    load_slice_vae,
    read_slice_vae_config,
    slice_vae_config_from_easyanimate,
)

__all__ = [
    "EasyAnimateModel",
    "check_video_dit_keys",
    "convert_easyanimate_transformer",
    "describe_easyanimate",
    "describe_slice_vae",
    "easyanimate_config_from_video_dit",
    "is_model_folder",
    "is_slice_vae_folder",
    "load_easyanimate",
    "load_slice_vae",
    "load_video_dit",
    "looks_like",
    "read_slice_vae_config",
    "slice_vae_config_from_easyanimate",
    "video_dit_config_from_easyanimate",
]
