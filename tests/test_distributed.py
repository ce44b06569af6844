"""Two processes through torchrun (gloo, CPU): the ranks agree on every step, skip and resume.

The toy task of test_training.py, then the tiny DiT and the tiny autoencoder (with its discriminator)
trained by their stages' own functions, as `accelerate launch tools/train_*.py` runs them: both ranks
end with the same weights, a run stopped mid-way and resumed ends bit for bit where an uninterrupted
one does, a NaN loss on one rank is skipped by both, and the shared caches are built by rank 0 alone.
A test launches once (torch's start is seconds a process); its runs go in turn, each from what its
config and the disk hold (tests/distributed_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, TINY_AE_DATASET

pytestmark = pytest.mark.slow


def launch(tmp_path: Path, *runs: dict) -> list[list[dict]]:
    """The one 2-process launch of a test: tests/distributed_worker.py doing `runs` (see `run`) one after
    the other; each run's reports of rank 0 and 1 (see there)."""
    reports = tmp_path / "reports"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(REPO_ROOT / "tests" / "distributed_worker.py"),
            json.dumps({"reports": str(reports), "runs": list(runs)}),
        ],
        cwd=REPO_ROOT / "tests",
        # MKL's AVX-512 kernels (Intel CPUs) round the last bit by memory alignment, which differs between a
        # straight and a resumed run; its compatible branch is bit-exact, as the AVX2 one (AMD) already is.
        env={**os.environ, "MKL_CBWR": "COMPATIBLE"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [
        [json.loads((reports / f"run{index}-rank{rank}.json").read_text()) for rank in (0, 1)]
        for index in range(len(runs))
    ]


def run(kind: str, run_dir: Path, max_steps: int, nans=(), overrides=()) -> dict:
    """A run of the worker: `kind` trained to `max_steps` in `run_dir` (resumed from there when it holds
    a checkpoint), with NaN losses at `nans` ([rank, optimizer, step])."""
    return {
        "kind": kind,
        "run_dir": str(run_dir),
        "max_steps": max_steps,
        "nans": [list(nan) for nan in nans],
        "overrides": list(overrides),
    }


def agreed(ranks: list[dict], steps: int, skipped: int) -> dict[str, str]:
    """The weights both ranks ended with, after checking that they are the same and the counts."""
    assert [r["summary"]["step"] for r in ranks] == [steps, steps]
    assert [r["summary"]["skipped_steps"] for r in ranks] == [skipped, skipped]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    return ranks[0]["weights"]


def test_two_ranks_agree_resume_exactly_and_skip_a_nan_together(tmp_path):
    straight, _, split, nan = launch(
        tmp_path,
        run("toy", tmp_path / "straight", 6),
        run("toy", tmp_path / "split", 3),
        run("toy", tmp_path / "split", 6),
        run("toy", tmp_path / "nan", 6, nans=[(1, "model", 2)]),  # rank 1's loss is NaN once
    )
    straight = agreed(straight, steps=6, skipped=0)
    assert agreed(split, steps=6, skipped=0) == straight
    assert [r["injected"] for r in nan] == [[], [["model", 2]]]
    assert agreed(nan, steps=6, skipped=1) != straight


def check_two_rank_stage(kind: str, overrides: list[str], nans: list, tmp_path: Path, windows: int) -> None:
    """4 steps straight and 2 + 2 resumed, with the same NaNs (`nans`: [rank, optimizer, step], each
    at a different step, the last at step 3). Each of the two runs starts with a fresh latent cache
    and dataset index, which rank 0 alone builds and the resumed half reuses. (Fresh for both: the
    autoencoder's stage builds its discriminator after the cache, from the global RNG that encoding
    on rank 0 draws from, so a run that builds the cache starts from other weights than one that
    reuses it.)"""

    def stage(run_dir: str, max_steps: int) -> dict:
        caches = [
            f"latent_cache={tmp_path / run_dir / 'latents'}",
            f"dataset.cache_dir={tmp_path / run_dir / 'index'}",
        ]
        return run(kind, tmp_path / run_dir, max_steps, nans, [*overrides, *caches])

    def built(ranks: list[dict]) -> tuple[list, list]:
        """Windows encoded into the latent cache and files verified for the index, per rank."""
        return [r["encoded"] for r in ranks], [sum(r["indexed"]) for r in ranks]

    straight, first, resumed = launch(tmp_path, stage("straight", 4), stage("split", 2), stage("split", 4))
    weights = agreed(straight, steps=4, skipped=len(nans))
    assert [r["injected"] for r in straight] == [[[o, s] for r, o, s in nans if r == rank] for rank in (0, 1)]
    agreed(first, steps=2, skipped=sum(step < 2 for _, _, step in nans))
    # Each rank's losses (before any NaN), then the weights: the resumed run continued bit for bit.
    assert [a["losses"] + b["losses"] for a, b in zip(first, resumed, strict=True)] == [
        r["losses"] for r in straight
    ]
    assert agreed(resumed, steps=4, skipped=len(nans)) == weights
    # Rank 0 encoded every window and verified every file; rank 1 waited for them and reused them.
    assert built(straight) == built(first) == ([[windows], []], [12, 0])
    assert built(resumed) == ([[], []], [0, 0])


def test_tiny_dit_on_two_ranks(synthetic_root, tiny_ae_run, tmp_path):
    overrides = [
        f"ae_run={tiny_ae_run}",
        f"data_root={synthetic_root}",
        f"dataset.resolution={TINY_AE_DATASET['resolution']}",
        f"dataset.mel.image_size={TINY_AE_DATASET['mel']['image_size']}",
        f"dataset.window_stride={TINY_AE_DATASET['window_stride']}",
        "train.batch_size=4",
        "train.warmup_steps=0",
        "train.log_every=1",
    ]
    check_two_rank_stage("dit", overrides, [(1, "dit", 3)], tmp_path, windows=36)


def test_tiny_autoencoder_with_its_discriminator_on_two_ranks(synthetic_root, tiny_ae_run, tmp_path):
    resolution = TINY_AE_DATASET["resolution"]
    overrides = [
        f"data_root={synthetic_root}",
        f"vae.weights={tiny_ae_run.parent / 'vae'}",  # the fixture's tiny VAE (16x16 latents)
        f"dataset.resolution={resolution}",
        f"dataset.mel.image_size={resolution}",
        f"dataset.window_stride={TINY_AE_DATASET['window_stride']}",
        f"ae.resolution={resolution}",
        "ae.vae_downsample=2",
        "ae.adversarial=true",
        "preview_clips=1",
        "train.batch_size=2",
        "train.warmup_steps=0",
        "train.log_every=1",
    ]
    nans = [(1, "autoencoder", 1), (0, "discriminator", 3)]
    check_two_rank_stage("ae", overrides, nans, tmp_path, windows=36)
