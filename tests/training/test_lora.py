"""Training LoRA (kinema.training.lora): which layers it wraps, that it starts as the base model and trains alone, and
that both export formats load back to the trained function in kinema's motion-LoRA loader, diffusers and peft."""

import copy
import json
import re

import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import perturb, tiny_video_dit, tiny_video_unet

import kinema
from kinema.errors import KinemaError
from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.loaders.animatediff.motion_lora import load_motion_lora
from kinema.loaders.animatediff.motion_lora_keys import parse_motion_lora
from kinema.training.lora import TRAIN_ADAPTER, add_lora, lora_state_dict, lora_target_modules, save_lora

PEFT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


# ---------------------------------------------------------------- models, inputs and expected names


def with_active_motion(video):
    """Seeded noise on the motion modules only: fresh ones are identities (zero proj_out), where a motion LoRA
    could not change the output."""
    for index, (_, module) in enumerate(video.motion_modules()):
        perturb(module, seed=100 + index, scale=0.1)
    return video


def randomise_lora(model, seed=7, scale=0.3):
    """Give the training adapter's A and B seeded random values, as if trained (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{TRAIN_ADAPTER}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def unet_inputs(frames=3):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, frames, 8, 8, generator=gen), torch.tensor([500]), torch.randn(1, 5, 32, generator=gen)


def dit_inputs():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(1, 4, 2, 8, 8, generator=gen), torch.tensor([300]), torch.randn(1, 6, 48, generator=gen)


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def run_frozen(model, inputs):
    """The output of a frozen copy of `model`: with every weight frozen, torch picks other CPU kernels for some layers
    (1.7e-6 apart on the tiny UNet, LoRA or not), so an unchanged output is checked bit for bit against this."""
    return run(copy.deepcopy(model).requires_grad_(False), inputs)


def published_lora_keys(video):
    """A MotionLoRA for `video` in AnimateDiff's released layout (e.g. v2_lora_ZoomIn.ckpt's
    `...attention_blocks.0.processor.to_q_lora.down.weight`), shapes only: two temporal attentions per module, four
    processors each, down `(r, C)` and up `(C, r)`."""
    keys = {}
    for module, _ in video.motion_modules():
        c = video.unet.get_submodule(module).temporal_transformer.proj_in.in_features
        for attention in (0, 1):
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                prefix = (f"{module}.temporal_transformer.transformer_blocks.0.attention_blocks.{attention}"
                          f".processor.{proj}_lora")
                keys[f"{prefix}.down.weight"] = torch.empty(2, c, device="meta")
                keys[f"{prefix}.up.weight"] = torch.empty(c, 2, device="meta")
    return keys


def published_lora_names(video):
    """Module paths a published MotionLoRA adapts, as kinema's key parser reads them from the released layout."""
    return {f"unet.{slot.module_path}" for slot in parse_motion_lora(published_lora_keys(video)).layers}


def names_matching(model, pattern):
    """Names of the plain Linears (so: before add_lora wraps them) whose names match `pattern`."""
    return {name for name, module in model.named_modules()
            if re.fullmatch(pattern, name) and isinstance(module, torch.nn.Linear)}


UNET_SPATIAL = r"unet\.(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"  # noqa: E501
DIT_SPATIAL = r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
DIT_MOTION = (r"transformer_blocks\.\d+\.attn_temporal\.temporal_transformer\.transformer_blocks\.\d+"
              r"\.attention_blocks\.\d+\.(to_q|to_k|to_v|to_out\.0)")


def expected_names(model, targets):
    if hasattr(model, "unet"):
        motion, spatial = published_lora_names(model), names_matching(model, UNET_SPATIAL)
    else:
        motion, spatial = names_matching(model, DIT_MOTION), names_matching(model, DIT_SPATIAL)
    return {"motion": motion, "spatial": spatial, "all": motion | spatial}[targets]


def lora_parameter_names(names):
    return {f"{name}.{part}.{TRAIN_ADAPTER}.weight" for name in names for part in ("lora_A", "lora_B")}


# ---------------------------------------------------------------- 1) add_lora


@pytest.mark.parametrize("targets", ["motion", "spatial", "all"])
def test_unet_lora_wraps_the_expected_layers_changes_nothing_and_trains_alone(video_unet, targets):
    video = with_active_motion(video_unet)
    base = run_frozen(video, unet_inputs())
    expected = expected_names(video, targets)
    names = add_lora(video, rank=4, alpha=8, targets=targets)
    assert len(names) == len(set(names)) and set(names) == expected
    assert len(expected) == {"motion": 80, "spatial": 48, "all": 128}[targets]  # 10 modules / 6 transformers x 8
    assert lora_target_modules(video, targets) == names  # the wrapped layers are still found by name
    assert torch.equal(run(video, unet_inputs()), base)  # B is zero: nothing changes until training
    trainable = {name for name, p in video.named_parameters() if p.requires_grad}
    assert trainable == lora_parameter_names(names)


@pytest.mark.parametrize("targets", ["motion", "spatial", "all"])
def test_dit_lora_wraps_the_expected_layers_changes_nothing_and_trains_alone(video_dit, targets):
    perturb(video_dit, seed=4, scale=0.05)
    base = run_frozen(video_dit, dit_inputs())
    expected = expected_names(video_dit, targets)
    names = add_lora(video_dit, rank=2, alpha=2, targets=targets)
    assert set(names) == expected and len(expected) == {"motion": 32, "spatial": 32, "all": 64}[targets]
    assert torch.equal(run(video_dit, dit_inputs()), base)
    assert {name for name, p in video_dit.named_parameters() if p.requires_grad} == lora_parameter_names(names)


def test_gradients_reach_only_the_lora_weights(video_unet):
    video = with_active_motion(video_unet)
    add_lora(video, rank=2, alpha=2, targets="all")
    randomise_lora(video)
    video(*unet_inputs()).square().mean().backward()
    with_grad = {name for name, p in video.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in video.named_parameters() if p.requires_grad}
    assert all(video.get_parameter(name).grad.abs().sum() > 0 for name in with_grad)


def test_a_loaded_motion_lora_stays_active_and_frozen(video_unet):
    video = with_active_motion(video_unet)
    keys = {}
    gen = torch.Generator().manual_seed(5)
    for name in published_lora_names(video):
        layer = video.get_submodule(name)
        path = name.removeprefix("unet.")
        keys[f"{path}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=gen) * 0.2
        keys[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=gen) * 0.2
    load_motion_lora(video, keys, "zoom")
    with_zoom = run_frozen(video, unet_inputs())
    names = add_lora(video, rank=2, alpha=2, targets="motion")
    assert torch.equal(run(video, unet_inputs()), with_zoom)
    assert {name for name, p in video.named_parameters() if p.requires_grad} == lora_parameter_names(names)
    assert len(lora_state_dict(video)) == 2 * len(names)  # the training adapter's weights only
    randomise_lora(video)
    assert not torch.allclose(run(video, unet_inputs()), with_zoom, atol=1e-3)


# ---------------------------------------------------------------- 2) the original AnimateDiff format


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_animatediff_format_loads_back_as_the_trained_model(video_unet, tmp_path, suffix):
    video = with_active_motion(video_unet)
    fresh = copy.deepcopy(video)
    base = run(video, unet_inputs())
    add_lora(video, rank=4, alpha=8, targets="motion")  # alpha / r = 2, which the format must fold in
    randomise_lora(video)
    trained = run(video, unet_inputs())
    assert (trained - base).abs().max() > 0.05

    path = save_lora(video, tmp_path / f"motion_lora{suffix}", "animatediff")
    report = kinema.describe(path)
    assert (report["kind"], report["format"], report["rank"], report["alpha"]) == ("motion_lora", "original", 4, None)
    written = (load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True))
    assert set(written) == set(published_lora_keys(video))
    load_motion_lora(fresh, path, "trained", strength=1.0)
    # The loaded LoRA folds alpha / r into its weights and sums in another order than peft's B(A(x)) * scale: float32
    # rounding measured up to 1.7e-5 here, depending on the fixture's weights (drawn unseeded, so on test order); the
    # LoRA itself moves the output by more than 0.05.
    torch.testing.assert_close(run(fresh, unet_inputs()), trained, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("format", "kinds"), [("animatediff", ["temporal", "text"]),
                                               ("diffusers", ["temporal", "text"]),
                                               ("diffusers", ["temporal", "temporal", "text"])])
def test_a_motion_lora_of_modules_that_read_the_prompt_loads_back(unet2d, tmp_path, format, kinds):
    # kinema-tiny-ad's motion modules have a text attention, whose key and value take the text states' width (32
    # here, where up_blocks.0 is 64 wide): the file check once assumed every projection C -> C and refused the export.
    # Its third attention is diffusers' attn3: the export once left it `attention_blocks.2`, a name no reader took.
    from kinema.loaders import describe

    video = with_active_motion(tiny_video_unet(unet2d, motion_module={
        "type": "temporal", "attention_kinds": kinds, "cross_attention_dim": 32}))
    fresh = copy.deepcopy(video)
    add_lora(video, rank=4, alpha=4, targets="motion")
    randomise_lora(video)
    trained = run(video, unet_inputs())
    assert (trained - run(fresh, unet_inputs())).abs().max() > 0.05
    path = save_lora(video, tmp_path / "motion_lora.safetensors", format)
    assert describe(path)["kind"] == "motion_lora"  # what load_family reads a --lora file by
    load_motion_lora(fresh, path, "trained", strength=1.0)
    torch.testing.assert_close(run(fresh, unet_inputs()), trained, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- 3) the diffusers format, loaded by diffusers


def diffusers_pair(unet2d):
    """diffusers' UNetMotionModel and a kinema VideoUNet with the same weights (diffusers' motion modules
    normalise across frames)."""
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)
    perturb(adapter, seed=3, scale=0.1)
    reference = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    video = tiny_video_unet(unet2d, motion_module={"type": "temporal", "norm_mode": "across_frames"})
    video.load_motion_state_dict({diffusers_to_original_key(k): v for k, v in reference.state_dict().items()
                                  if ".motion_modules." in k and not k.endswith("pos_embed.pe")})
    return adapter, reference, video


def test_diffusers_format_loads_into_diffusers_animatediff_pipeline(unet2d, tmp_path):
    adapter, reference, video = diffusers_pair(unet2d)
    x, t, text = unet_inputs()
    with torch.no_grad():
        # diffusers' UNetMotionModel takes the text tokens once per frame, (B*F, L, D).
        base = reference(x, t, text.repeat_interleave(3, dim=0)).sample
    torch.testing.assert_close(run(video, (x, t, text)), base, rtol=1e-5, atol=1e-5)  # same model before LoRA
    add_lora(video, rank=4, alpha=8, targets="all")
    randomise_lora(video, scale=0.2)
    trained = run(video, (x, t, text))
    assert (trained - base).abs().max() > 0.1

    path = save_lora(video, tmp_path / "lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=reference, motion_adapter=adapter,
                               scheduler=None)
    pipe.load_lora_weights(str(path), adapter_name="trained")
    assert sum(".lora_A.trained." in name for name, _ in reference.named_parameters()) == 128
    with torch.no_grad():
        expected = reference(x, t, text.repeat_interleave(3, dim=0)).sample
    # Same weights, diffusers' blocks and peft wiring vs kinema's: 1.5e-6 measured for the motion-LoRA parity test.
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)


def test_diffusers_format_of_a_motion_lora_is_read_by_kinema_at_scale_one(video_unet, tmp_path):
    # kinema's motion-LoRA reader takes alpha from `.alpha` keys, not diffusers' metadata: alpha = rank here.
    video = with_active_motion(video_unet)
    fresh = copy.deepcopy(video)
    add_lora(video, rank=4, alpha=4, targets="motion")
    randomise_lora(video)
    path = save_lora(video, tmp_path / "lora.safetensors", "diffusers")
    assert kinema.describe(path)["format"] == "diffusers_peft"
    load_motion_lora(fresh, path, "trained")
    torch.testing.assert_close(run(fresh, unet_inputs()), run(video, unet_inputs()), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 4) VideoDiT through peft


def test_dit_diffusers_format_loads_into_a_fresh_dit_through_peft(tmp_path):
    base = perturb(tiny_video_dit(), seed=4, scale=0.05)
    fresh = copy.deepcopy(base)
    add_lora(base, rank=4, alpha=2, targets="all")
    randomise_lora(base, scale=0.2)
    trained = run(base, dit_inputs())
    assert (trained - run(fresh, dit_inputs())).abs().max() > 0.05

    path = save_lora(base, tmp_path / "dit_lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        arguments = {k.removeprefix("transformer."): v
                     for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
    weights = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    assert all(k.startswith("transformer_blocks.") for k in weights) and len(weights) == 2 * 64
    inject_adapter_in_model(LoraConfig(**arguments), fresh, adapter_name="trained")
    result = set_peft_model_state_dict(fresh, weights, adapter_name="trained")
    assert not result.unexpected_keys
    torch.testing.assert_close(run(fresh, dit_inputs()), trained, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- bad input and the output policy


def test_bad_input_is_refused_with_one_line(video_unet, video_dit, tmp_path):
    with pytest.raises(KinemaError, match="unknown LoRA targets 'temporal'; choose one of motion, spatial, all"):
        add_lora(video_unet, 4, 4, "temporal")
    for rank in (0, -1, 1.5, True):
        with pytest.raises(KinemaError, match="rank must be a whole number >= 1"):
            add_lora(video_unet, rank, 4)
    for alpha in (0, -2.0, float("nan"), "4"):
        with pytest.raises(KinemaError, match="alpha must be a finite number > 0"):
            add_lora(video_unet, 4, alpha)
    with pytest.raises(KinemaError, match="VideoUNet .* or VideoDiT"):
        add_lora(video_unet.unet, 4, 4)
    assert not any(p.requires_grad is False for p in video_unet.parameters())  # nothing changed by the refusals
    with pytest.raises(KinemaError, match="no training LoRA .* call add_lora first"):
        save_lora(video_unet, tmp_path / "a.safetensors")

    add_lora(video_dit, 2, 2, "motion")
    with pytest.raises(KinemaError, match="animatediff format holds AnimateDiff motion LoRAs .* not a VideoDiT"):
        save_lora(video_dit, tmp_path / "b.safetensors", "animatediff")
    add_lora(video_unet, 2, 2, "spatial")
    with pytest.raises(KinemaError, match="motion-module layers only, but this LoRA also trains 48 spatial"):
        save_lora(video_unet, tmp_path / "c.safetensors", "animatediff")
    with pytest.raises(KinemaError, match="already has a training LoRA"):
        add_lora(video_unet, 2, 2, "motion")
    with pytest.raises(KinemaError, match="unknown LoRA format 'kohya'"):
        save_lora(video_unet, tmp_path / "d.safetensors", "kohya")
    with pytest.raises(KinemaError, match="a diffusers LoRA file ends in .safetensors"):
        save_lora(video_unet, tmp_path / "e.ckpt")
    assert not any(tmp_path.iterdir())


def test_files_kinema_did_not_write_are_never_replaced(video_unet, tmp_path):
    add_lora(video_unet, 2, 2, "motion")
    foreign = tmp_path / "theirs.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    with pytest.raises(KinemaError, match="kinema did not write it"):
        save_lora(video_unet, foreign, overwrite=True)
    assert set(load_file(foreign)) == {"x"}
    path = save_lora(video_unet, tmp_path / "ours.safetensors")
    with pytest.raises(KinemaError, match="pass --overwrite"):
        save_lora(video_unet, path)
    randomise_lora(video_unet)
    save_lora(video_unet, path, overwrite=True)
    assert all(torch.equal(v, lora_state_dict(video_unet)[k]) for k, v in load_file(path).items())
