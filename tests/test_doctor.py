"""`kinema doctor`: every field checked against a source of its own (torch, PyAV, the package metadata, the
environment, /proc/meminfo read here), never against the report itself."""

import json
import platform
import re
from importlib.metadata import version
from pathlib import Path

import av
import pytest
import torch

from kinema import memory as memory_module
from kinema.cli import main
from kinema.doctor import doctor_report

FIELDS = ["kinema", "python", "torch", "torch_threads", "device", "bfloat16_native", "cuda_devices", "pyav",
          "video_codecs", "cannot_write", "models_dir", "free_memory_gib"]


def json_report(capsys) -> dict:
    assert main(["doctor", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def mem_available_gib() -> float:
    """MemAvailable from /proc/meminfo, parsed here on its own ("MemAvailable:   23110496 kB")."""
    found = re.search(r"^MemAvailable:\s+(\d+) kB$", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(found[1]) / 2**20


def test_json_report_fields_match_their_sources(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KINEMA_HOME", str(tmp_path / "kinema home"))
    before = mem_available_gib()
    report = json_report(capsys)
    after = mem_available_gib()
    assert list(report) == FIELDS
    assert report["kinema"] == version("kinema")
    assert report["python"] == platform.python_version()
    assert report["torch"] == torch.__version__
    assert report["torch_threads"] == torch.get_num_threads()
    assert report["pyav"] == av.__version__
    assert report["models_dir"] == str(tmp_path / "kinema home" / "models")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert (report["device"], report["cuda_devices"]) == ("cpu", [])
        assert report["bfloat16_native"] == torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX-512 BF16 or AMX
    # Memory moves on a shared machine between the reads; 0.25 GiB of slack (MemFree, the wrong field, is GiBs off
    # where page cache is in use).
    assert min(before, after) - 0.25 <= report["free_memory_gib"] <= max(before, after) + 0.25


def test_video_codecs_are_encoders_pyav_has(capsys):
    codecs = json_report(capsys)["video_codecs"]
    assert codecs, "this PyAV build has video encoders"
    for name in codecs:
        assert name in av.codecs_available
        assert av.codec.Codec(name, "w").type == "video", name  # opens as an encoder (raises otherwise)
    # kinema writes .mp4 with libx264 (kinema.data.video_io): the report says whether it can.
    assert ("libx264" in codecs) == ("libx264" in av.codecs_available)


def test_video_codecs_follow_what_pyav_offers(monkeypatch):
    monkeypatch.setattr(av, "codecs_available", {"libx264", "gif", "flac", "no-such-codec"})
    assert doctor_report()["video_codecs"] == ["libx264", "gif"]  # an audio codec and unknown names are left out
    monkeypatch.setattr(av, "codecs_available", set())
    assert doctor_report()["video_codecs"] == []


def test_an_ffmpeg_without_the_mp4_encoder_is_flagged_and_refused_before_any_run(monkeypatch, capsys, tmp_path):
    from kinema.pipelines import load as load_module

    assert json_report(capsys)["cannot_write"] == [suffix for suffix, encoder in
                                                   ((".mp4", "libx264"), (".webm", "libvpx-vp9"))
                                                   if encoder not in av.codecs_available]
    # As a PyAV built against an FFmpeg without libx264 (conda's, some distributions').
    monkeypatch.setattr(av, "codecs_available", set(av.codecs_available) - {"libx264"})
    assert main(["doctor"]) == 1
    captured = capsys.readouterr()
    assert "cannot_write: ['.mp4']" in captured.out
    assert "kinema doctor: error: this PyAV's FFmpeg has no libx264 encoder, so kinema cannot write .mp4, every " \
           "command's default output" in captured.err
    monkeypatch.setattr(load_module, "load_family", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["generate", "a red circle moving right", "-o", str(tmp_path / "fox.mp4")]) == 2
    assert "cannot write fox.mp4: this PyAV's FFmpeg has no libx264 encoder, which kinema writes .mp4 with; write " \
           ".gif, .webp or a frames folder instead" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    # The API, batch, the web app and configs write jobs' .mp4 videos: refused when a job is accepted.
    from kinema.errors import KinemaError
    from kinema.pipelines.jobs import job_from_mapping

    with pytest.raises(KinemaError, match="job: this PyAV's FFmpeg has no libx264 encoder, which kinema writes a "
                                          "job's .mp4 videos with"):
        job_from_mapping({"prompt": "a red circle moving right"})


def test_models_dir_defaults_to_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("KINEMA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert doctor_report()["models_dir"] == str(tmp_path / ".cache" / "kinema" / "models")
    monkeypatch.setenv("KINEMA_HOME", "~/kinema")  # as a shell reads it, not a folder named "~"
    assert doctor_report()["models_dir"] == str(tmp_path / "kinema" / "models")


def test_a_models_folder_that_is_a_file_is_warned_about(monkeypatch, tmp_path, capsys):
    from kinema.cli import main

    (tmp_path / "models").write_text("not a folder")
    monkeypatch.setenv("KINEMA_HOME", str(tmp_path))
    assert main(["doctor", "--json"]) == 0
    assert f"the models folder {tmp_path / 'models'} is a file" in capsys.readouterr().err


def test_cuda_devices_are_listed_by_name(monkeypatch):
    names = {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA A10"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: names[index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Hopper: native
    report = doctor_report()
    assert (report["device"], report["cuda_devices"]) == ("cuda", ["NVIDIA H100 80GB HBM3", "NVIDIA A10"])
    assert report["bfloat16_native"] is True


MEMINFO = """MemTotal:       24684096 kB
MemFree:         1048576 kB
MemAvailable:    3670016 kB
Buffers:          123456 kB
"""


def test_free_memory_is_mem_available_capped_by_the_cgroup_with_fallbacks(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    monkeypatch.setattr(memory_module, "_MEMINFO", meminfo)
    monkeypatch.setattr(memory_module, "_PROC_CGROUP", tmp_path / "no cgroup file")
    monkeypatch.setattr(memory_module, "_CGROUP_ROOT", tmp_path / "no cgroups")
    assert doctor_report()["free_memory_gib"] == 3.5  # 3670016 kB; MemFree would give 1.0

    # A container's memory cgroup (v2) with 3 GiB of room less 0.5 GiB held: what generation and training count too.
    group = tmp_path / "cgroups"
    group.mkdir()
    (group / "memory.max").write_text(str(3 * 2**30))
    (group / "memory.current").write_text(str(2**29))
    monkeypatch.setattr(memory_module, "_CGROUP_ROOT", group)
    assert doctor_report()["free_memory_gib"] == 2.5

    pages = {"SC_AVPHYS_PAGES": 393216, "SC_PAGE_SIZE": 4096}  # 1.5 GiB, where there is no /proc (macOS)
    monkeypatch.setattr(memory_module, "_MEMINFO", tmp_path / "no meminfo")
    monkeypatch.setattr(memory_module, "_CGROUP_ROOT", tmp_path / "no cgroups")
    monkeypatch.setattr(memory_module.os, "sysconf", lambda name: pages[name])
    assert doctor_report()["free_memory_gib"] == 1.5

    def unsupported(name):
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(memory_module.os, "sysconf", unsupported)
    assert doctor_report()["free_memory_gib"] is None


def test_text_report_is_one_aligned_line_per_field(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KINEMA_HOME", str(tmp_path))
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    parsed = [re.fullmatch(r" *(\w+): (.*)", line) for line in lines]
    assert [found[1] for found in parsed] == FIELDS
    assert len({line.index(": ") for line in lines}) == 1  # keys right-aligned on the colon
    values = {found[1]: found[2] for found in parsed}
    assert values["torch"] == torch.__version__
    assert values["models_dir"] == str(tmp_path / "models")


@pytest.mark.parametrize("args", [["doctor", "--nope"], ["doctor", "extra"]])
def test_bad_usage_exits_2(capsys, args):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert f"unrecognized arguments: {args[1]}" in capsys.readouterr().err
