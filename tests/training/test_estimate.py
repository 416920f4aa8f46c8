"""Training memory estimate (kinema/training/estimate.py): byte counts of weights, gradients and AdamW states against
hand sums; measured activations against two references written here; the refusal of a step that cannot fit; free
memory read from /proc/meminfo and the memory cgroup.

References:
- `saved_bytes`: a plain count of what autograd saves in a real forward that keeps its saved tensors (so no storage is
  freed and reused), distinct storages by address, parameters left out. With the probe at the same batch size the
  estimate must equal it exactly; it checks the probe's bookkeeping (it keeps nothing, so addresses get reused).
- `LiveTensorBytes`: the peak of the bytes of all tensor storages alive during a real forward *and backward* at
  batch 4, tracked through every operation's outputs and their release. It knows nothing about what autograd saves,
  so it checks the principle (saved tensors are what a step holds) as well as the scaling from a probe of 1.
"""

import weakref

import pytest
import torch
from diffusers import ModelMixin
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kinema.memory as memory_module
import kinema.training.estimate as estimate_module
from kinema.errors import KinemaError
from kinema.training.estimate import (
    GIB,
    MemoryEstimate,
    available_memory,
    check_memory,
    estimate_training_memory,
)


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages that operations create, counted while they are alive; `peak` is the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known: dict[int, weakref.ref] = {}

    def _released(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                known = self._known.get(storage.data_ptr())
                if known is not None and known() is storage:
                    continue  # a view, or an in-place result
                self._known[storage.data_ptr()] = weakref.ref(storage)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._released, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def saved_bytes(model: nn.Module, forward) -> int:
    """Bytes of the distinct non-weight storages autograd saves in `forward()`, keeping them all alive."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    sizes, kept = {}, []

    def pack(tensor):
        kept.append(tensor)
        if tensor.untyped_storage().data_ptr() not in weights:
            sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(sizes.values())


def unet_step(model, batch: int, frames: int = 4, size: int = 16):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, frames, size, size, generator=generator)
    text = torch.randn(batch, 7, 32, generator=generator)
    return lambda: model(latents, torch.full((batch,), 10), text).float().pow(2).mean()


def dit_step(model, batch: int, frames: int = 4, size: int = 32):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, frames, size, size, generator=generator)
    text = torch.randn(batch, 7, 48, generator=generator)
    return lambda: model(latents, torch.full((batch,), 10), text).float().pow(2).mean()


def hand_sums(model: nn.Module) -> tuple[int, int, int]:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return weights, sum(p.numel() * 4 for p in trainable), sum(p.numel() * 2 * 4 for p in trainable)


# ------------------------------------------------------------------ counts


def test_weights_gradients_and_adamw_states_are_the_hand_sums(video_unet, video_dit):
    video_unet.freeze_base()  # motion modules train, the image UNet does not
    estimate = estimate_training_memory(video_unet, unet_step(video_unet, 1), 2)
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == hand_sums(video_unet)
    assert estimate.gradients < estimate.weights / 2 and estimate.loaded == estimate.weights
    assert estimate.loaded_on == "cpu" and estimate.total == sum(hand_sums(video_unet)) + estimate.activations
    estimate = estimate_training_memory(video_dit, dit_step(video_dit, 1), 2)
    weights, gradients, optimizer = hand_sums(video_dit)
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (weights, gradients, optimizer)
    assert sum(b.numel() for b in video_dit.buffers()) > 0  # the motion modules' frame tables count as weights


def test_probe_at_the_batch_size_counts_exactly_what_a_kept_forward_saves(video_unet, video_dit):
    video_unet.freeze_base()
    for model, step in ((video_unet, unet_step), (video_dit, dit_step)):
        model.train()
        expected = saved_bytes(model, step(model, 2))
        assert estimate_training_memory(model, step(model, 2), 2, probe_batch=2).activations == expected


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_for_batch_4_from_a_probe_of_1_are_near_the_live_peak_of_a_real_step(video_unet, video_dit,
                                                                                           checkpointing):
    video_unet.freeze_base()
    for model, step in ((video_unet, unet_step), (video_dit, dit_step)):
        model.train()
        estimate = estimate_training_memory(model, step(model, 1), 4, gradient_checkpointing=checkpointing)
        if checkpointing:
            model.enable_gradient_checkpointing()
        forward, live = step(model, 4), LiveTensorBytes()
        with live:
            forward().backward()
        assert live.peak > 5e6  # tens of MB: far above what anything but the activations could make
        assert 0.5 < estimate.activations / live.peak < 2, (type(model).__name__, estimate.activations, live.peak)
        model.zero_grad(set_to_none=True)


def test_checkpointing_measures_far_less_and_leaves_the_models_settings_as_they_were(video_dit):
    video_dit.train()
    plain = estimate_training_memory(video_dit, dit_step(video_dit, 1), 4)
    checkpointed = estimate_training_memory(video_dit, dit_step(video_dit, 1), 4, gradient_checkpointing=True)
    assert checkpointed.activations < plain.activations / 2 and checkpointed.gradient_checkpointing
    assert not video_dit.gradient_checkpointing and video_dit._gradient_checkpointing_func is None
    video_dit.enable_gradient_checkpointing()
    own = video_dit._gradient_checkpointing_func
    assert estimate_training_memory(video_dit, dit_step(video_dit, 1), 4).activations == plain.activations
    assert video_dit.gradient_checkpointing and video_dit._gradient_checkpointing_func is own


class CheckpointedMLP(ModelMixin):
    """A diffusers model of residual MLP blocks that checkpoints each block, as diffusers' models do."""

    _supports_gradient_checkpointing = True

    def __init__(self, width: int = 32, hidden: int = 128, blocks: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
                                    for _ in range(blocks))
        self.gradient_checkpointing = False

    def forward(self, x):
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = x + self._gradient_checkpointing_func(block, x)
            else:
                x = x + block(x)
        return x.pow(2).mean()


def test_checkpointing_holds_each_blocks_input_and_one_blocks_recomputation():
    width, hidden, blocks, batch = 32, 128, 8, 6
    model = CheckpointedMLP(width, hidden, blocks)
    x = torch.randn(1, width)
    # Per sample, in float32: each block saves its input (first linear), the first linear's output (GELU) and the
    # GELU's output (second linear); the loss saves the last x. Checkpointing keeps the block inputs and, while the
    # backward pass reruns a block, that block's two hidden activations.
    plain = (blocks * (width + 2 * hidden) + width) * 4 * batch
    checkpointed = (blocks * width + 2 * hidden + width) * 4 * batch
    assert estimate_training_memory(model, lambda: model(x), batch).activations == plain
    assert estimate_training_memory(model, lambda: model(x), batch,
                                    gradient_checkpointing=True).activations == checkpointed


class FrozenStack(nn.Module):
    """Three frozen linears and a trainable last one: under autocast each weight's half-precision copy is saved (the
    input's gradient needs it) and does not grow with the batch."""

    def __init__(self, width: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width))
        self.frozen.requires_grad_(False)
        self.last = nn.Linear(width, width)

    def forward(self, x):
        return self.last(self.frozen(x)).float().pow(2).mean()


def test_weight_copies_under_mixed_precision_are_counted_once_not_per_sample():
    model = FrozenStack()

    def step(batch):
        x = torch.randn(batch, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        return lambda: model(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = saved_bytes(model, step(16))
        one = saved_bytes(model, step(1))
    weight_copies = 4 * 64 * 64 * 2  # the four weights in bfloat16
    assert expected - 16 * (one - weight_copies) == weight_copies  # the reference: copies once, the rest per sample
    estimate = estimate_training_memory(model, step(1), 16, mixed_precision="bf16")
    assert estimate.activations == expected
    # As accelerate does it: the model's forward runs under autocast, the rest of the probe forward does not.
    outside = []

    def probe():
        outside.append(torch.is_autocast_enabled("cpu"))
        return model(torch.randn(1, 64))

    estimate_training_memory(model, probe, 1, mixed_precision="bf16")
    assert outside == [False]
    assert estimate_training_memory(model, step(1), 16).activations < expected  # float32 saves the weights themselves


def test_the_probe_keeps_the_global_random_state():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    before = torch.get_rng_state()
    estimate_training_memory(model, lambda: model(torch.ones(2, 8)).sum(), 4)
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_arguments_are_refused_in_one_line():
    model = nn.Linear(4, 4)

    def forward():
        return model(torch.ones(1, 4)).sum()

    with pytest.raises(KinemaError, match="batch must be a whole number of at least 1, got 0"):
        estimate_training_memory(model, forward, 0)
    with pytest.raises(KinemaError, match="unknown mixed_precision 'fp8'; use one of no, fp16, bf16"):
        estimate_training_memory(model, forward, 1, mixed_precision="fp8")
    with pytest.raises(KinemaError, match="has no part that supports it; set gradient_checkpointing: false"):
        estimate_training_memory(model, forward, 1, gradient_checkpointing=True)
    with pytest.raises(KinemaError, match="no loss that requires gradients"):
        estimate_training_memory(model, lambda: forward().detach(), 1)
    model.requires_grad_(False)
    with pytest.raises(KinemaError, match="Linear has no trainable parameters"):
        estimate_training_memory(model, forward, 1)


# ------------------------------------------------------------------ the check


def parts(weights, gradients, optimizer, activations, **extra) -> MemoryEstimate:
    return MemoryEstimate(*(round(value * GIB) for value in (weights, gradients, optimizer, activations)), **extra)


def test_describe_gives_the_total_and_the_parts_in_gib():
    assert parts(1.2, 0.4, 0.8, 9.9).describe() == (
        "about 12.3 GiB: weights 1.2, gradients 0.4, optimizer 0.8, activations 9.9")
    assert parts(0.0063, 0.002, 0.004, 0.5).describe() == (
        "about 0.5 GiB: weights 0.0063, gradients 0.002, optimizer 0.004, activations 0.5")


def test_check_memory_refuses_what_does_not_fit_and_counts_loaded_weights_as_free(monkeypatch):
    monkeypatch.setattr(estimate_module, "available_memory", lambda device="cpu": round(10 * GIB))
    check_memory(parts(1.2, 0.4, 0.8, 7.5), "cpu", "a batch")  # 9.9 GiB fits in 10
    with pytest.raises(KinemaError) as err:
        check_memory(parts(1.2, 0.4, 0.8, 9.9), "cpu", "a batch of 4 x 16 frames at 256x256")
    assert str(err.value) == (
        "a batch of 4 x 16 frames at 256x256 needs about 12.3 GiB (weights 1.2, gradients 0.4, optimizer 0.8, "
        "activations 9.9) but this machine has 10.0 GiB free: lower batch_size, data.frames or data.size, or set "
        "gradient_checkpointing: true")
    # Weights already in memory are not free any more, but the step does not need them twice.
    loaded = parts(1.2, 0.4, 0.8, 9.9, loaded=round(2.5 * GIB), loaded_on="cpu")
    check_memory(loaded, "cpu", "a batch")
    monkeypatch.setattr(estimate_module, "available_memory", lambda device="cpu": 1000)
    with pytest.raises(KinemaError, match=r"has 2.5 GiB free \(counting the 2.5 GiB of weights already loaded\): "
                                          r"lower batch_size, data.frames or data.size$"):
        check_memory(parts(1.2, 0.4, 0.8, 9.9, loaded=round(2.5 * GIB), loaded_on="cpu",
                           gradient_checkpointing=True), "cpu", "a batch")


def test_available_memory_reads_meminfo_capped_by_the_cgroup(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       2000000 kB\nMemFree:          10000 kB\nMemAvailable:   1500000 kB\n")
    cgroups = tmp_path / "cgroup"
    (cgroups / "job").mkdir(parents=True)
    proc_cgroup = tmp_path / "self_cgroup"
    proc_cgroup.write_text("0::/job\n")
    monkeypatch.setattr(memory_module, "_MEMINFO", meminfo)
    monkeypatch.setattr(memory_module, "_CGROUP_ROOT", cgroups)
    monkeypatch.setattr(memory_module, "_PROC_CGROUP", proc_cgroup)
    assert available_memory("cpu") == 1500000 * 1024  # no cgroup files: the host's MemAvailable
    (cgroups / "job" / "memory.max").write_text("max\n")
    (cgroups / "job" / "memory.current").write_text("700000000\n")
    assert available_memory("cpu") == 1500000 * 1024  # no limit
    (cgroups / "job" / "memory.max").write_text("1000000000\n")
    (cgroups / "job" / "memory.stat").write_text("anon 500000000\ninactive_file 200000000\n")
    assert available_memory("cpu") == 1000000000 - (700000000 - 200000000)  # reclaimable cache counts as free
    # cgroup v1, under the memory controller's own folder
    proc_cgroup.write_text("4:memory:/job\n0::/\n")
    (cgroups / "job" / "memory.max").unlink()
    (cgroups / "memory" / "job").mkdir(parents=True)
    (cgroups / "memory" / "job" / "memory.limit_in_bytes").write_text("900000000\n")
    (cgroups / "memory" / "job" / "memory.usage_in_bytes").write_text("400000000\n")
    assert available_memory("cpu") == 500000000
    (cgroups / "memory" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert available_memory("cpu") == 1500000 * 1024
    with pytest.raises(KinemaError, match="cannot tell the free memory of device meta"):
        available_memory("meta")
