#!/usr/bin/env python
"""Round-trip clips through a trained autoencoder and write them beside the originals.

    python tools/reconstruct.py outputs/runs/ae-synthetic-tiny --num-clips 4 --out outputs/reconstructions

For each clip: an mp4 with the input on the left, the reconstruction on the right and the
reconstructed sound (through the vocoder), and a contact sheet of frames and spectrograms. Ends
with one JSON line: PSNR of the decoded frames, log-mel L1 of the decoded audio, the
classification head's accuracy on these clips, and with --oracles (synthetic data) how often the
oracles read the decoded frames and sound as the clip's class, how far the decoded bounces lie
from the clip's own sound onsets (median, frames; the input frames' figure beside it) and how far
the decoded object lies from the input's, frame by frame (beside an object held still).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mmldm_ae.pipeline import load_autoencoder, reconstruction_metrics, write_reconstructions
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import collate, user_errors
from mmldm_data.config import DatasetConfig, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="run_dir of tools/train_ae.py, or one of its checkpoints/step_* folders"
    )
    parser.add_argument("--num-clips", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("outputs/reconstructions"))
    parser.add_argument(
        "--steps", type=int, default=None, help="DDIM steps (default: the run's ae.decode_steps)"
    )
    parser.add_argument("--data-root", help="read clips from here instead of the run's dataset folder")
    parser.add_argument(
        "--split", choices=["all", "train", "val"], help="which split of the dataset to draw from"
    )
    parser.add_argument("--vocoder", default="hifigan-universal")
    parser.add_argument(
        "--oracles",
        action="store_true",
        help="synthetic data: also how often the oracles read the decoded frames / sound as the clip's class",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_clips < 1:
        parser.error(f"--num-clips must be >= 1, got {args.num_clips}")

    with user_errors("reconstruct", VAELoadError):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipeline = load_autoencoder(args.checkpoint, device=device)
        overrides = {"data_root": args.data_root} if args.data_root else {}
        if args.split:
            overrides["split"] = args.split
        config = to_typed(DatasetConfig, to_plain_dict(pipeline.dataset) | overrides)
        dataset = SoundingVideoDataset(config, return_all_frames=True)
        count = min(args.num_clips, len(dataset))
        indices = torch.linspace(0, len(dataset) - 1, count).long().tolist()
        print(f"reconstructing {count} clips of {config.data_root} ...", file=sys.stderr)
        written = write_reconstructions(
            pipeline,
            collate([dataset[i] for i in indices]),
            args.out,
            steps=args.steps,
            vocoder=args.vocoder,
            seed=args.seed,
        )
        metrics = reconstruction_metrics(
            pipeline,
            dataset,
            indices,
            steps=args.steps,
            seed=args.seed,
            oracle_vocoder=args.vocoder if args.oracles else None,
        )
    print(
        f"wrote {len(written.videos)} side-by-side mp4s and contact_sheet.png to {args.out}", file=sys.stderr
    )
    print(json.dumps(metrics | {"out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
