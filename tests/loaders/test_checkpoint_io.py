"""Safe checkpoint reading and atomic writing: formats, wrappers, dropped entries, refused pickles, broken files."""

import errno
import json
import os
import pickle
import re
import sys
import types

import pytest
import torch
from pickles import CodePayload
from safetensors.torch import save_file

from kinema.errors import KinemaError
from kinema.loaders import checkpoint_io
from kinema.loaders.checkpoint_io import WeightFiles, find_weights, read_checkpoint, read_state_dict, write_state_dict


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=gen), "b.bias": torch.randn(5, generator=gen).half(),
            "c.count": torch.arange(6)}


def assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt", ".pth", ".bin"])
def test_write_then_read_is_exact(tmp_path, suffix):
    path = write_state_dict(tensors(), tmp_path / f"w{suffix}")
    assert_same(read_state_dict(path), tensors())
    assert sorted(os.listdir(tmp_path)) == [f"w{suffix}"]  # the temporary file is gone


def test_safetensors_metadata_round_trips(tmp_path):
    path = write_state_dict(tensors(), tmp_path / "w.safetensors", {"kinema_layout": "motion-module", "n": "3"})
    # kinema_output marks the file as kinema's own, so that --overwrite may replace it (kinema.fileio)
    assert read_checkpoint(path).metadata == {"kinema_layout": "motion-module", "n": "3", "kinema_output": "weights"}
    with pytest.raises(KinemaError, match="only be stored in .safetensors"):
        write_state_dict(tensors(), tmp_path / "w.ckpt", {"a": "b"})


def test_the_same_weights_and_metadata_make_the_same_bytes(tmp_path):
    from safetensors import safe_open

    # safetensors writes metadata in a hash map's order, new on each write: six keys make 720 orders.
    tensors = {"b": torch.arange(4.0), "a": torch.ones(2, 3, dtype=torch.float16)}
    metadata = {key: f"value of {key}, é" for key in ("version", "zeta", "alpha", "motion_settings", "m", "n")}
    files = [write_state_dict(tensors, tmp_path / f"w{i}.safetensors", metadata) for i in range(6)]
    assert len({file.read_bytes() for file in files}) == 1
    with safe_open(files[0], "pt") as read:  # still what safetensors reads, with every key
        assert read.metadata() == {**metadata, "kinema_output": "weights"}
        assert all(torch.equal(read.get_tensor(name), tensor) for name, tensor in tensors.items())


def test_tensors_sharing_memory_are_written_as_their_own(tmp_path):
    # A torch file loads with one alpha object for every layer, tied weights and slices of one buffer; safetensors
    # refuses shared memory ("Some tensors share memory"), so convert failed on such files.
    alpha, flat = torch.tensor(2.0), torch.arange(12.0)
    shared = {"a.alpha": alpha, "b.alpha": alpha, "w": flat[:6].view(2, 3), "w2": flat[6:].view(3, 2),
              "tied": flat}
    torch.save(shared, tmp_path / "shared.pt")
    source = read_state_dict(tmp_path / "shared.pt")
    back = read_state_dict(write_state_dict(source, tmp_path / "out.safetensors"))
    assert back.keys() == shared.keys() and all(torch.equal(back[k], shared[k]) for k in shared)


def test_what_no_state_dict_holds_is_one_line(tmp_path):
    weights = tensors()
    for name, saved, said in (
            ("unnamed", {1: torch.zeros(1), **weights}, "holds a tensor under 1, which is no name"),
            ("sparse", {**weights, "s": torch.eye(3).to_sparse()}, "holds a sparse tensor (s), and weights are dense"),
            ("wrapped", {"model": weights, "epoch": 3}, "holds no tensors at its top level, but its entry 'model' is a "
                                                        f"dict of {len(weights)} tensors: save that dict alone")):
        torch.save(saved, tmp_path / f"{name}.ckpt")
        with pytest.raises(KinemaError) as err:
            read_checkpoint(tmp_path / f"{name}.ckpt")
        assert said in str(err.value) and "\n" not in str(err.value)
    # A trainer's state (a generator's state among other entries) is no wrapped state dict: nothing to unwrap.
    torch.save({"step": 3, "rng": {"torch": torch.zeros(8, dtype=torch.uint8), "python": (3, (1, 2), None)}},
               tmp_path / "state.pt")
    assert read_checkpoint(tmp_path / "state.pt").tensors == {}


def test_state_dict_wrapper_and_non_tensor_entries_are_dropped_and_noted(tmp_path):
    # AnimateDiff's train.py wraps the weights; v3 files carry an `animatediff_config` entry.
    torch.save({"state_dict": {**tensors(), "animatediff_config": {"motion_module_kwargs": {"heads": 8}}},
                "epoch": 3, "global_step": 1200}, tmp_path / "wrapped.ckpt")
    checkpoint = read_checkpoint(tmp_path / "wrapped.ckpt")
    assert_same(checkpoint.tensors, tensors())
    assert checkpoint.dropped == {"top-level epoch": "int", "top-level global_step": "int",
                                  "animatediff_config": "dict with 1 entries (0 tensors)"}


def die_half_way(real_writer):
    """A writer that writes the whole file, cuts it to half its size and fails, as a full disk or a killed process
    leaves a file behind."""

    def writer(tensors, target, *args, **kwargs):
        real_writer(tensors, target, *args, **kwargs)
        os.truncate(target, os.path.getsize(target) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    return writer


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_overwrite_is_atomic_and_replaces(tmp_path, monkeypatch, suffix):
    path = write_state_dict(tensors(0), tmp_path / f"w{suffix}")
    old_bytes = path.read_bytes()
    with pytest.raises(KinemaError, match="already exists"):
        write_state_dict(tensors(1), path)
    # The replacement fails half-way through writing: the old file is untouched and no temporary is left.
    with monkeypatch.context() as patch:
        if suffix == ".safetensors":
            patch.setattr(checkpoint_io, "save_file", die_half_way(checkpoint_io.save_file))
        else:
            patch.setattr(torch, "save", die_half_way(torch.save))
        with pytest.raises(KinemaError, match=re.escape(f"cannot write {path}: the disk is full")) as err:
            write_state_dict(tensors(1), path, overwrite=True)
    assert "kinema-part" not in str(err.value)  # names the user's file, not the temporary
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == [path.name]
    write_state_dict(tensors(1), path, overwrite=True)
    assert_same(read_state_dict(path), tensors(1))
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"a.weight": torch.zeros(2), "evil": CodePayload(str(marker))}
    if zip_format:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"evil": CodePayload(str(marker))}, f)
    with pytest.raises(KinemaError, match="refused to run code from the pickle") as err:
        read_state_dict(path)
    assert "safetensors" in str(err.value) and "kinema convert" in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()
    # The payload is live: an ordinary unpickle does create the file.
    pickle.loads(pickle.dumps(CodePayload(str(tmp_path / "control"))))
    assert (tmp_path / "control").exists()


def test_broken_files_name_the_file(tmp_path):
    write_state_dict(tensors(), tmp_path / "w.safetensors")
    torch.save(tensors(), tmp_path / "w.ckpt")
    for name in ("w.safetensors", "w.ckpt"):
        data = (tmp_path / name).read_bytes()
        truncated = tmp_path / f"cut-{name}"
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(KinemaError, match=f"cut-{name} .*truncated download") as caught:
            read_state_dict(truncated)
        assert "miniz" not in str(caught.value)  # torch's paragraph of advice is left out
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(KinemaError, match="empty.pt is empty"):
        read_state_dict(tmp_path / "empty.pt")
    (tmp_path / "lfs.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(KinemaError, match="Git LFS pointer"):
        read_state_dict(tmp_path / "lfs.safetensors")
    (tmp_path / "page.ckpt").write_text("<!DOCTYPE html><html>Not found</html>")
    with pytest.raises(KinemaError, match="HTML page"):
        read_state_dict(tmp_path / "page.ckpt")


def test_bad_paths_and_extensions(tmp_path):
    with pytest.raises(KinemaError, match="no such file"):
        read_state_dict(tmp_path / "missing.safetensors")
    with pytest.raises(KinemaError, match="is a folder"):
        read_state_dict(tmp_path)
    # The content decides, not the extension (tests/test_sniff.py: weights under other names load).
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(KinemaError, match=r"w.onnx is a text file, not weights; check the path"):
        read_state_dict(tmp_path / "w.onnx")
    with pytest.raises(KinemaError, match="unknown extension '.npz'"):
        write_state_dict(tensors(), tmp_path / "w.npz")
    with pytest.raises(KinemaError, match="not tensors"):
        write_state_dict({"a": 1}, tmp_path / "w.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(KinemaError, match="holds a list, not a dict of tensors"):
        read_state_dict(tmp_path / "list.pt")


def test_december_2023_v3_upload_gets_its_own_advice(tmp_path, monkeypatch):
    # That upload carried an OmegaConf DictConfig; stand in a class with the same import path.
    module = types.ModuleType("omegaconf.dictconfig")

    class DictConfig(dict):
        pass

    DictConfig.__module__, DictConfig.__qualname__ = module.__name__, "DictConfig"
    module.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    torch.save({**tensors(), "animatediff_config": DictConfig(a=1)}, tmp_path / "v3_sd15_mm.ckpt")
    with pytest.raises(KinemaError, match=r"it needs omegaconf\.dictconfig\.DictConfig.*download it again"):
        read_state_dict(tmp_path / "v3_sd15_mm.ckpt")


# ---------------------------------------------------------------- find_weights: a model folder's weights


def test_find_weights_takes_the_plain_file_before_a_variant_and_safetensors_before_bin(tmp_path):
    save_file(tensors(), tmp_path / "diffusion_pytorch_model.safetensors")
    save_file(tensors(), tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    torch.save(tensors(), tmp_path / "diffusion_pytorch_model.bin")
    found = find_weights(tmp_path, variants=(None, "fp16"))
    assert found == WeightFiles(tmp_path, (tmp_path / "diffusion_pytorch_model.safetensors",), None, None)
    assert found.shapes() == {"a.weight": (3, 4), "b.bias": (5,), "c.count": (6,)}
    header = found.header()
    assert header["b.bias"] == ((5,), "float16")
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    assert find_weights(tmp_path).files == (tmp_path / "diffusion_pytorch_model.bin",)
    assert find_weights(tmp_path).header() == header  # a pickle's names, shapes and dtypes, read


def test_find_weights_finds_an_fp16_variant_only_when_asked(tmp_path):
    save_file(tensors(), tmp_path / "model.fp16.safetensors")
    found = find_weights(tmp_path, stems=("model",), variants=(None, "fp16"))
    assert (found.files, found.variant) == ((tmp_path / "model.fp16.safetensors",), "fp16")
    with pytest.raises(KinemaError, match=r"has no weights file: looked for \['model.safetensors', 'model.bin'\] "
                                          r"\(or a sharded index of them\); it holds \['model.fp16.safetensors'\]"):
        find_weights(tmp_path, stems=("model",))


def write_shards(folder, variant: str = "") -> dict[str, str]:
    """Two shards of `tensors()` and their index, named as diffusers names them."""
    infix = f".{variant}" if variant else ""
    weight_map = {"a.weight": f"part-1{infix}.safetensors", "b.bias": f"part-2{infix}.safetensors",
                  "c.count": f"part-2{infix}.safetensors"}
    for shard in set(weight_map.values()):
        save_file({k: v for k, v in tensors().items() if weight_map[k] == shard}, folder / shard)
    (folder / f"diffusion_pytorch_model.safetensors.index{infix}.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


@pytest.mark.parametrize("variant", ["", "fp16"])
def test_find_weights_follows_a_sharded_index(tmp_path, variant):
    write_shards(tmp_path, variant)
    found = find_weights(tmp_path, variants=(variant or None,))
    infix = f".{variant}" if variant else ""
    assert found.index == tmp_path / f"diffusion_pytorch_model.safetensors.index{infix}.json"
    assert found.files == (tmp_path / f"part-1{infix}.safetensors", tmp_path / f"part-2{infix}.safetensors")
    assert found.variant == (variant or None)
    assert found.shapes() == {"a.weight": (3, 4), "b.bias": (5,), "c.count": (6,)}


def test_find_weights_refuses_a_broken_index_or_a_missing_shard(tmp_path):
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(KinemaError, match=r'index.json has no "weight_map" object .* restore it from the download'):
        find_weights(tmp_path)
    index.write_text("{not json")
    with pytest.raises(KinemaError, match="index.json .*is not valid JSON at line 1"):
        find_weights(tmp_path)
    write_shards(tmp_path)
    (tmp_path / "part-2.safetensors").unlink()
    with pytest.raises(KinemaError, match=r"lists shard\(s\) \['part-2.safetensors'\] that are not in .*; download"):
        find_weights(tmp_path)
    with pytest.raises(KinemaError, match="lists shard"):  # missing_ok is for no weights at all, not broken ones
        find_weights(tmp_path, missing_ok=True)


def test_find_weights_names_what_it_looked_for_when_there_is_nothing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KinemaError, match=r"has no weights file: looked for \['diffusion_pytorch_model.safetensors', "
                                          r"'diffusion_pytorch_model.bin'\] .*it holds \['config.json'\]"):
        find_weights(tmp_path)
    assert find_weights(tmp_path, missing_ok=True) is None
    with pytest.raises(KinemaError, match=r"missing has no weights file: .*it holds \[\]"):
        find_weights(tmp_path / "missing")
