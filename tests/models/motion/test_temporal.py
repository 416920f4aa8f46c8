"""The temporal and hybrid motion modules against a direct, plain-torch writing of AnimateDiff's definition."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from tiny_models import perturb

from kinema.errors import KinemaError
from kinema.models.motion import (
    MOTION_MODULES,
    HybridMotionModule,
    MotionStrength,
    TemporalMotionModule,
    build_motion_module,
    current_motion_strength,
    motion_strength,
    register_motion_module,
    sinusoidal_frame_encoding,
)


def reference_pe(length: int, dim: int) -> torch.Tensor:
    # AnimateDiff's PositionalEncoding table, written out independently.
    pe = torch.zeros(length, dim)
    for pos in range(length):
        for i in range(0, dim, 2):
            angle = pos / (10000 ** (i / dim))
            pe[pos, i] = math.sin(angle)
            pe[pos, i + 1] = math.cos(angle)
    return pe


def reference_attention(x, attn, heads, context=None, key_scale=1.0):
    # (S, L, C) queries, keys and values from `context` (S, M, D) when given: q/k/v without bias,
    # softmax(q k^T / sqrt(d)) v, output projection with bias. `key_scale` multiplies the keys as
    # ComfyUI-AnimateDiff-Evolved's motion scale does (utils_motion.py: `k *= self.scale`).
    s, length, c = x.shape
    d = c // heads
    context = x if context is None else context
    q = F.linear(x, attn.to_q.weight).view(s, length, heads, d).transpose(1, 2)
    k = (F.linear(context, attn.to_k.weight) * key_scale).view(s, context.shape[1], heads, d).transpose(1, 2)
    v = F.linear(context, attn.to_v.weight).view(s, context.shape[1], heads, d).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(s, length, c)
    return F.linear(out, attn.to_out[0].weight, attn.to_out[0].bias)


def reference_motion_module(module, x, heads, kinds, per_frame=True, text=None, key_scale=1.0, effect=1.0):
    """Original SD1.5 AnimateDiff VanillaTemporalModule forward on (b, c, f, h, w), per-frame GroupNorm. A "text"
    kind is the original's Temporal_Cross block: temporal sequences (one per position) as queries, and the clip's
    prompt tokens `text` (b, L, D), repeated for every position, as keys and values. `key_scale` and `effect` are
    ComfyUI-AnimateDiff-Evolved's motion scale and effect (`x * (1 - effect) + module(x) * effect`)."""
    tt = module.temporal_transformer
    b, c, f, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    if per_frame:
        normed = F.group_norm(frames, tt.norm.num_groups, tt.norm.weight, tt.norm.bias, tt.norm.eps)
    else:
        normed = F.group_norm(x, tt.norm.num_groups, tt.norm.weight, tt.norm.bias, tt.norm.eps)
        normed = normed.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    hs = normed.permute(0, 2, 3, 1).reshape(b * f, h * w, c)
    hs = F.linear(hs, tt.proj_in.weight, tt.proj_in.bias)
    pe = reference_pe(f, c)
    for block in tt.transformer_blocks:
        for kind, norm, attn in zip(kinds, block.norms, block.attention_blocks, strict=True):
            n = F.layer_norm(hs, (c,), norm.weight, norm.bias, norm.eps)
            n = n.view(b, f, h * w, c) + pe[None, :, None, :]
            if kind in ("temporal", "text"):
                seq = n.permute(0, 2, 1, 3).reshape(b * h * w, f, c)
                context = text.repeat_interleave(h * w, dim=0) if kind == "text" else None
                out = reference_attention(seq, attn, heads, context, key_scale)
                out = out.view(b, h * w, f, c).permute(0, 2, 1, 3)
            else:
                out = reference_attention(n.reshape(b, f * h * w, c), attn, heads, key_scale=key_scale)
                out = out.view(b, f, h * w, c)
            hs = hs + out.reshape(b * f, h * w, c)
        n = F.layer_norm(hs, (c,), block.ff_norm.weight, block.ff_norm.bias, block.ff_norm.eps)
        proj = F.linear(n, block.ff.net[0].proj.weight, block.ff.net[0].proj.bias)
        value, gate = proj.chunk(2, dim=-1)
        hs = hs + F.linear(value * F.gelu(gate), block.ff.net[2].weight, block.ff.net[2].bias)
    hs = F.linear(hs, tt.proj_out.weight, tt.proj_out.bias)
    moved = hs.view(b * f, h, w, c).permute(0, 3, 1, 2) + frames
    out = frames * (1 - effect) + moved * effect
    return out.view(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def test_frame_encoding_matches_the_published_table():
    assert torch.allclose(sinusoidal_frame_encoding(24, 64), reference_pe(24, 64), atol=1e-5)


def test_published_key_layout_and_parameter_count():
    module = TemporalMotionModule(320)
    keys = list(module.state_dict())
    assert len(keys) == 26  # 28 in published files, less the two pos_encoder.pe buffers
    assert "temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.bias" in keys
    assert "temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.bias" not in keys
    assert sum(p.numel() for p in module.parameters()) == 22 * 320**2 + 21 * 320


@pytest.mark.parametrize("cls", [TemporalMotionModule, HybridMotionModule])
def test_fresh_module_is_an_identity(cls):
    module = cls(64, num_attention_heads=8, norm_num_groups=32)
    x = torch.randn(2, 64, 5, 3, 4)
    assert torch.equal(module(x), x)


@pytest.mark.parametrize("cls,kinds", [(TemporalMotionModule, ("temporal", "temporal")),
                                       (HybridMotionModule, ("temporal", "global"))])
@pytest.mark.parametrize("norm_mode", ["per_frame", "across_frames"])
def test_matches_direct_definition(cls, kinds, norm_mode):
    torch.manual_seed(0)
    module = cls(64, num_attention_heads=8, norm_num_groups=32, norm_mode=norm_mode)
    perturb(module, seed=0, scale=0.2)
    x = torch.randn(2, 64, 6, 3, 5)
    expected = reference_motion_module(module, x, 8, kinds, per_frame=norm_mode == "per_frame")
    assert (module(x) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kinds", [("temporal", "text", "temporal"), ("text", "temporal")])
def test_text_attention_is_the_original_temporal_cross(kinds):
    # AnimateDiff's TemporalTransformerBlock builds a "Temporal_Cross" block with cross_attention_dim (the prompt's
    # width); kinema's `text` kind groups its queries by frame instead, which changes nothing, and reads the tokens
    # per frame (B*F, L, D), here the clip's tokens for every frame.
    torch.manual_seed(0)
    module = TemporalMotionModule(64, num_attention_heads=8, attention_kinds=kinds, cross_attention_dim=24)
    assert module.takes_text
    perturb(module, seed=0, scale=0.2)
    x, text = torch.randn(2, 64, 6, 3, 5), torch.randn(2, 7, 24)
    per_frame = text.repeat_interleave(6, dim=0)
    expected = reference_motion_module(module, x, 8, kinds, text=text)
    assert (module(x, text=per_frame) - expected).abs().max().item() < 1e-4
    # The prompt reaches the output: other tokens, another result.
    assert (module(x, text=per_frame.flip(0)) - expected).abs().max().item() > 1e-2
    module.set_attention_chunk_size(5)  # the text rows are split with their queries
    assert (module(x, text=per_frame) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("cls,kinds", [(TemporalMotionModule, ("temporal", "temporal")),
                                       (HybridMotionModule, ("temporal", "global"))])
@pytest.mark.parametrize("scale,effect", [(1.0, 0.0), (1.0, 0.5), (1.6, 1.0), (0.5, 1.3)])
def test_motion_strength_is_comfyui_animatediffs_scale_and_effect(cls, kinds, scale, effect):
    torch.manual_seed(0)
    module = perturb(cls(64, num_attention_heads=8, norm_num_groups=32), seed=0, scale=0.2)
    x = torch.randn(2, 64, 6, 3, 5)
    with motion_strength(scale=scale, effect=effect):
        out = module(x)
    expected = reference_motion_module(module, x, 8, kinds, key_scale=scale, effect=effect)
    assert (out - expected).abs().max().item() < 1e-4
    as_trained = reference_motion_module(module, x, 8, kinds)
    assert (out - as_trained).abs().max().item() > 1e-2  # each setting changes the output
    assert torch.equal(module(x), module(x)) and current_motion_strength() == MotionStrength()  # reset after


def test_motion_strength_belongs_to_the_thread_that_sets_it():
    module = perturb(TemporalMotionModule(64), seed=0, scale=0.2)
    x = torch.randn(1, 64, 4, 2, 2)
    seen = {}

    def other_thread():
        seen["strength"], seen["out"] = current_motion_strength(), module(x)

    with motion_strength(effect=0.0):
        assert torch.equal(module(x), x)  # no motion module at all
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen["strength"] == MotionStrength() and torch.equal(seen["out"], module(x))


def test_a_compiled_module_follows_the_strength_of_each_call():
    # Outside any strength the context variable is not read (torch.compile cannot trace it); a compiled module must
    # still see a strength set later, and drop it after.
    module = perturb(TemporalMotionModule(64), seed=0, scale=0.2)
    x = torch.randn(1, 64, 4, 2, 2)
    eager = {effect: reference_motion_module(module, x, 8, ("temporal", "temporal"), effect=effect)
             for effect in (1.0, 0.5)}
    module.compile(backend="eager", dynamic=False)
    assert (module(x) - eager[1.0]).abs().max().item() < 1e-4
    with motion_strength(effect=0.5):
        assert (module(x) - eager[0.5]).abs().max().item() < 1e-4
    assert (module(x) - eager[1.0]).abs().max().item() < 1e-4


def test_the_motion_attention_processor_is_diffusers_at_scale_one():
    # kinema's processor exists to scale the keys; as trained it must be diffusers' own fused attention.
    from diffusers.models.attention_processor import AttnProcessor2_0

    for kinds, text in ((("temporal", "global"), None), (("text", "temporal"), torch.randn(6, 5, 24))):
        module = perturb(TemporalMotionModule(64, attention_kinds=kinds,
                                              cross_attention_dim=24 if text is not None else None), seed=1)
        attention = module.temporal_transformer.transformer_blocks[0].attention_blocks[0]
        tokens = torch.randn(6, 7, 64)
        ours = attention(tokens, encoder_hidden_states=text)
        attention.set_processor(AttnProcessor2_0())
        assert torch.equal(ours, attention(tokens, encoder_hidden_states=text))


def test_motion_strength_refuses_what_has_no_meaning():
    for scale, effect, words in ((0.0, 1.0, "motion scale must be a finite number above 0"),
                                 (float("nan"), 1.0, "motion scale"), (1.0, -0.5, "motion effect must be"),
                                 (1.0, float("inf"), "motion effect")):
        with pytest.raises(KinemaError, match=words):
            MotionStrength(scale, effect)


def test_text_attention_refuses_what_it_cannot_read():
    with pytest.raises(KinemaError, match="set both or neither"):
        TemporalMotionModule(64, attention_kinds=("temporal", "text"))
    with pytest.raises(KinemaError, match="set both or neither"):
        TemporalMotionModule(64, cross_attention_dim=24)
    module = TemporalMotionModule(64, attention_kinds=("temporal", "text"), cross_attention_dim=24)
    x = torch.randn(1, 64, 4, 2, 2)
    with pytest.raises(KinemaError, match="given no prompt tokens"):
        module(x)
    with pytest.raises(KinemaError, match=r"one row per frame, \(4, L, D\)"):
        module(x, text=torch.randn(1, 7, 24))
    plain = TemporalMotionModule(64)
    assert not plain.takes_text and torch.equal(plain(x, text=torch.randn(4, 7, 24)), plain(x))


def test_norm_modes_differ_on_real_video():
    torch.manual_seed(0)
    a = TemporalMotionModule(64, norm_mode="per_frame")
    perturb(a, seed=0, scale=0.2)
    b = TemporalMotionModule(64, norm_mode="across_frames")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 64, 4, 3, 3) * torch.arange(1, 5).view(1, 1, 4, 1, 1)
    assert (a(x) - b(x)).abs().max().item() > 1e-2


def record_forward_calls(module: torch.nn.Module, calls: list) -> None:
    """Append the first argument's shape for every run of `module.forward`. Forward hooks cannot count a
    checkpoint's recomputation: torch stops it once it has the tensors it needs, before the hooks would run."""
    forward = module.forward

    def recording(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return forward(*args, **kwargs)

    module.forward = recording


def test_attention_chunking_and_checkpointing_change_nothing():
    torch.manual_seed(0)
    module = HybridMotionModule(64)
    perturb(module, seed=0, scale=0.2)
    block = module.temporal_transformer.transformer_blocks[0]
    temporal_calls, global_calls, block_calls = [], [], []
    record_forward_calls(block.attention_blocks[0], temporal_calls)
    record_forward_calls(block.attention_blocks[1], global_calls)
    record_forward_calls(block, block_calls)
    x = torch.randn(2, 64, 4, 4, 4, requires_grad=True)
    base = module(x)
    base.square().sum().backward()
    grad = x.grad.clone()
    # Unchunked: one call per attention over all its sequences, 2 x 16 positions of 4 frames, and 2 clips of 64.
    assert (temporal_calls, global_calls, len(block_calls)) == ([(32, 4, 64)], [(2, 64, 64)], 1)
    temporal_calls.clear(), global_calls.clear(), block_calls.clear()
    module.set_attention_chunk_size(3)
    module.temporal_transformer.gradient_checkpointing = True
    x.grad = None
    chunked = module(x)
    # Chunking ran: 32 temporal sequences in ceil(32 / 3) = 11 calls of at most 3, the 2 clips in one call.
    assert temporal_calls == [(3, 4, 64)] * 10 + [(2, 4, 64)] and global_calls == [(2, 64, 64)]
    chunked.square().sum().backward()
    # Checkpointing ran: the backward pass ran the block (and its 12 attention calls) a second time.
    assert len(block_calls) == 2 and len(temporal_calls) == 22 and len(global_calls) == 2
    assert (chunked - base).abs().max().item() < 1e-5
    assert (x.grad - grad).abs().max().item() < 1e-4


def test_more_frames_than_encoding_is_refused_with_advice():
    module = TemporalMotionModule(64, max_frames=24)
    with pytest.raises(KinemaError, match="context windows"):
        module(torch.zeros(1, 64, 25, 2, 2))


def test_registry_builds_by_name_and_rejects_unknown():
    assert isinstance(build_motion_module({"type": "hybrid", "max_frames": 16}, 64), HybridMotionModule)
    with pytest.raises(KinemaError, match="registered"):
        build_motion_module({"type": "nope"}, 64)
    with pytest.raises(KinemaError, match="bad settings"):
        build_motion_module({"type": "temporal", "heads": 3}, 64)


def test_user_module_registers_and_builds():
    @register_motion_module("test_scale")
    class Scale(torch.nn.Module):
        def __init__(self, channels, factor=0.0):
            super().__init__()
            self.factor = torch.nn.Parameter(torch.tensor(factor))

        def forward(self, x):
            return x + self.factor * x.mean(dim=2, keepdim=True)

    try:
        module = build_motion_module({"type": "test_scale"}, 8)
        x = torch.randn(1, 8, 3, 2, 2)
        assert torch.equal(module(x), x)
    finally:
        MOTION_MODULES.pop("test_scale")


def test_attention_runs_through_scaled_dot_product_attention(monkeypatch):
    module = TemporalMotionModule(64)
    perturb(module, seed=0, scale=0.2)
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    module(torch.randn(1, 64, 4, 2, 2))
    assert len(calls) == 2 and calls[0] == (4, 8, 4, 8)  # (B*H*W sequences, heads, frames, head dim)


def test_the_norm_learns_from_frozen_tokens_laid_out_channels_last():
    from kinema.models.motion import video_group_norm

    # A DiT's tokens (B, F*H*W, C) seen as (B, C, F, H, W): channels-last strides; torch 2.13's CPU backward of
    # group_norm crashed the process on such an input that needs no gradient while the weights do.
    tokens = torch.randn(2, 3 * 4 * 4, 32)
    video = tokens.reshape(2, 3, 4, 4, 32).permute(0, 4, 1, 2, 3)
    for mode in ("per_frame", "across_frames"):
        grads = []
        for given in (video, video.contiguous()):  # the second: the reference, laid out plainly
            torch.manual_seed(0)
            norm = torch.nn.GroupNorm(8, 32)
            torch.nn.init.normal_(norm.weight)
            (video_group_norm(norm, given, mode) * torch.randn(2, 32, 3, 4, 4)).sum().backward()
            grads.append((norm.weight.grad, norm.bias.grad))
        torch.testing.assert_close(grads[0], grads[1])


def test_a_user_modules_broken_contract_is_named():
    # A module that drops a frame failed deep in the next diffusers layer; a bug in its __init__ was called "bad
    # settings"; a function or a nameless registration was taken.
    from kinema.models.motion import run_motion_module

    @register_motion_module("test_drop_frame")
    class DropFrame(torch.nn.Module):
        def __init__(self, channels, broken=False):
            super().__init__()
            if broken:
                raise TypeError("a bug of its own")

        def forward(self, x):
            return x[:, :, 1:]

    try:
        with pytest.raises(KinemaError, match=r"^the motion module DropFrame returned \(1, 8, 2, 2, 2\) for a "
                                              r"\(1, 8, 3, 2, 2\) input: a motion module returns a tensor of its "
                                              r"input's shape, \(B, C, F, H, W\)$"):
            run_motion_module(build_motion_module({"type": "test_drop_frame"}, 8), torch.randn(1, 8, 3, 2, 2))
        with pytest.raises(TypeError, match="a bug of its own"):
            build_motion_module({"type": "test_drop_frame", "broken": True}, 8)
        with pytest.raises(KinemaError, match="bad settings for motion module 'test_drop_frame'"):
            build_motion_module({"type": "test_drop_frame", "heads": 2}, 8)
    finally:
        MOTION_MODULES.pop("test_drop_frame")
    with pytest.raises(KinemaError, match="decorates a torch.nn.Module class"):
        register_motion_module("test_function")(lambda channels: None)
    with pytest.raises(KinemaError, match="registered under a name"):
        register_motion_module(3)
    assert "test_function" not in MOTION_MODULES
