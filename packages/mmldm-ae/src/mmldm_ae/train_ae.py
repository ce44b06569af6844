"""Stage 1: train the hierarchical multi-modal autoencoder (DESIGN section 4).

The task for the shared `Trainer`: the generator step (diffusion MSE of both modalities, KL,
classification, contrastive and adversarial terms, all inside `MultiModalAutoencoder`), the
cross-modal discriminator step, and reconstructions for people (mp4 with sound, side by side
with the input, and spectrograms). Batches are pixels encoded by the frozen KL-VAE on the fly,
or latents from a cache (`mmldm_ae.latent_cache`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmldm_ae.autoencoder import MultiModalAutoencoder
from mmldm_ae.discriminator import discriminator_losses
from mmldm_ae.pipeline import AutoencoderPipeline, pixels_to_latents, write_reconstructions
from mmldm_ae.training import TrainingTask
from mmldm_ae.vae import KLVAE
from mmldm_ae.wandb_logger import WandbLogger


class AETrainingTask(TrainingTask):
    def __init__(
        self,
        pipeline: AutoencoderPipeline,
        discriminator: nn.Module | None,
        preview: dict,
        architecture: dict[str, Any],
        preview_steps: int = 25,
        vocoder: str = "hifigan-universal",
    ):
        self.pipeline, self.discriminator = pipeline, discriminator
        self.model: MultiModalAutoencoder = pipeline.model.train()
        self.vae: KLVAE = pipeline.vae
        self.preview, self.preview_steps, self.vocoder_name = preview, preview_steps, vocoder
        self._architecture = architecture
        self._pixels: dict[str, torch.Tensor] | None = None

    def modules(self) -> dict[str, nn.Module]:
        modules = {"autoencoder": self.model}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules

    def optimizer_modules(self) -> list[str]:
        return list(self.modules())

    def architecture(self) -> dict[str, Any]:
        return self._architecture

    def loss(self, optimizer: str, batch: dict, step: int, modules: dict[str, nn.Module]):
        if optimizer == "discriminator":
            if self._pixels is None:
                return None, {}
            losses = discriminator_losses(modules["discriminator"], self._pixels["real"], self._pixels["fake"])
            return losses["loss_d"], {k: float(v) for k, v in losses.items()}
        latents = batch if "key_latents" in batch else pixels_to_latents(self.vae, batch)
        losses = modules["autoencoder"](latents, self.vae, discriminator=modules.get("discriminator"))
        self._pixels = {"real": losses["disc_real"], "fake": losses["disc_fake"]} if "disc_real" in losses else None
        return losses["loss"], {k: v.item() for k, v in losses.items() if v.ndim == 0 and k != "loss"}

    def log_media(self, logger: WandbLogger, step: int, run_dir: Path) -> None:
        written = write_reconstructions(self.pipeline, self.preview, run_dir / "samples" / f"step_{step:07d}",
                                        steps=self.preview_steps, vocoder=self.vocoder_name)
        for index, video in enumerate(written.videos):
            logger.log_video(f"reconstruction/clip{index}", video, step, caption="input | reconstruction (decoded sound)")
        logger.log_image("reconstruction/contact_sheet", np.asarray(written.sheet), step,
                         caption="first/last frame: input, reconstruction; spectrogram: input, reconstruction")
