"""`--device cuda` on a lent GPU (configs/gpu/run.sh): every mode of each bundled model on the GPU and on the CPU
with the same seeds, as one JSON object (the largest frame difference per mode, or the error where a run failed)."""

from __future__ import annotations

import json
import os
import traceback

import torch

from kinema.pipelines.generation import generate
from kinema.pipelines.load import load_family
from kinema.pipelines.request import GenerationRequest


def runs(image: torch.Tensor, video: torch.Tensor) -> dict[str, GenerationRequest]:
    prompt = "a red circle moving right"
    return {"text-to-video": GenerationRequest(prompt=prompt, seeds=[1, 2]),
            "image-to-video": GenerationRequest(prompt=prompt, image=image, seeds=[1]),
            "extend": GenerationRequest(prompt=prompt, video=video, extend_frames=16, seeds=[1]),
            "offload": GenerationRequest(prompt=prompt, seeds=[1], offload=True)}


def main() -> None:
    device = os.environ.get("KINEMA_CHECK_DEVICE", "cuda")  # cpu: this script's own check, on any machine
    found: dict[str, object] = {"device": device, "cuda": torch.cuda.is_available()}
    for model in ("kinema-tiny", "kinema-tiny-ad"):
        cpu = load_family(model, device="cpu")
        gpu = load_family(model, device=device)
        first = generate(cpu, GenerationRequest(prompt="a blue square moving up", seeds=[0]), progress=False)
        image, video = first.frames[0, 0], first.frames[0]
        for name, request in runs(image, video).items():
            try:
                if name == "offload":
                    gpu.to("cpu").offload_device = torch.device(device)
                expected = generate(cpu, request, progress=False).frames
                got = generate(gpu, request, progress=False)
                found[f"{model} {name}"] = {"max_diff": float((got.frames - expected).abs().max()),
                                            "device": got.report["device"]}
            except Exception:  # noqa: BLE001 - every mode is reported, whatever fails
                found[f"{model} {name}"] = {"error": traceback.format_exc(limit=-3)}
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
