"""Tests for kinema/models/video_dit.py and video_dit_blocks.py: inflation, U-ViT wiring, inputs, V3-XL size.

Facts from EasyAnimate @616a354 (easyanimate/models/transformer3d.py, attention.py, motion_module.py and
config/easyanimate_video_slicevae_motion_module_v3.yaml) that these tests pin:
- skips: `long_connect_fc` = 13 zero-init Linear(1152, 1152); outputs of blocks `index < 13` are pushed, and before
  blocks `index >= 15` `long_connect_fc[k - 15]` of the popped output is added.
- `clip_projection` exists iff in_channels == 12: Linear(768, 9216) -> GELU(tanh) -> zero-init Linear(9216, 9216),
  viewed as (B, 8, 1152) and appended after the text tokens, with its mask concatenated after the text mask.
- motion modules: even blocks [Temporal_Self, Temporal_Self], odd [Temporal_Self, Global_Self], 16 heads, one inner
  block, GroupNorm(32) per frame, q/k/v without bias, GEGLU feed-forward, zero-init proj_out, frame encoding of
  length 4096 added after each attention's LayerNorm (also before the global attention).
[inferred] the published transformer/config.json carries PixArt-XL-2-512 base values (16 x 72 heads, 28 layers,
  caption 4096, sample_size 64); the file itself was not readable here, so the parameter total below is derived
  from the code and matches the 7.21 GB fp32 file size only together with the 56 (1, 4096, 1152) pe buffers.
"""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import TINY_DIT, perturb, tiny_pixart, tiny_video_dit

from kinema.errors import KinemaError
from kinema.models.motion import HybridMotionModule
from kinema.models.video_dit import VIDEO_DIT_PRESETS, VideoDiT
from kinema.models.video_dit_blocks import (
    easyanimate_v3_motion_modules,
    easyanimate_v3_skip_pairs,
    uvit_skip_pairs,
)


def text(batch: int = 2, length: int = 5):
    torch.manual_seed(1)
    states = torch.randn(batch, length, TINY_DIT["caption_channels"])
    mask = torch.ones(batch, length)
    mask[1, -2:] = 0
    return states, mask


def test_fresh_hybrid_motion_module_is_identity():
    torch.manual_seed(0)
    module = HybridMotionModule(64, num_attention_heads=2, max_frames=4096)
    x = torch.randn(2, 64, 3, 4, 4)
    assert torch.equal(module(x), x)


def v3_skip_pairs(num_layers: int = 28) -> list[tuple[int, int]]:
    """V3's literal rule (transformer3d.py): push after blocks index < 13, pop before blocks index >= 15."""
    stack, pairs = [], []
    for index in range(num_layers):
        if index >= 15:
            pairs.append((stack.pop(), index))
        if index < 13:
            stack.append(index)
    return pairs


def test_uvit_skip_pairs_reproduce_v3_and_scale_with_depth():
    assert uvit_skip_pairs(28) == v3_skip_pairs()
    assert uvit_skip_pairs(28)[0] == (12, 15) and uvit_skip_pairs(28)[-1] == (0, 27)
    linked = {block for pair in uvit_skip_pairs(28) for block in pair}
    assert set(range(28)) - linked == {13, 14}
    assert uvit_skip_pairs(6) == [(1, 4), (0, 5)]
    assert uvit_skip_pairs(5) == [(0, 4)]
    assert uvit_skip_pairs(3) == []


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("inpaint", [False, True])
def test_inflated_model_reproduces_image_dit_per_frame(frames, inpaint):
    pixart = tiny_pixart()
    video_kwargs = dict(in_channels=12, image_embed_dim=32) if inpaint else {}
    video = VideoDiT.from_image_dit(pixart, **video_kwargs).eval()
    torch.manual_seed(2)
    latents = torch.randn(2, 4, frames, 12, 16)  # not the trained 8x8: positions are re-interpolated
    timestep = torch.tensor([10, 500])
    states, mask = text()
    extra = {}
    if inpaint:
        # Zero weights on the extra input channels and masked-out (zero-init) image tokens change nothing.
        extra = dict(inpaint_latents=torch.randn(2, 8, frames, 12, 16), clip_image_embeds=torch.randn(2, 32),
                     clip_attention_mask=torch.zeros(2, 8))
    with torch.no_grad():
        out = video(latents, timestep, states, mask, **extra)
        expected = torch.stack([
            pixart(latents[:, :, f], encoder_hidden_states=states, timestep=timestep,
                   encoder_attention_mask=mask).sample
            for f in range(frames)
        ], dim=2)
    assert out.shape == (2, 8, frames, 12, 16)
    # Learned sigma: both models emit the same 8 channels (0-3 epsilon, 4-7 variance), compared in full.
    assert (out - expected).abs().max().item() <= 1e-5
    assert expected.abs().mean().item() > 1e-2  # the comparison is not between zeros


def test_inflation_copies_weights_and_zero_fills_new_input_channels():
    pixart = tiny_pixart()
    video = VideoDiT.from_image_dit(pixart, in_channels=12, image_embed_dim=32)
    image_state, video_state = pixart.state_dict(), video.state_dict()
    for name, weight in image_state.items():
        if name != "pos_embed.proj.weight":
            assert torch.equal(video_state[name], weight), name
    assert torch.equal(video_state["pos_embed.proj.weight"][:, :4], image_state["pos_embed.proj.weight"])
    assert video_state["pos_embed.proj.weight"][:, 4:].abs().sum().item() == 0
    assert video.image_tokens(torch.randn(3, 32)).abs().sum().item() == 0  # zero-init linear_2
    assert all(fc.weight.abs().sum().item() == 0 for fc in video.long_connect_fc)
    assert len(video.long_connect_fc) == 1


def test_inflation_refuses_settings_of_the_image_model():
    with pytest.raises(KinemaError, match=r"\['num_layers'\] come from the image model"):
        VideoDiT.from_image_dit(tiny_pixart(), num_layers=6)


# Each wiring as target block -> (source block, skip linear), written out independently of kinema's rule functions.
SKIP_WIRINGS = {
    "kinema rule, 6 blocks": (dict(num_layers=6), {4: (1, 0), 5: (0, 1)}),
    # V3 feeds linear `k - 15` into block k, whatever the depth; at 20 blocks linears 5-12 are stored but unused.
    "V3 rule, 28 blocks": (dict(num_layers=28, skip_pairs=easyanimate_v3_skip_pairs(28), num_skip_linears=13),
                           {target: (source, target - 15) for source, target in v3_skip_pairs(28)}),
    "V3 rule, 20 blocks": (dict(num_layers=20, skip_pairs=easyanimate_v3_skip_pairs(20), num_skip_linears=13),
                           {target: (source, target - 15) for source, target in v3_skip_pairs(20)}),
}


@pytest.mark.parametrize("case", list(SKIP_WIRINGS))
def test_every_skip_adds_its_scaled_source_output_to_its_target_input(case):
    config, wiring = SKIP_WIRINGS[case]
    model = tiny_video_dit(**config)
    perturb(model, seed=0)
    with torch.no_grad():
        # Linear j is (j + 2) * I: each skip is visible, and a skip taken through the wrong linear gives the wrong
        # multiple. Multiplying by an identity multiple is exact in float32, so the sums are compared exactly.
        for j, fc in enumerate(model.long_connect_fc):
            fc.weight.copy_(torch.eye(64) * (j + 2))
            fc.bias.zero_()
    inputs, outputs = {}, {}
    for index, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(lambda mod, args, i=index: inputs.__setitem__(i, args[0].clone()))
        block.register_forward_hook(lambda mod, args, out, i=index: outputs.__setitem__(i, out.clone()))
    states, mask = text()
    latents, step = torch.randn(2, 4, 2, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        with_skips = model(latents, step, states, mask)
    for index in range(1, len(model.transformer_blocks)):
        expected = outputs[index - 1]
        if index in wiring:
            source, linear = wiring[index]
            expected = expected + (linear + 2) * outputs[source]
        assert torch.equal(inputs[index], expected), index
    # The first skip (12 -> 15 in V3-XL) matters for the output too: without it the prediction moves.
    first_target = min(wiring)
    with torch.no_grad():
        model.long_connect_fc[wiring[first_target][1]].weight.zero_()
        without_first = model(latents, step, states, mask)
    assert (with_skips - without_first).abs().max().item() > 1e-3


def never_patch(model: VideoDiT) -> None:
    def refuse(*_):
        raise AssertionError("heavy work started before the input check")

    model.pos_embed.register_forward_pre_hook(refuse)


BAD_INPUTS = {
    "odd latent size": (dict(), dict(latents=(1, 4, 2, 15, 16)), "not divisible by the patch size 2"),
    "channel count": (dict(), dict(latents=(1, 5, 2, 8, 8)), "latents have 5 channels but the model takes 4"),
    "InP without inpaint latents": (dict(in_channels=12, image_embed_dim=32), dict(latents=(1, 4, 2, 8, 8)),
                                    "pass inpaint_latents"),
    "inpaint latents to T2V model": (dict(), dict(latents=(1, 4, 2, 8, 8), inpaint=(1, 8, 2, 8, 8)),
                                     "not an inpaint \\(InP\\) model"),
    "image embeds to T2V model": (dict(), dict(latents=(1, 4, 2, 8, 8), clip=(1, 32)), "no image projection"),
    "too many frames": (dict(motion_modules=[{"type": "temporal", "num_attention_heads": 2, "max_frames": 2}] * 4),
                        dict(latents=(1, 4, 3, 8, 8)), "3 latent frames exceed the motion modules' frame encoding"),
    "text width": (dict(), dict(latents=(1, 4, 2, 8, 8), text=(1, 5, 40)), "encoder_hidden_states must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_line_before_heavy_work(case):
    config, shapes, message = BAD_INPUTS[case]
    model = tiny_video_dit(**config)
    never_patch(model)
    kwargs = {}
    if "inpaint" in shapes:
        kwargs["inpaint_latents"] = torch.randn(shapes["inpaint"])
    if "clip" in shapes:
        kwargs["clip_image_embeds"] = torch.randn(shapes["clip"])
    states = torch.randn(shapes.get("text", (1, 5, 48)))
    with pytest.raises(KinemaError, match=message) as err:
        model(torch.randn(shapes["latents"]), torch.tensor([1]), states, **kwargs)
    assert "\n" not in str(err.value)


def test_image_tokens_follow_text_and_their_mask_switches_them_off():
    model = tiny_video_dit(in_channels=12, image_embed_dim=32)
    perturb(model, seed=0)
    states, mask = text()
    latents, inpaint, clip = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 8, 2, 8, 8), torch.randn(2, 32)
    step = torch.tensor([5, 900])
    with torch.no_grad():
        plain = model(latents, step, states, mask, inpaint_latents=inpaint)
        masked = model(latents, step, states, mask, inpaint_latents=inpaint, clip_image_embeds=clip,
                       clip_attention_mask=torch.zeros(2, 8))
        used = model(latents, step, states, mask, inpaint_latents=inpaint, clip_image_embeds=clip)
    assert (plain - masked).abs().max().item() <= 1e-6
    assert (plain - used).abs().max().item() > 1e-3
    assert model.image_tokens(clip).shape == (2, 8, 64)


def test_token_order_where_it_is_observable():
    # Attention over keys with their bias is blind to the keys' order, so the order is checked where the tokens are
    # handed over: the context of the cross-attention and the input of the first block.
    model = tiny_video_dit(in_channels=12, image_embed_dim=32)
    perturb(model, seed=0)
    states, mask = text()  # clip 1 masks its last two text tokens
    image_mask = torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1]])
    latents, inpaint, clip = torch.randn(2, 4, 3, 8, 6), torch.randn(2, 8, 3, 8, 6), torch.randn(2, 32)
    seen = {}
    model.transformer_blocks[0].register_forward_pre_hook(lambda mod, args: seen.__setitem__("tokens", args[0]))
    model.transformer_blocks[0].attn2.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(latents, torch.tensor([5, 900]), states, mask, inpaint_latents=inpaint, clip_image_embeds=clip,
              clip_attention_mask=image_mask)

        def mlp(x, projection):  # V3's CaptionProjection / CLIPProjection: Linear -> GELU(tanh) -> Linear
            hidden = F.gelu(F.linear(x, projection.linear_1.weight, projection.linear_1.bias), approximate="tanh")
            return F.linear(hidden, projection.linear_2.weight, projection.linear_2.bias)

        # V3 (transformer3d.py): text tokens, then clip_projection(...).view(B, 8, C), masks concatenated alike.
        expected_context = torch.cat([mlp(states, model.caption_projection),
                                      mlp(clip, model.clip_projection).view(2, 8, 64)], dim=1)
        expected_bias = (1 - torch.cat([mask, image_mask], dim=1))[:, None, :] * -10000.0
        # Frames are patched one at a time and laid out frame after frame, (B, F*h*w, C): row f*h*w + n is
        # patch n of frame f.
        frames = [model.pos_embed(torch.cat([latents, inpaint], dim=1)[:, :, f]) for f in range(3)]
    # Same torch kernels on the same weights; the tolerance only absorbs batch-size-dependent GEMM/conv blocking.
    torch.testing.assert_close(seen["encoder_hidden_states"], expected_context, atol=1e-6, rtol=0)
    assert torch.equal(seen["attention_mask"], expected_bias)
    torch.testing.assert_close(seen["tokens"], torch.cat(frames, dim=1), atol=1e-6, rtol=0)


def test_save_and_reload_round_trip(video_dit, tmp_path):
    model = video_dit
    perturb(model, seed=0)
    model.save_pretrained(tmp_path)
    reloaded = VideoDiT.from_pretrained(tmp_path).eval()
    assert reloaded.config.motion_modules == easyanimate_v3_motion_modules(4, 2)
    states, mask = text()
    latents = torch.randn(2, 4, 2, 8, 8)
    with torch.no_grad():
        diff = (model(latents, torch.tensor([1, 2]), states, mask) - reloaded(latents, torch.tensor([1, 2]), states,
                                                                              mask)).abs().max().item()
    assert diff <= 1e-6
    # a weights file that lost a tensor is refused, not filled with fresh random weights
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    weights.pop("long_connect_fc.0.weight")
    save_file(weights, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(KinemaError, match=r"1 missing \(e.g. long_connect_fc.0.weight\)"):
        VideoDiT.from_pretrained(tmp_path)


def test_gradient_checkpointing_matches_plain_backward(video_dit):
    model = video_dit.train()
    perturb(model, seed=0)
    states, mask = text()
    latents = torch.randn(2, 4, 2, 8, 8)

    def loss_and_grads():
        model.zero_grad()
        loss = model(latents, torch.tensor([1, 400]), states, mask).pow(2).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    assert not model.transformer_blocks[0].attn_temporal.temporal_transformer.gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert abs(plain_loss - ckpt_loss) <= 1e-6
    assert plain_grads.keys() == ckpt_grads.keys()
    assert max((plain_grads[n] - ckpt_grads[n]).abs().max().item() for n in plain_grads) <= 1e-6


def test_config_rules_are_checked():
    with pytest.raises(KinemaError, match="cross_attention_dim 48 must equal the model width"):
        VideoDiT(**{**TINY_DIT, "cross_attention_dim": 48})
    with pytest.raises(KinemaError, match="motion_modules has 2 specs but the model has 4 blocks"):
        VideoDiT(**TINY_DIT, motion_modules=["temporal", "hybrid"])


def v3_motion_module_params(d: int) -> int:
    """One V3 VanillaTemporalModule of width d (motion_module.py)."""
    group_norm, linear = 2 * d, d * d + d
    attention = 3 * d * d + linear  # q/k/v without bias, to_out with bias
    geglu_ff = (d * 8 * d + 8 * d) + (4 * d * d + d)
    return group_norm + linear + 2 * (attention + 2 * d) + geglu_ff + 2 * d + linear


@pytest.mark.slow
def test_full_v3_xl_inp_names_and_parameter_count():
    with torch.device("meta"):
        model = VIDEO_DIT_PRESETS["easyanimate-v3-xl-2-inp"]()
    state = model.state_dict()
    d, layers = 1152, 28
    pixart_xl_512 = 610_856_096  # diffusers PixArtTransformer2DModel(sample_size=64, caption_channels=4096)
    extra_inputs = d * 8 * 2 * 2
    motion = layers * v3_motion_module_params(d)
    clip = (768 * 9216 + 9216) + (9216 * 9216 + 9216)
    skips = 13 * (d * d + d)
    total = sum(t.numel() for t in state.values())
    assert v3_motion_module_params(d) == 29_220_480
    assert total == pixart_xl_512 + extra_inputs + motion + clip + skips == 1_538_364_704
    # with the 56 fp32 frame-encoding buffers this is the 7.21 GB published file
    assert (total + 2 * layers * 4096 * d) * 4 == 7_210_423_424
    assert len(state) == 1361 and len(model.long_connect_fc) == 13
    mm = "transformer_blocks.27.attn_temporal.temporal_transformer"
    shapes = {
        "pos_embed.proj.weight": (d, 12, 2, 2),
        "adaln_single.linear.weight": (6 * d, d),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (d, 256),
        "caption_projection.linear_1.weight": (d, 4096),
        "clip_projection.linear_1.weight": (9216, 768),
        "clip_projection.linear_2.weight": (9216, 9216),
        "long_connect_fc.12.weight": (d, d),
        "scale_shift_table": (2, d),
        "proj_out.weight": (32, d),
        "transformer_blocks.27.scale_shift_table": (6, d),
        "transformer_blocks.27.attn1.to_q.bias": (d,),
        "transformer_blocks.27.attn2.to_k.weight": (d, d),
        "transformer_blocks.27.ff.net.0.proj.weight": (4 * d, d),
        f"{mm}.norm.weight": (d,),
        f"{mm}.proj_in.weight": (d, d),
        f"{mm}.transformer_blocks.0.attention_blocks.1.to_out.0.bias": (d,),
        f"{mm}.transformer_blocks.0.ff.net.0.proj.weight": (8 * d, d),
        f"{mm}.transformer_blocks.0.ff.net.2.weight": (d, 4 * d),
        f"{mm}.proj_out.weight": (d, d),
    }
    assert {name: tuple(state[name].shape) for name in shapes} == shapes
    assert not any(name.endswith("to_q.bias") and ".attn_temporal." in name for name in state)
    assert model.max_frames == 4096
    assert [type(b.attn_temporal).__name__ for b in model.transformer_blocks[:2]] == [
        "TemporalMotionModule", "HybridMotionModule"]
