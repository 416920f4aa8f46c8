"""load_family: an SD1.5 folder or single file with a motion module and LoRAs gives the VideoUNet that loading the
pieces by hand gives (diffusers' own LoRA fuse, kinema.load for the motion module and motion LoRA); bad input is one
KinemaError line before any weights are read."""

import logging
import math

import pytest
import torch
from diffusers import PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from tiny_easyanimate import source_model, v3_config, v3_state, write_full_folder, write_transformer
from tiny_sd import (
    ldm_vae_state,
    tiny_sd_parts,
    write_kohya_lora,
    write_motion_lora,
    write_motion_module,
    write_sd_configs,
    write_sd_folder,
    write_sd_single_file,
)
from transformers import CLIPTextModel

import kinema
from kinema.bundled import bundled_model_path
from kinema.errors import KinemaError
from kinema.loaders.stable_diffusion import load_tokenizer
from kinema.models.video_unet import VideoUNet
from kinema.pipelines.animatediff import AnimateDiffFamily
from kinema.pipelines.load import load_family

KOHYA_WEIGHT, MOTION_WEIGHT = 0.7, 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    parts = tiny_sd_parts()
    return {
        "parts": parts,
        "folder": write_sd_folder(root / "tiny-sd", parts),
        "single": write_sd_single_file(root / "tiny-sd.safetensors", parts),
        "configs": write_sd_configs(root / "configs", parts),
        "motion_module": write_motion_module(root / "mm_v2.safetensors", "v2", seed=5),
        "v3_module": write_motion_module(root / "mm_v3.safetensors", "v3", seed=5),
        "motion_lora": root / "pan_left.safetensors",
        "kohya": root / "style.safetensors",
        "sdxl_module": write_motion_module(root / "mm_4_levels.safetensors", "v2", widths=(32, 64, 64, 64)),
        "easyanimate": write_transformer(root / "easyanimate", v3_state(source_model()), v3_config()).parent,
        "root": root,
        "other_vae": other_vae(root),
    }


def other_vae(root):
    """Another VAE for the tiny SD model, as a standalone original-layout file (vae-ft-mse's layout), and a folder of
    it whose config says SDXL's latent space."""
    from diffusers import AutoencoderKL
    from loaders.test_stable_diffusion import TINY_VAE
    from safetensors.torch import save_file
    from tiny_models import perturb

    torch.manual_seed(4)
    vae = perturb(AutoencoderKL(**TINY_VAE), 21).eval()
    save_file(ldm_vae_state(vae, training=True), root / "vae-ft.safetensors")
    vae.register_to_config(scaling_factor=0.13025)
    vae.save_pretrained(root / "sdxl-vae")
    deeper = AutoencoderKL(**{**TINY_VAE, "block_out_channels": (32, 64, 64), "down_block_types": (
        "DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3})
    save_file(ldm_vae_state(deeper), root / "deeper.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3, 3), "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3,
                                                                                                              3)},
              root / "slice.safetensors")
    save_file({**ldm_vae_state(vae), "cond_stage_model.x": torch.zeros(1)}, root / "with-more.safetensors")
    return {"model": vae, "file": root / "vae-ft.safetensors", "sdxl_folder": root / "sdxl-vae",
            "deeper_file": root / "deeper.safetensors", "video_file": root / "slice.safetensors",
            "with_more": root / "with-more.safetensors"}


@pytest.fixture(scope="module", autouse=True)
def loras(files):
    write_motion_lora(files["motion_lora"], seed=6)
    write_kohya_lora(files["kohya"], seed=7)


def by_hand(files, kohya_weight=None, motion_weight=None):
    """The independent path: diffusers fuses the image LoRA from its file, kinema.load adds the motion parts."""
    kohya_weight = KOHYA_WEIGHT if kohya_weight is None else kohya_weight
    motion_weight = MOTION_WEIGHT if motion_weight is None else motion_weight
    folder = files["folder"]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    from diffusers import AutoencoderKL

    pipe = StableDiffusionPipeline(vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=text_encoder,
                                   tokenizer=load_tokenizer(folder), unet=unet,
                                   scheduler=PNDMScheduler.from_pretrained(folder / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(files["kohya"]))
    pipe.fuse_lora(lora_scale=kohya_weight)
    pipe.unload_lora_weights()
    video = kinema.load(files["motion_module"], unet=unet)
    kinema.load(files["motion_lora"], video_unet=video, strength=motion_weight)
    return video, text_encoder


def assert_same_weights(got: torch.nn.Module, expected: torch.nn.Module, tolerance: float = 0.0) -> None:
    """Every tensor of `got` equals `expected`'s cast to its dtype, within `tolerance`."""
    ours, theirs = got.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    worst = max((ours[k].float() - v.to(ours[k].dtype).float()).abs().max().item() for k, v in theirs.items())
    assert worst <= tolerance, worst


@pytest.fixture(scope="module")
def loaded(files):
    return load_family(files["folder"], motion_module=files["motion_module"],
                       loras=[(files["motion_lora"], MOTION_WEIGHT), (files["kohya"], KOHYA_WEIGHT)])


@pytest.fixture(scope="module")
def plain(files):
    return load_family(files["folder"], motion_module=files["motion_module"])


def test_folder_motion_module_and_loras_equal_loading_the_pieces_by_hand(files, loaded, plain):
    family = loaded
    assert isinstance(family, AnimateDiffFamily) and isinstance(family.model, VideoUNet)
    video, text_encoder = by_hand(files)
    # The image LoRA fuses into the float32 weights the same way; diffusers' fuse adds the same update.
    assert_same_weights(family.model, video, tolerance=1e-6)
    assert_same_weights(family.text_encoder, text_encoder, tolerance=1e-6)
    assert_same_weights(family.vae, files["parts"]["vae"])
    # The LoRAs did reach the weights: without them, the UNet and text encoder differ.
    with pytest.raises(AssertionError):
        assert_same_weights(plain.model, video, tolerance=1e-4)
    with pytest.raises(AssertionError):
        assert_same_weights(plain.text_encoder, text_encoder, tolerance=1e-4)
    assert family.settings() == {
        "model": str(files["folder"]), "family": "animatediff", "motion_module": str(files["motion_module"]),
        "loras": [{"path": str(files["motion_lora"]), "weight": MOTION_WEIGHT},
                  {"path": str(files["kohya"]), "weight": KOHYA_WEIGHT}]}
    with torch.no_grad():  # the outputs agree too, a step that runs the motion LoRA's peft layers
        x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(family.model(x, 10, text), video(x, 10, text), rtol=1e-5, atol=1e-5)


def test_paths_given_relative_are_recorded_absolute(files, monkeypatch, tmp_path):
    # The settings remake the video from any folder (a batch elsewhere, `kinema extend` of it from another folder).
    monkeypatch.chdir(files["root"])
    family = load_family(files["folder"].name, motion_module=files["motion_module"].name,
                         loras=[(files["kohya"].name, 0.5)])
    monkeypatch.chdir(tmp_path)
    assert family.settings() == {"model": str(files["folder"]), "family": "animatediff",
                                 "motion_module": str(files["motion_module"]),
                                 "loras": [{"path": str(files["kohya"]), "weight": 0.5}]}


def test_another_vae_replaces_the_models_own_and_is_recorded(files, plain):
    swapped = load_family(files["folder"], motion_module=files["motion_module"], vae=files["other_vae"]["file"])
    assert_same_weights(swapped.vae, files["other_vae"]["model"])
    assert_same_weights(swapped.model, plain.model) and assert_same_weights(swapped.text_encoder, plain.text_encoder)
    assert swapped.vae.config.scaling_factor == plain.vae.config.scaling_factor  # the model's latent space
    assert swapped.settings()["vae"] == str(files["other_vae"]["file"]) and "vae" not in plain.settings()
    latents = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        frames = swapped.decode(latents)
        reference = files["other_vae"]["model"].decode(latents[0].transpose(0, 1) / 0.18215).sample
    torch.testing.assert_close(frames[0], (reference / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)
    single = load_family(files["single"], motion_module=files["motion_module"], tokenizer=files["folder"],
                         config=files["configs"], vae=files["other_vae"]["file"])
    assert_same_weights(single.vae, files["other_vae"]["model"])


def test_one_file_of_an_image_and_a_motion_lora_applies_both(files, tmp_path):
    # What kinema's `lora.targets: all` export and diffusers' save of such a LoRA are: image-layer LoRA matrices and
    # motion-module ones in one file, each part applied as its own kind would be.
    from safetensors.torch import load_file, save_file

    both = tmp_path / "both.safetensors"
    save_file({**load_file(files["kohya"]), **load_file(files["motion_lora"])}, both)
    family = load_family(files["folder"], motion_module=files["motion_module"], loras=[(both, 0.6)])
    video, text_encoder = by_hand(files, kohya_weight=0.6, motion_weight=0.6)
    assert_same_weights(family.text_encoder, text_encoder, tolerance=1e-6)
    with torch.no_grad():
        x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(family.model(x, 10, text), video(x, 10, text), rtol=1e-5, atol=1e-5)


def test_the_same_motion_lora_twice_gets_two_adapters(files, loaded):
    twice = load_family(files["folder"], motion_module=files["motion_module"],
                        loras=[(files["motion_lora"], MOTION_WEIGHT / 2), (files["kohya"], KOHYA_WEIGHT),
                               (files["motion_lora"], MOTION_WEIGHT / 2)])
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # two halves add up to one whole (LoRA updates are linear in the strength)
        torch.testing.assert_close(twice.model(x, 10, text), loaded.model(x, 10, text), rtol=1e-5, atol=1e-5)


def test_bfloat16_casts_every_part_after_a_float32_load(files, loaded, caplog):
    with caplog.at_level(logging.INFO, logger="kinema.pipelines.load"):
        half = load_family(files["folder"], motion_module=files["motion_module"], dtype="bfloat16",
                           loras=[(files["motion_lora"], MOTION_WEIGHT), (files["kohya"], KOHYA_WEIGHT)])
    for part in (half.model, half.vae, half.text_encoder):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    for name in ("model", "vae", "text_encoder"):
        assert_same_weights(getattr(half, name), getattr(loaded, name))
    messages = caplog.text
    assert "tiny-sd: stable_diffusion (stable-diffusion)" in messages and "fused image LoRA" in messages
    assert "applied motion LoRA" in messages and "loaded AnimateDiff model" in messages


def test_single_file_needs_a_tokenizer_and_loads_the_same_model(files, plain):
    with pytest.raises(KinemaError, match="single-file checkpoint, which holds no tokenizer: pass tokenizer="):
        load_family(files["single"], motion_module=files["motion_module"], config=files["configs"])
    family = load_family(files["single"], motion_module=files["motion_module"], tokenizer=files["folder"],
                         config=files["configs"])
    assert_same_weights(family.model, plain.model)
    assert_same_weights(family.text_encoder, plain.text_encoder)
    assert family.tokenizer("the cat").input_ids == plain.tokenizer("the cat").input_ids


def test_an_easyanimate_folder_gives_its_family_in_the_dtype_asked(tmp_path, caplog):
    from kinema.pipelines.easyanimate import EasyAnimateFamily

    folder = tmp_path / "easyanimate-v3"
    model = source_model()
    write_full_folder(folder, model)
    with caplog.at_level(logging.INFO, logger="kinema.pipelines.load"):
        family = load_family(folder, dtype="bfloat16")
    assert isinstance(family, EasyAnimateFamily) and family.settings()["model"] == str(folder)
    by_hand = kinema.load(folder)  # float32: the family's parts are these, cast
    for name in ("transformer", "vae", "text_encoder", "image_encoder"):
        part = getattr(family, name)
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}, name
        assert_same_weights(part, getattr(by_hand, name))
    assert_same_weights(by_hand.transformer, model)
    assert "easyanimate-v3: easyanimate_transformer" in caplog.text and "loaded EasyAnimate model" in caplog.text


@pytest.fixture
def no_weights_read(monkeypatch):
    """Loading any kind's weights fails the test: the refusals must come first."""
    from kinema.loaders import formats

    def refuse(self, role):
        if role == "load":
            raise AssertionError(f"{self.kind} weights were loaded before the input was refused")
        return original(self, role)

    original = formats.Format.function
    monkeypatch.setattr(formats.Format, "function", refuse)


BAD = {
    "no motion module": (lambda f: ((f["folder"],), {}),
                         "AnimateDiff needs a motion module: pass --motion-module PATH"),
    "missing model": (lambda f: ((f["root"] / "nope",), {"motion_module": f["motion_module"]}),
                      r"model .*nope does not exist: check the path"),
    "missing motion module": (lambda f: ((f["folder"],), {"motion_module": f["root"] / "mm.ckpt"}),
                              r"motion module .*mm.ckpt does not exist"),
    "missing LoRA": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                 "loras": [(f["root"] / "gone.safetensors", 1.0)]}),
                     r"LoRA .*gone.safetensors does not exist"),
    "NaN weight": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                               "loras": [(f["kohya"], math.nan)]}),
                   r"the LoRA weight for .*style.safetensors must be a number from -100 to 100 \(1: as trained, "
                   r"0: off, negative: its opposite\), got nan"),
    "infinite weight": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                    "loras": [(f["kohya"], -math.inf)]}),
                        "must be a number from -100 to 100 .*, got -inf"),
    "a device this machine lacks": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                                "device": "cuda:99"}), r"^device cuda:99: "),
    "a device name of no kind": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                             "device": "gpu"}), r"^unknown device 'gpu': use auto"),
    "a typo's weight": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                    "loras": [(f["kohya"], 1e9)]}),
                        "must be a number from -100 to 100 .*, got 1000000000.0"),
    "weight as text": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                   "loras": [(f["kohya"], "0.5")]}),
                       "must be a number from -100 to 100 .*, got '0.5'"),
    "LoRA not a pair": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"], "loras": [f["kohya"]]}),
                        r"each LoRA is a \(path, weight\) pair"),
    "unknown dtype": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"], "dtype": "fp8"}),
                      "unknown dtype 'fp8'; known dtypes: float32, bfloat16, float16"),
    "motion module as model": (lambda f: ((f["motion_module"],), {}),
                               r"is not a model to generate with \(it is: AnimateDiff motion module .*\): give a "
                               "Stable Diffusion 1.5"),
    "LoRA as model": (lambda f: ((f["kohya"],), {}), r"style.safetensors is not a model to generate with \(it is: "
                                                     r"image LoRA for SD1.5 .*\): give a Stable Diffusion 1.5 folder"),
    "LoRA as motion module": (lambda f: ((f["folder"],), {"motion_module": f["motion_lora"]}),
                              "pan_left.safetensors is not a motion module .it is: motion LoRA."),
    # A file its own describer refuses (a VAE of other widths than SD1.5's) is said not to be a motion module first.
    "VAE as motion module": (lambda f: ((f["folder"],), {"motion_module": str(
        bundled_model_path("kinema-tiny-ad") / "vae" / "diffusion_pytorch_model.safetensors")}),
                             r"diffusion_pytorch_model.safetensors is not a motion module \(its weights do not fit "
                             r"Stable Diffusion 1.5's VAE: .*\); give an AnimateDiff motion module file"),
    "motion module as LoRA": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                          "loras": [(f["motion_module"], 1.0)]}),
                              r"mm_v2.safetensors is not a LoRA \(it is a motion_module\)"),
    "module for another UNet": (lambda f: ((f["folder"],), {"motion_module": f["sdxl_module"]}),
                                r"made for a UNet of widths \(32, 64, 64, 64\), but .*tiny-sd's UNet has widths "
                                r"\(32, 64\)"),
    "tokenizer with a folder": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                            "tokenizer": f["folder"]}),
                                "is a diffusers folder, which brings its own tokenizer and configs; tokenizer= and "
                                "config= are for single-file"),
    "config with a folder": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                         "config": f["configs"]}),
                             "is a diffusers folder, which brings its own tokenizer"),
    "motion module with EasyAnimate": (lambda f: ((f["easyanimate"],), {"motion_module": f["motion_module"]}),
                                       "is an EasyAnimate model, which has its own motion layers: drop "
                                       "--motion-module"),
    "LoRA with EasyAnimate": (lambda f: ((f["easyanimate"],), {"loras": [(f["kohya"], 1.0)]}),
                              "is an EasyAnimate model: --lora is for AnimateDiff"),
    "missing VAE": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                "vae": f["root"] / "vae.pt"}), r"VAE .*vae.pt does not exist"),
    "VAE of another latent space": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                                "vae": f["other_vae"]["sdxl_folder"]}),
                                    r"sdxl-vae: its scaling_factor is 0.13025 and the model's VAE's 0.18215, so it "
                                    "works in another latent space"),
    "VAE for another model": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                          "vae": f["other_vae"]["deeper_file"]}),
                              r"deeper.safetensors: 26 tensors have no place in the VAE \(e.g. decoder.up.2.block"),
    "model as VAE": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"], "vae": f["motion_module"]}),
                     r"mm_v2.safetensors is not a VAE \(it is: AnimateDiff motion module"),
    "video VAE file as VAE": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                          "vae": f["other_vae"]["video_file"]}),
                              r"slice.safetensors is not a Stable Diffusion image VAE: its convolutions are 3D, a "
                              r"video VAE's \(EasyAnimate's Slice VAE comes in its model's folder\); give an SD1.5"),
    "VAE file with more": (lambda f: ((f["folder"],), {"motion_module": f["motion_module"],
                                                       "vae": f["other_vae"]["with_more"]}),
                           r"with-more.safetensors is not a Stable Diffusion image VAE: it holds 1 entries that are "
                           r"no part of an image VAE beside its own \(e.g. cond_stage_model.x\)"),
    "VAE with EasyAnimate": (lambda f: ((f["easyanimate"],), {"vae": f["other_vae"]["file"]}),
                             "is an EasyAnimate model, whose Slice VAE encodes time as well as space: another VAE "
                             r"\(vae, --vae\) is for AnimateDiff"),
    "mid-block motion LoRA on v3": (lambda f: ((f["folder"],), {"motion_module": f["v3_module"],
                                                                 "loras": [(f["motion_lora"], 0.8)]}),
                                    r"the motion LoRA \S+pan_left.safetensors has layers for the motion modules' mid "
                                    r"block, which \S+mm_v3.safetensors \(v3\) has none of: .*mm_sd_v15_v2"),
    "EasyAnimate transformer alone": (lambda f: ((f["easyanimate"],), {}),
                                      "is an EasyAnimate transformer alone; generation needs the whole V3 folder "
                                      r"\(transformer/, vae/"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_weights_are_read(files, case, no_weights_read):
    make, message = BAD[case]
    args, kwargs = make(files)
    with pytest.raises(KinemaError, match=message) as caught:
        load_family(*args, **kwargs)
    assert "\n" not in str(caught.value)


def test_the_python_api_names_arguments_of_the_wrong_kind(files, tmp_path):
    # Python's own errors (TypeError deep in pathlib, AttributeError in generate) named nothing a user passed.
    import kinema
    from kinema.pipelines import generate
    from kinema.pipelines.request import GenerationRequest

    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    for call, message in (
            (lambda: kinema.describe(None), "^a model is a path or a bundled model's name, got null$"),
            (lambda: kinema.load(3), "^a model is a path or a bundled model's name, got int 3$"),
            # pathlib reads "" as the current folder: describe("") described it
            (lambda: kinema.describe(""), "^the path is empty; give a weights file, a model folder or a bundled"),
            (lambda: kinema.load(" "), "^the path is empty"),
            (lambda: kinema.describe(tmp_path / "dangling.safetensors"),
             r"dangling.safetensors is a symbolic link to .*gone.safetensors, which does not exist; fix the link"),
            (lambda: kinema.convert(files["motion_module"], "", "diffusers"), "^convert's target is empty; give a"),
            (lambda: kinema.convert(files["motion_module"], None, "diffusers"), "^convert's target is a path"),
            (lambda: kinema.convert(files["motion_module"], files["root"] / "x", "diffusers", overwrite="no"),
             "^overwrite must be True or False"),
            (lambda: load_family(None), "^a model is a path or a bundled model's name"),
            (lambda: load_family(files["folder"], motion_module=files["motion_module"], ip_adapter="ip.safetensors"),
             r"^ip_adapter is a \(path, scale\) pair"),
            (lambda: generate("kinema-tiny", GenerationRequest(prompt="x")),
             r"^generate takes a loaded model \(kinema.pipelines.load_family\(...\)\), got str 'kinema-tiny'$"),
            (lambda: generate(load_family("kinema-tiny"), {"prompt": "x"}), "^generate takes a GenerationRequest"),
            (lambda: generate(load_family("kinema-tiny"), GenerationRequest(prompt="x"), callback=5),
             "^callback must be a function of"),
    ):
        with pytest.raises(KinemaError, match=message):
            call()
