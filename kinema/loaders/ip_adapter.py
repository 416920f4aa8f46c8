"""IP-Adapter for AnimateDiff (SD1.5): an image prompt through extra cross-attention keys and values.

The published files (h94/IP-Adapter `models/ip-adapter_sd15.safetensors`, `ip-adapter-plus_sd15`,
`ip-adapter-full-face_sd15`, and their `.bin` twins) hold two parts: `image_proj.*`, which turns the CLIP image
encoder's output into a few text-like tokens, and `ip_adapter.{1,3,5,...}.to_k_ip/to_v_ip.weight`, one pair per
cross-attention layer of the UNet in diffusers' processor order. diffusers' `UNet2DConditionModel` loads both
(`_load_ip_adapter_weights`) into the 2D UNet a `VideoUNet` runs, so kinema checks the file against the UNet first
(one line naming what does not fit, where diffusers raises a shape error deep in its loader) and lets diffusers
build the layers. The CLIP image encoder (`models/image_encoder/`, a transformers `CLIPVisionModelWithProjection`
folder) is found beside the file unless given.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError, library_error_message, naming, shorten, without_library_notices

if TYPE_CHECKING:  # torch and the readers load when a file is read, so the CLI checks its options without them
    import torch

    from kinema.loaders.source import Source

logger = logging.getLogger(__name__)

IMAGE_PROJ, ADAPTER = "image_proj.", "ip_adapter."
_ADAPTER_KEY = re.compile(r"ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight")
# image_proj keys that tell the variants apart (diffusers' `_convert_ip_adapter_image_proj_to_diffusers` reads the
# same ones), and what each feeds its projection: CLIP's projected `image_embeds`, or the penultimate hidden states.
VARIANTS = {"plain": "image_embeds", "plus": "hidden_states", "full_face": "hidden_states"}
IMAGE_ENCODER_FOLDER = "image_encoder"


def ip_adapter_variant(names: list[str]) -> str | None:
    """"plain", "plus" or "full_face" from the `image_proj.` tensor names, None for no IP-Adapter file; one
    KinemaError line for the FaceID variants, whose input is a face embedding kinema does not compute."""
    proj = {name[len(IMAGE_PROJ):] for name in names if name.startswith(IMAGE_PROJ)}
    if not proj or not any(name.startswith(ADAPTER) for name in names):
        return None
    # diffusers' order of tests (`_convert_ip_adapter_image_proj_to_diffusers`).
    if "proj.weight" in proj:
        return "plain"
    if "proj.3.weight" in proj:
        return "full_face"
    if "perceiver_resampler.proj_in.weight" in proj or "norm.weight" in proj:
        raise KinemaError("this is an IP-Adapter FaceID file, whose input is an insightface face embedding, which "
                          "kinema does not compute; use ip-adapter_sd15, ip-adapter-plus_sd15 or "
                          "ip-adapter-full-face_sd15")
    if "latents" in proj and "proj_in.weight" in proj:
        return "plus"
    raise KinemaError(f"the IP-Adapter's image projection has none of the tensors of a known variant (e.g. "
                      f"image_proj.proj.weight); it holds {', '.join(sorted(proj)[:4])}")


def describe_ip_adapter(source: Source) -> dict[str, Any] | None:
    """The format registry's describer: an IP-Adapter file (`image_proj.*` and `ip_adapter.*` tensors), with its
    variant, layer count, token width and what of the image encoder it reads; None for anything else."""
    if not source.is_weights_file:
        return None
    from kinema.loaders.checkpoint_io import dtype_report

    try:
        variant = ip_adapter_variant(source.names)
        if variant is None:
            return None
        tensors, _ = source.layout
        layers = _adapter_layers(tensors)
    except KinemaError as err:
        raise naming(source.path, err) from None
    first = tensors[f"{ADAPTER}{layers[0]}.to_k_ip.weight"]
    return {"kind": "ip_adapter", "variant": variant, "layers": len(layers), "cross_attention_dim": first.shape[1],
            "image_encoder_output": VARIANTS[variant],
            "dtype": dtype_report(str(t.dtype).removeprefix("torch.") for t in tensors.values())}


def _adapter_layers(tensors: dict[str, torch.Tensor]) -> list[int]:
    """The layer numbers of the `ip_adapter.` part: 1, 3, 5, ... each with to_k_ip and to_v_ip."""
    found: dict[int, set[str]] = {}
    for name in tensors:
        if name.startswith(ADAPTER):
            match = _ADAPTER_KEY.fullmatch(name)
            if match is None:
                raise KinemaError(f"unexpected IP-Adapter tensor {name}; the ip_adapter part holds "
                                  "N.to_k_ip.weight and N.to_v_ip.weight")
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    layers = sorted(found)
    if layers != list(range(1, 2 * len(layers), 2)):
        raise KinemaError(f"the IP-Adapter's layers are numbered {layers[:6]}...; published files number them 1, 3, "
                          "5, ... (one per cross-attention layer)")
    for layer in layers:
        if found[layer] != {"to_k_ip", "to_v_ip"}:
            missing = ({"to_k_ip", "to_v_ip"} - found[layer]).pop()
            raise KinemaError(f"the IP-Adapter lacks ip_adapter.{layer}.{missing}.weight")
    return layers


@dataclass
class IPAdapter:
    """A loaded IP-Adapter's image side: the CLIP image encoder and processor, and what its projection reads."""

    path: str
    scale: float
    variant: str
    image_encoder: Any  # transformers CLIPVisionModelWithProjection
    image_processor: Any  # transformers CLIPImageProcessor
    image_encoder_path: str | None = None  # the encoder's folder, absolute: what the settings record

    def embeds(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cond, uncond)` image-prompt embeddings of images `(B, 3, H, W)` in [0, 1], as diffusers' AnimateDiff
        pipeline makes them: `(B, 1, D)` projected embeddings and zeros (plain), or `(B, 1, 257, W)` penultimate
        hidden states of the image and of all-zero pixels, CLIP's mean colour (plus, full face)."""
        import torch

        from kinema.pipelines.clip_image import clip_pixels

        pixels = clip_pixels(self.image_processor, images)
        parameter = next(self.image_encoder.parameters())
        pixels = pixels.to(parameter.device, parameter.dtype)
        with torch.no_grad():
            if VARIANTS[self.variant] == "image_embeds":
                cond = self.image_encoder(pixel_values=pixels).image_embeds
                uncond = torch.zeros_like(cond)
            else:
                cond = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
                uncond = self.image_encoder(pixel_values=torch.zeros_like(pixels),
                                            output_hidden_states=True).hidden_states[-2]
        return cond.float()[:, None], uncond.float()[:, None]


def read_ip_adapter(path: str | os.PathLike | Source) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """`(variant, {"image_proj": {...}, "ip_adapter": {...}})` from an IP-Adapter file (.safetensors, or a .bin
    read with weights_only; or the `Source` a describe read, whose reads are reused: a pickle is unpickled once),
    the two parts as diffusers' loader takes them."""
    from kinema.loaders.checkpoint_io import check_weight_values
    from kinema.loaders.source import Source

    source = path if isinstance(path, Source) else Source(Path(path))
    try:
        variant = ip_adapter_variant(source.names) if source.is_weights_file else None
        if variant is None:
            raise KinemaError("not an IP-Adapter file (no image_proj.* and ip_adapter.* tensors); give "
                              "h94/IP-Adapter's ip-adapter_sd15.safetensors or a variant of it")
        tensors = source.read(source.names)
        _adapter_layers(tensors)
        check_weight_values(tensors, "the IP-Adapter")
    except KinemaError as err:
        raise naming(source.path, err) from None
    parts: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for name, tensor in tensors.items():
        part = "image_proj" if name.startswith(IMAGE_PROJ) else "ip_adapter"
        parts[part][name.split(".", 1)[1]] = tensor
    return variant, parts


def _check_fits(unet: Any, parts: dict[str, dict[str, torch.Tensor]], path: str) -> None:
    """One KinemaError line unless every cross-attention layer of the 2D UNet `unet` has its to_k_ip / to_v_ip of
    the right widths, in diffusers' processor order."""
    cross = [name.removesuffix(".processor") for name in unet.attn_processors
             if name.endswith("attn2.processor") and "motion_modules" not in name]
    have = len(parts["ip_adapter"]) // 2
    if have != len(cross):
        raise KinemaError(f"{path} has {have} IP-Adapter layers and the UNet {len(cross)} cross-attention layers: "
                          "it was made for another base model (SD1.5 adapters fit SD1.5 UNets)")
    for index, name in enumerate(cross):
        attention = unet.get_submodule(name)
        expected = (attention.to_k.out_features, attention.to_k.in_features)
        for kind in ("to_k_ip", "to_v_ip"):
            shape = tuple(parts["ip_adapter"][f"{2 * index + 1}.{kind}.weight"].shape)
            if shape != expected:
                raise KinemaError(f"{path}: ip_adapter.{2 * index + 1}.{kind}.weight is {shape}, and the UNet's "
                                  f"{name} takes {expected}: the adapter was made for another base model")


def load_ip_adapter(video_unet: Any, path: str | os.PathLike | Source, *, scale: float = 1.0,
                    image_encoder: str | os.PathLike | None = None) -> IPAdapter:
    """Load the IP-Adapter at `path` (or the `Source` a describe read) into `video_unet` (a `VideoUNet`) at `scale`
    (the image prompt's weight, 0 to leave the model as it is, 1 as published) and its CLIP image encoder
    (`image_encoder`, default the `image_encoder/` folder beside the file). Checks everything before the model
    changes."""
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    from kinema.loaders.source import Source

    scale = check_ip_adapter_scale(scale)
    variant, parts = read_ip_adapter(path)
    path = path.path if isinstance(path, Source) else Path(path)
    unet = video_unet.unet
    _check_fits(unet, parts, str(path))
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise KinemaError("this model already has an IP-Adapter (or another image projection) loaded; load the "
                          "model again to use another")
    try:  # diffusers builds the projection after it has swapped the UNet's processors: built here first, alone
        unet._convert_ip_adapter_image_proj_to_diffusers(parts["image_proj"], low_cpu_mem_usage=False)
    except (RuntimeError, KeyError) as err:  # a tensor missing or mis-shaped: a damaged file
        raise KinemaError(f"{path}: its image_proj weights do not fit the {variant} IP-Adapter's projection "
                          f"({shorten(library_error_message(err), 200)}): the file is damaged, or no h94 SD1.5 "
                          "adapter") from None
    encoder_folder = image_encoder_folder(path, image_encoder)
    from kinema.loaders.checkpoint_io import load_pretrained

    encoder = load_pretrained(CLIPVisionModelWithProjection, encoder_folder, "IP-Adapter's image encoder").eval()
    wanted = _encoder_width(variant, parts)
    given = encoder.config.projection_dim if VARIANTS[variant] == "image_embeds" else encoder.config.hidden_size
    if wanted != given:
        raise KinemaError(f"the IP-Adapter ({variant}) reads {wanted}-wide image features and the image encoder in "
                          f"{encoder_folder} gives {given}: use the encoder the adapter was trained with (ViT-H/14 "
                          "for the SD1.5 adapters)")
    size = encoder.config.image_size
    # The PIL processor: the one diffusers' pipelines get without torchvision, without transformers' notice saying so.
    processor = (CLIPImageProcessorPil.from_pretrained(str(encoder_folder))
                 if (encoder_folder / "preprocessor_config.json").is_file()
                 else CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))
    parameter = next(unet.parameters())
    # diffusers casts the UNet to its own dtype once the layers are in, and warns of float32 modules it has none of.
    with without_library_notices({"diffusers.models.modeling_utils": ("should be kept in float32",)}):
        unet._load_ip_adapter_weights([parts], low_cpu_mem_usage=False)
    set_ip_adapter_scale(unet, scale)
    encoder.to(parameter.device)
    logger.info("IP-Adapter %s (%s) loaded at scale %g", path, variant, scale)
    return IPAdapter(str(path), float(scale), variant, encoder, processor, os.path.abspath(encoder_folder))


def check_ip_adapter_scale(scale: Any, name: str = "the IP-Adapter scale") -> float:
    """`scale` as a float, or one KinemaError line (`name` naming the setting) unless it is a finite number >= 0."""
    from kinema.pipelines.request import check_scale

    return check_scale(scale, name, "0: no image prompt, 1: as published")


def image_encoder_folder(adapter: str | os.PathLike, given: str | os.PathLike | None = None) -> Path:
    """The CLIP image encoder folder of the IP-Adapter file `adapter`: `given`, else `image_encoder/` beside the
    file (h94/IP-Adapter's layout); one KinemaError line when it is no transformers model folder."""
    folder = Path(given) if given is not None else Path(adapter).parent / IMAGE_ENCODER_FOLDER
    if not (folder / "config.json").is_file():
        raise KinemaError(f"the IP-Adapter needs its CLIP image encoder, and {folder} is no transformers model "
                          "folder (config.json); put h94/IP-Adapter's models/image_encoder beside the adapter file, "
                          "or give its folder (--image-encoder)")
    return folder


def load_ip_adapter_source(source: Source, *, video_unet: Any = None, scale: float = 1.0,
                           image_encoder: str | os.PathLike | None = None) -> IPAdapter:
    """The format registry's loader: the IP-Adapter loaded into `video_unet` (`load_ip_adapter`), read through the
    `Source` its describe read."""
    from kinema.models.video_unet import VideoUNet

    if not isinstance(video_unet, VideoUNet):
        raise KinemaError(f"{source.path} is an IP-Adapter, which adds an image prompt to an AnimateDiff model: pass "
                          "video_unet=, e.g. kinema.load(ip_adapter, video_unet=family.model)")
    return load_ip_adapter(video_unet, source, scale=scale, image_encoder=image_encoder)


def convert_ip_adapter_source(source: Source, target: Path, to: str, *, overwrite: bool = False
                              ) -> tuple[Path, list[str]]:
    """An IP-Adapter file as h94's `.safetensors` (layout "original": `image_proj.*` and `ip_adapter.*`, the names
    diffusers' `load_ip_adapter` and ComfyUI read), e.g. from its pickled `.bin` twin; tensors are copied as they
    are. The front door (kinema.loaders.conversion) has refused any other suffix before the weights were read."""
    from kinema.loaders.checkpoint_io import write_state_dict

    _, parts = read_ip_adapter(source.path)
    tensors = {f"{part}.{name}": tensor for part, named in parts.items() for name, tensor in named.items()}
    return write_state_dict(tensors, target, kind="ip_adapter", overwrite=overwrite, inputs=(source.path,)), []


def _encoder_width(variant: str, parts: dict[str, dict[str, torch.Tensor]]) -> int:
    proj = parts["image_proj"]
    if variant == "plain":
        return int(proj["proj.weight"].shape[1])
    if variant == "plus":
        return int(proj["proj_in.weight"].shape[1])
    return int(proj["proj.0.weight"].shape[1])  # full face: an MLP from the hidden states


def set_ip_adapter_scale(unet: Any, scale: float) -> None:
    """Set the image prompt's weight on every IP-Adapter attention processor of the 2D UNet `unet` (diffusers keeps
    it there, as its pipelines' `set_ip_adapter_scale` sets it)."""
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [scale] * len(processor.scale)
