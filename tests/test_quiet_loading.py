"""Loading EasyAnimate and Stable Diffusion parts prints nothing it need not, and puts the weights in memory unless
mmap is asked for.

Two notices used to appear on every load: diffusers' "There are modules in SliceVAE that should be kept in float32:
[]" (its `ModelMixin.to` warns on any dtype cast, even with no such modules) and transformers' "`CLIPImageProcessor`
requires torchvision" (the default CLIP image processor of transformers 5 falls back to the PIL one without it).
Each test also shows that its check would see the notice or the file mapping if it were there.
"""

import logging
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_models import SMALLEST_SLICE_VAE, tiny_slice_vae

from kinema.loaders.easyanimate.config import video_dit_config_from_easyanimate
from kinema.loaders.easyanimate.transformer import load_video_dit
from kinema.loaders.easyanimate.vae import load_slice_vae
from kinema.models.slice_vae import SliceVAE
from kinema.models.video_dit import VideoDiT

FLOAT32_NOTICE = "should be kept in float32"
TORCHVISION_NOTICE = "requires torchvision"


@contextmanager
def diffusers_warnings():
    """Messages of diffusers' loggers while the block runs (diffusers' own handler does not propagate)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def test_slice_vae_load_prints_no_float32_notice(tmp_path):
    tiny_slice_vae(**SMALLEST_SLICE_VAE).save_pretrained(tmp_path)
    with diffusers_warnings() as messages:
        for dtype in (None, torch.float16):
            vae = load_slice_vae(tmp_path, torch_dtype=dtype)
            assert {p.dtype for p in vae.parameters()} == {dtype or torch.float32}
        SliceVAE.from_pretrained(tmp_path)
    assert not [m for m in messages if FLOAT32_NOTICE in m]
    with diffusers_warnings() as messages:
        tiny_slice_vae(**SMALLEST_SLICE_VAE).to(torch.float16)  # what the loader used to do
    assert [m for m in messages if FLOAT32_NOTICE in m]


def test_stable_diffusion_loads_print_no_float32_notice(tmp_path, monkeypatch):
    from loaders.test_stable_diffusion import write_tokenizer
    from tiny_sd import tiny_sd_parts, write_sd_configs, write_sd_single_file

    from kinema.loaders.stable_diffusion import load_stable_diffusion
    from kinema.pipelines.load import load_family

    monkeypatch.delenv("KINEMA_BUNDLED_DIR", raising=False)
    parts = tiny_sd_parts()
    path = write_sd_single_file(tmp_path / "tiny.safetensors", parts)
    configs = write_sd_configs(tmp_path / "configs", parts)
    write_tokenizer(tmp_path / "tokenizer")
    with diffusers_warnings() as messages:
        for dtype in (torch.float32, torch.float16):
            sd = load_stable_diffusion(path, tokenizer=tmp_path / "tokenizer", config=configs, dtype=dtype)
            assert {p.dtype for p in sd.unet.parameters()} == {dtype}
        load_family("kinema-tiny-ad")  # a folder with its motion module: the AnimateDiff family's own cast
    assert not [m for m in messages if FLOAT32_NOTICE in m]


def test_whole_folder_load_prints_no_torchvision_notice(tmp_path):
    from loaders.easyanimate.test_easyanimate import v3_config, write_full_folder

    write_full_folder(tmp_path, VideoDiT(**video_dit_config_from_easyanimate(v3_config())).eval())
    # A fresh interpreter: transformers prints the notice once per process, at the import of the class.
    script = textwrap.dedent("""
        import sys
        from PIL import Image
        from kinema.loaders.easyanimate import load_easyanimate

        image = Image.new("RGB", (40, 48), (200, 30, 90))
        pixels = load_easyanimate(sys.argv[1]).image_processor(image, return_tensors="pt").pixel_values
        print("--- transformers' default CLIP image processor ---", file=sys.stderr, flush=True)
        from transformers import CLIPImageProcessor

        default = CLIPImageProcessor.from_pretrained(sys.argv[1] + "/image_encoder")
        print(tuple(pixels.shape), bool((default(image, return_tensors="pt").pixel_values == pixels).all()))
    """)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-2000:]
    kinema_part, _, default_part = run.stderr.partition("--- transformers' default CLIP image processor ---")
    assert TORCHVISION_NOTICE not in kinema_part + run.stdout and FLOAT32_NOTICE not in kinema_part
    # The processor works, and gives what transformers' default class gives for the same folder.
    assert run.stdout.split() == ["(1,", "3,", "32,", "32)", "True"]
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert TORCHVISION_NOTICE in default_part  # the check above would have seen the notice


def file_backed(tensor: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory is a mapping of `path` (Linux: the address is in a /proc/self/maps range whose
    pathname is the file)."""
    address, path = tensor.data_ptr(), str(Path(path).resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in span.split("-"))
        if low <= address < high:
            return len(rest) == 5 and rest[4] == path
    return False


needs_proc_maps = pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")


@needs_proc_maps
def test_transformer_weights_are_in_memory_unless_mmap_is_asked(tmp_path):
    from loaders.easyanimate.test_easyanimate import run, v3_config, v3_state, write_transformer

    torch.manual_seed(0)
    model = VideoDiT(**video_dit_config_from_easyanimate(v3_config())).eval()
    folder = write_transformer(tmp_path, v3_state(model), v3_config())
    weights = folder / "diffusion_pytorch_model.safetensors"
    in_memory, mapped = load_video_dit(tmp_path), load_video_dit(tmp_path, mmap=True)
    assert not any(file_backed(p, weights) for p in in_memory.parameters())
    assert all(file_backed(p, weights) for p in mapped.parameters())
    assert torch.equal(run(in_memory), run(mapped))
    assert torch.equal(run(in_memory), run(model))


@needs_proc_maps
def test_slice_vae_weights_are_in_memory_unless_mmap_is_asked(tmp_path):
    source = tiny_slice_vae(**SMALLEST_SLICE_VAE)
    source.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    in_memory, mapped = load_slice_vae(tmp_path), load_slice_vae(tmp_path, mmap=True)
    assert not any(file_backed(p, weights) for p in in_memory.parameters())
    assert all(file_backed(p, weights) for p in mapped.parameters())
    video = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = in_memory.encode(video).latent_dist.mode()
        assert torch.equal(latents, mapped.encode(video).latent_dist.mode())
        assert torch.equal(latents, source.encode(video).latent_dist.mode())


@needs_proc_maps
def test_text_and_image_encoders_are_in_memory_unless_mmap_is_asked(tmp_path):
    from loaders.easyanimate.test_easyanimate import source_model, write_full_folder

    from kinema.loaders.easyanimate import load_easyanimate

    write_full_folder(tmp_path, source_model())  # the text encoder is a sharded fp16 variant, CLIP one fp32 file
    in_memory, mapped = load_easyanimate(tmp_path), load_easyanimate(tmp_path, mmap=True)
    for part in ("text_encoder", "image_encoder"):
        files = list((tmp_path / part).glob("*.safetensors"))
        weights = list(getattr(in_memory, part).parameters())
        assert not any(file_backed(p, f) for p in weights for f in files), part
        for (name, a), (_, b) in zip(getattr(in_memory, part).state_dict().items(),
                                     getattr(mapped, part).state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    # the check can see a mapping: transformers maps CLIP's float32 weights from its file when mmap is asked for
    clip_file = tmp_path / "image_encoder" / "model.safetensors"
    assert any(file_backed(p, clip_file) for p in mapped.image_encoder.parameters())
