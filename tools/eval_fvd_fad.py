#!/usr/bin/env python
"""Compare generated sounding videos with real ones: FVD, KVD, FAD, AV-Align and, on the synthetic
dataset, the oracle figures. Offline: every network reads local weights.

    python tools/eval_fvd_fad.py --generated samples/ --real data/landscape
    python tools/eval_fvd_fad.py --generated samples/ --real dataset=landscape data_root=/data/landscape \\
        --num-clips 2048 --seed 0 --repeats 3 --resolution 64 --out results/landscape.json
    python tools/eval_fvd_fad.py --generated samples/ --real dataset=synthetic \\
        --fad-backends aisfx,vggish --fad-weights vggish=/weights/vggish-10086976.pth
    python tools/eval_fvd_fad.py --recon AE_RUN_DIR --real dataset=synthetic  # rFVD / rKVD / rFAD

--real takes a folder or dataset=NAME (a conf/dataset preset; further key=value arguments are
Hydra overrides such as data_root=PATH, and the preset's fps and clip length apply). Generated
folder: one clip per video file (its first 16 frames); an optional conditions.json there,
{"<relative path>": {"task": "a2v"|"v2a", "class": "<class name>"}}, adds a2v / v2a oracle accuracy.
FAD backends: aisfx (default, weights in the PyPI wheel; NOT comparable to published FAD), vggish
and audioclip (weights from --fad-weights NAME=PATH, $MMLDM_<NAME>_WEIGHTS or ~/.cache/mmldm/weights).

Prints a markdown table. With --out FILE.json writes the JSON report there and the table beside it
(FILE.md); without, the JSON follows the table on stdout. Progress goes to stderr. Real-set
features are cached (~/.cache/mmldm/eval or $MMLDM_CACHE/eval): a second run against the same real
clips skips them. Exit status 2 with a message on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mmldm_ae.pipeline import PRECISIONS, load_reconstructor
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import ConfigError, compose, dataset_config_from, register_schemas
from mmldm_data.evaluation import (
    RESOLUTIONS,
    EvalProtocol,
    EvalSets,
    EvaluationError,
    evaluate,
    load_models,
    markdown_table,
)
from mmldm_data.metrics.fad import BACKENDS

PROGRAM = "eval_fvd_fad"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generated", type=Path, help="folder of generated videos (any nesting)")
    parser.add_argument("--real", required=True, help="folder of real videos, or dataset=NAME")
    parser.add_argument(
        "--recon",
        type=Path,
        help="autoencoder run_dir of tools/train_ae.py (or one of its "
        "checkpoints/step_* folders): evaluate its round trips of the real clips",
    )
    parser.add_argument("--num-clips", type=int, default=2048, help="clips per side (default 2048)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clip draws (default 0)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="repeat with seeds seed..seed+K-1; report mean and std"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        choices=RESOLUTIONS,
        default=256,
        help="frames are letterboxed to this size before I3D (default 256; 64: MM-Diffusion's)",
    )
    parser.add_argument(
        "--fad-backends", default="aisfx", help=f"comma list from {sorted(BACKENDS)} (default aisfx)"
    )
    parser.add_argument(
        "--fad-weights",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="weights file of a FAD backend, e.g. vggish=/w/vggish-10086976.pth",
    )
    parser.add_argument("--out", type=Path, help="JSON report path; the markdown table goes beside it (.md)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="--recon's weights (default: bf16 where native, else fp32)"
    )
    parser.add_argument("--cache-dir", type=Path, help="real-set feature cache (default <cache>/eval)")
    return parser.parse_known_args(argv)


def real_source(real: str, overrides: list[str]) -> tuple[Path, float, int, list[str], str]:
    """(root, fps, frames per clip, extensions, label) of --real."""
    if not real.startswith("dataset="):
        if overrides:
            raise ConfigError(f"key=value overrides {overrides} only apply with --real dataset=NAME")
        return Path(real), 10.0, 16, [], real
    config = dataset_config_from(compose(CONF_DIR, "data", [real, *overrides]))
    root = Path(config.data_root)
    if not root.is_dir():
        raise EvaluationError(
            f"{real}: its data_root {config.data_root!r} is not a folder; "
            "pass data_root=PATH after the other arguments"
        )
    return root, config.fps, config.num_frames, config.extensions, f"{real} ({root})"


def parse_fad_weights(pairs: list[str]) -> dict[str, str]:
    weights = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if name not in BACKENDS or not path:
            raise EvaluationError(
                f"--fad-weights {pair!r}: expected NAME=PATH with NAME one of {sorted(BACKENDS)}"
            )
        weights[name] = path
    return weights


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    register_schemas()  # --real dataset=NAME composes conf/data.yaml: the data groups only
    unknown_flags = [arg for arg in overrides if arg.startswith("-")]
    began = time.perf_counter()
    with user_errors(PROGRAM, EvaluationError, VAELoadError):
        if unknown_flags:
            raise EvaluationError(f"unknown option(s) {unknown_flags}; see --help")
        if (args.generated is None) == (args.recon is None):
            raise EvaluationError(
                "give either --generated DIR (samples to evaluate) or --recon CKPT (autoencoder round trips)"
            )
        if args.repeats < 1:
            raise EvaluationError(f"--repeats must be >= 1, got {args.repeats}")
        root, fps, num_frames, extensions, label = real_source(args.real, overrides)
        backends = tuple(name.strip() for name in args.fad_backends.split(",") if name.strip())
        protocol = EvalProtocol(
            num_frames=num_frames,
            fps=fps,
            resolution=args.resolution,
            num_clips=args.num_clips,
            fad_backends=backends,
            **({"extensions": tuple(extensions)} if extensions else {}),
        )
        fad_weights = parse_fad_weights(args.fad_weights)
        reconstructor = load_reconstructor(args.recon, args.device, args.precision) if args.recon else None
        sets = EvalSets.scan(root, protocol, args.generated, reconstructor, label)
        print(f"{PROGRAM}: loading I3D and FAD backends {list(backends)} on {args.device}", file=sys.stderr)
        models = load_models(protocol, args.device, fad_weights)
        report = evaluate(
            sets,
            protocol,
            models,
            seeds=[args.seed + k for k in range(args.repeats)],
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            progress=True,
        )
    report["wall_seconds"] = round(time.perf_counter() - began, 1)
    table = markdown_table(report)
    print(table)
    if args.out is None:
        print(json.dumps(report))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
