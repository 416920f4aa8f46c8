"""EasyAnimate V3 through kinema's front door (`kinema.loaders.describe` / `load`): transformer folders (one file or
shards), transformer files, Slice VAE folders (V3's or kinema's) and whole V3 folders.

Each result is compared with an independent reference: the tensors as written in the folder (read with
safetensors, not through kinema), starting from the folders EasyAnimate's own V3 code wrote
(tests/fixtures/easyanimate_v3), or the source models a folder was written from.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from pickles import CodePayload
from safetensors.torch import load_file, save_file
from test_easyanimate import run, source_model, write_full_folder

from kinema.errors import KinemaError
from kinema.loaders import describe, load
from kinema.loaders.easyanimate import EasyAnimateModel
from kinema.models.slice_vae import SliceVAE
from kinema.models.video_dit import VideoDiT

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "easyanimate_v3"
WEIGHTS = "diffusion_pytorch_model.safetensors"
PE_TABLE = ".pos_encoder.pe"


def as_written(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's weights as stored, V3's frame tables left out (kinema recomputes them)."""
    return {name: t for name, t in load_file(folder / WEIGHTS).items() if not name.endswith(PE_TABLE)}


def assert_holds_exactly(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in expected.items())


def write_shards(source: Path, target: Path, parts: int = 3) -> Path:
    """`source`'s transformer folder written as a diffusers sharded checkpoint: `parts` safetensors files and the
    index naming the file of every tensor."""
    target.mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")
    tensors = load_file(source / WEIGHTS)
    names = sorted(tensors)
    weight_map = {}
    for part in range(parts):
        file = f"diffusion_pytorch_model-{part + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[part::parts]
        save_file({name: tensors[name] for name in chunk}, target / file)
        weight_map |= dict.fromkeys(chunk, file)
    (target / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def test_v3_transformer_folder_and_file_load_as_written():
    expected = as_written(FIXTURES / "transformer")
    for path in (FIXTURES / "transformer", FIXTURES / "transformer" / WEIGHTS):
        model = load(path)
        assert isinstance(model, VideoDiT) and not model.training
        assert_holds_exactly(model, expected)  # float16 as stored: the front door casts nothing unasked
    assert {p.dtype for p in load(FIXTURES / "transformer", dtype=torch.float32).parameters()} == {torch.float32}


def test_sharded_transformer_folder_is_described_and_loaded_like_the_single_file(tmp_path):
    sharded = write_shards(FIXTURES / "transformer", tmp_path / "transformer")
    single = describe(FIXTURES / "transformer")
    report = describe(sharded)
    assert report["path"] == str(sharded / f"{WEIGHTS}.index.json")
    assert {k: v for k, v in report.items() if k != "path"} == {k: v for k, v in single.items() if k != "path"}
    assert report["keys"] == 1417 and report["pe_buffers"] == 2 * 28 and "not_checked" not in report
    assert_holds_exactly(load(sharded), as_written(FIXTURES / "transformer"))
    # The shards are checked as a load checks a single file: one missing tensor is named.
    index = json.loads((sharded / f"{WEIGHTS}.index.json").read_text())
    first = sharded / "diffusion_pytorch_model-00001-of-00003.safetensors"
    tensors = load_file(first)
    dropped = next(name for name in tensors if not name.endswith(PE_TABLE))
    del tensors[dropped]
    save_file(tensors, first)
    assert dropped in index["weight_map"]
    for front_door in (describe, load):
        with pytest.raises(KinemaError, match=rf"does not match the video DiT its config describes: 1 missing "
                                              rf"\(e.g. {dropped}\)"):
            front_door(sharded)


def test_a_transformer_file_is_known_by_its_bytes_whatever_its_suffix(tmp_path):
    # It was told by its suffix alone: named .ckpt or .SAFETENSORS it was "not a format kinema knows".
    expected = as_written(FIXTURES / "transformer")
    for name in ("transformer.ckpt", "t.SAFETENSORS"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        shutil.copy(FIXTURES / "transformer" / "config.json", folder / "config.json")
        shutil.copy(FIXTURES / "transformer" / WEIGHTS, folder / name)
        assert describe(folder / name)["kind"] == describe(FIXTURES / "transformer")["kind"]
        assert_holds_exactly(load(folder / name), expected)


def test_lone_transformer_file_is_described_but_needs_its_config_to_load(tmp_path):
    lone = tmp_path / "v3_transformer.safetensors"
    shutil.copy(FIXTURES / "transformer" / WEIGHTS, lone)
    assert "not_checked" in describe(lone)
    with pytest.raises(KinemaError, match="has no config.json beside it") as err:
        load(lone)
    assert "\n" not in str(err.value)


def test_v3_slice_vae_folder_loads_as_written():
    expected = as_written(FIXTURES / "vae")
    assert {t.dtype for t in expected.values()} == {torch.float16}
    report = describe(FIXTURES / "vae")
    assert (report["kind"], report["keys"], report["dtype"]) == ("slice_vae", len(expected), "float16")
    vae = load(FIXTURES / "vae")
    assert isinstance(vae, SliceVAE) and not vae.training
    # float32 by default (as load_slice_vae); float16 on request gives the stored bits back.
    assert_holds_exactly(vae, {name: t.float() for name, t in expected.items()})
    assert_holds_exactly(load(FIXTURES / "vae", dtype=torch.float16), expected)


def test_kinema_saved_slice_vae_folder_loads_through_the_front_door(tmp_path):
    source = load(FIXTURES / "vae")
    source.save_pretrained(tmp_path / "vae")
    assert describe(tmp_path / "vae")["kind"] == "slice_vae"
    assert_holds_exactly(load(tmp_path / "vae"), source.state_dict())
    assert_holds_exactly(SliceVAE.from_pretrained(tmp_path / "vae"), source.state_dict())


def test_whole_v3_folder_loads_as_an_easyanimate_model(tmp_path):
    model = source_model()
    parts = write_full_folder(tmp_path, model)
    assert describe(tmp_path)["kind"] == "easyanimate_transformer"
    loaded = load(tmp_path)
    assert isinstance(loaded, EasyAnimateModel)
    assert_holds_exactly(loaded.transformer, model.state_dict())
    assert_holds_exactly(loaded.vae, parts["vae"].state_dict())
    assert_holds_exactly(loaded.image_encoder, parts["image_encoder"].state_dict())
    torch.testing.assert_close(run(loaded.transformer), run(model), rtol=1e-6, atol=1e-6)
    # The transformer/ inside it alone is a transformer folder, not the whole model.
    assert isinstance(load(tmp_path / "transformer"), VideoDiT)
    # A T5 shard gone is named by describe (inspect once passed such a folder; only the load refused it).
    shard = sorted((tmp_path / "text_encoder").glob("model.fp16-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(KinemaError, match=f"lists shard\\(s\\) \\['{shard.name}'\\] that are not in"):
        describe(tmp_path)


def test_a_v3_folder_whose_transformer_weights_are_missing_says_so(tmp_path):
    # Without them the folder's vae/ once answered, and the model was called "a Slice VAE folder".
    write_full_folder(tmp_path, source_model())
    weights = next((tmp_path / "transformer").glob("*.safetensors"))
    weights.rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(KinemaError, match=r"transformer has no weights file: looked for \['diffusion_pytorch_model"):
        describe(tmp_path)
    (tmp_path / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(KinemaError, match=r"transformer has no diffusion_pytorch_model.safetensors.*convert a .bin"):
        describe(tmp_path)


@pytest.mark.parametrize(("part", "edit", "message"), [
    ("text_encoder", "d_model", r"the text encoder weights in \S+text_encoder: \d+ mismatched .*its config.json and "
                                r"weights come from different models"),
    ("image_encoder", "projection_dim", r"the image encoder weights in \S+image_encoder: 1 mismatched"),
    ("text_encoder", None, r"the text encoder folder \S+text_encoder has no config.json \(a partial download\?\)"),
])
def test_an_encoder_folder_that_does_not_fit_its_config_is_one_line(tmp_path, part, edit, message):
    # transformers printed a table of mismatches and raised its own RuntimeError; without config.json it built a
    # default T5 and failed on shapes.
    write_full_folder(tmp_path, source_model())
    config = tmp_path / part / "config.json"
    if edit is None:
        config.unlink()
    else:
        values = json.loads(config.read_text())
        values[edit] += 16
        config.write_text(json.dumps(values))
    with pytest.raises(KinemaError, match=message):
        load(tmp_path)


def test_an_encoder_pickle_that_needs_code_is_refused_in_kinemas_words(tmp_path):
    import pickle

    write_full_folder(tmp_path, source_model())
    marker = tmp_path / "pwned"
    for weights in (tmp_path / "image_encoder").glob("*.safetensors"):
        weights.unlink()
    (tmp_path / "image_encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"evil": CodePayload(str(marker))},
                                                                                protocol=2))
    with pytest.raises(KinemaError, match=r"^refused to run code from the pickle in \S+pytorch_model.bin \(it needs "
                                          r"io.open\)"):
        load(tmp_path)
    assert not marker.exists()

