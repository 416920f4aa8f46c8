"""kinema.sniff and the readers built on it: a file is read by its content, and everything that is not weights gets
the one line that says what it is, end to end through read_checkpoint / read_state_dict / tensor_names / describe.

The bad files are what real downloads leave: an S3 `AccessDenied` XML page (the body S3 sends for an expired or
private link), a Git LFS pointer (the three lines git writes without git-lfs), HTML, server JSON errors, text,
truncated safetensors. Expected numbers (sizes, header lengths, first bytes) are computed here from the bytes
written, independently of kinema's parser.
"""

import gzip
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from loaders.animatediff.animatediff_fixtures import original_motion_state_dict
from loaders.easyanimate.test_easyanimate import v3_config
from loaders.test_checkpoint_io import assert_same as assert_exact
from loaders.test_checkpoint_io import tensors
from pickles import CodePayload
from safetensors.torch import load_file, save_file

from kinema.errors import KinemaError
from kinema.loaders.checkpoint_io import read_checkpoint, read_safetensors_header, read_state_dict, tensor_names
from kinema.loaders.easyanimate.transformer import load_video_dit
from kinema.loaders.source import describe
from kinema.sniff import Kind, pickled_tensor_names, sniff

S3_ACCESS_DENIED = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
                    '</Message><RequestId>4442587FB7D0A2F9</RequestId><HostId>abc=</HostId></Error>')
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 2436581392\n")
READERS = [read_checkpoint, read_state_dict, tensor_names]


def refusals(path: Path, readers=READERS) -> list[str]:
    """The message each reader raises for `path`; each must be one KinemaError line naming the path."""
    messages = []
    for reader in readers:
        with pytest.raises(KinemaError) as err:
            reader(path)
        message = str(err.value)
        assert str(path) in message and "\n" not in message, (reader.__name__, message)
        assert "pickle" not in message.lower(), message  # none of these files is a pickle
        messages.append(message)
    return messages


def test_xml_error_page_saved_as_ckpt(tmp_path):
    path = tmp_path / "v3_sd15_mm.ckpt"
    path.write_text(S3_ACCESS_DENIED)
    assert sniff(path).kind is Kind.XML and not sniff(path).is_weights
    for message in refusals(path, READERS + [describe]):
        assert message.startswith(f"{path} is an XML error page from the download server (AccessDenied: Access "
                                  "Denied), not weights; download the file again"), message


def test_safetensors_named_ckpt_loads_bit_exactly(tmp_path):
    for suffix in (".ckpt", ".pt", ".bin", ".weights", ""):
        path = tmp_path / f"w{suffix}"
        save_file(tensors(), str(path), metadata={"note": "named " + suffix})
        assert sniff(path).kind is Kind.SAFETENSORS
        checkpoint = read_checkpoint(path)
        assert_exact(checkpoint.tensors, load_file(str(path)))  # safetensors' own reader as the reference
        assert_exact(checkpoint.tensors, tensors())
        assert checkpoint.metadata == {"note": "named " + suffix} and checkpoint.dropped == {}
        assert tensor_names(path) == sorted(tensors())  # from the header, as for .safetensors
        assert read_safetensors_header(path)["a.weight"] == ((3, 4), "F32")


def test_safetensors_motion_module_named_ckpt_is_described(tmp_path):
    state = original_motion_state_dict("v2")
    save_file(state, str(tmp_path / "mm_sd_v15_v2.safetensors"))
    save_file(state, str(tmp_path / "mm_sd_v15_v2.ckpt"))
    named_right = describe(tmp_path / "mm_sd_v15_v2.safetensors")
    named_wrong = describe(tmp_path / "mm_sd_v15_v2.ckpt")
    assert named_wrong["kind"] == "motion_module" and named_wrong["version"] == "v2"
    assert {**named_wrong, "path": ""} == {**named_right, "path": ""}
    # and the other way round: a torch checkpoint named .safetensors, and safetensors under a name kinema does not
    # list, are described by their content too
    torch.save(state, tmp_path / "torch_inside.safetensors")
    save_file(state, str(tmp_path / "mm_sd_v15_v2.weights"))
    for name in ("torch_inside.safetensors", "mm_sd_v15_v2.weights"):
        assert {**describe(tmp_path / name), "path": ""} == {**named_right, "path": ""}, name


def test_torch_checkpoints_load_whatever_their_name(tmp_path):
    zipped, legacy = tmp_path / "zipped.safetensors", tmp_path / "legacy.weights"
    torch.save(tensors(), zipped)
    torch.save(tensors(), legacy, _use_new_zipfile_serialization=False)
    assert sniff(zipped).kind is Kind.TORCH_ZIP and sniff(legacy).kind is Kind.PICKLE
    for path in (zipped, legacy):
        assert_exact(read_state_dict(path), tensors())
        assert tensor_names(path) is None  # names of a torch file need the whole file
    with pytest.raises(KinemaError, match=r"zipped.safetensors is a torch checkpoint \(zip format\), but this is read "
                                          "from safetensors files only; save its tensors as safetensors"):
        read_safetensors_header(zipped)


def test_pickle_needing_code_is_refused_whatever_its_name(tmp_path):
    marker = tmp_path / "pwned"
    # Protocol 4+ pickles (pickle.dump's default) start with a FRAME opcode, where torch's unpickler stops.
    for name, protocol in (("evil.safetensors", 2), ("evil.pt", 4), ("evil.bin", 5)):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"a": 1, "evil": CodePayload(str(marker))}, protocol=protocol))
        assert sniff(path).kind is Kind.PICKLE and sniff(path).what == "a Python pickle"
        for reader in (read_checkpoint, read_state_dict, describe):
            with pytest.raises(KinemaError) as err:
                reader(path)
            assert str(err.value).startswith(f"refused to run code from the pickle in {path} (it needs io.open): ")
        assert tensor_names(path) is None  # a pickle's names are not read without unpickling it
    # A torch zip checkpoint's tensor names are read by disassembling its pickle: the payload in it stays inert, and
    # the string it is stored under names no tensor.
    torch.save({"conv_in.weight": torch.zeros(1)}, tmp_path / "evil.ckpt")
    with zipfile.ZipFile(tmp_path / "evil.ckpt") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    inner = next(name for name in members if name.endswith("data.pkl"))
    members[inner] = pickle.dumps({"conv_in.weight": CodePayload(str(marker))}, protocol=2)
    with zipfile.ZipFile(tmp_path / "evil.ckpt", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert pickled_tensor_names(tmp_path / "evil.ckpt") == frozenset()
    assert not marker.exists()
    # A data.pkl zipfile cannot read (here a compression method it lacks) is left to the loader, whose line names it.
    whole = bytearray((tmp_path / "evil.ckpt").read_bytes())
    central = whole.index(b"PK\x01\x02")  # the first central-directory entry: data.pkl, torch writes it first
    whole[central + 10:central + 12] = (99).to_bytes(2, "little")
    (tmp_path / "odd.ckpt").write_bytes(bytes(whole))
    assert pickled_tensor_names(tmp_path / "odd.ckpt") is None
    pickle.loads(pickle.dumps(CodePayload(str(tmp_path / "control"))))  # the payload is live
    assert (tmp_path / "control").exists()


def test_text_file_named_pt(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("some notes about the model.\nsecond line\n")
    for message in refusals(path, READERS + [describe]):
        assert message.startswith(f"{path} is a text file, not weights; check the path"), message
        assert "some notes" not in message  # never its text: a server says this of any path a client names


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_text(LFS_POINTER)
    for message in refusals(path, READERS + [read_safetensors_header, describe]):
        assert message.startswith(f"{path} is a Git LFS pointer, not the weights (the real file is 2.44 GB); run "
                                  "`git lfs install` and `git lfs pull`"), message


def test_easyanimate_folder_cloned_without_git_lfs(tmp_path):
    transformer = tmp_path / "EasyAnimateV3-XL-2-InP-512x512" / "transformer"
    transformer.mkdir(parents=True)
    (transformer / "config.json").write_text(json.dumps(v3_config()))
    weights = transformer / "diffusion_pytorch_model.safetensors"
    weights.write_text(LFS_POINTER)
    for message in refusals(transformer.parent, [describe, load_video_dit]):
        assert message.startswith(f"{weights} is a Git LFS pointer, not the weights"), message


@pytest.mark.parametrize("name, content, expected", [
    ("utf8-bom.ckpt", b"\xef\xbb\xbf" + json.dumps({"_class_name": "MotionAdapter"}).encode(),
     "is a JSON file (UTF-8 with a byte-order mark), not weights; a config.json goes beside the weights"),
    ("utf16.pt", "héllo wörld\r\nline two\r\n".encode("utf-16"),
     "is a text file (UTF-16), not weights; check the path"),
    ("index.bin", json.dumps({"metadata": {"total_size": 8}, "weight_map": {"a": "m-00001-of-00002.safetensors"}})
     .encode(), "is the index of a sharded checkpoint (a JSON list of shard files), not weights; point at the folder"),
    ("hub.ckpt", b'{"error":"Repository Not Found for url: https://huggingface.co/api/models/x."}',
     "is a JSON error from the download server (Repository Not Found for url: https://huggingface.co/api/models/x.)"
     ", not weights; download the file again"),
    ("page.safetensors", b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>",
     "is an HTML page (title: '404 Not Found'), not weights; the download saved a web page"),
    ("empty.pt", b"", "is empty (0 bytes); the download or save did not finish"),
    ("w.safetensors.gz", gzip.compress(b"\x00" * 64, mtime=0), "is a gzip-compressed file, not weights; decompress it"),
    ("w.gguf", b"GGUF\x03\x00\x00\x00" + bytes(64), "is a GGUF file (quantised weights for llama.cpp"),
])
def test_not_weights_get_their_one_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    for message in refusals(path):
        assert message.startswith(f"{path} {expected}"), message


@pytest.mark.parametrize(("suffix", "what"), [
    (".mp4", "an MP4 / MOV video"), (".webm", "a WebM / Matroska video"), (".gif", "a GIF image or animation"),
    (".webp", "a WebP image or animation"),
])
def test_a_video_named_as_weights_is_called_a_video(tmp_path, suffix, what):
    """A real clip (written by kinema's video writer) saved under a weights name."""
    from kinema.data.video_io import write_video

    write_video(torch.zeros(2, 3, 16, 16), tmp_path / f"clip{suffix}")
    path = (tmp_path / f"clip{suffix}").rename(tmp_path / "mm_sd_v15_v2.ckpt")
    for message in refusals(path):
        assert message == (f"{path} is {what}, not weights; check the path (`kinema extend` and `kinema v2v` take "
                           f"videos)"), message


def test_random_bytes_are_unknown_binary(tmp_path):
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    path = tmp_path / "noise.ckpt"
    path.write_bytes(data.tobytes())
    shown = " ".join(f"{b:02x}" for b in data[:8])
    for message in refusals(path):
        assert message == (f"{path} is not a weights file kinema reads: neither safetensors nor a torch checkpoint "
                           f"(it starts with the bytes {shown}); give a .safetensors, .ckpt, .pt, .pth or .bin file")


def test_zip_that_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", "weights inside")
        archive.writestr("model.onnx", b"\x08\x07")
    for message in refusals(path):
        assert message == (f"{path} is a zip archive, not a torch checkpoint (it holds 2 files: README.txt, "
                           "model.onnx); unpack it and point at the weights inside")


def test_truncated_and_overlong_safetensors(tmp_path):
    full = tmp_path / "full.safetensors"
    save_file(tensors(), str(full))
    data = full.read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])
    cases = {
        "cut-data.safetensors": (data[:-5], f"whose header says {len(data)} bytes but the file has {len(data) - 5}: "
                                            "truncated download; download the file again"),
        "cut-header.safetensors": (data[:20], f"whose header says it is at least {8 + header_length} bytes but the "
                                              "file has 20: truncated download"),
        "longer.safetensors": (data + b"\x00" * 3, f"whose header says {len(data)} bytes but the file has "
                                                   f"{len(data) + 3}: something was written after its end"),
        "bad-header.safetensors": (data[:8] + b"{" + b"x" * (len(data) - 9), "with a damaged header"),
        # json.loads recursed past Python's limit: a RecursionError with a traceback
        "nested.safetensors": (struct.pack("<Q", 100_006) + b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                               "with a damaged header (not the JSON"),
        # These two were called "neither safetensors nor a torch checkpoint".
        "huge-length.safetensors": (struct.pack("<Q", 2**62) + data[8:], "with a damaged header (its length field "
                                                                         f"says {2**62} bytes"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for message in refusals(path, READERS + [read_safetensors_header]):
            assert message.startswith(f"{path} is a safetensors file {expected}"), message


def test_a_safetensors_file_cut_inside_its_length_field_is_called_cut(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tensors(), str(path))
    path.write_bytes(path.read_bytes()[:8])
    assert sniff(path).kind is Kind.SAFETENSORS_DAMAGED
    for message in refusals(path, READERS + [read_safetensors_header]):
        assert message.startswith(f"{path} is a .safetensors file cut short or with a damaged header (8 bytes"), message


def test_a_truncated_torch_checkpoint_is_one_line_without_torchs_advice(tmp_path):
    path = tmp_path / "w.ckpt"
    torch.save(tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError) as torch_error:  # the reference: torch's paragraph of advice
        torch.load(path, weights_only=True)
    assert len(str(torch_error.value)) > 300 and "central directory" in str(torch_error.value)
    with pytest.raises(KinemaError) as err:
        read_state_dict(path)
    assert str(err.value) == (f"{path} is a torch checkpoint (zip) without its end, which a whole file has: a "
                              "truncated download or copy; download it again")


def test_damaged_pickle_is_not_called_code(tmp_path):
    path = tmp_path / "w.ckpt"
    path.write_bytes(b"\x80\x02" + b"garbage here" * 3)  # a pickle header, then bytes that are no pickle opcodes
    with pytest.raises(KinemaError) as err:
        read_state_dict(path)
    assert str(err.value) == (f"{path} is not a readable torch checkpoint (corrupt or truncated?): "
                              "Unsupported operand 103")  # opcode 103 is "g", the first garbage byte


def test_sniff_reads_only_the_head_of_a_text_file(tmp_path):
    # A 1 MB log saved as weights: known as text though the head ends mid-line and mid-character.
    path = tmp_path / "log.bin"
    path.write_text("é" * (1 << 20))
    found = sniff(path)
    assert found.kind is Kind.TEXT and found.diagnosis.startswith(f"{path} is a text file, not weights; check")


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "(the Slice VAE's config) holds an array, not an object of named fields"),
    ('{"ch": 8,', "(the Slice VAE's config) is not valid JSON at line 1 column 10"),
    (LFS_POINTER, "(the Slice VAE's config) is a Git LFS pointer"),
])
def test_slice_vae_config_that_is_not_an_object(tmp_path, text, expected):
    from kinema.loaders.easyanimate.vae import is_slice_vae_folder, load_slice_vae

    (tmp_path / "config.json").write_text(text)
    save_file(tensors(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert not is_slice_vae_folder(tmp_path)  # detection never raises
    with pytest.raises(KinemaError) as err:
        load_slice_vae(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'config.json'} {expected}"), str(err.value)


@pytest.mark.parametrize(("config", "expected"), [
    (["PNDMScheduler"], r"scheduler_config.json \(the scheduler's config\) holds an array, not an object"),
    ({"num_train_timesteps": 1000}, r"scheduler_config.json is not a diffusers scheduler config: that is a JSON "
                                    r'object naming its class, e.g. \{"_class_name": "PNDMScheduler"'),
])
def test_scheduler_config_without_a_class_name(tmp_path, config, expected):
    from kinema.loaders.stable_diffusion import _load_scheduler

    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(KinemaError, match=expected):
        _load_scheduler(tmp_path)


def test_single_file_model_is_sniffed_before_the_tokenizer(tmp_path):
    from kinema.loaders.stable_diffusion import load_stable_diffusion

    path = tmp_path / "dreamshaper_8.safetensors"
    path.write_text(S3_ACCESS_DENIED)
    with pytest.raises(KinemaError, match=f"^{path} is an XML error page"):  # the tokenizer folder does not exist
        load_stable_diffusion(path, tokenizer=tmp_path / "no-such-tokenizer")


@pytest.mark.parametrize("text, expected", [
    ("[24]", "(the settings of clip.mp4) is JSON but not an object of settings ({...}); delete or fix it"),
    ('{"fps": }', "(the settings of clip.mp4) is not valid JSON at line 1 column 9: Expecting value; delete or fix it"),
])
def test_settings_sidecar_that_is_not_an_object(tmp_path, text, expected):
    from kinema.data.probe import read_sidecar

    (tmp_path / "clip.mp4.json").write_text(text)
    with pytest.raises(KinemaError) as err:
        read_sidecar(tmp_path / "clip.mp4")
    assert str(err.value) == f"{tmp_path / 'clip.mp4.json'} {expected}"


def test_a_foreign_comment_is_no_settings(tmp_path):
    from PIL import Image

    from kinema.data.probe import read_embedded_settings

    path = tmp_path / "made-elsewhere.gif"
    Image.new("RGB", (4, 4)).save(path, comment=b"Created with GIMP")
    assert read_embedded_settings(path) is None
    Image.new("RGB", (4, 4)).save(path, comment=b'["a list"]')
    assert read_embedded_settings(path) is None
