"""SD1.5 base loading: shipped configs, diffusers folders, LDM single files, offline only, kohya LoRAs fused."""

import copy
import json
import logging
import re
import socket

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from tiny_models import TINY_UNET, perturb
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from kinema.errors import KinemaError
from kinema.loaders.stable_diffusion import SD15_CONFIGS, load_spatial_lora, load_stable_diffusion

TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, layers_per_block=1)
TINY_CLIP = dict(vocab_size=516, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, bos_token_id=514, eos_token_id=515, pad_token_id=515)


def write_tokenizer(folder) -> None:
    """A tiny CLIP BPE vocabulary: the 512 byte tokens, two merges ("the"), and the start/end tokens (514, 515)."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")


@pytest.fixture(scope="module")
def tiny():
    return {"unet": perturb(UNet2DConditionModel(**TINY_UNET), 1).eval(),
            "vae": perturb(AutoencoderKL(**TINY_VAE), 2).eval(),
            "text_encoder": perturb(CLIPTextModel(CLIPTextConfig(**TINY_CLIP)), 3).eval()}


@pytest.fixture(scope="module")
def sd_folder(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    for name, model in tiny.items():
        model.save_pretrained(root / name)
    write_tokenizer(root / "tokenizer")
    PNDMScheduler.from_pretrained(SD15_CONFIGS, subfolder="scheduler").save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def config_dir(tiny, sd_folder, tmp_path_factory):
    """Tiny component configs laid out like kinema's shipped SD1.5 configs."""
    root = tmp_path_factory.mktemp("configs")
    for name, model in tiny.items():
        (model.save_config if hasattr(model, "save_config") else model.config.save_pretrained)(root / name)
    PNDMScheduler.from_pretrained(SD15_CONFIGS, subfolder="scheduler").save_config(root / "scheduler")
    return root


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())


# ---------------------------------------------------------------- diffusers -> LDM names, for writing test files

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_unet_key(key: str, layers: int, up_attention: set[int]) -> str:
    """The original LDM name of a diffusers UNet key (openaimodel's input/middle/output block numbering)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    found = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if found:
        side, i, kind, j, rest = found.groups()
        index = (1 if side == "down" else 0) + int(i) * (layers + 1) + int(j)
        if kind == "resnets":
            head, _, tail = rest.partition(".")
            return f"{'input' if side == 'down' else 'output'}_blocks.{index}.0.{_RESNET[head]}.{tail}"
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.1.{rest}"
    found = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)
    if found:
        return f"input_blocks.{(int(found[1]) + 1) * (layers + 1)}.0.op.{found[2]}"
    found = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)
    if found:
        i = int(found[1])
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if i in up_attention else 1}.conv.{found[2]}"
    found = re.fullmatch(r"mid_block\.resnets\.(\d+)\.([a-z_0-9]+)\.(.+)", key)
    if found:
        return f"middle_block.{2 * int(found[1])}.{_RESNET[found[2]]}.{found[3]}"
    return key.replace("mid_block.attentions.0.", "middle_block.1.")


def ldm_vae_key(key: str, levels: int) -> str:
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    key = key.replace("conv_shortcut", "nin_shortcut")
    for pattern, replace in (
        (r"encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f"mid.attn_1.{_VAE_ATTENTION[m[1]]}."),
    ):
        key = re.sub(pattern, replace, key)
    return key


def ldm_checkpoint(tiny) -> dict[str, torch.Tensor]:
    """The tiny components as one LDM-layout file, plus training-only entries a real file carries."""
    unet, vae, clip = tiny["unet"], tiny["vae"], tiny["text_encoder"]
    up_attention = {i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t}
    state = {f"model.diffusion_model.{ldm_unet_key(k, unet.config.layers_per_block, up_attention)}": v.clone()
             for k, v in unet.state_dict().items()}
    for key, value in vae.state_dict().items():
        # LDM's VAE attention uses 1x1 convolutions where diffusers has linears.
        conv = ".mid.attn_1." in ldm_vae_key(key, 2) and value.ndim == 2
        state[f"first_stage_model.{ldm_vae_key(key, 2)}"] = value[:, :, None, None].clone() if conv else value.clone()
    state |= {f"cond_stage_model.transformer.text_model.{k}": v.clone() for k, v in clip.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state |= {"alphas_cumprod": torch.linspace(1, 0, 1000), "model_ema.decay": torch.tensor(0.9999)}
    return state


# ---------------------------------------------------------------- tests


def test_shipped_sd15_configs_build_the_published_model_sizes():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIGS / "vae"))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIGS / "text_encoder"))
    sizes = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, clip)]
    assert sizes == [859_520_964, 83_653_863, 123_060_480]
    assert vae.config.scaling_factor == 0.18215
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIGS, subfolder="scheduler")
    assert scheduler.betas[0].item() == pytest.approx(0.00085) and scheduler.betas[-1].item() == pytest.approx(0.012)
    assert scheduler.config.steps_offset == 1 and scheduler.config.beta_schedule == "scaled_linear"


def test_diffusers_folder_loads_every_component_exactly(tiny, sd_folder):
    sd = load_stable_diffusion(sd_folder)
    for name, model in tiny.items():
        assert_same_weights(getattr(sd, name), model)
    assert sd.tokenizer("the cat").input_ids == [514, 513, 66, 64, 339, 515]  # <start> the</w> c a t</w> <end>
    assert type(sd.scheduler) is PNDMScheduler and sd.scheduler.config.beta_end == 0.012
    half = load_stable_diffusion(sd_folder, dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder.dtype == torch.float16


def test_missing_components_are_named(sd_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (broken / name).symlink_to(sd_folder / name, target_is_directory=True)
    (broken / "vae").mkdir()
    (broken / "vae" / "config.json").write_text((sd_folder / "vae" / "config.json").read_text())
    with pytest.raises(KinemaError, match=r"broken is not a complete.*missing vae/ weights"):
        load_stable_diffusion(broken)
    (broken / "tokenizer").unlink()
    with pytest.raises(KinemaError, match=r"missing vae/ weights.*tokenizer/ \(vocab.json and merges.txt"):
        load_stable_diffusion(broken)
    # A whole component folder gone (or unet/ a file) is named too; describe once called it an unknown format.
    import kinema

    (broken / "vae" / "config.json").unlink()
    (broken / "vae").rmdir()
    with pytest.raises(KinemaError, match=r"broken is not a complete.*missing vae/config.json, vae/ weights"):
        kinema.describe(broken)
    (broken / "unet").unlink()
    (broken / "unet").write_text("not a folder")
    with pytest.raises(KinemaError, match=r"missing unet/config.json, unet/ weights"):
        kinema.describe(broken)
    # unet/ gone altogether: the model_index.json's SD pipeline says what the folder is (a generic "not a format
    # kinema knows" once); an SDXL one is not taken for SD1.5.
    (broken / "unet").unlink()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(KinemaError, match=r"broken is not a complete.*missing unet/config.json, unet/ weights"):
        kinema.describe(broken)
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(KinemaError) as err:
        kinema.describe(broken)
    assert "not a complete" not in str(err.value)
    with pytest.raises(KinemaError, match="no such model file or folder"):
        load_stable_diffusion(tmp_path / "nothing")
    with pytest.raises(KinemaError, match="tokenizer= and config= are for single-file"):
        load_stable_diffusion(sd_folder, tokenizer=sd_folder)


def test_folder_weights_are_checked_strictly_and_fp16_variants_found(tiny, sd_folder, tmp_path):
    folder = tmp_path / "variant"
    folder.mkdir()
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).symlink_to(sd_folder / name, target_is_directory=True)
    half = copy.deepcopy(tiny["vae"]).half()
    half.save_pretrained(folder / "vae", variant="fp16")
    assert sorted(p.name for p in (folder / "vae").iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    sd = load_stable_diffusion(folder)
    assert sd.vae.dtype == torch.float32  # dtype= decides, whatever the file holds
    assert_same_weights(sd.vae, half.float())

    weights = load_file(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    weights.pop("decoder.conv_out.bias")
    save_file({**weights, "extra.weight": torch.zeros(1)}, folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(KinemaError, match=r"variant/vae: weights do not fit its config: 1 missing keys "
                                          r"\(e.g. \['decoder.conv_out.bias'\]\); 1 unexpected keys \(e.g. \['extra"):
        load_stable_diffusion(folder)


def test_a_file_with_ema_copies_loads_the_non_ema_weights_without_diffusers_flag_notice(tiny, sd_folder, config_dir,
                                                                                        tmp_path):
    """An unpruned file (EMA copies of the UNet, as v1-5-pruned.ckpt) printed diffusers' notice to add an
    `--extract_ema` flag kinema has not."""
    state = ldm_checkpoint(tiny)
    ema = {"model_ema." + "".join(key.split(".")[1:]): value + 1 for key, value in state.items()
           if key.startswith("model.diffusion_model.")}
    assert len(ema) > 100  # diffusers' threshold for a file with EMA weights
    save_file({**state, **ema}, tmp_path / "unpruned.safetensors")
    notices: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notices.append(record.getMessage())  # type: ignore[method-assign]
    library_logger = logging.getLogger("diffusers.loaders.single_file_utils")
    library_logger.addHandler(handler)  # sees what the logger's filters let through, whatever the verbosity shown
    try:
        sd = load_stable_diffusion(tmp_path / "unpruned.safetensors", tokenizer=sd_folder, config=config_dir)
    finally:
        library_logger.removeHandler(handler)
    assert_same_weights(sd.unet, tiny["unet"])
    assert set(ema) <= set(sd.ignored_keys)
    assert not [notice for notice in notices if "extract_ema" in notice]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_the_same_weights_as_the_diffusers_models(tiny, sd_folder, config_dir, tmp_path, suffix):
    path = tmp_path / f"dreambooth{suffix}"
    state = ldm_checkpoint(tiny)
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state, "epoch": 3}, path)
    sd = load_stable_diffusion(path, tokenizer=sd_folder, config=config_dir)
    for name, model in tiny.items():
        assert_same_weights(getattr(sd, name), model)
    assert sorted(sd.ignored_keys) == ["alphas_cumprod", "model_ema.decay"]
    assert sd.tokenizer("the").input_ids == [514, 513, 515] and type(sd.scheduler) is PNDMScheduler
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = sd.text_encoder(torch.tensor([sd.tokenizer("the cat").input_ids]))[0]
    with torch.no_grad():
        out, expected = sd.unet(x, 10, text).sample, tiny["unet"](x, 10, text).sample
    # The weights are bit-exact (above); the same diffusers UNet code on them may still sum in another order when a
    # loaded tensor sits at another memory alignment (MKL's CPU GEMM): a few float32 ulps of room on outputs up to
    # ~2 (measured difference 0). A misplaced weight moves them by orders of magnitude more.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_single_file_problems_are_refused_with_the_reason(tiny, sd_folder, config_dir, tmp_path):
    state = ldm_checkpoint(tiny)

    def attempt(entries, **kwargs):
        path = tmp_path / "model.safetensors"
        save_file(entries, path)
        return load_stable_diffusion(path, **{"tokenizer": sd_folder, "config": config_dir, **kwargs})

    with pytest.raises(KinemaError, match="holds no tokenizer: pass tokenizer="):
        attempt(state, tokenizer=None)
    dropped = "model.diffusion_model.output_blocks.4.1.proj_out.weight"
    with pytest.raises(KinemaError, match=r"unet weights do not fit.*1 missing \(e.g. up_blocks.1.attentions.1.proj_o"):
        attempt({k: v for k, v in state.items() if k != dropped})
    with pytest.raises(KinemaError, match=r"1 unet entries have no place.*model.diffusion_model.extra_block.weight"):
        attempt({**state, "model.diffusion_model.extra_block.weight": torch.zeros(2)})
    v2_key = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(KinemaError, match="looks like a Stable Diffusion 2.x checkpoint"):
        attempt({**state, v2_key: torch.zeros(32, 1024)})
    # SDXL's and SD2's text encoders sit elsewhere: named as those families, not as a file missing its text encoder.
    text = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    for extra, family in ((("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias", (1280,)),
                           "an SDXL base"), ((v2_key, (32, 1024)), "a Stable Diffusion 2.x")):
        with pytest.raises(KinemaError, match=f"looks like {family} checkpoint, not Stable Diffusion 1.x"):
            attempt({**text, extra[0]: torch.zeros(extra[1])})
    # A tensor too malformed for diffusers' type guess (an IndexError there) is named by the shape check instead.
    with pytest.raises(KinemaError, match=r"1 mismatched \(e.g. conv_in.weight: file \(3,\) vs model \(32, 4, 3, 3\)"):
        attempt({**state, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)})
    with pytest.raises(KinemaError, match=r"no vae \(first_stage_model.\*\), text_encoder"):
        attempt({k: v for k, v in state.items() if k.startswith("model.diffusion_model.")})
    with pytest.raises(KinemaError, match=r"weights do not fit the Stable Diffusion 1.5 unet.*mismatched"):
        attempt(state, config=SD15_CONFIGS)  # tiny weights against the real SD1.5 configs


def test_nothing_reaches_for_the_network(tiny, sd_folder, config_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    path = tmp_path / "model.safetensors"
    save_file(ldm_checkpoint(tiny), path)
    assert_same_weights(load_stable_diffusion(sd_folder).vae, tiny["vae"])
    assert_same_weights(load_stable_diffusion(path, tokenizer=sd_folder, config=config_dir).vae, tiny["vae"])


def kohya_lora(seed: int = 0, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A kohya/civitai-format SD1.5 LoRA: two UNet attention projections and one text-encoder attention's q/k/v/out.

    (diffusers recognises a text-encoder LoRA by its out_proj layer, which real kohya files always have.)
    """
    gen = torch.Generator().manual_seed(seed)
    layers = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
              "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k": (32, 32)}
    layers |= {f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj": (32, 32) for p in ("q", "k", "v", "out")}
    state = {}
    for name, (c_out, c_in) in layers.items():
        state[f"{name}.lora_down.weight"] = torch.randn(rank, c_in, generator=gen) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(c_out, rank, generator=gen) * 0.3
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def test_kohya_lora_is_fused_as_scale_alpha_over_rank_up_down(sd_folder):
    sd, reference, base = (load_stable_diffusion(sd_folder) for _ in range(3))
    lora = kohya_lora()
    assert load_spatial_lora(sd, lora, scale=0.7) == {"unet": 2, "text_encoder": 4}
    assert not any(isinstance(m, BaseTunerLayer) for part in (sd.unet, sd.text_encoder) for m in part.modules())
    targets = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
               reference.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q,
               "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k":
               reference.unet.up_blocks[1].attentions[2].transformer_blocks[0].attn2.to_k,
               **{f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj":
                  getattr(reference.text_encoder.encoder.layers[1].self_attn, f"{p}_proj")
                  for p in ("q", "k", "v", "out")}}
    with torch.no_grad():
        for name, layer in targets.items():
            layer.weight += 0.7 * (2.0 / 4) * lora[f"{name}.lora_up.weight"] @ lora[f"{name}.lora_down.weight"]
    for part in ("unet", "text_encoder"):
        ours, expected = getattr(sd, part).state_dict(), getattr(reference, part).state_dict()
        assert ours.keys() == expected.keys()
        assert max((v - expected[k]).abs().max().item() for k, v in ours.items()) < 1e-6
    ids = torch.tensor([sd.tokenizer("the cat").input_ids])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text, text_ref, text_base = (c.text_encoder(ids)[0] for c in (sd, reference, base))
        out, expected, before = (c.unet(x, 10, t).sample for c, t in ((sd, text), (reference, text_ref),
                                                                        (base, text_base)))
    assert (text - text_ref).abs().max().item() < 1e-5 and (text - text_base).abs().max().item() > 1e-3
    assert (out - expected).abs().max().item() < 1e-5 and (out - before).abs().max().item() > 1e-3


def test_a_diffusers_saved_lora_keeps_the_alpha_in_its_metadata(sd_folder, tmp_path):
    # save_lora_weights writes rank 4, alpha 8 into `lora_adapter_metadata`, not into the tensors; the reference is
    # diffusers' own load_lora_weights(folder) + fuse_lora on identical weights.
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    def pipeline(sd):
        return StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                                       scheduler=sd.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    trained = load_stable_diffusion(sd_folder)
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    perturb(trained.unet, seed=2, scale=0.2)  # lora_B starts at zero
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(trained.unet),
        unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict())
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"

    ours, reference, base = (load_stable_diffusion(sd_folder) for _ in range(3))
    load_spatial_lora(ours, path, scale=0.8)
    pipe = pipeline(reference)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    pipe.fuse_lora(components=["unet"], lora_scale=0.8)
    pipe.unload_lora_weights()
    moved = max((v - base.unet.state_dict()[k]).abs().max().item() for k, v in reference.unet.state_dict().items())
    assert moved > 1e-2
    expected = reference.unet.state_dict()
    assert max((v - expected[k]).abs().max().item() for k, v in ours.unet.state_dict().items()) < 1e-6


def domain_adapter(unet: UNet2DConditionModel, rank: int = 4, prefix: str = "") -> dict[str, torch.Tensor]:
    """AnimateDiff v3's domain adapter layout (v3_sd15_adapter.ckpt): a LoRA on every spatial attention's
    to_q/to_k/to_v/to_out in legacy attention-processor names, `down` `(r, C_in)` and `up` `(C_out, r)`."""
    gen = torch.Generator().manual_seed(3)
    state = {}
    for name, module in unet.named_modules():
        if re.search(r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]$", name):
            for projection in ("to_q", "to_k", "to_v", "to_out"):
                layer = module.to_out[0] if projection == "to_out" else getattr(module, projection)
                key = f"{prefix}{name}.processor.{projection}_lora"
                state[f"{key}.down.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.3
                state[f"{key}.up.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.3
    return state


def merged_as_animatediff_does(unet: UNet2DConditionModel, state: dict[str, torch.Tensor], alpha: float) -> None:
    """A plain-torch rewrite of AnimateDiff's merge for these files (animatediff/utils: load_diffusers_lora): from
    each down key, drop `processor.`, `_lora` and `down.`, read `to_out.` as `to_out.0.`, and add
    `alpha * up @ down` to that layer's weight."""
    with torch.no_grad():
        for key, down in state.items():
            if ".down." not in key:
                continue
            path = key.removeprefix("unet.").replace("processor.", "").replace("_lora", "").replace("down.", "")
            layer = unet.get_submodule(path.replace("to_out.", "to_out.0.").removesuffix(".weight"))
            layer.weight += alpha * state[key.replace(".down.", ".up.")] @ down


@pytest.mark.parametrize("prefix", ["", "unet."])
def test_animatediff_domain_adapter_is_fused_as_animatediff_merges_it(sd_folder, tmp_path, prefix):
    sd, reference = load_stable_diffusion(sd_folder), load_stable_diffusion(sd_folder)
    state = domain_adapter(sd.unet, prefix=prefix)
    # As published: a pickle of {"state_dict": ..., "animatediff_config": ""}, read with weights_only.
    path = tmp_path / "v3_sd15_adapter.ckpt"
    torch.save({"state_dict": state, "animatediff_config": ""}, path)
    attentions = len(state) // 8  # 4 projections, a down and an up each
    assert attentions == sum(name.endswith((".attn1", ".attn2")) for name, _ in sd.unet.named_modules()) > 0
    assert load_spatial_lora(sd, path, scale=0.6) == {"unet": 4 * attentions, "text_encoder": 0}
    merged_as_animatediff_does(reference.unet, state, 0.6)
    ours, expected = sd.unet.state_dict(), reference.unet.state_dict()
    assert ours.keys() == expected.keys()
    assert max((v - expected[k]).abs().max().item() for k, v in ours.items()) < 1e-6
    assert_same_weights(sd.text_encoder, reference.text_encoder)


def test_a_cut_or_misfit_lora_is_one_line_and_changes_nothing(sd_folder, capfd):
    sd = load_stable_diffusion(sd_folder)
    whole = domain_adapter(sd.unet)
    no_ups = {k: v for k, v in whole.items() if ".up." not in k}
    some_ups = {k: v for k, v in whole.items() if not k.endswith("to_q_lora.up.weight")}
    for cut, count in ((no_ups, len(no_ups)), (some_ups, len(whole) // 8)):
        with pytest.raises(KinemaError, match=rf"^{count} of the LoRA's matrices have no partner \(e.g. .*processor"):
            load_spatial_lora(sd, cut)
    wide = {k: torch.zeros(4, 320) if ".down." in k else torch.zeros(320, 4) for k in whole}  # an SDXL-sized one
    capfd.readouterr()
    with pytest.raises(KinemaError, match=r"attn1.to_q.lora_A.weight is \[4, 320\] in the LoRA and \[4, 32\] in the "
                                          r"model; is it a LoRA for SD1.5 \(not SDXL/SD2\)\?$"):
        load_spatial_lora(sd, wide)
    assert "size mismatch" not in capfd.readouterr().err  # diffusers' log of every mismatch is not shown
    assert_same_weights(sd.unet, load_stable_diffusion(sd_folder).unet)


def test_image_loras_are_described_and_named_where_a_motion_module_is_expected(sd_folder, tmp_path):
    import kinema.loaders

    sd = load_stable_diffusion(sd_folder)
    path = tmp_path / "adapter.safetensors"
    save_file(domain_adapter(sd.unet), path)
    report = kinema.loaders.describe(path)
    attentions = sum(name.endswith((".attn1", ".attn2")) for name, _ in sd.unet.named_modules())
    assert {key: report[key] for key in ("kind", "format", "layers", "rank", "alpha", "motion_lora_too")} == {
        "kind": "image_lora", "format": "animatediff_domain_adapter", "layers": {"unet": 4 * attentions,
        "text_encoder": 0}, "rank": 4, "alpha": "none: alpha = rank", "motion_lora_too": False}
    kohya = tmp_path / "style.safetensors"
    save_file(kohya_lora(), kohya)
    assert kinema.loaders.describe(kohya)["layers"] == {"unet": 2, "text_encoder": 4}
    assert kinema.loaders.describe(kohya)["alpha"] == "per layer (.alpha keys)"
    from kinema.loaders.animatediff.load import load_motion_module

    with pytest.raises(KinemaError, match=r"looks like AnimateDiff v3's domain adapter .* generate --lora"):
        load_motion_module(path, sd.unet)
    fused, reference = kinema.loaders.load(path, sd=load_stable_diffusion(sd_folder), strength=0.5), sd
    load_spatial_lora(reference, path, scale=0.5)
    assert_same_weights(fused.unet, reference.unet)
    # Refused before the fuse, which changes the weights in place: NaN would have filled the caller's model.
    untouched = load_stable_diffusion(sd_folder)
    for strength in (float("nan"), "0.8", None):
        with pytest.raises(KinemaError, match="the LoRA strength must be a number from -100 to 100"):
            kinema.loaders.load(kohya, sd=untouched, strength=strength)
    assert all(torch.isfinite(p).all() for p in untouched.unet.parameters())


def test_lora_layers_that_do_not_fit_are_refused(sd_folder):
    sd = load_stable_diffusion(sd_folder)
    lora = kohya_lora()
    lora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(4, 48)
    with pytest.raises(KinemaError, match=r"do not fit this SD1.5 model: down_blocks.0.attentions.0.* is \[4, 48\] in "
                                          r"the LoRA and \[4, 32\] in the model"):
        load_spatial_lora(sd, lora)
    extra = kohya_lora()
    extra["lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    extra["lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(KinemaError, match=r"only 6 of the LoRA's 7 layers fit this SD1.5 model"):
        load_spatial_lora(sd, extra)
    with pytest.raises(KinemaError, match="no LoRA down matrices"):
        load_spatial_lora(sd, {"conv_in.weight": torch.zeros(1)})
    assert_same_weights(sd.unet, load_stable_diffusion(sd_folder).unet)  # nothing was changed
