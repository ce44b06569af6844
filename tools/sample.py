#!/usr/bin/env python
r"""Sounding videos from a trained DiT: svg, a2v, v2a, audio / video continuation, long.

    make sample                                                   # svg from outputs/runs/dit-synthetic-tiny
    python tools/sample.py run=outputs/runs/dit-synthetic-tiny task=a2v input=song.wav
    python tools/sample.py run=outputs/runs/dit-synthetic-tiny task=v2a num_samples=12   # dataset clips
    python tools/sample.py run=outputs/runs/dit-long-synthetic-tiny task=long num_clips=10 \
        sampler=dpmsolver++ steps=20

Each sample is decoded through the autoencoder, the KL-VAE and the vocoder and written to out_dir
as <task>_<index>.mp4 (with sound), .wav and .png (frames and spectrogram); a2v / v2a from
dataset clips also write conditions.json for tools/eval_fvd_fad.py. Ends with one JSON line.
"""

from __future__ import annotations

import json
import sys

import hydra
import torch
from omegaconf import DictConfig

from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import to_typed
from mmldm_dit.config import register_schemas
from mmldm_dit.generate import SampleConfig, generate, load_trained_dit


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("sample", VAELoadError, LatentCacheError):
        config = to_typed(SampleConfig, cfg)  # validates before any model loads
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"loading {config.run} ...", file=sys.stderr, flush=True)
        dit = load_trained_dit(config.run, device=device, use_ema=config.use_ema, ae_run=config.ae_run)
        summary = generate(dit, config)
    print(
        f"wrote {summary['samples']} {summary['task']} samples ({summary['frames_per_sample']} frames each) "
        f"to {summary['out_dir']}",
        file=sys.stderr,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    register_schemas()  # before Hydra composes conf/: every group preset starts from its schema
    sys.exit(main())
