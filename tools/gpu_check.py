#!/usr/bin/env python
"""GPU check: the paper presets in bf16, a few training steps of every stage, then samples.

    python tools/gpu_check.py                       # paper presets: SD-size VAE and autoencoder, DiT-S
    python tools/gpu_check.py --dit B --steps 10
    python tools/gpu_check.py --tiny --steps 2      # the same chain at the CPU presets (a dry run)

Runs the real tools one after another on a small synthetic set made at 256^2 (random initial
weights: nothing is downloaded): stage 0 (KL-VAE), stage 1 (autoencoder, pixels encoded on the
fly), the DiT and the long-video DiT (each from its latent cache), then one svg sample, one a2v
sample and one long sample (10 clips, 160 frames). Every stage runs in its own process, so each
peak-memory figure is that stage's alone. Ends with a table (wall time of the stage, the last
training step's time and throughput, peak GPU memory) and the same as one JSON line.

tools/bench_gpu.py is the other GPU tool: timings of the parts in one process, against a plain build.
This one checks that the real tools run end to end on the GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mmldm_data.config import preset
from mmldm_data.tasks import Task
from mmldm_dit.config import register_schemas

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@dataclass
class StageResult:
    stage: str
    ok: bool
    wall_s: float
    step_ms: float | None = None  # last optimiser step (training stages)
    samples_per_s: float | None = None
    peak_mem_gb: float | None = None
    note: str = ""


def run_stage(name: str, command: list[str], log_dir: Path) -> tuple[StageResult, dict | None]:
    """Run one tool; the tools end with a JSON summary line. Their other output goes to
    <log_dir>/<name>.log."""
    print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with (log_dir / f"{name}.log").open("w") as log:
        finished = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.perf_counter() - started
    lines = finished.stdout.strip().splitlines()
    if finished.returncode != 0:
        tail = (log_dir / f"{name}.log").read_text().strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        return StageResult(
            name, False, round(wall, 1), note=f"exit {finished.returncode}; see {name}.log"
        ), None
    try:
        summary = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        summary = None
    print(f"   done in {wall:.1f} s", file=sys.stderr, flush=True)
    return StageResult(name, True, round(wall, 1)), summary


def training_result(result: StageResult, summary: dict | None, batch_size: int) -> StageResult:
    if summary is not None:
        last = summary.get("last", {})
        if last.get("samples_per_s"):
            result.samples_per_s = round(last["samples_per_s"], 2)
            result.step_ms = round(1000 * batch_size / last["samples_per_s"], 1)
        result.peak_mem_gb = round(last.get("peak_mem_gb", 0.0), 2)
    return result


def sampling_result(result: StageResult, summary: dict | None) -> StageResult:
    if summary is not None:
        result.peak_mem_gb = summary.get("peak_mem_gb")
        result.note = (
            f"{summary['samples']} x {summary['frames_per_sample']} frames, "
            f"{summary['seconds_per_sample']} s/sample"
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/gpu_check"), help="data, runs, samples, logs"
    )
    parser.add_argument(
        "--steps", type=int, default=5, help="training steps per stage (the last one is timed)"
    )
    parser.add_argument("--dit", default="S", help="DiT preset (conf/dit/)")
    parser.add_argument("--tiny", action="store_true", help="CPU presets at 64^2 (a dry run of this script)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    parser.add_argument(
        "--ae-batch",
        type=int,
        default=None,
        help="autoencoder clips per step (default 8: the paper's 20 do not fit 80 GB in one step)",
    )
    parser.add_argument(
        "--dit-batch", type=int, default=None, help="DiT clips per step (default: dit_paper's)"
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    register_schemas()
    vae_preset, ae_preset, dit = ("tiny", "tiny", "tiny") if args.tiny else ("sd", "paper", args.dit)
    resolution = preset(CONF_DIR, "ae", ae_preset).resolution
    if args.tiny:  # a dry run: a few clips per step
        batch = {"vae": 2, "ae": 2, "dit": 4}
    else:  # the paper presets' batches, but 8 autoencoder clips in one step (its 20 do not fit 80 GB)
        batch = {
            "vae": preset(CONF_DIR, "train", "vae_sd").batch_size,
            "ae": 8,
            "dit": preset(CONF_DIR, "train", "dit_paper").batch_size,
        }
    batch["ae"] = args.ae_batch or batch["ae"]
    batch["dit"] = args.dit_batch or batch["dit"]
    tool = [sys.executable]
    data = [
        f"data_root={out / 'data'}",
        f"dataset.resolution={resolution}",
        f"dataset.mel.image_size={resolution}",
        "dataset.window_stride=4",
    ]
    common = [
        f"train.max_steps={args.steps}",
        "train.grad_accum=1",
        "train.log_every=1",
        f"train.precision={args.precision}",
        "train.resume=false",
        "wandb.mode=disabled",
    ]
    previews = ["preview_clips=1", "preview_steps=10", "vocoder=griffinlim"]
    dit_previews = [
        "preview.samples=1",
        "preview.steps=10",
        "preview.ae_steps=10",
        "preview.vocoder=griffinlim",
    ]
    results: list[StageResult] = []

    result, _ = run_stage(
        "data",
        [
            *tool,
            "tools/make_synthetic.py",
            "--out",
            str(out / "data"),
            "--num-clips",
            "12",
            "--seed",
            "0",
            "--resolution",
            str(resolution),
            "--quiet",
        ],
        logs,
    )
    results.append(result)
    train = "tiny" if args.tiny else "paper"
    stages = [  # name, batch size, command
        (
            "vae",
            batch["vae"],
            ["tools/train_vae.py", f"vae={vae_preset}", f"train=vae_{vae_preset}", f"run_dir={out / 'vae'}"],
        ),
        (
            "autoencoder",
            batch["ae"],
            [
                "tools/train_ae.py",
                f"vae={vae_preset}",
                f"vae.weights={out / 'vae' / 'vae'}",
                f"ae={ae_preset}",
                f"train=ae_{train}",
                f"run_dir={out / 'ae'}",
                *previews,
            ],
        ),
        (
            "dit",
            batch["dit"],
            [
                "tools/train_dit.py",
                f"dit={dit}",
                f"train=dit_{train}",
                f"ae_run={out / 'ae'}",
                f"run_dir={out / 'dit'}",
                *dit_previews,
            ],
        ),
        (
            "dit_long",
            batch["dit"],
            [
                "tools/train_dit.py",
                "--config-name",
                "train_dit_long",
                f"dit={dit}",
                f"train=dit_{train}",
                f"ae_run={out / 'ae'}",
                f"run_dir={out / 'dit_long'}",
                *dit_previews,
            ],
        ),
    ]
    for name, batch_size, command in stages:
        if not all(r.ok for r in results):
            results.append(StageResult(name, False, 0.0, note="skipped: an earlier stage failed"))
            continue
        result, summary = run_stage(
            name, [*tool, *command, *data, *common, f"train.batch_size={batch_size}"], logs
        )
        results.append(training_result(result, summary, batch_size))

    sampling = [
        "steps=50",
        "vocoder=griffinlim",
        "num_samples=1",
        "batch_size=1",
        f"out_dir={out / 'samples'}",
    ]
    for task in (Task.svg, Task.a2v, Task.long):
        run = "dit_long" if task.needs_long_model else "dit"
        name = f"sample_{task}"
        if not next(r for r in results if r.stage == run).ok:
            results.append(StageResult(name, False, 0.0, note=f"skipped: {run} failed"))
            continue
        extra = ["num_clips=10"] if task.needs_long_model else []
        result, summary = run_stage(
            name, [*tool, "tools/sample.py", f"run={out / run}", f"task={task}", *sampling, *extra], logs
        )
        results.append(sampling_result(result, summary))

    header = f"{'stage':<12} {'ok':<3} {'wall s':>8} {'step ms':>9} {'samples/s':>10} {'peak GB':>8}  note"
    print(header)
    for r in results:
        cells = [
            f"{r.step_ms:.1f}" if r.step_ms is not None else "-",
            f"{r.samples_per_s:.2f}" if r.samples_per_s is not None else "-",
            f"{r.peak_mem_gb:.2f}" if r.peak_mem_gb is not None else "-",
        ]
        print(
            f"{r.stage:<12} {'yes' if r.ok else 'NO':<3} {r.wall_s:>8.1f} "
            f"{cells[0]:>9} {cells[1]:>10} {cells[2]:>8}  "
            f"{r.note}"
        )
    failed = [r.stage for r in results if not r.ok]
    print(
        f"{'all stages ran' if not failed else 'FAILED: ' + ', '.join(failed)}; logs in {logs}",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "presets": {"vae": vae_preset, "ae": ae_preset, "dit": dit},
                "precision": args.precision,
                "batch": batch,
                "steps": args.steps,
                "stages": [asdict(r) for r in results],
            }
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
