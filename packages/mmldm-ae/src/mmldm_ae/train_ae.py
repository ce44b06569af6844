"""Stage 1: train the hierarchical multi-modal autoencoder (docs/design.md#autoencoder).

The task for the shared `Trainer`: the model's step (diffusion MSE of both modalities, KL,
classification, contrastive and adversarial terms, all inside `MultiModalAutoencoder`), the
cross-modal discriminator step, and reconstructions for people (mp4 with sound, side by side
with the input, and spectrograms). Batches are pixels encoded by the frozen KL-VAE on the fly,
or latents from a cache (`mmldm_ae.engine.latent_cache`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmldm_ae.autoencoder import AEConfig, MultiModalAutoencoder, build_discriminator, discriminator_losses
from mmldm_ae.autoencoder.model import TrainingDraws
from mmldm_ae.autoencoder.semantic import ContrastiveBank
from mmldm_ae.engine.latent_cache import LatentCacheDataset, auto_cache_dir, build_latent_cache
from mmldm_ae.engine.logger import WandbConfig, WandbLogger
from mmldm_ae.engine.sweeps import EvalPlan, ExperimentConfig, check_sweep_overrides, write_results
from mmldm_ae.engine.trainer import (
    TrainConfig,
    Trainer,
    TrainingTask,
    compile_static,
    processes,
    runtime_precision,
)
from mmldm_ae.pipeline import (
    AutoencoderPipeline,
    AutoencoderReconstructor,
    load_autoencoder,
    pixels_to_latents,
    write_reconstructions,
)
from mmldm_ae.vae import KLVAE, VAEConfig, build_vae
from mmldm_data.cli import collate, hydra_overrides
from mmldm_data.config import ConfigError, DatasetConfig, dataset_config_from, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.evaluation import EvalSets, evaluate, load_models


@dataclass
class MicroBatch:
    """One micro-batch of an optimiser step as the losses see it (`AETrainingTask.prepare_step`)."""

    latents: dict[str, torch.Tensor]  # the batch of VAE latents (MultiModalAutoencoder.training_losses)
    draws: TrainingDraws  # this micro-batch's share of the step's random draws
    bank: ContrastiveBank | None  # the step's contrastive embeddings; None: one micro-batch
    # Set by the model's loss: this micro-batch's real and (detached) fake slots for the discriminator.
    disc: dict[str, torch.Tensor] = field(default_factory=dict)


class AETrainingTask(TrainingTask):
    """The autoencoder's step under gradient accumulation sees the whole optimiser-step batch: the
    contrastive negatives come from every micro-batch (`MultiModalAutoencoder.micro_batch_plans`) and
    the discriminator's loss is the mean over every micro-batch's fakes, so k micro-batches of n
    clips give the losses and gradients of one batch of k*n clips (docs/design.md#accumulation)."""

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

    def modules(self) -> dict[str, nn.Module]:
        modules = {"autoencoder": self.model}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules

    def optimizer_modules(self) -> list[str]:
        return list(self.modules())

    def architecture(self) -> dict[str, Any]:
        return self._architecture

    def prepare_step(self, micro: list[dict], modules: dict[str, nn.Module]) -> list[MicroBatch]:
        latents = [batch if "key_latents" in batch else pixels_to_latents(self.vae, batch) for batch in micro]
        plans = self.model.micro_batch_plans(latents)  # no gradients: the unwrapped model will do
        return [MicroBatch(batch, *plan) for batch, plan in zip(latents, plans, strict=True)]

    def loss(self, optimizer: str, batch: MicroBatch, step: int, modules: dict[str, nn.Module]):
        if optimizer == "discriminator":
            if not batch.disc:
                return None, {}
            losses = discriminator_losses(modules["discriminator"], batch.disc["real"], batch.disc["fake"])
            return losses["loss_d"], {k: v.detach() for k, v in losses.items()}
        losses = modules["autoencoder"](
            batch.latents,
            self.vae,
            discriminator=modules.get("discriminator"),
            draws=batch.draws,
            bank=batch.bank,
        )
        if "disc_real" in losses:
            batch.disc = {"real": losses["disc_real"], "fake": losses["disc_fake"]}
        return losses["loss"], {k: v.detach() for k, v in losses.items() if v.ndim == 0 and k != "loss"}

    def log_media(self, logger: WandbLogger, step: int, run_dir: Path) -> None:
        written = write_reconstructions(
            self.pipeline,
            self.preview,
            run_dir / "samples" / f"step_{step:07d}",
            steps=self.preview_steps,
            vocoder=self.vocoder_name,
        )
        for index, video in enumerate(written.videos):
            logger.log_video(
                f"reconstruction/clip{index}", video, step, caption="input | reconstruction (decoded sound)"
            )
        logger.log_image(
            "reconstruction/contact_sheet",
            np.asarray(written.sheet),
            step,
            caption="first/last frame: input, reconstruction; spectrogram: input, reconstruction",
        )


def check_compatible(dataset: DatasetConfig, vae_config: VAEConfig, ae: AEConfig) -> None:
    problems = []
    if vae_config.weights is None:
        problems.append(
            "vae.weights is not set: the autoencoder needs a trained KL-VAE. For the tiny presets run "
            "`make train-vae DATASET=synthetic` (it writes outputs/runs/vae-synthetic-tiny/vae); "
            "for the paper preset give SD's KL-f8 VAE folder (the vae/ folder of a Stable Diffusion v1.x "
            "diffusers repository)"
        )
    if ae.resolution != dataset.resolution:
        problems.append(
            f"ae.resolution ({ae.resolution}) must equal dataset.resolution ({dataset.resolution})"
        )
    if ae.num_key_frames != len(dataset.key_frame_indices):
        problems.append(
            f"ae.num_key_frames ({ae.num_key_frames}) must equal the number of "
            f"dataset.key_frame_indices ({len(dataset.key_frame_indices)})"
        )
    evenly = [k * dataset.num_frames // ae.num_key_frames for k in range(ae.num_key_frames)]
    if ae.video_latent == "key_frames" and dataset.key_frame_indices != evenly:
        problems.append(
            f"ae.video_latent=key_frames reads key frame k at frame k * num_frames / num_key_frames: set "
            f"dataset.key_frame_indices={evenly} (got {dataset.key_frame_indices})"
        )
    if ae.num_target_frames != dataset.num_target_frames:
        problems.append(
            f"ae.num_target_frames ({ae.num_target_frames}) must equal dataset.num_target_frames "
            f"({dataset.num_target_frames})"
        )
    ConfigError.raise_if_any(problems, "incompatible settings")


@dataclass
class AETraining:
    trainer: Trainer
    pipeline: AutoencoderPipeline
    pixels: SoundingVideoDataset
    run_dir: Path


def apply_train_options(model: MultiModalAutoencoder, vae: KLVAE, train: TrainConfig) -> None:
    """train.gradient_checkpointing (signal decoder UNet and VAE) and train.compile (the UNet: static
    shapes, one graph for the run; the injected features are its hooks' inputs, not guards)."""
    if train.gradient_checkpointing:
        model.decoder.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    if train.compile:
        compile_static(model.decoder.unet)


def build_ae_training(cfg: DictConfig) -> AETraining:
    """Everything a stage-1 run needs, from a composed `conf/train_ae.yaml` (tools/train_ae.py,
    benchmarks)."""
    dataset_config = dataset_config_from(cfg)
    vae_config = to_typed(VAEConfig, cfg.vae)
    ae_config = to_typed(AEConfig, cfg.ae)
    train_config = to_typed(TrainConfig, cfg.train)
    wandb_config = to_typed(WandbConfig, cfg.wandb)
    check_compatible(dataset_config, vae_config, ae_config)
    vae_config.weights = str(Path(vae_config.weights).resolve())
    run_dir = Path(cfg.run_dir)

    # Ranks share the index and cache folders: the main process builds them, the others then reuse them.
    state = processes()
    with state.main_process_first():
        pixels = SoundingVideoDataset(dataset_config, return_all_frames=True, progress=True)
    vae = build_vae(vae_config)
    if vae.downsample != ae_config.vae_downsample or vae.latent_channels != ae_config.vae_channels:
        raise ConfigError(
            f"the VAE in {vae_config.weights} makes {vae.latent_channels}-channel latents at 1/"
            f"{vae.downsample} size, but ae.vae_channels={ae_config.vae_channels} and "
            f"ae.vae_downsample={ae_config.vae_downsample}"
        )
    device = state.device  # this rank's GPU (cuda:<local rank>), not always the first one
    vae = vae.to(device)
    if cfg.latent_cache:
        folder = (
            auto_cache_dir(run_dir, dataset_config, vae) if cfg.latent_cache == "auto" else cfg.latent_cache
        )
        with state.main_process_first():
            cache = build_latent_cache(
                pixels, vae, folder, progress=True, device=device, reals=cfg.latent_cache_reals
            )
        training_data = LatentCacheDataset(
            cache,
            num_target_frames=dataset_config.num_target_frames,
            seed=dataset_config.seed,
            dataset_config=dataset_config,
            vae=vae,
            flip_p=dataset_config.flip_p,
            reals=cfg.latent_cache_reals,
        )
    else:
        # Training reads key and target frames only; the cache above and the previews need every frame.
        training_data = copy.copy(pixels)
        training_data.return_all_frames = False
    if runtime_precision(train_config.precision) == "bf16":
        # Frozen: bf16 weights halve its memory and traffic; autocast computes in bf16 anyway.
        vae = vae.to(torch.bfloat16)

    # Initial weights from train.seed alone, whether or not this process encoded the cache above.
    torch.manual_seed(train_config.seed)
    model = MultiModalAutoencoder(ae_config, num_classes=len(pixels.class_names))
    apply_train_options(model, vae, train_config)
    discriminator = build_discriminator(ae_config)
    pipeline = AutoencoderPipeline(model, vae, dataset_config, pixels.class_names)
    model.train()
    spread = torch.linspace(0, len(pixels) - 1, cfg.preview_clips).long().tolist()
    preview = collate([pixels[i] for i in spread])
    architecture = {
        "ae": to_plain_dict(ae_config),
        "vae": {"downsample": vae.downsample, "channels": vae.latent_channels, "scale": vae.scale},
        "num_classes": len(pixels.class_names),
        "class_names": pixels.class_names,
    }
    task = AETrainingTask(
        pipeline,
        discriminator,
        preview,
        architecture,
        preview_steps=cfg.preview_steps,
        vocoder=cfg.vocoder,
    )
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config |= {"dataset": to_plain_dict(dataset_config), "vae": to_plain_dict(vae_config)}
    trainer = Trainer(task, training_data, train_config, run_dir, wandb_config, run_config=run_config)
    return AETraining(trainer, pipeline, pixels, run_dir)


def evaluate_autoencoder(
    run_dir: Path, plan: EvalPlan, dataset: DatasetConfig, vocoder: str
) -> dict[str, Any]:
    """rFVD / rKVD / rFAD (paper Table 5) of `plan.clips` real windows round-tripped through the run's
    autoencoder (sound through `vocoder`), with AV-Align and, on the synthetic set, the oracle readings
    of the reconstructions."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reconstructor = AutoencoderReconstructor(load_autoencoder(run_dir, device=device), vocoder=vocoder)
    protocol = plan.protocol(dataset.fps, dataset.num_frames)
    sets = EvalSets.scan(dataset.data_root, protocol, reconstructor=reconstructor)
    report = evaluate(
        sets, protocol, load_models(protocol, device), seeds=[plan.seed], batch_size=plan.batch_size
    )
    return {key: value for key, value in report.items() if value is None or isinstance(value, int | float)}


def train_ae_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1 from a composed `conf/train_ae.yaml` (tools/train_ae.py, the demo, sweeps); returns the
    summary.

    With evaluate.clips > 0 the run is then evaluated and <run_dir>/metrics.json written (sweeps).
    """
    experiment, plan = to_typed(ExperimentConfig, cfg.experiment), to_typed(EvalPlan, cfg.evaluate)
    check_sweep_overrides(experiment, hydra_overrides())
    training = build_ae_training(cfg)
    summary = training.trainer.train()
    summary |= {"samples": str(training.run_dir / "samples"), "is_main": training.trainer.is_main}
    if plan.clips and training.trainer.is_main:
        metrics = evaluate_autoencoder(training.run_dir, plan, training.pipeline.dataset, cfg.vocoder)
        write_results(
            training.run_dir,
            experiment,
            metrics | {"step": summary["step"]},
            to_typed(WandbConfig, cfg.wandb),
            training.trainer.run_config,
        )
        summary["metrics"] = metrics
    return summary
