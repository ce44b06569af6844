#!/usr/bin/env python
r"""Stage 0: train (tiny, from scratch) or fine-tune (SD, decoder only) the KL-VAE.

    python tools/train_vae.py dataset=synthetic
    python tools/train_vae.py dataset=aist data_root=/data/AIST++ vae=sd \
        vae.weights=/models/sd-v1-4/vae train=vae_sd
    accelerate launch --config_file conf/accelerate/multi_gpu.yaml tools/train_vae.py dataset=aist vae=sd ...

Checkpoints go to <run_dir>/checkpoints/ (a second invocation resumes), reconstructions to
<run_dir>/samples/, and the finished VAE, with a latent scale fitted to the data, to
<run_dir>/vae/ (a diffusers folder: give it to later stages as vae.weights=<run_dir>/vae).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.train_vae import train_vae_from_config
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_dit.config import register_schemas


@hydra.main(config_path="../conf", config_name="train_vae", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("train_vae", TrainingError, VAELoadError):
        summary = train_vae_from_config(cfg)
    if summary.pop("is_main"):
        print(json.dumps(summary))


if __name__ == "__main__":
    register_schemas()  # before Hydra composes conf/: every group preset starts from its schema
    sys.exit(main())
