"""Every named model setting in one place: the published architectures kinema reads, as model keyword arguments.

Detection (kinema.loaders) returns these kwargs directly; models are built from them and save them in their
config, so a setting has one form from the file to the model and back.
"""

from __future__ import annotations

# ---------------------------------------------------------------- AnimateDiff (VideoUNet)

# ---------------------------------------------------------------- EasyAnimate V3 (VideoDiT, SliceVAE)
