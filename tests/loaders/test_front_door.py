"""The front door (`kinema.describe` / `load` / `convert`) and the format registry behind it; Stable Diffusion 1.5
through `kinema.load`. Each family's own kinds through the front door are tested with that family."""

import json
import re
import subprocess
import sys

import pytest
import torch
from loaders import test_stable_diffusion as sd_tests
from safetensors.torch import save_file

import kinema
import kinema.loaders
from kinema.errors import KinemaError
from kinema.loaders.formats import CONVERT_LAYOUTS, FORMATS, format_of
from kinema.loaders.source import Source, describe
from kinema.loaders.stable_diffusion import StableDiffusionComponents, describe_stable_diffusion, load_stable_diffusion

# The tiny SD1.5 models and the folder and configs written from them, shared with test_stable_diffusion.
tiny = sd_tests.tiny
sd_folder = sd_tests.sd_folder
config_dir = sd_tests.config_dir


@pytest.fixture(scope="module")
def single_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "dreambooth.safetensors"
    save_file(sd_tests.ldm_checkpoint(tiny), path)
    return path


# ---------------------------------------------------------------- the registry


def test_every_registry_function_resolves_to_a_callable():
    for entry in FORMATS:
        for role in ("describe", "load", "convert"):
            if getattr(entry, role) is None:
                continue
            assert callable(entry.function(role)), f"{entry.kind}.{role} -> {getattr(entry, role)}"


def test_convert_layouts_are_every_layout_once_and_folder_layouts_are_layouts():
    layouts = [layout for entry in FORMATS for layout in entry.layouts]
    assert set(CONVERT_LAYOUTS) == set(layouts) and len(CONVERT_LAYOUTS) == len(set(layouts))
    for entry in FORMATS:
        assert set(entry.folder_layouts) <= set(entry.layouts), entry.kind
        assert bool(entry.layouts) == (entry.convert is not None), entry.kind


def test_kinds_are_unique_and_stable_diffusion_is_tried_last():
    kinds = [entry.kind for entry in FORMATS]
    assert len(kinds) == len(set(kinds))
    # A motion module has UNet-like names and a Slice VAE folder sits in a vae/ folder: their entries come first.
    assert kinds[-1] == "stable_diffusion"


def test_an_unknown_kind_is_one_line_naming_the_known_ones():
    with pytest.raises(KinemaError, match=r"unknown kind 'sdxl'; kinema knows \[.*'stable_diffusion'") as err:
        format_of("sdxl")
    assert "\n" not in str(err.value)
    with pytest.raises(KinemaError, match=r"a Stable Diffusion 1.5 cannot be converted; kinema converts an "
                                          r"AnimateDiff motion module, "):
        format_of("stable_diffusion").function("convert")


def test_load_of_something_that_is_not_a_model_says_so(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(KinemaError, match="notes.txt: not a format kinema knows: looked for AnimateDiff motion"):
        kinema.loaders.load(notes)
    weights = tmp_path / "stats.safetensors"
    save_file({"mean": torch.zeros(3)}, weights)
    with pytest.raises(KinemaError, match=r"not a format kinema knows: .*Stable Diffusion 1.5.*it looks like"):
        kinema.load(weights)
    with pytest.raises(KinemaError, match="no such file or folder"):
        kinema.load(tmp_path / "missing.safetensors")
    (tmp_path / "nothing.safetensors").mkdir()
    with pytest.raises(KinemaError, match=r"nothing.safetensors is an empty folder, not weights or a model "
                                          r"folder$"):
        kinema.describe(tmp_path / "nothing.safetensors")
    # A diffusers folder without its config.json (a partial download) is named as such.
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"down_blocks.0.motion_modules.0.proj_in.weight": torch.zeros(4, 4)},
              folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(KinemaError, match=r"adapter: not a format .*; it holds diffusion_pytorch_model.safetensors "
                                          r"but no config.json, which a diffusers folder is built from"):
        kinema.describe(folder)


def test_lora_kinds_kinema_does_not_apply_and_prefixed_saves_are_named(tmp_path):
    from tiny_sd import kohya_lora, tiny_sd_parts

    lora = kohya_lora()
    layer = next(name.removesuffix(".lora_down.weight") for name in lora if name.endswith(".lora_down.weight"))
    loha = {f"{layer}.{part}": torch.zeros(4, 4) for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    dora = {**lora, f"{layer}.dora_scale": torch.ones(1, 4)}
    prefixed = {f"module.{name}": tensor for name, tensor in tiny_sd_parts()["unet"].state_dict().items()}
    second = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    sdxl = {**lora, f"{second}.lora_down.weight": torch.zeros(4, 8), f"{second}.lora_up.weight": torch.zeros(8, 4)}
    for name, tensors, said in (
            ("loha", loha, "it looks like a LyCORIS LoHa or LoKr (hada_ or lokr_ matrices), which kinema does not "
                           "apply: use a plain LoRA (lora_down and lora_up)"),
            ("dora", dora, f"this is a DoRA LoRA ({layer}.dora_scale): kinema would apply it without its magnitude "
                           "vectors (dora_scale), which changes what it does; use a plain LoRA"),
            ("ddp", prefixed, "it looks like a model saved from DataParallel or DDP training, every name starting "
                              "with `module.`: save its state dict again without that prefix"),
            ("sdxl", sdxl, f"this is an SDXL LoRA ({second}.lora_down.weight: SDXL's second text encoder); kinema "
                           "applies Stable Diffusion 1.5 image LoRAs: use one made for SD1.5")):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(KinemaError) as err:
            kinema.describe(tmp_path / f"{name}.safetensors")
        assert said in str(err.value)


def test_kinemas_own_latents_are_named_with_what_takes_them(tmp_path):
    from kinema.pipelines.outputs import save_latents

    latents = save_latents(torch.zeros(1, 4, 2, 8, 8), [{"prompt": "a red circle"}],
                           tmp_path / "v.mp4.latents.safetensors")
    with pytest.raises(KinemaError, match=r"it is kinema's own latents output, not weights: `kinema decode` makes its "
                                          r"video$"):
        kinema.loaders.describe(latents)


def test_a_training_run_its_checkpoints_and_its_run_file_are_named_with_what_takes_them(tmp_path):
    import torch

    from kinema.training.checkpoint import RunFolder

    run = RunFolder.open(tmp_path / "run", {"mode": "motion"}, resume=None, keep=2)
    checkpoint = run.save(3, {"model": {"w": torch.zeros(2)}}, {"step": 3})
    for path, words in ((run.path, "training run"), (run.path / "kinema-run.json", "training run"),
                        (checkpoint, "training checkpoint")):
        with pytest.raises(KinemaError, match=f"it is kinema's own {words} output, not weights: .*`kinema train "
                                              "CONFIG --resume"):
            kinema.loaders.describe(path)


def test_a_part_of_a_model_folder_names_the_folder_to_give():
    # A model's unet/ (a UNet2DConditionModel config) is no kind of its own: the folder above it is the model.
    from kinema.bundled import bundled_model_path

    folder = bundled_model_path("kinema-tiny-ad")
    with pytest.raises(KinemaError, match=f"it is the unet/ part of the model folder {re.escape(str(folder))}: give "
                                          "that folder$"):
        kinema.loaders.describe(folder / "unet")


# ---------------------------------------------------------------- the package's public names


def test_import_kinema_imports_no_torch_and_every_public_name_resolves():
    # -X importtime lists every module imported; the CLI reads kinema.__version__ before parsing --help.
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import kinema"], capture_output=True,
                            text=True, check=True)
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "kinema" in imported and not [m for m in imported if m.split(".")[0] in ("torch", "diffusers")]
    assert all(getattr(kinema, name) is not None for name in kinema.__all__)
    assert kinema.load is kinema.loaders.load and callable(kinema.describe) and callable(kinema.convert)
    assert kinema.VideoUNet.__name__ == "VideoUNet" and kinema.SliceVAE.__name__ == "SliceVAE"
    assert set(kinema.__all__) >= {"describe", "load", "convert", "KinemaError", "__version__", "VideoUNet",
                                   "VideoDiT", "SliceVAE"}
    with pytest.raises(AttributeError, match="no attribute 'loadd'"):
        kinema.loadd  # noqa: B018


# ---------------------------------------------------------------- Stable Diffusion 1.5 through the front door


def assert_components_equal(loaded: StableDiffusionComponents, *references) -> None:
    for name in ("unet", "vae", "text_encoder"):
        for reference in references:
            expected = reference[name] if isinstance(reference, dict) else getattr(reference, name)
            sd_tests.assert_same_weights(getattr(loaded, name), expected)


def test_a_diffusers_folder_loads_through_the_front_door(tiny, sd_folder):
    sd = kinema.load(sd_folder)
    assert isinstance(sd, StableDiffusionComponents) and sd.source == sd_folder
    assert_components_equal(sd, tiny, load_stable_diffusion(sd_folder))
    assert sd.tokenizer("the cat").input_ids == [514, 513, 66, 64, 339, 515]
    assert kinema.load(sd_folder, dtype=torch.float16).unet.dtype == torch.float16


def test_a_load_says_what_it_found_at_info_level(tiny, sd_folder, caplog):
    with caplog.at_level("INFO", logger="kinema"):
        kinema.load(sd_folder)
    lines = [r.getMessage() for r in caplog.records if r.name == "kinema.loaders"]
    assert lines[0] == f"loading {sd_folder}: stable_diffusion ({kinema.describe(sd_folder)['format']})"
    assert lines[1].startswith(f"loaded {sd_folder} as StableDiffusionComponents in ")


def test_dtype_is_a_name_or_a_torch_dtype_for_every_part(sd_folder):
    # "float16" once gave a float16 text encoder beside a float32 UNet and VAE (diffusers ignored the string).
    for dtype in ("float16", torch.float16):
        sd = kinema.load(sd_folder, dtype=dtype)
        assert {p.dtype for part in (sd.unet, sd.vae, sd.text_encoder) for p in part.parameters()} == {torch.float16}
    for dtype in ("fp16", 3, torch.int8):
        with pytest.raises(KinemaError, match=f"dtype {re.escape(repr(dtype))} is not one kinema loads; give one of "
                                              "float32, bfloat16, float16"):
            kinema.load(sd_folder, dtype=dtype)


def test_a_single_file_loads_through_the_front_door(tiny, sd_folder, config_dir, single_file):
    sd = kinema.load(single_file, tokenizer=sd_folder, config=config_dir)
    assert isinstance(sd, StableDiffusionComponents)
    assert_components_equal(sd, tiny, load_stable_diffusion(single_file, tokenizer=sd_folder, config=config_dir))
    assert sorted(sd.ignored_keys) == ["alphas_cumprod", "model_ema.decay"]
    with pytest.raises(KinemaError, match="holds no tokenizer: pass tokenizer="):
        kinema.load(single_file, config=config_dir)
    with pytest.raises(KinemaError, match=r"loads with tokenizer=, config= and dtype=; not \['mmap'\]"):
        kinema.load(sd_folder, mmap=True)


def test_a_torch_pickle_single_file_is_unpickled_once(tiny, sd_folder, config_dir, tmp_path, monkeypatch):
    path = tmp_path / "dreambooth.ckpt"
    torch.save({"state_dict": sd_tests.ldm_checkpoint(tiny), "epoch": 3}, path)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(1) or real_load(*args, **kwargs))
    assert_components_equal(kinema.load(path, tokenizer=sd_folder, config=config_dir), tiny)
    assert len(loads) == 1  # describe's read is the load's


def test_describe_reports_a_stable_diffusion_folder(tiny, sd_folder):
    report = json.loads(json.dumps(kinema.describe(sd_folder)))  # plain data
    sizes = {name: sum(p.numel() for p in model.parameters()) for name, model in tiny.items()}
    assert (report["kind"], report["layout"], report["dtype"], report["variant"]) == (
        "stable_diffusion", "diffusers", "float32", "plain")
    assert report["components"] == sizes and report["parameters"] == sum(sizes.values())
    assert report["cross_attention_dim"] == tiny["unet"].config.cross_attention_dim


def test_describe_checks_a_single_file_against_the_configs_it_loads_with(tiny, config_dir, single_file):
    report = describe_stable_diffusion(Source(single_file, {"config": config_dir}))
    sizes = {name: sum(p.numel() for p in model.parameters()) for name, model in tiny.items()}
    assert (report["kind"], report["layout"], report["ignored_keys"]) == ("stable_diffusion", "original", 2)
    assert report["components"] == sizes
    # Tiny weights against the shipped SD1.5 configs: every mismatch is found from the header alone.
    with pytest.raises(KinemaError, match=r"its unet weights do not fit the Stable Diffusion 1.5 unet: .*mismatched"):
        describe(single_file)


def test_the_stable_diffusion_describer_leaves_other_kinds_alone(tiny, tmp_path):
    motion = {"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(4, 4)}
    image_unet = tiny["unet"].state_dict()
    for name, tensors in (("motion.safetensors", motion), ("unet.safetensors", image_unet)):
        save_file(tensors, tmp_path / name)
        assert describe_stable_diffusion(Source(tmp_path / name)) is None
    (tmp_path / "folder" / "vae").mkdir(parents=True)
    assert describe_stable_diffusion(Source(tmp_path / "folder")) is None
    unet_only = {k: v for k, v in sd_tests.ldm_checkpoint(tiny).items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, tmp_path / "unet_only.safetensors")
    with pytest.raises(KinemaError, match=r"has no vae \(first_stage_model.\*\), text_encoder .* not a full Stable"):
        describe(tmp_path / "unet_only.safetensors")


def test_an_option_a_kind_does_not_take_is_one_line_naming_those_it_takes(tmp_path):
    """A motion LoRA's dtype= (load's docstring names dtype), an image LoRA given video_unet= and a motion LoRA given
    sd= were Python's TypeError naming a function the caller never called."""
    from tiny_sd import tiny_sd_parts, write_kohya_lora, write_motion_lora, write_motion_module

    parts = tiny_sd_parts()
    module, motion_lora, image_lora = (tmp_path / "mm.safetensors", tmp_path / "pan.safetensors",
                                       tmp_path / "style.safetensors")
    write_motion_module(module)
    write_motion_lora(motion_lora)
    write_kohya_lora(image_lora)
    video_unet = kinema.load(module, unet=parts["unet"])
    for path, options, said in (
            (motion_lora, {"video_unet": video_unet, "dtype": "float16"},
             f"{motion_lora} is a motion LoRA, whose load takes video_unet=, name=, strength=, merge=; not dtype="),
            (motion_lora, {"sd": parts}, "is a motion LoRA, whose load takes video_unet=, name=, strength=, merge=; "
                                         "not sd="),
            (image_lora, {"video_unet": video_unet}, "is an image LoRA for SD1.5, whose load takes sd=, strength=; "
                                                     "not video_unet=")):
        with pytest.raises(KinemaError) as err:
            kinema.load(path, **options)
        assert said in str(err.value)
    assert kinema.load(motion_lora, video_unet=video_unet, strength=0.5) is video_unet
    with pytest.raises(KinemaError, match="whose load takes dtype=, device=, mmap=; not bogus="):
        kinema.load("kinema-tiny", bogus=1)


def test_a_motion_module_in_half_precision_loads_without_diffusers_float32_notice(tmp_path):
    """diffusers' ModelMixin.to(dtype) logged "modules ... should be kept in float32: []" on every such load."""
    import logging

    from tiny_sd import tiny_sd_parts, write_motion_module

    write_motion_module(tmp_path / "mm.safetensors")
    notices: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())  # type: ignore[method-assign]
    library_logger = logging.getLogger("diffusers.models.modeling_utils")
    library_logger.addHandler(handler)
    try:
        video_unet = kinema.load(tmp_path / "mm.safetensors", unet=tiny_sd_parts()["unet"], dtype="float16")
    finally:
        library_logger.removeHandler(handler)
    assert {parameter.dtype for parameter in video_unet.parameters()} == {torch.float16}
    assert not [notice for notice in notices if "kept in float32" in notice]
