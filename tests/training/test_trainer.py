"""The trainer end to end on tiny models: what each mode changes (and leaves bit-identical), that the loss falls,
exact resume, the exports loading back, and the refusals before step 1."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from kinema.errors import KinemaError
from kinema.training.config import config_from_dict
from kinema.training.tasks import make_task
from kinema.training.trainer import train

SD_DATA = {"frames": 4, "size": [16, 16], "text_dropout": 0.0}
V3_DATA = {"frames": 8, "size": [32, 32], "text_dropout": 0.0}


def make_config(tmp_path: Path, model: dict, data_root: Path, mode: str, data: dict, **sections) -> object:
    values = {"mode": mode, "output": str(tmp_path / "run"), "seed": 0, "model": model,
              "data": {"root": str(data_root), **data},
              "train": {"steps": 4, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0},
              "checkpoint": {"every": 2, "keep": 2}, "log": {"every": 1, "tensorboard": False}}
    for name, section in sections.items():
        values[name] = {**values.get(name, {}), **section}
    return config_from_dict(values)


def fixed_loss(task, batch, draws: int = 6) -> float:
    """The loss of `batch` averaged over fixed noise draws: comparable before and after training."""
    with torch.no_grad():
        losses = [float(task.module(**task.inputs(batch, torch.Generator().manual_seed(i)))) for i in range(draws)]
    return sum(losses) / draws


def first_batch(config) -> dict:
    from kinema.data.dataset import TrainBatches
    from kinema.training.trainer import _batch_order, _dataset

    dataset = _dataset(config)
    return TrainBatches(dataset, _batch_order(config, dataset, 1), rank=0, start=0)[0]


def sd_model_section(sd_model) -> dict:
    return {"path": str(sd_model["path"]), "motion_module": str(sd_model["motion_module"])}


# ---------------------------------------------------------------- what each mode trains


@pytest.mark.parametrize("mode", ["lora", "motion"])
def test_a_kinema_folder_trains_on_its_own_motion_modules(tmp_path, synth_videos, mode):
    """kinema-tiny-ad carries its motion modules (motion_module.safetensors), which generate loads: training loads
    them too. Fresh ones output zero, so a motion LoRA on them once got no gradient and trained nothing."""
    from safetensors.torch import load_file

    from kinema.bundled import resolve_model

    folder = resolve_model("kinema-tiny-ad")
    config = make_config(tmp_path, {"path": str(folder)}, synth_videos, mode, {**SD_DATA, "size": [32, 32]})
    loaded = make_task(config).model.motion_state_dict()
    shipped = load_file(folder / "motion_module.safetensors")
    common = [key for key in loaded if key in shipped]
    assert len(common) > 100 and all(torch.equal(loaded[k].float(), shipped[k].float()) for k in common)
    assert any(shipped[k].abs().sum() > 0 for k in common if ".proj_out." in k)  # trained, not zero-output


def test_motion_mode_changes_motion_modules_only_and_the_loss_halves(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                         train={"steps": 50, "learning_rate": 3e-3, "max_grad_norm": None})
    before_task = make_task(config)
    batch = first_batch(config)
    before_loss = fixed_loss(before_task, batch)
    before = {k: v.clone() for k, v in before_task.model.state_dict().items()}
    result = train(config, progress=False)
    after = result.task.model.state_dict()
    motion = tuple(f"unet.{name}." for name, _ in result.task.model.motion_modules())
    base_keys = [k for k in before if not k.startswith(motion)]
    assert len(base_keys) > 100 and all(torch.equal(before[k], after[k]) for k in base_keys)
    changed = [k for k in before if k.startswith(motion) and not torch.equal(before[k], after[k])]
    assert changed, "no motion weight changed"
    after_loss = fixed_loss(result.task, batch)
    assert after_loss <= 0.5 * before_loss, (before_loss, after_loss)
    # The export is an original-layout motion module that kinema loads back to the trained weights.
    import kinema.loaders

    exported = result.final / "motion_module.safetensors"
    assert kinema.loaders.describe(exported)["kind"] == "motion_module"
    reloaded = make_task(make_config(tmp_path / "b", {"path": str(sd_model["path"]), "motion_module": str(exported)},
                                     synth_videos, "motion", SD_DATA)).model.motion_state_dict()
    trained = result.task.model.motion_state_dict()
    assert reloaded.keys() == trained.keys() and all(torch.equal(reloaded[k], trained[k]) for k in trained)


def test_lora_mode_changes_lora_weights_only(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "lora", SD_DATA,
                         train={"steps": 3}, lora={"rank": 2, "alpha": 2.0})
    before = {k: v.clone() for k, v in make_task(config).model.state_dict().items()}
    result = train(config, progress=False)
    after = result.task.model.state_dict()
    assert before.keys() == after.keys()
    lora_keys = [k for k in after if ".lora_" in k]
    base_keys = [k for k in after if ".lora_" not in k]
    assert lora_keys and len(base_keys) > 100
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    assert all(not torch.equal(before[k], after[k]) for k in lora_keys if ".lora_B." in k)
    assert sorted(p.name for p in result.final.iterdir()) == ["config.yaml", "export.json", "kinema-output.json",
                                                              "lora.safetensors", "motion_lora.safetensors"]


def test_lora_mode_memorises_a_clip_the_loss_halves(tmp_path, sd_model, one_clip):
    """LoRA has far less capacity than the motion modules (attention projections only), so it memorises one clip."""
    config = make_config(tmp_path, sd_model_section(sd_model), one_clip, "lora", SD_DATA,
                         train={"steps": 80, "batch_size": 1, "learning_rate": 1e-2, "max_grad_norm": None},
                         lora={"rank": 16, "alpha": 16.0, "targets": "all"}, checkpoint={"every": 80})
    batch = first_batch(config)
    before_loss = fixed_loss(make_task(config), batch)
    result = train(config, progress=False)
    after_loss = fixed_loss(result.task, batch)
    assert after_loss <= 0.5 * before_loss, (before_loss, after_loss)


def test_full_mode_on_v3_trains_and_the_loss_halves(tmp_path, v3_model, synth_videos):
    config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, "full", V3_DATA,
                         train={"steps": 30, "learning_rate": 2e-3, "batch_size": 2})
    task = make_task(config)
    frozen = ("caption_projection", "adaln_single", "clip_projection")
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    batch = first_batch(config)
    before_loss = fixed_loss(task, batch)
    result = train(config, progress=False)
    after = result.task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(frozen))
    assert not torch.equal(before["proj_out.weight"], after["proj_out.weight"])
    after_loss = fixed_loss(result.task, batch)
    assert after_loss <= 0.5 * before_loss, (before_loss, after_loss)
    from kinema.pipelines.load import load_family

    reloaded = load_family(result.final / "model").model.state_dict()
    assert all(torch.equal(reloaded[k], after[k]) for k in after)


def test_motion_mode_on_v3_trains_its_hybrid_motion_modules_alone(tmp_path, v3_model, synth_videos):
    # Its temporal GroupNorms read the frozen blocks' tokens, whose strides crashed torch's backward (a segfault).
    config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, "motion", V3_DATA,
                         train={"steps": 2, "learning_rate": 1e-3})
    task = make_task(config)
    motion = tuple(f"{name}." for name, _ in task.model.motion_modules())
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    after = train(config, progress=False).task.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(motion) for k in changed), sorted(changed)[:5]
    assert any(".norm.weight" in k for k in changed)  # the GroupNorm's weights learn from the frozen tokens


@pytest.mark.parametrize(("mode", "data", "sections", "said"), [
    ("full", {"image_frames": 3, "image_ratio": 0.5}, {},
     "data.image_frames is 3, which this model cannot take: EasyAnimate V3 makes 1 or a multiple of 8 frames"),
    ("full", {}, {"validation": {"every": 500, "prompts": ["a red circle"], "frames": 5}},
     "validation.frames is 5, which this model cannot take: EasyAnimate V3 makes 1 or a multiple of 8 frames"),
    ("vae", {"frames": 4}, {}, "data.frames is 4, which this model cannot take: F must be 1 or a multiple of 8"),
    ("full", {"image_frames": 264, "image_ratio": 0.5}, {},
     "data.image_frames is 264, which this model cannot take: "),
    ("full", {"buckets": [[32, 32, 8], [32, 48, 5]]}, {},
     "data.buckets[1]'s frame count is 5, which this model cannot take: EasyAnimate V3 makes 1 or a multiple of 8"),
])
def test_a_frame_count_the_model_cannot_take_is_refused_before_step_1(tmp_path, v3_model, synth_videos, mode, data,
                                                                       sections, said, monkeypatch):
    # These once failed at the first image batch or the first validation, steps (or a whole run) in.
    monkeypatch.setattr("kinema.training.trainer._check_memory",
                        lambda *a, **k: pytest.fail("reached the memory check, past the frame counts"))
    config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, mode, {**V3_DATA, **data}, **sections)
    with pytest.raises(KinemaError, match=f"^{re.escape(said)}"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- resume


def _final_state(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.task.trainable_state().items()}


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, sd_model, synth_videos):
    common = dict(train={"steps": 4, "ema_decay": 0.9, "gradient_accumulation": 2,
                         "lr_schedule": "constant_with_warmup", "warmup_steps": 3})
    data = {**SD_DATA, "text_dropout": 0.5, "flip": True}
    whole = train(make_config(tmp_path / "whole", sd_model_section(sd_model), synth_videos, "motion", data,
                              **common), progress=False)
    short = make_config(tmp_path / "parts", sd_model_section(sd_model), synth_videos, "motion", data,
                        train={**common["train"], "steps": 2})
    train(short, progress=False)
    resumed_config = make_config(tmp_path / "parts", sd_model_section(sd_model), synth_videos, "motion", data,
                                 **common)
    resumed = train(resumed_config, resume="latest", progress=False)
    assert resumed.start_step == 2 and resumed.end_step == 4
    expected, got = _final_state(whole), _final_state(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert whole.losses[2:] == resumed.losses
    # The EMA and the log rows match too.
    ema_whole = (whole.run_folder / "final" / "motion_module.safetensors").read_bytes()
    ema_resumed = (resumed.run_folder / "final" / "motion_module.safetensors").read_bytes()
    assert ema_whole == ema_resumed
    rows = (resumed.run_folder / "logs.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["step", "1", "2", "3", "4"]


def test_a_resume_on_a_replaced_model_or_dataset_is_refused_before_loading(tmp_path, sd_model, synth_videos,
                                                                           monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_videos, data)
    config = make_config(tmp_path, sd_model_section(sd_model), data, "motion", SD_DATA, train={"steps": 2})
    train(config, progress=False)
    resumed = make_config(tmp_path, sd_model_section(sd_model), data, "motion", SD_DATA, train={"steps": 4})
    # What is not the data changes nothing: files the metadata does not list, the metadata file's layout.
    (data / "README.md").write_text("clips for the next run are staged here")
    shutil.copy(next(data.rglob("*.mp4")), data / "staged.mp4")
    metadata = data / "metadata.json"
    entries = json.loads(metadata.read_text())
    metadata.write_text(json.dumps(entries, indent=4))
    assert train(resumed, resume="latest", progress=False).end_step == 4
    resumed = make_config(tmp_path, sd_model_section(sd_model), data, "motion", SD_DATA, train={"steps": 6})
    clip = data / entries[0]["file_path"]
    clip.write_bytes(clip.read_bytes() + b"\0")  # a dataset made again: its clips differ
    monkeypatch.setattr("kinema.training.tasks.make_task", lambda *a: pytest.fail("loaded"))
    refusal = r"cannot resume .*: data.root's metadata and the files it lists changed since the run started"
    with pytest.raises(KinemaError, match=refusal):
        train(resumed, resume="latest", progress=False)
    clip.write_bytes(clip.read_bytes()[:-1])
    metadata.write_text(json.dumps([{**entries[0], "text": "a blue square"}, *entries[1:]]))  # a caption changed
    with pytest.raises(KinemaError, match=refusal):
        train(resumed, resume="latest", progress=False)


def test_resuming_from_a_checkpoint_is_refused_before_loading_where_it_would_fail_later(tmp_path, sd_model,
                                                                                         synth_videos, monkeypatch):
    import dataclasses

    def config(folder, **sections):
        return make_config(folder, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                           train={"steps": 4}, **sections)

    train(config(tmp_path / "one"), progress=False)  # checkpoints at steps 2 and 4
    train(config(tmp_path / "two"), progress=False)
    (tmp_path / "one" / "run" / "checkpoints" / "step-00000004" / "notes.txt").write_text("mine")
    monkeypatch.setattr("kinema.training.tasks.make_task", lambda *a: pytest.fail("loaded"))
    # Resumed at step 2, the run would save over step 4's checkpoint: its foreign file stopped it after retraining.
    with pytest.raises(KinemaError, match=r"step-00000004 is an earlier kinema output but now also holds files "
                                          r"kinema did not write .*\(notes.txt\)"):
        train(config(tmp_path / "one"), resume=str(tmp_path / "one" / "run" / "checkpoints" / "step-00000002"),
              progress=False)
    other = tmp_path / "two" / "run" / "checkpoints" / "step-00000002"
    with pytest.raises(KinemaError, match=f"it is a checkpoint of another run \\({re.escape(str(tmp_path / 'two'))}"
                                          r"/run\), not of the run in "):
        train(config(tmp_path / "one"), resume=str(other), progress=False)
    # A motion run on stills alone would learn nothing.
    with pytest.raises(KinemaError, match=r"mode motion learns how frames follow each other, and data.image_ratio is "
                                          r"1, so it would see stills alone, .*; lower data.image_ratio$"):
        train(make_config(tmp_path / "stills", sd_model_section(sd_model), synth_videos, "motion",
                          {**SD_DATA, "image_ratio": 1.0}), progress=False)
    # A run folder inside the data it reads (or the model) is refused: it would change what it reads.
    inside = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA)
    with pytest.raises(KinemaError, match=r"the run folder .*/run is inside data.root \(.*\), which the run reads"):
        train(dataclasses.replace(inside, output=str(synth_videos / "run")), progress=False)
    assert not (synth_videos / "run").exists()


def test_the_time_limit_ends_the_run_exported_and_a_resume_loses_nothing(tmp_path, sd_model, synth_videos,
                                                                          monkeypatch, capsys):
    from kinema.training import trainer

    common = dict(train={"steps": 6, "ema_decay": 0.9}, checkpoint={"every": 4, "keep": 2})
    whole = train(make_config(tmp_path / "whole", sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                              **common), progress=False)
    three = train(make_config(tmp_path / "three", sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                              train={**common["train"], "steps": 3}, checkpoint=common["checkpoint"]), progress=False)
    ticks = iter(range(1000))  # one second a reading: the deadline is read once at the start, then after each step
    monkeypatch.setattr(trainer, "_clock", lambda: float(next(ticks)))
    config = make_config(tmp_path / "limited", sd_model_section(sd_model), synth_videos, "motion", SD_DATA, **common)
    limited = train(config, progress=False, time_limit=2.5)
    assert (limited.start_step, limited.end_step, limited.time_limited) == (0, 3, True)
    exported = (limited.final / "motion_module.safetensors").read_bytes()
    assert exported == (three.final / "motion_module.safetensors").read_bytes()  # the EMA weights after step 3
    assert json.loads((limited.final / "export.json").read_text()) == {"step": 3, "steps": 6, "ema": True}
    monkeypatch.setattr(trainer, "_clock", time.monotonic)

    # Stopped (a signal) after step 4 of a resume: final/ is not rewritten, and the stop says which step it holds.
    asked = []
    monkeypatch.setattr(trainer, "stop_requested", lambda: asked.append(True) or True)
    monkeypatch.setattr(trainer, "stop_if_requested", lambda: (_ for _ in ()).throw(KeyboardInterrupt) if asked
                        else None)
    with pytest.raises(KeyboardInterrupt):
        train(config, resume="latest", progress=False)
    assert capsys.readouterr().err.splitlines()[-1] == (
        "kinema train: stopped after step 4; `--resume latest` continues from its checkpoint; final/ still holds the "
        "weights of step 3, exported before")
    assert (limited.final / "motion_module.safetensors").read_bytes() == exported
    monkeypatch.undo()
    resumed = train(config, resume="latest", progress=False, time_limit=3600)
    assert (resumed.start_step, resumed.end_step, resumed.time_limited) == (4, 6, False)
    assert (resumed.final / "motion_module.safetensors").read_bytes() == (
        whole.final / "motion_module.safetensors").read_bytes()
    assert json.loads((resumed.final / "export.json").read_text())["step"] == 6
    with pytest.raises(KinemaError, match="positive number of seconds"):
        train(config, progress=False, time_limit=float("nan"))


def test_resume_refuses_another_config_and_a_new_run_refuses_an_existing_one(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA, train={"steps": 2})
    train(config, progress=False)
    with pytest.raises(KinemaError, match="--resume latest"):
        train(config, progress=False)
    other = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                        train={"steps": 2, "learning_rate": 5e-3})
    with pytest.raises(KinemaError, match="learning_rate"):
        train(other, resume="latest", progress=False)
    # Under a decaying schedule train.steps is part of the run's identity: the refusal names the schedule alone.
    cosine = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                         train={"steps": 2, "lr_schedule": "cosine"})
    refusal = r"differs from the run's: train.lr_schedule: \S+ -> \"cosine\"; resume"
    with pytest.raises(KinemaError, match=refusal) as caught:
        train(cosine, resume="latest", progress=False)
    assert "train.steps" not in str(caught.value)


def test_a_users_file_in_final_or_a_cache_in_the_run_folder_is_refused_before_step_1(tmp_path, sd_model,
                                                                                        synth_videos, monkeypatch):
    from kinema.training import tasks as tasks_module

    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA, train={"steps": 2})
    result = train(config, progress=False)
    (result.final / "README.txt").write_text("my notes on this run")
    longer = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA, train={"steps": 4})
    monkeypatch.setattr(tasks_module, "make_task", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(KinemaError, match=r"final .*README.txt.*kinema never deletes them"):
        train(longer, resume="latest", progress=False)
    assert (result.final / "README.txt").read_text() == "my notes on this run"
    for cache in (tmp_path / "fresh" / "run", tmp_path / "fresh" / "run" / "cache"):
        inside = make_config(tmp_path / "fresh", sd_model_section(sd_model), synth_videos, "motion",
                             {**SD_DATA, "cache": str(cache)})
        with pytest.raises(KinemaError, match=r"data.cache \(.*\) is inside the run folder"):
            train(inside, progress=False)
    assert not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------- refusals before step 1


def test_bad_inputs_fail_before_any_step(tmp_path, sd_model, synth_videos, v3_model, monkeypatch):
    from kinema.training import tasks as tasks_module

    metadata = json.loads((synth_videos / "metadata.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text(json.dumps(metadata + [{"file_path": "gone.mp4", "text": "x",
                                                                  "type": "video"}] * 3))
    for entry in metadata:
        target = broken / entry["file_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(synth_videos / entry["file_path"])
    config = make_config(tmp_path, sd_model_section(sd_model), broken, "motion", SD_DATA)
    with pytest.raises(KinemaError, match="3 of 9"):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    (uncaptioned / "metadata.json").write_text(json.dumps([{k: v for k, v in e.items() if k != "text"} if i == 1
                                                           else e for i, e in enumerate(metadata)]))
    for entry in metadata:
        target = uncaptioned / entry["file_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(synth_videos / entry["file_path"])
    with pytest.raises(KinemaError, match="captions missing: 1 entries have no text"):
        train(make_config(tmp_path, sd_model_section(sd_model), uncaptioned, "motion", SD_DATA), progress=False)
    # Every clip shorter than data.frames (8-frame clips, 16 asked): refused before the model loads.
    monkeypatch.setattr(tasks_module, "make_task", lambda config: pytest.fail("the model loaded"))
    with pytest.raises(KinemaError, match=r"none of the video entries for .* could be read \(see the warnings "
                                          r"above\); fix those files, or lower data.frames / data.stride"):
        train(make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", {**SD_DATA, "frames": 16}),
              progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "run").exists()
    with pytest.raises(KinemaError, match="'blocks'.*its parts are"):
        train(make_config(tmp_path, {"path": str(v3_model)}, synth_videos, "full", V3_DATA,
                          train={"trainable_modules": ["blocks"]}), progress=False)
    with pytest.raises(KinemaError, match="mode full does not apply"):
        train(make_config(tmp_path, sd_model_section(sd_model), synth_videos, "full", SD_DATA), progress=False)
    # Unset train.timesteps is the family's recipe: uniform for AnimateDiff, which a logit-normal mean cannot shape.
    with pytest.raises(KinemaError, match="is an AnimateDiff-family model, whose recipe draws timesteps uniformly; "
                                          "add train.timesteps: logit_normal"):
        train(make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                          train={"logit_mean": -0.5}), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_batch_too_big_for_the_memory_is_refused_with_the_estimate(tmp_path, sd_model, synth_videos, monkeypatch):
    import kinema.training.estimate as estimate

    monkeypatch.setattr(estimate, "available_memory", lambda device="cpu": 1 << 20)
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA)
    with pytest.raises(KinemaError, match=r"needs about .*GiB.*batch_size"):
        train(config, progress=False)


def test_the_memory_probe_is_a_clip_of_the_largest_shape_whichever_batch_comes_first(tmp_path, sd_model,
                                                                                      synth_videos, monkeypatch):
    # The first batch alone was probed: a run whose seed drew an image batch first was judged on 1-frame clips.
    from kinema.data.dataset import TrainBatches
    from kinema.training import trainer as trainer_module
    from kinema.training.trainer import _batch_order, _dataset

    probed, first = [], []
    plain = trainer_module._probe_batch
    monkeypatch.setattr(trainer_module, "_probe_batch", lambda *a, **k: probed.append(plain(*a, **k)) or probed[-1])
    for seed in range(4):
        config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA)
        config = config_from_dict({**config.to_dict(), "seed": seed, "data": {**config.to_dict()["data"],
                                                                             "image_ratio": 0.5}})
        dataset = _dataset(config)
        first.append(TrainBatches(dataset, _batch_order(config, dataset, 1), rank=0, start=0)[0]["pixels"]
                     .shape[1])
        train(config, dry_run=True, progress=False)
    assert 1 in first and 4 in first  # some seeds start on images, some on videos
    assert {tuple(batch["pixels"].shape[1:]) for batch in probed} == {(4, 3, 16, 16)}
    probed.clear()  # a run of images alone is judged on them, not on the videos it never reads
    config = config_from_dict({**config.to_dict(), "mode": "lora",
                               "data": {**config.to_dict()["data"], "image_ratio": 1.0}})
    train(config, dry_run=True, progress=False)
    assert {tuple(batch["pixels"].shape[1:]) for batch in probed} == {(1, 3, 16, 16)}


def test_dry_run_reports_and_writes_nothing(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA)
    result = train(config, dry_run=True, progress=False)
    report = result.report
    motion = sum(v.numel() for v in result.task.model.motion_state_dict().values())
    assert report["trainable_parameters"] == motion
    assert report["data"]["clips"] == 6 and report["seconds_per_step"] > 0 and "GiB" in report["memory_estimate"]
    assert not (tmp_path / "run").exists()
    assert all(p.grad is None for p in result.task.model.parameters())


# ---------------------------------------------------------------- image and vae modes, validation


def test_motion_mode_with_trainable_modules_trains_those_too_and_exports_both(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                         train={"steps": 2, "trainable_modules": ["attn2."]})
    before = {k: v.clone() for k, v in make_task(config).model.state_dict().items()}
    result = train(config, progress=False)
    model = result.task.model
    after = model.state_dict()
    motion = tuple(f"unet.{name}." for name, _ in model.motion_modules())
    cross = [k for k in after if ".attn2." in k and not k.startswith(motion)]
    others = [k for k in after if ".attn2." not in k and not k.startswith(motion)]
    assert len(cross) > 4 and len(others) > 100
    assert all(not torch.equal(before[k], after[k]) for k in cross if k.endswith(".weight"))
    assert all(torch.equal(before[k], after[k]) for k in others)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(motion))
    # The export: the motion module and the UNet whose cross-attention trained, which load back as the trained model.
    assert (result.final / "motion_module.safetensors").is_file() and (result.final / "model" / "unet").is_dir()
    from kinema.pipelines.load import load_family

    loaded = load_family(result.final / "model", motion_module=result.final / "motion_module.safetensors")
    reloaded = loaded.model.state_dict()
    assert reloaded.keys() == after.keys() and all(torch.equal(reloaded[k], after[k]) for k in after)
    with pytest.raises(KinemaError, match="no parameter of the base model has 'atn2.'"):
        make_task(make_config(tmp_path / "b", sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                              train={"trainable_modules": ["atn2."]}))


def test_image_mode_trains_the_image_unet_and_exports_an_sd_folder(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, {"path": str(sd_model["path"])}, synth_videos, "image",
                         {**SD_DATA, "frames": 1}, train={"steps": 2})
    before = {k: v.clone() for k, v in make_task(config).model.state_dict().items()}
    result = train(config, progress=False)
    model = result.task.model
    after = model.state_dict()
    motion = tuple(f"unet.{name}." for name, _ in model.motion_modules())
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(motion))
    assert any(not torch.equal(before[k], after[k]) for k in after if not k.startswith(motion))
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(result.final / "model" / "unet").state_dict()
    trained = {k.removeprefix("unet."): v for k, v in after.items() if not k.startswith(motion)}
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    # AnimateDiff's recipe goes on from here: the exported folder is the base of the motion stage.
    from kinema.pipelines.load import load_family

    staged = load_family(result.final / "model", motion_module=sd_model["motion_module"]).model.unet.state_dict()
    assert all(torch.equal(staged[k], trained[k]) for k in trained)
    with pytest.raises(KinemaError, match="remove model.motion_module"):
        make_task(make_config(tmp_path, sd_model_section(sd_model), synth_videos, "image", SD_DATA))


def test_vae_mode_trains_the_slice_vae_only(tmp_path, v3_model, synth_videos):
    config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, "vae", V3_DATA,
                         train={"steps": 12, "learning_rate": 2e-3})
    task = make_task(config)
    batch = first_batch(config)
    before_loss = fixed_loss(task, batch)
    result = train(config, progress=False)
    assert fixed_loss(result.task, batch) < 0.8 * before_loss
    from kinema.models.slice_vae import SliceVAE

    exported = SliceVAE.from_pretrained(result.final / "vae").state_dict()
    trained = result.task.model.state_dict()
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_validation_videos_land_in_the_run_folder_at_the_models_own_guidance(tmp_path, sd_model, synth_videos):
    import shutil

    from kinema.data.probe import read_sidecar
    from kinema.data.video_io import read_video

    model = tmp_path / "model"
    shutil.copytree(sd_model["path"], model)
    (model / "kinema.json").write_text(json.dumps({"defaults": {"guidance": 3.5}}))
    config = make_config(tmp_path, {**sd_model_section(sd_model), "path": str(model)}, synth_videos, "motion",
                         SD_DATA, train={"steps": 2}, validation={"every": 2, "prompts": ["a red circle"], "steps": 2})
    result = train(config, progress=False)
    clip = read_video(result.run_folder / "validation" / "step-00000002" / "00.mp4")
    assert clip.frames.shape == (4, 3, 16, 16)
    assert read_sidecar(result.run_folder / "validation" / "step-00000002" / "00.mp4")["guidance"] == 3.5


def test_a_stop_during_validation_ends_the_videos_at_the_next_sampling_step(tmp_path, sd_model, synth_videos,
                                                                              monkeypatch):
    # A stop signal waited for every validation video (minutes with real models, past a scheduler's grace period).
    import kinema.pipelines.generation as generation_module
    import kinema.pipelines.outputs as outputs_module
    import kinema.training.trainer as trainer_module

    stopped, steps_after = [False], []
    plain_write, plain_generate = outputs_module.write_result, generation_module.generate

    def write_then_stop(*args, **kwargs):
        stopped[0] = True  # the signal lands as the first video is written
        return plain_write(*args, **kwargs)

    def counting_generate(family, request, callback=None, **kwargs):
        def count(*step):
            steps_after.append(stopped[0])
            callback(*step)
        return plain_generate(family, request, callback=count, **kwargs)

    monkeypatch.setattr(outputs_module, "write_result", write_then_stop)
    monkeypatch.setattr(generation_module, "generate", counting_generate)
    monkeypatch.setattr(trainer_module, "stop_requested", lambda: stopped[0])
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                         train={"steps": 4}, checkpoint={"every": 4},
                         validation={"every": 2, "prompts": ["a red circle", "a blue square", "a cat"], "steps": 3})
    result = train(config, progress=False)
    assert result.end_step == 2  # stopped after the step it validated, its checkpoint saved
    assert sorted(p.name for p in (result.run_folder / "validation" / "step-00000002").iterdir()
                  if p.suffix == ".mp4") == ["00.mp4"]
    assert steps_after == [False, False, False, True]  # the second video stopped at its first step
    assert (result.run_folder / "checkpoints").is_dir()


def test_a_loss_that_diverges_says_to_start_a_new_run_with_the_settings_it_lacks(tmp_path, sd_model, synth_videos):
    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                         train={"steps": 3, "learning_rate": 1e30, "max_grad_norm": None})
    with pytest.raises(KinemaError, match=r"the loss became nan at step \d; its checkpoints hold the weights that led "
                                          r"there, and a resume keeps its learning rate: start a new run \(another "
                                          r"output\) with a lower train.learning_rate or train.max_grad_norm set"):
        train(config, progress=False)


def test_exported_motion_loras_load_back_through_kinema_at_the_trained_scale(tmp_path, sd_model, synth_videos):
    """Both exports of a motion LoRA trained at alpha != rank reproduce the trained model through load_family."""
    from kinema.pipelines.load import load_family

    config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "lora", SD_DATA,
                         train={"steps": 2, "learning_rate": 1e-2}, lora={"rank": 2, "alpha": 5.0})
    result = train(config, progress=False)
    trained = result.task.model.eval()
    torch.manual_seed(0)
    latents, text = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = trained(latents, 10, text)
        base = load_family(sd_model["path"], motion_module=sd_model["motion_module"]).model(latents, 10, text)
        assert (expected - base).abs().max() > 1e-4  # the LoRA changed the model, so the comparison means something
        for name in ("lora.safetensors", "motion_lora.safetensors"):
            family = load_family(sd_model["path"], motion_module=sd_model["motion_module"],
                                 loras=[(result.final / name, 1.0)])
            torch.testing.assert_close(family.model(latents, 10, text), expected, atol=1e-5, rtol=1e-5)


def test_cached_latents_and_text_train_like_fresh_encodes(tmp_path, sd_model, synth_videos):
    """A run through the caches (hits from the second epoch on) follows the run that encodes every batch."""
    plain = train(make_config(tmp_path / "plain", sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                              train={"steps": 6}), progress=False)
    cached_config = make_config(tmp_path / "cached", sd_model_section(sd_model), synth_videos, "motion",
                                {**SD_DATA, "cache": str(tmp_path / "cache")}, train={"steps": 6})
    cached = train(cached_config, progress=False)
    assert cached.task.latent_cache.hits > 0 and cached.task.text_cache.hits > 0
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-6)
    assert any((tmp_path / "cache").rglob("*.safetensors"))


def test_lora_mode_on_v3_changes_lora_weights_only_and_exports_for_diffusers(tmp_path, v3_model, synth_videos):
    config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, "lora", V3_DATA, train={"steps": 2},
                         lora={"rank": 2, "alpha": 4.0, "targets": "all"})
    before = {k: v.clone() for k, v in make_task(config).model.state_dict().items()}
    result = train(config, progress=False)
    after = result.task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if ".lora_" not in k)
    assert all(not torch.equal(before[k], after[k]) for k in after if ".lora_B." in k)
    from safetensors import safe_open

    with safe_open(str(result.final / "lora.safetensors"), "pt") as file:
        names = list(file.keys())
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert names and all(name.startswith("transformer.") for name in names)
    assert metadata["transformer.r"] == 2 and metadata["transformer.lora_alpha"] == 4.0
    assert not (result.final / "motion_lora.safetensors").exists()


def test_bf16_mixed_precision_runs_after_a_float32_run_in_one_process(tmp_path, sd_model, synth_videos):
    """accelerate keeps one precision per process; the trainer builds its state again for each run."""
    full = train(make_config(tmp_path / "a", sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                             train={"steps": 2}), progress=False)
    mixed = train(make_config(tmp_path / "b", sd_model_section(sd_model), synth_videos, "motion", SD_DATA,
                              train={"steps": 2, "mixed_precision": "bf16"}), progress=False)
    assert all(torch.isfinite(torch.tensor(mixed.losses)))
    torch.testing.assert_close(torch.tensor(mixed.losses), torch.tensor(full.losses), rtol=2e-2, atol=0)
    assert full.losses != mixed.losses  # autocast really ran in bfloat16


def test_vae_adversarial_training_moves_each_player_by_its_own_loss_and_resumes(tmp_path, v3_model, synth_videos):
    from kinema.training.vae_objective import discriminator_loss, vae_losses

    adversarial = {"adversarial_weight": 0.5, "adversarial_start": 1}
    config = make_config(tmp_path / "whole", {"path": str(v3_model)}, synth_videos, "vae", V3_DATA,
                         train={"steps": 3, "batch_size": 1}, vae=adversarial, checkpoint={"every": 1, "keep": 3})
    # One backward pass gives the VAE the gradient of its own loss and the discriminator that of the hinge loss.
    task = make_task(config)
    batch = first_batch(config)
    inputs = task.inputs({k: v[:1] for k, v in batch.items()}, torch.Generator().manual_seed(3), step=1)
    task.module(**inputs).backward()
    got = {name: p.grad.clone() for name, p in task.trainable_parameters()}
    task.module.zero_grad(set_to_none=True)
    inputs["generator"] = torch.Generator().manual_seed(3)
    losses = vae_losses(task.model, inputs["video"], task.module.settings, inputs["generator"], task.discriminator,
                        step=1, return_decoded=True)
    vae_grads = torch.autograd.grad(losses["loss"], list(task.model.parameters()), retain_graph=True)
    hinge = discriminator_loss(task.discriminator, inputs["video"], losses["decoded"])
    disc_grads = torch.autograd.grad(hinge, list(task.discriminator.parameters()))
    names = [name for name, _ in task.trainable_parameters()]
    for name, expected in zip(names, list(vae_grads) + list(disc_grads), strict=True):
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-6)
    # Trained, the discriminator moves only from its start step, and a resumed run equals the uninterrupted one.
    whole = train(config, progress=False)
    state = whole.task.trainable_state()
    assert any(k.startswith("discriminator.") for k in state)
    parts = make_config(tmp_path / "parts", {"path": str(v3_model)}, synth_videos, "vae", V3_DATA,
                        train={"steps": 2, "batch_size": 1}, vae=adversarial, checkpoint={"every": 1})
    train(parts, progress=False)
    resumed = train(make_config(tmp_path / "parts", {"path": str(v3_model)}, synth_videos, "vae", V3_DATA,
                                train={"steps": 3, "batch_size": 1}, vae=adversarial, checkpoint={"every": 1}),
                    resume="latest", progress=False)
    again = resumed.task.trainable_state()
    assert all(torch.equal(state[k], again[k]) for k in state)
    from kinema.training.checkpoint import RunFolder
    from kinema.training.config import resume_identity

    run = RunFolder.open(config.output, resume_identity(config), resume="latest", keep=2)
    first = run.load(run.resolve(str(Path(config.output) / "checkpoints" / "step-00000001"))).tensors["model"]
    start = make_task(config).trainable_state()
    assert all(torch.equal(first[k], start[k]) for k in first if k.startswith("discriminator."))
    assert not all(torch.equal(state[k], start[k]) for k in state if k.startswith("discriminator."))


@pytest.mark.parametrize("prediction_type", [None, "v_prediction"])
def test_the_target_is_what_the_model_predicts(tmp_path, v3_model, synth_videos, prediction_type):
    """The loss target is the noise, or with kinema.json "prediction_type": "v_prediction" the velocity
    sqrt(a) * noise - sqrt(1 - a) * x0: either way the clean latents come back from the noisy ones and the target
    by DDPM's algebra, written here from the linear betas (1e-4 .. 0.02) independently of diffusers."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(v3_model, model)
    if prediction_type:
        (model / "kinema.json").write_text(json.dumps({"prediction_type": prediction_type}))
    task = make_task(make_config(tmp_path, {"path": str(model)}, synth_videos, "full", V3_DATA))
    assert task.family.prediction_type == (prediction_type or "epsilon")
    batch = first_batch(task.config)
    inputs = task.inputs(batch, torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = task.family.encode_frames((batch["pixels"].float() + 1) / 2)
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    a = alpha_bar[inputs["timesteps"]].float().view(-1, 1, 1, 1, 1)
    noisy, target = inputs["noisy"], inputs["target"]
    if prediction_type == "v_prediction":
        recovered = a.sqrt() * noisy - (1 - a).sqrt() * target
    else:
        recovered = (noisy - (1 - a).sqrt() * target) / a.sqrt()
    torch.testing.assert_close(recovered, clean, rtol=1e-4, atol=1e-3 / float(a.sqrt().min()))


@pytest.mark.parametrize("prediction_type", [None, "v_prediction"])
def test_min_snr_weights_the_loss_as_the_paper_writes_it_in_x0(tmp_path, v3_model, synth_videos, prediction_type):
    """With train.snr_gamma the loss is, per sample, min(SNR, gamma) times the squared error of the clean latents
    the prediction implies (Hang et al. 2023, eq. 7), whatever the model predicts: the clean estimate and the SNR
    written here from the linear betas, independently of diffusers; without it, plain MSE of the target."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(v3_model, model)
    if prediction_type:
        (model / "kinema.json").write_text(json.dumps({"prediction_type": prediction_type}))
    gamma = 5.0
    config = make_config(tmp_path, {"path": str(model)}, synth_videos, "full", V3_DATA, train={"snr_gamma": gamma})
    task = make_task(config)
    batch = first_batch(config)
    # Timesteps from both ends of the schedule, so that both sides of the clip at gamma are tested.
    timesteps = torch.tensor([5, 990])
    task._timesteps = lambda count, generator: timesteps[:count]
    inputs = task.inputs(batch, torch.Generator().manual_seed(3))
    timesteps = inputs["timesteps"]
    with torch.no_grad():
        loss = float(task.module(**inputs))
        prediction = task.module.denoiser_class(task.module.model)(inputs["noisy"], timesteps, inputs["cond"])
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    a = alpha_bar[timesteps].float().view(-1, 1, 1, 1, 1)
    noisy, target = inputs["noisy"], inputs["target"]

    def clean_from(output):
        if prediction_type == "v_prediction":
            return a.sqrt() * noisy - (1 - a).sqrt() * output
        return (noisy - (1 - a).sqrt() * output) / a.sqrt()

    x0_error = (clean_from(prediction) - clean_from(target)).pow(2).flatten(1).mean(1)
    snr = (a / (1 - a)).flatten()
    expected = float((snr.clamp(max=gamma) * x0_error).mean())
    assert loss == pytest.approx(expected, rel=1e-3)
    assert min(snr) < gamma < max(snr)
    plain = make_task(make_config(tmp_path / "plain", {"path": str(model)}, synth_videos, "full", V3_DATA))
    assert "weights" not in plain.inputs(batch, torch.Generator().manual_seed(3))


def test_cached_inpaint_latents_equal_the_vae_and_repeat_from_the_cache(tmp_path, v3_model, synth_videos):
    """With data.cache the inpaint (mask and masked-video) latents come through the latent cache: the same values as
    the VAE gives without a cache, and a repeated batch encodes nothing."""
    config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, "full", V3_DATA)
    cached = make_config(tmp_path / "c", {"path": str(v3_model)}, synth_videos, "full",
                         {**V3_DATA, "cache": str(tmp_path / "cache")})
    batch = first_batch(config)
    plain = make_task(config).inputs(batch, torch.Generator().manual_seed(3))["cond"]["inpaint_latents"]
    task = make_task(cached)
    first = task.inputs(batch, torch.Generator().manual_seed(3))["cond"]["inpaint_latents"]
    misses = task.latent_cache.misses
    again = task.inputs(batch, torch.Generator().manual_seed(3))["cond"]["inpaint_latents"]
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, first) and task.latent_cache.misses == misses and misses > 0


@pytest.mark.parametrize("mode", ["motion", "full", "vae", "vae-adversarial"])
def test_a_task_moved_to_another_device_computes_its_loss_there(tmp_path, sd_model, v3_model, synth_videos, mode,
                                                                 monkeypatch):
    # The trainer moves the task to accelerate's device. A GPU run failed at step 1 when only the trained model
    # moved ("Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor) should be the same"): the
    # frozen encoders, the batch and the noise stayed on the CPU. The meta device stands in for the GPU here:
    # PyTorch refuses an op that mixes it with the CPU, as it does CUDA. The text encoders make data-dependent
    # choices (`.item()`), which the meta device cannot, so a first CPU pass fills the cache and the meta pass reads
    # the text (and latents) from it, as every later epoch of a cached run does.
    data = {**(SD_DATA if mode == "motion" else V3_DATA), "cache": str(tmp_path / "cache")}
    if mode == "motion":
        config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion", data)
    else:
        sections = {"vae": {"adversarial_weight": 0.1}} if mode == "vae-adversarial" else {}
        config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, mode.split("-")[0], data, **sections)
    batch = first_batch(config)
    make_task(config).inputs(batch, torch.Generator().manual_seed(0))
    from kinema.training import vae_objective

    monkeypatch.setattr(vae_objective, "_check_pixels", lambda *args: None)  # reads values, which meta has not
    task = make_task(config).to("meta")
    inputs = task.inputs(batch, torch.Generator().manual_seed(0))
    loss = task.module(**inputs)
    assert loss.device.type == "meta" and loss.shape == ()
    if task.family is not None:  # the frozen encoders too: an uncached clip or caption is encoded on the device
        encoders = [task.family.vae, task.family.text_encoder, getattr(task.family, "image_encoder", None)]
        assert {p.device.type for part in encoders if part is not None for p in part.parameters()} == {"meta"}


@pytest.mark.parametrize("model_kind", ["v3", "sd"])
def test_the_latent_cache_follows_the_vae_encoder_not_its_decoder(tmp_path, sd_model, v3_model, synth_videos,
                                                                  model_kind):
    # A decoder-only fine-tune (the bundled recipes' stages 2b-2d) leaves every posterior mean as it was, so it must
    # keep the cache; one changed encoder weight must not.
    if model_kind == "sd":
        config = make_config(tmp_path, sd_model_section(sd_model), synth_videos, "motion",
                             {**SD_DATA, "cache": str(tmp_path / "cache")})
    else:
        config = make_config(tmp_path, {"path": str(v3_model)}, synth_videos, "full",
                             {**V3_DATA, "cache": str(tmp_path / "cache")})
    task = make_task(config)
    vae = task.family.vae
    namespaces = [task.latent_cache.namespace]
    for part in (vae.decoder, vae.encoder):
        with torch.no_grad():
            next(part.parameters()).add_(1e-3)
        task._open_caches(config.data.cache)
        namespaces.append(task.latent_cache.namespace)
    assert namespaces[1] == namespaces[0] != namespaces[2]
