"""kinema.pipelines.travel_maps: animatediff-cli-prompt-travel's controlnet_map and ip_adapter_map read into the jobs
their keys mean (checked against jobs written out by hand from prompt travel's rules: images named by frame number
under data/<input_image_dir>/<controlnet>/, networks from its address table in the Hugging Face cache), and one-line
refusals where kinema cannot do what the file asks."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from kinema.errors import KinemaError
from kinema.pipelines.prompt_configs import read_config

HUB_SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def stand_in_models(monkeypatch):
    """Touched files stand in for checkpoints: what the keys mean is tested here, the model checks elsewhere."""
    import kinema.pipelines.jobs as jobs

    monkeypatch.setattr(jobs, "_check_file_kind", lambda *args, **kwargs: None)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache; `cache(repo, subfolder)` puts a repository's config.json in it, as a download
    leaves it (models--owner--name/snapshots/<commit>/, refs/main naming the commit)."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))

    def cache(repo: str, subfolder: str = "", filename: str = "config.json") -> Path:
        folder = root / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(HUB_SNAPSHOT)
        place = folder / "snapshots" / HUB_SNAPSHOT / subfolder
        (place / filename).parent.mkdir(parents=True, exist_ok=True)
        (place / filename).write_text("{}")
        return place

    return cache


def images(folder: Path, *frames: int, size: int = 40) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        Image.new("RGB", (size, size), "white").save(folder / f"{frame:04d}.png")
    return [str(folder / f"{frame:04d}.png") for frame in frames]


def travel(tmp_path: Path, **keys) -> Path:
    """A prompt-travel config as its config/prompts/prompt_travel.json spells one, with `keys` added."""
    path = tmp_path / "config" / "prompts" / "travel.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": "travel", "path": "models/rv.safetensors", "motion_module": "models/mm.ckpt",
                                "seed": [4], "steps": 2, "prompt_map": {"0": "a dancer"}, "n_prompt": [""],
                                "L": 16, "W": 32, "H": 32, **keys}))
    return path


def net(**keys) -> dict:
    return {"enable": True, "use_preprocessor": False, "guess_mode": False, "controlnet_conditioning_scale": 1.0,
            "control_guidance_start": 0.0, "control_guidance_end": 1.0,
            "control_scale_list": [0.5, 0.4, 0.3, 0.2, 0.1], "control_region_list": [], **keys}


@pytest.fixture()
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("models/rv.safetensors", "models/mm.ckpt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_a_controlnet_steers_its_numbered_keyframes_with_the_falloff(project, hub, stand_in_models, caplog):
    pose = hub("lllyasviel/control_v11p_sd15_openpose")
    frames = images(project / "data/controlnet_image/test/controlnet_openpose", 0, 8, 20)  # 20: past L 16
    config = travel(project, controlnet_map={
        "input_image_dir": "controlnet_image/test", "max_samples_on_vram": 0, "max_models_on_vram": 0,
        "save_detectmap": True, "preprocess_on_gpu": True, "is_loop": True,
        "controlnet_openpose": net(controlnet_conditioning_scale=0.8, control_guidance_end=0.9),
        "controlnet_canny": net(),  # enabled, no folder: left out, as prompt travel leaves it
        "controlnet_tile": net(enable=False)})
    with caplog.at_level(logging.WARNING):
        read = read_config(config)
    [run] = read.runs
    assert [r.getMessage() for r in caplog.records] == [
        f"{frames[0].rsplit('/', 1)[0]}: the images of frames [20] are left out: the video has 16 frames (L)"]
    assert read.used["controlnet_map"]["input_image_dir"] == str(project / "data/controlnet_image/test")  # reruns
    assert run.job.controlnet == (str(pose), 0.8)
    request = run.job.request
    assert request.control_video == frames[:2] and request.control_indices == [0, 8]
    assert (request.control_falloff, request.control_loop) == ([0.5, 0.4, 0.3, 0.2, 0.1], True)
    assert (request.control_start, request.control_end, request.guess_mode, request.resize) == (0.0, 0.9, False, True)
    assert request.control_preprocess is None


def test_two_controlnets_share_keyframes_and_canny_is_made_here(project, hub, stand_in_models, monkeypatch):
    import kinema.pipelines.control_maps as control_maps

    monkeypatch.setattr(control_maps.importlib.util, "find_spec", lambda name: object())  # OpenCV "installed"
    depth, canny = hub("lllyasviel/control_v11f1p_sd15_depth"), hub("lllyasviel/control_v11p_sd15_canny")
    root = project / "controlnet_image/run"  # under the current folder, not data/
    depth_frames = images(root / "controlnet_depth", 0, 15)
    canny_frames = images(root / "controlnet_canny", 0, 15)
    config = travel(project, controlnet_map={
        "input_image_dir": "controlnet_image/run", "is_loop": False,
        "controlnet_depth": net(controlnet_conditioning_scale=0.6, control_scale_list=[]),
        "controlnet_canny": net(use_preprocessor=True, control_scale_list=[],
                                preprocessor={"type": "canny", "param": {"low_threshold": 50,
                                                                         "high_threshold": 150}})})
    [run] = read_config(config).runs
    assert run.job.controlnet == [(str(depth), 0.6), (str(canny), 1.0)]
    request = run.job.request
    assert request.control_video == [depth_frames, canny_frames] and request.control_indices == [0, 15]
    assert request.control_preprocess == ["none", "canny:50:150"]
    assert (request.control_falloff, request.control_loop) == (None, False)  # an empty list: keyframes only


@pytest.mark.parametrize(("preprocessor", "made"), [
    ({"type": "tile_resample", "param": {"down_sampling_rate": 2.0}}, "tile_resample:2.0"),
    ({"type": "tile_resample"}, "tile_resample"), ({"type": "blur", "param": {"sigma": 3}}, "blur:3"),
])
def test_the_tile_controlnets_maps_are_made_here(project, hub, stand_in_models, monkeypatch, preprocessor, made):
    import kinema.pipelines.control_maps as control_maps

    monkeypatch.setattr(control_maps.importlib.util, "find_spec", lambda name: object())  # OpenCV "installed"
    tile = hub("lllyasviel/control_v11f1e_sd15_tile")
    frames = images(project / "data/controlnet_image/tile/controlnet_tile", 0, 8)
    config = travel(project, controlnet_map={"input_image_dir": "controlnet_image/tile", "controlnet_tile": net(
        use_preprocessor=True, preprocessor=preprocessor)})
    [run] = read_config(config).runs
    assert run.job.controlnet == (str(tile), 1.0) and run.job.request.control_video == frames
    assert run.job.request.control_preprocess == made
    for param, message in (({"down_sampling_rate": 0.5}, "tile_resample takes a rate of at least 1"),
                           ({"down_sampling_rate": "2:3"}, r"controlnet_tile.preprocessor.param.down_sampling_rate is "
                                                           r"a number, got '2:3'"),
                           ({"rate": 4}, r"controlnet_tile.preprocessor.param has 'rate', which tile_resample does not "
                                         r"take; it takes down_sampling_rate")):
        bad = travel(project, controlnet_map={"input_image_dir": "controlnet_image/tile", "controlnet_tile": net(
            use_preprocessor=True, preprocessor={"type": "tile_resample", "param": param})})
        with pytest.raises(KinemaError, match=message):
            read_config(bad)


@pytest.mark.parametrize(("change", "message"), [
    ({"controlnet_depth": net(control_guidance_start=0.2)},
     "kinema steers every ControlNet with one control_guidance_start, and these differ: controlnet_openpose 0.0, "
     "controlnet_depth 0.2; give them the same"),
    ({"controlnet_depth": net(control_scale_list=[0.5])}, "kinema steers every ControlNet with one "
                                                          "control_scale_list"),
    ({"controlnet_depth": net(), "depth_frames": (0, 4)}, "kinema steers every ControlNet at the same keyframes, and "
                                                          "these have images for other frames: controlnet_openpose "
                                                          "[0, 8]; controlnet_depth [0, 4]"),
    ({"controlnet_openpose": net(use_preprocessor=True)}, "controlnet_map.controlnet_openpose makes its maps with the "
                                                          "dwpose preprocessor, which kinema does not make"),
    ({"controlnet_openpose": net(enable="false")}, "controlnet_map.controlnet_openpose.enable must be true or false, "
                                                   "got 'false'"),
    ({"controlnet_openpose": net(guess_mode="false")}, "controlnet_openpose.guess_mode must be true or false"),
    ({"controlnet_openpose": net(use_preprocessor=1)}, "controlnet_openpose.use_preprocessor must be true or false"),
    ({"is_loop": "false"}, "controlnet_map.is_loop must be true or false, got 'false'"),
    ({"controlnet_openpose": net(control_scale_list=0.5)}, "controlnet_openpose.control_scale_list is a list of "
                                                           "weights from 0 to 1"),
    ({"controlnet_openpose": net(control_scale_list=[1.5])}, "controlnet_openpose.control_scale_list is a list of "
                                                             "weights from 0 to 1"),
    ({"controlnet_openpose": net(controlnet_conditioning_scale="1.0")},
     "controlnet_openpose.controlnet_conditioning_scale must be a number of at least 0, got '1.0'"),
    ({"controlnet_openpose": net(control_guidance_start=2)}, "controlnet_openpose.control_guidance_start must be a "
                                                             "number from 0 to 1, got 2"),
    ({"controlnet_openpose": net(use_preprocessor=True, preprocessor="canny")}, "controlnet_openpose.preprocessor is "
                                                                                "{\"type\": ..., \"param\""),
    ({"input_image_dir": "elsewhere"}, "controlnet_map.input_image_dir 'elsewhere' is no folder under"),
    ({"controlnet_openpose": net(strength=1)}, "controlnet_map.controlnet_openpose: unknown key 'strength'"),
    ({"controlnet_seg": net()}, "controlnet_map.controlnet_seg is lllyasviel/control_v11p_sd15_seg, which is not in "
                                "the local Hugging Face cache and cannot be fetched here: add \"path\""),
    ({"my_net": net()}, "controlnet_map.my_net: unknown ControlNet 'my_net'"),
    ({"controlnet_openpose": "on"}, "controlnet_map.controlnet_openpose is a mapping of settings"),
])
def test_what_kinema_cannot_do_is_one_line_before_anything_loads(project, hub, stand_in_models, change, message):
    hub("lllyasviel/control_v11p_sd15_openpose")
    hub("lllyasviel/control_v11f1p_sd15_depth")
    root = project / "data/cn"
    images(root / "controlnet_openpose", 0, 8)
    images(root / "controlnet_depth", *change.pop("depth_frames", (0, 8)))
    images(root / "controlnet_seg", 0, 8)
    images(root / "my_net", 0, 8)
    config = travel(project, controlnet_map={"input_image_dir": "cn", "controlnet_openpose": net(), **change})
    with pytest.raises(KinemaError) as caught:
        read_config(config)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{config}, entry 'travel': ")


def test_a_path_in_the_entry_and_sparsectrl_keys_beside_the_map(project, hub, stand_in_models):
    (project / "nets").mkdir()
    (project / "nets/pose.safetensors").write_bytes(b"x")
    images(project / "data/cn/controlnet_openpose", 3)
    config = travel(project, controlnet_map={"input_image_dir": "cn", "controlnet_openpose": net(
        path="nets/pose.safetensors")})
    [run] = read_config(config).runs
    assert run.job.controlnet == (str(project / "nets/pose.safetensors"), 1.0)
    assert run.job.request.control_indices == [3]
    with pytest.raises(KinemaError, match=r"give controlnet_map \(prompt travel\) or controlnet_path"):
        read_config(travel(project, controlnet_map={"input_image_dir": "cn", "controlnet_openpose": net()},
                           controlnet_path="nets/pose.safetensors"))


def test_no_images_means_no_controlnet_with_one_warning(project, hub, stand_in_models, caplog):
    (project / "data/cn/controlnet_openpose").mkdir(parents=True)
    images(project / "data/cn/controlnet_openpose", 16)  # past L 16
    (project / "data/cn/controlnet_openpose/notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        [run] = read_config(travel(project, controlnet_map={"input_image_dir": "cn", "controlnet_openpose": net(),
                                                            "controlnet_depth": net(enable=False)})).runs
        [again] = read_config(travel(project, controlnet_map={"input_image_dir": "cn",
                                                              "controlnet_depth": net(enable=False)})).runs
    assert run.job.controlnet is None and run.job.request.control_video is None and again.job.controlnet is None
    folder = project / "data/cn/controlnet_openpose"
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder}: notes.txt left out (images here are .png files named by frame number, 0016.png)",
        f"{folder}: the images of frames [16] are left out: the video has 16 frames (L)",
        f"controlnet_map: no images for frames below 16 in {folder} for controlnet_openpose, so no ControlNet steers "
        "(as in prompt travel)",
        "controlnet_map enables no ControlNet (\"enable\": true), so none steers"]


def test_a_map_enabling_no_controlnet_needs_no_image_folder(project, hub, stand_in_models, caplog):
    # Prompt travel's own file with every ControlNet turned off was refused: its controlnet_image/test was missing.
    with caplog.at_level(logging.WARNING):
        [run] = read_config(travel(project, controlnet_map={"input_image_dir": "controlnet_image/test",
                                                            "controlnet_openpose": net(enable=False)})).runs
    assert run.job.controlnet is None
    assert "controlnet_map enables no ControlNet" in caplog.text


def test_prompt_travels_own_files_and_its_prompt_json_are_read(project, hub, stand_in_models):
    # Its prompt_travel.json and sample_lcm.json, and the prompt.json it writes beside each video, were refused:
    # "unknown key 'context_schedule'; did you mean 'scheduler'?".
    plain = {"context_schedule": "uniform", "lcm_map": {"enable": False, "start_scale": 0.15},
             "result": {"output": "output/2024-01-01T00-00-00-travel", "seed": 4}}
    assert read_config(travel(project, **plain)).ignored == []
    said = read_config(travel(project, context_schedule="composite", lcm_map={"enable": True})).ignored
    assert said == ["context_schedule", "lcm_map"]


def test_badly_named_images_are_one_line(project, hub, stand_in_models):
    hub("lllyasviel/control_v11p_sd15_openpose")
    folder = project / "data/cn/controlnet_openpose"
    images(folder, 0)
    Image.new("RGB", (8, 8)).save(folder / "1a.png")
    with pytest.raises(KinemaError, match=r"1a.png: images here are named by their frame number"):
        read_config(travel(project, controlnet_map={"input_image_dir": "cn", "controlnet_openpose": net()}))
    (folder / "1a.png").unlink()
    Image.new("RGB", (8, 8)).save(folder / "5².png")  # a digit to str.isdigit(), not a frame number
    with pytest.raises(KinemaError, match=r"5².png: images here are named by their frame number"):
        read_config(travel(project, controlnet_map={"input_image_dir": "cn", "controlnet_openpose": net()}))
    (folder / "5².png").unlink()
    Image.new("RGB", (8, 8)).save(folder / "00.png")
    with pytest.raises(KinemaError, match=r"are both frame 0; keep one"):
        read_config(travel(project, controlnet_map={"input_image_dir": "cn", "controlnet_openpose": net()}))


def test_the_ip_adapter_map_prompts_with_its_image_and_the_file_its_flags_name(project, hub, stand_in_models,
                                                                                 caplog):
    weights = project / "data/models/ip_adapter/models/ip-adapter-plus_sd15.bin"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    encoder = hub("h94/IP-Adapter", "models/image_encoder")  # not beside the adapter: the cache's is used
    [image] = images(project / "data/ip_adapter_image/test", 0)
    ip_map = {"enable": True, "input_image_dir": "ip_adapter_image/test", "prompt_fixed_ratio": 0.5,
              "save_input_image": True, "resized_to_square": False, "scale": 0.5, "is_plus_face": False,
              "is_plus": True, "is_light": False}
    [run] = read_config(travel(project, ip_adapter_map=ip_map)).runs
    assert run.job.ip_adapter == (str(weights), 0.5) and run.job.request.ip_image == image
    assert run.job.image_encoder == str(encoder)
    [run] = read_config(travel(project, ip_adapter_map={**ip_map, "enable": False})).runs
    assert run.job.ip_adapter is None
    light = hub("h94/IP-Adapter", filename="models/ip-adapter_sd15_light.bin") / "models/ip-adapter_sd15_light.bin"
    [run] = read_config(travel(project, ip_adapter_map={**ip_map, "is_light": True})).runs
    assert run.job.ip_adapter == (str(light), 0.5) and run.job.image_encoder is None  # beside it in the cache
    with pytest.raises(KinemaError, match=r"ip_adapter_map asks for h94/IP-Adapter's models/"
                                          r"ip-adapter-full-face_sd15.bin, which is neither in"):
        read_config(travel(project, ip_adapter_map={**ip_map, "is_full_face": True}))
    [late, _] = images(project / "data/ip_adapter_image/test", 8, 16)  # 16: past L 16
    [run] = read_config(travel(project, ip_adapter_map=ip_map)).runs
    assert run.job.request.ip_image == {"0": image, "8": late}  # several images: the image prompt travels
    # kinema's own "path" names the file, and the file's tensors its variant: a flag beside it chooses nothing.
    with caplog.at_level(logging.WARNING):
        [run] = read_config(travel(project, ip_adapter_map={**ip_map, "path": str(weights),
                                                            "image_encoder": str(encoder)})).runs
    assert run.job.ip_adapter == (str(weights), 0.5)
    assert "ip_adapter_map: path names the adapter file, whose tensors tell its variant, so is_plus chooses " \
           "nothing" in caplog.text


def test_the_img2img_map_remakes_its_numbered_frames(project, stand_in_models):
    folder = project / "data/init/run"
    images(folder, *range(4), size=32)
    entry = {"enable": True, "init_img_dir": "init/run", "save_init_image": True, "denoising_strength": 0.6}
    [run] = read_config(travel(project, L=4, img2img_map=entry)).runs
    request = run.job.request
    assert (request.video, request.strength, request.mode, request.resize) == (str(folder), 0.6, "video-to-video",
                                                                               True)
    [off] = read_config(travel(project, L=4, img2img_map={**entry, "enable": False})).runs
    assert off.job.request.video is None
    (folder / "0002.png").unlink()
    with pytest.raises(KinemaError, match=r"has no image for frames \[2\] of 4; kinema remakes a video from every "
                                          r"frame"):
        read_config(travel(project, L=4, img2img_map=entry))
    images(folder, 2, 9, size=32)  # 9: past L, but a frame the folder would hand to video-to-video
    with pytest.raises(KinemaError, match=r"holds other images beside those of frames 0 to 3"):
        read_config(travel(project, L=4, img2img_map=entry))
    with pytest.raises(KinemaError, match=r"img2img_map.denoising_strength must be a number from 0 to 1, got 1.5"):
        read_config(travel(project, L=4, img2img_map={**entry, "denoising_strength": 1.5}))
