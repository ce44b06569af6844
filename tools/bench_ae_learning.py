#!/usr/bin/env python
"""Benchmark (not a test): does the tiny autoencoder learn on the synthetic set within a CPU budget?

    python tools/bench_ae_learning.py --minutes 20          # after `make train-vae DATASET=synthetic`

Trains stage 1 from scratch on the training split (80% of the synthetic files) for at most
--minutes of wall time, and measures on held-out clips (the other 20%), before and after:
PSNR of the decoded frames, log-mel L1 of the decoded audio (over the audio image's range), the
classification head's accuracy (chance 1/6), and how often the synthetic oracles read the right
class from the decoded frames and sound: the ceiling of any generator on this autoencoder.
Prints a table and one JSON line, and writes <run-dir>/learning.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.pipeline import reconstruction_metrics
from mmldm_ae.train_ae import build_ae_training
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import DatasetConfig, compose, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_dit.config import register_schemas

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget")
    parser.add_argument("--vae", default="outputs/runs/vae-synthetic-tiny/vae", help="the stage-0 VAE folder")
    parser.add_argument("--data-root", default="data/synthetic")
    parser.add_argument("--run-dir", type=Path, default=Path("outputs/bench/ae-learning"))
    parser.add_argument("--eval-clips", type=int, default=24, help="held-out clips measured before and after")
    parser.add_argument(
        "--eval-steps", type=int, default=25, help="DDIM steps of the measured reconstructions"
    )
    parser.add_argument("--vocoder", default="hifigan-universal", help="vocoder of the audio oracle's sound")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides of conf/train_ae.yaml")
    args = parser.parse_args()

    with user_errors("bench_ae_learning", TrainingError, VAELoadError):
        shutil.rmtree(args.run_dir, ignore_errors=True)  # always from scratch: step 0 is part of the result
        register_schemas()
        cfg = compose(
            CONF_DIR,
            "train_ae",
            [
                f"data_root={args.data_root}",
                f"vae.weights={args.vae}",
                f"run_dir={args.run_dir}",
                "dataset.split=train",
                "dataset.val_fraction=0.2",
                f"train.max_minutes={args.minutes}",
                "train.max_steps=1000000",
                "train.sample_every=0",
                *args.overrides,
            ],
        )
        training = build_ae_training(cfg)
        held_out = to_typed(DatasetConfig, to_plain_dict(training.pipeline.dataset) | {"split": "val"})
        val = SoundingVideoDataset(held_out, return_all_frames=True)
        indices = torch.linspace(0, len(val) - 1, min(args.eval_clips, len(val))).long().tolist()
        measure = lambda: reconstruction_metrics(
            training.pipeline, val, indices, steps=args.eval_steps, oracle_vocoder=args.vocoder
        )

        training.pipeline.model.eval()
        before = measure()
        started = time.perf_counter()
        summary = training.trainer.train()
        minutes = (time.perf_counter() - started) / 60
        training.pipeline.model.eval()
        after = measure()

    rows = [
        ("PSNR of decoded frames (dB)", "psnr"),
        ("log-mel L1 of decoded audio", "logmel_l1"),
        ("class accuracy (chance 0.167)", "class_accuracy"),
        ("video oracle reads the class from decoded frames", "video_oracle_accuracy"),
        ("audio oracle reads the class from decoded sound", "audio_oracle_accuracy"),
    ]
    print(
        f"\n{len(indices)} held-out clips, {summary['step']} steps in {minutes:.1f} min "
        f"({len(training.pixels)} training windows)\n"
    )
    print("| metric | step 0 | end |\n|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {before[key]:.3f} | {after[key]:.3f} |")
    result = {
        "steps": summary["step"],
        "minutes": round(minutes, 1),
        "held_out_clips": len(indices),
        "before": before,
        "after": after,
        "run_dir": str(args.run_dir),
    }
    (args.run_dir / "learning.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
