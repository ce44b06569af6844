#!/usr/bin/env python
"""How the autoencoder's signal decoder degrades with fewer steps, per sampler, against 50 DDIM steps.

    python tools/bench_decoder_steps.py outputs/runs/ae-synthetic-tiny --num-clips 32 \\
        --out docs/decoder_steps.json

Every row reconstructs the same clips (encode -> decode -> KL-VAE -> vocoder) and measures rFVD
(I3D features of the decoded frames against the inputs'), log-mel L1 of the decoded audio, PSNR
of the decoded frames, the synthetic oracles' class accuracy of the decoded frames and sound, and
the decoding time per clip. The reference is DDIM at 50 steps (--reference-steps), decoded with
--reference-seeds noise seeds: their spread is the noise floor of the comparison. A row passes when rFVD and
log-mel L1 are at most (1 + tolerance) x the reference's and both oracle accuracies at least
(1 - tolerance) x; the recommendation is the passing row of fewest UNet evaluations (steps, plus
the guided steps' unconditional branch). Writes the JSON report and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmldm_ae.engine.diffusion import SAMPLERS
from mmldm_ae.pipeline import PRECISIONS, load_autoencoder, reconstruction_metrics
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import collate, user_errors
from mmldm_data.config import ConfigError, DatasetConfig, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.metrics.i3d import i3d_features, load_i3d

PROGRAM = "bench_decoder_steps"
METRICS = ("rfvd", "logmel_l1", "psnr", "class_accuracy", "video_oracle_accuracy", "audio_oracle_accuracy")
METRICS += ("decode_seconds_per_clip",)
LOWER_BETTER = ("rfvd", "logmel_l1")
HIGHER_BETTER = ("video_oracle_accuracy", "audio_oracle_accuracy")
COLUMNS = (
    ("rFVD", "rfvd", "{:.1f}"),
    ("log-mel L1", "logmel_l1", "{:.3f}"),
    ("PSNR dB", "psnr", "{:.2f}"),
    ("video oracle", "video_oracle_accuracy", "{:.2f}"),
    ("audio oracle", "audio_oracle_accuracy", "{:.2f}"),
    ("decode s/clip", "decode_seconds_per_clip", "{:.3f}"),
)


def numbers(text: str, kind: type) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a comma list of {kind.__name__}, got {text!r}") from error


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", nargs="?", help="run_dir of tools/train_ae.py, or one of its checkpoints/step_* folders"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="REPORT",
        help="instead of measuring: one report of reports measured in parallel (same run and clips; "
        "their references, of other seeds, are averaged)",
    )
    parser.add_argument("--num-clips", type=int, default=32)
    parser.add_argument("--steps", type=lambda t: numbers(t, int), default=[25, 20, 15, 10, 8])
    parser.add_argument("--samplers", type=lambda t: numbers(t, str), default=["dpmsolver++", "unipc"])
    parser.add_argument(
        "--guidance-fractions",
        type=lambda t: numbers(t, float),
        default=[1.0],
        help="guidance on the first fraction of the steps (ae.decode_guidance_fraction); default 1.0",
    )
    parser.add_argument("--reference-steps", type=int, default=50, help="DDIM steps of the reference")
    parser.add_argument("--reference-seeds", type=int, default=2, help="noise seeds of the reference")
    parser.add_argument("--tolerance", type=float, default=0.1)
    parser.add_argument("--vocoder", default="hifigan-universal")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="default: bf16 where native (CUDA, AMX CPUs), else fp32"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference-run",
        help="the run that decodes the reference (default: run), e.g. a distilled run's teacher",
    )
    parser.add_argument("--data-root", help="read clips from here instead of the run's dataset folder")
    parser.add_argument("--out", type=Path, default=Path("docs/decoder_steps.json"))
    args = parser.parse_args(argv)
    if (args.run is None) == (args.merge is None):
        parser.error("give a run to measure, or --merge REPORT ...")
    unknown = sorted(set(args.samplers) - set(SAMPLERS))
    if unknown:
        parser.error(f"--samplers: unknown {unknown}; choose from {list(SAMPLERS)}")
    if args.num_clips < 2:
        parser.error(f"--num-clips must be >= 2 (rFVD needs a covariance), got {args.num_clips}")
    if any(s < 1 for s in [*args.steps, args.reference_steps]) or not all(
        0.0 <= f <= 1.0 for f in args.guidance_fractions
    ):
        parser.error("--steps must be >= 1 and --guidance-fractions in [0, 1]")
    if args.reference_seeds < 1:
        parser.error(f"--reference-seeds must be >= 1, got {args.reference_seeds}")
    return args


def verdict(row: dict, reference: dict, tolerance: float) -> dict[str, bool]:
    checks = {name: row[name] <= (1 + tolerance) * reference[name] for name in LOWER_BETTER}
    checks |= {name: row[name] >= (1 - tolerance) * reference[name] for name in HIGHER_BETTER}
    return checks


def mean_rows(rows: list[dict]) -> dict:
    """Metric means of the reference rows (settings are those of the first)."""
    means = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0] if key in METRICS}
    return rows[0] | means


def build_report(references: list[dict], rows: list[dict], tolerance: float, facts: dict) -> dict:
    """Rows judged against the mean of the reference rows, and the cheapest row within the bar."""
    reference = mean_rows(references)
    for row in rows:
        row["checks"] = verdict(row, reference, tolerance)
    passing = [row for row in rows if all(row["checks"].values())]
    best = min(passing, key=lambda row: row["unet_evaluations"], default=None)
    return facts | {
        "tolerance": tolerance,
        "reference_seeds": len(references),
        "reference_per_seed": references,
        "rows": [reference | {"reference": True}, *rows],
        "recommended": best
        and {
            key: best[key]
            for key in ("sampler", "steps", "guidance_fraction", "guided_steps", "unet_evaluations")
        },
    }


def merge(paths: list[Path], tolerance: float) -> dict:
    reports = [json.loads(path.read_text()) for path in paths]
    facts = {key: reports[0][key] for key in ("run", "reference_run", "clips", "device", "precision")}
    different = [
        str(p) for p, r in zip(paths, reports, strict=True) if any(r[k] != v for k, v in facts.items())
    ]
    if different:
        raise ConfigError(
            f"--merge: {different} measured another run, clip count or precision than {paths[0]}"
        )
    references = [row for report in reports for row in report["reference_per_seed"]]
    rows = [{k: v for k, v in row.items() if k != "checks"} for r in reports for row in r["rows"][1:]]
    rows.sort(key=lambda row: (row["sampler"], -row["steps"], -row["guidance_fraction"]))
    facts |= {"commands": [r["command"] for r in reports], "seconds": max(r["seconds"] for r in reports)}
    return build_report(references, rows, tolerance, facts)


def markdown(report: dict) -> str:
    header = "| sampler | steps | guided steps | " + " | ".join(c[0] for c in COLUMNS) + " | within bar |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 4)]
    for row in report["rows"]:
        cells = [fmt.format(row[key]) for _, key, fmt in COLUMNS]
        passed = "reference" if row.get("reference") else ("yes" if all(row["checks"].values()) else "no")
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['guided_steps']} | "
            + " | ".join(cells)
            + f" | {passed} |"
        )
    best = report["recommended"]
    lines.append("")
    lines.append(
        f"{report['clips']} clips, {report['precision']} on {report['device']}; "
        f"reference DDIM {report['rows'][0]['steps']} steps, "
        f"mean of {report['reference_seeds']} noise seeds. Bar: rFVD and log-mel L1 <= "
        f"{1 + report['tolerance']:g} x reference, oracle accuracies >= {1 - report['tolerance']:g} x."
    )
    lines.append(
        "Recommended: "
        + (
            f"{best['sampler']}, {best['steps']} steps ({best['guided_steps']} of them guided)"
            if best
            else "none of the rows is within the bar"
        )
    )
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace, argv: list[str]) -> dict:
    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline = load_autoencoder(args.run, device=device, precision=args.precision)
    reference_pipeline = (
        load_autoencoder(args.reference_run, device=device, precision=args.precision)
        if args.reference_run
        else pipeline
    )
    precision = "bf16" if pipeline.model_dtype == torch.bfloat16 else "fp32"
    overrides = {"data_root": args.data_root} if args.data_root else {}
    config = to_typed(DatasetConfig, to_plain_dict(pipeline.dataset) | overrides)
    dataset = SoundingVideoDataset(config, return_all_frames=True)
    if len(dataset) < args.num_clips:
        raise ConfigError(f"{config.data_root} has {len(dataset)} windows, fewer than --num-clips")
    indices = torch.linspace(0, len(dataset) - 1, args.num_clips).long().tolist()
    print(f"{PROGRAM}: I3D features of {len(indices)} input clips ...", file=sys.stderr, flush=True)
    i3d = load_i3d(device=device)
    real = i3d_features(i3d, torch.stack([dataset[i]["frames"] for i in indices]), args.batch_size)

    # First calls build kernels (oneDNN on a CPU, CUDA): one untimed decode of both batch shapes
    # (guided and not) keeps that out of the first row's time.
    warm = collate([dataset[i] for i in indices[: args.batch_size]])
    for measured in {id(p): p for p in (pipeline, reference_pipeline)}.values():
        z_v, z_a = measured.encode_clips(warm)
        measured.model.decode(z_v, z_a, config.num_frames, steps=2, guidance_fraction=0.5)

    reference_seeds = range(args.seed, args.seed + args.reference_seeds)
    settings = [("ddim", args.reference_steps, 1.0, seed) for seed in reference_seeds]
    settings += [
        (sampler, steps, fraction, args.seed)
        for sampler in args.samplers
        for steps in args.steps
        for fraction in args.guidance_fractions
    ]
    rows = []
    for number, (sampler, steps, fraction, seed) in enumerate(settings, 1):
        started = time.perf_counter()
        measured = reference_pipeline if number <= args.reference_seeds else pipeline
        base = measured.model.cfg
        measured.model.cfg = replace(
            base, decode_sampler=sampler, decode_steps=steps, decode_guidance_fraction=fraction
        )
        metrics = reconstruction_metrics(
            measured,
            dataset,
            indices,
            batch_size=args.batch_size,
            seed=seed,
            oracle_vocoder=args.vocoder,
            i3d=i3d,
            real_features=real,
        )
        measured.model.cfg = base
        guided = base.guidance_audio != 0.0 or base.guidance_video != 0.0
        guided_steps = round(fraction * steps) if guided else 0
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "guidance_fraction": fraction,
                "guided_steps": guided_steps,
            }
            # UNet evaluations per decode, in units of one unguided step
            | {"unet_evaluations": steps + guided_steps, "seed": seed}
            | metrics
        )
        elapsed = time.perf_counter() - began
        eta = (time.perf_counter() - started) * (len(settings) - number)
        print(
            f"[{number}/{len(settings)}] {sampler} {steps} steps (guided {fraction:g}): "
            f"rFVD {metrics['rfvd']:.1f}, log-mel L1 {metrics['logmel_l1']:.3f}, "
            f"oracles {metrics['video_oracle_accuracy']:.2f}/{metrics['audio_oracle_accuracy']:.2f} "
            f"({elapsed:.0f} s, about {eta:.0f} s left)",
            file=sys.stderr,
            flush=True,
        )

    facts = {
        "run": str(args.run),
        "reference_run": str(args.reference_run or args.run),
        "clips": len(indices),
        "device": device,
        "precision": precision,
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "seconds": round(time.perf_counter() - began, 1),
    }
    return build_report(rows[: args.reference_seeds], rows[args.reference_seeds :], args.tolerance, facts)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with user_errors(PROGRAM, VAELoadError):
        report = merge(args.merge, args.tolerance) if args.merge else measure(args, argv)
    table = markdown(report)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({report['seconds']} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
