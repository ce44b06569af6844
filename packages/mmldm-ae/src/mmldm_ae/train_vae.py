"""Stage 0: train the KL-VAE on video frames and audio images (docs/design.md#vae).

Two regimes, chosen by `vae.stage0.train_encoder`: from scratch (tiny presets, CPU), or the
authors' per-dataset fine-tune of SD's decoder with the encoder frozen. The loop is the shared
`Trainer`; this module is the task: the VAE's loss, the patch discriminator's loss, and
reconstruction pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmldm_ae.engine.logger import WandbConfig, WandbLogger
from mmldm_ae.engine.trainer import TrainConfig, Trainer, TrainingTask, processes
from mmldm_ae.vae import (
    KLVAE,
    PatchDiscriminator,
    Stage0Config,
    VAEConfig,
    build_vae,
    patch_discriminator_loss,
    vae_losses,
)
from mmldm_data.cli import collate
from mmldm_data.config import ConfigError, dataset_config_from, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.preview import contact_sheet, save_png
from mmldm_data.video import to_uint8_frames


def images_of(batch: dict) -> torch.Tensor:
    """The images stage 0 learns from: each clip's target frames and its audio image [N, 3, R, R]."""
    frames = batch["target_frames"].flatten(0, 1)  # [B * 2, 3, R, R]
    return torch.cat([frames, batch["audio_image"]])


class VAETrainingTask(TrainingTask):
    def __init__(self, vae: KLVAE, stage0: Stage0Config, preview_batch: dict, architecture: dict[str, Any]):
        self.vae, self.stage0 = vae, stage0
        if not stage0.train_encoder:
            vae.freeze_encoder()
        self.discriminator = PatchDiscriminator(channels=stage0.disc_channels, num_layers=stage0.disc_layers)
        self.preview = images_of(preview_batch)[:8]
        self._architecture = architecture
        self._reconstruction: torch.Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae, "discriminator": self.discriminator}

    def optimizer_modules(self) -> list[str]:
        return ["vae", "discriminator"]

    def architecture(self) -> dict[str, Any]:
        return self._architecture

    def loss(self, optimizer: str, batch: dict, step: int, modules: dict[str, nn.Module]):
        adversarial = step >= self.stage0.disc_start
        if optimizer == "discriminator":
            if not adversarial or self._reconstruction is None:
                return None, {}
            losses = patch_discriminator_loss(
                modules["discriminator"], images_of(batch), self._reconstruction
            )
            return losses["loss"], {
                "d_loss": losses["loss"].detach(),
                "d_real": losses["logits_real"].detach(),
                "d_fake": losses["logits_fake"].detach(),
            }
        losses = vae_losses(
            modules["vae"],
            images_of(batch),
            modules["discriminator"] if adversarial else None,
            adv_weight=self.stage0.adv_weight if adversarial else 0.0,
            kl_weight=self.stage0.kl_weight,
            train_encoder=self.stage0.train_encoder,
            adaptive_adv_weight=self.stage0.adaptive_adv_weight,
        )
        self._reconstruction = losses["reconstruction"].detach()
        # Tensors: the trainer reads them at logging steps only.
        numbers = {
            k: torch.as_tensor(v).detach() for k, v in losses.items() if k not in ("loss", "reconstruction")
        }
        return losses["loss"], numbers

    @torch.no_grad()
    def log_media(self, logger: WandbLogger, step: int, run_dir: Path) -> None:
        images = self.preview.to(next(self.vae.parameters()).device)
        reconstruction = self.vae.decode(self.vae.encode(images)).clamp(-1, 1)
        rows = [list(to_uint8_frames(images.cpu())), list(to_uint8_frames(reconstruction.cpu()))]
        sheet = contact_sheet(rows, ["input", "decoded"], cell=96)
        save_png(sheet, run_dir / "samples" / f"vae_{step:07d}.png")
        logger.log_image("reconstruction", np.asarray(sheet), step)


def train_vae_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Stage 0 from a composed `conf/train_vae.yaml` (tools/train_vae.py, the demo); returns the summary.

    The finished VAE goes to <run_dir>/vae with a latent scale fitted to the data: SD's 0.18215
    belongs to SD's VAE, a VAE trained here gets the scale that gives its latents unit variance.
    """
    vae_config = to_typed(VAEConfig, cfg.vae)
    train_config = to_typed(TrainConfig, cfg.train)
    if not vae_config.stage0.train_encoder and not vae_config.weights:
        # A frozen encoder must be a trained one: fine-tuning a decoder against random latents learns nothing.
        raise ConfigError(
            f"vae.preset={vae_config.preset} fine-tunes the decoder of a pretrained VAE "
            "(vae.stage0.train_encoder=false) but vae.weights is not set: "
            "pass vae.weights=<SD's vae/ folder or .ckpt> (README, "
            '"Pretrained weights"), or train from scratch with vae.stage0.train_encoder=true'
        )
    wandb_config = to_typed(WandbConfig, cfg.wandb)
    dataset_config = dataset_config_from(cfg)  # last: it looks at the data folder
    run_dir = Path(cfg.run_dir)

    # Ranks share the index cache: the main process builds it, the others then reuse it.
    with processes().main_process_first():
        dataset = SoundingVideoDataset(dataset_config, progress=True)
    torch.manual_seed(train_config.seed)  # a VAE trained from scratch starts from train.seed alone
    vae = build_vae(vae_config)
    preview = collate([dataset[i * len(dataset) // 4] for i in range(4)])
    architecture = {
        "vae": to_plain_dict(vae_config) | {"stage0": None},
        "resolution": dataset_config.resolution,
    }
    task = VAETrainingTask(vae, vae_config.stage0, preview, architecture)
    trainer = Trainer(
        task,
        dataset,
        train_config,
        run_dir,
        wandb_config,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    summary = trainer.train()
    summary["is_main"] = trainer.is_main
    if trainer.is_main:
        spread = torch.linspace(0, len(dataset) - 1, 16).long().tolist()
        sample = images_of(collate([dataset[i] for i in spread]))
        exported = run_dir / "vae"
        vae = trainer.accelerator.unwrap_model(trainer.modules["vae"])
        if vae_config.stage0.train_encoder:
            summary["scale"] = vae.fit_scale(sample.to(trainer.accelerator.device))
        vae.save_pretrained(exported)
        summary["vae"] = str(exported)
    return summary
