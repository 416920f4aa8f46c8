"""Motion-LoRA key layouts: read any published layout, describe it, and convert between layouts losslessly.

A motion LoRA (AnimateDiff's MotionLoRA) is a low-rank update `up @ down` of the to_q/to_k/to_v/to_out projections
of the motion modules' temporal attentions; `down` is `(r, C_in)` and `up` is `(C_out, r)`. Files come in four key
layouts, each written below once as data (a regex that reads keys and templates that write them):

- `original`: AnimateDiff's release, legacy attention-processor names on the original module paths,
  `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora.down.weight`.
- `diffusers`: what diffusers' `scripts/convert_animatediff_motion_lora_to_diffusers.py` writes and the Hub's
  `guoyww/animatediff-motion-lora-*` repos hold: the same processor names on diffusers paths under `unet.`,
  `unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight`.
- `diffusers_peft`: peft names on diffusers paths, as diffusers' `save_lora_weights` writes them,
  `unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.lora_A.weight`.
- `kinema`: peft names on kinema's paths (the keys of `VideoUNet.unet` with the adapter name left out),
  `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.lora_A.weight`.

The peft layouts may also carry a per-layer `alpha` scalar (update scaled by alpha / r) and, when read, an adapter
name inside the key (`lora_A.<name>.weight`). Converting only renames keys, so the tensors of a round trip are the
same objects; the one exception is writing a file whose alpha differs from its rank into a layout with no place for
alpha (`original`, `diffusers`): the scale alpha / r is then baked into `up`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import torch

from kinema.errors import KinemaError
from kinema.state_dicts import key_problems, problems_phrase

MotionLoraFormat = Literal["original", "diffusers", "diffusers_peft", "kinema"]
PROJECTIONS = ("q", "k", "v", "out")  # canonical projection names, in the order they are reported

_MM = r"(?P<mm>(?:down_blocks|up_blocks)\.\d+\.motion_modules\.\d+|mid_block\.motion_modules\.\d+)"
_KINEMA_PATH = _MM + r"\.temporal_transformer\.transformer_blocks\.(?P<block>\d+)\.attention_blocks\.(?P<attn>\d+)"
_DIFFUSERS_PATH = r"unet\." + _MM + r"\.transformer_blocks\.(?P<block>\d+)\.attn(?P<attn>[1-9]\d*)"
_PROCESSOR_TAIL = r"\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight"
_PEFT_TAIL = (r"\.(?P<proj>to_q|to_k|to_v|to_out\.0)"
              r"\.(?:(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[\w-]+))?\.weight|(?P<alpha>alpha))")
_PROCESSOR_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out"}
# The same processor names on the image UNet's own attentions: AnimateDiff v3's domain adapter (v3_sd15_adapter.ckpt),
# `down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight`, which AnimateDiff merges as
# it merges motion LoRAs (`W += scale * up @ down`, no alpha). It is an image LoRA, not a motion LoRA.
SPATIAL_PROCESSOR_KEY = re.compile(
    r"^(?:unet\.)?(?P<path>(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"
    r"\.attn[12])" + _PROCESSOR_TAIL + "$")
_PEFT_NAMES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


@dataclass(frozen=True)
class Layout:
    """One key layout. Templates take `mm`, `block`, `attn` (already offset), `proj` (this layout's name) and `part`."""

    read: str
    write: str
    alpha: str | None  # template of the alpha scalar's key; None where the layout has no place for it
    first_attention: int  # index of a block's first attention: attention_blocks.0 vs attn1
    projections: dict[str, str]
    parts: tuple[str, str]  # names of (down, up)


LAYOUTS: dict[MotionLoraFormat, Layout] = {
    "original": Layout(
        read=_KINEMA_PATH + _PROCESSOR_TAIL,
        write="{mm}.temporal_transformer.transformer_blocks.{block}.attention_blocks.{attn}.processor.{proj}_lora"
              ".{part}.weight",
        alpha=None, first_attention=0, projections=_PROCESSOR_NAMES, parts=("down", "up")),
    "diffusers": Layout(
        read=_DIFFUSERS_PATH + _PROCESSOR_TAIL,
        write="unet.{mm}.transformer_blocks.{block}.attn{attn}.processor.{proj}_lora.{part}.weight",
        alpha=None, first_attention=1, projections=_PROCESSOR_NAMES, parts=("down", "up")),
    "diffusers_peft": Layout(
        read=_DIFFUSERS_PATH + _PEFT_TAIL,
        write="unet.{mm}.transformer_blocks.{block}.attn{attn}.{proj}.{part}.weight",
        alpha="unet.{mm}.transformer_blocks.{block}.attn{attn}.{proj}.alpha",
        first_attention=1, projections=_PEFT_NAMES, parts=("lora_A", "lora_B")),
    "kinema": Layout(
        read=_KINEMA_PATH + _PEFT_TAIL,
        write="{mm}.temporal_transformer.transformer_blocks.{block}.attention_blocks.{attn}.{proj}.{part}.weight",
        alpha="{mm}.temporal_transformer.transformer_blocks.{block}.attention_blocks.{attn}.{proj}.alpha",
        first_attention=0, projections=_PEFT_NAMES, parts=("lora_A", "lora_B")),
}
_COMPILED = {name: re.compile(layout.read) for name, layout in LAYOUTS.items()}
_CANONICAL = {name: canon for names in (_PROCESSOR_NAMES, _PEFT_NAMES) for canon, name in names.items()}


class Slot(NamedTuple):
    """One adapted projection: motion module path, transformer block, attention index (from 0), projection."""

    mm: str
    block: int
    attention: int
    projection: str

    @property
    def module_path(self) -> str:
        """The projection's path inside `VideoUNet.unet`, e.g. `...attention_blocks.0.to_out.0`."""
        return (f"{self.mm}.temporal_transformer.transformer_blocks.{self.block}.attention_blocks.{self.attention}."
                f"{_PEFT_NAMES[self.projection]}")


@dataclass
class LoraPair:
    """`down` `(r, C_in)`, `up` `(C_out, r)` and an optional scalar `alpha` (update scaled by alpha / r)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """Factor on `up @ down` at strength 1: 1 without alpha (the original MotionLoRA rule), else alpha / r."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


@dataclass
class MotionLora:
    """A parsed motion LoRA: its file layout, its layers by slot (file order) and the file key naming each."""

    format: MotionLoraFormat
    layers: dict[Slot, LoraPair]
    keys: dict[Slot, str]
    adapter: str | None = None


def _match(key: str) -> tuple[MotionLoraFormat, re.Match] | None:
    for name, pattern in _COMPILED.items():
        found = pattern.fullmatch(key)
        if found:
            return name, found
    return None


def _examples(keys: list[str], count: int = 3) -> str:
    return ", ".join(keys[:count]) + (f" and {len(keys) - count} more" if len(keys) > count else "")


def is_motion_lora(state_dict: Mapping[str, Any]) -> bool:
    """Whether any key is a motion-LoRA key in one of the known layouts."""
    return any(_match(key) for key in state_dict)


# diffusers' safetensors metadata entry holding a peft-named LoRA's LoraConfig arguments (rank, alpha) as JSON.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def adapter_alpha(metadata: Mapping[str, str] | None, component: str = "unet") -> float | None:
    """The alpha diffusers stores in a LoRA file's `lora_adapter_metadata` for `component`'s layers (as
    `unet.lora_alpha`, `text_encoder.lora_alpha`) instead of per-layer `.alpha` keys; None when there is none.
    Per-layer rank or alpha patterns are refused (kinema reads one alpha for all of a component's layers)."""
    packed = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not packed:
        return None
    try:
        arguments = json.loads(packed)
    except json.JSONDecodeError:
        raise KinemaError(f"the LoRA's {ADAPTER_METADATA_KEY} is not valid JSON; re-save the file") from None
    if not isinstance(arguments, dict):
        return None
    if arguments.get(f"{component}.rank_pattern") or arguments.get(f"{component}.alpha_pattern"):
        raise KinemaError("the LoRA gives its layers different ranks or alphas (rank_pattern/alpha_pattern), which "
                          "kinema's LoRA loaders do not read; load it with diffusers")
    alpha = arguments.get(f"{component}.lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None


def parse_motion_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                      ) -> MotionLora:
    """Read a motion-LoRA state dict in any layout, strictly; `metadata` (the file's safetensors metadata) gives the
    alpha of diffusers files that keep it there (`adapter_alpha`) to every layer without an `.alpha` key.

    Raises `KinemaError` naming the keys when a key belongs to no layout (or to a second layout), a key repeats,
    more than one adapter name appears, or the shapes are not down `(r, C)` and up `(C, r)` (see `_check_shapes`):
    a layer without its down or up matrix, ranks that disagree within a pair, or a width C other than that of the
    motion module the key names. Works on meta tensors (shapes only), except for the value of an alpha.
    """
    matched: dict[str, tuple[MotionLoraFormat, re.Match]] = {}
    unknown: list[str] = []
    for key in state_dict:
        hit = _match(key)
        if hit:
            matched[key] = hit
        else:
            unknown.append(key)
    if not matched:
        example = LAYOUTS["original"].write.format(mm="down_blocks.0.motion_modules.0", block=0, attn=0, proj="to_q",
                                                   part="down")
        raise KinemaError(f"no motion-LoRA keys among {len(state_dict)} keys (e.g. {_examples(list(state_dict))}); "
                          f"expected keys like {example}")
    counts = Counter(name for name, _ in matched.values())
    fmt = counts.most_common(1)[0][0]
    strays = unknown + [key for key, (name, _) in matched.items() if name != fmt]
    if strays:
        raise KinemaError(
            f"{len(strays)} of {len(state_dict)} keys are not {fmt!r} motion-LoRA keys: {_examples(strays)}. A motion "
            "LoRA holds only the down/up matrices of the temporal attentions' to_q/to_k/to_v/to_out, in one layout")
    layout = LAYOUTS[fmt]
    parts: dict[Slot, dict[str, str]] = {}  # slot -> "down" / "up" / "alpha" -> key, in file order
    adapters: set[str] = set()
    for key, (_, found) in matched.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise KinemaError(f"motion-LoRA entry {key} is a {type(value).__name__}, not a tensor")
        groups = found.groupdict()
        slot = Slot(groups["mm"], int(groups["block"]), int(groups["attn"]) - layout.first_attention,
                    _CANONICAL[groups["proj"]])
        part = "alpha" if groups.get("alpha") else ("down" if groups["part"] in ("down", "lora_A") else "up")
        if groups.get("adapter"):
            adapters.add(groups["adapter"])
        if part in parts.setdefault(slot, {}):
            raise KinemaError(f"motion-LoRA key {key} repeats the {part} matrix of {next(iter(parts[slot].values()))}")
        parts[slot][part] = key
    if len(adapters) > 1:
        raise KinemaError(f"the motion LoRA holds several adapters {sorted(adapters)}; save one adapter per file")
    _check_shapes(fmt, parts, {key: found for key, (_, found) in matched.items()}, state_dict)
    stored_alpha = adapter_alpha(metadata)

    def alpha(keys: dict[str, str]) -> torch.Tensor | None:
        # One tensor per layer: a writer of `.alpha` keys (safetensors) refuses tensors that share memory.
        if "alpha" in keys:
            return state_dict[keys["alpha"]]
        return None if stored_alpha is None else torch.tensor(stored_alpha)

    layers = {slot: LoraPair(state_dict[p["down"]], state_dict[p["up"]], alpha(p)) for slot, p in parts.items()}
    return MotionLora(fmt, layers, {slot: next(iter(p.values())) for slot, p in parts.items()},
                      adapters.pop() if adapters else None)


def _width_group(slot: Slot) -> str:
    """The UNet block whose width C a slot's projections have; the mid block is as wide as up_blocks.0 (both sit
    at the deepest level)."""
    block = slot.mm.rsplit(".motion_modules.", 1)[0]
    return "up_blocks.0 and mid_block" if block in ("up_blocks.0", "mid_block") else block


def _check_shapes(fmt: str, parts: dict[Slot, dict[str, str]], matches: dict[str, re.Match],
                  state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse a LoRA whose pairs are not down (r, C_in) and up (C, r): every pair complete, one rank r per pair, and
    C the width of the motion module the key names (its attention projections are C -> C). C is the most common width
    among the pairs of that UNet block and r, where down and up disagree, the file's most common rank, so the
    message names the odd tensor out. C_in is C but for the key and value projections of a cross-attention (a
    motion module that reads the prompt: their input is the text states' width), so those of each attention index
    take their own most common input width; loading checks every pair against the layer itself."""
    for p in parts.values():
        if "down" not in p and "up" not in p:
            raise KinemaError(f"motion-LoRA alpha {p['alpha']} has no down or up matrix; the file is incomplete")
        if "alpha" in p and state_dict[p["alpha"]].numel() != 1:
            raise KinemaError(f"motion-LoRA alpha {p['alpha']} has shape {tuple(state_dict[p['alpha']].shape)}; it "
                              "must be a single number")
    found = {key: tuple(state_dict[key].shape) for p in parts.values() for part, key in p.items() if part != "alpha"}
    flat = [key for key, shape in found.items() if len(shape) != 2]
    if flat:
        raise KinemaError(f"motion-LoRA matrix {flat[0]} has shape {found[flat[0]]}; LoRA matrices are 2-D: down "
                          "(r, C_in) and up (C_out, r)")
    widths: dict[str, Counter] = {}
    kv_widths: dict[tuple[str, int], Counter] = {}  # the key and value projections' input widths, by attention

    def kv_group(slot: Slot) -> tuple[str, int] | None:
        return (_width_group(slot), slot.attention) if slot.projection in ("k", "v") else None

    ranks: Counter = Counter()
    for slot, p in parts.items():
        width = widths.setdefault(_width_group(slot), Counter())
        group = kv_group(slot)
        if "down" in p:
            ranks[found[p["down"]][0]] += 1
            (width if group is None else kv_widths.setdefault(group, Counter()))[found[p["down"]][1]] += 1
        if "up" in p:
            ranks[found[p["up"]][1]] += 1
            width[found[p["up"]][0]] += 1
    expected: dict[str, tuple[int, int]] = {}
    incomplete: list[str] = []
    for slot, p in parts.items():
        c = widths[_width_group(slot)].most_common(1)[0][0]
        group = kv_group(slot)
        c_in = c
        if group in kv_widths:  # the block's own width unless another is more common (a tie keeps C)
            counts = kv_widths[group]
            c_in = c if counts[c] == max(counts.values()) else counts.most_common(1)[0][0]
        down = p.get("down") or _partner(p["up"], matches)
        up = p.get("up") or _partner(p["down"], matches)
        # The pair's rank: down's and up's when they agree, else the one more common in the file (down's on a tie).
        r = max([found[key][i] for key, i in ((down, 0), (up, 1)) if key in found], key=ranks.__getitem__)
        expected[down], expected[up] = (r, c_in), (c, r)
        absent = [part for part in ("down", "up") if part not in p]
        if absent:
            incomplete.append(f"{p.get('down') or p['up']} has no {absent[0]} matrix")
    problems = key_problems(expected, found)
    if problems:
        causes = []
        if incomplete:
            causes.append(f"{incomplete[0]}: the file is incomplete (an interrupted download or export)")
        if "mismatched" in problems:
            causes.append("a matrix was reshaped or replaced (a faulty merge or edit), or the file is damaged")
        block_widths = ", ".join(f"{block}: {count.most_common(1)[0][0]}" for block, count in sorted(widths.items()))
        raise KinemaError(
            f"motion LoRA ({fmt} layout) does not fit the motion-module layers its keys name: "
            f"{problems_phrase(problems)}. Checked against down (r, C) and up (C, r) per layer, one rank r per pair "
            f"and C the width of the block it targets ({block_widths}). Likely cause: {'; '.join(causes)}")


def _partner(key: str, matches: dict[str, re.Match]) -> str:
    """The name the other matrix of `key`'s pair has: `...down.weight` <-> `...up.weight`, `lora_A` <-> `lora_B`."""
    found = matches[key]
    start, end = found.span("part")
    other = {"down": "up", "up": "down", "lora_A": "lora_B", "lora_B": "lora_A"}[found["part"]]
    return key[:start] + other + key[end:]


def motion_lora_format(name: str) -> MotionLoraFormat:
    """`name` (e.g. a `--to` choice) as a motion-LoRA layout; KinemaError naming the layouts when it is none."""
    if name not in LAYOUTS:
        raise KinemaError(f"unknown motion-LoRA layout {name!r}; choose one of {sorted(LAYOUTS)}")
    return cast(MotionLoraFormat, name)  # one of LAYOUTS' keys, which are the layouts


def write_motion_lora(lora: MotionLora, to: MotionLoraFormat) -> dict[str, torch.Tensor]:
    """Write a parsed motion LoRA's tensors under the key names of layout `to`."""
    layout = LAYOUTS[motion_lora_format(to)]  # checked again: callers without a type checker pass any string
    out: dict[str, torch.Tensor] = {}
    for slot, pair in lora.layers.items():
        fields = dict(mm=slot.mm, block=slot.block, attn=slot.attention + layout.first_attention,
                      proj=layout.projections[slot.projection])
        up = pair.up
        if pair.alpha is not None and layout.alpha is None and pair.scale != 1.0:
            up = (up.float() * pair.scale).to(up.dtype)  # this layout cannot store alpha: bake alpha / r into up
        out[layout.write.format(part=layout.parts[0], **fields)] = pair.down
        out[layout.write.format(part=layout.parts[1], **fields)] = up
        if pair.alpha is not None and layout.alpha is not None:
            out[layout.alpha.format(**fields)] = pair.alpha
    return out


def convert_motion_lora(state_dict: Mapping[str, torch.Tensor], to: MotionLoraFormat,
                        metadata: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Rename a motion LoRA's keys into layout `to` (`original`, `diffusers`, `diffusers_peft` or `kinema`);
    `metadata` as for `parse_motion_lora`.

    The tensors are passed through unchanged, so any round trip is bit-exact, except that an alpha differing from
    the rank is baked into `up` when `to` has no place for alpha. Shapes: down `(r, C_in)`, up `(C_out, r)`.
    """
    return write_motion_lora(parse_motion_lora(state_dict, metadata), to)


def _one_or_all(values: set) -> Any:
    ordered = sorted(values)
    return ordered[0] if len(ordered) == 1 else ordered


def summarize_motion_lora(lora: MotionLora, key_count: int) -> dict[str, Any]:
    """What `describe_motion_lora` reports, for an already parsed LoRA."""
    pairs = list(lora.layers.values())
    present = {slot.projection for slot in lora.layers}
    with_alpha = [p for p in pairs if p.alpha is not None]
    alphas = {float(p.alpha) for p in with_alpha}  # type: ignore[arg-type]
    # None among the values: some layers have no alpha (scaled by 1, the original rule), as they load.
    alpha = None if not alphas else _one_or_all(alphas) if len(with_alpha) == len(pairs) else [*sorted(alphas), None]
    return {
        "kind": "motion_lora",
        "format": lora.format,
        "rank": _one_or_all({p.rank for p in pairs}),
        "targets": [_PROCESSOR_NAMES[p] for p in PROJECTIONS if p in present],
        "motion_modules": len({slot.mm for slot in lora.layers}),
        "mid_block": any(slot.mm.startswith("mid_block.") for slot in lora.layers),
        "channels": _one_or_all({p.down.shape[1] for p in pairs}),
        "layers": len(pairs),
        "keys": key_count,
        "parameters": sum(p.down.numel() + p.up.numel() + (p.alpha.numel() if p.alpha is not None else 0)
                          for p in pairs),
        "dtype": _one_or_all({str(t.dtype).removeprefix("torch.") for p in pairs for t in (p.down, p.up)}),
        "alpha": alpha,
        "adapter": lora.adapter,
    }


def describe_motion_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                         ) -> dict[str, Any] | None:
    """Summary for `kinema inspect`, or None when no key is a motion-LoRA key.

    Returns `{"kind": "motion_lora", "format", "rank", "targets" (e.g. ["to_q", "to_k", "to_v", "to_out"]),
    "motion_modules", "mid_block", "channels", "layers", "keys", "parameters", "dtype", "alpha", "adapter"}`; rank,
    channels, dtype and alpha are a list when they differ between layers. A file that looks like a motion LoRA but
    is malformed raises `KinemaError`. Works on meta tensors (shapes only).
    """
    if not is_motion_lora(state_dict):
        return None
    return summarize_motion_lora(parse_motion_lora(state_dict, metadata), len(state_dict))
