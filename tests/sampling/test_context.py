"""Context windows for long videos: window schedules, fusion weights, the windowed denoiser and FreeNoise noise."""

import itertools
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention import FreeNoiseTransformerBlock
from diffusers.pipelines.free_noise_utils import AnimateDiffFreeNoiseMixin
from tiny_models import perturb

from kinema.errors import KinemaError
from kinema.sampling.context import (
    ContextDenoiser,
    ContextOptions,
    context_windows,
    fuse_weights,
    fusion_weights,
    ordered_halving,
    window_weights,
)
from kinema.sampling.denoisers import Denoiser, UNetDenoiser
from kinema.sampling.guidance import guided_prediction
from kinema.sampling.loop import initial_noise, sample
from kinema.sampling.noise import freenoise_initial_noise, freenoise_noise
from kinema.sampling.schedulers import make_scheduler


@pytest.fixture
def moving_unet(video_unet):
    """The tiny video UNet with perturbed motion modules, so frames interact and windows change the result."""
    for _, module in video_unet.motion_modules():
        perturb(module, seed=4, scale=0.1)
    return video_unet


def text_states(batch=1, seed=3):
    return torch.randn(batch, 7, 32, generator=torch.Generator().manual_seed(seed))


class FrameModel(torch.nn.Module):
    """A stand-in video model, fast: records the inputs of each call and gives epsilon = latents * 2 + the mean of
    all its frames' latents + 10 * the text mean of each frame, so frames mix as in a motion module and each output
    frame depends on its (per-frame) text."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.calls.append({"latents": sample.detach().clone(), "text": encoder_hidden_states.detach().clone()})
        text = encoder_hidden_states
        per_frame = text.mean(dim=(-1, -2)) if text.ndim == 4 else text.mean(dim=(-1, -2))[:, None]
        return sample * self.scale + sample.mean(dim=2, keepdim=True) + 10 * per_frame[:, None, :, None, None]


# ---------------------------------------------------------------- windows


COMBINATIONS = [
    (frames, length, overlap, stride, closed_loop, schedule)
    for frames in (1, 3, 7, 8, 9, 12, 16, 17, 24, 31, 32, 48, 50)
    for length in (1, 2, 4, 8, 16)
    for overlap in sorted({0, 1, length // 2, length - 1})
    if overlap < length
    for stride in (1, 2, 3)
    for closed_loop in (False, True)
    for schedule in ("uniform", "static")
    if schedule == "uniform" or stride == 1
]


def test_windows_cover_every_frame_with_length_distinct_frames_at_every_step():
    steps = 9
    for frames, length, overlap, stride, closed_loop, schedule in COMBINATIONS:
        options = ContextOptions(length, overlap, stride, closed_loop, schedule)
        for step in range(steps):
            windows = context_windows(frames, options, step, steps)
            label = (frames, length, overlap, stride, closed_loop, schedule, step)
            assert {f for window in windows for f in window} == set(range(frames)), label
            assert len({tuple(w) for w in windows}) == len(windows), label
            for window in windows:
                assert len(window) == min(length, frames), label
                assert len(set(window)) == len(window) and all(0 <= f < frames for f in window), label
                if not closed_loop:  # nothing wraps from the last frame to the first
                    assert window == sorted(window), label
            # Every seam keeps its overlap: the frames either side of a window's start (but the video's first, or a
            # loop's) share a window of consecutive frames with `overlap` frames before it. The uniform schedule
            # left one seam with less, or none (frames 19 | 20 of 40 at step 1, windows of 16 by 4).
            plain = [window for window in windows
                     if all(b - a in (1, 1 - frames) for a, b in itertools.pairwise(window))]
            for window in plain:
                start = window[0]
                if start == 0 or frames <= length:
                    continue
                held = [(start - k) % frames for k in range(overlap + 1) if closed_loop or start - k >= 0]
                assert any(set(held) <= set(other) for other in plain), (label, window)


def test_short_video_is_one_window_of_all_frames():
    for schedule, closed_loop in itertools.product(("uniform", "static"), (False, True)):
        options = ContextOptions(16, 4, closed_loop=closed_loop, schedule=schedule)
        assert context_windows(16, options, 3, 5) == [list(range(16))]
        assert context_windows(5, options) == [list(range(5))]


def test_static_windows_equal_diffusers_freenoise_windows():
    # diffusers' FreeNoise blocks window the frames every context_stride = length - overlap frames and add a window
    # aligned to the end when the last one falls short: the static schedule without a loop.
    for frames, length, overlap in itertools.product((16, 17, 24, 25, 33, 40), (4, 8, 16), (0, 1, 2, 3, 7, 12)):
        if overlap >= length or frames < length:
            continue
        block = SimpleNamespace(context_length=length, context_stride=length - overlap)
        expected = FreeNoiseTransformerBlock._get_frame_indices(block, frames)
        if expected[-1][1] != frames:
            expected.append((frames - length, frames))
        windows = context_windows(frames, ContextOptions(length, overlap, schedule="static"))
        assert windows == [list(range(start, end)) for start, end in expected], (frames, length, overlap)


def test_ordered_halving_is_the_step_bits_reversed():
    assert [ordered_halving(step) for step in range(8)] == [0, 1 / 2, 1 / 4, 3 / 4, 1 / 8, 5 / 8, 3 / 8, 7 / 8]
    assert ordered_halving(2**63) == 1 / 2**64


def reference_loop_windows(frames, length, overlap, step):
    """Closed-loop uniform windows of one spacing, restated: start at round(frames * halving(step)), one every
    length - overlap frames once round the circle."""
    bits = f"{step:064b}"
    phase = int(bits[::-1], 2) / 2**64
    first = round(frames * phase)
    windows = []
    for start in range(first, first + frames, length - overlap):
        window = [(start + k) % frames for k in range(length)]
        if window not in windows:
            windows.append(window)
    return windows


@pytest.mark.parametrize("frames,length,overlap", [(24, 8, 2), (40, 16, 4), (13, 4, 1), (32, 16, 0)])
def test_closed_loop_uniform_windows_shift_with_the_step(frames, length, overlap):
    options = ContextOptions(length, overlap, closed_loop=True)
    for step in range(8):
        assert context_windows(frames, options, step, 8) == reference_loop_windows(frames, length, overlap, step)
    assert context_windows(frames, options, 1, 8)[0][0] == round(frames / 2)


def test_uniform_stride_adds_dilated_windows_that_fit():
    spacings = lambda windows: sorted({w[1] - w[0] for w in windows})  # noqa: E731
    options = ContextOptions(8, 2, stride=3)
    assert spacings(context_windows(16, options)) == [1, 2]  # 4 * 8 frames do not fit in 16
    assert spacings(context_windows(40, options)) == [1, 2, 4]
    assert spacings(context_windows(40, ContextOptions(8, 2, stride=1))) == [1]
    assert spacings(context_windows(15, options)) == [1]


def test_non_looping_uniform_windows_unwrap_to_both_ends():
    # At step 2 the windows start at round(24 / 4) = 6: [6, 22) and one from 18 that would wrap to frame 9; it is
    # replaced by the window ending at the last frame and the window starting at frame 0.
    windows = context_windows(24, ContextOptions(16, 4), step=2, steps=4)
    assert windows == [list(range(0, 16)), list(range(6, 22)), list(range(8, 24))]


# ---------------------------------------------------------------- fusion weights


def test_fuse_weights():
    assert torch.equal(fuse_weights(5, "flat"), torch.ones(5))
    for length in range(1, 12):
        expected = FreeNoiseTransformerBlock._get_frame_weights(None, length, "pyramid")
        assert fuse_weights(length, "pyramid").tolist() == expected
    assert fuse_weights(6, "overlap-linear", overlap=2).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3])
    assert torch.equal(fuse_weights(6, "overlap-linear", overlap=0), torch.ones(6))
    # A falling ramp and a rising ramp over the same frames (two windows overlapping by 3) sum to 1.
    ramps = fuse_weights(8, "overlap-linear", overlap=3)
    assert torch.allclose(ramps[-3:] + ramps[:3], torch.ones(3))


def test_overlap_linear_has_no_ramp_at_the_video_ends():
    options = ContextOptions(8, 3, schedule="static", fuse="overlap-linear")
    windows = context_windows(20, options)
    first, middle, last = windows[0], windows[1], windows[-1]
    assert window_weights(first, 20, options).tolist() == pytest.approx([1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    assert window_weights(middle, 20, options).tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25])
    assert window_weights(last, 20, options).tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])
    looped = ContextOptions(8, 3, schedule="static", fuse="overlap-linear", closed_loop=True)
    assert window_weights(first, 20, looped)[0].item() == pytest.approx(0.25)


@pytest.mark.parametrize("fuse", ["flat", "pyramid", "overlap-linear"])
def test_each_frames_window_shares_sum_to_one(fuse):
    for frames, length, overlap, stride, closed_loop, schedule in COMBINATIONS[::13]:
        options = ContextOptions(length, overlap, stride, closed_loop, schedule, fuse)
        for step in range(2):
            windows = context_windows(frames, options, step, 2)
            for window in windows:  # every frame a window holds has a weight, so no frame's sum of weights is 0
                assert (window_weights(window, frames, options) > 0).all()
            shares = fusion_weights(windows, frames, options)
            assert shares.shape == (len(windows), frames)
            torch.testing.assert_close(shares.sum(0), torch.ones(frames), rtol=0, atol=1e-6)
            for row, window in enumerate(windows):
                outside = sorted(set(range(frames)) - set(window))
                assert (shares[row, outside] == 0).all()


# ---------------------------------------------------------------- the context denoiser


def reference_fused_epsilon(denoiser, latents, timestep, cond, windows, weights_of):
    """Windowed fusion restated frame by frame: eps[f] = sum over windows of w * eps_window[f] / sum of w, with
    `weights_of(window)` the weight of each position of a window."""
    frames = latents.shape[2]
    numerator = [0.0] * frames
    denominator = [0.0] * frames
    for window in windows:
        eps = denoiser(torch.stack([latents[:, :, f] for f in window], dim=2), timestep, cond)
        for position, (frame, weight) in enumerate(zip(window, weights_of(window), strict=True)):
            numerator[frame] = numerator[frame] + weight * eps[:, :, position].double()
            denominator[frame] += weight
    return torch.stack([numerator[f] / denominator[f] for f in range(frames)], dim=2).float()


def test_one_window_over_all_frames_is_the_plain_denoiser(moving_unet):
    plain = UNetDenoiser(moving_unet)
    latents = initial_noise((1, 4, 8, 16, 16), seeds=[5])
    cond = plain.conditioning(text_states())
    for options in (ContextOptions(8, 2, fuse="pyramid"), ContextOptions(16, 4, closed_loop=True)):
        windowed = ContextDenoiser(plain, options, frames=8, steps=2)
        with torch.no_grad():
            assert torch.equal(windowed(latents, 999, cond), plain(latents, 999, cond))


def overlap_linear_6_2(frames):
    """Overlap-linear weights of a 6-frame window with overlap 2: ramps of 1/3, 2/3 except at the video's ends."""
    def weights_of(window):
        rising = [1, 1] if window[0] == 0 else [1 / 3, 2 / 3]
        falling = [1, 1] if window[-1] == frames - 1 else [2 / 3, 1 / 3]
        return [*rising, 1, 1, *falling]
    return weights_of


@pytest.mark.parametrize("options,step,weights_of", [
    (ContextOptions(8, 4, fuse="pyramid"), 1, lambda window: [1, 2, 3, 4, 4, 3, 2, 1]),
    (ContextOptions(8, 3, closed_loop=True, fuse="flat"), 2, lambda window: [1] * 8),
    (ContextOptions(6, 2, schedule="static", fuse="overlap-linear"), 0, overlap_linear_6_2(12)),
])
def test_context_denoiser_equals_windowed_fusion_restated(moving_unet, options, step, weights_of):
    # The fusion is the same whatever the model: the video UNet once, the fast stand-in for the other settings.
    plain = UNetDenoiser(moving_unet if options.fuse == "pyramid" else FrameModel())
    frames = 12
    latents = initial_noise((1, 4, frames, 16, 16), seeds=[7])
    cond = plain.conditioning(text_states())
    windowed = ContextDenoiser(plain, options, frames=frames, steps=3)
    timesteps = [999, 500, 1]
    for timestep in timesteps[:step]:  # the earlier steps' timesteps come first
        windowed.step_index(timestep)
    windows = context_windows(frames, options, step, 3)
    assert len(windows) > 1
    with torch.no_grad():
        expected = reference_fused_epsilon(plain, latents, timesteps[step], cond, windows, weights_of)
        got = windowed(latents, timesteps[step], cond)
        whole = plain(latents, timesteps[step], cond)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - whole).abs().max() > 1e-3  # the windows did change the result (the motion modules mix frames)


def frame_numbered_latents(batch, frames):
    """Latents whose every value is its frame's index, so a model's input tells which frames it got."""
    return torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1).expand(batch, 4, frames, 2, 2).clone()


def test_model_never_sees_more_than_a_window_and_per_frame_text_follows_its_frames():
    model = FrameModel()
    frames, options = 20, ContextOptions(6, 2, stride=2, closed_loop=True, fuse="pyramid")
    windowed = ContextDenoiser(UNetDenoiser(model), options, frames, steps=1, frame_axes={"encoder_hidden_states": 1})
    text = frame_numbered_latents(1, frames)[:, 0, :, :1, :1].expand(1, frames, 3, 5)  # (B, F, L, D): value = frame
    cond, uncond = {"encoder_hidden_states": text}, {"encoder_hidden_states": -text}
    latents = frame_numbered_latents(1, frames)
    guided_prediction(windowed, latents, 999, cond, uncond, guidance=3.0)
    windows = context_windows(frames, options)
    assert len(model.calls) == len(windows)
    for call, window in zip(model.calls, windows, strict=True):
        assert call["latents"].shape == (2, 4, 6, 2, 2)  # both guidance halves, one window of frames
        assert call["latents"][0, 0, :, 0, 0].tolist() == window
        assert call["text"].shape == (2, 6, 3, 5)
        assert call["text"][1, :, 0, 0].tolist() == window and call["text"][0, :, 0, 0].tolist() == [-f for f in window]


def test_inpaint_latents_are_per_frame_and_shared_keys_go_whole():
    seen = []

    class Recording(Denoiser):
        condition_names = ("encoder_hidden_states", "inpaint_latents")

        def predict(self, latents, timestep, cond):
            seen.append({key: value.shape for key, value in cond.items()})
            return latents

    frames = 10
    windowed = ContextDenoiser(Recording(FrameModel()), ContextOptions(4, 1, schedule="static"), frames, steps=1)
    cond = {"encoder_hidden_states": torch.zeros(1, 7, 32), "inpaint_latents": torch.zeros(1, 5, frames, 2, 2)}
    out = windowed(frame_numbered_latents(1, frames), 1, cond)
    assert torch.equal(out, frame_numbered_latents(1, frames))  # identity windows fuse to the identity
    assert seen and all(s == {"encoder_hidden_states": (1, 7, 32), "inpaint_latents": (1, 5, 4, 2, 2)} for s in seen)


def test_the_step_counts_distinct_timesteps_and_wraps_for_the_next_run():
    model = FrameModel()
    frames, options = 17, ContextOptions(8, 2)
    windowed = ContextDenoiser(UNetDenoiser(model), options, frames, steps=4)
    text = {"encoder_hidden_states": torch.zeros(1, 3, 5)}
    latents = frame_numbered_latents(1, frames)
    timesteps = [900, 900, 700, 500, 500, 300]  # a sampler may call twice at one timestep
    for timestep in timesteps + timesteps:  # a second run with the same denoiser
        model.calls.clear()
        windowed(latents, timestep, text)
        step = [900, 700, 500, 300].index(timestep)
        assert [c["latents"][0, 0, :, 0, 0].tolist() for c in model.calls] == context_windows(frames, options, step, 4)
    assert context_windows(frames, options, 0, 4) != context_windows(frames, options, 1, 4)


def test_sampling_with_context_windows_runs_end_to_end(moving_unet):
    plain = UNetDenoiser(moving_unet)
    frames, steps = 12, 2
    windowed = ContextDenoiser(plain, ContextOptions(8, 4, fuse="pyramid"), frames, steps)
    noise = initial_noise((1, 4, frames, 16, 16), seeds=[11])
    cond, uncond = plain.conditioning(text_states(seed=1)), plain.conditioning(text_states(seed=2))
    with torch.no_grad():
        out = sample(windowed, make_scheduler("ddim"), noise, cond, uncond, steps=steps, guidance=4.0, progress=False)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert (out - noise).abs().max() > 1e-2


class LimitedModel(FrameModel):
    max_frames = 16


@pytest.mark.parametrize("options,frames,message", [
    (ContextOptions(0, 0), 20, "context length must be at least 1 frame, got 0"),
    (ContextOptions(8, 8), 20, "context overlap must be at least 0 and below the context length 8, got 8"),
    (ContextOptions(8, -1), 20, "context overlap must be at least 0"),
    (ContextOptions(24, 4), 40, "context length 24 exceeds the motion modules' frame limit of 16 frames; use a "
                                "context length of at most 16"),
    (ContextOptions(8, 2, stride=0), 20, "context stride must be at least 1, got 0"),
    (ContextOptions(8, 2, schedule="looped"), 20, "unknown context schedule 'looped'; known schedules: uniform, "
                                                  "static"),
    (ContextOptions(8, 2, fuse="gauss"), 20, "unknown context fuse method 'gauss'; known methods: flat, pyramid, "
                                             "overlap-linear"),
    (ContextOptions(8, 2, stride=2, schedule="static"), 20, "context stride 2 applies to the uniform schedule only"),
    (ContextOptions(8, 2), 0, "context windows need a video of at least 1 frame, got 0"),
])
def test_bad_options_are_one_line_errors_before_any_model_runs(options, frames, message):
    model = LimitedModel()
    with pytest.raises(KinemaError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as error:
        ContextDenoiser(UNetDenoiser(model), options, frames, steps=2)
    assert "\n" not in str(error.value) and not model.calls


def test_bad_inputs_to_the_context_denoiser():
    model = FrameModel()
    windowed = ContextDenoiser(UNetDenoiser(model), ContextOptions(4, 1), 10, steps=2,
                               frame_axes={"encoder_hidden_states": 1})
    with pytest.raises(KinemaError, match=r"set up for latents \(B, C, F=10, H, W\); got \(1, 4, 9, 2, 2\)"):
        windowed(frame_numbered_latents(1, 9), 1, {"encoder_hidden_states": torch.zeros(1, 10, 3, 5)})
    with pytest.raises(KinemaError, match=r"conditioning encoder_hidden_states \(1, 7, 32\) should hold 10 frames "
                                          r"along axis 1"):
        windowed(frame_numbered_latents(1, 10), 1, {"encoder_hidden_states": torch.zeros(1, 7, 32)})
    with pytest.raises(KinemaError, match="takes no conditioning mask"):
        windowed(frame_numbered_latents(1, 10), 1, {"encoder_hidden_states": torch.zeros(1, 10, 3, 5),
                                                    "mask": torch.zeros(1)})
    with pytest.raises(KinemaError, match="step 3 is not one of the 3 sampling steps"):
        context_windows(20, ContextOptions(4, 1), step=3, steps=3)
    with pytest.raises(KinemaError, match="unknown context fuse method 'box'"):
        fuse_weights(4, "box")
    assert not model.calls


# ---------------------------------------------------------------- FreeNoise


def diffusers_freenoise(shape, seed, length, overlap):
    """diffusers' AnimateDiff FreeNoise "shuffle_context" latents for one video, from a generator seeded `seed`."""
    pipe = SimpleNamespace(_free_noise_context_length=length, _free_noise_context_stride=length - overlap,
                           _free_noise_noise_type="shuffle_context", vae_scale_factor=8)
    batch, channels, frames, height, width = shape
    return AnimateDiffFreeNoiseMixin._prepare_latents_free_noise(
        pipe, batch, channels, frames, height * 8, width * 8, torch.float32, torch.device("cpu"),
        generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("frames,length,overlap", [(24, 8, 4), (21, 8, 2), (16, 16, 12), (30, 6, 0), (9, 4, 3)])
def test_freenoise_equals_diffusers_shuffle_context(frames, length, overlap):
    shape = (1, 4, frames, 3, 2)
    expected = diffusers_freenoise(shape, seed=21, length=length, overlap=overlap)
    got = freenoise_initial_noise(shape, [21], length, overlap)
    assert torch.equal(got, expected)
    assert torch.equal(got, initial_noise(shape, [21])) == (frames <= length)  # one window: nothing to reschedule


def test_freenoise_blocks_are_shuffled_copies_of_the_block_a_window_earlier():
    frames, length, overlap = 23, 8, 3
    noise = torch.randn(2, 2, frames, 2, 2, generator=torch.Generator().manual_seed(0))
    out = freenoise_noise(noise, length, overlap, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(out[:, :, :length], noise[:, :, :length])
    shift = length - overlap
    for video in range(2):
        frame_values = [tuple(out[video, :, f].flatten().tolist()) for f in range(frames)]
        for start in range(length, frames, shift):
            block = frame_values[start:start + shift]
            source = frame_values[start - length:start - length + shift]
            assert set(block) <= set(source) and len(set(block)) == len(block), (video, start)
    assert not torch.equal(out[0, :, length:], out[1, :, length:])  # each video shuffles with its own generator


def test_freenoise_is_per_seed_whatever_the_batch():
    shape = (3, 4, 20, 2, 2)
    batch = freenoise_initial_noise(shape, [5, 6, 5], length=8, overlap=2)
    alone = freenoise_initial_noise((1, 4, 20, 2, 2), [6], length=8, overlap=2)
    assert torch.equal(batch[1:2], alone) and torch.equal(batch[0], batch[2])
    assert not torch.equal(batch[0], batch[1])
    short = initial_noise((1, 4, 8, 2, 2), [6])
    assert torch.equal(freenoise_initial_noise((1, 4, 8, 2, 2), [6], length=8, overlap=2), short)
    half = freenoise_initial_noise((1, 4, 20, 2, 2), [6], length=8, overlap=2, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, alone.half())


def test_freenoise_bad_inputs():
    with pytest.raises(KinemaError, match="an overlap from 0 to length - 1; got length 8, overlap 8"):
        freenoise_initial_noise((1, 4, 20, 2, 2), [1], length=8, overlap=8)
    with pytest.raises(KinemaError, match="2 seed\\(s\\) for a batch of 1 video\\(s\\)"):
        freenoise_initial_noise((1, 4, 20, 2, 2), [1, 2], length=8, overlap=2)
    with pytest.raises(KinemaError, match="1 generator\\(s\\) for a batch of 2 video\\(s\\)"):
        freenoise_noise(torch.zeros(2, 4, 20, 2, 2), 8, 2, [torch.Generator()])
    with pytest.raises(KinemaError, match="FreeNoise takes noise \\(B, C, F, H, W\\)"):
        freenoise_noise(torch.zeros(4, 20, 2, 2), 8, 2, [torch.Generator()])
