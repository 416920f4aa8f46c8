"""`VideoModelTests`: the checks every kinema video model (a `kinema.models.video_model.VideoModel`) must pass.

A test class inherits it and provides `make_model()` and `make_inputs(frames)`, and `fresh_inflation(frames)` where
the host has an image model; tests/models/test_video_models.py applies it to every host. The checks cover the
contract's methods and what a training or serving loop does with a model: save and load it, copy it for an EMA,
pickle it, checkpoint its activations, and call it from two threads at once.
"""

from __future__ import annotations

import copy
import pickle
import threading
from typing import Any

import pytest
import torch
from tiny_models import perturb

from kinema.errors import KinemaError
from kinema.models.video_model import VideoModel

FRAMES = 3


def motion_parameter_ids(model: VideoModel) -> set[int]:
    return {id(p) for _, module in model.motion_modules() for p in module.parameters()}


class VideoModelTests:
    """Mixin of contract tests; subclasses implement the three methods below."""

    def make_model(self) -> VideoModel:
        """A model in eval mode whose motion modules (and other zero-initialised parts) are not identities."""
        raise NotImplementedError

    def make_inputs(self, frames: int, batch: int = 2) -> dict[str, Any]:
        """Keyword arguments of one forward on `batch` clips of `frames` frames: `sample` `(B, C, F, H, W)`,
        `timestep` `(B,)`, `encoder_hidden_states` and any conditioning the host takes."""
        raise NotImplementedError

    def fresh_inflation(self, frames: int) -> tuple[VideoModel, dict[str, Any], torch.Tensor] | None:
        """A freshly inflated model, inputs for it, and its image model's output on those inputs frame by frame
        `(2, C_out, F, H, W)`; None for a host without an image model."""
        return None

    # ------------------------------------------------------------------ helpers

    @pytest.fixture
    def model(self) -> VideoModel:
        return self.make_model()

    @staticmethod
    def run(model: VideoModel, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs)

    # ------------------------------------------------------------------ outputs

    def test_output_keeps_the_video_shape(self, model):
        inputs = self.make_inputs(FRAMES)
        out = self.run(model, inputs)
        batch, _, frames, height, width = inputs["sample"].shape
        assert out.shape[0] == batch and out.shape[2:] == (frames, height, width)

    def test_two_calls_give_identical_outputs(self, model):
        inputs = self.make_inputs(FRAMES)
        assert torch.equal(self.run(model, inputs), self.run(model, inputs))

    def test_save_and_load_round_trip(self, model, tmp_path):
        model.save_pretrained(tmp_path / "model")
        reloaded = type(model).from_pretrained(tmp_path / "model").eval()
        inputs = self.make_inputs(FRAMES)
        assert torch.equal(self.run(reloaded, inputs), self.run(model, inputs))

    def test_fresh_inflation_is_the_image_model_frame_by_frame(self):
        inflation = self.fresh_inflation(FRAMES)
        if inflation is None:
            pytest.skip("this host has no image model to inflate")
        fresh, inputs, expected = inflation
        out = self.run(fresh, inputs)
        assert out.shape == expected.shape
        assert expected.abs().mean().item() > 1e-2  # the comparison is not between zeros
        # Same diffusers kernels on a batch of B*F frames instead of B: GEMM blocking moves the last bits only.
        assert (out - expected).abs().max().item() <= 1e-5

    def test_timestep_as_int_float_0d_or_per_clip_gives_one_output(self, model):
        inputs = self.make_inputs(FRAMES)
        batch = inputs["sample"].shape[0]
        outputs = [self.run(model, {**inputs, "timestep": timestep})
                   for timestep in (500, 500.0, torch.tensor(500), torch.full((batch,), 500))]
        assert all(torch.equal(out, outputs[0]) for out in outputs[1:])
        with pytest.raises(KinemaError, match="timesteps do not fit"):
            self.run(model, {**inputs, "timestep": torch.tensor([1, 2, 3])})

    def test_attention_chunking_changes_nothing(self, model):
        inputs = self.make_inputs(FRAMES)
        whole = self.run(model, inputs)
        model.set_attention_chunk_size(3)
        chunked = self.run(model, inputs)
        model.set_attention_chunk_size(None)
        # Attention over fewer sequences per call: the same sums, with batch-size-dependent GEMM blocking.
        assert (chunked - whole).abs().max().item() < 1e-5
        assert torch.equal(self.run(model, inputs), whole)
        with pytest.raises(KinemaError, match="chunk size"):
            model.set_attention_chunk_size(0)

    def test_gradient_checkpointing_gives_the_same_loss_and_gradients(self, model):
        model.train()
        inputs = self.make_inputs(FRAMES)

        def loss_and_gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            model.zero_grad()
            loss = model(**inputs).square().mean()
            loss.backward()
            return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        plain_loss, plain = loss_and_gradients()
        model.enable_gradient_checkpointing()
        checkpointed_loss, checkpointed = loss_and_gradients()
        assert torch.equal(checkpointed_loss, plain_loss)
        assert plain and checkpointed.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)

    # ------------------------------------------------------------------ the motion-module contract

    def test_freeze_base_leaves_only_motion_modules_trainable(self, model):
        assert list(model.motion_modules())
        model.freeze_base()
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable and trainable == motion_parameter_ids(model)

    def test_motion_state_dict_round_trip(self, model):
        inputs = self.make_inputs(FRAMES)
        expected = self.run(model, inputs)
        other = copy.deepcopy(model)
        for _, module in other.motion_modules():
            perturb(module, seed=11)
        assert not torch.equal(self.run(other, inputs), expected)
        other.load_motion_state_dict(model.motion_state_dict())
        assert other.motion_state_dict().keys() == model.motion_state_dict().keys()
        assert torch.equal(self.run(other, inputs), expected)

    def test_load_motion_state_dict_is_strict(self, model):
        state = model.motion_state_dict()
        first = next(iter(state))
        problems = {
            "1 missing": {k: v for k, v in state.items() if k != first},
            "1 unexpected": {**state, "extra.weight": torch.zeros(1)},
            "1 mismatched": {**state, first: torch.zeros(*state[first].shape, 2)},
        }
        for phrase, broken in problems.items():
            with pytest.raises(KinemaError, match=phrase) as err:
                model.load_motion_state_dict(broken)
            assert "\n" not in str(err.value)

    # ------------------------------------------------------------------ copies and threads

    def test_deepcopy_runs_its_own_motion_modules(self, model):
        inputs = self.make_inputs(FRAMES)
        before = self.run(model, inputs)
        twin = copy.deepcopy(model)
        assert torch.equal(self.run(twin, inputs), before)
        for _, module in twin.motion_modules():
            perturb(module, seed=13)
        # Hooks that still ran the original's modules would leave the copy's output where it was.
        assert (self.run(twin, inputs) - before).abs().max().item() > 1e-4
        assert torch.equal(self.run(model, inputs), before)

    def test_pickle_round_trip(self, model):
        inputs = self.make_inputs(FRAMES)
        again = pickle.loads(pickle.dumps(model))
        assert torch.equal(self.run(again, inputs), self.run(model, inputs))

    def test_two_threads_with_different_frame_counts(self, model):
        # One model, two threads at once, 8 and 16 frames: any per-call state kept on the model reshapes the other
        # thread's tensors (an error) or mixes its clips (a different result).
        inputs = {frames: self.make_inputs(frames, batch=1) for frames in (8, 16)}
        expected = {frames: self.run(model, inputs[frames]) for frames in inputs}
        start = threading.Barrier(len(inputs))
        results: dict[int, list[torch.Tensor]] = {frames: [] for frames in inputs}
        errors: list[BaseException] = []

        def call_repeatedly(frames: int) -> None:
            try:
                start.wait(timeout=60)
                for _ in range(3):
                    results[frames].append(self.run(model, inputs[frames]))
            except BaseException as err:  # reported by the main thread
                errors.append(err)

        threads = [threading.Thread(target=call_repeatedly, args=(frames,)) for frames in inputs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        for frames, outputs in results.items():
            assert len(outputs) == 3 and all(torch.equal(out, expected[frames]) for out in outputs), frames
