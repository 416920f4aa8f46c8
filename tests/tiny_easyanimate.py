"""Tiny random-weight EasyAnimate V3 folders in the published layout (`alibaba-pai/EasyAnimateV3-XL-2-InP-*`).

A whole folder (`write_full_folder`) holds:
    transformer/  config.json (the PixArt base fields, the V3 YAML extras and the fields later code added to V3's
                  class) + diffusion_pytorch_model.safetensors (every parameter under V3's name, plus a
                  `pos_encoder.pe` (1, max_len, C) buffer per motion attention, computed with V3's formula)
    vae/          a V3 Slice VAE config.json (V3's field names and switches) + diffusion_pytorch_model.safetensors
    text_encoder/ T5 encoder as fp16 shards `model.fp16-0000N-of-0000M.safetensors` with their index
    tokenizer/    a SentencePiece `spiece.model` with tokenizer_config.json and special_tokens_map.json, no
                  tokenizer.json (reading it needs sentencepiece and protobuf)
    image_encoder/ CLIP vision with projection + preprocessor_config.json (InP models)
Sizes are reduced (4 blocks x 64 wide, 48-wide T5 states, an 8-channel VAE, a 32 px CLIP with 768-d embeddings);
V3's `model_index.json` and unused `scheduler/` folder are left out (nothing reads them).
[inferred] the exact field lists of the published V3 transformer/ and vae/ config.json files were not readable here;
the loaders accept any subset of the V3 classes' fields and refuse unknown ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kinema.models.slice_vae import SliceVAE
from kinema.models.video_dit import VideoDiT
from kinema.models.video_dit_blocks import easyanimate_v3_motion_modules

# Frame-table length of the tiny motion modules (V3: 4096): the transformer takes at most this many latent frames.
PE_LEN = 64

# The tiny T5's vocabulary, (piece, log-probability score) by id as in T5's spiece.model: pad 0, eos 1, unk 2.
TINY_T5_VOCAB = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
    (word, -float(i)) for i, word in enumerate(["▁a", "▁cat", "▁runs", "▁on", "▁grass", "a", "▁"])]
TINY_T5 = dict(vocab_size=32, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=2)
# A CLIP vision tower whose projection gives V3's 768-d image embedding.
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=768)
# The Slice VAE of the tiny folders: one resnet per block, 8 channels throughout.
TINY_FOLDER_VAE = dict(ch=8, ch_mult=(1, 1, 1, 1), layers_per_block=1, norm_num_groups=4)


def motion_kwargs(kinds: list[str], heads: int = 2, max_len: int = PE_LEN) -> dict:
    """One of V3's `motion_module_kwargs_even` / `_odd` config entries."""
    return {"num_attention_heads": heads, "num_transformer_block": 1, "attention_block_types": kinds,
            "temporal_position_encoding": True, "temporal_position_encoding_max_len": max_len,
            "temporal_attention_dim_div": 1, "block_size": 1, "remove_time_embedding_in_photo": False}


def v3_config(**overrides) -> dict:
    """A V3 transformer/config.json, reduced to 4 blocks x 64 wide."""
    config = {
        "_class_name": "Transformer3DModel", "_diffusers_version": "0.28.2",
        "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 32,
        "attention_type": "default", "caption_channels": 48, "cross_attention_dim": 64,
        "double_self_attention": False, "dropout": 0.0, "in_channels": 12, "norm_elementwise_affine": False,
        "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single", "num_attention_heads": 2,
        "num_embeds_ada_norm": 1000, "num_layers": 4, "num_vector_embeds": None, "only_cross_attention": False,
        "out_channels": 8, "patch_size": 2, "sample_size": 8, "upcast_attention": False,
        "use_linear_projection": False,
        "basic_block_type": "global_motionmodule", "enable_uvit": True, "patch_3d": False, "fake_3d": False,
        "time_patch_size": None, "casual_3d": False, "casual_3d_upsampler_index": None,
        "motion_module_type": "Vanilla", "motion_module_kwargs": None,
        "motion_module_kwargs_even": motion_kwargs(["Temporal_Self", "Temporal_Self"]),
        "motion_module_kwargs_odd": motion_kwargs(["Temporal_Self", "Global_Self"]),
        "time_position_encoding_before_transformer": False, "qk_norm": False, "after_norm": False,
        "resize_inpaint_mask_directly": False, "enable_clip_in_inpaint": True, "enable_text_attention_mask": True,
        "add_noise_in_inpaint_model": False,
    }
    return {**config, **overrides}


def v3_pe(max_len: int, dim: int) -> torch.Tensor:
    """V3 motion_module.py PositionalEncoding buffer."""
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def source_model() -> VideoDiT:
    """The tiny V3 InP transformer of `v3_config()` (12 -> 8 channels, 768-d CLIP projection, 13 stored skip linears,
    none wired at 4 blocks), every weight seeded random (x 0.05) so no part is an identity, in eval mode."""
    torch.manual_seed(0)
    # EasyAnimate V3 always stores 13 skip linears and at 4 blocks wires none of them.
    model = VideoDiT(num_attention_heads=2, attention_head_dim=32, in_channels=12, out_channels=8, num_layers=4,
                     cross_attention_dim=64, sample_size=8, caption_channels=48, image_embed_dim=768,
                     motion_modules=easyanimate_v3_motion_modules(4, 2, max_frames=PE_LEN), skip_pairs=[],
                     num_skip_linears=13).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def v3_state(model: VideoDiT) -> dict[str, torch.Tensor]:
    """`model`'s weights as V3 stores them: its state dict plus V3's frame tables (`pos_encoder.pe`)."""
    state = {name: t.clone() for name, t in model.state_dict().items()}
    for i in range(model.config.num_layers):
        for j in range(2):
            name = f"transformer_blocks.{i}.attn_temporal.temporal_transformer.transformer_blocks.0." \
                   f"attention_blocks.{j}.pos_encoder.pe"
            state[name] = v3_pe(PE_LEN, 64)
    return state


def write_transformer(root: Path, state: dict[str, torch.Tensor], config: dict) -> Path:
    """`root/transformer/` with `config` and `state`; returns the folder."""
    folder = root / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


def write_slice_vae(root: Path, vae: SliceVAE) -> Path:
    """`root/vae/` as V3 writes it: V3's class name and version switch beside the settings, V3's weight names."""
    settings = {name: list(value) if isinstance(value, tuple) else value for name, value in vae.config.items()
                if not name.startswith("_")}
    config = {"_class_name": "AutoencoderKLMagvit", "_diffusers_version": "0.28.2", **settings,
              "slice_compression_vae": True}
    folder = root / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({name: t.contiguous() for name, t in vae.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")
    return folder


def write_t5_tokenizer(folder: Path, vocab: list[tuple[str, float]] = TINY_T5_VOCAB) -> Path:
    """A T5 SentencePiece tokenizer folder: a unigram `spiece.model` with `vocab` (ids in order; pad, eos, unk
    first as in T5), identity normalisation with a dummy prefix, and T5Tokenizer's config files."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    piece_type = spm_pb2.ModelProto.SentencePiece
    special = {"<pad>": piece_type.CONTROL, "</s>": piece_type.CONTROL, "<unk>": piece_type.UNKNOWN}
    proto = spm_pb2.ModelProto()
    for piece, score in vocab:
        proto.pieces.add(piece=piece, score=score, type=special.get(piece, piece_type.NORMAL))
    spec = proto.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.UNIGRAM
    spec.vocab_size = len(vocab)
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(proto.SerializeToString())
    tokens = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **tokens}))
    return folder


def write_full_folder(root: Path, model: VideoDiT, with_image_encoder: bool = True) -> dict[str, Any]:
    """A whole V3 folder with `model` as its transformer and tiny random T5, tokenizer, CLIP and Slice VAE; returns
    the source parts ("text_encoder" (fp16, as stored), "vae" and, with the image encoder, "image_encoder")."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    write_transformer(root, v3_state(model), v3_config())
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(**TINY_T5)).to(torch.float16).eval()
    # V3 ships T5 as model.fp16-0000N-of-0000M.safetensors shards with an index
    text_encoder.save_pretrained(root / "text_encoder", variant="fp16", max_shard_size="20KB")
    assert (root / "text_encoder" / "model.safetensors.index.fp16.json").is_file()
    write_t5_tokenizer(root / "tokenizer")
    vae = SliceVAE(**TINY_FOLDER_VAE).eval()
    write_slice_vae(root, vae)
    parts: dict[str, Any] = {"text_encoder": text_encoder, "vae": vae}
    if with_image_encoder:
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
        image_encoder.save_pretrained(root / "image_encoder")
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            root / "image_encoder")
        parts["image_encoder"] = image_encoder
    return parts
