"""`--device`: names checked before anything heavy, resolved to what this machine has (auto: the first CUDA GPU,
else the CPU), one line for a device the machine lacks, and the CLI's offload loading in CPU memory for the device."""

import pytest
import torch

from kinema.devices import check_device_name, resolve_device
from kinema.errors import KinemaError


@pytest.mark.parametrize(("name", "expected"), [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"),
                                                ("cuda:1", "cuda:1"), ("mps", "mps")])
def test_device_names(name, expected):
    assert check_device_name(name) == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda1", "tpu", "", "cpu:0", "cuda:01", "cuda:\u0663",
                                  "cuda:\uff11", "cuda:99999999999999999999"])
def test_unknown_device_names_are_one_line(name):
    with pytest.raises(KinemaError, match=r"^unknown device .*: use auto, cpu, cuda, cuda:N or mps$"):
        check_device_name(name)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_takes_the_first_gpu_when_there_is_one(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(KinemaError, match=r"^device cuda:2: this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1$"):
        resolve_device("cuda:2")


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(KinemaError, match=r"^device cuda: (this torch is built for the CPU only|no CUDA GPU is "
                                          r"visible); use --device cpu \(or auto\)$"):
        resolve_device("cuda")
    with pytest.raises(KinemaError, match=r"^device mps: Apple's MPS is not available here"):
        resolve_device("mps")


def test_the_family_cache_resolves_a_name_where_the_jobs_run(monkeypatch):
    from kinema.pipelines.jobs import FamilyCache

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert FamilyCache(device="auto").device == torch.device("cpu")
    assert FamilyCache(device=torch.device("cpu")).device == torch.device("cpu")
    with pytest.raises(KinemaError, match="device cuda:"):
        FamilyCache(device="cuda:0")


def test_an_offloaded_run_puts_its_tensors_on_the_offload_device(monkeypatch):
    """The weights wait in CPU memory, so the run's tensors go where the models run, not where the weights are."""
    from kinema.pipelines.family import VideoFamily
    from kinema.pipelines.generation import _device

    family = VideoFamily()
    family.model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(family) == _device(family, offload=True) == torch.device("cpu")  # no accelerator: stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device(family, offload=True) == torch.device("cuda")  # the library's default target
    family.offload_device = torch.device("cuda", 1)
    assert _device(family, offload=True) == torch.device("cuda", 1)
    assert _device(family) == torch.device("cpu")
    family.offload_device = torch.device("cpu")  # nowhere to offload to: the model's own device
    assert _device(family, offload=True) == torch.device("cpu")


def test_offload_with_no_accelerator_is_said_and_recorded_as_not_run(caplog):
    # The settings said offload: true for a run that offloaded nothing.
    import logging

    from kinema.bundled import bundled_model_path
    from kinema.pipelines import GenerationRequest, generate, load_family

    if torch.cuda.is_available():
        pytest.skip("an accelerator is here: offload runs")
    family = load_family(bundled_model_path("kinema-tiny"), device="cpu")
    with caplog.at_level(logging.WARNING):
        result = generate(family, GenerationRequest(prompt="a red circle moving right", frames=8, steps=1,
                                                    offload=True), progress=False)
    assert result.settings[0]["offload"] is False
    assert "offload: no accelerator here, so the models stay where they are" in caplog.text
