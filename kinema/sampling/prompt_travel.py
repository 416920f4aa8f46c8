"""Prompt travel: a prompt per keyframe, the text states of the frames between them interpolated.

A schedule is parsed from one of three spellings (`parse_prompt_schedule`): a plain prompt for every frame; keyframes
as a mapping or JSON text `{"0": "a cat", "48": "a dog"}`; or animatediff-cli-prompt-travel's
`{"head_prompt": ..., "prompt_map": {"0": ...}, "tail_prompt": ...}`. Each distinct keyframe prompt is encoded once
(`PromptSchedule.prompts`), and `interpolate_states` blends the encoded states into per-frame text states
`(B, F, L, D)`, which `VideoUNet` takes as `encoder_hidden_states`.

Parsing and the schedule table import no torch (a CLI checks a schedule before loading anything).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kinema.errors import KinemaError

if TYPE_CHECKING:
    import torch

INTERPOLATIONS = ("linear", "slerp")
HEAD_TAIL_FIELDS = ("head_prompt", "prompt_map", "tail_prompt")
# Token vectors closer in direction than this are blended linearly: slerp's sin(omega) divisor loses all precision.
SLERP_PARALLEL_DOT = 0.9995
# ASCII digits (str.isdigit() and \d take "³" and "٣" too), few enough for int() and any frame count.
_FRAME_NUMBER = re.compile(r"[+-]?[0-9]{1,18}")


@dataclass(frozen=True)
class PromptSchedule:
    """Keyframes `(frame, prompt)` in ascending frame order, and how the text states between two keyframes are
    blended: "linear" or "slerp" (spherical, per token vector); `hold`, the share of each gap a keyframe's prompt is
    held before the blend to the next starts (animatediff-cli-prompt-travel's prompt_fixed_ratio); `loop`: the
    schedule is circular, so the frames after the last keyframe blend on to the first (and those before the first
    come from the last), as prompt travel's are."""

    keyframes: tuple[tuple[int, str], ...]
    interpolation: str = "linear"
    hold: float = 0.0
    loop: bool = False

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise KinemaError("a prompt schedule needs at least one keyframe, e.g. ((0, 'a cat'),)")
        frames = [frame for frame, _ in self.keyframes]
        if frames[0] < 0 or not all(isinstance(prompt, str) and prompt.strip() for _, prompt in self.keyframes):
            raise KinemaError(f"prompt schedule keyframes are (frame >= 0, non-empty prompt) pairs; got "
                              f"{self.keyframes!r}")
        if any(later <= earlier for earlier, later in zip(frames, frames[1:], strict=False)):
            raise KinemaError(f"prompt schedule keyframes must be in strictly ascending frame order; got {frames}")
        if self.interpolation not in INTERPOLATIONS:
            raise KinemaError(f"unknown prompt interpolation {self.interpolation!r}; known: "
                              f"{', '.join(INTERPOLATIONS)}")
        check_prompt_hold(self.hold, self.loop)

    def prompts(self) -> list[str]:
        """The distinct keyframe prompts in order of first appearance: encode each once, in this order, for
        `interpolate_states`."""
        return list(dict.fromkeys(prompt for _, prompt in self.keyframes))

    def frame_weights(self, frames: int) -> list[tuple[int, int, float]]:
        """Per frame `(a, b, t)`: the frame's text states are `prompts()[a]` blended towards `prompts()[b]` by
        `t` in [0, 1] (t = 0 is exactly prompt a). Between keyframes k0 < k1 the prompt of k0 is held up to frame
        h = k0 + round((k1 - k0) * hold) (h = k1 - 1 where that reaches k1), then t = (frame - h) / (k1 - h).
        Without `loop`, frames up to the first keyframe take its prompt and frames from the last keyframe on take
        the last one; with it, the last keyframe pairs with the first one `frames` later. Two neighbouring
        keyframes with the same prompt hold it (t = 0)."""
        last = self.keyframes[-1][0]
        if frames < 1 or last >= frames:
            raise KinemaError(f"this prompt schedule has a keyframe at frame {last}, which {frames} frame(s) do not "
                              f"reach; generate at least {last + 1} frames or parse the schedule for {frames}")
        index = {prompt: i for i, prompt in enumerate(self.prompts())}
        keys = list(self.keyframes)
        if self.loop:  # the last keyframe one period before, the first one period after
            keys = [(keys[-1][0] - frames, keys[-1][1]), *keys, (keys[0][0] + frames, keys[0][1])]
        weights: list[tuple[int, int, float]] = []
        key = 0  # keys[key] is the last keyframe at or before the frame
        for frame in range(frames):
            while key + 1 < len(keys) and keys[key + 1][0] <= frame:
                key += 1
            start, prompt = keys[key]
            a = index[prompt]
            if frame < start or key + 1 == len(keys):  # before the first keyframe, or from the last on
                weights.append((a, a, 0.0))
                continue
            end, next_prompt = keys[key + 1]
            b = index[next_prompt]
            held = start + round((end - start) * self.hold)  # Python's round, as prompt travel's
            held = end - 1 if held >= end else held
            t = (frame - held) / (end - held) if frame > held else 0.0
            weights.append((a, b, t) if a != b and t > 0 else (a, a, 0.0))
        return weights


def check_prompt_hold(hold: Any, loop: Any) -> None:
    """One KinemaError line unless `hold` is a number from 0 to 1 and `loop` true or false."""
    if isinstance(hold, bool) or not isinstance(hold, int | float) or not 0 <= hold <= 1:
        raise KinemaError(f"prompt_hold is the share of each gap between keyframes that a prompt is held before the "
                          f"blend, from 0 to 1 (prompt travel's prompt_fixed_ratio, e.g. 0.5), got {hold!r}")
    if not isinstance(loop, bool):
        raise KinemaError(f"prompt_loop is true or false, got {loop!r}")


def parse_prompt_schedule(spec: str | Mapping[Any, Any], frames: int, interpolation: str = "linear",
                          hold: float = 0.0, loop: bool = False) -> PromptSchedule:
    """A `PromptSchedule` for a video of `frames` frames, from any of:

    - a plain prompt (text not starting with "{"): that prompt for every frame;
    - keyframes, as a mapping or its JSON text, `{"0": "a cat", "48": "a dog"}`: keys are frame indices (ints, or
      strings of an integer) in ascending order, each in 0 .. frames - 1, each prompt non-empty;
    - animatediff-cli-prompt-travel's form, as a mapping or JSON text: `{"head_prompt": "...", "prompt_map":
      {frame: prompt}, "tail_prompt": "..."}` (head and tail optional); each keyframe's prompt is
      `head, prompt, tail`, empty parts left out.

    Keyframe 0 need not be given: frames before the first keyframe take its prompt (and frames after the last one
    take the last prompt), unless `loop` (`PromptSchedule`, as `hold`). Bad input raises one KinemaError line naming
    the problem.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise KinemaError(f"a prompt schedule needs a frame count of at least 1, got {frames!r}")
    if interpolation not in INTERPOLATIONS:
        raise KinemaError(f"unknown prompt interpolation {interpolation!r}; known: {', '.join(INTERPOLATIONS)}")
    if isinstance(spec, str):
        if not spec.strip().startswith("{"):
            if not spec.strip():
                raise KinemaError("the prompt is empty; write a prompt or a keyframe schedule like "
                                  '{"0": "a cat", "16": "a dog"}')
            return PromptSchedule(((0, spec.strip()),), interpolation, hold, loop)
        spec = schedule_json(spec)
    if not isinstance(spec, Mapping):
        raise KinemaError(f"a prompt schedule is a prompt, a mapping or JSON text, not {type(spec).__name__}")
    if any(isinstance(key, str) and key in HEAD_TAIL_FIELDS for key in spec):
        return PromptSchedule(_head_tail_keyframes(spec, frames), interpolation, hold, loop)
    return PromptSchedule(_keyframes(spec, frames), interpolation, hold, loop)


def schedule_json(text: str, what: str = "prompt schedule", example: str = '{"0": "a cat", "16": "a dog"}'
                  ) -> Any:
    """Parse a schedule's JSON text (a prompt's, or an image prompt's), refusing keys given twice (json.loads would
    keep the last silently); one KinemaError line naming `what`, with `example`, for text that is not JSON."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen:
                raise KinemaError(f"{what} key {key!r} is given twice; give each keyframe once")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as error:
        raise KinemaError(f"the {what} is not valid JSON ({error.msg} at line {error.lineno} column "
                          f"{error.colno}); write it like {example}") from None


def frame_number(key: Any) -> int | None:
    """A keyframe's frame number from an int or its text (as JSON and YAML keys and numbered file names give it),
    signed; None for anything else (bools, other digits than ASCII's, other text)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and _FRAME_NUMBER.fullmatch(key.strip()):
        return int(key.strip())
    return None


def _frame_index(key: Any) -> int:
    frame = frame_number(key)
    if frame is not None:
        return frame
    raise KinemaError(f"prompt schedule key {key!r} is not a frame index; keys are whole frame numbers like "
                      '"0" or "16"')


def _keyframes(mapping: Mapping[Any, Any], frames: int) -> tuple[tuple[int, str], ...]:
    """Validated keyframes from `{frame: prompt}`, in the order given (which must be ascending)."""
    if not mapping:
        raise KinemaError('the prompt schedule has no keyframes; give at least one, like {"0": "a cat"}')
    keyframes: list[tuple[int, str]] = []
    for key, prompt in mapping.items():
        frame = _frame_index(key)
        if frame < 0:
            raise KinemaError(f"prompt schedule key {key!r} is negative: keyframes are frame numbers from 0")
        if frame >= frames:
            raise KinemaError(f"prompt schedule key {key!r} is out of range: keyframes go from 0 to {frames - 1} "
                              f"for {frames} frames; make at least {frame + 1} frames, or move the keyframe")
        if any(frame == seen for seen, _ in keyframes):
            raise KinemaError(f"prompt schedule frame {frame} is given twice; give each keyframe once")
        if keyframes and frame < keyframes[-1][0]:
            raise KinemaError(f"prompt schedule keys are out of order: {frame} comes after {keyframes[-1][0]}; list "
                              "keyframes in ascending frame order")
        if not isinstance(prompt, str):
            raise KinemaError(f"the prompt for frame {frame} is {type(prompt).__name__}, not text")
        if not prompt.strip():
            raise KinemaError(f"the prompt for frame {frame} is empty; write one or drop the keyframe")
        keyframes.append((frame, prompt.strip()))
    return tuple(keyframes)


def _head_tail_keyframes(spec: Mapping[Any, Any], frames: int) -> tuple[tuple[int, str], ...]:
    """Keyframes from the head_prompt / prompt_map / tail_prompt form, head and tail joined to each prompt."""
    unknown = [str(key) for key in spec if key not in HEAD_TAIL_FIELDS]
    if unknown:
        raise KinemaError(f"unknown prompt schedule field(s) {', '.join(map(repr, unknown))}; the known fields are "
                          f"{', '.join(HEAD_TAIL_FIELDS)}")
    if "prompt_map" not in spec:
        raise KinemaError('the prompt schedule has head_prompt / tail_prompt but no prompt_map; add '
                          '"prompt_map": {"0": "..."}')
    prompt_map = spec["prompt_map"]
    if not isinstance(prompt_map, Mapping):
        raise KinemaError(f"prompt_map must map frames to prompts, like {{\"0\": \"a cat\"}}; got "
                          f"{type(prompt_map).__name__}")
    ends = []
    for field in ("head_prompt", "tail_prompt"):
        value = spec.get(field)
        if value is not None and not isinstance(value, str):
            raise KinemaError(f"{field} must be text, got {type(value).__name__}")
        ends.append((value or "").strip())
    head, tail = ends
    return tuple((frame, ", ".join(part for part in (head, prompt, tail) if part))
                 for frame, prompt in _keyframes(prompt_map, frames))


def interpolate_states(states: torch.Tensor, schedule: PromptSchedule, frames: int,
                       window: range | None = None) -> torch.Tensor:
    """Per-frame text states from one encoding per distinct keyframe prompt.

    Args:
        states: `(K, L, D)` or `(B, K, L, D)`: the states of `schedule.prompts()` in that order (K of them).
        schedule: the prompt schedule; its `interpolation` picks linear blending or slerp. Slerp interpolates each
            token vector (over D) along the great circle between the two prompts' vectors, scaled as the standard
            formula `sin((1-t)w)/sin(w) a + sin(t w)/sin(w) b` with w the angle between them (unit vectors stay
            unit); token vectors that are nearly parallel are blended linearly.
        frames: F, the video's frame count.
        window: only these frames of the video (a continuation segment's, which may run past its end: those take
            the last frame's states); default all F.

    Returns:
        `(F, L, D)` or `(B, F, L, D)` (F = len(window) with a window) in the states' dtype; a keyframe's frame holds
        exactly its prompt's states.
    """
    import torch

    count = len(schedule.prompts())
    if states.ndim not in (3, 4) or states.shape[-3] != count:
        raise KinemaError(f"prompt travel needs the states of the schedule's {count} prompt(s) as (K, L, D) or "
                          f"(B, K, L, D) with K = {count}; got shape {tuple(states.shape)}")
    weights = schedule.frame_weights(frames)
    if window is not None:
        weights = [weights[min(frame, frames - 1)] for frame in window]
    a = torch.tensor([w[0] for w in weights], device=states.device)
    b = torch.tensor([w[1] for w in weights], device=states.device)
    # Blend in float32 at least: half-precision sin/acos of nearly equal vectors is too coarse.
    work = states.float() if states.dtype in (torch.float16, torch.bfloat16) else states
    t = torch.tensor([w[2] for w in weights], dtype=work.dtype, device=states.device)[:, None, None]
    start, end = work.index_select(-3, a), work.index_select(-3, b)
    if schedule.interpolation == "linear":
        blended = (1 - t) * start + t * end
    else:
        blended = _slerp(start, end, t)
    # t = 0 is exactly the keyframe's states, whatever the rounding of the blend formula.
    blended = torch.where(t == 0, start, blended)
    return blended.to(states.dtype)


def _slerp(start: torch.Tensor, end: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each vector over the last dimension, linear where the two are nearly parallel
    (or one is zero)."""
    import torch

    tiny = torch.finfo(start.dtype).tiny
    dot = (start * end).sum(-1, keepdim=True) / (start.norm(dim=-1, keepdim=True) * end.norm(dim=-1, keepdim=True)
                                                 ).clamp_min(tiny)
    dot = dot.clamp(-1, 1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    parallel = dot.abs() > SLERP_PARALLEL_DOT
    safe_sin = torch.where(parallel, torch.ones_like(sin_omega), sin_omega)
    spherical = (torch.sin((1 - t) * omega) * start + torch.sin(t * omega) * end) / safe_sin
    return torch.where(parallel, (1 - t) * start + t * end, spherical)


def schedule_table(schedule: PromptSchedule, frames: int) -> str:
    """The per-frame schedule as text, one line per blended frame, e.g. `frame 12: 0.75 "a cat" -> 0.25 "a dog"`;
    a run of frames holding one prompt is one line, `frames 0-11: "a cat"` (`frame 5: "a cat"` for one frame).
    Frame numbers are right-aligned to the widest."""
    prompts = schedule.prompts()
    width = len(str(frames - 1))
    lines: list[str] = []
    weights = schedule.frame_weights(frames)
    frame = 0
    while frame < frames:
        a, b, t = weights[frame]
        if t > 0:
            lines.append(f"frame {frame:>{width}}: {1 - t:.2f} {_quoted(prompts[a])} -> {t:.2f} "
                         f"{_quoted(prompts[b])}")
            frame += 1
            continue
        last = frame
        while last + 1 < frames and weights[last + 1][2] == 0 and weights[last + 1][0] == a:
            last += 1
        span = f"frame {frame:>{width}}" if last == frame else f"frames {frame}-{last}"
        lines.append(f"{span}: {_quoted(prompts[a])}")
        frame = last + 1
    return "\n".join(lines)


def _quoted(prompt: str) -> str:
    return json.dumps(prompt, ensure_ascii=False)
