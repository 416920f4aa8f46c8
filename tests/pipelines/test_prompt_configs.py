"""kinema.pipelines.prompt_configs: AnimateDiff and prompt-travel config files read into the jobs their keys mean
(checked against requests written out by hand from AnimateDiff's rules), one-line refusals before any model loads,
and every shipped example: the kinema-tiny ones run, the SD1.5 one is refused only for its missing weights."""

import json
import logging
from pathlib import Path

import pytest
import yaml

from kinema.errors import KinemaError
from kinema.pipelines.jobs import FamilyCache
from kinema.pipelines.prompt_configs import read_config, run_config
from kinema.pipelines.request import ContextSettings, FreeUSettings, GenerationRequest

EXAMPLES = Path(__file__).resolve().parents[2] / "configs" / "prompts"
SD_EXAMPLE = EXAMPLES / "sd15-realisticvision-animatediff.yaml"
# A seed AnimateDiff publishes (configs/prompts/1_animate/1_3_animate_ToonYou.yaml), above 2**63.
PUBLISHED_SEED = 12192490710448890259


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if path.suffix == ".yaml" else json.dumps(data))
    return path


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


@pytest.fixture()
def stand_in_models(monkeypatch):
    """Lets touched files stand in for SD1.5 checkpoints: these tests are about what config keys mean, and
    job_from_mapping's model file checks (sniffing and describing each file) are tests/pipelines/test_jobs.py's."""
    import kinema.pipelines.jobs as jobs

    monkeypatch.setattr(jobs, "_check_file_kind", lambda *args, **kwargs: None)


def test_animatediff_keys_make_the_requests_animatediff_means(tmp_path, monkeypatch, caplog, stand_in_models):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "models/toon.safetensors", "models/mm.ckpt", "models/style.safetensors", "models/zoom.ckpt")
    config = write(tmp_path / "toon.yaml", [{
        "inference_config": "configs/inference/inference-v2.yaml", "controlnet_path": "",
        "dreambooth_path": "models/toon.safetensors", "motion_module": "models/mm.ckpt",
        "lora_model_path": "models/style.safetensors",
        "motion_module_lora_configs": [{"path": "models/zoom.ckpt", "alpha": 0.5}],
        "seed": [PUBLISHED_SEED, 7], "steps": 3, "guidance_scale": 7.5, "W": 32, "H": 48, "L": 8,
        "prompt": ["a cat walking", "a dog running"], "n_prompt": ["blurry"]}])
    with caplog.at_level(logging.WARNING):
        read = read_config(config)
    assert [r.message for r in caplog.records] == [
        f"{config}: kinema ignores inference_config (AnimateDiff / prompt-travel settings it has no use for)"]
    [first, second] = read.runs
    for run, prompt, seed in ((first, "a cat walking", PUBLISHED_SEED), (second, "a dog running", 7)):
        assert run.job.request == GenerationRequest(prompt=prompt, negative_prompt="blurry", seeds=[seed], steps=3,
                                                    guidance=7.5, width=32, height=48, frames=8, overlap_frames=4)
        assert run.job.model == str(tmp_path / "models/toon.safetensors")
        assert run.job.motion_module == str(tmp_path / "models/mm.ckpt")
        # lora_alpha unset: AnimateDiff's 0.8
        assert run.job.loras == [(str(tmp_path / "models/style.safetensors"), 0.8),
                                 (str(tmp_path / "models/zoom.ckpt"), 0.5)]
    assert first.folder == "01-entry1-01-a-cat-walking" and second.folder == "01-entry1-02-a-dog-running"
    assert read.used[0]["seed"] == [PUBLISHED_SEED, 7]


def test_the_v3_domain_adapter_is_an_image_lora_at_its_own_scale(tmp_path, monkeypatch, caplog, stand_in_models):
    # AnimateDiff's configs/prompts/v3 files: adapter_lora_path with adapter_lora_scale (1.0 when unset).
    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "models/rv.safetensors", "models/v3_sd15_mm.ckpt", "models/v3_sd15_adapter.ckpt")
    entry = {"dreambooth_path": "models/rv.safetensors", "motion_module": "models/v3_sd15_mm.ckpt",
             "adapter_lora_path": "models/v3_sd15_adapter.ckpt", "prompt": ["a cat"], "L": 8}
    config = write(tmp_path / "v3.yaml", [entry, {**entry, "adapter_lora_scale": 0.5},
                                          {**entry, "adapter_lora_path": "", "adapter_lora_scale": 0.5},
                                          {**entry, "adapter_lora_scale": ""}])  # empty: unset, as these files mean
    with caplog.at_level(logging.WARNING):
        read = read_config(config)
    # A scale without the file is said once; AnimateDiff ignores it silently.
    assert [r.getMessage() for r in caplog.records] == [
        "adapter_lora_scale 0.5 has no adapter_lora_path to weigh, so it does nothing; give the file or drop it"]
    adapter = str(tmp_path / "models/v3_sd15_adapter.ckpt")
    assert [run.job.loras for run in read.runs] == [[(adapter, 1.0)], [(adapter, 0.5)], [], [(adapter, 1.0)]]
    # The published v3 files (63bb388) also set domain_lora_scale, which AnimateDiff's code never reads, and leave
    # dreambooth_path empty for its --pretrained-model-path: the one said, the other refused naming the key.
    published = write(tmp_path / "v3-1-T2V.yaml", [{**entry, "domain_lora_scale": 1.0}])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert read_config(published).ignored == ["domain_lora_scale"]
    with pytest.raises(KinemaError, match=r"gives a motion module but no model \(model, dreambooth_path and path "
                                          r"are empty or missing\): set dreambooth_path \(or model\)"):
        read_config(write(tmp_path / "v3-2.yaml", [{**entry, "dreambooth_path": ""}]))


def test_sparsectrl_keys_make_the_keyframe_jobs_animatediff_means(tmp_path, monkeypatch, caplog, stand_in_models):
    # AnimateDiff's configs/prompts/v3 SparseCtrl entries (as its scripts/animate.py reads them).
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "models/rv.safetensors", "models/v3_sd15_mm.ckpt", "models/v3_sd15_sparsectrl_scribble.ckpt")
    for name in ("sketch0.png", "sketch1.png"):
        Image.new("RGB", (32, 32), "white").save(tmp_path / name)
    entry = {"dreambooth_path": "models/rv.safetensors", "motion_module": "models/v3_sd15_mm.ckpt",
             "controlnet_config": "configs/inference/sparsectrl/image_condition.yaml",
             "controlnet_path": "models/v3_sd15_sparsectrl_scribble.ckpt",
             "controlnet_images": ["sketch0.png", "sketch1.png"], "controlnet_image_indexs": [0, 7],
             "normalize_condition_images": True, "prompt": ["a cat"], "L": 8, "W": 32, "H": 32}
    with caplog.at_level(logging.WARNING):
        [run] = read_config(write(tmp_path / "sparsectrl.yaml", [entry])).runs
    assert [r.message.split(": ", 1)[1] for r in caplog.records] == [
        "kinema ignores controlnet_config (AnimateDiff / prompt-travel settings it has no use for)"]
    assert run.job.controlnet == (str(tmp_path / "models/v3_sd15_sparsectrl_scribble.ckpt"), 1.0)
    request = run.job.request
    assert request.control_video == [str(tmp_path / "sketch0.png"), str(tmp_path / "sketch1.png")]
    assert (request.control_indices, request.normalize_control) == ([0, 7], True)
    with pytest.raises(KinemaError, match=r"control_indices name 1 frames for 2 control images"):
        read_config(write(tmp_path / "bad.yaml", [{**entry, "controlnet_image_indexs": [0]}]))
    with pytest.raises(KinemaError, match=r"the control image 1 is 32x32 but the job makes 64x64 videos"):
        read_config(write(tmp_path / "big.yaml", [{**entry, "W": 64, "H": 64}]))


def test_kinemas_sampling_settings_are_entry_keys_and_overrides(tmp_path, monkeypatch, stand_in_models):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "models/rv.safetensors", "models/mm.ckpt")
    entry = {"dreambooth_path": "models/rv.safetensors", "motion_module": "models/mm.ckpt", "prompt": ["a cat"],
             "L": 8, "motion_effect": 0.5, "timestep_spacing": "trailing", "scheduler": "euler"}
    config = write(tmp_path / "strength.yaml", [entry])
    [run] = read_config(config).runs
    assert (run.job.request.motion_effect, run.job.request.timestep_spacing) == (0.5, "trailing")
    [run] = read_config(config, overrides={"motion_scale": 1.2, "motion_effect": 0.8}).runs
    assert (run.job.request.motion_scale, run.job.request.motion_effect) == (1.2, 0.8)
    [run] = read_config(write(tmp_path / "freeu.yaml", [{**entry, "freeu": True}])).runs
    assert run.job.request.freeu == FreeUSettings()
    [run] = read_config(config, overrides={"freeu": {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}}).runs
    assert run.job.request.freeu == FreeUSettings(1.2, 1.4, 0.9, 0.2)


def test_old_named_entries_run_each_motion_module_with_the_same_random_seed(tmp_path, monkeypatch, stand_in_models):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "v14.ckpt", "v15.ckpt")
    config = write(tmp_path / "toon.yaml", {"ToonYou": {
        "path": "kinema-tiny-ad", "motion_module": ["v14.ckpt", "v15.ckpt"], "seed": -1,
        "prompt": ["a red circle moving right"], "L": 8}})
    read = read_config(config, overrides={"steps": 2})
    assert [run.folder for run in read.runs] == ["01-toonyou-01-a-red-circle-moving-right-mm1",
                                                 "01-toonyou-01-a-red-circle-moving-right-mm2"]
    seeds = [list(run.job.request.seeds) for run in read.runs]
    assert seeds[0] == seeds[1] and read.used == {"ToonYou": {**read.used["ToonYou"], "seed": seeds[0]}}
    assert read.used["ToonYou"]["steps"] == 2 and all(run.job.request.steps == 2 for run in read.runs)


def test_prompt_travel_keys_make_one_scheduled_job(tmp_path, monkeypatch, stand_in_models):
    monkeypatch.chdir(tmp_path)
    touch(tmp_path, "zoom.ckpt", "style.safetensors", "share/VAE/vae-ft-mse.safetensors", "other-vae.ckpt")
    config = write(tmp_path / "travel.json", {
        "name": "travel", "path": "kinema-tiny-ad", "seed": [4, 5], "scheduler": "k_euler_a", "steps": 2,
        "guidance_scale": 3, "head_prompt": "a circle", "prompt_map": {"0": "red", "6": "blue"},
        "tail_prompt": "moving right", "n_prompt": ["noise"], "lora_map": {"style.safetensors": 0.7},
        "motion_lora_map": {"zoom.ckpt": 1.0}, "context": 8, "overlap": 2, "output": {"format": "mp4", "fps": 12},
        "L": 8, "vae_path": "share/VAE/vae-ft-mse.safetensors"})
    [run] = read_config(config).runs
    assert run.job.request == GenerationRequest(
        prompt={"head_prompt": "a circle", "prompt_map": {"0": "red", "6": "blue"}, "tail_prompt": "moving right"},
        negative_prompt="noise", seeds=[4, 5], scheduler="euler_a", steps=2, guidance=3.0, frames=8, height=64,
        width=64, fps=12.0, context=ContextSettings(length=8, overlap=2), overlap_frames=8,
        interpolation="slerp", prompt_hold=0.5, prompt_loop=True)  # prompt travel's blend (its settings.py)
    with pytest.raises(KinemaError, match="clip_skip 2 skips layers of a CLIP text encoder, and .*kinema-tiny-ad's "
                                          "is BertModel"):  # its clip_skip, read against the model's text encoder
        read_config(write(tmp_path / "skip.json", {**json.loads(config.read_text()), "clip_skip": 2}))
    assert run.job.loras == [(str(tmp_path / "style.safetensors"), 0.7), (str(tmp_path / "zoom.ckpt"), 1.0)]
    assert run.folder == "01-travel"
    assert run.job.vae == str(tmp_path / "share/VAE/vae-ft-mse.safetensors") == run.job.settings()["vae"]
    [other] = read_config(config, overrides={"vae_path": "other-vae.ckpt"}).runs  # kinema generate --config --vae
    assert other.job.vae == str(tmp_path / "other-vae.ckpt")
    [linear] = read_config(write(tmp_path / "linear.json", {**json.loads(config.read_text()), "prompt_fixed_ratio": 0,
                                                            "tensor_interpolation_slerp": False})).runs
    assert (linear.job.request.interpolation, linear.job.request.prompt_hold) == ("linear", 0.0)
    for empty in (None, ""):  # an empty value is unset, as in those files: prompt travel's defaults
        given = {**json.loads(config.read_text()), "prompt_fixed_ratio": empty, "tensor_interpolation_slerp": empty}
        [unset] = read_config(write(tmp_path / "unset.json", given)).runs
        assert (unset.job.request.prompt_hold, unset.job.request.interpolation) == (0.5, "slerp")
    keyed = {k: v for k, v in json.loads(config.read_text()).items() if k not in ("head_prompt", "prompt_map",
                                                                                   "tail_prompt", "seed")}
    [plain] = read_config(write(tmp_path / "plain.json", {**keyed, "prompt": [{"0": "red", "6": "blue"}]})).runs
    assert (plain.job.request.prompt_hold, plain.job.request.interpolation, plain.job.request.prompt_loop) == (
        0.0, "linear", False)  # kinema's own schedules blend as kinema's do, unless the keys say otherwise
    [told] = read_config(write(tmp_path / "told.json", {**keyed, "prompt": [{"0": "red", "6": "blue"}],
                                                        "prompt_fixed_ratio": 0.3, "prompt_loop": True})).runs
    assert (told.job.request.prompt_hold, told.job.request.prompt_loop) == (0.3, True)
    for change, message in [({"prompt_fixed_ratio": 2}, "prompt_fixed_ratio is the share of the way to the next "
                                                        "keyframe a prompt is held"),
                            ({"prompt_fixed_ratio": "0.5"}, "prompt_fixed_ratio is the share"),
                            ({"tensor_interpolation_slerp": "yes"}, "tensor_interpolation_slerp must be true or false"),
                            ({"vae_path": "share/VAE/gone.pt"}, "no such VAE: share/VAE/gone.pt"),
                            ({"prompt_fixed_ratio": 0.3, "ip_adapter_map": {"enable": True, "prompt_fixed_ratio": 0.5}},
                             "ip_adapter_map.prompt_fixed_ratio 0.5 differs from the prompts' 0.3")]:
        with pytest.raises(KinemaError, match=message):
            read_config(write(tmp_path / "bad.json", {**json.loads(config.read_text()), **change}))


@pytest.mark.parametrize(("text", "message"), [
    ("- prompt: [a cat]\n  seed: [1\n  steps: 2\n", "is not valid YAML (expected ',' or ']', but got ':' at line 3 "
                                                   "column 8)"),
    ("- prompt: [a cat]\n  stpes: 2\n", "entry 'entry1': unknown key 'stpes'; did you mean 'steps'?"),
    ("- prompt: [a cat]\n  seed: 1\n  seed: 2\n", "is not valid YAML (key 'seed' is given twice; give each key "
                                                  "once at line 3 column 3)"),
    ("- prompt: [a cat]\n  guidance_scale: high\n", "guidance must be a finite number, got str 'high'"),
    ("- prompt: [a, b, c]\n  n_prompt: [x, y]\n", "n_prompt lists 2 negative prompts for 3 prompts"),
    ("- prompt: [a, b, c]\n  seed: [1, 2]\n", "seed lists 2 seeds for 3 prompts; give one seed, or one per prompt"),
    (f"- prompt: [a cat]\n  seed: {2**64}\n", f"seed {2**64} is out of range; seeds go from 0 to 2**64 - 1"),
    ("- prompt: [a cat]\n  model: kinema-tiny-ad\n  motion_module: mm_sd_v15_v2.ckpt\n",
     "no such motion module: mm_sd_v15_v2.ckpt"),
    ("- prompt: [a cat]\n  motion_module: mm_sd_v15_v2.ckpt\n", "gives a motion module but no model"),
    ("- prompt: [a cat]\n  dreambooth_path: models/toon.safetensors\n",
     "no such model file or folder: models/toon.safetensors; a model is an existing path or a bundled model's name"),
    ("- prompt: [a cat]\n  prompt_map: {0: a dog}\n", "give prompt or a prompt schedule"),
    ("- steps: 2\n", "entry 'entry1': no prompt"),
    ("just text\n", "is a str, not a prompt config"),
])
def test_bad_configs_are_one_line_naming_the_problem(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(KinemaError) as caught:
        read_config(tmp_path / "bad.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(str(tmp_path / "bad.yaml"))


def test_paths_found_beside_the_config_are_written_absolute_so_it_runs_again_from_anywhere(tmp_path, monkeypatch,
                                                                                         stand_in_models):
    project, elsewhere = tmp_path / "project", tmp_path / "far" / "elsewhere"
    touch(project, "toon.safetensors", "mm.ckpt", "vae.pt", "style.safetensors", "zoom.ckpt", "here.safetensors")
    for folder in (elsewhere, tmp_path / "configs", tmp_path / "out"):
        folder.mkdir(parents=True)
    monkeypatch.chdir(project)  # here.safetensors is found from the current folder and stays as written
    config = write(tmp_path / "configs" / "toon.yaml", [{
        "dreambooth_path": "../project/toon.safetensors", "motion_module": ["../project/mm.ckpt"],
        "vae_path": "../project/vae.pt", "lora_map": {"../project/style.safetensors": 0.5, "here.safetensors": 0.3},
        "motion_module_lora_configs": [{"path": "../project/zoom.ckpt", "alpha": 1.0}],
        "prompt": ["a cat"], "seed": 1, "steps": 2}])
    monkeypatch.chdir(elsewhere)  # none of them is found from here: each beside the config file
    touch(elsewhere, "here.safetensors")
    [used] = read_config(config).used
    assert used["dreambooth_path"] == str(project / "toon.safetensors")
    assert used["motion_module"] == [str(project / "mm.ckpt")] and used["vae_path"] == str(project / "vae.pt")
    assert used["lora_map"] == {str(project / "style.safetensors"): 0.5, "here.safetensors": 0.3}
    assert used["motion_module_lora_configs"] == [{"path": str(project / "zoom.ckpt"), "alpha": 1.0}]
    again = write(tmp_path / "out" / "config.yaml", [used])  # where run_config writes it
    assert read_config(again).runs[0].job.vae == str(project / "vae.pt")


def test_the_sd_example_is_refused_only_for_its_missing_weights(tmp_path, monkeypatch, stand_in_models):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KinemaError, match=r"entry 'entry1', prompt 1: no such model file or folder: "
                                          r"models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors"):
        read_config(SD_EXAMPLE)
    touch(tmp_path, "models/DreamBooth_LoRA/realisticVisionV60B1_v51VAE.safetensors",
          "models/stable-diffusion-v1-5/tokenizer/vocab.json", "models/Motion_Module/mm_sd_v15_v2.ckpt",
          "models/MotionLoRA/v2_lora_ZoomIn.ckpt")
    read = read_config(SD_EXAMPLE)
    assert [list(run.job.request.seeds) for run in read.runs] == [[43242532350557906], [10589116295929063558]]
    assert read.ignored == ["inference_config"] and read.runs[0].job.request.frames == 16


@pytest.fixture(scope="module")
def cache() -> FamilyCache:
    return FamilyCache()


@pytest.mark.parametrize("example", ["kinema-tiny-animatediff.yaml", "kinema-tiny-prompt-travel.json"])
def test_each_kinema_tiny_example_runs(tmp_path, example, cache):
    read = read_config(EXAMPLES / example, overrides={"steps": 2, "L": 8})  # small: a few seconds each
    paths = run_config(read, tmp_path / "out", cache=cache)
    assert paths and all(path.is_file() for path in paths) and cache.loads == 1  # one model for all
    used = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    entries = used if isinstance(used, list) else [used]
    assert all(isinstance(seed, int) and seed >= 0 for entry in entries for seed in entry["seed"])
    for path in paths:
        settings = json.loads(path.with_name(path.name + ".json").read_text())
        assert settings["model"] == "kinema-tiny" and settings["steps"] == 2


def test_an_empty_seed_is_unset_and_output_takes_only_prompt_travels_keys(tmp_path, caplog):
    # docs/configs.md: "" and [] leave a key unset, as in those files; the seed was refused instead.
    for empty in ("", []):
        for entry in ({"model": "kinema-tiny", "prompt": ["a red circle moving right"], "seed": empty},
                      {"model": "kinema-tiny", "prompt_map": {"0": "a red circle moving right"}, "seed": empty}):
            config = write(tmp_path / "c.yaml", [entry] if "prompt" in entry else entry)
            [run] = read_config(config).runs
            assert len(run.job.request.seeds) == 1, entry  # drawn, as for -1
    entry = {"model": "kinema-tiny", "prompt_map": {"0": "a red circle moving right"}}
    for output, error in (({"fps": 8, "bogus": 1}, "unknown key 'bogus' in output; it takes fps"),
                          ({"fps": 8, "format": "gif", "encode_param": {"crf": 10}}, None)):
        config = write(tmp_path / "travel.json", {**entry, "output": output})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            if error is None:
                [run] = read_config(config).runs
                assert run.job.request.fps == 8
                assert "output format 'gif' is ignored: kinema writes mp4 videos" in caplog.text
            else:
                with pytest.raises(KinemaError, match=error):
                    read_config(config)
