"""The format registry: every kind of weights file or model folder kinema reads, and what it can do with each.

One table drives `kinema.describe` (tried in order, first answer wins), `kinema.load`, `kinema.convert` and the
CLI's `--to` choices. Entries name their functions as `"module:function"` and are imported only when used, so
reading this table (e.g. for `kinema convert --help`) imports neither torch nor any model code.

Function contracts:
- describe `(source: kinema.loaders.source.Source) -> dict | None`: None when the path is not this kind; a report
  `{"kind": kind, ...}` once every tensor name and shape is checked; KinemaError when it is this kind but broken.
- load `(source: Source, **options) -> object`: the model (or components) it holds, loaded strictly; what describe
  read is in `source` and is not read again.
- convert `(source: Source, target: Path, to: str, *, overwrite: bool) -> (written path, notes)`: the same weights
  in layout `to`, under kinema's output policy (kinema.fileio).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kinema.errors import KinemaError, with_article


@dataclass(frozen=True)
class Format:
    """One kind of input: how to recognise it, load it and convert it, and the layouts it converts to."""

    kind: str
    label: str
    describe: str
    load: str
    convert: str | None = None
    layouts: tuple[str, ...] = ()
    folder_layouts: tuple[str, ...] = ()  # layouts written as a folder rather than one file
    safetensors_layouts: tuple[str, ...] = ()  # file layouts written as .safetensors alone (no .ckpt / .pt / .bin)

    @property
    def name(self) -> str:
        """The label without its parenthesis, as messages say it: "Stable Diffusion 1.5", "motion LoRA"."""
        return self.label.split(" (")[0]

    def function(self, role: str) -> Callable[..., Any]:
        """The describe / load / convert function of this format, imported now."""
        ref = getattr(self, role)
        if ref is None:
            raise KinemaError(f"{with_article(self.name)} cannot be {role}ed; kinema converts {convertible_words()}")
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)


_ANIMATEDIFF = "kinema.loaders.animatediff.formats"
_EASYANIMATE = "kinema.loaders.easyanimate.formats"
_STABLE_DIFFUSION = "kinema.loaders.stable_diffusion"

FORMATS: tuple[Format, ...] = (
    Format("motion_module", "AnimateDiff motion module (file or diffusers MotionAdapter folder)",
           describe=f"{_ANIMATEDIFF}:describe_motion_module", load=f"{_ANIMATEDIFF}:load_motion_module_path",
           convert=f"{_ANIMATEDIFF}:convert_motion_module_source", layouts=("original", "diffusers", "kinema"),
           folder_layouts=("diffusers",), safetensors_layouts=("kinema",)),
    Format("motion_lora", "motion LoRA",
           describe=f"{_ANIMATEDIFF}:describe_motion_lora_source", load=f"{_ANIMATEDIFF}:load_motion_lora_path",
           convert=f"{_ANIMATEDIFF}:convert_motion_lora_source",
           layouts=("original", "diffusers", "diffusers_peft", "kinema")),
    Format("easyanimate_transformer", "EasyAnimate V3 folder or transformer",
           describe=f"{_EASYANIMATE}:describe_easyanimate_source", load=f"{_EASYANIMATE}:load_easyanimate_path",
           convert=f"{_EASYANIMATE}:convert_easyanimate_source", layouts=("original", "kinema"),
           folder_layouts=("original", "kinema")),
    Format("slice_vae", "EasyAnimate V3 Slice VAE folder",
           describe=f"{_EASYANIMATE}:describe_slice_vae_source", load=f"{_EASYANIMATE}:load_slice_vae_path"),
    Format("image_lora", "image LoRA for SD1.5 (kohya/civitai, diffusers, AnimateDiff v3's domain adapter)",
           describe=f"{_STABLE_DIFFUSION}:describe_image_lora", load=f"{_STABLE_DIFFUSION}:load_image_lora_source"),
    Format("ip_adapter", "IP-Adapter for SD1.5 (h94/IP-Adapter: plain, plus, full face)",
           describe="kinema.loaders.ip_adapter:describe_ip_adapter",
           load="kinema.loaders.ip_adapter:load_ip_adapter_source",
           convert="kinema.loaders.ip_adapter:convert_ip_adapter_source", layouts=("original",),
           safetensors_layouts=("original",)),
    Format("sparsectrl", "AnimateDiff v3 SparseCtrl (RGB or scribble keyframe encoder)",
           describe="kinema.loaders.animatediff.sparsectrl:describe_sparsectrl",
           load="kinema.loaders.controlnet:load_controlnet_source"),
    Format("image_vae", "Stable Diffusion 1.x VAE (original or diffusers single file, diffusers AutoencoderKL folder)",
           describe="kinema.loaders.image_vae:describe_image_vae",
           load="kinema.loaders.image_vae:load_image_vae_source"),
    # A ControlNet file of diffusers names has `controlnet_cond_embedding` tensors, which a SparseCtrl encoder has too;
    # this entry leaves a file with motion modules to the SparseCtrl entry above (and the motion module entry leaves
    # it to that one).
    Format("controlnet", "ControlNet for SD1.5 (diffusers folder, or original or diffusers single file)",
           describe="kinema.loaders.controlnet:describe_controlnet",
           load="kinema.loaders.controlnet:load_controlnet_source"),
    # Last: a motion module, a LoRA and a Slice VAE folder also have UNet-like names or a vae/ folder, and the
    # entries above claim them first.
    Format("stable_diffusion", "Stable Diffusion 1.5 (diffusers folder or original single file)",
           describe=f"{_STABLE_DIFFUSION}:describe_stable_diffusion",
           load=f"{_STABLE_DIFFUSION}:load_stable_diffusion_source"),
)

# Every layout some kind converts to, in table order: the CLI's `--to` choices.
CONVERT_LAYOUTS: tuple[str, ...] = tuple(dict.fromkeys(layout for f in FORMATS for layout in f.layouts))


def format_of(kind: str) -> Format:
    """The registry entry for `kind` (as a describe report names it)."""
    for entry in FORMATS:
        if entry.kind == kind:
            return entry
    raise KinemaError(f"unknown kind {kind!r}; kinema knows {[f.kind for f in FORMATS]}")


def convertible_words() -> str:
    """What `kinema convert` rewrites, as messages list it: "an AnimateDiff motion module, ..., or an IP-Adapter"."""
    names = [with_article(f.name) for f in FORMATS if f.convert is not None]
    return ", ".join(names[:-1]) + f", or {names[-1]}"
