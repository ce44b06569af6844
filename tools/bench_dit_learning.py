#!/usr/bin/env python
"""Proof that the DiT learns (issue 4, item 8): train the tiny DiT on the synthetic set for a
bounded CPU time, then read its samples with the synthetic oracles.

    python tools/bench_dit_learning.py --ae-run outputs/runs/ae-synthetic-tiny --minutes 20

Trains (or, when --run-dir already holds a run, continues) the tiny DiT for at most --minutes of
wall clock, then for --clips-per-class dataset windows of every class:
  * a2v accuracy: the oracle class of the generated video equals the conditioning audio's class;
  * v2a accuracy: the oracle class of the generated sound equals the conditioning video's class;
  * svg agreement: joint samples whose video and audio oracle classes agree;
  * the autoencoder's ceiling: the same oracles on decoded real latents (what a perfect DiT reaches).
Chance is 1/K for K classes. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import compose
from mmldm_data.metrics.oracle import read_oracles
from mmldm_data.synthetic import oracle_class_set
from mmldm_data.tasks import Task
from mmldm_dit.config import register_schemas
from mmldm_dit.generate import SampleConfig, decode_media, iterate_samples, load_trained_dit
from mmldm_dit.latents import DiTLatentDataset
from mmldm_dit.train_dit import train_dit_from_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def fraction(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def windows_per_class(cache: DiTLatentDataset, per_class: int) -> list[int]:
    """`per_class` windows of every class, evenly spread over that class's windows."""
    chosen = []
    class_ids = cache.index["class_ids"]
    for class_id in range(len(cache.class_names)):
        windows = [i for i, c in enumerate(class_ids) if c == class_id]
        picks = torch.linspace(0, len(windows) - 1, min(per_class, len(windows))).round().long().tolist()
        chosen += [windows[p] for p in picks]
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ae-run", default="outputs/runs/ae-synthetic-tiny", help="trained tiny autoencoder run"
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget")
    parser.add_argument(
        "--run-dir", default="outputs/bench/dit-learning", help="a new folder measures from scratch"
    )
    parser.add_argument("--clips-per-class", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the DiT")
    parser.add_argument("--ae-steps", type=int, default=25, help="DDIM steps of the autoencoder's decoder")
    parser.add_argument("--guidance", type=float, default=3.0, help="paper Eq. 9 s, both modalities")
    parser.add_argument("--vocoder", default="hifigan-universal")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of conf/train_dit.yaml, e.g. train.lr=1e-3"
    )
    args = parser.parse_args()
    if args.minutes <= 0 or args.clips_per_class < 1:
        parser.error("--minutes must be > 0 and --clips-per-class >= 1")

    with user_errors("bench_dit_learning", TrainingError, VAELoadError, LatentCacheError):
        register_schemas()
        cfg = compose(
            REPO_ROOT / "conf",
            "train_dit",
            [
                f"ae_run={args.ae_run}",
                f"run_dir={args.run_dir}",
                "dit=tiny",
                "train=dit_tiny",
                f"train.max_minutes={args.minutes}",
                "train.max_steps=1000000",
                "train.sample_every=0",
                "preview.samples=1",
                f"preview.vocoder={args.vocoder}",
                *args.overrides,
            ],
        )
        print(
            f"training the tiny DiT for at most {args.minutes:g} min into {args.run_dir} ...", file=sys.stderr
        )
        training = train_dit_from_config(cfg)
        dit = load_trained_dit(args.run_dir)
        cache = DiTLatentDataset(training["latent_cache"])
        chosen = windows_per_class(cache, args.clips_per_class)
        true_names = [cache.class_names[cache.index["class_ids"][w]] for w in chosen]
        dataset = dit.pipeline.dataset
        classes = oracle_class_set(dataset.data_root)  # the set the DiT was trained on

        def read(media) -> tuple[str | None, str | None]:
            reading = read_oracles(media.frames, media.wave, dataset.fps, dataset.mel.sample_rate, classes)
            return reading.class_names(classes)

        started = time.perf_counter()
        common = dict(
            run=args.run_dir,
            num_samples=len(chosen),
            batch_size=len(chosen) // 2 or 1,
            steps=args.steps,
            ae_steps=args.ae_steps,
            guidance_audio=args.guidance,
            guidance_video=args.guidance,
            vocoder=args.vocoder,
        )
        readings = {}
        for task in (Task.a2v, Task.v2a, Task.svg):
            clips = chosen if task.cross_modal else None
            readings[task] = [
                read(media)
                for _, media, _, _ in iterate_samples(dit, SampleConfig(task=task, clips=clips, **common))
            ]
        ceiling = []
        for start in range(0, len(chosen), common["batch_size"]):
            real = [cache.latents(w) for w in chosen[start : start + common["batch_size"]]]
            latents = {
                m: torch.stack([z[i] for z in real])[:, None] for i, m in enumerate(("audio", "video"))
            }
            ceiling += [read(m) for m in decode_media(dit.pipeline, latents, args.ae_steps, args.vocoder)]
        sampling_seconds = time.perf_counter() - started

    results = {
        "a2v_accuracy": fraction(
            [video == truth for (video, _), truth in zip(readings[Task.a2v], true_names, strict=True)]
        ),
        "v2a_accuracy": fraction(
            [audio == truth for (_, audio), truth in zip(readings[Task.v2a], true_names, strict=True)]
        ),
        "svg_class_agreement": fraction(
            [video is not None and video == audio for video, audio in readings[Task.svg]]
        ),
        "ae_ceiling_video": fraction(
            [video == truth for (video, _), truth in zip(ceiling, true_names, strict=True)]
        ),
        "ae_ceiling_audio": fraction(
            [audio == truth for (_, audio), truth in zip(ceiling, true_names, strict=True)]
        ),
        "chance": 1 / len(cache.class_names),
    }
    print(
        f"\n{'metric':<22} {'value':>7}   (K = {len(cache.class_names)} classes, "
        f"{len(chosen)} clips per task)",
        file=sys.stderr,
    )
    for name, value in results.items():
        print(f"{name:<22} {value:>7.3f}", file=sys.stderr)
    print(
        json.dumps(
            results
            | {
                "train_steps": training["step"],
                "train_seconds": training["seconds"],
                "sampling_seconds": round(sampling_seconds, 1),
                "clips_per_task": len(chosen),
                "run_dir": args.run_dir,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
