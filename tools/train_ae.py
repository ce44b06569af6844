#!/usr/bin/env python
"""Stage 1: train the hierarchical multi-modal autoencoder.

    make train-ae DATASET=synthetic                 # tiny presets on CPU
    python tools/train_ae.py dataset=aist data_root=/data/AIST++ ae=paper vae=sd vae.weights=/models/sd/vae train=ae_paper
    accelerate launch --config_file conf/accelerate/multi_gpu.yaml tools/train_ae.py dataset=aist ae=paper ...

Checkpoints go to <run_dir>/checkpoints/ (a second invocation resumes), reconstructions (mp4 with
sound, input | reconstruction, and spectrograms) to <run_dir>/samples/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from mmldm_ae.autoencoder import AEConfig, MultiModalAutoencoder
from mmldm_ae.discriminator import build_discriminator
from mmldm_ae.latent_cache import LatentCacheDataset, build_latent_cache
from mmldm_ae.pipeline import AutoencoderPipeline
from mmldm_ae.train_ae import AETrainingTask
from mmldm_ae.training import TrainConfig, Trainer, TrainingError
from mmldm_ae.vae import VAEConfig, VAELoadError, build_vae
from mmldm_ae.wandb_logger import WandbConfig
from mmldm_data.cli import collate, user_errors
from mmldm_data.config import ConfigError, DatasetConfig, dataset_config_from, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset


def check_compatible(dataset: DatasetConfig, vae_config: VAEConfig, ae: AEConfig) -> None:
    problems = []
    if vae_config.weights is None:
        problems.append(
            "vae.weights is not set: the autoencoder needs a trained KL-VAE. For the tiny presets run "
            "`make train-vae DATASET=synthetic` (it writes outputs/runs/vae-synthetic-tiny/vae); for the paper "
            "preset give SD's KL-f8 VAE folder (the vae/ folder of a Stable Diffusion v1.x diffusers repository)"
        )
    if ae.resolution != dataset.resolution:
        problems.append(f"ae.resolution ({ae.resolution}) must equal dataset.resolution ({dataset.resolution})")
    if ae.num_key_frames != len(dataset.key_frame_indices):
        problems.append(f"ae.num_key_frames ({ae.num_key_frames}) must equal the number of "
                        f"dataset.key_frame_indices ({len(dataset.key_frame_indices)})")
    if ae.num_target_frames != dataset.num_target_frames:
        problems.append(f"ae.num_target_frames ({ae.num_target_frames}) must equal dataset.num_target_frames "
                        f"({dataset.num_target_frames})")
    if problems:
        raise ConfigError("incompatible settings:\n  " + "\n  ".join(problems))


@hydra.main(config_path="../conf", config_name="train_ae", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("train_ae", TrainingError, VAELoadError):
        dataset_config = dataset_config_from(cfg)
        vae_config = to_typed(VAEConfig, cfg.vae)
        ae_config = to_typed(AEConfig, cfg.ae)
        train_config = to_typed(TrainConfig, cfg.train)
        wandb_config = to_typed(WandbConfig, cfg.wandb)
        check_compatible(dataset_config, vae_config, ae_config)
        vae_config.weights = str(Path(vae_config.weights).resolve())
        run_dir = Path(cfg.run_dir)

        pixels = SoundingVideoDataset(dataset_config, return_all_frames=True, progress=True)
        vae = build_vae(vae_config)
        if vae.downsample != ae_config.vae_downsample or vae.latent_channels != ae_config.vae_channels:
            raise ConfigError(f"the VAE in {vae_config.weights} makes {vae.latent_channels}-channel latents at 1/"
                              f"{vae.downsample} size, but ae.vae_channels={ae_config.vae_channels} and "
                              f"ae.vae_downsample={ae_config.vae_downsample}")
        model = MultiModalAutoencoder(ae_config, num_classes=len(pixels.class_names))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipeline = AutoencoderPipeline(model, vae.to(device), dataset_config, pixels.class_names)
        model.train()
        spread = torch.linspace(0, len(pixels) - 1, cfg.preview_clips).long().tolist()
        preview = collate([pixels[i] for i in spread])

        training_data = pixels
        if cfg.latent_cache:
            cache = build_latent_cache(pixels, vae, cfg.latent_cache, progress=True, device=device)
            training_data = LatentCacheDataset(cache, num_target_frames=dataset_config.num_target_frames,
                                               seed=dataset_config.seed, dataset_config=dataset_config, vae=vae)
        architecture = {
            "ae": to_plain_dict(ae_config),
            "vae": {"downsample": vae.downsample, "channels": vae.latent_channels, "scale": vae.scale},
            "num_classes": len(pixels.class_names),
            "class_names": pixels.class_names,
        }
        task = AETrainingTask(pipeline, build_discriminator(ae_config), preview, architecture,
                              preview_steps=cfg.preview_steps, vocoder=cfg.vocoder)
        run_config = OmegaConf.to_container(cfg, resolve=True)
        run_config |= {"dataset": to_plain_dict(dataset_config), "vae": to_plain_dict(vae_config)}
        trainer = Trainer(task, training_data, train_config, run_dir, wandb_config, run_config=run_config)
        summary = trainer.train()
        if trainer.is_main:
            summary["samples"] = str(run_dir / "samples")
            print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
