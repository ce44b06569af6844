#!/usr/bin/env python
r"""Stage 1: train the hierarchical multi-modal autoencoder.

    make train-ae DATASET=synthetic                 # tiny presets on CPU
    python tools/train_ae.py dataset=aist data_root=/data/AIST++ ae=paper vae=sd \
        vae.weights=/models/sd/vae train=ae_paper
    accelerate launch --config_file conf/accelerate/multi_gpu.yaml tools/train_ae.py dataset=aist ae=paper ...

Checkpoints go to <run_dir>/checkpoints/ (a second invocation resumes), reconstructions (mp4 with
sound, input | reconstruction, and spectrograms) to <run_dir>/samples/.
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig

from mmldm_ae.engine.sweeps import record_failure
from mmldm_ae.engine.trainer import TrainingError
from mmldm_ae.train_ae import train_ae_from_config
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_dit.config import register_schemas


@hydra.main(config_path="../conf", config_name="train_ae", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("train_ae", TrainingError, VAELoadError), record_failure(cfg.run_dir):
        summary = train_ae_from_config(cfg)
    if summary.pop("is_main"):
        print(json.dumps(summary))


if __name__ == "__main__":
    register_schemas()  # before Hydra composes conf/: every group preset starts from its schema
    sys.exit(main())
