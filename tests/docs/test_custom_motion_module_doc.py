"""Runs every Python block of docs/custom_motion_module.md, in order, and checks what the page claims."""

import torch
from tiny_models import CUSTOM_MOTION_MODULE_DOC as DOC
from tiny_models import python_blocks

from kinema.models.motion import MOTION_MODULES


def test_the_doc_runs_and_its_claims_hold():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 4
    registration = [line for line in blocks[0].splitlines() if line.strip()]
    assert len(registration) < 30  # the page promises registration in under 30 lines
    namespace: dict = {"__name__": "custom_motion_module_doc"}
    try:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        MOTION_MODULES.pop("my_conv", None)  # leave the global registry as other tests expect it

    modules = [module for _, module in namespace["video_unet"].motion_modules()]
    assert len(modules) == 6 and all(type(m).__name__ == "TemporalConv" for m in modules)
    # Identity at initialisation: the video UNet reproduced the image UNet on a frame.
    assert namespace["identity_error"] < 1e-5
    # Training moved the zero-initialised output convolutions and lowered the held-out loss.
    assert all(m.conv_out.weight.abs().max().item() > 1e-4 for m in modules)
    assert namespace["loss_after"] < namespace["loss_before"]
    # Only motion weights trained: the 2D UNet's weights are exactly the ones it started from.
    unet2d, video_unet = namespace["unet2d"], namespace["video_unet"]
    assert all(torch.equal(video_unet.unet.state_dict()[k], v) for k, v in unet2d.state_dict().items())
    assert namespace["reload_error"] <= 1e-5
