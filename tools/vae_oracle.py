#!/usr/bin/env python
"""How much of a synthetic clip's class survives the VAE alone (stage 0): the video oracle on round trips.

    python tools/vae_oracle.py outputs/demo/runs/vae/vae outputs/demo/heldout
    python tools/vae_oracle.py RUN/vae DATA --checkpoints RUN/checkpoints/step_*/vae.safetensors

Every later stage sees frames only through this VAE, so a class whose colour or shape it cannot
reproduce is lost to the autoencoder and the generator too (README, "Does it learn?"). Encodes windows of
DATA (a synthetic folder, e.g. the demo's held-out clips; --windows-per-clip, evenly spaced) to the
posterior mode, decodes them, and reads the decoded frames with the folder's video oracle (colour
or silhouette); with --checkpoints, does the same with each training checkpoint's weights in the
finished VAE's architecture and latent scale. Prints the accuracy and the misreadings per
checkpoint, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from mmldm_ae.vae import VAELoadError, load_vae
from mmldm_data.cli import user_errors
from mmldm_data.config import ConfigError, preset
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.synthetic import CLASS_SETS, class_oracles, synthetic_class_set
from mmldm_data.video import to_uint8_frames
from mmldm_dit.config import register_schemas

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@torch.no_grad()
def oracle_accuracy(
    vae, dataset: SoundingVideoDataset, indices: list[int], classes: str
) -> tuple[float, Counter]:
    """Fraction of the windows `indices` whose VAE round trip the oracle of the class set `classes`
    reads as their class, and the misreadings as (class, read as) counts."""
    video_oracle, _ = class_oracles(classes)
    names = CLASS_SETS[classes]  # the oracle's ids; the dataset numbers its class folders itself
    hits, wrong = 0, Counter()
    for index in indices:
        item = dataset[index]
        frames = item["frames"]  # [T, 3, R, R] in [-1, 1]
        decoded = vae.decode(vae.encode(frames, sample=False)).clamp(-1, 1)
        read = video_oracle(to_uint8_frames(decoded))
        truth = dataset.class_names[item["class_id"]]
        found = names[read] if read >= 0 else "no object"
        hits += found == truth
        if found != truth:
            wrong[(truth, found)] += 1
    return hits / len(indices), wrong


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("vae", help="a finished VAE folder (<run_dir>/vae of tools/train_vae.py)")
    parser.add_argument("data", type=Path, help="a synthetic dataset folder (tools/make_synthetic.py)")
    parser.add_argument(
        "--checkpoints", nargs="*", default=[], help="vae.safetensors of training checkpoints"
    )
    parser.add_argument("--preset", default="tiny", help="the VAE's architecture preset (conf/vae)")
    parser.add_argument(
        "--windows-per-clip", type=int, default=1, help="windows read per clip, evenly spaced"
    )
    args = parser.parse_args()

    with user_errors("vae_oracle", VAELoadError):
        classes = synthetic_class_set(args.data)
        if classes is None:
            raise ConfigError(
                f"{args.data} is not a synthetic dataset folder (no metadata.json of make_synthetic)"
            )
        register_schemas()  # the conf/ presets start from the typed schemas
        config = preset(CONF_DIR, "dataset", "synthetic", data_root=str(args.data))
        dataset = SoundingVideoDataset(config, return_all_frames=True)
        by_file: dict[int, list[int]] = {}
        for index, (file_position, _) in enumerate(dataset.windows):
            by_file.setdefault(file_position, []).append(index)
        indices = [
            windows[round(k * (len(windows) - 1) / max(1, args.windows_per_clip - 1))]
            for windows in by_file.values()
            for k in range(min(args.windows_per_clip, len(windows)))
        ]
        results = {}
        for weights in [None, *args.checkpoints]:
            vae = load_vae(args.vae, preset=args.preset).eval()
            if weights is not None:
                if not Path(weights).is_file():
                    raise ConfigError(f"--checkpoints: {weights} is not a file")
                vae.load_state_dict(load_file(weights))
            name = weights or args.vae
            accuracy, wrong = oracle_accuracy(vae, dataset, indices, classes)
            misread = ", ".join(f"{c} read as {r} x{n}" for (c, r), n in sorted(wrong.items()))
            print(f"{name}: {accuracy:.3f} of {len(indices)} windows ({misread or 'none misread'})")
            results[str(name)] = accuracy
    print(json.dumps({"classes": classes, "windows": len(indices), "video_oracle_accuracy": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
