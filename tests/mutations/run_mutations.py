"""Deliberate bugs against the test suite: every one must make at least one default (not slow) test fail.

Run from anywhere, with the project's virtualenv active:

    python tests/mutations/run_mutations.py              # all mutations, each against the test files it concerns
    python tests/mutations/run_mutations.py --full       # each against the whole default suite (much slower)
    python tests/mutations/run_mutations.py --only skip  # mutations whose name contains "skip"
    python tests/mutations/run_mutations.py --list       # names, files and test targets; runs nothing
    python tests/mutations/run_mutations.py --committed  # HEAD only, without uncommitted working-tree changes

What it does: builds a scratch copy of the repository (`git archive HEAD`, then the working tree's modified and
untracked files copied over and deleted ones removed, unless --committed), runs the chosen tests there once unmutated
(the control), then for each mutation copies the scratch tree, applies one small exact text substitution to one
kinema file and runs pytest inside that copy with PYTHONPATH pointing at it (so `import kinema` is the mutated copy,
never the checkout or its editable install). It prints one line per mutation,

    <mutation> -> N failed: <test ids>      or      <mutation> -> SURVIVED

counting only tests that passed in the control, and exits 1 when any mutation survived (2 when the control or a
mutation could not be run: a pattern not found exactly once, kinema not imported from the copy, pytest unable to
collect). A pattern that is not found exactly once is an error, not a pass: when the code moves, update the
mutation here. Nothing in the checkout is touched. The default run takes about 10 minutes on 2 cores.

This file is not a test module (its name does not start with test_), so pytest never collects or imports it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Test targets, relative to the repository root. Each mutation runs against the test files that exercise the code it
# breaks, to keep the whole script near 10 minutes on 2 cores; --full runs the whole default suite instead.
DIT_TESTS = ("tests/models/test_video_dit.py", "tests/models/test_v3_reference.py", "tests/models/motion",
             "tests/loaders/easyanimate/test_easyanimate.py", "tests/loaders/easyanimate/test_easyanimate_depth.py")
VAE_TESTS = ("tests/models/test_slice_vae.py", "tests/models/test_v3_reference.py",
             "tests/loaders/easyanimate/test_easyanimate.py")
VIDEO_UNET_TESTS = ("tests/models/test_video_unet.py", "tests/loaders/animatediff/test_animatediff.py",
                    "tests/loaders/animatediff/test_motion_lora.py", "tests/docs")
KEY_MAP_TESTS = ("tests/loaders/animatediff/test_animatediff.py", "tests/loaders/animatediff/test_motion_lora.py",
                 "tests/cli/test_cli.py", "tests/cli/test_cli_weights.py")
WRITE_TESTS = ("tests/test_fileio.py", "tests/cli/test_signals.py", "tests/test_output_policy.py",
               "tests/cli/test_error_funnel.py", "tests/loaders/test_checkpoint_io.py", "tests/cli/test_cli.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # the kinema file, relative to the repository root
    # Each edit is one or more (old, new) alternatives: exactly one alternative's `old` must occur, exactly once (the
    # alternatives cover code known to be in flux; anything else stops the script).
    edits: tuple[tuple[tuple[str, str], ...], ...]
    tests: tuple[str, ...]


NORMS_FORWARD = (
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norms\\.0\\.(?P<rest>.*)", r"\\g<pre>norm1.\\g<rest>"),\n'
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norms\\.1\\.(?P<rest>.*)", r"\\g<pre>norm2.\\g<rest>"),\n',
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norms\\.0\\.(?P<rest>.*)", r"\\g<pre>norm2.\\g<rest>"),\n'
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norms\\.1\\.(?P<rest>.*)", r"\\g<pre>norm1.\\g<rest>"),\n',
)
NORMS_REVERSE = (
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norm1\\.(?P<rest>.*)", r"\\g<pre>norms.0.\\g<rest>"),\n'
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norm2\\.(?P<rest>.*)", r"\\g<pre>norms.1.\\g<rest>"),\n',
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norm1\\.(?P<rest>.*)", r"\\g<pre>norms.1.\\g<rest>"),\n'
    '    (r"(?P<pre>.*\\.transformer_blocks\\.\\d+\\.)norm2\\.(?P<rest>.*)", r"\\g<pre>norms.0.\\g<rest>"),\n',
)

MUTATIONS = (
    Mutation(
        "DiT block: motion module after the cross-attention",
        "kinema/models/video_dit_blocks.py",
        (((
            '        video = rearrange(x, "b (f h w) c -> b c f h w", f=num_frames, h=height, w=width)\n'
            '        x = rearrange(self.attn_temporal(video), "b c f h w -> b (f h w) c")\n'
            "        # No norm before cross-attention: PixArt (and V3) feed the raw hidden states.\n"
            "        x = x + self.attn2(x, encoder_hidden_states=context, attention_mask=context_bias)\n",
            "        x = x + self.attn2(x, encoder_hidden_states=context, attention_mask=context_bias)\n"
            '        video = rearrange(x, "b (f h w) c -> b c f h w", f=num_frames, h=height, w=width)\n'
            '        x = rearrange(self.attn_temporal(video), "b c f h w -> b (f h w) c")\n',
        ),),),
        DIT_TESTS,
    ),
    Mutation(
        "U-ViT: first skip (block 12 -> 15 at depth 28) dropped",
        "kinema/models/video_dit.py",
        (((
            "        skip_into = {target: (index, source) for index, (source, target) in enumerate(self.skip_pairs)}\n",
            "        skip_into = {target: (index, source) for index, (source, target) in enumerate(self.skip_pairs)"
            " if index > 0}\n",
        ),),),
        DIT_TESTS,
    ),
    Mutation(
        "Slice VAE: latent frames reversed within each encoded slice",
        "kinema/models/slice_vae.py",
        (((
            "            moments[:, :, i * latents:(i + 1) * latents] = self._spatial(self._encode_slice, clip, tiling,"
            " up=False)\n",
            "            moments[:, :, i * latents:(i + 1) * latents] = self._spatial(self._encode_slice, clip, tiling,"
            " up=False).flip(2)\n",
        ),),),
        VAE_TESTS,
    ),
    Mutation(
        "VideoUNet: per-frame text ignored (every frame gets the first frame's text)",
        "kinema/models/video_unet.py",
        (((
            "        if text.ndim == 3 and text.shape[0] == batch * frames:\n"
            "            return text\n"
            "        if text.ndim == 4 and text.shape[:2] == (batch, frames):\n"
            '            return rearrange(text, "b f l d -> (b f) l d")\n',
            "        if text.ndim == 3 and text.shape[0] == batch * frames:\n"
            "            return text[::frames].repeat_interleave(frames, dim=0)\n"
            "        if text.ndim == 4 and text.shape[:2] == (batch, frames):\n"
            "            return text[:, 0].repeat_interleave(frames, dim=0)\n",
        ),),),
        VIDEO_UNET_TESTS,
    ),
    Mutation(
        "hybrid motion module: global attention dropped",
        "kinema/models/motion/temporal.py",
        (((
            "        for kind, norm, attention in zip(self.attention_kinds, self.norms, self.attention_blocks,"
            " strict=True):\n",
            "        for kind, norm, attention in zip(self.attention_kinds, self.norms, self.attention_blocks,"
            " strict=True):\n"
            '            if kind == "global":\n'
            "                continue\n",
        ),),),
        DIT_TESTS,
    ),
    Mutation(
        "key map original -> diffusers: norm1/norm2 swapped",
        "kinema/loaders/animatediff/keys.py",
        ((NORMS_FORWARD,),),
        KEY_MAP_TESTS,
    ),
    Mutation(
        "key map diffusers -> original: norm1/norm2 swapped",
        "kinema/loaders/animatediff/keys.py",
        ((NORMS_REVERSE,),),
        KEY_MAP_TESTS,
    ),
    Mutation(
        "key maps both ways: norm1/norm2 swapped (a symmetric bug every round trip undoes)",
        "kinema/loaders/animatediff/keys.py",
        ((NORMS_FORWARD,), (NORMS_REVERSE,)),
        KEY_MAP_TESTS,
    ),
    Mutation(
        "V3 convert casts the weights to float32 (round trip exact, files no longer V3's float16)",
        "kinema/loaders/easyanimate/transformer.py",
        ((("    model = load_video_dit(source)\n", "    model = load_video_dit(source, dtype=torch.float32)\n"),),),
        ("tests/loaders/easyanimate/test_easyanimate.py",),
    ),
    Mutation(
        "checkpoint write not atomic: atomic_file hands out the target itself, no temporary and rename",
        "kinema/fileio.py",
        ((
            # HEAD (7fea762): the temporary is a file beside the target.
            ("        yield temp\n"
             "        os.chmod(temp, target.stat().st_mode & 0o7777 if target.is_file() else _file_mode())\n"
             "        os.replace(temp, target)\n",
             "        yield target\n"),
            # Working-tree variant: the temporary file sits inside a temporary folder.
            ("        yield written\n"
             "        os.chmod(written, target.stat().st_mode & 0o7777 if target.is_file() else _file_mode())\n"
             "        _check_unchanged(target, before, Path(path), kind, False, overwrite, inputs)\n"
             "        os.replace(written, target)\n",
             "        yield target\n"),
        ),),
        WRITE_TESTS,
    ),
    Mutation(
        "IP-Adapter scale ignored: every IP layer runs at 1",
        "kinema/loaders/ip_adapter.py",
        ((("            processor.scale = [scale] * len(processor.scale)\n",
           "            processor.scale = [1.0] * len(processor.scale)\n"),),),
        ("tests/loaders/test_ip_adapter.py",),
    ),
    Mutation(
        "IP-Adapter's unprompted side takes the image prompt too",
        "kinema/pipelines/family.py",
        ((("                {\"ip_image_embeds\": uncond.expand(videos, *uncond.shape[1:])})\n",
           "                {\"ip_image_embeds\": cond.expand(videos, *cond.shape[1:])})\n"),),),
        ("tests/loaders/test_ip_adapter.py",),
    ),
    Mutation(
        "FreeU scales every backbone channel, not half of them",
        "kinema/models/freeu.py",
        ((("        half = self.backbone_channels // 2\n", "        half = self.backbone_channels\n"),),),
        ("tests/models/test_freeu.py",),
    ),
    Mutation(
        "FreeU's setting leaks across threads (read from a module global, not the run's context)",
        "kinema/models/run_setting.py",
        ((("        return self._value.get() if self.others_running else self.default\n",
           "        return self._latest if self.others_running else self.default\n"),),
         (("        token = self._value.set(value)\n",
           "        token = self._value.set(value)\n        self._latest = value\n"),)),
        ("tests/models/test_freeu.py", "tests/models/motion/test_temporal.py"),
    ),
    Mutation(
        "step caching drops the ControlNet's skip residuals",
        "kinema/models/video_unet.py",
        ((("skips = tuple(skip + extra for skip, extra in zip(",
           "skips = tuple(skip + 0 * extra for skip, extra in zip("),),),
        ("tests/loaders/test_controlnet.py",),
    ),
    Mutation(
        "context windows hand every window the first frames' control images",
        "kinema/sampling/context.py",
        ((("{\"inpaint_latents\": 2, \"control_frames\": 2, ", "{\"inpaint_latents\": 2, "),),),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "the control window is counted in steps, not diffusers' share of the steps",
        "kinema/pipelines/generation.py",
        ((("    return not (step / steps < start or (step + 1) / steps > end)\n",
           "    return not (step < start or step > end)\n"),),),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "several ControlNets: only the last one's residuals count",
        "kinema/models/controlnet.py",
        ((("            if not total or not out:", "            if True:"),),
         (("                total = total or out\n", "                total = out or total\n"),)),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "guess mode steers the unprompted half of guidance too",
        "kinema/pipelines/generation.py",
        ((("uncond[\"control_guess\"] = torch.zeros(", "uncond[\"control_guess\"] = torch.ones("),),),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "guess mode's residuals are not graded by level",
        "kinema/sampling/denoisers.py",
        ((("None if mask is None else mask[clips], guess_mode=True)",
           "None if mask is None else mask[clips], guess_mode=False)"),),),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "PIA's conv_in replaces the base model's latent channels instead of widening them",
        "kinema/loaders/animatediff/load.py",
        ((("    widened = torch.cat([own, weight[:, own.shape[1]:].to(own)], dim=1)\n",
           "    widened = weight.to(own)\n"),),),
        ("tests/loaders/animatediff/test_pia.py",),
    ),
    Mutation(
        "PIA's mask holds every frame as the start image",
        "kinema/pipelines/animatediff.py",
        ((("    return [values[min(frame, len(values) - 1)] for frame in range(frames)]",
           "    return [1.0 for frame in range(frames)]"),),),
        ("tests/loaders/animatediff/test_pia.py",),
    ),
    Mutation(
        "a resumed run takes another run's saved latents",
        "kinema/pipelines/outputs.py",
        ((("        differ.update(key for key in names if mine.get(key) != theirs.get(key) and not (",
           "        differ.update(key for key in names if False and not ("),),),
        ("tests/cli/test_generate_cli.py",),
    ),
    Mutation(
        "the control preprocessor is never run",
        "kinema/pipelines/generation.py",
        ((("\"the control video\"), preprocess)", "\"the control video\"), None)"),),),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "SparseCtrl keyframes go to the first frames, not their control_indices",
        "kinema/pipelines/family.py",
        ((("        control[:, :, places] = ",
           "        places = list(range(len(places)))\n        control[:, :, places] = "),),),
        ("tests/loaders/animatediff/test_sparsectrl.py",),
    ),
    Mutation(
        "a ControlNet's frame weights are not applied to the residuals of the frames it steers",
        "kinema/models/controlnet.py",
        ((("weights[rows].to(mid))\n", "weights[rows].to(mid).clamp(min=1))\n"),),),
        ("tests/loaders/test_controlnet.py", "tests/pipelines/test_control_generation.py"),
    ),
    Mutation(
        "a keyframe's falloff reaches one frame too far",
        "kinema/pipelines/request.py",
        ((("    spread = [1.0, *(falloff or ())]\n", "    spread = [1.0, 1.0, *(falloff or ())]\n"),),),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "several ControlNets are not handed their frame weights",
        "kinema/models/controlnet.py",
        ((("            out = net(sample, timestep, text, part, weight, guess_mode=guess_mode)\n",
           "            out = net(sample, timestep, text, part, guess_mode=guess_mode)\n"),),),
        ("tests/pipelines/test_control_generation.py",),
    ),
    Mutation(
        "prompt travel's control images are placed in name order, not at their frame numbers",
        "kinema/pipelines/travel_maps.py",
        ((("        found[frame] = path\n", "        found[len(found)] = path\n"),),),
        ("tests/pipelines/test_travel_maps.py",),
    ),
    Mutation(
        "a travelling image prompt's frames are folded frame by frame, not clip by clip",
        "kinema/sampling/denoisers.py",
        ((("            image = per_frame.flatten(0, 1)\n",
           "            image = per_frame.transpose(0, 1).flatten(0, 1)\n"),),),
        ("tests/loaders/test_ip_adapter.py",),
    ),
    Mutation(
        "a travelling image prompt runs backwards",
        "kinema/pipelines/family.py",
        ((("            blended = interpolate_states(embeds.flatten(1, -2), schedule, frames, window)\n",
           "            blended = interpolate_states(embeds.flatten(1, -2), schedule, frames, window).flip(0)\n"),),),
        ("tests/loaders/test_ip_adapter.py",),
    ),
    Mutation(
        "a prompt schedule's hold is ignored",
        "kinema/sampling/prompt_travel.py",
        ((("            held = start + round((end - start) * self.hold)  # Python's round, as prompt travel's\n",
           "            held = start\n"),),),
        ("tests/sampling/test_prompt_travel.py",),
    ),
    Mutation(
        "a circular prompt schedule holds its ends instead of wrapping",
        "kinema/sampling/prompt_travel.py",
        ((("        if self.loop:  # the last keyframe one period before, the first one period after\n",
           "        if False:\n"),),),
        ("tests/sampling/test_prompt_travel.py",),
    ),
    Mutation(
        "clip skip takes the layer one further back",
        "kinema/pipelines/text_encoding.py",
        ((("output_hidden_states=True).hidden_states[-clip_skip]\n",
           "output_hidden_states=True).hidden_states[-clip_skip - 1]\n"),),),
        ("tests/pipelines/test_animatediff_pipeline.py",),
    ),
    Mutation(
        "saved latents are loaded without checking their digest",
        "kinema/pipelines/outputs.py",
        ((("    if DIGEST_METADATA_KEY in metadata and \\", "    if False and \\"),),),
        ("tests/pipelines/test_outputs.py",),
    ),
    Mutation(
        "a pickled PIA checkpoint is not told before loading",
        "kinema/loaders/animatediff/pia.py",
        ((("        names = pickled_tensor_names(path)", "        names = None"),),),
        ("tests/loaders/animatediff/test_pia.py",),
    ),
    Mutation(
        "--device is read but the model always loads on the CPU",
        "kinema/cli/generate.py",
        ((("device=\"cpu\" if offload else device,", "device=\"cpu\","),),),
        ("tests/cli/test_generate_cli.py",),
    ),
    Mutation(
        "guidance rescale scales every video by the batch's spread, not its own",
        "kinema/sampling/guidance.py",
        ((("        guided = rescale_noise_cfg(guided, eps_cond, guidance_rescale=rescale)",
           "        guided = rescale_noise_cfg(guided.flatten()[None], eps_cond.flatten()[None], "
           "guidance_rescale=rescale).view_as(guided)"),),),
        ("tests/sampling/test_sampling.py",),
    ),
    Mutation(
        "config.yaml keeps paths relative to a config folder it is not in",
        "kinema/pipelines/prompt_configs.py",
        ((("    used = _paths_as_found({**entry, **travel_used}, config_folder)",
           "    used = {**entry, **travel_used}"),),),
        ("tests/pipelines/test_prompt_configs.py",),
    ),
    Mutation(
        "tile_resample shrinks with nearest neighbours, not OpenCV's area resize",
        "kinema/pipelines/control_maps.py",
        ((("interpolation=cv2.INTER_AREA)", "interpolation=cv2.INTER_NEAREST)"),),),
        ("tests/pipelines/test_control_maps.py",),
    ),
    Mutation(
        "a float16 VAE's overflow is kept, not run again in float32",
        "kinema/pipelines/decode.py",
        ((("    if parameter.dtype == torch.float16 and not bool(torch.isfinite(result).all()) and bool(",
           "    if False and bool("),),),
        ("tests/pipelines/test_from_parts.py",),
    ),
    Mutation(
        "each continuation segment restarts the prompt schedule",
        "kinema/pipelines/generation.py",
        ((("_Span(have - overlap, total))", "_Span(0, total))"),),),
        ("tests/pipelines/test_generate.py", "tests/loaders/test_ip_adapter.py"),
    ),
    Mutation(
        "another VAE's old diffusers attention names are not renamed",
        "kinema/loaders/image_vae.py",
        ((("            bare = f\"{found[1]}.{_DEPRECATED_ATTENTION[found[2]]}.{found[3]}\"",
           "            pass"),),),
        ("tests/loaders/test_image_vae.py",),
    ),
    Mutation(
        "the swapped VAE is checked but the model keeps its own",
        "kinema/pipelines/load.py",
        ((("        components.vae = _load_described(vae_source, ", "        _load_described(vae_source, "),),),
        ("tests/pipelines/test_load.py",),
    ),
    Mutation(
        "a VAE folder's scaling factor is not compared with the model's",
        "kinema/loaders/image_vae.py",
        ((("LATENT_SPACE = (\"latent_channels\", \"scaling_factor\")", "LATENT_SPACE = (\"latent_channels\",)"),),),
        ("tests/loaders/test_image_vae.py", "tests/pipelines/test_load.py"),
    ),
    Mutation(
        "PIL opens any format it knows (EPS through Ghostscript)",
        "kinema/data/probe.py",
        ((('PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")', "PIL_FORMATS = None"),),),
        ("tests/pipelines/test_jobs.py",),
    ),
    Mutation(
        "a latent is held where any pixel it covers is kept, not every one",
        "kinema/pipelines/generation.py",
        ((("    return held.reshape(latent_frames, height, factor, width, factor).all(dim=4).all(dim=2)",
           "    return held.reshape(latent_frames, height, factor, width, factor).any(dim=4).any(dim=2)"),),),
        ("tests/pipelines/test_generate.py",),
    ),
    Mutation(
        "a masked InP clip gets the inpaint inputs but nothing is held",
        "kinema/pipelines/generation.py",
        ((("        return _Clip(noise, cond, uncond, known=clean, keep=keep)",
           "        return _Clip(noise, cond, uncond)"),),),
        ("tests/pipelines/test_generate.py",),
    ),
    Mutation(
        "the inpaint inputs keep a frame where any of its pixels is kept",
        "kinema/pipelines/easyanimate.py",
        ((("        kept = keep.to(video.device).view(1, 1, frames, *(keep.shape[1:] or (1, 1)))",
           "        kept = keep.reshape(frames, -1).any(dim=1).to(video.device)[None, None, :, None, None]"),),),
        ("tests/pipelines/test_generate.py",),
    ),
    Mutation(
        "a mask is read inverted: black remade, white kept",
        "kinema/pipelines/generation.py",
        ((("\"the mask\")[:, 0] > 0.5", "\"the mask\")[:, 0] <= 0.5"),),),
        ("tests/pipelines/test_generate.py", "tests/cli/test_generate_cli.py"),
    ),
)

# A pytest plugin written into the scratch area: it records the id of every failed test (or failed collection) in
# the file named by KINEMA_MUTATION_FAILURES, so nothing depends on parsing pytest's console output.
PLUGIN = '''
import os


def _record(nodeid):
    with open(os.environ["KINEMA_MUTATION_FAILURES"], "a") as f:
        f.write(nodeid + "\\n")


def pytest_runtest_logreport(report):
    if report.failed:
        _record(report.nodeid)


def pytest_collectreport(report):
    if report.failed:
        _record("collecting " + (report.nodeid or "?"))
'''


class ScriptError(Exception):
    """The control or a mutation could not be run as intended."""


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout


def build_scratch(root: Path, committed_only: bool) -> Path:
    """HEAD's tree at root/base, plus the working tree's uncommitted files unless `committed_only`."""
    base = root / "base"
    base.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    if not committed_only:
        for name in git("ls-files", "-z", "-m", "-o", "--exclude-standard").split("\0"):
            source = REPO / name
            if name and source.is_file():
                (base / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, base / name)
        for name in git("ls-files", "-z", "-d").split("\0"):
            if name:
                (base / name).unlink(missing_ok=True)
    (root / "plugin").mkdir()
    (root / "plugin" / "kinema_mutation_plugin.py").write_text(PLUGIN)
    return base


def mutated(mutation: Mutation, text: str) -> str:
    """`text` (the file's content) with the mutation's edits applied."""
    for alternatives in mutation.edits:
        found = [(old, new) for old, new in alternatives if text.count(old) == 1]
        counts = [text.count(old) for old, _ in alternatives]
        if len(found) != 1 or sum(counts) != 1:
            raise ScriptError(f"{mutation.name}: in {mutation.path} the pattern(s) occur {counts} times, need "
                              f"exactly one occurrence of one of them; the code moved, update {Path(__file__).name}")
        old, new = found[0]
        text = text.replace(old, new)
    return text


def apply(mutation: Mutation, tree: Path) -> None:
    path = tree / mutation.path
    path.write_text(mutated(mutation, path.read_text()))


def run_pytest(tree: Path, root: Path, targets: tuple[str, ...], label: str) -> tuple[set[str], float]:
    """Run pytest inside `tree` on `targets`; return the ids of failed tests and the seconds it took."""
    failures = root / f"failures-{label}.txt"
    failures.unlink(missing_ok=True)
    failures.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(root / "plugin")]),
           "KINEMA_MUTATION_FAILURES": str(failures), "PYTHONDONTWRITEBYTECODE": "1"}
    check = subprocess.run([sys.executable, "-c", "import kinema; print(kinema.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True)
    if not check.stdout.strip().startswith(str(tree)):
        raise ScriptError(f"{label}: kinema was imported from {check.stdout.strip() or check.stderr.strip()}, "
                          f"not from the copy {tree}")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "kinema_mutation_plugin",
                             "-q", "--tb=no", "--no-header", *targets],
                            cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    failed = set(failures.read_text().splitlines())  # one id a line: parametrize ids may hold spaces
    if result.returncode not in (0, 1) or (result.returncode == 1) != bool(failed):
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ScriptError(f"{label}: pytest exited {result.returncode} (failures recorded: {len(failed)}):\n{tail}")
    return failed, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run the whole default suite for every mutation")
    parser.add_argument("--only", help="run only the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and their test targets")
    parser.add_argument("--committed", action="store_true", help="HEAD only, no uncommitted working-tree files")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or args.only.lower() in m.name.lower()]
    if not chosen:
        parser.error(f"no mutation name contains {args.only!r}")
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}\n    {mutation.path}\n    tests: {' '.join(mutation.tests)}")
        return 0

    def targets(mutation: Mutation) -> tuple[str, ...]:
        return ("tests",) if args.full else mutation.tests

    with tempfile.TemporaryDirectory(prefix="kinema-mutations-") as scratch:
        root = Path(scratch)
        try:
            base = build_scratch(root, args.committed)
            for mutation in chosen:  # every pattern is checked before the long runs start
                mutated(mutation, (base / mutation.path).read_text())
            control_targets = tuple(dict.fromkeys(t for m in chosen for t in targets(m)))
            control, seconds = run_pytest(base, root, control_targets, "control")
            print(f"control (unmutated, {'HEAD' if args.committed else 'HEAD + working tree'}): "
                  f"{len(control)} failed in {seconds:.0f}s" + (f": {' '.join(sorted(control))}" if control else ""),
                  flush=True)
            survived = []
            for index, mutation in enumerate(chosen):
                tree = shutil.copytree(base, root / f"mutant-{index}", symlinks=True)
                apply(mutation, tree)
                failed, seconds = run_pytest(tree, root, targets(mutation), f"mutant-{index}")
                killers = sorted(failed - control)
                shutil.rmtree(tree)
                verdict = f"{len(killers)} failed: {' '.join(killers)}" if killers else "SURVIVED"
                print(f"{mutation.name} -> {verdict}  [{seconds:.0f}s]", flush=True)
                if not killers:
                    survived.append(mutation.name)
        except ScriptError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if survived:
        print(f"{len(survived)} of {len(chosen)} mutations survived", file=sys.stderr)
        return 1
    print(f"all {len(chosen)} mutations were caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
