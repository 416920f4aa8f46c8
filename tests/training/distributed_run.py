"""One process of a multi-process training run, for tests/training/test_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 tests/training/distributed_run.py CFG PREFIX

(on CPUs; accelerate 1.15's `--cpu --num_processes 2` starts one process, see test_distributed.py)

Each process runs `kinema.training.trainer.train` on the config CFG and writes, in PREFIX's folder:
    PREFIX-rank{R}.safetensors  its trained weights (`TrainResult.task.trainable_state()`)
    PREFIX-rank{R}.json         rank, world size, is_main, losses, and which writes it made (checkpoint steps, exports)

Setting KINEMA_TEST_UNWRAPPED=1 makes `Accelerator.prepare` hand back its arguments as they are: no DDP, so each
process trains on its own gradients alone. The test uses it to show that the weight comparison would catch processes
that do not average their gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _unwrapped_prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
    return args[0] if len(args) == 1 else args


def main(argv: list[str] | None = None) -> int:
    """Train as the config says and record what this process ended with."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the training config YAML")
    parser.add_argument("prefix", help="output path prefix: PREFIX-rank{R}.safetensors and PREFIX-rank{R}.json")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    import kinema.training.trainer as trainer
    from kinema.training.config import load_config

    if os.environ.get("KINEMA_TEST_UNWRAPPED") == "1":
        import accelerate

        accelerate.Accelerator.prepare = _unwrapped_prepare  # type: ignore[method-assign]

    # Spy on the trainer's writes: which process saves checkpoints and exports, and at which steps.
    writes: dict[str, list[Any]] = {"checkpoints": [], "exports": []}
    save_checkpoint, export = trainer._save_checkpoint, trainer._export

    def spied_save_checkpoint(run: Any, step: int, *rest: Any) -> Any:
        writes["checkpoints"].append(step)
        return save_checkpoint(run, step, *rest)

    def spied_export(*rest: Any) -> Any:
        target = export(*rest)
        writes["exports"].append(str(target))
        return target

    trainer._save_checkpoint = spied_save_checkpoint
    trainer._export = spied_export

    result = trainer.train(load_config(args.config), progress=False)
    from accelerate import PartialState

    state_of_processes = PartialState()
    rank = state_of_processes.process_index
    state = {name: tensor.detach().contiguous().clone() for name, tensor in result.task.trainable_state().items()}
    save_file(state, f"{args.prefix}-rank{rank}.safetensors")
    record = {"rank": rank, "world": state_of_processes.num_processes, "is_main": result.is_main,
              "losses": result.losses, "start_step": result.start_step, "end_step": result.end_step,
              "final": str(result.final) if result.final else None, **writes}
    Path(f"{args.prefix}-rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
