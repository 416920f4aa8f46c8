import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kinema.cli import main
from kinema.data.synth import SynthMotionDataset
from kinema.data.video_io import read_video, to_uint8_frames


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def test_data_synth_50_clips_decode_back_above_35_db(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--n", "50", "--seed", "0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"wrote 50 entries (50 videos, 0 images) to {out} in ")
    entries = json.loads((out / "metadata.json").read_text())
    assert [e["file_path"] for e in entries] == [f"videos/{i:04d}.mp4" for i in range(50)]
    dataset = SynthMotionDataset(50, seed=0)
    scores = []
    for index, entry in enumerate(entries):
        clip = read_video(out / entry["file_path"])
        assert clip.fps == 8
        rendered = dataset.clip(index)
        assert entry["text"] == rendered.text
        scores.append(psnr_uint8(to_uint8_frames(clip.frames), rendered.frames))
    assert min(scores) >= 35.0, f"worst clip {int(np.argmin(scores))} at {min(scores):.2f} dB"


@pytest.mark.parametrize("args", [
    ["--n", "0"], ["--n", "-3"], ["--n", "x"], ["--frames", "0"], ["--frames", "-1"], ["--frames", "1"],
    ["--size", "0"], ["--size", "-16"], ["--size", "40"], ["--fps", "0"], ["--image-fraction", "2"],
])
def test_bad_numbers_exit_2(tmp_path, capsys, args):
    base = {"--out": str(tmp_path / "d"), "--n": "2"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    try:  # argparse's own type checks exit; the combined checks (kinema.data.synth_limits) return 2
        code = main(["data", "synth", *[part for pair in base.items() for part in pair]])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert f"argument {args[0]}" in err or args[0].strip("-").split("-")[0].replace("fps", "") in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--seed", "-5"], "argument --seed: must be from 0 to 2**64 - 1, got -5"),
    (["--seed", str(2**64)], f"argument --seed: must be from 0 to 2**64 - 1, got {2**64}"),
    (["--fps", "5000"], "argument --fps: must be from 1 to 1000 frames per second, got 5000"),
    (["--size", "6400"], "16 frames of 6400x6400 is past the synthetic clips' limits of size <= 1024 and frames "
                         "<= 1024"),
    (["--frames", "5000"], "5000 frames of 64x64 is past the synthetic clips' limits"),
    (["--frames", "1024", "--size", "1024"], "1024 frames of 1024x1024 would need about 12.0 GiB per clip while "
                                             "rendering, over the limit of 4 GiB"),
])
def test_bad_usage_exits_2_at_once_before_heavy_imports(tmp_path, args, message):
    """Run in a fresh interpreter so the modules already imported by other tests do not hide a heavy import."""
    code = ("import sys; from kinema.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'numpy', 'av', 'diffusers') if m in sys.modules]; "
            "print('heavy:', heavy); sys.exit(rc)")
    try_args = ["data", "synth", "--out", str(tmp_path / "d"), "--n", "2", *args]
    done = subprocess.run([sys.executable, "-c", code, *try_args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "heavy: []" in done.stdout or done.stdout == ""  # argparse exits before the print
    assert not (tmp_path / "d").exists()


def test_inspect_a_missing_path_exits_before_diffusers_is_imported(tmp_path):
    code = ("import sys; from kinema.cli import main; rc = main(['inspect', sys.argv[1]]); "
            "print('diffusers' in sys.modules, 'torch' in sys.modules); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.ckpt")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"kinema inspect: error: no such file or folder: {tmp_path / 'missing.ckpt'}\n"
    assert done.stdout == "False False\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_is_accepted_before_or_after_the_subcommand(tmp_path, capsys, where):
    target = tmp_path / "taken"
    target.write_text("x")
    args = ["inspect", str(target)]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("kinema inspect: error: ")


def test_data_needs_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data"])
    assert exit_info.value.code == 2


def test_out_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    assert main(["data", "synth", "--out", str(target), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == f"kinema data synth: error: {target} is a file; give a folder path for the synth dataset\n"
    assert target.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_out_is_someone_elses_folder_exits_2_and_leaves_it(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    assert main(["data", "synth", "--out", str(mine), "--n", "2", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kinema did not write it (it holds thesis.tex)" in err
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_installed_kinema_entry_point(tmp_path):
    exe = Path(sys.executable).parent / "kinema"
    out = tmp_path / "set"
    done = subprocess.run([str(exe), "data", "synth", "--out", str(out), "--n", "3", "--frames", "4", "--size", "32",
                           "--image-fraction", "0.5", "--seed", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    entries = json.loads((out / "metadata.json").read_text())
    assert len(entries) == 3 and done.stdout.startswith("wrote 3 entries")
    dataset = SynthMotionDataset(3, seed=2, frames=4, size=32, image_fraction=0.5)
    assert [e["type"] for e in entries] == [dataset[i]["type"] for i in range(3)]
    bad = subprocess.run([str(exe), "data", "synth", "--out", str(out / "metadata.json"), "--n", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "metadata.json is a file" in bad.stderr


@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["inspect", "--help"], ["data", "synth", "--help"],
                                  ["doctor", "--help"]])
def test_help_imports_no_torch(args):
    """`--to`'s choices come from the format registry, which must stay plain data for this."""
    code = ("import sys; from kinema.cli import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
            "print([m for m in ('torch', 'numpy', 'av', 'diffusers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"
    assert "usage: kinema" in done.stdout
