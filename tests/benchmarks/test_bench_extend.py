"""benchmarks/bench_extend.py: the lengths it measures, the flatness rule and its figures against hand-computed
numbers, each step run through a stand-in `kinema` whose videos are synth clips of known ground truth (so the tail's
detections are checked against the synth generator), its refusal of bad options, and (slow) a `--quick` run on a
tiny V3 folder."""

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from kinema.data.synth import synth_clip
from kinema.data.video_io import write_video

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_extend  # noqa: E402

MIB = 2**20
RED_CIRCLE_RIGHT = (0, 362)  # synth_clip(seed, index) with these labels: the prompt's
GREEN_SQUARE_UP = (0, 81)

# A stand-in for `kinema generate` / `kinema extend`: logs its arguments and copies the video prepared for the
# length asked (videos/F.mp4) to -o, with a settings sidecar holding a run report as kinema's does.
FAKE_KINEMA = """
import json, shutil, sys
from pathlib import Path
videos, arguments = Path({videos!r}), sys.argv[1:]
with open(videos / "calls.jsonl", "a") as log:
    log.write(json.dumps(arguments) + "\\n")
out = Path(arguments[arguments.index("-o") + 1])
frames = 16 if arguments[0] == "generate" else 16 + int(arguments[arguments.index("--frames") + 1])
shutil.copy(videos / f"{{frames}}.mp4", out)
report = {{"frames": frames, "peak_memory_bytes": (100 + frames) * 2**20, "segments": -(-(frames - 16) // 12) or None}}
out.with_name(out.name + ".json").write_text(json.dumps({{"report": report}}))
"""


def options(**changes) -> Namespace:
    return Namespace(**{"quick": False, "model": None, "frames": None, "steps": None, "segment_frames": 16,
                        "work": None, **changes})


def test_lengths_are_a_quarter_a_half_and_the_whole_above_the_clip():
    assert bench_extend.frame_counts(256) == [64, 128, 256]
    assert bench_extend.frame_counts(64) == [32, 64]  # 16 is the clip itself
    assert bench_extend.frame_counts(33) == [33]  # too few to compare: refused below
    assert bench_extend.cases_for([]) == ["generate.16", "extend.64", "extend.128", "extend.256"]
    assert bench_extend.cases_for(["--quick"]) == ["generate.16", "extend.32", "extend.64", "extend.128"]
    assert bench_extend.cases_for(["--quick", "--frames", "64"]) == ["generate.16", "extend.32", "extend.64"]
    assert bench_extend.sampling_steps(options(quick=True)) == 2 and bench_extend.sampling_steps(options()) is None


def test_flat_is_ten_percent_plus_32_mib():
    assert bench_extend.is_flat(500 * MIB, 582 * MIB)  # 1.1 * 500 + 32 = 582
    assert not bench_extend.is_flat(500 * MIB, 582 * MIB + 1)
    assert bench_extend.is_flat(500 * MIB, 400 * MIB)


def clip_frames(which: tuple[int, int]) -> np.ndarray:
    return synth_clip(*which).frames  # (16, 64, 64, 3) uint8


def test_each_step_runs_kinema_and_the_tail_is_read_from_the_longest_video(tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    head, tail = clip_frames(GREEN_SQUARE_UP), clip_frames(RED_CIRCLE_RIGHT)
    write_video(head, videos / "16.mp4", fps=8)
    write_video(np.concatenate([head, tail]), videos / "32.mp4", fps=8)
    write_video(np.concatenate([head, head, head, tail]), videos / "64.mp4", fps=8)
    fake = tmp_path / "fake_kinema.py"
    fake.write_text(FAKE_KINEMA.format(videos=str(videos)))
    monkeypatch.setattr(bench_extend, "kinema_command", lambda: [sys.executable, str(fake)])
    work = tmp_path / "work"
    work.mkdir()
    run = options(frames=64, steps=3, model="kinema-tiny-ad", work=str(work))

    cases = {case: bench_extend.measure(case, run) for case in bench_extend.cases_for(["--frames", "64"])}
    calls = [json.loads(line) for line in (videos / "calls.jsonl").read_text().splitlines()]
    clip = str(work / "clip.mp4")
    assert calls == [
        ["generate", bench_extend.PROMPT, "--model", "kinema-tiny-ad", "--steps", "3", "-o", clip],
        ["extend", clip, "--frames", "16", "--segment-frames", "16", "--model", "kinema-tiny-ad", "--steps", "3",
         "-o", str(work / "extended-32.mp4")],
        ["extend", clip, "--frames", "48", "--segment-frames", "16", "--model", "kinema-tiny-ad", "--steps", "3",
         "-o", str(work / "extended-64.mp4")]]
    assert cases["extend.64"]["segments"] == 4 and cases["extend.32"]["generate_peak"] == 132 * MIB
    assert "detect" not in cases["extend.32"]  # only the longest video's tail is read

    summary = bench_extend.summarize(cases, run)
    # The synth generator's ground truth: the head clip is a green square moving up, the tail a red circle moving
    # right (the prompt's labels).
    assert summary["head_detect"] == {"color": "green", "shape": "square", "motion": "up"}
    assert summary["tail_detect"] == summary["prompt_labels"] == {"color": "red", "shape": "circle", "motion": "right"}
    assert summary["tail_matches"] == {"color": True, "shape": True, "motion": True}
    assert summary["keeps_colour_and_shape"] is True
    assert summary["generate_peak_mb_by_frames"] == {"32": 132.0, "64": 164.0}
    assert summary["segments_by_frames"] == {"32": 2, "64": 4}
    assert set(summary["peak_rss_mb_by_frames"]) == set(summary["wall_s"]) == {"32", "64"}


def extend_figures(seconds: float, peak_mib: float, frames: int, **more) -> dict:
    return {"seconds": seconds, "peak_rss": int(peak_mib * MIB), "frames": frames,
            "generate_peak": int((peak_mib - 50) * MIB), "segments": -(-(frames - 16) // 12), **more}


def test_summary_equals_hand_computed_numbers():
    tail = {"color": "red", "shape": "square", "motion": "still"}
    cases = {"generate.16": {"seconds": 10.0, "peak_rss": 480 * MIB, "frames": 16,
                             "detect": {"color": "red", "shape": "circle", "motion": "right"}},
             "extend.64": extend_figures(20.0, 500, 64), "extend.128": extend_figures(30.0, 520, 128),
             "extend.256": extend_figures(50.5, 583, 256, detect=tail)}
    summary = bench_extend.summarize(cases, options())
    assert summary["peak_rss_mb_by_frames"] == {"64": 500.0, "128": 520.0, "256": 583.0}
    assert summary["flat"] is False  # 583 > 1.1 * 500 + 32
    assert summary["peak_growth_mb"] == 83.0 and summary["peak_ratio"] == 1.166
    assert summary["wall_s"] == {"64": 20.0, "128": 30.0, "256": 50.5} and summary["wall_s_total"] == 110.5
    assert summary["tail_matches"] == {"color": True, "shape": False, "motion": False}
    assert summary["keeps_colour_and_shape"] is False
    assert summary["segments_by_frames"] == {"64": 4, "128": 10, "256": 20}
    assert summary["settings"]["frame_counts"] == [64, 128, 256] and summary["settings"]["segment_frames"] == 16
    cases["extend.256"] = extend_figures(50.5, 582, 256, detect=tail)
    assert bench_extend.summarize(cases, options())["flat"] is True


@pytest.mark.parametrize("arguments, message", [(["--frames", "33"], "--frames must be at least 34"),
                                                (["--segment-frames", "4"], "--segment-frames above"),
                                                (["--model", "/no/such/model"], "no such model")])
def test_bad_options_stop_before_any_case(arguments, message):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_extend.py"), "--quick", *arguments],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stdout == ""  # no case ran
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr


@pytest.mark.slow  # a tiny V3 folder (with the CLIP image encoder extend conditions on), four kinema processes
def test_quick_run_on_a_tiny_v3_folder(tmp_path):
    from tiny_easyanimate import source_model, write_full_folder

    model = tmp_path / "tiny-v3"
    write_full_folder(model, source_model(), with_image_encoder=True)
    (model / "kinema.json").write_text(json.dumps({"defaults": {"height": 64, "width": 64, "frames": 16}}))
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_extend.py"), "--quick", "--frames", "64",
                           "--model", str(model)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["generate.16", "extend.32", "extend.64"]
    result = json.loads(lines[-1])
    assert result["segments_by_frames"] == {"32": 2, "64": 4}  # 12 new frames per 16-frame segment
    peaks = result["peak_rss_mb_by_frames"]
    assert result["flat"] == (peaks["64"] <= 1.1 * peaks["32"] + 32)
    assert set(result["tail_detect"]) == {"color", "shape", "motion"}
    assert result["settings"]["steps"] == 2
