"""The synthetic benchmark's reference sets and their evaluation (`make demo`, `make synth-bench`,
tools/vae_fvd.py): held-out windows written as mp4s three ways, and every set's report against the
training clips with one protocol and one load of the models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.evaluation.features import load_models
from mmldm_data.evaluation.protocol import EvalProtocol
from mmldm_data.evaluation.report import evaluate
from mmldm_data.evaluation.sources import EvalSets
from mmldm_data.media import write_video
from mmldm_data.video import to_uint8_frames

REFERENCE_SETS = ("real", "shuffled", "swapped")  # held-out clips; frames shuffled; sound of another clip


def write_references(folder: Path, heldout: SoundingVideoDataset, count: int, seed: int) -> dict[str, Path]:
    """`count` held-out windows (evenly spaced) as mp4s three ways: as they are, frames shuffled in time,
    sound of the next window; {set: folder}."""
    rng = np.random.default_rng(seed)
    picks = np.linspace(0, len(heldout) - 1, min(count, len(heldout))).round().astype(int)
    items = [heldout[int(i)] for i in picks]
    config = heldout.config
    folders = {name: folder / name for name in REFERENCE_SETS}
    for path in folders.values():
        path.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(items):
        frames = to_uint8_frames(item["frames"])
        audio = item["audio"].numpy()
        other = items[(index + 1) % len(items)]["audio"].numpy()
        variants = {
            "real": (frames, audio),
            "shuffled": (frames[rng.permutation(len(frames))], audio),
            "swapped": (frames, other),
        }
        for name, (video, sound) in variants.items():
            write_video(
                folders[name] / f"{name}_{index:04d}.mp4", video, config.fps, sound, config.mel.sample_rate
            )
    return folders


def evaluate_sets(
    folder: Path, real_root: Path, sets: dict[str, Path], real_clips: int, batch_size: int = 8
) -> dict:
    """Every set against `real_clips` windows of `real_root` (64^2, aisfx FAD, seed 0), as {set: metrics};
    also written to <folder>/reports.json, the real side's features cached in <folder>/cache."""
    protocol = EvalProtocol(resolution=64, num_clips=real_clips, fad_backends=("aisfx",))
    models = load_models(protocol, "cuda" if torch.cuda.is_available() else "cpu")
    reports = {}
    for name, generated in sets.items():
        print(f"[evaluation] {name}", file=sys.stderr, flush=True)
        report = evaluate(
            EvalSets.scan(real_root, protocol, generated),
            protocol,
            models,
            seeds=[0],
            cache_dir=folder / "cache",
            batch_size=batch_size,
        )
        reports[name] = {
            key: value for key, value in report.items() if key not in ("per_seed", "protocol", "inputs")
        }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reports.json").write_text(json.dumps(reports, indent=1))
    return reports
