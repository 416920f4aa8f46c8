"""What a model's VAE lets through: the frame detectors on VAE reconstructions of synthetic clips whose labels are
known. A generated video passes through the same decoder, so these accuracies bound what `kinema eval` can score for
that model, and they can be measured before any diffusion model is trained on the VAE's latents.
"""

from __future__ import annotations

from typing import Any

LABELS = ("color", "shape", "motion")
DEFAULT_SEED = 9001  # the eval prompt set's synth seed, which training data does not use


def score_reconstructions(model: str, *, count: int = 24, seed: int = DEFAULT_SEED, frames: int = 16,
                          size: int = 64, family: Any = None) -> dict[str, Any]:
    """Encode and decode `count` synth clips (`synth_clip(seed, i, frames, size)`, uint8 `(F, H, W, 3)`) with the
    model's VAE and run the detectors on each reconstruction `(F, 3, H, W)` in [0, 1].

    Returns `{"n", "color_acc", "shape_acc", "motion_acc", "psnr", "settings", "per_clip"}`: the share of clips
    whose detected label is the clip's ground truth (a reconstruction with no object to read counts as wrong on
    all three, its row saying why), the mean PSNR in dB over the clips (pixels in [0, 1]), and what makes the
    figures again (model, clips, synth seed, frames, size, kinema's version). `family` (a loaded VideoFamily) skips
    loading `model`.
    """
    import torch

    from kinema import __version__
    from kinema.data.synth import synth_clip
    from kinema.eval.metrics import video_psnr
    from kinema.eval.run import labels_or_why
    from kinema.pipelines.generation import decode_saved

    if family is None:
        from kinema.pipelines.load import load_family

        family = load_family(model, device="cpu")  # the CPU, as the frames it compares are
    rows: list[dict[str, Any]] = []
    for index in range(count):
        clip = synth_clip(seed, index, frames, size)
        original = torch.from_numpy(clip.frames.copy()).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
        with torch.no_grad():
            rebuilt = decode_saved(family, family.encode_frames(original[None]))[0].clamp(0, 1).cpu()
        truth = {"color": clip.ground_truth["colour"], "shape": clip.ground_truth["shape"],
                 "motion": clip.ground_truth["motion"]}
        detected, problem = labels_or_why(rebuilt)
        rows.append({"index": index, "truth": truth, "detected": detected, "problem": problem,
                     "psnr": video_psnr(rebuilt, original, "the clip")})
    scores: dict[str, Any] = {"n": count}
    for label in LABELS:
        scores[f"{label}_acc"] = sum(row["detected"][label] == row["truth"][label] for row in rows) / count
    scores["psnr"] = sum(row["psnr"] for row in rows) / count
    scores["settings"] = {"model": model, "clips": count, "synth_seed": seed, "frames": frames, "size": size,
                          "kinema_version": __version__}
    scores["per_clip"] = rows
    return scores
