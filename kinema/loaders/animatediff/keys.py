"""Key maps between kinema / original AnimateDiff motion-module names and diffusers' MotionAdapter names.

kinema's motion modules use the original AnimateDiff names, so the original layout needs no map; diffusers drops
the `temporal_transformer.` level and renames the attentions and norms. The maps are data: ordered regex rules,
applied per key, each rule written once for both directions.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from kinema.errors import KinemaError
from kinema.models.motion import sinusoidal_frame_encoding

# (original / kinema pattern, diffusers pattern) with named groups shared by both sides. Attention N is diffusers'
# attn{N+1}: attn1 and attn2 in published modules, attn3 for a third (kinema-tiny-ad's attention to the prompt).
_Rule = tuple[str, str | Callable[[re.Match[str]], str]]
_RULES: list[_Rule] = [
    (r"(?P<pre>.*\.motion_modules\.\d+\.)temporal_transformer\.(?P<rest>.*)", r"\g<pre>\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)attention_blocks\.(?P<n>\d+)\.(?P<rest>.*)",
     lambda m: f"{m['pre']}attn{int(m['n']) + 1}.{m['rest']}"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norms\.0\.(?P<rest>.*)", r"\g<pre>norm1.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norms\.1\.(?P<rest>.*)", r"\g<pre>norm2.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)ff_norm\.(?P<rest>.*)", r"\g<pre>norm3.\g<rest>"),
]
_REVERSE: list[_Rule] = [
    (r"(?P<pre>.*\.motion_modules\.\d+\.)(?P<rest>(?!temporal_transformer\.).*)",
     r"\g<pre>temporal_transformer.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)attn(?P<n>[1-9]\d*)\.(?P<rest>.*)",
     lambda m: f"{m['pre']}attention_blocks.{int(m['n']) - 1}.{m['rest']}"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norm1\.(?P<rest>.*)", r"\g<pre>norms.0.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norm2\.(?P<rest>.*)", r"\g<pre>norms.1.\g<rest>"),
    (r"(?P<pre>.*\.transformer_blocks\.\d+\.)norm3\.(?P<rest>.*)", r"\g<pre>ff_norm.\g<rest>"),
]


def _rename(key: str, rules: list[_Rule]) -> str:
    if ".motion_modules." not in key:  # the 2D UNet's own names are the same in both layouts
        return key
    for pattern, replacement in rules:
        key = re.sub(f"^{pattern}$", replacement, key)
    return key


def original_to_diffusers_key(key: str) -> str:
    """`down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`
    -> `down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight`."""
    return _rename(key, _RULES)


def diffusers_to_original_key(key: str) -> str:
    """Inverse of `original_to_diffusers_key`."""
    return _rename(key, _REVERSE)


# ---------------------------------------------------------------- frame-encoding buffers

# Where each layout stores the fixed sinusoidal frame table `pe` [1, L, C]: (pattern of the key it sits beside,
# pe key). Original files hold one table per attention, diffusers one per transformer block, shared by attn1 and
# attn2. kinema computes the table on the fly and stores none.
PE_PLACES: dict[str, tuple[str, str]] = {
    "original": (r"(?P<at>.*\.attention_blocks\.\d+\.)to_q\.weight", r"\g<at>pos_encoder.pe"),
    "diffusers": (r"(?P<at>.*\.transformer_blocks\.\d+\.)attn1\.to_q\.weight", r"\g<at>pos_embed.pe"),
}
PE_SUFFIXES: tuple[str, ...] = (".pos_encoder.pe", ".pos_embed.pe")


def is_pe_key(key: str) -> bool:
    """True for a stored frame-encoding buffer (`...pos_encoder.pe` or `...pos_embed.pe`)."""
    return key.endswith(PE_SUFFIXES)


def pe_places(keys: list[str], layout: str) -> dict[str, str]:
    """`{pe key: key it sits beside}` for the tensors `keys` named in `layout` ("original" or "diffusers")."""
    pattern, replacement = PE_PLACES[layout]
    return {re.sub(f"^{pattern}$", replacement, k): k for k in keys if re.fullmatch(pattern, k)}


def rename_state_dict(state_dict: dict, source: str, target: str) -> dict:
    """Rename every key between the "original"/"kinema" names (the same) and "diffusers" names."""
    if {source, target} <= {"original", "kinema"} or source == target:
        return dict(state_dict)
    if target == "diffusers":
        return {original_to_diffusers_key(k): v for k, v in state_dict.items()}
    return {diffusers_to_original_key(k): v for k, v in state_dict.items()}


def with_pe_tables(
    state_dict: dict[str, torch.Tensor], layout: str, max_frames: int, table_dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """kinema-named motion weights renamed to `layout` with its sinusoidal `pe` tables [1, max_frames, C] added,
    in `table_dtype` (default: the dtype of the weights beside them)."""
    named = rename_state_dict(state_dict, "kinema", layout)
    # A fresh tensor per key: safetensors refuses tensors that share memory.
    tables = {pe_key: sinusoidal_frame_encoding(max_frames, named[beside].shape[0])[None].to(
                  table_dtype or named[beside].dtype)
              for pe_key, beside in pe_places(list(named), layout).items()}
    return {**named, **tables}


def frame_table_error(table: torch.Tensor) -> float:
    """Largest difference between a stored `pe` buffer `(1, L, C)` and the sinusoidal table kinema computes."""
    expected = sinusoidal_frame_encoding(table.shape[1], table.shape[2], device=table.device).to(table.dtype)
    return (table[0].float() - expected.float()).abs().max().item()


def check_frame_table(key: str, table: torch.Tensor, atol: float) -> None:
    """Refuse a stored `pe` buffer that is not the sinusoidal table: kinema recomputes the encoding, so a learned
    or altered one would make the motion modules behave differently here."""
    error = frame_table_error(table)
    if error > atol:
        raise KinemaError(f"{key} is not the sinusoidal frame table (max difference {error:.2e}): kinema computes "
                          "that encoding itself, so a learned or altered encoding is not supported")

