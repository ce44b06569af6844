"""Write the synthetic sounding-video dataset (coloured shapes bouncing with class sounds).

    python tools/make_synthetic.py --out data/synthetic --num-clips 600 --seed 0
    python tools/make_synthetic.py --out data/shapes --num-clips 120 --seed 0 --classes shape_timbre

Clips go to OUT/<class_name>/*.mp4 with OUT/metadata.json; a folder holding anything else is
left alone unless --overwrite is given. A folder written by this tool before is replaced.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmldm_data.synthetic import (
    CLASS_NAMES,
    CLASS_SETS,
    COLOUR_PITCH,
    GENERATOR_TAG,
    SyntheticConfig,
    write_synthetic_dataset,
)


def _parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, SyntheticConfig]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--num-clips", type=int, required=True, help="number of clips, spread evenly over the classes"
    )
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--resolution", type=int, default=64, help="frame size in pixels (square)")
    parser.add_argument("--duration", type=float, default=3.2, help="seconds per clip")
    parser.add_argument("--num-classes", type=int, default=len(CLASS_NAMES), help=f"1..{len(CLASS_NAMES)}")
    parser.add_argument(
        "--classes",
        choices=CLASS_SETS,
        default=COLOUR_PITCH,
        help="class set: colour_pitch (hue and pitch) or shape_timbre (shape and timbre only)",
    )
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument("--sample-rate", type=int, default=44100)
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder this tool did not create"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.num_clips < 1:
        parser.error(f"--num-clips must be at least 1, got {args.num_clips}")
    try:
        cfg = SyntheticConfig(
            num_classes=args.num_classes,
            resolution=args.resolution,
            fps=args.fps,
            duration=args.duration,
            sample_rate=args.sample_rate,
            classes=args.classes,
        )
    except ValueError as err:
        parser.error(str(err))
    problem = _output_problem(args.out, args.overwrite)
    if problem:
        parser.error(problem)
    return args, cfg


def _previous_run(out: Path) -> dict | None:
    """The metadata of an earlier run of this tool in ``out``, if there is one."""
    try:
        metadata = json.loads((out / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("generator") == GENERATOR_TAG else None


def _output_problem(out: Path, overwrite: bool) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    if out.is_dir() and any(out.iterdir()) and not overwrite and _previous_run(out) is None:
        return (
            f"--out {out} is not empty and was not written by this tool; "
            "pick another folder or pass --overwrite"
        )
    return None


def _remove_previous_clips(out: Path) -> None:
    """Delete the clips an earlier run listed, so a smaller new run leaves no stale files behind."""
    previous = _previous_run(out)
    if previous is None:
        return
    for clip in previous.get("clips", []):
        (out / clip["path"]).unlink(missing_ok=True)
    for class_name in previous.get("class_names", []):
        folder = out / class_name
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def main(argv: list[str] | None = None) -> None:
    args, cfg = _parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    _remove_previous_clips(args.out)
    summary = write_synthetic_dataset(args.out, args.num_clips, args.seed, cfg, progress=not args.quiet)
    print(
        f"wrote {summary['num_clips']} clips, {summary['num_classes']} classes, "
        f"{summary['total_seconds']:.1f} s of video to {summary['out_dir']} "
        f"in {summary['wall_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
