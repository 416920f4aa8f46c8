"""kinema.eval.prompts: the checks of a prompt file, and the shipped synthetic set against the synthetic world's own
ground truth (kinema.data.synth)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kinema.data import synth
from kinema.errors import KinemaError
from kinema.eval.prompts import (
    COLOR_NAMES,
    DEFAULT_PROMPTS,
    HELD_OUT_COMBINATIONS,
    MOTION_NAMES,
    SHAPE_NAMES,
    SYNTH_PROMPT_SEED,
    read_prompts,
    write_synth_prompt_set,
)

GOOD = {"prompt": "a red circle moving right", "color": "red", "shape": "circle", "motion": "right"}


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_label_names_are_the_synthetic_worlds():
    assert COLOR_NAMES == tuple(synth.COLOURS)
    assert SHAPE_NAMES == synth.SHAPES
    assert MOTION_NAMES == synth.MOTIONS


def test_a_good_file_reads_with_images_relative_to_it(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "start.png")
    path = write_lines(tmp_path / "set.jsonl", GOOD, "", {**GOOD, "image": "pics/start.png", "seed": 4,
                                                          "held_out": True, "source": "mine"})
    first, second = read_prompts(path)
    assert (first.mode, first.image, first.seed, first.held_out, first.line) == ("text-to-video", None, None, False, 1)
    assert second.image == (tmp_path / "pics" / "start.png").resolve() and second.mode == "image-to-video"
    assert (second.seed, second.held_out, second.line) == (4, True, 3)
    assert second.labels == {"color": "red", "shape": "circle", "motion": "right"}


def test_line_separators_inside_a_json_string_do_not_end_its_line(tmp_path):
    path = tmp_path / "set.jsonl"
    text = json.dumps({**GOOD, "prompt": "a red circle\u2028moving\x85right"}, ensure_ascii=False)
    path.write_text(text + "\r\n" + json.dumps({**GOOD, "seed": 1}) + "\n", encoding="utf-8")
    first, second = read_prompts(path)
    assert first.prompt == "a red circle\u2028moving\x85right" and (first.line, second.line) == (1, 2)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a red circle", "color": "red",', r"line 1: not valid JSON at column .*; each line holds one prompt"),
    ({**GOOD, "color": "pink"}, " line 1: unknown color 'pink'; choose one of red, green, blue"),
    ({**GOOD, "motion": "spin"}, " line 1: unknown motion 'spin'; choose one of left, right"),
    ({**{k: v for k, v in GOOD.items() if k != "color"}, "colour": "red"},
     " line 1: unknown key 'colour'; write 'color'"),
    ({k: v for k, v in GOOD.items() if k != "shape"}, " line 1: missing 'shape'; every line needs"),
    ({**GOOD, "motion": "rotate_cw"}, " line 1: a circle cannot show rotate_cw"),
    ({**GOOD, "image": "missing.png"}, " line 1: no such image missing.png"),
    ({**GOOD, "seed": -1}, " line 1: \"seed\" must be a whole number from 0 to 2\\*\\*64 - 1, got -1"),
    ({**GOOD, "seed": 2**64}, f" line 1: \"seed\" must be a whole number from 0 to 2\\*\\*64 - 1, got {2**64}"),
    ({**GOOD, "held_out": "yes"}, " line 1: \"held_out\" must be true or false"),
    ([1, 2], " line 1 holds an array, not a prompt object"),
    ("[" * 100_000 + "]" * 100_000, " line 1: JSON nested too deeply to read; each line holds one prompt"),
])
def test_a_bad_line_is_one_error_naming_file_line_and_fix(tmp_path, line, message):
    path = write_lines(tmp_path / "set.jsonl", line)
    with pytest.raises(KinemaError) as error:
        read_prompts(path)
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(path)) and re.search(message, text), text


def test_a_start_image_that_is_a_folder_or_not_an_image_is_named_with_its_line(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "notes.png").write_text("not an image\n")
    path = write_lines(tmp_path / "set.jsonl", GOOD, {**GOOD, "image": "pics"})
    with pytest.raises(KinemaError, match=r'line 2: "image" pics is a folder \(.*pics\); give an image file$'):
        read_prompts(path)
    path = write_lines(tmp_path / "set.jsonl", {**GOOD, "image": "notes.png"})
    with pytest.raises(KinemaError, match=r"line 1: the start image .*notes.png is not an image.*; give a PNG, JPEG, "
                                          r"WebP or GIF file$"):
        read_prompts(path)


def test_a_start_image_path_with_a_nul_or_of_a_device_is_named_as_such(tmp_path):
    path = write_lines(tmp_path / "set.jsonl", {**GOOD, "image": "a\0b.png"})
    with pytest.raises(KinemaError, match=r'line 1: "image" holds a NUL character, which no path can; give a path '
                                          r"without it$"):
        read_prompts(path)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    path = write_lines(tmp_path / "set.jsonl", {**GOOD, "image": "zero.png"})
    with pytest.raises(KinemaError, match=r'line 1: "image" zero.png is not a regular file \(/dev/zero: a device, '
                                          r"pipe or socket\); give an image file$"):
        read_prompts(path)


def test_a_line_making_the_same_video_as_an_earlier_one_is_refused(tmp_path):
    spaced = {**GOOD, "prompt": "  " + GOOD["prompt"].replace(" ", "   ")}  # the seed reads it as GOOD's
    path = write_lines(tmp_path / "set.jsonl", GOOD, {**GOOD, "seed": 3}, "", spaced)
    with pytest.raises(KinemaError, match=r"set\.jsonl line 4: the same prompt, start image and seed as line 1, so the "
                                          r"same video, which would be scored twice; drop one line"):
        read_prompts(path)
    # Another seed, or the same seed given, is another video.
    path = write_lines(tmp_path / "set.jsonl", GOOD, {**GOOD, "seed": 3}, {**GOOD, "seed": 4})
    assert len(read_prompts(path)) == 3
    path = write_lines(tmp_path / "set.jsonl", {**GOOD, "seed": 3}, {**GOOD, "color": "blue", "seed": 3})
    with pytest.raises(KinemaError, match="line 2: the same prompt, start image and seed as line 1"):
        read_prompts(path)


def test_the_line_number_counts_blank_lines(tmp_path):
    path = write_lines(tmp_path / "set.jsonl", GOOD, "", {**GOOD, "shape": "hexagon"})
    with pytest.raises(KinemaError, match=r"set\.jsonl line 3: unknown shape 'hexagon'"):
        read_prompts(path)


def test_a_missing_or_empty_file(tmp_path):
    with pytest.raises(KinemaError, match="no such prompt file"):
        read_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(KinemaError, match="holds no prompts"):
        read_prompts(write_lines(tmp_path / "empty.jsonl", ""))


def test_shipped_set_covers_every_label_and_each_held_out_combination():
    entries = read_prompts(DEFAULT_PROMPTS)
    assert 60 <= len(entries) <= 80
    main = [entry for entry in entries if not entry.held_out]
    for key, names in (("color", COLOR_NAMES), ("shape", SHAPE_NAMES), ("motion", MOTION_NAMES)):
        assert set(Counter(getattr(entry, key) for entry in main)) == set(names), key
    combos = Counter((entry.color, entry.shape, entry.motion) for entry in entries if entry.held_out)
    assert set(combos) == set(HELD_OUT_COMBINATIONS)
    assert not [entry for entry in main if (entry.color, entry.shape, entry.motion) in HELD_OUT_COMBINATIONS]
    assert sum(entry.image is not None for entry in entries) >= 4
    assert len({entry.prompt for entry in entries}) >= 0.9 * len(entries)  # varied phrasings, few repeats


def test_shipped_set_is_the_synthetic_worlds_ground_truth():
    """Each line is the caption and labels of the synth clip its source names (seed 9001, never a training seed);
    each start image is that clip's first frame."""
    for entry in read_prompts(DEFAULT_PROMPTS):
        seed, index = map(int, re.fullmatch(r"synth (\d+):(\d+)", entry.source or "").groups())
        assert seed == SYNTH_PROMPT_SEED == 9001
        clip = synth.synth_clip(seed, index)
        truth = clip.ground_truth
        assert (entry.prompt, entry.color, entry.shape, entry.motion) == (clip.text, truth["colour"], truth["shape"],
                                                                          truth["motion"])
        if entry.image is not None:
            assert np.array_equal(np.asarray(Image.open(entry.image).convert("RGB")), clip.frames[0])


@pytest.mark.slow
def test_the_shipped_set_is_what_write_synth_prompt_set_makes(tmp_path):
    """About 20 s: renders the ~750 synth clips the builder looks through."""
    written = write_synth_prompt_set(tmp_path / "set")
    assert written.read_text() == DEFAULT_PROMPTS.read_text()
    for name in sorted((tmp_path / "set" / "images").iterdir()):
        assert name.read_bytes() == (DEFAULT_PROMPTS.parent / "images" / name.name).read_bytes()


def test_kinema_data_prompts_writes_a_set_of_the_seed_asked_for(tmp_path, capsys):
    """`kinema data prompts --seed 31337`: every line is the caption and labels of a clip of that seed (read back
    through synth_clip, not the builder), with the shipped set's make-up, and a second run needs --overwrite."""
    from kinema.cli import main

    out = tmp_path / "set"
    assert main(["data", "prompts", "--out", str(out), "--seed", "31337"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 70 prompts (6 image-to-video, 16 held out) to {out}")
    entries = read_prompts(out / "synth.jsonl")
    for entry in entries:
        seed, index = map(int, re.fullmatch(r"synth (\d+):(\d+)", entry.source or "").groups())
        clip = synth.synth_clip(seed, index)
        truth = clip.ground_truth
        assert seed == 31337 and (entry.prompt, entry.color, entry.shape, entry.motion) == (
            clip.text, truth["colour"], truth["shape"], truth["motion"])
        if entry.image is not None:
            assert np.array_equal(np.asarray(Image.open(entry.image).convert("RGB")), clip.frames[0])
    held = Counter((e.color, e.shape, e.motion) for e in entries if e.held_out)
    assert held == Counter({tuple(combo): 2 for combo in HELD_OUT_COMBINATIONS})
    assert main(["data", "prompts", "--out", str(out), "--seed", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    # The seed the bundled models trained on makes a set, with one warning that they have seen its prompts.
    assert main(["data", "prompts", "--out", str(tmp_path / "seen"), "--seed", "11"]) == 0
    assert "seed 11 is the synthetic data the bundled models trained on" in capsys.readouterr().err
