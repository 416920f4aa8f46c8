"""Motion LoRAs: published layouts, conversion, peft adapters vs merged weights, stacking, strengths, unloading."""

import pytest
import torch
from animatediff_fixtures import published_motion_lora
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from tiny_models import TINY_UNET, perturb

from kinema.errors import KinemaError
from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.loaders.animatediff.motion_lora import (
    convert_motion_lora,
    describe_motion_lora,
    load_motion_lora,
    loaded_motion_loras,
    set_motion_lora_strength,
    unload_motion_lora,
)
from kinema.models.video_unet import VideoUNet

LINEAR = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def sd15_modules(mid_block: bool = True) -> dict[str, int]:
    """Motion-module name -> width for SD1.5 AnimateDiff (v2 has the mid-block module)."""
    widths = (320, 640, 1280, 1280)
    names = {f"down_blocks.{i}.motion_modules.{j}": c for i, c in enumerate(widths) for j in range(2)}
    names |= {f"up_blocks.{i}.motion_modules.{j}": c for i, c in enumerate(reversed(widths)) for j in range(3)}
    return names | ({"mid_block.motion_modules.0": 1280} if mid_block else {})


@pytest.fixture(scope="module")
def base_parts():
    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(**TINY_UNET).eval()
    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=True)
    perturb(video, seed=3, scale=0.1)  # non-zero proj_out, so the attentions (and their LoRAs) reach the output
    return unet2d, video.motion_state_dict()


@pytest.fixture
def make_video(base_parts):
    def make(mid_block: bool = True) -> VideoUNet:
        unet2d, motion = base_parts
        video = VideoUNet.from_unet2d(unet2d, motion_mid_block=mid_block).eval()
        video.load_motion_state_dict({k: v for k, v in motion.items() if mid_block or "mid_block" not in k})
        return video
    return make


def tiny_modules(video: VideoUNet) -> dict[str, int]:
    return {name: m.temporal_transformer.proj_in.in_features for name, m in video.motion_modules()}


def run(video: VideoUNet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 3, 8, 8, generator=gen), torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        return video(x, torch.tensor([500]), text)


def layer_weight(video: VideoUNet, original_key: str) -> torch.Tensor:
    """The Linear weight a released-layout LoRA key targets (peft wrappers looked through)."""
    module, _, rest = original_key.partition(".processor.")
    layer = video.unet.get_submodule(f"{module}.{LINEAR[rest.split('_lora')[0]]}")
    return (layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer).weight


def merged_reference(video: VideoUNet, *loras: tuple[dict[str, torch.Tensor], float]) -> VideoUNet:
    """Edit the weights directly: W += s * up @ down for each (LoRA, s), in order (the original repo's rule)."""
    with torch.no_grad():
        for lora, strength in loras:
            for key, down in lora.items():
                if key.endswith(".down.weight"):
                    up = lora[key.replace(".down.weight", ".up.weight")]
                    layer_weight(video, key).add_(strength * torch.mm(up, down))
    return video


@pytest.fixture
def loras(make_video):
    modules = tiny_modules(make_video())
    return published_motion_lora(modules, rank=4, seed=10), published_motion_lora(modules, rank=2, seed=11)


# ---------------------------------------------------------------- layouts, description, conversion


def test_full_size_sd15_motion_lora_is_19_333_120_parameters():
    lora = published_motion_lora(sd15_modules(mid_block=True), rank=64, seed=None)
    info = describe_motion_lora(lora)
    assert info["parameters"] == 19_333_120  # the README's "19 M" per MotionLoRA
    assert (info["format"], info["rank"], info["layers"], info["keys"]) == ("original", 64, 168, 336)
    assert info["targets"] == ["to_q", "to_k", "to_v", "to_out"]
    assert (info["motion_modules"], info["mid_block"], info["channels"], info["dtype"]) == (
        21, True, [320, 640, 1280], "float32")
    diffusers = convert_motion_lora(lora, to="diffusers")
    assert len(diffusers) == 336
    assert "unet.mid_block.motion_modules.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight" in diffusers
    assert describe_motion_lora({"conv_in.weight": torch.zeros(1)}) is None


def diffusers_own_layouts(lora: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """An original-layout motion LoRA in the other layouts, renamed by diffusers' code alone (never kinema's maps):
    its motion-module converter plus `unet.` is what scripts/convert_animatediff_motion_lora_to_diffusers.py writes,
    and its legacy -> peft renaming gives the peft names, on diffusers' paths or (from the original) on kinema's."""
    legacy = {f"unet.{k}": v for k, v in convert_animatediff_checkpoint_to_diffusers(lora).items()}
    return {"diffusers": legacy, "diffusers_peft": convert_unet_state_dict_to_peft(legacy),
            "kinema": convert_unet_state_dict_to_peft(dict(lora))}


@pytest.mark.parametrize("via", ["diffusers", "diffusers_peft", "kinema"])
def test_round_trips_are_bit_exact(via):
    lora = published_motion_lora({"down_blocks.0.motion_modules.0": 32, "mid_block.motion_modules.0": 64}, rank=3)
    there = convert_motion_lora(lora, to=via)
    assert describe_motion_lora(there)["format"] == via
    # The far side against diffusers' renaming, so a rename undone on the way back cannot hide in the round trip.
    independent = diffusers_own_layouts(lora)[via]
    assert there.keys() == independent.keys() and all(there[k] is independent[k] for k in independent)
    back = convert_motion_lora(there, to="original")
    assert back.keys() == lora.keys()
    assert all(back[k] is lora[k] for k in lora)  # the very same tensors: a rename, nothing recomputed
    assert convert_motion_lora(convert_motion_lora(there, to="kinema"), to=via).keys() == there.keys()


def test_layouts_agree_with_diffusers_own_conversion():
    lora = published_motion_lora({"down_blocks.1.motion_modules.1": 32, "up_blocks.0.motion_modules.2": 64}, rank=2)
    legacy = convert_motion_lora(lora, to="diffusers")
    # What diffusers' scripts/convert_animatediff_motion_lora_to_diffusers.py writes for the first key:
    assert ("unet.down_blocks.1.motion_modules.1.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"
            in legacy)
    # diffusers' own legacy -> peft renaming gives exactly our diffusers_peft layout.
    peft = convert_motion_lora(lora, to="diffusers_peft")
    theirs = convert_unet_state_dict_to_peft(legacy)
    assert theirs.keys() == peft.keys() and all(theirs[k] is peft[k] for k in peft)
    kinema = convert_motion_lora(lora, to="kinema")
    assert ("down_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1"
            ".to_out.0.lora_B.weight") in kinema


def test_peft_layout_with_adapter_name_and_alpha_is_read():
    lora = convert_motion_lora(published_motion_lora({"down_blocks.0.motion_modules.0": 32}, rank=4), "kinema")
    named = {k.replace(".lora_A.", ".lora_A.zoom.").replace(".lora_B.", ".lora_B.zoom."): v for k, v in lora.items()}
    named |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0) for k in lora if ".lora_A." in k}
    info = describe_motion_lora(named)
    assert (info["adapter"], info["alpha"], info["layers"], info["parameters"]) == ("zoom", 2.0, 8, 8 * (4 * 64) + 8)
    # The original layout has no place for alpha: alpha / r = 0.5 is baked into up.
    baked = convert_motion_lora(named, to="original")
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor"
    source = lora["down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0"
                  ".to_q.lora_B.weight"]
    assert torch.equal(baked[f"{key}.to_q_lora.up.weight"], source * 0.5)


def test_a_peft_file_with_its_alpha_in_metadata_converts_to_every_layout(tmp_path):
    # diffusers' save_lora_weights (and kinema's training export) keep alpha in `lora_adapter_metadata`; the layouts
    # with a place for alpha get one tensor per layer, which safetensors can write.
    import json

    from kinema.loaders.animatediff.motion_lora_keys import ADAPTER_METADATA_KEY
    from kinema.loaders.checkpoint_io import read_checkpoint, write_state_dict

    lora = convert_motion_lora(published_motion_lora({"down_blocks.0.motion_modules.0": 32}, rank=4), "diffusers_peft")
    metadata = {ADAPTER_METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 8})}
    for layout in ("original", "diffusers", "diffusers_peft", "kinema"):
        path = write_state_dict(convert_motion_lora(lora, layout, metadata), tmp_path / f"{layout}.safetensors")
        info = describe_motion_lora(read_checkpoint(path).tensors)
        assert info["layers"] == 8 and info.get("alpha") in (8.0, None)


def test_malformed_files_raise_one_clear_error():
    lora = published_motion_lora({"down_blocks.0.motion_modules.0": 32}, rank=4)
    with pytest.raises(KinemaError, match=r"1 of 17 keys are not 'original'.*lora_unet_extra"):
        convert_motion_lora({**lora, "lora_unet_extra.alpha": torch.tensor(1.0)}, to="kinema")
    missing_up = {k: v for k, v in lora.items() if not k.endswith("to_k_lora.up.weight")}
    with pytest.raises(KinemaError, match="attention_blocks.0.processor.to_k_lora.down.weight has no up"):
        describe_motion_lora(missing_up)
    bad_rank = {**lora, next(k for k in lora if k.endswith("up.weight")): torch.zeros(32, 5)}
    with pytest.raises(KinemaError, match="one rank"):
        describe_motion_lora(bad_rank)
    with pytest.raises(KinemaError, match="no motion-LoRA keys"):
        convert_motion_lora({"conv_in.weight": torch.zeros(1)}, to="original")
    with pytest.raises(KinemaError, match="unknown motion-LoRA layout"):
        convert_motion_lora(lora, to="comfy")


# ---------------------------------------------------------------- applying to a VideoUNet


def test_merge_at_strength_one_is_exactly_the_original_rule(make_video, loras):
    lora, _ = loras
    video, reference = make_video(), merged_reference(make_video(), (lora, 1.0))
    info = load_motion_lora(video, lora, "zoom", merge=True)
    assert (info["layers"], info["rank"], info["motion_modules"]) == (88, 4, 11)
    assert all(torch.equal(video.unet.state_dict()[k], v) for k, v in reference.unet.state_dict().items())
    assert torch.equal(run(video), run(reference))

    other = make_video()
    load_motion_lora(other, lora, "zoom", strength=0.8, merge=True)
    key = next(iter(lora))
    up = lora[key.replace(".down.weight", ".up.weight")]
    expected = layer_weight(make_video(), key) + 0.8 * torch.mm(up, lora[key])
    assert torch.equal(layer_weight(other, key), expected)


def test_peft_adapter_equals_merged_weights(make_video, loras):
    lora, _ = loras
    base = run(make_video())
    adapter, merged = make_video(), make_video()
    load_motion_lora(adapter, lora, "zoom", strength=0.7)
    load_motion_lora(merged, lora, "zoom", strength=0.7, merge=True)
    out = run(adapter)
    assert (out - base).abs().max().item() > 1e-2  # the LoRA changes the output ...
    assert (out - run(merged)).abs().max().item() < 1e-5  # ... identically both ways
    assert any(isinstance(m, BaseTunerLayer) for m in adapter.modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())


def test_strength_zero_is_the_base_model_exactly(make_video, loras):
    lora, _ = loras
    base = run(make_video())
    video = make_video()
    load_motion_lora(video, lora, "zoom", strength=0.0)
    assert torch.equal(run(video), base)
    set_motion_lora_strength(video, "zoom", 1.3)
    assert not torch.equal(run(video), base)
    merged = make_video()
    load_motion_lora(merged, lora, "zoom", merge=True)
    set_motion_lora_strength(merged, "zoom", 0.0)
    assert torch.equal(run(merged), base)
    for typo in (float("nan"), 1e9):  # a merged weight would be lost to it for good
        with pytest.raises(KinemaError, match="motion LoRA strength must be a number from -100 to 100"):
            set_motion_lora_strength(merged, "zoom", typo)
    assert torch.equal(run(merged), base)


def test_strength_changes_equal_a_fresh_load(make_video, loras):
    lora, _ = loras
    for merge in (False, True):
        video, fresh = make_video(), make_video()
        load_motion_lora(video, lora, "zoom", strength=1.0, merge=merge)
        set_motion_lora_strength(video, "zoom", 0.3)
        load_motion_lora(fresh, lora, "zoom", strength=0.3, merge=merge)
        assert torch.equal(run(video), run(fresh))
        assert loaded_motion_loras(video) == {"zoom": {"strength": 0.3, "merged": merge, "layers": 88}}


def test_two_loras_stack_as_the_sum_of_their_deltas(make_video, loras):
    first, second = loras
    reference = run(merged_reference(make_video(), (first, 0.6), (second, 1.3)))
    adapters = make_video()
    load_motion_lora(adapters, first, "zoom", strength=0.6)
    load_motion_lora(adapters, second, "pan", strength=1.3)
    assert (run(adapters) - reference).abs().max().item() < 1e-5
    assert (run(adapters) - run(merged_reference(make_video(), (first, 0.6)))).abs().max().item() > 1e-2
    merged = make_video()
    load_motion_lora(merged, first, "zoom", strength=0.6, merge=True)
    load_motion_lora(merged, second, "pan", strength=1.3, merge=True)
    assert torch.equal(run(merged), reference)
    mixed = make_video()
    load_motion_lora(mixed, first, "zoom", strength=0.6, merge=True)
    load_motion_lora(mixed, second, "pan", strength=1.3)
    assert (run(mixed) - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_unloading_restores_the_exact_weights(make_video, loras, merge):
    first, second = loras
    pristine = make_video()
    video = make_video()
    load_motion_lora(video, first, "zoom", strength=0.6, merge=merge)
    load_motion_lora(video, second, "pan", strength=1.3, merge=merge)
    unload_motion_lora(video, "zoom")
    only_second = make_video()
    load_motion_lora(only_second, second, "pan", strength=1.3, merge=merge)
    assert torch.equal(run(video), run(only_second))
    unload_motion_lora(video, "pan")
    assert torch.equal(run(video), run(pristine))
    assert video.unet.state_dict().keys() == pristine.unet.state_dict().keys()
    assert all(torch.equal(video.unet.state_dict()[k], v) for k, v in pristine.unet.state_dict().items())
    assert not any(isinstance(m, BaseTunerLayer) for m in video.modules())
    assert not hasattr(video.unet, "peft_config") and loaded_motion_loras(video) == {}


def lora_weights(video: VideoUNet) -> dict[str, torch.Tensor]:
    return {name: p for name, p in video.named_parameters() if ".lora_" in name}


def test_every_layout_and_file_type_loads_the_same(make_video, loras, tmp_path):
    lora, _ = loras
    reference = make_video()
    load_motion_lora(reference, lora, "zoom")
    expected, expected_weights = run(reference), lora_weights(reference)
    assert len(expected_weights) == 2 * 88
    save_file(convert_motion_lora(lora, "diffusers"), tmp_path / "zoom.safetensors")
    torch.save(lora, tmp_path / "zoom.ckpt")
    sources = [convert_motion_lora(lora, fmt) for fmt in ("diffusers", "diffusers_peft", "kinema")]
    for source in [*sources, tmp_path / "zoom.safetensors", str(tmp_path / "zoom.ckpt")]:
        video = make_video()
        load_motion_lora(video, source, "zoom")
        weights = lora_weights(video)
        assert weights.keys() == expected_weights.keys()
        assert all(torch.equal(weights[k], v) for k, v in expected_weights.items())  # kinema's bits: exact
        # Same code on the same weights, but a file's tensors may sit at other memory alignments, which can change
        # MKL's summation order: a few float32 ulps of room on outputs up to 1.2 (measured difference 0), while
        # the LoRA itself moves the output by 0.7.
        torch.testing.assert_close(run(video), expected, rtol=1e-6, atol=1e-6)


def test_alpha_scales_the_update_by_alpha_over_rank(make_video, loras):
    lora, _ = loras
    with_alpha = convert_motion_lora(lora, "kinema")
    with_alpha |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0) for k in with_alpha if ".lora_A." in k}
    reference = run(merged_reference(make_video(), (lora, 0.9 * 2.0 / 4)))
    for merge in (False, True):
        video = make_video()
        load_motion_lora(video, with_alpha, "zoom", strength=0.9, merge=merge)
        assert (run(video) - reference).abs().max().item() < 1e-5


def test_loras_that_do_not_fit_are_refused_before_anything_changes(make_video, loras):
    lora, _ = loras
    video = make_video(mid_block=False)
    base = run(video)
    wide = published_motion_lora({"down_blocks.0.motion_modules.0": 320}, rank=4)
    with pytest.raises(KinemaError, match=r"8 of 8 layers.*to_q_lora.down.weight \(LoRA maps 320->320 channels, "
                                          r"the layer 32->32\)"):
        load_motion_lora(video, wide, "wide")
    with pytest.raises(KinemaError, match="mid_block.motion_modules.0.*motion_mid_block=True"):
        load_motion_lora(video, lora, "zoom")
    with pytest.raises(KinemaError, match="not 'original' motion-LoRA keys.*foo.weight"):
        load_motion_lora(video, {**lora, "foo.weight": torch.zeros(1)}, "zoom")
    assert loaded_motion_loras(video) == {} and torch.equal(run(video), base)
    small = {k: v for k, v in lora.items() if "mid_block" not in k}
    load_motion_lora(video, small, "zoom")
    with pytest.raises(KinemaError, match="already loaded"):
        load_motion_lora(video, small, "zoom")
    with pytest.raises(KinemaError, match="letters, digits"):
        load_motion_lora(video, small, "zoom.in")
    with pytest.raises(KinemaError, match="from -100 to 100"):
        load_motion_lora(video, small, "other", strength=float("nan"))
    with pytest.raises(KinemaError, match=r"no motion LoRA named 'pan'.*\['zoom'\]"):
        unload_motion_lora(video, "pan")


def test_loading_leaves_trainability_alone_and_loras_frozen(make_video, loras):
    first, second = loras
    video = make_video()
    video.freeze_base()
    trainable = {n for n, p in video.named_parameters() if p.requires_grad}
    load_motion_lora(video, first, "zoom")
    load_motion_lora(video, second, "pan")
    # peft would freeze every existing weight on the first adapter; kinema keeps them as they were.
    now = {n.replace(".base_layer", "") for n, p in video.named_parameters() if p.requires_grad}
    assert now == trainable and len(trainable) == 11 * 26
    unload_motion_lora(video, "zoom")
    assert {n.replace(".base_layer", "") for n, p in video.named_parameters() if p.requires_grad} == trainable


def test_freeze_base_after_loading_keeps_loras_frozen(make_video, loras):
    video = make_video()
    load_motion_lora(video, loras[0], "zoom")
    video.freeze_base()
    trainable = {n for n, p in video.named_parameters() if p.requires_grad}
    assert not any("lora_" in n for n in trainable)
    assert {n.replace(".base_layer", "") for n in trainable} == {f"unet.{k}" for k in make_video().motion_state_dict()}


def test_same_output_as_diffusers_unet_motion_model_with_the_same_lora():
    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(**TINY_UNET).eval()
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)
    perturb(adapter, seed=3, scale=0.1)
    reference = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    video = VideoUNet.from_unet2d(unet2d, motion_mid_block=True,
                                  motion_module={"type": "temporal", "norm_mode": "across_frames"}).eval()
    video.load_motion_state_dict({diffusers_to_original_key(k): v for k, v in reference.state_dict().items()
                                  if ".motion_modules." in k and not k.endswith("pos_embed.pe")})
    lora = published_motion_lora(tiny_modules(video), rank=4, seed=10)
    base = run(video)
    load_motion_lora(video, lora, "zoom", strength=0.7)
    reference.load_lora_adapter(convert_motion_lora(lora, "diffusers_peft"), prefix="unet", adapter_name="zoom")
    reference.set_adapters(["zoom"], [0.7])
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 3, 8, 8, generator=gen), torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        # diffusers' UNetMotionModel takes text tokens repeated per frame, (B*F, L, D).
        expected = reference(x, torch.tensor([500]), text.repeat_interleave(3, dim=0)).sample
    out = run(video)
    assert (out - base).abs().max().item() > 0.1
    # diffusers' motion modules and peft wiring vs kinema's, same weights: 1.5e-6 measured on outputs up to 1.1;
    # 1e-5 leaves ~6x room, while the LoRA moves the output by 0.6.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_failure_inside_peft_leaves_the_model_as_it_was(make_video, loras, monkeypatch):
    import kinema.loaders.animatediff.motion_lora as motion_lora

    first, second = loras
    video = make_video()
    load_motion_lora(video, first, "zoom", strength=0.5)
    load_motion_lora(video, first, "tilt", strength=0.25)
    video.freeze_base()
    trainable = {n for n, p in video.named_parameters() if p.requires_grad}
    expected = run(video)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(motion_lora, "set_peft_model_state_dict", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        load_motion_lora(video, second, "pan")
    assert list(loaded_motion_loras(video)) == ["zoom", "tilt"] and list(video.unet.peft_config) == ["zoom", "tilt"]
    layers = [m for m in video.modules() if isinstance(m, BaseTunerLayer)]
    assert all(list(m.lora_A) == ["zoom", "tilt"] and m.active_adapters == ["zoom", "tilt"] for m in layers)
    assert {n for n, p in video.named_parameters() if p.requires_grad} == trainable
    assert torch.equal(run(video), expected)


def test_a_motion_module_is_saved_with_a_merged_lora_and_refused_with_an_adapter(make_video, loras, tmp_path):
    """An adapter's peft wrappers rename the projections (to_q.base_layer.weight): the save wrote a file that
    neither describe nor load read back. A merged LoRA is in the weights: the file loads as the merged model."""
    from kinema.loaders.animatediff import load_motion_module, save_motion_module

    lora, _ = loras
    adapter, merged = make_video(), make_video()
    load_motion_lora(adapter, lora, "zoom", strength=0.7)
    with pytest.raises(KinemaError, match="carries motion LoRA zoom as an adapter, which a motion module file does "
                                          "not hold: unload it first"):
        save_motion_module(adapter, tmp_path / "adapter.safetensors")
    assert not (tmp_path / "adapter.safetensors").exists()
    unload_motion_lora(adapter, "zoom")
    save_motion_module(adapter, tmp_path / "alone.safetensors")
    assert torch.equal(run(load_motion_module(tmp_path / "alone.safetensors", make_video().unet)), run(make_video()))

    load_motion_lora(merged, lora, "zoom", strength=0.7, merge=True)
    save_motion_module(merged, tmp_path / "merged.safetensors")
    assert torch.equal(run(load_motion_module(tmp_path / "merged.safetensors", make_video().unet)), run(merged))
