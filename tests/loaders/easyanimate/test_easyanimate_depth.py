"""EasyAnimate V3 transformers of any depth: strict loads, V3's skip wiring, kinema's symmetric rule, conversion.

Facts from EasyAnimate's V3 `Transformer3DModel` (transformer3d.py @f9eeabe, the V3 release): with `enable_uvit` it
always builds 13 `long_connect_fc` linears, whatever `num_layers`; in `forward` it pushes the output of every block
with index < 13 onto a stack and, before every block with index >= 15, adds `long_connect_fc[skip_index]` of the
popped output, then increments `skip_index`. `v3_skips` below replays that stack; the tests compare the loaded
model's block inputs against it, with the skip linears set to known multiples of the identity.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_easyanimate import PE_LEN, v3_config, v3_key_names, v3_state, write_transformer

from kinema.errors import KinemaError
from kinema.loaders.easyanimate.config import video_dit_config_from_easyanimate
from kinema.loaders.easyanimate.transformer import convert_easyanimate_transformer, load_video_dit
from kinema.models.video_dit import VideoDiT
from kinema.models.video_dit_blocks import easyanimate_v3_motion_modules

WIDTH = 64


def v3_skips(num_layers: int) -> dict[int, tuple[int, int]]:
    """EasyAnimate V3's forward replayed on block indices: target block -> (source block, skip linear index)."""
    stack, added, skip_index = [], {}, 0
    for index in range(num_layers):
        if index >= 15:
            added[index] = (stack.pop(), skip_index)
            skip_index += 1
        if index < 13:
            stack.append(index)
    return added


def randomize(model: VideoDiT, seed: int = 0) -> VideoDiT:
    """Replace every parameter with seeded noise. Not tiny_models.perturb, which adds noise to the constructor's
    initialisation: the models here are built without seeding torch, so only replacing keeps their weights fixed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def v3_folder(root, num_layers: int):
    """A V3 transformer folder as EasyAnimate's V3 code writes it at this depth: its config.json and exactly its key
    names (13 skip linears always, a `pe` table per motion attention)."""
    config = v3_config(num_layers=num_layers)
    model = randomize(VideoDiT(**video_dit_config_from_easyanimate(config)))
    state = v3_state(model)
    assert set(state) == v3_key_names(layers=num_layers, skips=13)
    write_transformer(root, state, config)
    return root


def block_inputs_and_outputs(model: VideoDiT) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the model once; every block's input and output tokens `(B, F*h*w, C)`."""
    inputs, outputs = [], []
    hooks = [hook for block in model.transformer_blocks for hook in (
        block.register_forward_pre_hook(lambda _module, args: inputs.append(args[0].clone())),
        block.register_forward_hook(lambda _module, _args, out: outputs.append(out.clone())))]
    torch.manual_seed(3)
    with torch.no_grad():
        model(torch.randn(1, 4, 2, 4, 4), torch.tensor([500]), torch.randn(1, 5, 48),
              inpaint_latents=torch.randn(1, 8, 2, 4, 4), clip_image_embeds=torch.randn(1, 768))
    for hook in hooks:
        hook.remove()
    return inputs, outputs


def assert_skips(model: VideoDiT, expected: dict[int, tuple[int, int]]) -> None:
    """Set skip linear j to (j + 1) * identity, then check that each block's input is the previous block's output
    plus exactly the expected skip: (j + 1) times the source block's output, or nothing."""
    with torch.no_grad():
        for j, linear in enumerate(model.long_connect_fc):
            linear.weight.copy_(torch.eye(WIDTH) * (j + 1))
            linear.bias.zero_()
    inputs, outputs = block_inputs_and_outputs(model)
    for block in range(1, len(inputs)):
        source, linear = expected.get(block, (None, None))
        added = outputs[source] * (linear + 1) if source is not None else 0
        torch.testing.assert_close(inputs[block], outputs[block - 1] + added, rtol=1e-6, atol=1e-6,
                                   msg=f"block {block}: expected skip {expected.get(block)}")


@pytest.mark.parametrize("num_layers", [4, 20, 28])
def test_v3_folder_of_any_depth_loads_strictly_and_wires_skips_like_easyanimate(tmp_path, num_layers):
    model = load_video_dit(v3_folder(tmp_path, num_layers))
    assert len(model.long_connect_fc) == 13
    assert_skips(model, v3_skips(num_layers))
    assert {4: {}, 20: {15: (12, 0), 19: (8, 4)}}.get(num_layers, {15: (12, 0), 27: (0, 12)}).items() \
        <= v3_skips(num_layers).items()


def test_v3_config_deeper_than_easyanimate_can_run_is_refused():
    with pytest.raises(KinemaError, match="at most 28 blocks .* num_layers 30") as err:
        video_dit_config_from_easyanimate(v3_config(num_layers=30))
    assert "\n" not in str(err.value)
    assert video_dit_config_from_easyanimate(v3_config(num_layers=30, enable_uvit=False))["skip_pairs"] == []


def native_model(num_layers: int = 4) -> VideoDiT:
    return randomize(VideoDiT(num_attention_heads=2, attention_head_dim=32, num_layers=num_layers,
                              cross_attention_dim=WIDTH, sample_size=8, caption_channels=48,
                              motion_modules=easyanimate_v3_motion_modules(num_layers, 2, max_frames=PE_LEN)))


def test_kinema_native_model_keeps_the_symmetric_rule_through_save_and_load(tmp_path):
    model = native_model(4)
    assert (model.config.skip_pairs, model.config.num_skip_linears) == ([[0, 3]], 1)
    model.save_pretrained(tmp_path / "native")
    loaded = load_video_dit(tmp_path / "native")
    assert (loaded.config.skip_pairs, loaded.config.num_skip_linears) == ([[0, 3]], 1)
    assert_skips(loaded, {3: (0, 0)})
    # A folder saved before the rule was recorded has neither field and gets the symmetric rule as before.
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    del config["skip_pairs"], config["num_skip_linears"]
    (tmp_path / "native" / "config.json").write_text(json.dumps(config))
    assert load_video_dit(tmp_path / "native").config.skip_pairs == [[0, 3]]


def test_convert_depth_4_original_to_kinema_and_back_is_bit_exact_and_keeps_the_rule(tmp_path):
    source = v3_folder(tmp_path / "v3", 4) / "transformer"
    convert_easyanimate_transformer(source, tmp_path / "kinema", to="kinema")
    convert_easyanimate_transformer(tmp_path / "kinema", tmp_path / "original", to="original")
    kinema_config = json.loads((tmp_path / "kinema" / "config.json").read_text())
    assert (kinema_config["skip_pairs"], kinema_config["num_skip_linears"]) == ([], 13)
    original = load_file(source / "diffusion_pytorch_model.safetensors")
    back = load_file(tmp_path / "original" / "diffusion_pytorch_model.safetensors")
    assert set(back) == set(original) and all(torch.equal(back[name], tensor) for name, tensor in original.items())
    written = json.loads((tmp_path / "original" / "config.json").read_text())
    assert written["enable_uvit"] is True and written["num_layers"] == 4
    assert video_dit_config_from_easyanimate(written) == video_dit_config_from_easyanimate(v3_config(num_layers=4))


def test_symmetric_skips_cannot_be_written_as_v3(tmp_path):
    native_model(4).save_pretrained(tmp_path / "native")
    with pytest.raises(KinemaError, match=r"skips \[\(0, 3\)\] with 1 linears have no EasyAnimate V3 equivalent") \
            as err:
        convert_easyanimate_transformer(tmp_path / "native", tmp_path / "original", to="original")
    assert "\n" not in str(err.value)


BAD_SKIPS = {
    "backwards": (dict(skip_pairs=[[3, 1]]), r"0 <= source < target < num_layers"),
    "out of range": (dict(skip_pairs=[[0, 4]]), r"0 <= source < target < num_layers = 4"),
    "twice": (dict(skip_pairs=[[0, 3], [1, 3]]), "use a block twice"),
    "too few linears": (dict(skip_pairs=[[0, 3], [1, 2]], num_skip_linears=1), "below the 2 skip_pairs"),
    "not pairs": (dict(skip_pairs=[[0, 1, 2]]), "are not \\[source, target\\] pairs"),
    "skips without uvit": (dict(enable_uvit=False, num_skip_linears=2), "enable_uvit is False"),
}


@pytest.mark.parametrize("case", list(BAD_SKIPS))
def test_bad_skip_settings_raise_one_line(case):
    settings, message = BAD_SKIPS[case]
    with pytest.raises(KinemaError, match=message) as err, torch.device("meta"):
        VideoDiT(num_attention_heads=2, attention_head_dim=32, num_layers=4, cross_attention_dim=WIDTH,
                 sample_size=8, caption_channels=48, **settings)
    assert "\n" not in str(err.value)


BAD_FILES = {
    "config not an object": ("config.json", "[1, 2]",
                             r"config.json \(the transformer's config\) holds an array, not an object"),
    "config not JSON": ("config.json", '{"num_layers": 4,\n}',
                        r"config.json \(the transformer's config\) is not valid JSON at line 2 column 1"),
    "index without weight_map": ("diffusion_pytorch_model.safetensors.index.json", '{"metadata": {}}',
                                 'has no "weight_map" object'),
    "index naming a missing shard": ("diffusion_pytorch_model.safetensors.index.json",
                                     '{"weight_map": {"proj_out.weight": "part-1.safetensors"}}',
                                     r"lists shard\(s\) \['part-1.safetensors'\] that are not in"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_config_or_index_is_one_line(tmp_path, case):
    name, text, message = BAD_FILES[case]
    (tmp_path / "config.json").write_text(json.dumps(v3_config()))
    (tmp_path / name).write_text(text)
    with pytest.raises(KinemaError, match=message) as err:
        load_video_dit(tmp_path)
    assert "\n" not in str(err.value)
