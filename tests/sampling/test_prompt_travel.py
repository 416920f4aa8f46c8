"""Prompt travel: every schedule spelling parses to the same keyframes, one-line errors, per-frame weights, linear
and spherical blending of the text states against plain references, and the printed schedule."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kinema.errors import KinemaError
from kinema.sampling.prompt_travel import (
    PromptSchedule,
    interpolate_states,
    parse_prompt_schedule,
    schedule_table,
)

FRAMES = 16
KEYFRAMES = ((0, "best, a cat, 4k"), (8, "best, a dog, 4k"))
HEAD_TAIL = {"head_prompt": "best", "prompt_map": {"0": "a cat", "8": "a dog"}, "tail_prompt": "4k"}


@pytest.mark.parametrize("spec", [
    {"0": "best, a cat, 4k", "8": "best, a dog, 4k"},
    {0: "best, a cat, 4k", 8: "best, a dog, 4k"},
    '{"0": "best, a cat, 4k", " 8 ": "  best, a dog, 4k "}',
    HEAD_TAIL,
    json.dumps(HEAD_TAIL),
    {"head_prompt": " best ", "prompt_map": {0: "a cat", "+8": "a dog"}, "tail_prompt": "4k"},
], ids=["mapping", "int-keys", "json", "head-tail", "head-tail-json", "head-tail-spacing"])
def test_every_format_parses_to_the_same_keyframes(spec):
    schedule = parse_prompt_schedule(spec, FRAMES, interpolation="slerp")
    assert schedule == PromptSchedule(KEYFRAMES, "slerp")


def test_plain_prompt_and_empty_head_tail_parts():
    assert parse_prompt_schedule("  a cat ", FRAMES).keyframes == ((0, "a cat"),)
    assert parse_prompt_schedule({"head_prompt": "", "prompt_map": {"3": "a cat"}}, FRAMES).keyframes == (
        (3, "a cat"),)
    assert parse_prompt_schedule({"prompt_map": {"3": "a cat"}, "tail_prompt": "4k"}, FRAMES).keyframes == (
        (3, "a cat, 4k"),)


@pytest.mark.parametrize("spec, frames, message", [
    ({"0": "a", "16": "b"}, 16, "key '16' is out of range: keyframes go from 0 to 15 for 16 frames"),
    ({"-1": "a"}, 16, "key '-1' is negative: keyframes are frame numbers from 0"),
    ({"8": "a", "0": "b"}, 16, "keys are out of order: 0 comes after 8; list keyframes in ascending frame order"),
    ('{"0": "a", "0": "b"}', 16, "key '0' is given twice"),
    ({"0": "a", "00": "b"}, 16, "frame 0 is given twice"),
    ({"0": "a", "1.5": "b"}, 16, "key '1.5' is not a frame index"),
    ({"0": "a", "later": "b"}, 16, "key 'later' is not a frame index"),
    ({0: "a", 2.0: "b"}, 16, "key 2.0 is not a frame index"),
    ({"0": "a", "\u0663": "b"}, 16, "key '\u0663' is not a frame index"),  # Arabic-Indic 3: int() reads it, we do not
    ({"0": "a", True: "b"}, 16, "key True is not a frame index"),
    ({"0": "a", "4": "  "}, 16, "the prompt for frame 4 is empty"),
    ({"0": 3}, 16, "the prompt for frame 0 is int, not text"),
    ("   ", 16, "the prompt is empty"),
    ({}, 16, "has no keyframes"),
    ({"head_prompt": "a", "prompt_map": {"0": "b"}, "negative": "c", "0": "d"}, 16,
     "unknown prompt schedule field(s) 'negative', '0'; the known fields are head_prompt, prompt_map, tail_prompt"),
    ({"head_prompt": "a"}, 16, "no prompt_map"),
    ({"head_prompt": 1, "prompt_map": {"0": "b"}}, 16, "head_prompt must be text"),
    ("{'0': 'a'}", 16, "not valid JSON"),
    ("a cat", 0, "frame count of at least 1"),
])
def test_bad_schedules_fail_in_one_line(spec, frames, message):
    with pytest.raises(KinemaError) as error:
        parse_prompt_schedule(spec, frames)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_interpolation_and_state_shapes():
    with pytest.raises(KinemaError, match="unknown prompt interpolation 'cubic'; known: linear, slerp"):
        parse_prompt_schedule("a cat", FRAMES, interpolation="cubic")
    schedule = PromptSchedule(KEYFRAMES)
    with pytest.raises(KinemaError, match=r"K = 2; got shape \(3, 4, 5\)"):
        interpolate_states(torch.zeros(3, 4, 5), schedule, FRAMES)
    with pytest.raises(KinemaError, match="keyframe at frame 8, which 8 frame"):
        schedule.frame_weights(8)
    for keyframes in [((3, "a"), (1, "b")), ((-1, "a"),), ((0, " "),), ()]:
        with pytest.raises(KinemaError, match="keyframe"):
            PromptSchedule(keyframes)


def test_frame_weights_by_hand():
    # cat from 2 to dog at 6, bird at 7 to dog at 9; before 2 and after 9 held; prompts() lists dog once.
    schedule = parse_prompt_schedule({"2": "cat", "6": "dog", "7": "bird", "9": "dog"}, 11)
    assert schedule.prompts() == ["cat", "dog", "bird"]
    assert schedule.frame_weights(11) == [
        (0, 0, 0.0), (0, 0, 0.0), (0, 0, 0.0), (0, 1, 0.25), (0, 1, 0.5), (0, 1, 0.75),
        (1, 1, 0.0), (2, 2, 0.0), (2, 1, 0.5), (1, 1, 0.0), (1, 1, 0.0)]
    held = parse_prompt_schedule({"0": "cat", "4": "cat", "6": "dog"}, 7)
    assert held.frame_weights(7) == [(0, 0, 0.0)] * 5 + [(0, 1, 0.5), (1, 1, 0.0)]


def states(count, batch=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shape = (count, 5, 16) if batch is None else (batch, count, 5, 16)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def test_linear_blend_equals_manual():
    schedule = parse_prompt_schedule({"1": "cat", "5": "dog", "8": "bird"}, 12)
    keyed = states(3)
    ours = interpolate_states(keyed, schedule, 12)
    manual = torch.stack([(1 - t) * keyed[a] + t * keyed[b] for a, b, t in schedule.frame_weights(12)])
    assert ours.shape == (12, 5, 16)
    torch.testing.assert_close(ours, manual, rtol=1e-6, atol=1e-6)
    batched = states(3, batch=2)
    ours = interpolate_states(batched, schedule, 12)
    assert ours.shape == (2, 12, 5, 16)
    for b in range(2):
        torch.testing.assert_close(ours[b], interpolate_states(batched[b], schedule, 12), rtol=0, atol=0)


def numpy_slerp(a, b, t, parallel=0.9995):
    """Reference: spherical interpolation of two vectors, linear when nearly parallel."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    dot = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    if abs(dot) > parallel:
        return (1 - t) * a + t * b
    omega = np.arccos(np.clip(dot, -1, 1))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_slerp_equals_numpy_reference_and_keeps_unit_norm():
    schedule = parse_prompt_schedule({"0": "cat", "6": "dog"}, 8, interpolation="slerp")
    keyed = states(2)
    keyed[1, 0] = 3 * keyed[0, 0]  # a parallel token vector takes the linear fallback
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        ours = interpolate_states(keyed.to(dtype), schedule, 8)
        assert ours.dtype == dtype
        for frame, (a, b, t) in enumerate(schedule.frame_weights(8)):
            for token in range(keyed.shape[1]):
                expected = numpy_slerp(keyed[a, token], keyed[b, token], t)
                np.testing.assert_allclose(ours[frame, token].double().numpy(), expected, rtol=tolerance,
                                           atol=tolerance)
    unit = states(2)
    unit = unit / unit.norm(dim=-1, keepdim=True)
    norms = interpolate_states(unit.float(), schedule, 8).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
    # and slerp is not lerp: a lerp between unit vectors shortens them
    linear = interpolate_states(unit.float(), PromptSchedule(schedule.keyframes, "linear"), 8).norm(dim=-1)
    assert linear[3].max() < 0.99


@pytest.mark.parametrize("interpolation", ["linear", "slerp"])
def test_keyframes_hold_their_prompt_states_exactly(interpolation):
    spec = {"2": "cat", "5": "dog", "9": "cat", "11": "bird"}
    schedule = parse_prompt_schedule(spec, 14, interpolation=interpolation)
    for dtype in (torch.float32, torch.bfloat16):
        keyed = states(3, batch=2, dtype=dtype)
        ours = interpolate_states(keyed, schedule, 14)
        assert ours.dtype == dtype
        index = {prompt: i for i, prompt in enumerate(schedule.prompts())}
        for frame, prompt in [(0, "cat"), (2, "cat"), (5, "dog"), (9, "cat"), (11, "bird"), (13, "bird")]:
            assert torch.equal(ours[:, frame], keyed[:, index[prompt]])
        assert not torch.equal(ours[:, 3], keyed[:, 0])


def test_schedule_table_snapshot():
    schedule = parse_prompt_schedule({"2": "a cat", "6": 'a "dog"', "7": "a cat"}, 12)
    assert schedule_table(schedule, 12).splitlines() == [
        'frames 0-2: "a cat"',
        'frame  3: 0.75 "a cat" -> 0.25 "a \\"dog\\""',
        'frame  4: 0.50 "a cat" -> 0.50 "a \\"dog\\""',
        'frame  5: 0.25 "a cat" -> 0.75 "a \\"dog\\""',
        'frame  6: "a \\"dog\\""',
        'frames 7-11: "a cat"',
    ]
    assert schedule_table(parse_prompt_schedule("a cat", 3), 3) == 'frames 0-2: "a cat"'


def test_parsing_imports_no_torch():
    code = ("import sys; from kinema.sampling.prompt_travel import parse_prompt_schedule, schedule_table; "
            "s = parse_prompt_schedule({'0': 'a', '4': 'b'}, 8); schedule_table(s, 8); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hold_and_loop_blend_as_prompt_travel_designs_it():
    """animatediff-cli-prompt-travel's prompt_preprocess and PromptEncoder (keys sorted, as its design means): each
    prompt is held to k0 + round((k1 - k0) * ratio), then blended linearly in frames to k1; the schedule is circular
    with the video's length as its period. The weights below are written out by hand from those rules."""
    schedule = parse_prompt_schedule({"0": "A", "32": "B", "64": "C", "96": "D"}, 128, hold=0.5, loop=True)
    weights = schedule.frame_weights(128)
    assert weights[:17] == [(0, 0, 0.0)] * 17  # A held to frame 16
    assert weights[17] == (0, 1, 1 / 16) and weights[24] == (0, 1, 0.5) and weights[32] == (1, 1, 0.0)
    assert weights[80] == (2, 2, 0.0) and weights[88] == (2, 3, 0.5)
    assert weights[112] == (3, 3, 0.0) and weights[120] == (3, 0, 0.5) and weights[127] == (3, 0, 15 / 16)
    # The first keyframe past frame 0: the frames before it come from the last one, a period earlier.
    early = parse_prompt_schedule({"4": "A", "20": "B"}, 32, hold=0.5, loop=True).frame_weights(32)
    assert early[:4] == [(1, 0, 0.5), (1, 0, 0.625), (1, 0, 0.75), (1, 0, 0.875)] and early[4] == (0, 0, 0.0)
    # Without loop the ends hold; a hold of 1 keeps each prompt to the frame before the next; round() halves to even.
    held = parse_prompt_schedule({"0": "A", "8": "B"}, 12, hold=1.0).frame_weights(12)
    assert held[:8] == [(0, 0, 0.0)] * 8 and held[8:] == [(1, 1, 0.0)] * 4
    assert parse_prompt_schedule({"0": "A", "5": "B"}, 6, hold=0.5).frame_weights(6)[3] == (0, 1, 1 / 3)
    for hold, loop, message in [(1.5, False, "prompt_hold is the share"), (0.5, "yes", "prompt_loop is true or false")]:
        with pytest.raises(KinemaError, match=message):
            parse_prompt_schedule({"0": "A"}, 4, hold=hold, loop=loop)
