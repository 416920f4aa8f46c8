"""Speed presets (kinema.pipelines.speed): what each fills in, that given settings win, where bfloat16 is chosen,
and the same rules through `kinema generate --speed` and a job's "speed" key."""

import pytest
from cli.test_generate_default import TINY_DEFAULTS, bundled, bundled_dir, checked  # noqa: F401 (fixtures)

from kinema.errors import KinemaError
from kinema.pipelines import speed
from kinema.pipelines.jobs import job_from_mapping
from kinema.pipelines.request import SPEEDS, GenerationRequest


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(speed, "native_bfloat16", lambda device="cpu": True)


def test_presets_are_the_requests_speeds_and_each_setting_is_a_valid_request_field(native_bf16):
    assert tuple(speed.SPEED_PRESETS) == SPEEDS
    for name in SPEEDS:
        request = speed.apply_speed(GenerationRequest(prompt="x"), name)
        request.check()
        assert request.speed == name
    fast = speed.apply_speed(GenerationRequest(prompt="x"), "fast")
    assert (fast.scheduler, fast.steps, fast.dtype, fast.cache_interval, fast.cfg_truncation) == \
        ("dpmpp_2m_karras", 10, "bfloat16", 2, 0.6)
    assert speed.apply_speed(GenerationRequest(prompt="x"), "quality") == GenerationRequest(prompt="x",
                                                                                          speed="quality")


def test_given_settings_win_and_bfloat16_only_where_native(monkeypatch):
    monkeypatch.setattr(speed, "native_bfloat16", lambda device="cpu": False)
    request = speed.apply_speed(GenerationRequest(prompt="x", steps=20), "fast", keep={"steps"})
    assert (request.steps, request.dtype, request.scheduler, request.quantize) == (20, None, "dpmpp_2m_karras", "int8")
    # int8 takes a float32 model: a user's half precision keeps the preset from choosing it
    request = speed.apply_speed(GenerationRequest(prompt="x", dtype="bfloat16"), "fast", keep={"dtype"})
    assert (request.dtype, request.quantize) == ("bfloat16", None)
    request.check()
    assert speed.preset_settings("balanced").get("quantize") is None  # int8 stands in for bfloat16 in fast only
    # ... and a user's int8 keeps the preset's bfloat16 out where it is native (it was refused as a bfloat16 model).
    monkeypatch.setattr(speed, "native_bfloat16", lambda device="cpu": True)
    request = speed.apply_speed(GenerationRequest(prompt="x", quantize="int8"), "fast", keep={"quantize"})
    assert (request.dtype, request.quantize) == (None, "int8")
    request.check()
    with pytest.raises(KinemaError, match="unknown speed preset 'ludicrous'; known presets: fast, balanced, quality"):
        speed.preset_settings("ludicrous")


def test_the_line_printed_with_the_run_says_what_the_preset_chose():
    line = speed.describe_speed("fast", speed.SPEED_PRESETS["fast"])
    assert line == ("speed fast: dpmpp_2m_karras, 10 steps, bfloat16, deep features every 2 steps, guidance on the "
                    "first 60% of steps")
    assert speed.describe_speed("quality", {}) == "speed quality: the model's own settings"


def test_cli_speed_fills_what_is_unset_before_the_models_defaults(native_bf16, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = checked(["generate", "a red circle", "--speed", "fast", "--steps", "4"])
    assert args.request == GenerationRequest(prompt="a red circle", seeds=[0], **{
        **TINY_DEFAULTS, "steps": 4, "scheduler": "dpmpp_2m_karras", "dtype": "bfloat16", "cache_interval": 2,
        "cfg_truncation": 0.6, "speed": "fast", "overlap_frames": 4})
    assert args.speed_line == ("speed fast: dpmpp_2m_karras, bfloat16, deep features every 2 steps, guidance on the "
                               "first 60% of steps")  # the steps were given, so the preset did not choose them
    args = checked(["generate", "a red circle", "--cache-interval", "3", "--cfg-truncation", "0.5", "--quantize",
                    "int8", "--compile"])
    assert (args.request.cache_interval, args.request.cfg_truncation, args.request.quantize, args.request.compile,
            args.request.speed) == (3, 0.5, "int8", True, None)


@pytest.mark.parametrize("argv, message", [
    (["--cfg-truncation", "0"], "a number in (0, 1]"),
    (["--cache-interval", "0"], "positive"),
    (["--quantize", "int4"], "invalid choice"),
    (["--speed", "warp"], "invalid choice"),
])
def test_cli_refuses_bad_speed_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        checked(["generate", "a red circle", *argv])
    assert message in capsys.readouterr().err


def test_cli_and_jobs_take_int8_for_bfloat16_on_a_cpu_without_it(monkeypatch, tmp_path):
    monkeypatch.setattr(speed, "native_bfloat16", lambda device="cpu": False)
    monkeypatch.chdir(tmp_path)
    args = checked(["generate", "a red circle", "--speed", "fast"])
    assert (args.request.dtype, args.request.quantize) == (None, "int8")
    assert "int8 Linear layers" in args.speed_line
    args = checked(["generate", "a red circle", "--speed", "fast", "--dtype", "bfloat16"])
    assert (args.request.dtype, args.request.quantize) == ("bfloat16", None)
    job = job_from_mapping({"prompt": "a red circle", "speed": "fast", "dtype": "float16"}, base=tmp_path)
    assert (job.request.dtype, job.request.quantize) == ("float16", None)
    assert job_from_mapping({"prompt": "a red circle", "speed": "fast"}, base=tmp_path).request.quantize == "int8"


def test_a_jobs_speed_key_fills_what_the_job_leaves_unset(native_bf16, tmp_path):
    job = job_from_mapping({"prompt": "a red circle", "speed": "balanced", "steps": 6}, base=tmp_path)
    request = job.request
    assert (request.speed, request.steps, request.scheduler, request.dtype, request.cfg_truncation,
            request.cache_interval) == ("balanced", 6, "dpmpp_2m_karras", "bfloat16", 0.8, None)
    quantized = job_from_mapping({"prompt": "a red circle", "quantize": "int8", "compile": True}, base=tmp_path)
    assert quantized.model_key() != job_from_mapping({"prompt": "a red circle"}, base=tmp_path).model_key()
    for bad, message in (({"cfg_truncation": 1.5}, "cfg_truncation must be in"), ({"speed": "warp"}, "speed"),
                         ({"quantize": "int4"}, "quantize"), ({"cache_interval": 0}, "cache_interval")):
        with pytest.raises(KinemaError, match=message):
            job_from_mapping({"prompt": "a red circle", **bad}, base=tmp_path)


def test_a_gpu_whose_bfloat16_is_emulated_is_not_native(monkeypatch, caplog):
    """torch counts a pre-Ampere GPU's bfloat16 as supported unless asked about emulation: presets keep float32
    there, and a bfloat16 run says float16 is the fast choice."""
    import torch

    from kinema.pipelines.generation import _warn_if_emulated

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not speed.native_bfloat16("cuda")
    assert "dtype" not in speed.preset_settings("fast", "cuda") and "quantize" not in speed.preset_settings("fast",
                                                                                                        "cuda")
    with caplog.at_level("WARNING", logger="kinema"):
        _warn_if_emulated(torch.bfloat16, torch.device("cuda"))
        _warn_if_emulated(torch.float16, torch.device("cuda"))
    assert [r.getMessage() for r in caplog.records] == [
        "this GPU has no native bfloat16 support (it predates compute capability 8), so the models run slower than "
        "they could; use --dtype float16 here"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert speed.native_bfloat16("cuda") and speed.preset_settings("fast", "cuda")["dtype"] == "bfloat16"


def test_a_jobs_preset_takes_the_settings_of_the_device_it_runs_on(monkeypatch):
    """A job's preset was chosen for the CPU whatever the device: on a GPU server whose CPU lacks bfloat16 it
    asked for int8, which the GPU refuses."""
    asked = []
    monkeypatch.setattr(speed, "native_bfloat16", lambda device="cpu": asked.append(device) or device == "cuda")
    on_gpu = job_from_mapping({"prompt": "a red circle", "speed": "fast"}, device="cuda").request
    assert (asked, on_gpu.dtype, on_gpu.quantize) == (["cuda"], "bfloat16", None)
    on_cpu = job_from_mapping({"prompt": "a red circle", "speed": "fast"}).request
    assert (on_cpu.dtype, on_cpu.quantize) == (None, "int8")


def test_a_device_this_machine_lacks_has_no_native_bfloat16_and_no_cpu_fallback():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert speed.native_bfloat16("cuda") is False  # a Ray worker's GPU, asked on the driver
    assert speed.preset_settings("fast", "cuda").get("quantize") is None  # int8 is a CPU's stand-in
    assert speed.native_bfloat16("auto") == speed.native_bfloat16("cpu")


def test_a_ray_jobs_preset_chooses_no_precision_for_workers_it_cannot_see(monkeypatch):
    """Read on the Ray driver (device None), a job's preset takes neither bfloat16 nor int8: the driver's CPU or
    GPU says nothing of the workers'. Nor is the driver's free memory theirs."""
    monkeypatch.setattr("kinema.memory.available_memory", lambda device="cpu": 1)
    request = job_from_mapping({"prompt": "a red circle", "speed": "fast"}, device=None).request
    assert (request.steps, request.dtype, request.quantize) == (10, None, None)
