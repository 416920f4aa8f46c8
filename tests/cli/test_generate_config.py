"""`kinema generate --config`: a prompt config run on the bundled kinema-tiny writes a folder whose config.yaml, run
again, makes the same frames (compared exactly as they go to the encoder); bad usage is refused in one line (exit 2)
before any model loads."""

import numpy as np
import pytest
import yaml

from kinema.cli import main
from kinema.data.probe import read_sidecar
from kinema.data.video_io import read_video

CONFIG = """\
- name: shapes
  model: kinema-tiny
  seed: [-1, 10788741199826055526]  # AnimateDiff's published seed: above 2**63
  guidance_scale: 6
  L: 8
  prompt:
    - "a red circle moving right"
    - "a blue square moving up"
  n_prompt: [""]
"""


def frames_by_folder(out):
    return {path.relative_to(out): read_video(path).frames.numpy() for path in sorted(out.glob("*/*.mp4"))}


def test_a_written_config_makes_the_same_frames_again(tmp_path, capsys, encoded_frames):
    # Compared exactly as they go to the encoder; the decoded files only to within libx264's one level.
    (tmp_path / "shapes.yaml").write_text(CONFIG)
    first, again = tmp_path / "first", tmp_path / "again"
    # --steps is set for every entry and written into config.yaml, so the rerun needs no options.
    assert main(["generate", "--config", str(tmp_path / "shapes.yaml"), "-o", str(first), "--steps", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 3 and f"wrote {first / 'config.yaml'}" in out
    used = yaml.safe_load((first / "config.yaml").read_text())
    [entry] = used
    drawn, fixed = entry["seed"]
    assert fixed == 10788741199826055526 and isinstance(drawn, int) and entry["steps"] == 2
    videos = frames_by_folder(first)
    assert sorted(map(str, videos)) == [f"01-shapes-01-a-red-circle-moving-right/video-seed{drawn}.mp4",
                                        "01-shapes-02-a-blue-square-moving-up/video-seed10788741199826055526.mp4"]
    for path in videos:
        assert read_sidecar(first / path)["steps"] == 2

    assert main(["generate", "--config", str(first / "config.yaml"), "-o", str(again), "--quiet"]) == 0
    rerun = frames_by_folder(again)
    assert rerun.keys() == videos.keys()
    assert sorted(encoded_frames) == sorted(path.name for path in videos)
    assert all(len(runs) == 2 and np.array_equal(*runs) for runs in encoded_frames.values())
    for path in videos:
        assert np.abs(videos[path].astype(int) - rerun[path].astype(int)).max() <= 1


ELSE = " (docs/configs.md lists them), or run without --config"


@pytest.mark.parametrize(("argv", "message"), [
    (["a red circle"], "give PROMPT or --config, not both (a config file holds its prompts)"),
    (["--seed", "3"], "--seed cannot be combined with --config; set it in the config file where it has a key "
                      "(docs/configs.md lists them), or run without --config"),
    # Given at the value they take when left out, they are still given (and would be ignored otherwise).
    (["--seed", "0"], f"--seed cannot be combined with --config; set it in the config file where it has a key{ELSE}"),
    (["--negative", ""], f"--negative cannot be combined with --config; set it in the config file where it has a key"
                         f"{ELSE}"),
    (["--interpolation", "linear"], "--interpolation cannot be combined with --config; set it in the config file "
                                    f"where it has a key{ELSE}"),
    (["--decode-chunk", "16"], "--decode-chunk cannot be combined with --config; set it in the config file where it "
                               f"has a key{ELSE}"),
    (["--model", "kinema-tiny"], "--model cannot be combined with --config; set it in the config file where it has a "
                                 f"key{ELSE}"),
    (["--print-schedule"], "--print-schedule shows one PROMPT's schedule; it cannot be combined with --config"),
    (["-o", "clip.mp4"], "with --config, -o names a folder (one subfolder per prompt), not clip.mp4"),
])
def test_options_that_belong_in_the_file_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes.yaml").write_text(CONFIG)
    assert main(["generate", "--config", "shapes.yaml", *argv]) == 2
    assert capsys.readouterr().err == f"kinema generate: error: {message}\n"


def test_a_malformed_file_or_a_folder_kinema_did_not_write_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("- prompt: [a cat\n  steps: 2\n")
    assert main(["generate", "--config", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kinema generate: error: bad.yaml is not valid YAML (")
    assert "at line 2 column 8)" in err  # the colon of "  steps: 2", where the unclosed list breaks
    assert main(["generate", "--config", "missing.yaml"]) == 2
    assert capsys.readouterr().err == "kinema generate: error: no such config file: missing.yaml\n"
    (tmp_path / "shapes.yaml").write_text(CONFIG)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["generate", "--config", "shapes.yaml", "-o", "mine"]) == 2
    assert "mine already exists and kinema did not write it" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert "give a PROMPT (or a prompt config with --config FILE.yaml)" in capsys.readouterr().err


def test_the_help_explains_config(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config FILE.yaml run a prompt config instead of PROMPT" in text and "docs/configs.md" in text


def test_freeu_applies_to_every_entry_as_the_files_mapping(tmp_path, monkeypatch):
    from kinema.cli import build_parser
    from kinema.pipelines.request import FreeUSettings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ad.yaml").write_text("- model: kinema-tiny-ad\n  prompt: [a red circle, a blue square]\n")
    args = build_parser().parse_args(["generate", "--config", "ad.yaml", "--freeu", "1.2,1.4,0.9,0.2"])
    args.check(args)
    run = args.config_run
    assert [r.job.request.freeu for r in run.runs] == [FreeUSettings(1.2, 1.4, 0.9, 0.2)] * 2
    assert run.used[0]["freeu"] == {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}  # what config.yaml records
