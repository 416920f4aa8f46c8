"""EasyAnimate V3's formats: the transformer folder (V3's config and names, or kinema's), the Slice VAE folder and the
whole model folder with its T5 and CLIP encoders."""
