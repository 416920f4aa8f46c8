"""Tests for kinema/models/optimize.py: the compile cache folder and its rules (one graph per input shape, no
recompile per step, a missing C++ compiler), int8 quantisation of the bundled DiT (which layers, how close to
float32, a generate() run), and (slow) the compiled bundled DiT against eager with its cache reused by a second
process."""

import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from kinema.bundled import bundled_model_path
from kinema.errors import KinemaError
from kinema.models import optimize
from kinema.models.optimize import compile_cache_dir, compile_model, int8_float_layers, int8_layers, quantize_model
from kinema.models.video_dit import VideoDiT


@pytest.fixture
def bundled_dit() -> VideoDiT:
    return VideoDiT.from_pretrained(bundled_model_path("kinema-tiny") / "transformer").eval()


def bundled_inputs(dit: VideoDiT, seed: int = 0, frames: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CFG-sized inputs of the bundled kinema-tiny DiT: 2 clips of its input channels (latents + inpaint) at its
    latent size, 32 text tokens of its caption width."""
    gen = torch.Generator().manual_seed(seed)
    config = dit.config
    return (torch.randn(2, config.in_channels, frames, config.sample_size, config.sample_size, generator=gen),
            torch.tensor(500), torch.randn(2, 32, config.caption_channels, generator=gen))


@pytest.fixture
def inductor_env(monkeypatch):
    """compile_model sets TORCHINDUCTOR_CACHE_DIR for the process: give it back after the test."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- compile


def test_compile_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    for variable in ("KINEMA_COMPILE_CACHE", "KINEMA_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache_dir() == tmp_path / "home" / ".cache" / "kinema" / "compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir() == tmp_path / "xdg" / "kinema" / "compile"
    monkeypatch.setenv("KINEMA_HOME", str(tmp_path / "kh"))
    assert compile_cache_dir() == tmp_path / "kh" / "compile"
    monkeypatch.setenv("KINEMA_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_compile_is_in_place_and_points_inductor_at_the_kinema_folder(video_dit, tmp_path, inductor_env):
    import os

    assert compile_model(video_dit, cache_dir=tmp_path / "cache", backend="eager") is video_dit
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((tmp_path / "cache").resolve())
    assert (tmp_path / "cache").is_dir() and video_dit.max_frames > 0  # still the VideoModel it was


class FrameMixer(nn.Module):
    """A stand-in video model: attention-like mixing over frames of `(B, C, F)`, scaled by the timestep."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(sample.transpose(1, 2))  # (B, F, C)
        weights = torch.softmax(tokens @ tokens.transpose(1, 2), dim=-1)  # (B, F, F)
        return (weights @ tokens).transpose(1, 2) * timestep


def test_one_graph_per_input_shape_and_none_per_timestep(tmp_path, inductor_env):
    # dynamic=False: each frame count is its own bucket; a new timestep tensor (each sampling step) reuses its graph.
    counter = CompileCounter()
    model = compile_model(FrameMixer(), cache_dir=tmp_path, backend=counter)
    with torch.inference_mode():
        model(torch.randn(2, 4, 8), torch.tensor(900.0))
        model(torch.randn(2, 4, 8), torch.tensor(100.0))
        assert counter.frame_count == 1
        model(torch.randn(2, 4, 12), torch.tensor(100.0))
        model(torch.randn(2, 4, 12), torch.tensor(50.0))
        assert counter.frame_count == 2


@pytest.mark.slow
def test_the_dit_compiles_once_per_frame_count_not_per_step(video_dit, tmp_path, inductor_env):
    counter = CompileCounter()  # counts graphs: the DiT breaks into a few per shape
    compile_model(video_dit, cache_dir=tmp_path, backend=counter)
    text = torch.randn(2, 5, 48)
    with torch.inference_mode():
        video_dit(torch.randn(2, 4, 2, 8, 8), torch.tensor(900), text)
        first = counter.frame_count
        video_dit(torch.randn(2, 4, 2, 8, 8), torch.tensor(100), text)
        assert counter.frame_count == first
        video_dit(torch.randn(2, 4, 3, 8, 8), torch.tensor(100), text)
        assert counter.frame_count > first


def test_missing_compiler_is_one_error_before_any_work_or_a_logged_fallback(video_dit, tmp_path, monkeypatch,
                                                                            inductor_env, caplog):
    monkeypatch.setattr(optimize, "has_cpp_compiler", lambda: False)
    with pytest.raises(KinemaError, match="C\\+\\+ compiler") as error:
        compile_model(video_dit, cache_dir=tmp_path / "never")
    assert "\n" not in str(error.value) and not (tmp_path / "never").exists()
    with caplog.at_level(logging.WARNING, logger="kinema"):
        assert compile_model(video_dit, cache_dir=tmp_path / "never", on_missing_compiler="eager") is video_dit
    assert "uncompiled" in caplog.text and not (tmp_path / "never").exists()
    assert getattr(video_dit, "_compiled_call_impl", None) is None


def test_a_real_compiler_is_found_here():
    assert optimize.has_cpp_compiler()  # gcc is on every machine the suite runs on (inductor needs it)


# A second process: compiles the bundled DiT with the cache folder in argv[1], prints the largest difference from
# eager and inductor's cache counters as JSON.
COMPILE_SCRIPT = """
import json, sys
import torch
from torch._dynamo.utils import counters
from kinema.bundled import bundled_model_path
from kinema.models.optimize import compile_model
from kinema.models.video_dit import VideoDiT
torch.set_num_threads(1)
model = VideoDiT.from_pretrained(bundled_model_path("kinema-tiny") / "transformer").eval()
gen = torch.Generator().manual_seed(0)
sample, text = torch.randn(2, 24, 4, 8, 8, generator=gen), torch.randn(2, 32, 384, generator=gen)
with torch.inference_mode():
    eager = model(sample, torch.tensor(500), text)
    compile_model(model, cache_dir=sys.argv[1])
    compiled = model(sample, torch.tensor(500), text)
print(json.dumps({"max_difference": (compiled - eager).abs().max().item(), "scale": eager.abs().max().item(),
                  "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
def test_compiled_bundled_dit_equals_eager_and_a_second_process_reuses_the_cache(tmp_path):
    cache = tmp_path / "compile"

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(cache)], capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = run()
    entries = sorted(path.name for path in cache.iterdir())
    second = run()
    # Inductor fuses and reorders float32 sums: measured 1.3e-6 on outputs of magnitude ~4.
    assert first["max_difference"] < 1e-4 and second["max_difference"] < 1e-4
    assert first["misses"] > 0 and "fxgraph" in entries and "aotautograd" in entries
    assert second["misses"] == 0 and second["hits"] == first["misses"] + first["hits"]


# ---------------------------------------------------------------------------------------------------- int8


def test_int8_replaces_every_eligible_linear_and_keeps_the_rest(bundled_dit):
    quantized, kept = int8_layers(bundled_dit), int8_float_layers(bundled_dit)
    # the rule: embeddings of the timestep and of the text, the top-level output projection and layers narrower
    # than MIN_INT8_FEATURES stay float; a motion module's own proj_out is quantised.
    assert set(kept) == {"proj_out", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
                         "adaln_single.emb.timestep_embedder.linear_2", "caption_projection.linear_1",
                         "caption_projection.linear_2"}
    assert "transformer_blocks.0.attn_temporal.temporal_transformer.proj_out" in quantized
    assert "transformer_blocks.0.ff.net.0.proj" in quantized
    assert len(quantized) + len(kept) == sum(isinstance(layer, nn.Linear) for layer in bundled_dit.modules())
    assert quantize_model(bundled_dit) is bundled_dit
    layers = dict(bundled_dit.named_modules())
    assert all(type(layers[name]) is DynamicInt8Linear for name in quantized)
    assert all(type(layers[name]) is nn.Linear for name in kept)


def test_narrow_layers_embeddings_and_the_output_projection_stay_float():
    model = nn.Sequential(nn.Linear(64, 512), nn.Linear(512, 128), nn.Linear(128, 127))
    assert int8_layers(model) == ["1"] and int8_float_layers(model) == ["0", "2"]
    assert int8_layers(model, min_features=1) == ["0", "1", "2"]
    wide = nn.ModuleDict({"block": nn.ModuleDict({"proj_out": nn.Linear(256, 256)}), "proj_out": nn.Linear(256, 256),
                          "time_embedding": nn.Sequential(nn.Linear(256, 256))})
    assert int8_layers(wide) == ["block.proj_out"]  # only the model's own output projection is kept
    assert int8_float_layers(wide) == ["proj_out", "time_embedding.0"]


def test_int8_bundled_dit_is_close_to_float32_and_quiet(bundled_dit):
    sample, timestep, text = bundled_inputs(bundled_dit)
    with torch.inference_mode():
        reference = bundled_dit(sample, timestep, text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch.ao's deprecation warnings are hidden, nothing else is
            quantize_model(bundled_dit)
            out = bundled_dit(sample, timestep, text)
    relative = ((out - reference).norm() / reference.norm()).item()
    # Measured 0.034-0.037 (relative L2) over 4 input seeds on the sixth session's shipped v-prediction DiT
    # (0.028-0.030 on the fifth's, 0.0070-0.0074 on the first, epsilon one); 0.06 leaves 1.6x room and is still far
    # below the difference a wrong layer makes (an unquantised run gives 0, a broken scale gives > 0.5).
    assert 0 < relative < 0.06


def test_int8_refuses_what_it_cannot_run(bundled_dit):
    with pytest.raises(KinemaError, match="unknown quantisation 'int4'"):
        quantize_model(bundled_dit, "int4")
    with pytest.raises(KinemaError, match="needs a float32 model"):
        quantize_model(bundled_dit.to(torch.bfloat16))
    with torch.device("meta"):  # not the CPU, as a GPU is not: the int8 kernels are CPU-only
        elsewhere = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(KinemaError, match=r"^--quantize int8 runs on the CPU only \(torch's dynamic int8 kernels\), "
                                          r"and --device is meta: drop --quantize, or give --device cpu$"):
        quantize_model(elsewhere)


def test_generate_runs_end_to_end_on_an_int8_model():
    from kinema.pipelines.generation import generate
    from kinema.pipelines.load import load_family
    from kinema.pipelines.request import GenerationRequest

    family = load_family("kinema-tiny")
    quantize_model(family.model)
    result = generate(family, GenerationRequest(prompt="a red circle moving right", frames=8, steps=2, height=64,
                                                width=64))
    assert any(type(layer) is DynamicInt8Linear for layer in family.model.modules())
    assert result.frames.shape == (1, 8, 3, 64, 64) and torch.isfinite(result.latents).all()


def test_a_family_an_earlier_request_left_int8_records_int8_in_later_settings():
    # int8 stays on the family; a later request's settings that said quantize null would remake another video.
    from dataclasses import replace

    from kinema.pipelines import GenerationRequest, generate, load_family

    family = load_family(bundled_model_path("kinema-tiny"), device="cpu")
    request = GenerationRequest(prompt="a red circle moving right", frames=8, steps=1, seeds=[3])
    generate(family, replace(request, quantize="int8"), progress=False)
    later = generate(family, request, progress=False)
    assert later.report["int8"] and (later.settings[0]["quantize"], later.settings[0]["compile"]) == ("int8", False)
    remade = generate(load_family(bundled_model_path("kinema-tiny"), device="cpu"),
                      replace(request, quantize="int8"), progress=False)
    assert torch.equal(remade.frames, later.frames)
