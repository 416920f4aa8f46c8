"""Video UNet: inflation, placement, parity with diffusers' UNetMotionModel, norm modes, motion weights apart."""

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from tiny_models import TINY_UNET, perturb

from kinema.errors import KinemaError
from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.models.video_unet import AcrossFramesGroupNorm, VideoUNet, frames_per_clip


def inputs(frames=4, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, 16, 16, generator=gen), torch.tensor([10, 700])[:batch],
            torch.randn(batch, 7, 32, generator=gen))


def test_fresh_inflation_reproduces_the_2d_unet_on_every_frame(unet2d):
    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=True)
    assert all(torch.equal(video.unet.state_dict()[k], v) for k, v in unet2d.state_dict().items())
    x, t, text = inputs()
    out = video(x, t, text)
    for f in range(x.shape[2]):
        expected = unet2d(x[:, :, f], t, text).sample
        assert (out[:, :, f] - expected).abs().max().item() < 1e-5


def test_placement_matches_animatediff(unet2d):
    names = [name for name, _ in VideoUNet.from_unet2d(unet2d, motion_mid_block=True).motion_modules()]
    assert names == [f"down_blocks.{i}.motion_modules.{j}" for i in range(2) for j in range(2)] + [
        f"up_blocks.{i}.motion_modules.{j}" for i in range(2) for j in range(3)] + ["mid_block.motion_modules.0"]
    without_mid = VideoUNet.from_unet2d(unet2d, motion_mid_block=False)
    assert len(list(without_mid.motion_modules())) == 10


def test_inflation_refuses_a_2d_unet_whose_weights_do_not_fit_its_config():
    # E.g. a UNet patched by hand: its state dict holds a tensor that the UNet its config builds has no place for.
    patched = UNet2DConditionModel(**TINY_UNET)
    patched.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(KinemaError, match=r"2D UNet's weights do not fit its own config: 1 unexpected \(e.g. extra\)"):
        VideoUNet.from_unet2d(patched)


@pytest.mark.parametrize("mid_block", [True, False], ids=["v2-style", "v3-style"])
def test_parity_with_diffusers_unet_motion_model(unet2d, mid_block):
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=mid_block)
    perturb(adapter, seed=3, scale=0.1)
    reference = UNetMotionModel.from_unet2d(unet2d, adapter).eval()

    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=mid_block, resnet_norm_mode="per_frame",
                                  motion_module={"type": "temporal", "norm_mode": "across_frames", "max_frames": 32})
    motion = {diffusers_to_original_key(k): v for k, v in reference.state_dict().items()
              if ".motion_modules." in k and not k.endswith("pos_embed.pe")}
    video.load_motion_state_dict(motion)

    x, t, text = inputs(frames=5)
    with torch.no_grad():
        # diffusers' UNetMotionModel takes text tokens already repeated per frame, (B*F, L, D).
        expected = reference(x, t, text.repeat_interleave(x.shape[2], dim=0)).sample
        out = video(x, t, text)
    assert expected.abs().mean().item() > 0.1
    assert (out - expected).abs().max().item() <= 1e-4
    # The motion modules matter: without them the outputs differ by far more than the tolerance.
    assert (VideoUNet.from_unet2d(unet2d, motion_mid_block=mid_block)(x, t, text) - expected).abs().max() > 1e-2


def test_across_frames_resnet_norm_is_a_5d_group_norm(unet2d):
    video = VideoUNet.from_unet2d(unet2d, resnet_norm_mode="across_frames")
    norms = [m for m in video.unet.modules() if isinstance(m, AcrossFramesGroupNorm)]
    # 2 per resnet (4 down, 1+1 mid, 6 up) plus conv_norm_out
    assert len(norms) == 2 * (4 + 2 + 6) + 1
    x = torch.randn(6, 32, 4, 4)
    five_d = x.view(2, 3, 32, 4, 4).permute(0, 2, 1, 3, 4)
    expected = torch.nn.functional.group_norm(five_d, 32, norms[0].weight, norms[0].bias, norms[0].eps)
    with frames_per_clip(3):
        assert torch.allclose(norms[0](x), expected.permute(0, 2, 1, 3, 4).reshape(6, 32, 4, 4), atol=1e-6)
    a, t, text = inputs(frames=3)
    per_frame = VideoUNet.from_unet2d(unet2d)
    assert (video(a, t, text) - per_frame(a, t, text)).abs().max().item() > 1e-3


def test_motion_weights_save_apart_and_whole_model_round_trips(unet2d, tmp_path):
    torch.manual_seed(0)
    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=True)
    perturb(video, seed=5)
    video.save_pretrained(tmp_path / "model")
    again = VideoUNet.from_pretrained(tmp_path / "model")
    x, t, text = inputs(frames=3)
    with torch.no_grad():
        assert (again(x, t, text) - video(x, t, text)).abs().max().item() <= 1e-5

    fresh = VideoUNet.from_unet2d(unet2d, motion_mid_block=True)
    fresh.unet.load_state_dict({**fresh.unet.state_dict(),
                                **{k: v for k, v in video.unet.state_dict().items() if ".motion_modules." not in k}})
    fresh.load_motion_state_dict(video.motion_state_dict())
    with torch.no_grad():
        assert (fresh(x, t, text) - video(x, t, text)).abs().max().item() <= 1e-5


def test_per_frame_text_tokens(unet2d):
    # Text tokens given per frame, (B, F, L, D), each frame different. A fresh inflation has identity motion modules,
    # so frame f of clip b must be the 2D UNet's result on that clip's frame f and that frame's own tokens.
    video = VideoUNet.from_unet2d(unet2d)
    x, t, shared = inputs(frames=3)
    per_frame = torch.randn(2, 3, 7, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = video(x, t, per_frame)
        for b in range(2):
            for f in range(3):
                expected = unet2d(x[b:b + 1, :, f], t[b:b + 1], per_frame[b:b + 1, f]).sample
                # Same diffusers kernels on a batch of 1 instead of 6: GEMM blocking moves the last bits only.
                torch.testing.assert_close(out[b:b + 1, :, f], expected, atol=1e-5, rtol=0, msg=f"clip {b} frame {f}")
        # The tokens matter here: one frame's tokens for all frames gives another result.
        assert (video(x, t, per_frame[:, :1].expand(-1, 3, -1, -1)) - out)[:, :, 1:].abs().max().item() > 1e-3
        # Shared tokens (B, L, D) are the same tokens given to every frame.
        assert torch.equal(video(x, t, shared), video(x, t, shared[:, None].expand(-1, 3, -1, -1)))


def test_diffusers_folded_per_frame_text_states(unet2d):
    # diffusers' AnimateDiff pipeline passes text states as (B*F, L, D), row b*F + f for frame f of clip b. A fresh
    # inflation has identity motion modules, so each frame must get the 2D UNet's result on its own frame's tokens.
    video = VideoUNet.from_unet2d(unet2d)
    x, t, _ = inputs(frames=3)
    folded = torch.randn(2 * 3, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = video(x, t, folded)
        for b in range(2):
            for f in range(3):
                expected = unet2d(x[b:b + 1, :, f], t[b:b + 1], folded[b * 3 + f:b * 3 + f + 1]).sample
                assert (out[b:b + 1, :, f] - expected).abs().max().item() < 1e-5, (b, f)
        assert torch.equal(video(x, t, folded.reshape(2, 3, 7, 32)), out)
    for wrong in (torch.randn(4, 7, 32), torch.randn(2, 2, 7, 32)):
        with pytest.raises(KinemaError, match=r"do not fit 2 clip\(s\) of 3 frames.*\(6, L, D\)") as err:
            video(x, t, wrong)
        assert "\n" not in str(err.value)


def test_freeze_base_leaves_only_motion_trainable(unet2d):
    video = VideoUNet.from_unet2d(unet2d)
    video.freeze_base()
    trainable = {n for n, p in video.named_parameters() if p.requires_grad}
    assert trainable and all(".motion_modules." in n for n in trainable)
    assert sum(p.numel() for n, p in video.named_parameters() if p.requires_grad) == sum(
        v.numel() for v in video.motion_state_dict().values())


def count_forward_calls(module: torch.nn.Module, counts: dict[str, int], name: str) -> None:
    """Count every run of `module.forward`. Forward hooks cannot count recomputation: torch's checkpoint stops a
    recomputation as soon as it has the tensors it needs, before the hooks after `forward` would run."""
    forward = module.forward

    def counting(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return forward(*args, **kwargs)

    module.forward = counting


def test_gradient_checkpointing_reruns_every_motion_module_once(unet2d):
    # Modules after attentions checkpoint their own blocks; modules after resnets rerun inside the resnet's checkpoint
    # and must not checkpoint themselves as well (that made three runs, not two).
    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=True)
    perturb(video, seed=7)
    counts: dict[str, int] = {}
    for name, module in video.motion_modules():
        count_forward_calls(module.temporal_transformer.transformer_blocks[0], counts, name)
    video.train()
    video.enable_gradient_checkpointing()
    x, t, text = inputs(frames=3)
    video(x, t, text).square().mean().backward()
    assert counts == {name: 2 for name, _ in video.motion_modules()}


def test_gradient_checkpointing_gives_the_same_gradients(unet2d):
    torch.manual_seed(0)
    video = VideoUNet.from_unet2d(unet2d)
    perturb(video, seed=7)
    counts: dict[str, int] = {}
    motion = dict(video.motion_modules())["down_blocks.0.motion_modules.0"]
    count_forward_calls(motion.temporal_transformer.transformer_blocks[0], counts, "motion block")
    count_forward_calls(video.unet.down_blocks[1].resnets[0], counts, "2D resnet")
    x, t, text = inputs(frames=3)
    video.train()
    video(x, t, text).square().mean().backward()
    assert counts == {"motion block": 1, "2D resnet": 1}
    grads = {n: p.grad.clone() for n, p in video.named_parameters() if ".motion_modules." in n}
    video.zero_grad()
    counts.clear()
    video.enable_gradient_checkpointing()
    video(x, t, text).square().mean().backward()
    # Checkpointing ran: the backward pass recomputed both (at least once; nested checkpoints recompute more).
    assert counts["motion block"] >= 2 and counts["2D resnet"] >= 2, counts
    assert max((p.grad - grads[n]).abs().max().item() for n, p in video.named_parameters() if n in grads) < 5e-5


def test_bad_input(unet2d):
    video = VideoUNet.from_unet2d(unet2d, motion_module={"type": "temporal", "max_frames": 24})
    x, t, text = inputs(frames=25, batch=1)
    with pytest.raises(KinemaError, match="context windows"):
        video(x, t, text)
    with pytest.raises(KinemaError, match=r"\(B, C, F, H, W\)"):
        video(x[:, :, 0], t, text)
    with pytest.raises(KinemaError, match="channels"):
        video(x[:, :3, :4], t, text)
    wide = VideoUNet.from_unet2d(UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (64, 64)}))
    with pytest.raises(KinemaError, match="mismatched"):
        video.load_motion_state_dict(wide.motion_state_dict())
    missing = dict(video.motion_state_dict())
    missing.pop(next(iter(missing)))
    with pytest.raises(KinemaError, match="1 missing"):
        video.load_motion_state_dict(missing)


def test_hybrid_module_plugs_into_the_unet(unet2d):
    hybrid = VideoUNet.from_unet2d(unet2d, motion_module={"type": "hybrid", "max_frames": 16})
    assert all(type(m).__name__ == "HybridMotionModule" for _, m in hybrid.motion_modules())
    x, t, text = inputs(frames=3)
    with torch.no_grad():
        assert torch.equal(hybrid(x, t, text), VideoUNet.from_unet2d(unet2d)(x, t, text))  # fresh: an identity
        perturb(hybrid, seed=9)
        # The same weights in temporal modules: the two hosts differ only in the second attention, temporal there and
        # global (all frames x positions) here, so the outputs differ only if the global attention ran.
        temporal = VideoUNet.from_unet2d(unet2d, motion_module={"type": "temporal", "max_frames": 16})
        temporal.unet.load_state_dict(hybrid.unet.state_dict(), strict=True)
        mixed = hybrid(x, t, text)
        assert (mixed - temporal(x, t, text)).abs().max().item() > 1e-2


def test_from_pretrained_refuses_weights_that_do_not_fit(unet2d, tmp_path):
    from safetensors.torch import load_file, save_file

    VideoUNet.from_unet2d(unet2d).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    dropped = next(k for k in weights if ".motion_modules." in k)
    weights.pop(dropped)
    weights["extra.weight"] = torch.zeros(3)
    save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(KinemaError, match=rf"1 missing \(e.g. {dropped}\); 1 unexpected \(e.g. extra.weight\)"):
        VideoUNet.from_pretrained(tmp_path)


TEXT_MOTION = {"type": "temporal", "attention_kinds": ["temporal", "text", "temporal"], "cross_attention_dim": 32}


def record_text(module: torch.nn.Module, seen: list) -> None:
    """Append the `text` every run of `module.forward` is given (recomputations included)."""
    forward = module.forward

    def recording(x, text=None):
        seen.append(text)
        return forward(x, text=text)

    module.forward = recording


def test_text_motion_modules_read_each_frames_prompt(unet2d):
    # Each motion module with a `text` attention gets the prompt tokens of every frame, (B*F, L, D) in the UNet's
    # frame-folded order, whether given shared (B, L, D) or per frame (B, F, L, D).
    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=True, motion_module=TEXT_MOTION)
    perturb(video, seed=3)
    seen: dict[str, list] = {}
    for name, module in video.motion_modules():
        record_text(module, seen.setdefault(name, []))
    x, t, shared = inputs(frames=3)
    per_frame = torch.randn(2, 3, 7, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        video(x, t, per_frame)
        for name, texts in seen.items():
            assert len(texts) == 1 and torch.equal(texts[0], per_frame.reshape(6, 7, 32)), name
        out = video(x, t, shared)
        assert all(torch.equal(texts[1], shared.repeat_interleave(3, dim=0)) for texts in seen.values())
        # The prompt reaches the motion modules themselves: zero their text attentions and the output changes.
        for _, module in video.motion_modules():
            module.temporal_transformer.transformer_blocks[0].attention_blocks[1].to_out[0].weight.zero_()
        assert (video(x, t, shared) - out).abs().max().item() > 1e-3


def test_text_motion_modules_under_checkpointing_and_step_caching(unet2d):
    # The backward pass reruns checkpointed layers after forward has returned: the rerun must see the same prompt
    # (without it the module refuses to run). The step-caching forward is the same computation.
    torch.manual_seed(0)
    video = VideoUNet.from_unet2d(unet2d, motion_module=TEXT_MOTION)
    perturb(video, seed=7)
    x, t, text = inputs(frames=3)
    video.train()
    video(x, t, text).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in video.named_parameters() if ".motion_modules." in n}
    assert max(g.abs().max().item() for n, g in grads.items() if ".attention_blocks.1.to_k." in n) > 0
    video.zero_grad()
    video.enable_gradient_checkpointing()
    video(x, t, text).square().mean().backward()
    assert max((p.grad - grads[n]).abs().max().item() for n, p in video.named_parameters() if n in grads) < 5e-5
    video.eval()
    with torch.no_grad():
        out, _ = video.forward_deep_cached(x, t, text, depth=1)
        torch.testing.assert_close(out, video(x, t, text), atol=1e-5, rtol=0)
