"""kinema/loaders/easyanimate: strict V3 transformer loading (transformer.py), config translation (config.py), whole
folders (folder.py), inspect.

The tiny folders (written by tests/tiny_easyanimate.py) have EasyAnimate V3's layout and key names (EasyAnimate
@616a354): config.json with the PixArt base fields, the V3 YAML extras and the fields later code added to V3's class;
safetensors with every parameter plus a `pos_encoder.pe` (1, max_len, C) buffer per motion attention, computed with
V3's formula.
[inferred] the exact field list of the published V3 transformer/config.json was not readable here; the loader
accepts any subset of the V3 class's fields and refuses unknown ones.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from PIL import Image
from safetensors.torch import load_file
from tiny_easyanimate import (
    PE_LEN,
    motion_kwargs,
    source_model,
    v3_config,
    v3_pe,
    v3_state,
    write_full_folder,
    write_transformer,
)

from kinema.errors import KinemaError
from kinema.loaders.easyanimate import (
    describe_easyanimate,
    load_easyanimate,
    load_video_dit,
    video_dit_config_from_easyanimate,
)
from kinema.models.presets import easyanimate_v3_xl_2
from kinema.models.video_dit import VIDEO_DIT_PRESETS, VideoDiT


def v3_key_names(layers: int, skips: int) -> set[str]:
    """Every tensor name of a V3 InP Transformer3DModel file, from V3's module structure."""
    wb = (".weight", ".bias")
    names = {"scale_shift_table", *(f"{m}{s}" for s in wb for m in (
        "pos_embed.proj", "proj_out", "adaln_single.linear", "adaln_single.emb.timestep_embedder.linear_1",
        "adaln_single.emb.timestep_embedder.linear_2", "caption_projection.linear_1", "caption_projection.linear_2",
        "clip_projection.linear_1", "clip_projection.linear_2", *(f"long_connect_fc.{j}" for j in range(skips))))}
    for i in range(layers):
        block = f"transformer_blocks.{i}"
        names.add(f"{block}.scale_shift_table")
        for attn in ("attn1", "attn2"):
            names |= {f"{block}.{attn}.{proj}{s}" for proj in ("to_q", "to_k", "to_v", "to_out.0") for s in wb}
        names |= {f"{block}.ff.net.0.proj{s}" for s in wb} | {f"{block}.ff.net.2{s}" for s in wb}
        motion = f"{block}.attn_temporal.temporal_transformer"
        names |= {f"{motion}.{m}{s}" for m in ("norm", "proj_in", "proj_out") for s in wb}
        inner = f"{motion}.transformer_blocks.0"
        for j in range(2):
            names |= {f"{inner}.attention_blocks.{j}.{proj}.weight" for proj in ("to_q", "to_k", "to_v")}
            names |= {f"{inner}.attention_blocks.{j}.to_out.0{s}" for s in wb}
            names |= {f"{inner}.attention_blocks.{j}.pos_encoder.pe", *(f"{inner}.norms.{j}{s}" for s in wb)}
        names |= {f"{inner}.{m}{s}" for m in ("ff.net.0.proj", "ff.net.2", "ff_norm") for s in wb}
    return names


@pytest.fixture(scope="module")
def model() -> VideoDiT:
    return source_model()


@pytest.fixture
def v3_root(tmp_path, model) -> Path:
    """An EasyAnimate V3 folder (its transformer) in tmp_path/v3, so outputs beside it are not inside it."""
    write_transformer(tmp_path / "v3", v3_state(model), v3_config())
    return tmp_path / "v3"


# A model loaded from a file and its in-memory source run the same kinema code on bit-identical weights (checked
# separately, exactly); outputs (|x| <= 1.7 here) get a few float32 ulps of room because MKL's CPU GEMM may pick its
# summation order by the alignment of the weights' memory. Measured difference: 0.
SAME_CODE_TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def assert_same_weights(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    ours, theirs = got.state_dict(), expected.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].dtype == v.dtype and torch.equal(ours[k], v) for k, v in theirs.items())


def run(model: VideoDiT) -> torch.Tensor:
    torch.manual_seed(3)
    states, mask = torch.randn(2, 5, 48), torch.ones(2, 5)
    mask[0, -1] = 0
    with torch.no_grad():
        return model(torch.randn(2, 4, 2, 8, 8), torch.tensor([7, 640]), states, mask,
                     inpaint_latents=torch.randn(2, 8, 2, 8, 8), clip_image_embeds=torch.randn(2, 768))


def test_written_folder_has_exactly_v3_key_names(v3_root):
    names = set(load_file(v3_root / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert names == v3_key_names(layers=4, skips=13)


def test_v3_folder_loads_strictly_and_reproduces_its_source(v3_root, model):
    expected = run(model)
    for path in (v3_root, v3_root / "transformer"):
        loaded = load_video_dit(path)
        assert_same_weights(loaded, model)
        torch.testing.assert_close(run(loaded), expected, **SAME_CODE_TOLERANCE)
    assert [spec["type"] for spec in loaded.config.motion_modules] == ["temporal", "hybrid"] * 2
    assert loaded.max_frames == PE_LEN and not loaded.training
    half = load_video_dit(v3_root, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert torch.equal(half.proj_out.weight, model.proj_out.weight.to(torch.bfloat16))


def test_kinema_saved_folder_loads(tmp_path, model):
    model.save_pretrained(tmp_path)
    loaded = load_video_dit(tmp_path)
    assert_same_weights(loaded, model)
    torch.testing.assert_close(run(loaded), run(model), **SAME_CODE_TOLERANCE)
    described = describe_easyanimate(tmp_path)
    assert (described["pe_buffers"], described["pe_length"], described["keys"]) == (0, PE_LEN, len(model.state_dict()))


def _drop(state, name):
    del state[name]


BLOCK1_PE = ("transformer_blocks.1.attn_temporal.temporal_transformer.transformer_blocks.0.attention_blocks.1"
             ".pos_encoder.pe")
BAD_WEIGHTS = {
    "missing": (lambda s: _drop(s, "transformer_blocks.2.attn2.to_k.weight"),
                r"1 missing \(e.g. transformer_blocks.2.attn2.to_k.weight\)"),
    "unexpected": (lambda s: s.__setitem__("transformer_blocks.0.norm3.weight", torch.ones(64)),
                   r"1 unexpected \(e.g. transformer_blocks.0.norm3.weight\)"),
    "wrong shape": (lambda s: s.__setitem__("proj_out.weight", torch.zeros(16, 64)),
                    r"1 mismatched \(e.g. proj_out.weight: file \(16, 64\) vs model \(32, 64\)\)"),
    "pe length": (lambda s: s.__setitem__(BLOCK1_PE, v3_pe(32, 64)),
                  r"1 mismatched \(e.g. .*attention_blocks.1.pos_encoder.pe: file \(1, 32, 64\) "
                  r"vs model \(1, 64, 64\)\)"),
    "pe values": (lambda s: s.__setitem__(BLOCK1_PE, v3_pe(PE_LEN, 64) * 2), "is not the sinusoidal frame table"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_mismatched_weights_raise_one_line(tmp_path, model, case):
    mutate, message = BAD_WEIGHTS[case]
    state = v3_state(model)
    mutate(state)
    write_transformer(tmp_path, state, v3_config())
    with pytest.raises(KinemaError, match=message) as err:
        load_video_dit(tmp_path)
    assert "\n" not in str(err.value)


def test_image_dit_weights_are_named_as_such(tmp_path):
    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=12, out_channels=8,
                                      num_layers=4, cross_attention_dim=64, sample_size=8, caption_channels=48)
    write_transformer(tmp_path, pixart.state_dict(), v3_config())
    with pytest.raises(KinemaError, match="looks like a PixArt-alpha image DiT without motion modules"):
        load_video_dit(tmp_path)
    assert describe_easyanimate(tmp_path) is None


BAD_CONFIGS = {
    "3d patches": (dict(patch_3d=True), "patch_3d=True is not supported"),
    "unknown field": (dict(foo=1), r"unknown fields \['foo'\]"),
    "block type": (dict(basic_block_type="kvcompression_motionmodule"),
                   "basic_block_type 'kvcompression_motionmodule' is not supported"),
    "no frame encoding": (dict(motion_module_kwargs_odd={**motion_kwargs(["Temporal_Self", "Global_Self"]),
                                                         "temporal_position_encoding": False}),
                          "motion_module_kwargs_odd: temporal_position_encoding=False is not supported"),
    "cross attention kind": (dict(motion_module_kwargs_even=motion_kwargs(["Temporal_Self", "Temporal_Cross"])),
                             "attention_block_types .* are not supported"),
    "resolution conditioning": (dict(sample_size=128), "sample_size 128"),
    "missing field": (dict(num_layers=None), r"missing \['num_layers'\]"),
    # These were a bare TypeError or ZeroDivisionError from inside torch.
    "count as text": (dict(num_layers="4"), r"config.json's num_layers is \"4\", not a positive whole number: restore"),
    "zero patch": (dict(patch_size=0), "config.json's patch_size is 0, not a positive whole number"),
    "width as float": (dict(attention_head_dim=32.0), "config.json's attention_head_dim is 32.0, not a positive whole"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_unsupported_config_is_refused(tmp_path, model, case):
    overrides, message = BAD_CONFIGS[case]
    write_transformer(tmp_path, v3_state(model), v3_config(**overrides))
    with pytest.raises(KinemaError, match=message) as err:
        load_video_dit(tmp_path)
    assert "\n" not in str(err.value)


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(v3_config()))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(KinemaError, match="has no diffusion_pytorch_model.safetensors.*convert a .bin"):
        load_video_dit(tmp_path)


def v3_xl_config(**overrides) -> dict:
    xl = dict(attention_head_dim=72, caption_channels=4096, cross_attention_dim=1152, num_attention_heads=16,
              num_layers=28, sample_size=64, motion_module_kwargs_even=motion_kwargs(["Temporal_Self"] * 2, 16, 4096),
              motion_module_kwargs_odd=motion_kwargs(["Temporal_Self", "Global_Self"], 16, 4096))
    return v3_config(**{**xl, **overrides})


def shapes_on_meta(**kwargs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in VideoDiT(**kwargs).state_dict().items()}


def test_v3_xl_config_builds_the_v3_xl_preset():
    with torch.device("meta"):
        preset = {n: tuple(t.shape) for n, t in VIDEO_DIT_PRESETS["easyanimate-v3-xl-2-inp"]().state_dict().items()}
    assert shapes_on_meta(**video_dit_config_from_easyanimate(v3_xl_config())) == preset
    # A PixArt-only config.json gets V3's YAML extras, as EasyAnimate adds them at load time.
    base = {k: v for k, v in v3_xl_config().items() if k in (
        "activation_fn", "attention_bias", "attention_head_dim", "caption_channels", "cross_attention_dim",
        "in_channels", "norm_elementwise_affine", "norm_eps", "norm_type", "num_attention_heads", "num_layers",
        "out_channels", "patch_size", "sample_size", "num_embeds_ada_norm")}
    assert shapes_on_meta(**video_dit_config_from_easyanimate(base)) == preset
    t2v = video_dit_config_from_easyanimate(v3_xl_config(in_channels=4))
    assert t2v["image_embed_dim"] is None and t2v["out_channels"] == 8
    # The translation gives exactly the presets' keyword arguments, so a V3-XL folder saved by kinema has their config.
    assert video_dit_config_from_easyanimate(v3_xl_config()) == easyanimate_v3_xl_2("InP")
    assert t2v == easyanimate_v3_xl_2("T2V")
    assert video_dit_config_from_easyanimate(v3_xl_config(enable_clip_in_inpaint=False))["image_embed_dim"] is None


def test_describe_reads_only_the_header(v3_root, model, monkeypatch):
    from tensor_reads import TensorDataRead, forbid_tensor_data_reads

    attempts = forbid_tensor_data_reads(monkeypatch)
    tensors = len(model.state_dict()) + 8
    expected = {
        "kind": "easyanimate_transformer", "format": "easyanimate-v3", "layout": "original", "variant": "InP",
        "blocks": 4, "width": 64, "in_channels": 12,
        "out_channels": 8, "skips": 13, "keys": tensors, "parameters": sum(p.numel() for p in model.parameters()),
        "pe_buffers": 8, "dtype": "float32", "pe_length": PE_LEN,
        "path": str(v3_root / "transformer" / "diffusion_pytorch_model.safetensors"),
    }
    assert describe_easyanimate(v3_root) == expected
    assert describe_easyanimate(v3_root / "transformer") == expected
    assert describe_easyanimate(v3_root / "transformer" / "diffusion_pytorch_model.safetensors") == expected
    # image DiT + 4 motion modules (GroupNorm, proj_in/out, 2 attentions + LayerNorms, GEGLU ff + LayerNorm)
    # + CLIP projection 768 -> 8 x 64 + 13 skip linears
    d = 64
    image_dit = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=12, out_channels=8,
                                         num_layers=4, cross_attention_dim=64, sample_size=8, caption_channels=48)
    motion = 2 * d + 2 * (d * d + d) + 2 * (4 * d * d + d + 2 * d) + (8 * d * d + 8 * d + 4 * d * d + d) + 2 * d
    clip = (768 * 8 * d + 8 * d) + (8 * d * 8 * d + 8 * d)
    assert expected["parameters"] == sum(p.numel() for p in image_dit.parameters()) + 4 * motion + clip \
        + 13 * (d * d + d)
    assert describe_easyanimate(v3_root / "nothing") is None
    (v3_root / "notes.txt").write_text("hi")
    assert describe_easyanimate(v3_root / "notes.txt") is None
    assert attempts == []
    # The guard is live: loading the same folder, which needs the tensors, is stopped by it.
    with pytest.raises(TensorDataRead):
        load_video_dit(v3_root)


def test_load_whole_v3_folder(tmp_path, model):
    parts = write_full_folder(tmp_path, model)
    loaded = load_easyanimate(tmp_path)

    def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    # What the loader is responsible for: every stored tensor arrives bit-exact (T5 is stored in fp16 and loaded
    # as float32, so the source is cast the same way) ...
    assert same_weights(loaded.transformer, model)
    assert same_weights(loaded.vae, parts["vae"])
    assert same_weights(loaded.text_encoder, parts["text_encoder"].float())
    assert same_weights(loaded.image_encoder, parts["image_encoder"])
    assert loaded.text_encoder.dtype == torch.float32
    torch.testing.assert_close(run(loaded.transformer), run(model), **SAME_CODE_TOLERANCE)
    ids = loaded.tokenizer("a cat runs on grass", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5, 6, 7, 1]]
    # ... and the encoders are built from the stored configs. Their outputs are compared within a few float32 ulps,
    # not bit for bit: transformers leaves loaded float32 weights as zero-copy views of the mmap'd safetensors file,
    # at whatever 4-byte-aligned offset the file gives them, and MKL's CPU GEMM picks its summation order by pointer
    # alignment (bit-identical weights 4 bytes apart give outputs 1-4 ulps apart; MKL_CBWR=COMPATIBLE removes it).
    # A wrong config (activation, norm eps, head count, projection) moves outputs by orders of magnitude more.
    tight = {"rtol": 1e-6, "atol": 1e-6}
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder(ids).last_hidden_state,
                                   parts["text_encoder"](ids).last_hidden_state, **tight)
        pixels = loaded.image_processor(Image.new("RGB", (40, 48), (200, 30, 90)), return_tensors="pt").pixel_values
        assert pixels.shape == (1, 3, 32, 32)
        torch.testing.assert_close(loaded.image_encoder(pixels).image_embeds,
                                   parts["image_encoder"](pixels).image_embeds, **tight)


def test_inp_folder_without_image_encoder_is_refused(tmp_path, model):
    write_full_folder(tmp_path, model, with_image_encoder=False)
    with pytest.raises(KinemaError, match="is an InP model .* but has no image_encoder/ folder"):
        load_easyanimate(tmp_path)


def test_folder_missing_a_part_is_refused(tmp_path, model):
    write_transformer(tmp_path, v3_state(model), v3_config())
    with pytest.raises(KinemaError, match=r"has no vae/ folder \(it holds \['transformer'\]\)"):
        load_easyanimate(tmp_path)


def test_convert_v3_to_kinema_and_back_is_exact(v3_root, model, tmp_path):
    from kinema.cli import main
    from kinema.loaders.source import describe

    source = v3_root / "transformer"
    assert main(["convert", str(v3_root), str(tmp_path / "k"), "--to", "kinema"]) == 0
    assert main(["convert", str(tmp_path / "k"), str(tmp_path / "o"), "--to", "original"]) == 0
    assert describe(tmp_path / "k")["layout"] == "kinema" and describe(tmp_path / "k")["pe_buffers"] == 0
    assert describe(tmp_path / "o")["layout"] == "original" and describe(tmp_path / "o")["pe_buffers"] == 8
    original, back = load_file(source / "diffusion_pytorch_model.safetensors"), load_file(
        tmp_path / "o" / "diffusion_pytorch_model.safetensors")
    assert set(back) == set(original) and all(torch.equal(back[k], v) for k, v in original.items())
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert video_dit_config_from_easyanimate(written) == video_dit_config_from_easyanimate(v3_config())
    for folder in ("o", "k"):
        loaded = load_video_dit(tmp_path / folder)
        assert_same_weights(loaded, model)
        torch.testing.assert_close(run(loaded), run(model), **SAME_CODE_TOLERANCE)


V3_REFERENCE = Path(__file__).resolve().parents[2] / "fixtures" / "easyanimate_v3" / "transformer"


def test_convert_v3_reference_folder_to_kinema_and_back_is_exact(tmp_path):
    """The round trip above starts from a folder this file wrote; here both ends are checked against a folder
    EasyAnimate's own V3 code wrote (tests/fixtures/easyanimate_v3, see make_fixtures.py there), so a rename or
    reorder made on the way out and undone on the way back cannot hide."""
    from kinema.cli import main

    assert main(["convert", str(V3_REFERENCE), str(tmp_path / "k"), "--to", "kinema"]) == 0
    assert main(["convert", str(tmp_path / "k"), str(tmp_path / "o"), "--to", "original"]) == 0
    reference = load_file(V3_REFERENCE / "diffusion_pytorch_model.safetensors")
    tables = {name for name in reference if name.endswith(".pos_encoder.pe")}
    assert len(reference) == 1417 and len(tables) == 2 * 28
    # The weights are stored in float16 and convert never casts a weight: both sides hold V3's float16 bits.
    weights = {name: t for name, t in reference.items() if name not in tables}
    assert {t.dtype for t in weights.values()} == {torch.float16}

    def assert_exact(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
        assert set(got) == set(expected)
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in expected.items())

    assert_exact(load_file(tmp_path / "k" / "diffusion_pytorch_model.safetensors"), weights)  # kinema: no tables
    back = load_file(tmp_path / "o" / "diffusion_pytorch_model.safetensors")
    assert_exact({name: t for name, t in back.items() if name not in tables}, weights)
    # V3 keeps its frame tables in float32 beside float16 weights, and so does kinema's original layout: the tables
    # come back under V3's names, in float32, with V3's exact values.
    assert tables <= set(back)
    assert all(back[name].dtype == torch.float32 and torch.equal(back[name], reference[name]) for name in tables)

    written = json.loads((tmp_path / "o" / "config.json").read_text())
    v3 = json.loads((V3_REFERENCE / "config.json").read_text())
    # Every field kinema writes has V3's value; the one V3's file leaves out is at V3's class default.
    assert {name: value for name, value in written.items() if v3.get(name) != value} == {"enable_clip_in_inpaint": True}
    assert video_dit_config_from_easyanimate(written) == video_dit_config_from_easyanimate(v3)


def test_convert_refuses_what_v3_cannot_express(tmp_path, model):
    from kinema.loaders.easyanimate.config import easyanimate_config_from_video_dit

    specs = [dict(spec) for spec in model.config.motion_modules]
    specs[2]["type"] = "hybrid"  # no longer one module or an even/odd alternation
    with pytest.raises(KinemaError, match="alternates two"):
        easyanimate_config_from_video_dit({**model.config, "motion_modules": specs})
    specs = [{**spec, "norm_mode": "across_frames"} for spec in model.config.motion_modules]
    with pytest.raises(KinemaError, match="no EasyAnimate V3 equivalent"):
        easyanimate_config_from_video_dit({**model.config, "motion_modules": specs})


def test_inspect_never_loads_a_transformer_file(v3_root, monkeypatch):
    # `kinema inspect` tries the motion-module and LoRA describers first, which read some tensors of their own kinds
    # (frame tables, alphas); none of them may read any of a transformer file's tensors.
    from tensor_reads import forbid_tensor_data_reads

    from kinema.loaders.source import describe

    attempts = forbid_tensor_data_reads(monkeypatch)
    weights = v3_root / "transformer" / "diffusion_pytorch_model.safetensors"
    for path in (weights, v3_root / "transformer", v3_root):
        assert describe(path)["kind"] == "easyanimate_transformer"
    assert attempts == []
