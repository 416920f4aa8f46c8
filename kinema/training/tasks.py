"""What each training mode trains, how its loss is computed and what it exports: one `TrainingTask` per run.

The model declares what may train (`freeze_base()` for motion modules, peft's LoRA layers, the V3 transformer's
submodules by name), never a substring match over parameter names. Every random draw of a step (timesteps, noise,
inpaint masks, CLIP on/off) comes from the one generator the trainer seeds per step and process, so a step is a pure
function of the weights, the batch and that seed: what makes a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kinema.errors import KinemaError
from kinema.training.config import TrainConfig

logger = logging.getLogger(__name__)

# EasyAnimate V3's train.sh trains these transformer parts (`--trainable_modules`); the caption, timestep and CLIP
# projections stay as pretrained.
V3_TRAINABLE_MODULES = ("transformer_blocks", "proj_out", "pos_embed", "long_connect_fc", "scale_shift_table")


def _parameter_count(parameters: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in parameters)


def _link_or_copy_tree(source: Path, target: Path) -> None:
    """Hard-link every file of `source` under `target` (no second copy of a multi-GB text encoder), copying where
    links are not possible (another file system)."""
    for root, _, files in os.walk(source):
        out = target / os.path.relpath(root, source)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(root, name), out / name)
            except OSError:
                shutil.copy2(os.path.join(root, name), out / name)


class TrainingTask:
    """One mode's model, trainable weights, loss and export.

    `model` is the model that trains; `module` is a small `nn.Module` holding it whose forward computes the loss
    from the prepared inputs. accelerate wraps `module` (DDP on several processes), so gradients are synchronised
    whichever methods of the model the loss calls (the VAE's encode/decode are not its forward); the frozen encoders
    stay outside it and run in `inputs`, without gradients.
    """

    model: Any  # a VideoModel host or the SliceVAE
    module: nn.Module
    family: Any = None  # the VideoFamily, for validation videos (None for the VAE)
    device: torch.device = torch.device("cpu")  # where `inputs` puts what it returns

    def to(self, device: torch.device | str) -> TrainingTask:
        """Move what trains (`module`) to `device`, where `inputs` then puts its tensors."""
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """`(name, parameter)` of every weight that trains, in a fixed order (names relative to `model`)."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights by name (what a checkpoint stores besides the optimiser)."""
        return {name: p.detach() for name, p in self.trainable_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put checkpointed trainable weights back, strictly (same names and shapes)."""
        own = dict(self.trainable_parameters())
        if set(own) != set(state):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise KinemaError(f"the checkpoint's weights do not fit this run ({len(missing)} missing, e.g. "
                              f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}): resume with the run's own "
                              "config")
        with torch.no_grad():
            for name, parameter in own.items():
                if parameter.shape != state[name].shape:
                    raise KinemaError(f"checkpoint weight {name} has shape {tuple(state[name].shape)}, the model "
                                      f"{tuple(parameter.shape)}: resume with the run's own config")
                parameter.copy_(state[name])

    def check_frames(self, frames: int, at_once: bool = True) -> None:
        """One KinemaError line when the model cannot take clips of `frames` frames: the VAE's frame rule, and, for
        a clip it sees `at_once` (a training clip, not a validation video sampled in windows past it), the window
        its motion modules' frame encoding covers."""
        self.family.latent_frames(frames)
        if at_once and frames > self.family.max_frames:
            raise KinemaError(f"{self.family.name} takes at most {self.family.max_frames} frames at once (the length "
                              "of its motion modules' frame encoding); use at most that many")

    def inputs(self, batch: dict[str, Any], generator: torch.Generator, step: int = 0) -> dict[str, Any]:
        """The keyword arguments of `module`'s forward for `batch` at optimiser step `step` (encoded without
        gradients, noise drawn from `generator`)."""
        raise NotImplementedError

    def export(self, folder: Path) -> list[str]:
        """Write the trained weights into `folder` (a fresh temporary folder the trainer renames into place) in the
        formats other tools load; returns the names written."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Counts for the dry run and the log: trainable and total parameters."""
        trainable = [p for _, p in self.trainable_parameters()]
        return {"trainable_parameters": _parameter_count(trainable),
                "total_parameters": _parameter_count(list(self.model.parameters()))}


def _copy_model_manifest(source: Path, target: Path) -> bool:
    """Copy `source`'s kinema.json (name, text encoder entry, defaults) into the exported folder `target`; False
    when there is none. Without it a kinema model folder, which holds no text encoder, would not load."""
    from kinema.models.initial import MODEL_FILE

    manifest = source / MODEL_FILE
    if not manifest.is_file():
        return False
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(manifest, target / MODEL_FILE)
    return True


def min_snr_weights(noise_schedule: Any, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma loss weights `(B,)` for `timesteps` `(B,)` (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy"): the loss of an x0 prediction weighted by min(SNR, gamma), written for the target
    the model predicts. An epsilon model's loss is SNR times x0's, a velocity model's SNR + 1 times, so the weights
    are min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1); low-noise steps, whose easy losses otherwise pull
    the gradient their way, count less. `noise_schedule`: a diffusers scheduler (its `alphas_cumprod`)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_schedule, timesteps)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))  # the limit at SNR 0 (zero terminal SNR)


def draw_timesteps(kind: str, batch: int, steps: int, generator: torch.Generator, logit_mean: float = 0.0,
                   logit_std: float = 1.0) -> torch.Tensor:
    """Training timesteps `(B,)` in `[0, steps)`: `uniform` (AnimateDiff), or `logit_normal`, `sigmoid(N(logit_mean,
    logit_std)) * steps` (V3 with the defaults; SD3's draw, diffusers' `compute_density_for_timestep_sampling`)."""
    if kind == "logit_normal":
        from diffusers.training_utils import compute_density_for_timestep_sampling

        draw = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean, logit_std, generator=generator)
        return (draw * steps).long().clamp(0, steps - 1)
    return torch.randint(0, steps, (batch,), generator=generator)


class _DenoisingLoss(nn.Module):
    """MSE of the model's prediction (the noise, or the velocity for v-prediction models) under its family's
    denoiser (what DDP wraps in the diffusion modes)."""

    def __init__(self, model: nn.Module, denoiser_class: type):
        super().__init__()
        self.model = model
        self.denoiser_class = denoiser_class

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor,
                cond: dict[str, torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        """`weights` `(B,)`: each sample's share of the loss (Min-SNR); None: plain MSE over everything."""
        prediction = self.denoiser_class(self.model)(noisy, timesteps, cond)
        if weights is None:
            return F.mse_loss(prediction.float(), target)
        per_sample = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
        return (per_sample * weights).mean()


# ---------------------------------------------------------------- diffusion modes


def _load_animatediff_family(config: TrainConfig) -> Any:
    """The AnimateDiff family for training: the SD1.5 model inflated with `model.motion_module`'s weights, or, as
    `kinema generate` loads it, with the motion modules a kinema folder carries (kinema-tiny-ad's: a LoRA on fresh
    zero-output modules gets no gradient, and a motion run continues the shipped weights), or with fresh (identity)
    motion modules: of the settings the folder's kinema.json names in "motion" (kinema's own models, whose loading
    reads the same entry), else of `model.motion_version`'s layout."""
    from kinema.bundled import folder_motion_module, resolve_model
    from kinema.pipelines.load import load_family, model_motion_settings

    path = resolve_model(config.model.path)  # a bundled model's name is its folder here
    own = None if config.model.motion_module else folder_motion_module(path)
    if config.model.motion_module or own is not None:
        if own is not None:
            logger.info("training on %s with its own motion modules (%s)", config.model.path, own.name)
        # On the CPU: accelerate moves the model to each process's device (auto would put every rank's on cuda:0).
        return load_family(config.model.path, motion_module=config.model.motion_module,
                           tokenizer=config.model.tokenizer, device="cpu")
    from kinema.loaders.stable_diffusion import load_stable_diffusion
    from kinema.models.presets import ANIMATEDIFF_VERSIONS
    from kinema.models.video_unet import VideoUNet
    from kinema.pipelines.animatediff import AnimateDiffFamily

    version = config.model.motion_version
    if version not in ANIMATEDIFF_VERSIONS or version == "sdxl-beta":
        known = [v for v in ANIMATEDIFF_VERSIONS if v != "sdxl-beta"]
        raise KinemaError(f"unknown model.motion_version {version!r}; choose one of {', '.join(known)}")
    settings = model_motion_settings(path) or ANIMATEDIFF_VERSIONS[version]
    components = load_stable_diffusion(path, tokenizer=config.model.tokenizer)
    with torch.random.fork_rng(devices=[]):  # fresh modules from the run's seed: every process and rerun alike
        torch.manual_seed(config.seed)
        video_unet = VideoUNet.from_unet2d(components.unet, **settings)
    return AnimateDiffFamily(video_unet, components.vae, components.text_encoder, components.tokenizer,
                             source=config.model.path)


def _load_sd_vae_only(config: TrainConfig) -> Any:
    """Mode vae on a Stable Diffusion model: its AutoencoderKL alone (as `.vae` of the returned object), float32.
    A diffusers folder's `vae/` is read by itself, so the UNet and text encoder, which do not train, are not
    loaded (and a folder whose text encoder is named elsewhere, like kinema's own, needs none)."""
    if config.model.motion_module:
        raise KinemaError("mode vae trains the VAE alone: remove model.motion_module")
    path = Path(config.model.path)
    if (path / "vae" / "config.json").is_file():
        from types import SimpleNamespace

        from diffusers import AutoencoderKL

        from kinema.state_dicts import check_loading_info

        vae, info = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True,
                                                  output_loading_info=True)
        check_loading_info(info, f"{path / 'vae'}: weights do not fit its config")
        return SimpleNamespace(vae=vae)
    from kinema.loaders.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(path, tokenizer=config.model.tokenizer)  # a single file: the VAE is inside it


def load_training_family(config: TrainConfig) -> Any:
    """The model family `config.model.path` is (AnimateDiff or EasyAnimate), loaded in float32 for training, with
    one KinemaError line when the mode does not apply to it."""
    import kinema.loaders

    kind = kinema.loaders.describe(config.model.path)["kind"]
    family_modes = {"stable_diffusion": ("motion", "image", "lora", "vae"),
                    "easyanimate_transformer": ("motion", "lora", "full", "vae")}
    if kind not in family_modes:
        raise KinemaError(f"{config.model.path} is a {kind}; training needs a Stable Diffusion 1.5 model (modes "
                          "motion, image, lora, vae) or an EasyAnimate V3 folder (modes motion, lora, full, vae)")
    if config.mode not in family_modes[kind]:
        name = "a Stable Diffusion 1.5 model (AnimateDiff)" if kind == "stable_diffusion" else "an EasyAnimate model"
        raise KinemaError(f"mode {config.mode} does not apply to {config.model.path}, {name}: its modes are "
                          f"{', '.join(family_modes[kind])}")
    if kind == "stable_diffusion":
        if config.mode == "image" and config.model.motion_module:
            raise KinemaError("mode image trains the image model alone (its motion modules stay fresh identities, "
                              "so the result is a plain SD1.5 model): remove model.motion_module")
        if config.mode == "vae":
            return _load_sd_vae_only(config)
        from kinema.bundled import model_prediction_type

        family = _load_animatediff_family(config)
        family.prediction_type = model_prediction_type(config.model.path)
        return family
    if config.model.motion_module:
        raise KinemaError("model.motion_module is for Stable Diffusion models; an EasyAnimate model has its own "
                          "motion layers: remove it")
    from kinema.pipelines.load import load_family

    return load_family(config.model.path, device="cpu")  # accelerate moves it, as above


class DiffusionTask(TrainingTask):
    """Modes motion, image, lora and full: epsilon-prediction MSE on the family's noise schedule."""

    def __init__(self, config: TrainConfig, family: Any):
        from diffusers import DDPMScheduler

        self.config, self.family = config, family
        self.model = family.model
        self.module = _DenoisingLoss(self.model, type(family.denoiser()))
        self.is_dit = family.family == "easyanimate"
        self.noise_schedule = DDPMScheduler(**family.noise_schedule())
        # AnimateDiff samples timesteps uniformly; EasyAnimate V3 logit-normally (sigmoid(N(0, 1)) * 1000).
        self.timesteps = config.train.timesteps or ("logit_normal" if self.is_dit else "uniform")
        if self.timesteps == "uniform" and (config.train.logit_mean, config.train.logit_std) != (0.0, 1.0):
            raise KinemaError(f"train.logit_mean and train.logit_std shape the logit-normal timestep draw, and "
                              f"{config.model.path} is an AnimateDiff-family model, whose recipe draws timesteps "
                              f"uniformly; add train.timesteps: logit_normal (or remove them)")
        for part in (family.vae, family.text_encoder, getattr(family, "image_encoder", None)):
            if part is not None:
                part.requires_grad_(False).eval()
        self._select_trainable()
        if config.train.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.latent_cache: Any = None
        self.text_cache: Any = None
        if config.data.cache:
            self._open_caches(config.data.cache)

    def _open_caches(self, folder: str) -> None:
        """Caches of the frozen encoders' outputs, each keyed by its encoder's weights and settings, so a changed
        VAE or text encoder never reads a stale entry."""
        from kinema.training.cache import EmbeddingCache, module_fingerprint

        family = self.family
        vae = family.vae
        vae_settings = {"family": family.family, "scaling_factor": float(vae.config.scaling_factor),
                        "config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
                        "latents": "posterior mean", "vae": f"{type(vae).__module__}.{type(vae).__qualname__}"}
        # The posterior mean is the encoder's and quant_conv's alone: a decoder-only fine-tune keeps the cache.
        # (AutoencoderKL's quant_conv is None with use_quant_conv off; the Slice VAE always has one.)
        latent_modules = [part for part in (vae.encoder, vae.quant_conv) if part is not None]
        tokenizer = family.tokenizer
        text_settings = {"tokenizer": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                         "max_length": int(tokenizer.model_max_length), "family": family.family,
                         "encoded_length": getattr(family, "text_max_length", None),
                         "lowercase": getattr(family, "lowercase", None)}
        self.latent_cache = EmbeddingCache(module_fingerprint(*latent_modules, settings=vae_settings), folder)
        self.text_cache = EmbeddingCache(module_fingerprint(family.text_encoder, settings=text_settings), folder)

    def _select_trainable(self) -> None:
        mode, model = self.config.mode, self.model
        if mode == "motion":
            model.freeze_base()
            self._train_also(self.config.train.trainable_modules or [])
        elif mode == "image":  # AnimateDiff's image stage: the image UNet learns, motion modules stay as they are
            model.requires_grad_(True)
            for _, motion in model.motion_modules():
                motion.requires_grad_(False)
        elif mode == "lora":
            from kinema.training.lora import add_lora

            add_lora(model, self.config.lora.rank, self.config.lora.alpha, self.config.lora.targets)
        elif mode == "full":
            names = self.config.train.trainable_modules or list(V3_TRAINABLE_MODULES)
            known = [name for name, _ in model.named_children()] + [
                name for name, _ in model.named_parameters(recurse=False)]
            unknown = [name for name in names if name not in known]
            if unknown:
                raise KinemaError(f"train.trainable_modules names {', '.join(map(repr, unknown))}, which the "
                                  f"transformer does not have; its parts are: {', '.join(known)}")
            model.requires_grad_(False)
            for name in names:  # a submodule or a parameter of the transformer itself (scale_shift_table)
                getattr(model, name).requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise KinemaError(f"mode {mode} found nothing to train in this model")

    def _train_also(self, patterns: list[str]) -> None:
        """Mode motion: the base model's parameters whose names contain one of `patterns` train with the motion
        modules, as AnimateDiff's `trainable_modules` (`attn2.`: the spatial cross-attention, which is where a frozen
        image model would have to learn what a motion word looks like)."""
        named = [(name, p) for name, p in self.model.named_parameters() if not p.requires_grad]
        for pattern in patterns:
            chosen = [p for name, p in named if pattern in name]
            if not chosen:
                example = ", ".join(name for name, _ in named[:3])
                raise KinemaError(f"train.trainable_modules: no parameter of the base model has {pattern!r} in its "
                                  f"name (they read like {example}); give a part of those names, such as attn2.")
            for p in chosen:
                p.requires_grad_(True)

    @property
    def trains_base(self) -> bool:
        """Whether mode motion also trains some of the base model (`train.trainable_modules`)."""
        return self.config.mode == "motion" and bool(self.config.train.trainable_modules)

    def to(self, device: torch.device | str) -> TrainingTask:
        """Move the model and the frozen encoders (VAE, text and image encoders) to `device`: on a GPU the
        encoding of uncached clips runs there too."""
        super().to(device)
        self.family.to(self.device)
        return self

    # ------------------------------------------------------------------ a step

    def _timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        train = self.config.train
        return draw_timesteps(self.timesteps, batch, self.noise_schedule.config.num_train_timesteps, generator,
                              train.logit_mean, train.logit_std)

    def _inpaint_conditioning(self, frames: torch.Tensor, types: list[str],
                              generator: torch.Generator) -> dict[str, torch.Tensor]:
        from kinema.training.masks import sample_clip, sample_keep, training_inpaint_conditioning

        keep, _ = sample_keep(types, frames.shape[1], generator)
        use_clip, clip_frame = sample_clip(keep, generator, self.config.inpaint.clip_probability)
        return training_inpaint_conditioning(self.family, frames, keep, use_clip, clip_frame,
                                             None if self.latent_cache is None else self._cached_pixel_latents)

    def _cached_pixel_latents(self, videos: torch.Tensor) -> torch.Tensor:
        """Scaled latents `(N, C, F', h, w)` of masked and mask videos `(N, 3, F, H, W)` in [-1, 1] through the
        latent cache: a clip keeps one of a few masks, and every text-to-video sample's masked video is the same, so
        most of the inpaint encodes of a run are repeats."""
        from kinema.training.cache import tensor_key

        keys = [tensor_key("inpaint pixels", video) for video in videos]
        return self.latent_cache.get_many(
            keys, lambda missing: {"latents": self.family._encode_pixels(videos[missing])})["latents"]

    def _encode(self, frames: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Latents `(B, C, F', h, w)` of frames `(B, F, 3, H, W)` in [0, 1] and the text conditioning, through the
        caches when the config names one (a clip is keyed by its pixels, a caption by its text)."""
        if self.latent_cache is None or self.text_cache is None:
            return self.family.encode_frames(frames), dict(self.family.encode_text(texts))
        from kinema.training.cache import tensor_key

        latents = self.latent_cache.get_many(
            [tensor_key(clip) for clip in frames],
            lambda missing: {"latents": self.family.encode_frames(frames[missing])})["latents"]
        text = self.text_cache.get_many(
            [tensor_key(text) for text in texts],
            lambda missing: {k: v for k, v in self.family.encode_text([texts[i] for i in missing]).items()
                             if v is not None})
        return latents, text

    def inputs(self, batch: dict[str, Any], generator: torch.Generator, step: int = 0) -> dict[str, Any]:
        """Noisy latents, timesteps, noise and conditioning for `batch["pixels"]` `(B, F, 3, H, W)` in [-1, 1] with
        captions `batch["text"]`."""
        frames = (batch["pixels"].float() + 1) / 2
        with torch.no_grad():
            latents, cond = self._encode(frames, list(batch["text"]))
            if self.is_dit and self.family.inpaints:
                cond.update(self._inpaint_conditioning(frames, list(batch["type"]), generator))
        # Drawn on the CPU generator and then moved, so a step's noise is the same on every device.
        device = self.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = self._timesteps(latents.shape[0], generator).to(device)
        latents = latents.to(device)  # cached latents come back on the CPU
        noisy = self.noise_schedule.add_noise(latents, noise, timesteps)
        target = noise
        if self.family.prediction_type == "v_prediction":
            target = self.noise_schedule.get_velocity(latents, noise, timesteps)
        inputs = {"noisy": noisy, "timesteps": timesteps, "target": target,
                  "cond": {key: value.to(device) if isinstance(value, torch.Tensor) else value
                           for key, value in cond.items()}}
        if self.config.train.snr_gamma is not None:
            inputs["weights"] = min_snr_weights(self.noise_schedule, timesteps, self.config.train.snr_gamma,
                                                self.family.prediction_type)
        return inputs

    # ------------------------------------------------------------------ export

    def export(self, folder: Path) -> list[str]:
        """motion (AnimateDiff): `motion_module.safetensors` in the original AnimateDiff layout, plus the SD1.5
        diffusers folder `model/` when `train.trainable_modules` trained some of the UNet too; image: an SD1.5
        diffusers folder `model/`; lora: `lora.safetensors` (diffusers/peft) and, for motion LoRAs on a UNet,
        `motion_lora.safetensors` (original AnimateDiff layout); EasyAnimate motion/full: a V3 folder `model/`
        (the trained transformer, the other parts linked from the source folder)."""
        mode = self.config.mode
        if mode == "lora":
            from kinema.training.lora import save_lora

            written = [save_lora(self.model, folder / "lora.safetensors", "diffusers").name]
            if not self.is_dit and self.config.lora.targets == "motion":
                written.append(save_lora(self.model, folder / "motion_lora.safetensors", "animatediff").name)
            return written
        if not self.is_dit and mode == "motion":
            from kinema.bundled import FOLDER_MOTION_MODULE
            from kinema.loaders.animatediff.write import save_motion_module

            written = [save_motion_module(self.model, folder / FOLDER_MOTION_MODULE, "original").name]
            return written + ([self._export_sd_folder(folder / "model")] if self.trains_base else [])
        if not self.is_dit:  # image
            return [self._export_sd_folder(folder / "model")]
        source = Path(self.config.model.path)
        target = folder / "model"
        for part in sorted(p.name for p in source.iterdir() if p.is_dir() and p.name != "transformer"):
            _link_or_copy_tree(source / part, target / part)
        _copy_model_manifest(source, target)
        self.model.save_pretrained(target / "transformer")
        return ["model"]

    def _export_sd_folder(self, target: Path) -> str:
        from diffusers import UNet2DConditionModel

        video_unet = self.model
        motion = {f"{name}." for name, _ in video_unet.motion_modules()}
        state = {k: v for k, v in video_unet.unet.state_dict().items() if not k.startswith(tuple(motion))}
        config = {k: v for k, v in video_unet.unet.config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(state, strict=True)
        unet.save_pretrained(target / "unet")
        self.family.vae.save_pretrained(target / "vae")
        # kinema's own models name their text encoder in kinema.json and carry none.
        if not _copy_model_manifest(Path(self.config.model.path), target):
            self.family.text_encoder.save_pretrained(target / "text_encoder")
            self.family.tokenizer.save_pretrained(target / "tokenizer")
        # The sampling schedule an SD folder carries (kinema samples with its own; other tools read this one).
        from diffusers import PNDMScheduler

        from kinema.loaders.stable_diffusion import SD15_CONFIGS

        source = Path(self.config.model.path) / "scheduler"
        scheduler_folder = source if source.is_dir() else Path(SD15_CONFIGS) / "scheduler"
        PNDMScheduler.from_pretrained(scheduler_folder).save_pretrained(target / "scheduler")
        return target.name


# ---------------------------------------------------------------- the VAE


class VAETask(TrainingTask):
    """Mode vae: the Slice VAE of an EasyAnimate folder, or the image AutoencoderKL of a Stable Diffusion model (on
    the clips' frames as images), learns to reconstruct (reconstruction + KL), with a 3D patch discriminator
    alongside when `vae.adversarial_weight` > 0 (for the image VAE it judges each frame as a one-frame clip)."""

    def __init__(self, config: TrainConfig, family: Any):
        from kinema.training.vae_objective import PatchDiscriminator3D, VAELossSettings

        self.config, self.family = config, None
        self.model = family.vae
        self.model.requires_grad_(True).train()
        if config.vae.trains == "decoder":
            # The decoder-only fine-tune (V3's, and SD's ft-MSE VAE): the latents keep their meaning, so a diffusion
            # model trained on this encoder's latents decodes better without retraining.
            self.model.requires_grad_(False)
            for part in (self.model.decoder, self.model.post_quant_conv):
                part.requires_grad_(True)
        settings = VAELossSettings(kl_weight=config.vae.kl_weight, reconstruction=config.vae.reconstruction,
                                   adversarial_weight=config.vae.adversarial_weight,
                                   adversarial_start=config.vae.adversarial_start,
                                   temporal_weight=config.vae.temporal_weight)
        self.discriminator = None
        if config.vae.adversarial_weight > 0:
            with torch.random.fork_rng(devices=[]):  # the same start in every process and rerun
                torch.manual_seed(config.seed)
                self.discriminator = PatchDiscriminator3D(in_channels=int(self.model.config.in_channels)).train()
        self.module = _VAELoss(self.model, settings, self.discriminator)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The VAE's weights, then the discriminator's (`discriminator.` names) when there is one."""
        named = super().trainable_parameters()
        if self.discriminator is not None:
            named += [(f"discriminator.{name}", p) for name, p in self.discriminator.named_parameters()]
        return named

    def check_frames(self, frames: int, at_once: bool = True) -> None:
        """A Slice VAE's frame rule; an image VAE takes the frames one by one, any count."""
        check = getattr(self.model, "check_frames", None)
        if check is not None:
            check(frames)

    def inputs(self, batch: dict[str, Any], generator: torch.Generator, step: int = 0) -> dict[str, Any]:
        """The clips `(B, 3, F, H, W)` in [-1, 1] as the VAE takes it, the posterior's noise generator and the step
        (the adversarial terms start at `vae.adversarial_start`)."""
        return {"video": batch["pixels"].float().permute(0, 2, 1, 3, 4).to(self.device), "generator": generator,
                "step": step}

    def export(self, folder: Path) -> list[str]:
        """`vae/`: the trained VAE (`save_pretrained` of the SliceVAE or AutoencoderKL), for a V3 or SD folder's
        vae/ (the discriminator is a training aid and is not exported)."""
        self.model.save_pretrained(folder / "vae")
        return ["vae"]


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """`module`'s weights take no gradient inside the block (they are still used)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(module.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)


class _VAELoss(nn.Module):
    """Reconstruction + KL of the VAE, and with a discriminator the adversarial terms (what DDP wraps in mode vae).

    One backward pass trains both players: the VAE's term scores its reconstruction through the discriminator with
    the discriminator's weights frozen (so it moves the VAE only), and the discriminator's hinge loss sees the
    reconstruction detached (so it moves the discriminator only)."""

    def __init__(self, vae: Any, settings: Any, discriminator: nn.Module | None = None):
        super().__init__()
        self.vae = vae
        self.settings = settings
        self.discriminator = discriminator

    def forward(self, video: torch.Tensor, generator: torch.Generator, step: int = 0) -> torch.Tensor:
        from kinema.training.vae_objective import discriminator_input, discriminator_loss, vae_losses

        if self.discriminator is None:
            return vae_losses(self.vae, video, self.settings, generator)["loss"]
        with _frozen(self.discriminator):
            losses = vae_losses(self.vae, video, self.settings, generator, self.discriminator, step,
                                return_decoded=True)
        if not self.settings.adversarial_on(step):
            return losses["loss"]
        real, fake = (discriminator_input(self.vae, v) for v in (video, losses["decoded"]))
        return losses["loss"] + discriminator_loss(self.discriminator, real, fake)


def make_task(config: TrainConfig) -> TrainingTask:
    """Load the model of `config` and set it up for its mode."""
    family = load_training_family(config)
    if config.mode == "vae":
        return VAETask(config, family)
    return DiffusionTask(config, family)
