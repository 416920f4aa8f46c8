"""`evaluate` and `kinema eval` end to end on the tiny random-weight V3 folder (tests/conftest.py `v3_model`): the
accuracies are whatever random weights give, so these check the report's structure, that the detectors and metrics
ran on every video, the counts, and the files written."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kinema.cli import main
from kinema.data.synth import synth_clip
from kinema.errors import KinemaError
from kinema.eval.run import confusion_matrix, continuation_boundaries, evaluate, format_report

LABEL_KEYS = ("color", "shape", "motion")


@pytest.fixture
def two_prompts(tmp_path) -> Path:
    """An image-to-video line (a synth first frame) and a held-out text-to-video line."""
    clip = synth_clip(9001, 1, frames=8)
    Image.fromarray(clip.frames[0]).save(tmp_path / "start.png")
    truth = clip.ground_truth
    lines = [{"prompt": clip.text, "color": truth["colour"], "shape": truth["shape"], "motion": truth["motion"],
              "image": "start.png"},
             {"prompt": "a red triangle moving left", "color": "red", "shape": "triangle", "motion": "left",
              "held_out": True, "seed": 3}]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_evaluate_scores_every_prompt_and_writes_the_report(tmp_path, v3_model, two_prompts):
    out = tmp_path / "out"
    report = evaluate(str(v3_model), two_prompts, frames=8, steps=2, progress=False, out_dir=out,
                      continuation=False)
    data = report.as_dict()
    assert (data["n"], data["held_out"]["n"], data["held_out_in_main"], len(data["per_prompt"])) == (1, 1, False, 2)
    image_row, held_row = data["per_prompt"]
    assert (image_row["mode"], held_row["mode"], held_row["seed"]) == ("image-to-video", "text-to-video", 3)
    for row in data["per_prompt"]:
        assert set(row["detected"]) == set(LABEL_KEYS)  # the detectors ran: labels, or none with the reason
        assert all(value is not None for value in row["detected"].values()) or row["detector_error"]
        assert row["correct"] == {key: row["detected"][key] == row["expected"][key] for key in LABEL_KEYS}
        assert 0 <= row["flicker"] <= 1 and row["flow_magnitude"] >= 0 and isinstance(row["dynamic"], bool)
    assert data["color_acc"] == float(image_row["correct"]["color"])
    assert data["held_out"]["motion_acc"] == float(held_row["correct"]["motion"])
    assert image_row["psnr"] > 0 and data["i2v_psnr"] == image_row["psnr"] and held_row["psnr"] is None
    assert image_row["jump"] > 0 and data["i2v_jump"] == image_row["jump"] and held_row["jump"] is None
    assert data["seam_score"] is None and data["continuation"] is None
    assert data["settings"]["height"] == data["settings"]["width"] == 64  # the model's native size (8 latents x 8)
    assert data["files"] == sorted(["confusion-color.png", "confusion-motion.png", "confusion-shape.png",
                                    "report.json"])
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(data))
    for key in LABEL_KEYS:
        with Image.open(out / f"confusion-{key}.png") as png:
            assert png.width > 200 and png.height > 200
    assert (out / "kinema-output.json").is_file()  # kinema's mark: --overwrite may replace it later
    # What running it again needs: the exact prompt file, the lines scored, where and in what precision it ran.
    settings = data["settings"]
    assert settings["prompts_sha256"] == hashlib.sha256(two_prompts.read_bytes()).hexdigest()
    assert (settings["limit"], settings["device"], settings["dtype"]) == (None, "cpu", "float32")
    assert settings["kinema_version"] and settings["held_out_from"] == "prompt file"  # v3_model has no kinema.json
    assert data["prompts"] == str(two_prompts.resolve()) and data["out_dir"] == str(out.resolve())


def test_start_images_are_inputs_and_their_videos_name_them(tmp_path, v3_model, two_prompts):
    out = tmp_path / "out"
    evaluate(str(v3_model), two_prompts, frames=8, steps=1, progress=False, out_dir=out, continuation=False,
             limit=1, save_videos=True)
    [video] = sorted((out / "videos").glob("*.mp4"))
    settings = json.loads(video.with_name(video.name + ".json").read_text())
    assert settings["image"] == str((tmp_path / "start.png").resolve()) and settings["resize"] is True
    # A start image inside the output folder is an input: --overwrite does not replace the folder holding it.
    shutil.copy(tmp_path / "start.png", out / "start.png")
    inside = tmp_path / "inside.jsonl"
    inside.write_text(json.dumps({"prompt": "a red circle moving right", "color": "red", "shape": "circle",
                                  "motion": "right", "image": "out/start.png"}) + "\n")
    with pytest.raises(KinemaError, match="holds the input"):
        evaluate(str(v3_model), inside, frames=8, steps=1, progress=False, out_dir=out, overwrite=True,
                 continuation=False)
    assert (out / "start.png").is_file()


def test_the_models_held_out_list_decides_which_lines_are_held_out(tmp_path, v3_model, caplog):
    model = tmp_path / "model"
    shutil.copytree(v3_model, model)
    (model / "kinema.json").write_text(json.dumps({"held_out": [["blue", "square", "up"]]}))
    lines = [{"prompt": "a blue square moving up", "color": "blue", "shape": "square", "motion": "up"},
             {"prompt": "a red circle moving left", "color": "red", "shape": "circle", "motion": "left",
              "held_out": True}]
    path = tmp_path / "marked.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with caplog.at_level("WARNING", logger="kinema.eval.run"):
        report = evaluate(str(model), path, frames=8, steps=1, progress=False, continuation=False)
    assert [row["held_out"] for row in report.per_prompt] == [True, False]
    assert (report.n, report.held_out["n"], report.settings["held_out_from"]) == (1, 1, "kinema.json")
    assert "marks 2 line(s) held out otherwise than" in caplog.text and "(line 1, 2)" in caplog.text


def test_continuation_boundaries():
    # 16 frames extended to 128 in 16-frame segments overlapping by 4: each segment adds 12 new frames
    assert continuation_boundaries(16, 128, 16, 4) == [16, 28, 40, 52, 64, 76, 88, 100, 112, 124]
    assert continuation_boundaries(8, 16, 8, 4) == [8, 12]
    assert continuation_boundaries(8, 8, 8, 4) == []


def test_confusion_matrix_counts_and_missing_detections():
    matrix = confusion_matrix(["a", "a", "b", "b"], ["a", "b", "b", None], ["a", "b"])
    assert matrix == [[1, 1, 0], [0, 1, 1]]


def test_cli_json_is_the_last_line_and_continuation_seams_are_scored(tmp_path, v3_model, two_prompts, capsys):
    code = main(["eval", "--model", str(v3_model), "--prompts", str(two_prompts), "--json", "--steps", "1",
                 "--frames", "8", "--limit", "1", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["n"] == 1 and len(data["per_prompt"]) == 1
    # the only line is image-to-video: nothing to continue
    assert data["continuation"] is None

    report = evaluate(str(v3_model), write_t2v(tmp_path), frames=8, steps=1, progress=False,
                      continuation_frames=16)
    continued = report.continuation
    assert continued is not None and continued["frames"] == 16 and continued["boundaries"] == [8, 12]
    assert continued["segments"] == 2 and report.seam_score == continued["seam_score"] > 0
    assert 0 < continued["overlap_psnr"] <= 100 and "held frames kept" in format_report(report)


def test_several_continuations_report_their_mean_seam(tmp_path, v3_model, caplog):
    lines = [{"prompt": "a blue square moving up", "color": "blue", "shape": "square", "motion": "up"},
             {"prompt": "a red circle moving left", "color": "red", "shape": "circle", "motion": "left"},
             {"prompt": "a green triangle growing", "color": "green", "shape": "triangle", "motion": "grow"}]
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = evaluate(str(v3_model), path, frames=8, steps=1, progress=False, continuation_frames=16,
                      continuations=2)
    assert [entry["prompt"] for entry in report.continuations] == [line["prompt"] for line in lines[:2]]
    assert report.continuation == report.continuations[0]
    scores = [entry["seam_score"] for entry in report.continuations]
    assert report.seam_score == pytest.approx(sum(scores) / 2, abs=1e-4)
    assert "mean of 2 16-frame continuations" in format_report(report)
    assert report.as_dict()["continuations"] == report.continuations
    with caplog.at_level("WARNING", logger="kinema.eval.run"):
        fewer = evaluate(str(v3_model), path, frames=8, steps=1, progress=False, continuation_frames=16, limit=1,
                         continuations=2)
    assert len(fewer.continuations) == 1 and "2 continuations asked for, but the prompts hold 1" in caplog.text
    with pytest.raises(KinemaError, match="continuations must be a whole number of at least 1, got 0"):
        evaluate(str(v3_model), path, continuations=0)


def test_continuations_of_one_prompt_text_get_a_video_each(tmp_path, v3_model, caplog):
    line = {"prompt": "a blue square moving up", "color": "blue", "shape": "square", "motion": "up"}
    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({**line, "seed": 1}) + "\n" + json.dumps({**line, "seed": 2}) + "\n")
    report = evaluate(str(v3_model), path, frames=8, steps=1, progress=False, continuation_frames=16,
                      continuations=2, out_dir=tmp_path / "out", save_videos=True)
    assert [entry["video"] for entry in report.continuations] == [
        "videos/continuation-000-a-blue-square-moving-up.mp4", "videos/continuation-001-a-blue-square-moving-up.mp4"]
    assert all((tmp_path / "out" / entry["video"]).is_file() for entry in report.continuations)
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({**line, "held_out": True}) + "\n")
    with caplog.at_level("WARNING", logger="kinema.eval.run"):
        assert evaluate(str(v3_model), held, frames=8, steps=1, progress=False).continuations == []
    assert "no continuation and so no seam score" in caplog.text


def test_continuations_and_no_continuation_contradict(tmp_path, v3_model, two_prompts, capsys):
    code = main(["eval", "--model", str(v3_model), "--prompts", str(two_prompts), "--continuations", "3",
                 "--no-continuation", "--out", str(tmp_path / "out")])
    assert code == 2 and "contradict each other" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def write_t2v(folder: Path) -> Path:
    path = folder / "t2v.jsonl"
    path.write_text(json.dumps({"prompt": "a blue square moving up", "color": "blue", "shape": "square",
                                "motion": "up"}) + "\n")
    return path


def test_the_models_kinema_json_defaults_are_used(tmp_path, v3_model):
    model = tmp_path / "model"
    shutil.copytree(v3_model, model)
    (model / "kinema.json").write_text(json.dumps({"defaults": {"frames": 8, "steps": 1, "guidance": 2.0}}))
    report = evaluate(str(model), write_t2v(tmp_path), progress=False, continuation=False)
    assert report.settings["frames"] == 8 and report.settings["steps"] == 1 and report.settings["guidance"] == 2.0
    assert report.settings["height"] == 64 and len(report.per_prompt) == 1
    # A given guidance wins over the model's; a bad one is refused before the model loads.
    report = evaluate(str(model), write_t2v(tmp_path), guidance=1.5, progress=False, continuation=False)
    assert report.settings["guidance"] == 1.5 and report.settings["steps"] == 1
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(KinemaError, match="guidance must be a finite number >= 1"):
            evaluate("no-such-model", write_t2v(tmp_path), guidance=bad, progress=False)


def test_a_speed_preset_replaces_the_models_defaults_but_not_given_steps(tmp_path, v3_model, monkeypatch):
    import kinema.pipelines.generation as generate_module
    from kinema.pipelines.speed import chosen_settings

    model = tmp_path / "model"
    shutil.copytree(v3_model, model)
    (model / "kinema.json").write_text(json.dumps({"defaults": {"frames": 8, "steps": 1, "scheduler": "ddim"}}))
    requests = []
    plain = generate_module.generate
    monkeypatch.setattr(generate_module, "generate", lambda family, request, **kw: (requests.append(request),
                                                                                   plain(family, request, **kw))[1])
    report = evaluate(str(model), write_t2v(tmp_path), steps=2, speed="fast", progress=False, continuation=False)
    preset = chosen_settings("fast", {"steps": 2})  # what `kinema generate --speed fast --steps 2` takes
    assert preset and "steps" not in preset
    for key, value in {**preset, "steps": 2, "speed": "fast", "frames": 8}.items():
        assert getattr(requests[0], key) == value, key
        assert report.settings[key] == value, key
    with pytest.raises(KinemaError, match="unknown speed preset 'fastest'"):
        evaluate(str(model), write_t2v(tmp_path), speed="fastest", progress=False)


@pytest.mark.parametrize("case", ["missing", "bad line", "unknown model", "frames", "seed", "reconstructions"])
def test_bad_input_exits_2_before_torch_is_imported(tmp_path, case):
    prompts = tmp_path / "p.jsonl"
    model = []
    if case == "bad line":
        prompts.write_text('{"prompt": "x", "color": "red", "shape": "circle", "motion": "right"}\n{"prompt": \n')
    if case == "unknown model":
        prompts.write_text('{"prompt": "x", "color": "red", "shape": "circle", "motion": "right"}\n')
        model = ["--model", "kinema-huge"]
    if case in ("frames", "seed"):
        prompts.write_text('{"prompt": "x", "color": "red", "shape": "circle", "motion": "right", "seed": 5}\n')
        model = ["--frames", "12"] if case == "frames" else ["--seed", str(2**64 - 5)]
    if case == "reconstructions":  # scores the VAE alone: --out, --prompts and a motion module would do nothing
        model = ["--reconstructions", "2", "--motion-module", "mm.safetensors"]
    code = ("import sys; from kinema.cli import main; rc = main(sys.argv[1:]); "
            "print([m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules]); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "eval", "--prompts", str(prompts), "--out",
                           str(tmp_path / "out"), *model], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    expected = {"missing": "no such prompt file", "bad line": f"{prompts} line 2: not valid JSON",
                "unknown model": "no such model file or folder: kinema-huge; a model is an existing path or a bundled "
                                 "model's name (available: ",
                "frames": "EasyAnimate V3 makes 1 or a multiple of 8 frames; 12 is not: use 8 or 16",
                "seed": f"{prompts}, line 1: its seed plus --seed {2**64 - 5} is {2**64}, over 2**64 - 1 (the largest "
                        "seed); give a smaller --seed",
                "reconstructions": "--reconstructions scores the VAE alone on its own clips, generates nothing and "
                                   "writes nothing, so --prompts, --out, --motion-module would do nothing"}[case]
    assert done.stderr.startswith("kinema eval: error: ") and expected in done.stderr
    assert done.stderr.count("\n") == 1 and done.stdout.strip() == "[]"
    assert not (tmp_path / "out").exists()


def test_help_teaches_with_an_example_and_imports_no_torch():
    code = ("import sys; from kinema.cli import main\ntry: main(['eval', '--help'])\nexcept SystemExit: pass\n"
            "print([m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "example:\n  kinema eval --model kinema-tiny --json" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_a_motion_module_and_loras_are_scored_on_the_model(tmp_path, monkeypatch, capsys):
    """`kinema eval --motion-module --lora`: the parts reach load_family, the report records them, and the lines
    are held out as the prompt file marks them (the model's kinema.json list is its own weights')."""
    import kinema.pipelines.load as load_module
    from kinema.bundled import bundled_model_path

    module = bundled_model_path("kinema-tiny-ad") / "motion_module.safetensors"
    seen = []
    real = load_module.load_family

    def spy(model, **kwargs):
        seen.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(load_module, "load_family", spy)
    report = evaluate("kinema-tiny-ad", write_t2v(tmp_path), frames=8, steps=1, progress=False, continuation=False,
                      motion_module=str(module))
    assert seen[0]["motion_module"] == str(module) and seen[0]["loras"] == []
    assert report.settings["motion_module"] == str(module) and report.settings["held_out_from"] == "prompt file"
    assert report.model == "kinema-tiny-ad" and report.settings["continuations"] == 0
    monkeypatch.chdir(module.parent)  # given relative, recorded absolute: report.json runs again from anywhere
    report = evaluate(".", write_t2v(tmp_path), frames=8, steps=1, progress=False, continuation=False,
                      motion_module=module.name, limit=1)
    assert (report.model, report.settings["motion_module"]) == (str(module.parent), str(module))
    assert main(["eval", "--model", "kinema-tiny", "--motion-module", str(module), "--prompts",
                 str(write_t2v(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert "is an EasyAnimate model, which has its own motion layers: drop --motion-module" in capsys.readouterr().err
    assert main(["eval", "--model", "kinema-tiny-ad", "--lora", str(tmp_path / "gone.safetensors"), "--prompts",
                 str(write_t2v(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    assert "no such LoRA file:" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_frames_as_many_as_the_continuation_are_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from kinema.pipelines import load as load_module

    monkeypatch.setattr(load_module, "load_family", lambda *a, **k: pytest.fail("loaded"))
    prompts = str(write_t2v(tmp_path))
    assert main(["eval", "--prompts", prompts, "--frames", "128", "--out", str(tmp_path / "out")]) == 2
    assert "the continuation extends the first videos to 128 frames, so they must be shorter; got --frames 128: ask " \
           "for fewer frames, or pass --no-continuation" in capsys.readouterr().err
    with pytest.raises(KinemaError, match="extends the first videos to 64 frames"):
        evaluate("kinema-tiny", prompts, frames=64, continuation_frames=64, progress=False)
    # kinema-tiny-ad's segments overlap by 8 frames (its kinema.json), so 8-frame videos cannot be continued
    assert main(["eval", "--model", "kinema-tiny-ad", "--prompts", prompts, "--frames", "8", "--out",
                 str(tmp_path / "out")]) == 2
    assert "segments of its 8 frames that overlap by 8 (the model's kinema.json default), so the videos need more " \
           "than 8 frames: raise --frames, or pass --no-continuation" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("not a model")
    assert main(["eval", "--model", str(tmp_path / "notes"), "--prompts", prompts, "--no-continuation", "--out",
                 str(tmp_path / "out")]) == 2
    assert f"model {tmp_path / 'notes'}: not a format kinema knows" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
