#!/usr/bin/env python
r"""Stage 2: train the DiT generator on cached perceptual latents of a trained autoencoder.

    make train-dit DATASET=synthetic                   # tiny DiT on CPU, on outputs/runs/ae-synthetic-tiny
    python tools/train_dit.py ae_run=outputs/runs/ae-aist-paper dataset=aist data_root=/data/AIST++ \
        dit=S train=dit_paper
    python tools/train_dit.py ae_run=... dit.modalities=[video] \
        run_dir=outputs/runs/dit-v-synthetic-tiny      # MM-LDM-v
    python tools/train_dit.py --config-name train_dit_long ae_run=...   # long model
    accelerate launch --config_file conf/accelerate/multi_gpu.yaml tools/train_dit.py ...

The first run encodes every window once with the frozen autoencoder (reused by later runs and
rebuilt when the autoencoder or the data changed); checkpoints go to <run_dir>/checkpoints/ (a
second invocation resumes), previews (mp4 with sound, contact sheets) to <run_dir>/samples/.
Ends with one JSON line.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.engine.sweeps import record_failure
from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_dit.config import register_schemas
from mmldm_dit.train_dit import train_dit_from_config


@hydra.main(config_path="../conf", config_name="train_dit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("train_dit", TrainingError, VAELoadError, LatentCacheError), record_failure(cfg.run_dir):
        summary = train_dit_from_config(cfg)
    if summary.pop("is_main"):
        print(json.dumps(summary))


if __name__ == "__main__":
    register_schemas()  # before Hydra composes conf/: every group preset starts from its schema
    sys.exit(main())
