"""One process of a torchrun (gloo) run of the shared Trainer on the toy task of test_training.py.

    torchrun --nproc_per_node 2 tests/distributed_worker.py RUN_DIR MAX_STEPS [NAN_RANK NAN_STEP]

Writes <RUN_DIR>/rank<r>.json: the summary and this rank's final weights (as lists).
With NAN_RANK / NAN_STEP, that rank's model loss is NaN once, at that step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from test_training import NoisyPairs, ToyGanTask, config

from mmldm_ae.engine.trainer import Trainer


class OneNan(ToyGanTask):
    def __init__(self, at_step: int | None):
        super().__init__()
        self.at_step = at_step

    def loss(self, optimizer, batch, step, modules):
        loss, numbers = super().loss(optimizer, batch, step, modules)
        if optimizer == "model" and step == self.at_step:
            self.at_step = None
            loss = loss * float("nan")
        return loss, numbers


def main() -> None:
    run_dir, max_steps = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ["RANK"])
    nan_step = int(sys.argv[4]) if len(sys.argv) > 4 and int(sys.argv[3]) == rank else None
    torch.set_num_threads(1)
    trainer = Trainer(OneNan(nan_step), NoisyPairs(), config(max_steps=max_steps), run_dir)
    summary = trainer.train()
    weights = {
        f"{name}.{key}": value.tolist()
        for name in ("model", "critic")
        for key, value in trainer._raw(name).state_dict().items()
    }
    (run_dir / f"rank{rank}.json").write_text(json.dumps({"summary": summary, "weights": weights}))


if __name__ == "__main__":
    main()
