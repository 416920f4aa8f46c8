"""IP-Adapter: files with the published key names load into kinema's VideoUNet, and sampling with an image prompt
equals diffusers' AnimateDiffPipeline with the same adapter, image encoder and image; bad files are one line."""

import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter
from PIL import Image
from safetensors.torch import save_file
from sampling.test_parity import FRAMES, GUIDANCE, STEPS, embeddings, tiny_pipeline_parts
from tiny_models import perturb
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

import kinema
from kinema.errors import KinemaError
from kinema.loaders.animatediff.keys import diffusers_to_original_key
from kinema.loaders.ip_adapter import load_ip_adapter
from kinema.models.video_unet import VideoUNet
from kinema.sampling.denoisers import UNetDenoiser
from kinema.sampling.loop import initial_noise, sample
from kinema.sampling.schedulers import make_scheduler

CLIP_DIM = 16  # the tiny image encoder's projection width (ViT-H/14's is 1024)


def cross_attention_widths(unet2d) -> list[int]:
    """The hidden width of every cross-attention layer, in diffusers' processor order."""
    return [unet2d.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for name in unet2d.attn_processors if name.endswith("attn2.processor")]


def plus_ip_adapter(unet2d, seed=0, queries=4) -> dict[str, torch.Tensor]:
    """ip-adapter-plus_sd15's names and layout (a 4-layer perceiver resampler over the encoder's hidden states, 64
    per head), at the tiny widths: the encoder's hidden states and the resampler 32 wide, one head."""
    gen = torch.Generator().manual_seed(seed)
    width, text, inner = 32, unet2d.config.cross_attention_dim, 64

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    state = {"image_proj.latents": rand(1, queries, width, scale=1.0), "image_proj.proj_in.weight": rand(width, 32),
             "image_proj.proj_in.bias": rand(width), "image_proj.proj_out.weight": rand(text, width),
             "image_proj.proj_out.bias": rand(text), "image_proj.norm_out.weight": 1 + rand(text),
             "image_proj.norm_out.bias": rand(text)}
    for layer in range(4):
        prefix = f"image_proj.layers.{layer}"
        state.update({f"{prefix}.0.norm1.weight": 1 + rand(width), f"{prefix}.0.norm1.bias": rand(width),
                      f"{prefix}.0.norm2.weight": 1 + rand(width), f"{prefix}.0.norm2.bias": rand(width),
                      f"{prefix}.0.to_q.weight": rand(inner, width), f"{prefix}.0.to_kv.weight": rand(2 * inner, width),
                      f"{prefix}.0.to_out.weight": rand(width, inner), f"{prefix}.1.0.weight": 1 + rand(width),
                      f"{prefix}.1.0.bias": rand(width), f"{prefix}.1.1.weight": rand(4 * width, width),
                      f"{prefix}.1.3.weight": rand(width, 4 * width)})
    for index, hidden in enumerate(cross_attention_widths(unet2d)):
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * index + 1}.{kind}.weight"] = rand(hidden, text, scale=0.3)
    return state


def full_face_ip_adapter(unet2d, seed=0) -> dict[str, torch.Tensor]:
    """ip-adapter-full-face_sd15's names and layout (an MLP over every hidden state of the encoder), tiny widths."""
    gen = torch.Generator().manual_seed(seed)
    hidden, text = 32, unet2d.config.cross_attention_dim
    state = {"image_proj.proj.0.weight": torch.randn(hidden, hidden, generator=gen) * 0.2,
             "image_proj.proj.0.bias": torch.randn(hidden, generator=gen) * 0.1,
             "image_proj.proj.2.weight": torch.randn(text, hidden, generator=gen) * 0.2,
             "image_proj.proj.2.bias": torch.randn(text, generator=gen) * 0.1,
             "image_proj.proj.3.weight": 1 + torch.randn(text, generator=gen) * 0.1,
             "image_proj.proj.3.bias": torch.randn(text, generator=gen) * 0.1}
    return {**state, **{k: v for k, v in plain_ip_adapter(unet2d, seed).items() if k.startswith("ip_adapter.")}}


def plain_ip_adapter(unet2d, seed=0, tokens=4) -> dict[str, torch.Tensor]:
    """ip-adapter_sd15's names and layout, at the tiny UNet's widths (text width 32)."""
    gen = torch.Generator().manual_seed(seed)
    text = unet2d.config.cross_attention_dim
    state = {"image_proj.proj.weight": torch.randn(tokens * text, CLIP_DIM, generator=gen) * 0.2,
             "image_proj.proj.bias": torch.randn(tokens * text, generator=gen) * 0.1,
             "image_proj.norm.weight": 1 + torch.randn(text, generator=gen) * 0.1,
             "image_proj.norm.bias": torch.randn(text, generator=gen) * 0.1}
    for index, width in enumerate(cross_attention_widths(unet2d)):
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * index + 1}.{kind}.weight"] = torch.randn(width, text, generator=gen) * 0.3
    return state


@pytest.fixture(scope="module")
def adapter_folder(unet2d, tmp_path_factory):
    """h94/IP-Adapter's models/ layout: the adapter file and image_encoder/ beside it."""
    folder = tmp_path_factory.mktemp("ip")
    save_file(plain_ip_adapter(unet2d), folder / "ip-adapter_sd15.safetensors")
    save_file(plus_ip_adapter(unet2d), folder / "ip-adapter-plus_sd15.safetensors")
    save_file(full_face_ip_adapter(unet2d), folder / "ip-adapter-full-face_sd15.safetensors")
    torch.manual_seed(1)
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=CLIP_DIM)).save_pretrained(folder / "image_encoder")
    return folder


def image() -> torch.Tensor:
    return torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(5))


def as_pil(images: torch.Tensor) -> Image.Image:
    return Image.fromarray((images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def image_tensor(path) -> torch.Tensor:
    """An image file as `(1, 3, H, W)` in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def motion_adapter() -> MotionAdapter:
    return perturb(MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_num_attention_heads=8,
                                 motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False),
                   seed=3, scale=0.1)


@pytest.mark.parametrize(("variant", "file"), [("plain", "ip-adapter_sd15.safetensors"),
                                             ("plus", "ip-adapter-plus_sd15.safetensors"),
                                             ("full_face", "ip-adapter-full-face_sd15.safetensors")])
def test_sampling_with_an_image_prompt_equals_diffusers(unet2d, adapter_folder, tmp_path, variant, file):
    encoder = CLIPVisionModelWithProjection.from_pretrained(adapter_folder / "image_encoder")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = AnimateDiffPipeline(**tiny_pipeline_parts(tmp_path / "tokenizer"), unet=unet2d,
                               motion_adapter=motion_adapter(), scheduler=make_scheduler("ddim"),
                               image_encoder=encoder, feature_extractor=processor)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapter_folder), subfolder="", weight_name=file)
    pipe.set_ip_adapter_scale(0.7)
    video = VideoUNet.from_unet2d(unet2d, motion_module={"type": "temporal", "norm_mode": "across_frames",
                                                         "max_frames": 32})
    video.load_motion_state_dict({diffusers_to_original_key(k): v for k, v in pipe.unet.state_dict().items()
                                  if ".motion_modules." in k and not k.endswith("pos_embed.pe")})
    loaded = load_ip_adapter(video.eval(), adapter_folder / file, scale=0.7)
    assert (loaded.variant, loaded.scale) == (variant, 0.7)

    noise = initial_noise((2, 4, FRAMES, 16, 16), seeds=[11, 12])
    cond, uncond = embeddings()
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, ip_adapter_image=as_pil(image()),
                        latents=noise.clone(), num_frames=FRAMES, num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, height=32, width=32, output_type="latent", return_dict=False)[0]
        image_cond, image_uncond = loaded.embeds(image())
        # plain: the projected embedding and zeros; plus: the penultimate hidden states of the image and of black.
        assert image_cond.shape == ((1, 1, CLIP_DIM) if variant == "plain" else (1, 1, 17, 32))
        assert image_uncond.any() == (variant != "plain")
        image_cond, image_uncond = (embeds.expand(2, *embeds.shape[1:]) for embeds in (image_cond, image_uncond))
        ours = sample(UNetDenoiser(video), make_scheduler("ddim"), noise,
                      {"encoder_hidden_states": cond, "ip_image_embeds": image_cond},
                      {"encoder_hidden_states": uncond, "ip_image_embeds": image_uncond},
                      STEPS, GUIDANCE, progress=False)
    assert (ours - expected).abs().max().item() <= 1e-3
    # The image prompt counts: at scale 0 the adapter adds nothing, and the result moves by far more than that.
    from kinema.loaders.ip_adapter import set_ip_adapter_scale

    set_ip_adapter_scale(video.unet, 0.0)
    with torch.no_grad():
        unprompted = sample(UNetDenoiser(video), make_scheduler("ddim"), noise,
                            {"encoder_hidden_states": cond, "ip_image_embeds": image_cond},
                            {"encoder_hidden_states": uncond, "ip_image_embeds": image_uncond},
                            STEPS, GUIDANCE, progress=False)
    assert (unprompted - expected).abs().max().item() > 1e-2


def test_inspect_names_the_variant_and_bin_files_read_as_safetensors_do(unet2d, adapter_folder, tmp_path):
    report = kinema.describe(adapter_folder / "ip-adapter_sd15.safetensors")
    assert report["kind"] == "ip_adapter" and report["variant"] == "plain" and report["layers"] == len(
        cross_attention_widths(unet2d))
    state = plain_ip_adapter(unet2d)
    nested = {part: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    torch.save(nested, tmp_path / "ip-adapter_sd15.bin")  # how h94 publishes the .bin files
    assert kinema.describe(tmp_path / "ip-adapter_sd15.bin")["kind"] == "ip_adapter"


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: {k: v for k, v in s.items() if k != "ip_adapter.3.to_v_ip.weight"},
     r"lacks ip_adapter.3.to_v_ip.weight"),
    (lambda s: {**s, "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 32)},
     r"ip_adapter.1.to_k_ip.weight is \(8, 32\), and the UNet's .* takes \(32, 32\): the adapter was made for "
     r"another base model"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith(("ip_adapter.9.", "ip_adapter.11."))},
     r"has 4 IP-Adapter layers and the UNet 6 cross-attention layers: it was made for another base model"),
    (lambda s: {**{k: v for k, v in s.items() if not k.startswith("image_proj.proj.")},
                "image_proj.proj.0.weight": torch.zeros(2, 2), "image_proj.proj.2.weight": torch.zeros(2, 2)},
     r"IP-Adapter FaceID file"),
    (lambda s: {**s, "image_proj.proj.weight": s["image_proj.proj.weight"] * float("nan")},
     r"the IP-Adapter holds NaN or infinite values"),
    (lambda s: {k: v for k, v in s.items() if k != "image_proj.norm.weight"},
     r"bad.safetensors: its image_proj weights do not fit the plain IP-Adapter's projection \(.*norm.weight.*\): "
     r"the file is damaged, or no h94 SD1.5 adapter$"),
])
def test_bad_files_are_one_line_before_the_model_changes(unet2d, adapter_folder, tmp_path, change, message):
    path = tmp_path / "bad.safetensors"
    save_file(change(plain_ip_adapter(unet2d)), path)
    video = VideoUNet.from_unet2d(unet2d)
    before = {k: v.clone() for k, v in video.state_dict().items()}
    with pytest.raises(KinemaError, match=message):
        load_ip_adapter(video, path, image_encoder=adapter_folder / "image_encoder")
    assert video.unet.encoder_hid_proj is None and video.state_dict().keys() == before.keys()


def test_a_missing_or_mismatched_image_encoder_is_one_line(unet2d, adapter_folder, tmp_path):
    save_file(plain_ip_adapter(unet2d), tmp_path / "ip.safetensors")
    with pytest.raises(KinemaError, match=r"needs its CLIP image encoder, and .*image_encoder is no transformers "
                                          r"model folder .*--image-encoder"):
        load_ip_adapter(VideoUNet.from_unet2d(unet2d), tmp_path / "ip.safetensors")
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=24)).save_pretrained(tmp_path / "wide")
    with pytest.raises(KinemaError, match=r"reads 16-wide image features and the image encoder in .*wide gives 24"):
        load_ip_adapter(VideoUNet.from_unet2d(unet2d), tmp_path / "ip.safetensors", image_encoder=tmp_path / "wide")


def test_load_family_unpickles_a_bin_adapter_once(sd_model, unet2d, adapter_folder, tmp_path, monkeypatch):
    import shutil

    import kinema.loaders.source as source_module
    from kinema.pipelines.load import load_family

    state = plain_ip_adapter(unet2d)
    torch.save({part: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part)}
                for part in ("image_proj", "ip_adapter")}, tmp_path / "ip-adapter_sd15.bin")
    shutil.copytree(adapter_folder / "image_encoder", tmp_path / "image_encoder")
    reads = []
    read_checkpoint = source_module.read_checkpoint

    def counted(where):
        reads.append(where)
        return read_checkpoint(where)

    monkeypatch.setattr(source_module, "read_checkpoint", counted)
    family = load_family(sd_model["path"], motion_module=sd_model["motion_module"],
                         ip_adapter=(tmp_path / "ip-adapter_sd15.bin", 0.8))
    assert family.ip_adapter.variant == "plain"
    assert reads.count(tmp_path / "ip-adapter_sd15.bin") == 1  # describe's read serves the load too


def test_generate_with_an_image_prompt_from_a_model_folder(sd_model, adapter_folder, tmp_path):
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import GenerationRequest

    adapter = adapter_folder / "ip-adapter_sd15.safetensors"
    family = load_family(sd_model["path"], motion_module=sd_model["motion_module"], ip_adapter=(adapter, 0.8))
    assert family.settings()["ip_adapter"] == {"path": str(adapter), "scale": 0.8}
    # The encoder it read, recorded: one given elsewhere (--image-encoder) is what a remake needs.
    assert family.settings()["image_encoder"] == str(adapter_folder / "image_encoder")
    as_pil(image()).save(tmp_path / "style.png")
    request = GenerationRequest("a cat", frames=4, height=32, width=32, steps=2, seeds=[1])
    result = generate(family, GenerationRequest(**{**vars(request), "ip_image": str(tmp_path / "style.png")}),
                      progress=False)
    assert result.settings[0]["ip_image"] == str(tmp_path / "style.png")
    other = generate(family, GenerationRequest(**{**vars(request), "ip_image": torch.zeros(3, 20, 20)}),
                     progress=False)
    assert other.settings[0]["ip_image"] == "<Tensor>"
    assert (result.frames - other.frames).abs().max().item() > 1e-3  # the image prompt reaches the video
    # Guidance runs both sides in one batch: the prompted half holds the image's embeddings, the other zeros (as
    # diffusers' pipeline makes the unprompted side of a plain IP-Adapter).
    seen = []
    forward = family.model.forward
    family.model.forward = lambda *args, **kwargs: seen.append(kwargs["added_cond_kwargs"]["image_embeds"][0]) or \
        forward(*args, **kwargs)
    try:
        generate(family, GenerationRequest(**{**vars(request), "ip_image": str(tmp_path / "style.png")}),
                 progress=False)
    finally:
        del family.model.forward
    expected = family.ip_adapter.embeds(image_tensor(tmp_path / "style.png"))[0]
    halves = seen[0].chunk(2)
    assert sorted(bool(half.any()) for half in halves) == [False, True]
    torch.testing.assert_close(next(half for half in halves if half.any()), expected)
    with pytest.raises(KinemaError, match=r"is loaded with an IP-Adapter \(.*ip-adapter_sd15.safetensors\), which "
                                          r"conditions on an image prompt: give one \(ip_image, --ip-image\)"):
        generate(family, request, progress=False)
    plain = load_family(sd_model["path"], motion_module=sd_model["motion_module"])
    with pytest.raises(KinemaError, match=r"has no IP-Adapter loaded, so an image prompt .*\(--ip-adapter\)"):
        generate(plain, GenerationRequest(**{**vars(request), "ip_image": torch.zeros(3, 20, 20)}), progress=False)


@pytest.mark.parametrize("file", ["ip-adapter_sd15.safetensors", "ip-adapter-plus_sd15.safetensors"])
def test_an_image_prompt_schedule_blends_the_keyframes_embeddings_per_frame(sd_model, adapter_folder, tmp_path, file):
    """{frame: image}: one keyframe equals the image for every frame (the path diffusers is proven equal on); two
    give each frame the blend of their embeddings that a prompt schedule gives text (linear here), held past the
    last, on both sides of guidance; context windows hand each window its frames'."""
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import ContextSettings, GenerationRequest

    family = load_family(sd_model["path"], motion_module=sd_model["motion_module"],
                         ip_adapter=(adapter_folder / file, 0.8))
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    as_pil(image()).save(first)
    as_pil(torch.rand(1, 3, 36, 36, generator=torch.Generator().manual_seed(9))).save(second)
    request = GenerationRequest("a cat", frames=6, height=32, width=32, steps=2, seeds=[1])
    plain = generate(family, GenerationRequest(**{**vars(request), "ip_image": str(first)}), progress=False,
                     output="latent")
    held = generate(family, GenerationRequest(**{**vars(request), "ip_image": {"0": str(first)}}), progress=False,
                    output="latent")
    assert (held.latents - plain.latents).abs().max().item() <= 1e-5
    seen = []
    forward = family.model.forward
    family.model.forward = lambda *args, **kwargs: seen.append(kwargs["added_cond_kwargs"]["image_embeds"][0]) or \
        forward(*args, **kwargs)
    try:
        travelled = generate(family, GenerationRequest(**{**vars(request), "ip_image": {1: str(first),
                                                                                         "4": str(second)}}),
                             progress=False, output="latent")
        windows = GenerationRequest(**{**vars(request), "steps": 1, "ip_image": {1: str(first), "4": str(second)},
                                       "context": ContextSettings(length=4, overlap=2)})
        seen_before = len(seen)
        generate(family, windows, progress=False, output="latent")
    finally:
        del family.model.forward
    assert travelled.settings[0]["ip_image"] == {"1": str(first), "4": str(second)}
    a, b = (family.ip_adapter.embeds(image_tensor(path)) for path in (first, second))
    weights = [0, 0, 1 / 3, 2 / 3, 1, 1]  # frames 0-1 hold the first, 4-5 the second
    rows = seen[0].unflatten(0, (2, 6))  # guidance: both sides, six frames each
    prompted = next(side for side in rows if (side - a[1][0]).abs().amax() > 1e-3)  # not the unprompted side
    unprompted = next(side for side in rows if side is not prompted)
    for frame, t in enumerate(weights):
        torch.testing.assert_close(prompted[frame], ((1 - t) * a[0] + t * b[0])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unprompted[frame], ((1 - t) * a[1] + t * b[1])[0], atol=1e-5, rtol=1e-5)
    window = seen[seen_before].unflatten(0, (2, 4))  # the first window: frames 0-3
    assert any(torch.allclose(side, prompted[:4], atol=1e-5) for side in window)
    with pytest.raises(KinemaError, match=r"the image prompt has a keyframe at frame 7, which the video's 6 frames do "
                                          r"not reach; make more frames"):
        generate(family, GenerationRequest(**{**vars(request), "ip_image": {"0": str(first), "7": str(second)}}),
                 progress=False)
    for bad, message in [({}, r"ip_image is an empty mapping"), ({"x": str(first)}, r"keyframe 'x' is not a frame "
                                                                                     r"number"),
                         ({"1": str(first), 1: str(second)}, r"ip_image names frame 1 twice")]:
        with pytest.raises(KinemaError, match=message):
            GenerationRequest(**{**vars(request), "ip_image": bad}).check()
    # Extending: the schedule runs over the whole video (4 given frames and 4 new), past one segment's 4 frames;
    # each segment (frames 2-5 and 4-7, with an overlap of 2) takes its own frames' blend.
    seen.clear()
    family.model.forward = lambda *args, **kwargs: seen.append(kwargs["added_cond_kwargs"]["image_embeds"][0]) or \
        forward(*args, **kwargs)
    try:
        generate(family, GenerationRequest(**{**vars(request), "video": torch.rand(4, 3, 32, 32), "extend_frames": 4,
                                              "overlap_frames": 2, "segment_frames": 4, "steps": 4,
                                              "ip_image": {"0": str(first), "7": str(second)}}), progress=False)
    finally:
        del family.model.forward
    whole = [frame / 7 for frame in range(8)]

    def window(start):
        return torch.stack([((1 - t) * a[0] + t * b[0])[0] for t in whole[start:start + 4]])

    found = []
    for embeds in seen:
        sides = embeds.unflatten(0, (2, 4))
        match = [start for start in (2, 4) if any(torch.allclose(side, window(start), atol=1e-5) for side in sides)]
        assert len(match) == 1, "a segment's image prompt is no window of the whole video's blend"
        if not found or found[-1] != match[0]:
            found.append(match[0])
    assert found == [2, 4]


def test_the_cli_takes_an_image_prompt_schedule_and_records_it(sd_model, adapter_folder, tmp_path, capsys):
    import json

    from kinema.cli import main

    for name in ("a.png", "b.png"):
        as_pil(image()).save(tmp_path / name)
    out = tmp_path / "travel.mp4"
    schedule = {"0": str(tmp_path / "a.png"), "3": str(tmp_path / "b.png")}
    main(["generate", "a cat", "--model", str(sd_model["path"]), "--motion-module", str(sd_model["motion_module"]),
          "--ip-adapter", f"{adapter_folder / 'ip-adapter_sd15.safetensors'}:0.7", "--ip-image", json.dumps(schedule),
          "--frames", "4", "--height", "32", "--width", "32", "--steps", "1", "-o", str(out), "--quiet"])
    assert json.loads(out.with_name(out.name + ".json").read_text())["ip_image"] == schedule
    late = {"0": str(tmp_path / "a.png"), "9": str(tmp_path / "b.png")}
    model = ["--model", str(sd_model["path"]), "--motion-module", str(sd_model["motion_module"])]
    code = main(["generate", "a cat", *model,
                 "--ip-adapter", str(adapter_folder / "ip-adapter_sd15.safetensors"), "--ip-image", json.dumps(late),
                 "--frames", "4", "--height", "32", "--width", "32", "-o", str(tmp_path / "late.mp4"), "--quiet"])
    assert code == 2  # bad usage: refused by the checks that run before any model loads
    assert "the image prompt has a keyframe at frame 9, which the video's 4 frames do not reach; make more frames " \
           "(--frames)" in capsys.readouterr().err


def test_a_request_dtype_casts_the_image_encoder_too(sd_model, adapter_folder):
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import GenerationRequest

    family = load_family(sd_model["path"], motion_module=sd_model["motion_module"],
                         ip_adapter=(adapter_folder / "ip-adapter_sd15.safetensors", 0.8))
    assert next(family.ip_adapter.image_encoder.parameters()).dtype == torch.float32
    result = generate(family, GenerationRequest("a cat", frames=4, height=32, width=32, steps=1, seeds=[1],
                                                ip_image=torch.rand(3, 20, 20), dtype="bfloat16"), progress=False)
    assert result.report["dtype"] == "bfloat16"
    assert {p.dtype for p in family.ip_adapter.image_encoder.parameters()} == {torch.bfloat16}
    assert family.ip_adapter.image_encoder in family.modules()


def test_jobs_take_the_adapter_and_the_image_prompt(sd_model, adapter_folder, tmp_path):
    from kinema.pipelines.jobs import job_from_mapping

    as_pil(image()).save(tmp_path / "style.png")
    data = {"prompt": "a cat", "model": str(sd_model["path"]), "motion_module": str(sd_model["motion_module"]),
            "ip_adapter": {"path": str(adapter_folder / "ip-adapter_sd15.safetensors"), "scale": 0.6},
            "ip_image": "style.png", "frames": 4, "height": 32, "width": 32}
    job = job_from_mapping(data, base=tmp_path)
    assert job.ip_adapter == (str(adapter_folder / "ip-adapter_sd15.safetensors"), 0.6)
    assert job.request.ip_image == str(tmp_path / "style.png")  # any size: not held to the video's
    assert job_from_mapping(job.settings()) == job
    as_pil(image()).save(tmp_path / "late.png")
    travel = job_from_mapping({**data, "ip_image": {"0": "style.png", "3": "late.png"}}, base=tmp_path)
    assert travel.request.ip_image == {"0": str(tmp_path / "style.png"), "3": str(tmp_path / "late.png")}
    assert job_from_mapping(travel.settings()) == travel
    for change, message in [
        ({"ip_image": {"0": "style.png", "3": "gone.png"}}, "no such image prompt of frame 3: gone.png"),
        ({"ip_image": {"0": "style.png", "first": "late.png"}}, "ip_image keyframe 'first' is not a frame number"),
        ({"ip_image": {"0": "style.png", "4": "late.png"}}, "the image prompt has a keyframe at frame 4, which the "
                                                           "video's 4 frames do not reach"),
        ({"ip_image": None}, "give both ip_adapter and ip_image, or neither"),
        ({"ip_adapter": None}, "give both ip_adapter and ip_image, or neither"),
        ({"ip_adapter": {"path": str(adapter_folder / "ip-adapter_sd15.safetensors"), "scale": -1}},
         "ip_adapter.scale must be at least 0"),
        ({"image_encoder": str(tmp_path)}, "is no transformers model folder"),
        ({"model": "kinema-tiny", "motion_module": None, "frames": 8}, "an IP-Adapter is for AnimateDiff"),
    ]:
        with pytest.raises(KinemaError, match=message):
            job_from_mapping({**data, **change}, base=tmp_path)


def test_a_bin_converts_to_the_published_safetensors(unet2d, tmp_path):
    from safetensors.torch import load_file

    state = plain_ip_adapter(unet2d)
    torch.save({part: {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(part + ".")}
                for part in ("image_proj", "ip_adapter")}, tmp_path / "ip-adapter_sd15.bin")
    written, _ = kinema.convert(tmp_path / "ip-adapter_sd15.bin", tmp_path / "ip.safetensors", to="original")
    converted = load_file(written)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)
    with pytest.raises(KinemaError, match=r"the original layout of an IP-Adapter for SD1.5 is a .safetensors file, "
                                          r"got .*ip.ckpt"):  # before the weights are read, not after
        kinema.convert(tmp_path / "ip-adapter_sd15.bin", tmp_path / "ip.ckpt", to="original")


def test_another_kind_of_file_as_the_adapter_is_named_before_any_weights_load(sd_model, adapter_folder,
                                                                               monkeypatch):
    import kinema.pipelines.load as load

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(load, "_load_described", refuse)
    with pytest.raises(KinemaError, match=r"mm.safetensors is not an IP-Adapter \(it is: AnimateDiff motion module"):
        load.load_family(sd_model["path"], motion_module=sd_model["motion_module"],
                         ip_adapter=(sd_model["motion_module"], 1.0), image_encoder=adapter_folder / "image_encoder")


def test_step_caching_runs_the_image_prompt(unet2d, adapter_folder):
    # DeepCache's split forward once refused an IP-Adapter (and so --speed fast, which caches); its full pass must
    # equal the plain forward, image prompt included.
    video = VideoUNet.from_unet2d(unet2d).eval()
    loaded = load_ip_adapter(video, adapter_folder / "ip-adapter-plus_sd15.safetensors", scale=0.8)
    gen = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 4, 3, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    embeds = loaded.embeds(image())[0].expand(2, -1, -1, -1)
    with torch.no_grad():
        expected = video(x, 500, text, added_cond_kwargs={"image_embeds": [embeds]})
        full, deep = video.forward_deep_cached(x, 500, text, added_cond_kwargs={"image_embeds": [embeds]})
        shallow, _ = video.forward_deep_cached(x, 500, text, deep_features=deep,
                                               added_cond_kwargs={"image_embeds": [embeds]})
        without = video(x, 500, text, added_cond_kwargs={"image_embeds": [torch.zeros_like(embeds)]})
    assert (full - expected).abs().max().item() <= 1e-5
    assert (shallow - expected).abs().max().item() <= 1e-5  # the same step's deep features: the same result
    assert (without - expected).abs().max().item() > 1e-3
