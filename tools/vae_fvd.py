#!/usr/bin/env python
"""The FVD floor of stage 0: held-out windows through the VAE alone, beside the benchmark's references.

    python tools/vae_fvd.py assets/tiny_vae outputs/synth_bench/heldout outputs/synth_bench/synthetic
    python tools/vae_fvd.py assets/tiny_vae outputs/synth_bench/heldout outputs/synth_bench/synthetic \
        --clips 128 --out outputs/vae_fvd_128

Every generated frame of `make demo` / `make synth-bench` leaves through this VAE's decoder, so a
generator's FVD cannot fall much below that of real frames encoded and decoded by it. Writes `--clips`
held-out windows of HELDOUT three ways, as the benchmark's evaluation does (tools/demo.py: the same picks
and shuffles for one --seed): as they are, with their frames shuffled in time, and through the VAE
(posterior mode, decoded); then evaluates each set against `--real-clips` windows of REAL with the
benchmark's protocol (I3D FVD / KVD at 64^2). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mmldm_ae.vae import VAELoadError, load_vae
from mmldm_data.cli import user_errors
from mmldm_data.config import preset
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.evaluation import EvaluationError, evaluate_sets, write_references
from mmldm_data.media import read_video, write_video
from mmldm_data.video import to_uint8_frames
from mmldm_dit.config import register_schemas

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@torch.no_grad()
def vae_round_trips(vae, sources: Path, out: Path, fps: float, sample_rate: int) -> Path:
    """Every mp4 of `sources` with its frames encoded and decoded by `vae` (its sound unchanged)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(sorted(sources.glob("*.mp4")), desc="VAE round trips", unit="clip"):
        clip = read_video(path, fps, sample_rate=sample_rate)
        frames = torch.from_numpy(clip.frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        decoded = vae.decode(vae.encode(frames))
        write_video(out / path.name, to_uint8_frames(decoded), fps, clip.audio, sample_rate)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("vae", help="a VAE folder (assets/tiny_vae, <run_dir>/vae of tools/train_vae.py)")
    parser.add_argument("heldout", type=Path, help="synthetic held-out clips (e.g. <demo out>/heldout)")
    parser.add_argument("real", type=Path, help="the training clips FVD compares with (<demo out>/synthetic)")
    parser.add_argument("--clips", type=int, default=24, help="held-out windows per set (synth-bench: 24)")
    parser.add_argument("--real-clips", type=int, default=128, help="training windows (synth-bench: 128)")
    parser.add_argument("--preset", default="tiny", help="the VAE's architecture preset (conf/vae)")
    parser.add_argument("--out", type=Path, default=Path("outputs/vae_fvd"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.clips < 2 or args.real_clips < 2:
        parser.error("--clips and --real-clips must be >= 2 (FVD needs a covariance)")

    with user_errors("vae_fvd", VAELoadError, EvaluationError):
        register_schemas()
        torch.manual_seed(args.seed)
        vae = load_vae(args.vae, preset=args.preset).eval()
        heldout_config = preset(CONF_DIR, "dataset", "synthetic", data_root=str(args.heldout))
        heldout = SoundingVideoDataset(heldout_config, return_all_frames=True)
        references = write_references(args.out / "references", heldout, args.clips, args.seed)
        config = heldout.config
        sets = {
            "real": references["real"],
            "shuffled": references["shuffled"],
            "vae": vae_round_trips(
                vae, references["real"], args.out / "vae", config.fps, config.mel.sample_rate
            ),
        }
        reports = evaluate_sets(args.out / "evaluation", args.real, sets, args.real_clips)
    rows = {name: {key: reports[name][key] for key in ("fvd", "kvd", "generated_clips")} for name in sets}
    print(f"\n| held-out windows ({args.clips}) | FVD | KVD |\n|---|---|---|")
    labels = {"real": "as they are", "shuffled": "frames shuffled in time", "vae": f"through {args.vae}"}
    for name, row in rows.items():
        print(f"| {labels[name]} | {row['fvd']:.1f} | {row['kvd']:.2f} |")
    print(json.dumps({"vae": args.vae, "clips": args.clips, "real_clips": args.real_clips, "sets": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
