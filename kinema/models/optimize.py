"""Model-level inference optimisations of a video denoiser (`VideoUNet`, `VideoDiT`): `compile_model` (torch.compile
with a persistent cache) and `quantize_model` (dynamic int8 Linear layers). Both change the model in place and
return it, so `family.model` stays the same object with the same `VideoModel` contract (`max_frames`, motion
weights, attention chunking).

Compile: one graph per input shape. The model is compiled with `dynamic=False`, so each distinct (batch, latent
frames, height, width) is its own bucket and graph; a run of `generate` uses one shape (two with a second frame
count, e.g. a continuation's shorter last segment). Latent frames are not padded up to a shared bucket: the motion
modules attend over every frame and take no mask, so padding frames would change the result. Past torch's
`recompile_limit` (8) shapes, torch runs further shapes eagerly and logs a warning. Timesteps come as tensors from
the schedulers, so a new step does not recompile (a Python number would be baked into the graph: each new value would
recompile). A `copy.deepcopy` of a compiled model runs eagerly. What inductor generates and builds (FX graphs,
AOTAutograd graphs, compiled C++) is kept in `compile_cache_dir()`, so only the first run of a shape pays for the
compile; tracing and loading the cached code still happen in every process.

Quantize: dynamic int8 (weights int8 per output channel, activations quantised on the fly per call) of every Linear
layer except those `int8_float_layers` keeps in float; runs on CPU, float32 models only. Quantise after loading and
for inference only: the int8 layers hold packed weights that neither `save_pretrained` nor training handles.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from kinema.errors import KinemaError

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=nn.Module)

QUANTIZE_MODES = ("int8",)
COMPILE_CACHE_VARIABLE = "KINEMA_COMPILE_CACHE"
# Submodules (at any depth) whose Linear layers stay in float: the timestep and conditioning embeddings (one vector
# per clip, or a few text tokens, so int8 saves nothing, while their error would shift the modulation of every block).
FLOAT_SUBMODULES = frozenset({"adaln_single", "time_embedding", "time_emb_proj", "add_embedding", "caption_projection",
                              "image_tokens"})
# The model's own output projection (top level) stays in float too: its error would land on the prediction unfiltered.
FLOAT_OUTPUT_LAYERS = frozenset({"proj_out"})
# Linear layers with fewer input or output features stay in float: measured on one core (fbgemm, AVX-512), below
# this width quantising each call's activations costs more than the int8 matmul saves.
MIN_INT8_FEATURES = 128


# ---------------------------------------------------------------------------------------------------- compile


def compile_cache_dir() -> Path:
    """Where compiled graphs are kept: `$KINEMA_COMPILE_CACHE`, else `$KINEMA_HOME/compile`, else
    `$XDG_CACHE_HOME/kinema/compile`, else `~/.cache/kinema/compile`."""
    for variable, below in ((COMPILE_CACHE_VARIABLE, ()), ("KINEMA_HOME", ("compile",)),
                            ("XDG_CACHE_HOME", ("kinema", "compile"))):
        value = os.environ.get(variable)
        if value:
            return Path(value).expanduser().joinpath(*below)
    return Path.home() / ".cache" / "kinema" / "compile"


def has_cpp_compiler() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (`$CXX`, else `g++`)."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return False
    return True


def use_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Make inductor keep its caches in `cache_dir` (default `compile_cache_dir()`) for the rest of this process and
    return that folder. Inductor reads `TORCHINDUCTOR_CACHE_DIR` at each compile, so this sets it (process-wide)."""
    folder = Path(cache_dir) if cache_dir is not None else compile_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # the cache holds code that runs: the user's alone
    except OSError as err:
        raise KinemaError(f"cannot create the compile cache folder {folder} ({err.strerror}); set "
                          f"{COMPILE_CACHE_VARIABLE} to a writable folder") from None
    import torch._functorch.config
    import torch._inductor.config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return folder


def compile_model(model: ModelT, *, cache_dir: str | os.PathLike | None = None,
                  backend: str | Callable[..., Any] = "inductor",
                  on_missing_compiler: Literal["error", "eager"] = "error") -> ModelT:
    """Compile `model`'s forward with torch.compile, in place, and return it (the same object).

    The compile itself happens at the first forward of each input shape (one graph per shape, `dynamic=False`; see
    the module docstring) and is cached in `cache_dir` (default `compile_cache_dir()`), so later processes reuse it.
    Inductor builds CPU kernels with a C++ compiler: without one, `on_missing_compiler="error"` raises a KinemaError
    before any work and `"eager"` logs a warning and returns the model uncompiled. `backend` is torch.compile's
    (a name or a callable, e.g. a graph counter in tests).
    """
    if on_missing_compiler not in ("error", "eager"):
        raise KinemaError(f"on_missing_compiler must be 'error' or 'eager', got {on_missing_compiler!r}")
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if backend == "inductor" and on_cpu and not has_cpp_compiler():
        advice = "install one (e.g. `apt-get install g++`) or point $CXX at it"
        if on_missing_compiler == "error":
            raise KinemaError(f"--compile needs a C++ compiler on CPU and none was found: {advice}, or drop --compile")
        logger.warning("no C++ compiler found, so the model runs uncompiled: %s to compile it", advice)
        return model
    use_compile_cache(cache_dir)
    model.compile(backend=backend, dynamic=False)
    return model


# ---------------------------------------------------------------------------------------------------- quantize


def int8_float_layers(model: nn.Module, min_features: int = MIN_INT8_FEATURES) -> list[str]:
    """Names of the Linear layers `quantize_model` keeps in float: those inside `FLOAT_SUBMODULES`, the output
    projection (`FLOAT_OUTPUT_LAYERS`) and those with fewer than `min_features` input or output features."""
    return [name for name, layer in model.named_modules() if isinstance(layer, nn.Linear)
            and (name in FLOAT_OUTPUT_LAYERS or FLOAT_SUBMODULES.intersection(name.split("."))
                 or min(layer.in_features, layer.out_features) < min_features)]


def int8_layers(model: nn.Module, min_features: int = MIN_INT8_FEATURES) -> list[str]:
    """Names of the Linear layers `quantize_model` makes int8: every other Linear."""
    kept = set(int8_float_layers(model, min_features))
    return [name for name, layer in model.named_modules() if isinstance(layer, nn.Linear) and name not in kept]


def check_int8_device(mode: str, *devices: torch.device) -> None:
    """One KinemaError line unless every device is the CPU: torch's dynamic int8 kernels (fbgemm's / qnnpack's) run
    there only. Checked before a model loads (`kinema generate --device`) and again on the model itself."""
    elsewhere = sorted({str(device) for device in devices if torch.device(device).type != "cpu"})
    if elsewhere:
        raise KinemaError(f"--quantize {mode} runs on the CPU only (torch's dynamic int8 kernels), and --device is "
                          f"{', '.join(elsewhere)}: drop --quantize, or give --device cpu")


def quantize_model(model: ModelT, mode: str = "int8", *, min_features: int = MIN_INT8_FEATURES) -> ModelT:
    """Dynamic int8 quantisation of `model`'s Linear layers, in place; returns the model (the same object).

    Each layer of `int8_layers(model, min_features)` becomes a `torch.ao.nn.quantized.dynamic.Linear`: int8 weights
    (one scale per output channel), activations quantised per call, float32 in and out. The rest stays as it is.
    The model must be float32 and on the CPU (the int8 kernels are fbgemm's / qnnpack's).

    Built on torch.ao's `quantize_dynamic`, not torchao's `Int8DynamicActivationInt8WeightConfig`: in eager mode on
    CPU torch.ao's fbgemm kernels ran 1.6x faster than float32 on a transformer-sized Linear stack, torchao's ran
    ~50x slower than float32 (it needs torch.compile to fuse its quantisation ops).
    """
    if mode not in QUANTIZE_MODES:
        raise KinemaError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if floats - {torch.float32}:
        raise KinemaError(f"int8 quantisation needs a float32 model, this one is {sorted(map(str, floats))}: load it "
                          "in float32 (drop --dtype) to use --quantize int8")
    check_int8_device(mode, *{p.device for p in model.parameters()})
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = int8_layers(model, min_features)
    with warnings.catch_warnings():
        # torch.ao's eager quantisation is deprecated in favour of torchao, which is slower here (see above); it
        # warns on every call. Only these two warnings are hidden.
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8,
                         inplace=True)
    logger.info("int8: %d Linear layers quantised, %d kept in float", len(names),
                len(int8_float_layers(model, min_features)))
    return model
