"""One process of a torchrun (gloo, CPU) launch of the shared Trainer, for tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/distributed_worker.py SPEC_JSON

SPEC_JSON: {"reports": folder, "runs": [{"kind": "toy" | "dit" | "ae", "run_dir": ..., "max_steps": N,
            "nans": [[rank, optimizer, step], ...], "overrides": [hydra overrides (dit / ae)]}, ...]}

The runs go one after the other in this process (a Python start with torch is seconds a launch), each as
a fresh process would: new objects from the config, the global RNGs reseeded from the OS, the counts
below reset; what a resumed run continues from is on disk.

- toy: the Trainer on the toy task of test_training.py.
- dit / ae: the whole stage as its tool runs it, `train_dit_from_config` / `train_ae_from_config` on
  conf/train_dit.yaml / conf/train_ae.yaml composed with the overrides (previews are left out).

Each [rank, optimizer, step] of "nans" makes that optimiser's loss NaN once on that rank, at that
step (the Trainer's step counter, which a skipped step does not advance). The task's loss is wrapped
here; the package code is untouched.

Writes <reports>/run<i>-rank<r>.json for the i-th run: the summary, a SHA-1 per tensor of this rank's
final weights (every trained module and the EMA), every loss this rank computed ([optimizer, step, value]
before any NaN), the NaNs injected, and what this rank built of the shared caches: windows it encoded
into latent caches and media files it verified for the dataset index.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from mmldm_ae.engine import latent_cache
from mmldm_ae.engine.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]

# What the current run did on this rank (emptied before each run).
TRAINERS: list[Trainer] = []  # the Trainer of this run, once it has trained
INJECTED: list[list] = []  # [optimizer, step] of each NaN put into this rank's losses
ENCODED: list[int] = []  # windows this rank encoded into a latent cache, per build
INDEXED: list[int] = []  # media files this rank verified for the dataset index, per index build
LOSSES: list[list] = []  # [optimizer, step, value] of each loss, before any NaN
RUN: dict = {}  # the run's "nans" ({(optimizer, step)} on this rank) and "previews" (bool)


def record_builds() -> None:
    """Count the windows encoded (every latent cache encodes through ShardedCache._encode_shards) and
    the files verified for the dataset index by this process."""
    from mmldm_data import dataset

    encode_shards = latent_cache.ShardedCache._encode_shards

    def counted_encode(self, data, encode, out_dir, pending, *args, **kwargs):
        ENCODED.append(sum(shard.count for shard in pending))
        return encode_shards(self, data, encode, out_dir, pending, *args, **kwargs)

    latent_cache.ShardedCache._encode_shards = counted_encode

    build_file_index = dataset.build_file_index

    def counted_index(*args, **kwargs):
        records, verified = build_file_index(*args, **kwargs)
        INDEXED.append(verified)
        return records, verified

    dataset.build_file_index = counted_index


def instrument_trainer() -> None:
    """Wrap the task of every Trainer built from now on: NaN losses at the run's "nans" ([optimizer,
    step]), no previews unless the run's "previews"; and keep the Trainer once it has trained."""
    init, train = Trainer.__init__, Trainer.train

    def instrumented_init(self, task, *args, **kwargs):
        pending = set(RUN["nans"])
        loss = task.loss

        def one_nan(optimizer, batch, step, modules):
            value, numbers = loss(optimizer, batch, step, modules)
            if value is not None:
                LOSSES.append([optimizer, step, value.item()])
            if value is not None and (optimizer, step) in pending:
                pending.discard((optimizer, step))
                INJECTED.append([optimizer, step])
                value = value * float("nan")
            return value, numbers

        task.loss = one_nan
        if not RUN["previews"]:
            task.log_media = lambda logger, step, run_dir: None
        init(self, task, *args, **kwargs)

    def kept_train(self):
        summary = train(self)
        TRAINERS.append(self)
        return summary

    Trainer.__init__, Trainer.train = instrumented_init, kept_train


def weight_digests(trainer: Trainer) -> dict[str, str]:
    def digest(tensor: torch.Tensor) -> str:
        return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    digests = {
        f"{name}.{key}": digest(value)
        for name in trainer.modules
        for key, value in trainer._raw(name).state_dict().items()
    }
    if trainer.ema is not None:
        digests |= {f"ema.{i}": digest(p) for i, p in enumerate(trainer.ema.shadow_params)}
    return digests


def run(kind: str, run_dir: Path, max_steps: int, overrides: list[str]) -> dict:
    if kind == "toy":
        from test_training import NoisyPairs, ToyGanTask, config

        return Trainer(ToyGanTask(), NoisyPairs(), config(max_steps=max_steps), run_dir).train()
    from mmldm_ae.train_ae import train_ae_from_config
    from mmldm_data.config import compose
    from mmldm_dit.config import register_schemas
    from mmldm_dit.train_dit import train_dit_from_config

    register_schemas()
    name, train_stage = {
        "dit": ("train_dit", train_dit_from_config),
        "ae": ("train_ae", train_ae_from_config),
    }[kind]
    settings = [*overrides, f"run_dir={run_dir}", f"train.max_steps={max_steps}"]
    return train_stage(compose(REPO_ROOT / "conf", name, settings))


def main() -> None:
    spec = json.loads(sys.argv[1])
    reports = Path(spec["reports"])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    # oneDNN builds a kernel per new convolution shape (seconds on a CPU): the plain kernels are faster here.
    torch.backends.mkldnn.enabled = False
    record_builds()
    instrument_trainer()
    for index, one in enumerate(spec["runs"]):
        for record in (TRAINERS, INJECTED, ENCODED, INDEXED, LOSSES):
            record.clear()
        RUN["nans"] = {
            (optimizer, step) for nan_rank, optimizer, step in one.get("nans", []) if nan_rank == rank
        }
        RUN["previews"] = one["kind"] == "toy"
        # As a fresh process starts: what a run must reproduce it seeds or restores itself.
        torch.seed()
        np.random.seed()
        random.seed()
        summary = run(one["kind"], Path(one["run_dir"]), one["max_steps"], one.get("overrides", []))
        (trainer,) = TRAINERS
        report = {
            "summary": summary,
            "weights": weight_digests(trainer),
            "injected": INJECTED,
            "encoded": ENCODED,
            "indexed": INDEXED,
            "losses": LOSSES,
        }
        reports.mkdir(parents=True, exist_ok=True)
        (reports / f"run{index}-rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
