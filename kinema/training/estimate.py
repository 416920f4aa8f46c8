"""How much memory a training step needs, and the refusal of a batch or size that cannot fit, before step 1.

A step holds the weights, the gradients of the trainable parameters, AdamW's two float32 states per trainable
parameter, and the activations autograd saves for the backward pass. The first three are counted from the model.
The activations are measured: one probe forward (a batch of `probe_batch` samples at the real frame count and size)
runs under `torch.autograd.graph.saved_tensors_hooks`, which see every tensor autograd saves, and the bytes of their
distinct storages are summed. The hooks keep nothing (the probe graph is never backpropagated), so the probe needs
about the memory of an inference forward, not of a training step: a batch that cannot fit is refused rather than
run out of memory. Measured per sample, the activations are scaled linearly to the batch size.

Refinements over a plain sum:
- Parameters and buffers saved for the backward pass are the weights themselves (already counted).
- Tensors computed from weights alone (mixed precision's half-precision copies of the weights, transposes, tables)
  do not grow with the batch; a `TorchDispatchMode` sees the operations that make them, and they are added once
  rather than scaled.
- With gradient checkpointing, the probe gives the model a checkpoint function that runs each checkpointed part
  while recording what it saves: a step holds every part's inputs (which the checkpoint keeps) plus, during the
  backward pass, the recomputed activations of one part at a time (the largest is counted).
- Mixed precision ("fp16", "bf16") runs the model's forward under `torch.autocast`, as accelerate runs the step.

Not counted: the transient memory of single operations (attention scores of a fused kernel, activation gradients
in flight during the backward pass), the memory allocator's fragmentation, and models outside `model` that the step
runs without gradients (VAE, text encoders): they are in memory before the check, so the free memory excludes them.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kinema.errors import KinemaError
from kinema.memory import available_memory

GIB = 1024**3
# accelerate's mixed_precision values, and the autocast dtype of each.
MIXED_PRECISION: dict[str, torch.dtype | None] = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# AdamW keeps exp_avg and exp_avg_sq, in float32, for each trainable parameter.
ADAMW_STATE_BYTES = 2 * 4

# How an allocation failure reads when it is not a torch.OutOfMemoryError (the CPU allocator, some backends).
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|failed to allocate", re.IGNORECASE)


def _gib(size: int) -> str:
    """Bytes as GiB with one decimal (two significant digits below 0.1 GiB, so small models do not show 0.0)."""
    value = size / GIB
    if value == 0 or value >= 0.095:
        return f"{value:.1f}"
    return f"{value:.2g}"


@dataclass
class MemoryEstimate:
    """Bytes a training step needs, by kind.

    `loaded` is how much of `weights` already sits on the device `loaded_on` (the free memory of that device excludes
    it); `gradient_checkpointing` whether the estimate is for a model that checkpoints.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    loaded: int = 0
    loaded_on: str = ""
    gradient_checkpointing: bool = False

    @property
    def total(self) -> int:
        """All the bytes the step needs."""
        return self.weights + self.gradients + self.optimizer + self.activations

    def parts(self) -> str:
        """"weights 1.2, gradients 0.4, optimizer 0.8, activations 9.9" (GiB)."""
        return (f"weights {_gib(self.weights)}, gradients {_gib(self.gradients)}, optimizer {_gib(self.optimizer)}, "
                f"activations {_gib(self.activations)}")

    def describe(self) -> str:
        """"about 12.3 GiB: weights 1.2, gradients 0.4, optimizer 0.8, activations 9.9"."""
        return f"about {_gib(self.total)} GiB: {self.parts()}"


# ---------------------------------------------------------------- counting saved tensors


class _Storages:
    """A set of live tensor storages, by identity: a freed storage's address may be reused by a new one."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, int], weakref.ReferenceType] = {}

    def add(self, storage: torch.UntypedStorage) -> bool:
        """Add `storage`; False when it is in the set already."""
        key = (str(storage.device), storage.data_ptr())
        known = self._refs.get(key)
        if known is not None and known() is storage:
            return False
        self._refs[key] = weakref.ref(storage)
        return True

    def __contains__(self, storage: torch.UntypedStorage) -> bool:
        known = self._refs.get((str(storage.device), storage.data_ptr()))
        return known is not None and known() is storage


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


class _SavedBytes:
    """Bytes of the distinct storages one scope saves: `per_sample` grows with the batch, `fixed` (tensors made from
    weights alone) does not."""

    def __init__(self, weights: _Storages, from_weights: _Storages, held: Sequence[torch.Tensor] = ()) -> None:
        self.weights, self.from_weights = weights, from_weights
        self.seen = _Storages()
        self.per_sample = 0
        self.fixed = 0
        for tensor in held:  # already held elsewhere: not counted again in this scope
            storage = _storage(tensor)
            if storage is not None:
                self.seen.add(storage)

    def add(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is None:
            self.per_sample += tensor.numel() * tensor.element_size()
            return
        if storage in self.weights or not self.seen.add(storage):
            return
        if storage in self.from_weights:
            self.fixed += storage.nbytes()
        else:
            self.per_sample += storage.nbytes()

    def bytes_for(self, scale: float) -> float:
        return self.per_sample * scale + self.fixed


class _FromWeights(TorchDispatchMode):
    """Marks the outputs of every operation whose tensor inputs are all weights or made from weights alone."""

    def __init__(self, weights: _Storages, from_weights: _Storages) -> None:
        super().__init__()
        self.weights, self.from_weights = weights, from_weights

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = [_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if inputs and all(s is not None and (s in self.weights or s in self.from_weights) for s in inputs):
            for tensor in tree_leaves(out):
                storage = _storage(tensor) if isinstance(tensor, torch.Tensor) else None
                if storage is not None and storage not in self.weights:
                    self.from_weights.add(storage)
        return out


class _NotKept:
    """What the probe's pack hook leaves in the graph instead of a tensor."""


def _no_backward(_: Any) -> torch.Tensor:
    raise RuntimeError("the memory probe's graph keeps no tensors and cannot be backpropagated")


class _Probe:
    """The saved-tensor hooks and the checkpoint function of one probe forward."""

    def __init__(self, weights: _Storages) -> None:
        self.weights, self.from_weights = weights, _Storages()
        self.outside = _SavedBytes(weights, self.from_weights)
        self.parts: list[_SavedBytes] = []
        self.inside: _SavedBytes | None = None

    def pack(self, tensor: torch.Tensor) -> _NotKept:
        (self.inside or self.outside).add(tensor)
        return _NotKept()

    def checkpoint(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a checkpointed part as the step would keep it: its inputs held (by the checkpoint), its own saves
        counted apart (they exist only while the backward pass recomputes this part)."""
        if self.inside is not None:  # a checkpoint within a checkpointed part reruns within the outer rerun
            return function(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for tensor in inputs:
            self.outside.add(tensor)
        self.inside = _SavedBytes(self.weights, self.from_weights, inputs)
        try:
            return function(*args, **kwargs)
        finally:
            self.parts.append(self.inside)
            self.inside = None

    def activations(self, scale: float) -> int:
        largest = max((part.bytes_for(scale) for part in self.parts), default=0.0)
        return math.ceil(self.outside.bytes_for(scale) + largest)


# ---------------------------------------------------------------- gradient checkpointing during the probe

_CHECKPOINT_ATTRIBUTES = ("gradient_checkpointing", "_gradient_checkpointing_func")
_MISSING = object()


def _checkpointing_parts(model: nn.Module) -> list[nn.Module]:
    """The outermost parts of `model` that switch gradient checkpointing on and off (diffusers models)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not (getattr(module, "_supports_gradient_checkpointing", False)
                and callable(getattr(module, "enable_gradient_checkpointing", None))):
            continue
        if not any(name == outer or name.startswith(outer + ".") or outer == "" for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


@contextlib.contextmanager
def _probe_checkpointing(model: nn.Module, enabled: bool, probe: _Probe) -> Iterator[None]:
    """Checkpointing as the step will run it, through the probe's checkpoint function; the model's own settings are
    put back afterwards."""
    before = [(module, name, vars(module).get(name, _MISSING)) for module in model.modules()
              for name in _CHECKPOINT_ATTRIBUTES]
    parts = _checkpointing_parts(model)
    if enabled and not parts:
        raise KinemaError(f"gradient checkpointing is on but {type(model).__name__} has no part that supports it; "
                          "set gradient_checkpointing: false")
    try:
        for part in parts:
            if enabled:
                part.enable_gradient_checkpointing(probe.checkpoint)  # type: ignore[operator]
            else:
                part.disable_gradient_checkpointing()  # type: ignore[operator]
        yield
    finally:
        for module, name, value in before:
            if value is _MISSING:
                vars(module).pop(name, None)
            else:
                setattr(module, name, value)


@contextlib.contextmanager
def _autocast_forward(model: nn.Module, device_type: str, dtype: torch.dtype | None) -> Iterator[None]:
    """Run `model`'s forward under autocast, as accelerate runs a prepared module: what `forward` computes around
    it (VAE and text encoding of the probe batch) keeps its own precision."""
    if dtype is None:
        yield
        return
    open_contexts: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        context = torch.autocast(device_type, dtype=dtype)
        context.__enter__()
        open_contexts.append(context)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_contexts.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------- the estimate


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_training_memory(model: nn.Module, forward: Callable[[], torch.Tensor], batch: int, probe_batch: int = 1,
                             *, mixed_precision: str = "no", gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Estimate the memory of a training step of `batch` samples with AdamW.

    Args:
        model: the module that trains (its trainable parameters are those with `requires_grad`); its parameters
            and buffers are the weights.
        forward: builds a probe batch of `probe_batch` samples at the real frame count and size, e.g. latents
            `(probe_batch, C, F', h, w)`, runs `model` on it and returns the loss (a tensor that requires grad).
            It is called once, under the saved-tensor hooks, with `model`'s forward under autocast for mixed
            precision; the global RNG states are put back afterwards.
        batch: the batch size of a step (per process).
        probe_batch: how many samples `forward` builds.
        mixed_precision: "no", "fp16" or "bf16" (accelerate's values): `model`'s forward runs under autocast in that
            dtype.
        gradient_checkpointing: whether the step checkpoints; the probe switches the model's diffusers parts to the
            probe's checkpoint function (or off) and puts their settings back afterwards.
    Returns:
        weights (all parameters and buffers), gradients (trainable parameters, in their dtype), optimizer (2 float32
        states per trainable parameter) and activations (measured, scaled to `batch`), in bytes.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise KinemaError(f"batch must be a whole number of at least 1, got {batch!r}")
    if isinstance(probe_batch, bool) or not isinstance(probe_batch, int) or probe_batch < 1:
        raise KinemaError(f"probe_batch must be a whole number of at least 1, got {probe_batch!r}")
    if mixed_precision not in MIXED_PRECISION:
        raise KinemaError(f"unknown mixed_precision {mixed_precision!r}; use one of {', '.join(MIXED_PRECISION)}")
    parameters = list(model.parameters())
    buffers = list(model.buffers())
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        raise KinemaError(f"{type(model).__name__} has no trainable parameters: nothing to estimate a training "
                          "step for")
    device = parameters[0].device
    weights = _Storages()
    for tensor in parameters + buffers:
        storage = _storage(tensor)
        if storage is not None:
            weights.add(storage)

    probe = _Probe(weights)
    # The probe must not shift the random draws of the training that follows (dropout, noise drawn globally).
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda") else []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=rng_devices))
            stack.enter_context(_probe_checkpointing(model, gradient_checkpointing, probe))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(_autocast_forward(model, device.type, MIXED_PRECISION[mixed_precision]))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(probe.pack, _no_backward))
            stack.enter_context(_FromWeights(weights, probe.from_weights))
            loss = forward()
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and not _OUT_OF_MEMORY.search(str(err)):
            raise
        raise KinemaError(f"even a forward pass of {probe_batch} sample(s) at this frame count and size runs out of "
                          f"memory on {device}: lower data.frames or data.size") from None
    if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
        raise KinemaError("the probe forward gave no loss that requires gradients (does anything in the model "
                          "train, and does the forward run with gradients?)")
    del loss

    return MemoryEstimate(
        weights=_tensor_bytes(parameters + buffers),
        gradients=_tensor_bytes(trainable),
        optimizer=sum(p.numel() for p in trainable) * ADAMW_STATE_BYTES,
        activations=probe.activations(batch / probe_batch),
        loaded=_tensor_bytes([t for t in parameters + buffers if t.device == device]),
        loaded_on=str(device),
        gradient_checkpointing=gradient_checkpointing,
    )


# ---------------------------------------------------------------- free memory


def _same_device(first: str, second: torch.device | str) -> bool:
    if not first:
        return False
    one, other = torch.device(first), torch.device(second)
    if one.type != other.type:
        return False
    if one.type == "cuda":
        current = torch.cuda.current_device()
        return (one.index if one.index is not None else current) == (
            other.index if other.index is not None else current)
    return True


def check_memory(estimate: MemoryEstimate, device: torch.device | str, what: str) -> None:
    """One KinemaError line when `estimate` needs more than `device` has free, naming the parts and the fixes.

    Weights already on `device` (`estimate.loaded`) count as free: the free memory was measured with them in it."""
    loaded = estimate.loaded if _same_device(estimate.loaded_on, device) else 0
    free = available_memory(device) + loaded
    if estimate.total <= free:
        return
    place = "this machine" if torch.device(device).type in ("cpu", "mps") else f"the GPU ({device})"
    counted = f" (counting the {_gib(loaded)} GiB of weights already loaded)" if loaded else ""
    fixes = "lower batch_size, data.frames or data.size" + (
        "" if estimate.gradient_checkpointing else ", or set gradient_checkpointing: true")
    raise KinemaError(f"{what} needs about {_gib(estimate.total)} GiB ({estimate.parts()}) but {place} has "
                      f"{_gib(free)} GiB free{counted}: {fixes}")
