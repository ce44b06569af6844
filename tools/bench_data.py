#!/usr/bin/env python
"""Benchmark (not a test): clips/s (16-frame windows) of the data pipeline, decode + letterbox +
mel + audio image.

    python tools/bench_data.py [--windows 48] [--data-root DIR]

Without --data-root it makes a small synthetic set with 256^2 sources in a temporary folder, then
reads the same windows at 64^2 and 256^2 in one process (what one DataLoader worker does).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmldm_data.config import DatasetConfig, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.synthetic import SyntheticConfig, write_synthetic_dataset


def clips_per_second(data_root: Path, resolution: int, num_windows: int) -> float:
    config = to_typed(
        DatasetConfig,
        {
            "data_root": str(data_root),
            "resolution": resolution,
            "mel": {"image_size": resolution},
            "window_stride": 4,
        },
    )
    dataset = SoundingVideoDataset(config)
    count = min(num_windows, len(dataset))
    dataset[0]  # warm-up: filterbank, codec initialisation
    start = time.perf_counter()
    for index in range(count):
        dataset[index]
    return count / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--windows", type=int, default=48, help="windows to time per resolution")
    parser.add_argument(
        "--data-root", type=Path, help="a folder of class folders with videos (default: synthetic)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's view

    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root
        if root is None:
            root = Path(scratch) / "synthetic"
            print("making 12 synthetic clips at 256^2 ...", file=sys.stderr)
            write_synthetic_dataset(
                root, num_clips=12, seed=0, cfg=SyntheticConfig(resolution=256), progress=False
            )
        results = {}
        for resolution in (64, 256):
            results[resolution] = clips_per_second(root, resolution, args.windows)
            print(f"{resolution:>4}^2  {results[resolution]:7.1f} clips/s  (1 thread)", file=sys.stderr)
    print(json.dumps({"clips_per_s": {f"{r}": round(v, 2) for r, v in results.items()}, "threads": 1}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
