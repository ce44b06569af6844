#!/usr/bin/env python
"""Stage 0: train (tiny, from scratch) or fine-tune (SD, decoder only) the KL-VAE.

    python tools/train_vae.py dataset=synthetic
    python tools/train_vae.py dataset=aist data_root=/data/AIST++ vae=sd vae.weights=/models/sd-v1-4/vae train=vae_sd
    accelerate launch --config_file conf/accelerate/multi_gpu.yaml tools/train_vae.py dataset=aist vae=sd ...

Checkpoints go to <run_dir>/checkpoints/ (a second invocation resumes), reconstructions to
<run_dir>/samples/, and the finished VAE, with a latent scale fitted to the data, to
<run_dir>/vae/ (a diffusers folder: give it to later stages as vae.weights=<run_dir>/vae).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mmldm_ae.train_vae import VAETrainingTask, images_of
from mmldm_ae.training import TrainConfig, Trainer, TrainingError
from mmldm_ae.vae import VAEConfig, VAELoadError, build_vae
from mmldm_ae.wandb_logger import WandbConfig
from mmldm_data.cli import collate, user_errors
from mmldm_data.config import dataset_config_from, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset


@hydra.main(config_path="../conf", config_name="train_vae", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("train_vae", TrainingError, VAELoadError):
        dataset_config = dataset_config_from(cfg)
        vae_config = to_typed(VAEConfig, cfg.vae)
        train_config = to_typed(TrainConfig, cfg.train)
        wandb_config = to_typed(WandbConfig, cfg.wandb)
        run_dir = Path(cfg.run_dir)

        dataset = SoundingVideoDataset(dataset_config, progress=True)
        vae = build_vae(vae_config)
        preview = collate([dataset[i * len(dataset) // 4] for i in range(4)])
        architecture = {"vae": to_plain_dict(vae_config) | {"stage0": None}, "resolution": dataset_config.resolution}
        task = VAETrainingTask(vae, vae_config.stage0, preview, architecture)
        trainer = Trainer(task, dataset, train_config, run_dir, wandb_config,
                          run_config=OmegaConf.to_container(cfg, resolve=True))
        summary = trainer.train()

        if trainer.is_main:
            # SD's 0.18215 belongs to SD's VAE: a VAE trained here gets the scale that gives its
            # latents unit variance on this data, and keeps it in the exported folder.
            spread = torch.linspace(0, len(dataset) - 1, 16).long().tolist()
            sample = images_of(collate([dataset[i] for i in spread]))
            exported = run_dir / "vae"
            vae = trainer.accelerator.unwrap_model(trainer.modules["vae"])
            if vae_config.stage0.train_encoder:
                summary["scale"] = vae.fit_scale(sample.to(trainer.accelerator.device))
            vae.save_pretrained(exported)
            summary["vae"] = str(exported)
            print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
