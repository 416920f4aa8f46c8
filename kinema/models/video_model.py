"""The contract every kinema video denoiser implements (`VideoUNet`, `VideoDiT`, any future host).

A host is a diffusers model that denoises video `(B, C, F, H, W)` with motion modules inside. It inherits
`VideoModel` first, e.g. `class VideoUNet(VideoModel, StrictFromPretrained, ModelMixin, ConfigMixin)`, implements
`forward` and says where its motion modules are (`motion_modules`); everything else of the contract is shared here:
`max_frames`, `freeze_base`, `motion_state_dict` / `load_motion_state_dict` and `set_attention_chunk_size`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import cast

import torch
from torch import nn

from kinema.errors import KinemaError
from kinema.models.motion import UNLIMITED_FRAMES, motion_max_frames, set_motion_attention_chunk_size
from kinema.state_dicts import check_fits, shapes

Timestep = torch.Tensor | float | int


def timesteps_per_clip(timestep: Timestep, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
    """One diffusion timestep per clip, `(B,)`, from an int, a float, a 0-d tensor, a one-element or a `(B,)` tensor.

    A single value is used for every clip; the dtype is kept (the hosts' timestep embeddings compute in float).
    """
    steps = torch.as_tensor(timestep, device=device).reshape(-1)
    if steps.numel() == 1:
        return steps.expand(batch)
    if steps.numel() != batch:
        raise KinemaError(f"{steps.numel()} timesteps do not fit {batch} clip(s); pass one number (or a 0-d tensor) "
                          f"for all clips, or a ({batch},) tensor with one timestep per clip")
    return steps


class VideoModel:
    """Mixin stating and sharing the video-model contract; the host must also be an `nn.Module`.

    A host implements:
        `forward(sample, timestep, encoder_hidden_states, **conditioning)`: noisy latents `(B, C, F, H, W)`, a
            timestep as an int, a float, a 0-d tensor or `(B,)` (turn it into `(B,)` with `timesteps_per_clip`) and
            the text-encoder states -> prediction `(B, C_out, F, H, W)`. Host-specific conditioning (inpaint
            latents, image tokens, masks, diffusers UNet arguments) comes by keyword.
        `motion_modules()`: `(name, module)` for every motion module, in a fixed order; `name.` prefixes the
            module's keys in `motion_state_dict`.

    It then gets `max_frames`, `freeze_base`, `motion_state_dict`, `load_motion_state_dict` and
    `set_attention_chunk_size` from here. A forward must not keep per-call state on the model: one model may run in
    several threads at once, and `copy.deepcopy` / pickling must give a model that runs its own modules.
    """

    # How to fix motion-module weights that do not fit, said after the mismatch; hosts name their own versions.
    motion_mismatch_advice = "Check that the motion weights come from a model of the same kind and size"
    # Whether `kinema.models.freeu` acts on this model (UNets: FreeU rebalances their backbone and skip features).
    supports_freeu = False

    def motion_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """`(name, module)` for every motion module; the host says where they are."""
        raise NotImplementedError(f"{type(self).__name__} must say where its motion modules are")

    @property
    def max_frames(self) -> int:
        """Most (latent) frames one forward takes: the smallest limit of its motion modules (`UNLIMITED_FRAMES`
        when none sets one)."""
        # min over a list, not min(..., default=): torch.compile cannot trace the `default` keyword and would split
        # the compiled forward there.
        return min([motion_max_frames(module) for _, module in self.motion_modules()] + [UNLIMITED_FRAMES])

    def freeze_base(self) -> None:
        """Train motion modules only: freeze every other weight and every loaded (peft) LoRA."""
        from peft.tuners.lora import LoraLayer

        cast(nn.Module, self).requires_grad_(False)
        for _, module in self.motion_modules():
            module.requires_grad_(True)
            for layer in module.modules():
                if isinstance(layer, LoraLayer):  # a loaded motion LoRA is an input, not something to train
                    layer.lora_A.requires_grad_(False)
                    layer.lora_B.requires_grad_(False)

    def motion_state_dict(self) -> dict[str, torch.Tensor]:
        """Motion-module weights alone, each key `"{name}.{key in the module}"` with `name` from `motion_modules`."""
        return {f"{name}.{key}": value for name, module in self.motion_modules()
                for key, value in module.state_dict().items()}

    def load_motion_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load motion-module weights strictly: every key present, none extra, every shape equal."""
        check_fits(shapes(self.motion_state_dict()), shapes(state_dict),
                   f"motion-module weights do not fit this {type(self).__name__}", advice=self.motion_mismatch_advice)
        for name, module in self.motion_modules():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)},
                                   strict=True)

    def set_attention_chunk_size(self, chunk_size: int | None) -> None:
        """Chunk every motion module's attention into at most `chunk_size` sequences (same result, less memory);
        None attends over all at once. Modules without attention are left as they are."""
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise KinemaError(f"attention chunk size must be a whole number >= 1 or None, got {chunk_size!r}")
        for _, module in self.motion_modules():
            set_motion_attention_chunk_size(module, chunk_size)
