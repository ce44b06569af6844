"""Stage 2: train the DiT over cached perceptual latents (docs/design.md#dit; the paper's MM-LDM*).

`DiTTrainingTask` is the task for the shared `Trainer`: standardised latents of the cache, the
multi-task loss of `dit_training_loss` (context / a2v / v2a masks; previous-clip masks for the
long-generation model), and previews for people: a few svg (or long) samples decoded through the
autoencoder and the vocoder into mp4s with sound and contact sheets. The Trainer swaps in the EMA
weights before previews. `train_dit_from_config` is the whole stage from a composed Hydra config,
shared by `tools/train_dit.py` and `tools/bench_dit_learning.py`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from mmldm_ae.engine.checkpoint import (
    describe_mismatch,
    load_ema_weights,
    load_module_weights,
    resolve_checkpoint,
)
from mmldm_ae.engine.diffusion import build_train_scheduler
from mmldm_ae.engine.latent_cache import encoded_dataset_config, settings_hash
from mmldm_ae.engine.logger import WandbConfig, WandbLogger
from mmldm_ae.engine.sweeps import EvalPlan, ExperimentConfig, write_results
from mmldm_ae.engine.trainer import TrainConfig, Trainer, TrainingTask, compile_static, processes
from mmldm_ae.pipeline import AutoencoderPipeline, load_autoencoder
from mmldm_data.config import ConfigError, DatasetConfig, dataset_config_from, to_plain_dict, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.evaluation import EvalSets, evaluate, load_models
from mmldm_data.tasks import Task
from mmldm_dit.dit import DiTConfig, MMDiT, model_card
from mmldm_dit.generate import SampleConfig, TrainedDiT, generate, load_trained_dit
from mmldm_dit.latents import DiTLatentDataset, LatentStats, build_dit_latent_cache
from mmldm_dit.sampling import DiTLossConfig, dit_training_loss

# conf/train_dit_long.yaml sizes the previous-clip encoder as ${half:${dit.depth}}.
OmegaConf.register_new_resolver("half", lambda value: int(value) // 2, replace=True)

# Dataset settings that decide what the autoencoder sees; the DiT's data must share them with the AE's.
AE_INPUT_SETTINGS = ("fps", "num_frames", "key_frame_indices", "resolution", "frame_mode", "mel")
# Batch keys of the latent dataset (raw latents) and their modality.
LATENT_MODALITY = {"z_a": "audio", "z_v": "video", "prev_z_a": "audio", "prev_z_v": "video"}


@dataclasses.dataclass
class EvalSampling:
    """How the post-training evaluation draws its svg samples (`evaluate_sampling` in conf/train_dit.yaml)."""

    steps: int = 50
    ae_steps: int | None = None  # DDIM steps of the autoencoder's decoder (None: its ae.decode_steps)
    guidance: float = 8.0  # paper Eq. 9 s, both modalities
    batch_size: int = 8
    vocoder: str = "hifigan-universal"


@dataclasses.dataclass
class PreviewConfig:
    samples: int = 2
    steps: int = 25  # DDIM steps of the DiT
    ae_steps: int = 25  # DDIM steps of the autoencoder's decoder
    clips: int = 2  # long-generation model: clips per preview sample
    vocoder: str = "hifigan-universal"


def generate_with(
    settings: PreviewConfig | EvalSampling, dit: TrainedDiT, task: Task, folder: Path, **options: Any
) -> None:
    """Samples of a `task` into `folder` with the step counts and vocoder of a preview or an evaluation."""
    generate(
        dit,
        SampleConfig(
            run=str(dit.checkpoint),
            task=task,
            out_dir=str(folder),
            steps=settings.steps,
            ae_steps=settings.ae_steps,
            vocoder=settings.vocoder,
            **options,
        ),
    )


class DiTTrainingTask(TrainingTask):
    def __init__(
        self,
        model: MMDiT,
        stats: LatentStats,
        loss_config: DiTLossConfig,
        architecture: dict[str, Any],
        pipeline: AutoencoderPipeline,
        preview: PreviewConfig,
    ):
        self.model, self.stats, self.loss_config = model, stats, loss_config
        self.pipeline, self.preview = pipeline, preview
        self._architecture = architecture
        self.scheduler = build_train_scheduler(model.cfg.schedule)

    def modules(self) -> dict[str, nn.Module]:
        return {"dit": self.model}

    def optimizer_modules(self) -> list[str]:
        return ["dit"]

    def architecture(self) -> dict[str, Any]:
        return self._architecture

    def loss(self, optimizer: str, batch: dict, step: int, modules: dict[str, nn.Module]):
        # The loss draws t, masks and noise from the global RNG, which checkpoints restore: resumes are exact.
        latents = {
            key: self.stats.standardise(modality, batch[key].float())
            for key, modality in LATENT_MODALITY.items()
            if key in batch
        }
        losses = dit_training_loss(
            modules["dit"],
            latents.get("z_a"),
            latents.get("z_v"),
            self.scheduler,
            cfg=self.loss_config,
            prev_a=latents.get("prev_z_a"),
            prev_v=latents.get("prev_z_v"),
        )
        return losses["loss"], {k: v.detach() for k, v in losses.items() if k != "loss"}

    def log_media(self, logger: WandbLogger, step: int, run_dir: Path) -> None:
        long = self.model.previous_encoder is not None
        folder = run_dir / "samples" / f"step_{step:07d}"
        preview = self.preview
        generate_with(
            preview,
            TrainedDiT(self.model, self.stats, self.pipeline, None, run_dir),
            Task.long if long else Task.svg,
            folder,
            num_samples=preview.samples,
            batch_size=preview.samples,
            num_clips=preview.clips,
        )
        for video in sorted(folder.glob("*.mp4")):
            logger.log_video(
                f"samples/{video.stem}", video, step, caption="generated video with its generated sound"
            )
        for sheet in sorted(folder.glob("*.png")):
            logger.log_image(
                f"samples/{sheet.stem}",
                np.asarray(Image.open(sheet).convert("RGB")),
                step,
                caption="frames, then the spectrogram of the sound",
            )


def check_compatible(
    dataset: DatasetConfig, dit: DiTConfig, pipeline: AutoencoderPipeline, ae_run: str
) -> None:
    """The DiT's data and latent shapes must be those of its autoencoder."""
    problems = []
    for name in AE_INPUT_SETTINGS:
        ours, theirs = getattr(dataset, name), getattr(pipeline.dataset, name)
        if ours != theirs:
            problems.append(
                f"dataset.{name}={to_plain(ours)} but the autoencoder in {ae_run} was trained with "
                f"{to_plain(theirs)}: set dataset.{name} to that"
            )
    ae = pipeline.model.cfg
    made = {
        "audio": (ae.latent_channels, ae.audio_latent_size),
        "video": (ae.latent_channels, ae.video_latent_size),
    }
    for modality in dit.modalities:
        channels, side, _ = dit.latent_shape(modality)
        if (channels, side) != made[modality]:
            problems.append(
                f"dit.{modality}_latent_channels/size={channels}/{side} but the autoencoder makes "
                f"{modality} latents {made[modality][0]}x{made[modality][1]}x{made[modality][1]}: "
                f"set dit.{modality}_latent_channels={made[modality][0]} "
                f"dit.{modality}_latent_size={made[modality][1]}"
            )
    ConfigError.raise_if_any(problems, "the DiT does not fit its autoencoder")


def to_plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def default_cache_dir(ae_run: Path, dataset: DatasetConfig) -> Path:
    """Beside the autoencoder, keyed by the dataset settings, so every DiT trained on that AE shares it."""
    return ae_run / "dit_latents" / f"{dataset.name}-{settings_hash(encoded_dataset_config(dataset))[:12]}"


def init_from_run(model: MMDiT, run: str | Path, pipeline: AutoencoderPipeline) -> list[str]:
    """Copy a trained DiT's weights (its EMA weights when it kept them) into `model` by parameter name.

    The long-generation model starts from the base DiT, as the authors' does: the main DiT takes the
    base's weights and the previous-clip encoder, which the base lacks, keeps its initialisation.
    Returns the names left as initialised. A parameter of the run that `model` lacks or holds at another
    shape is an error naming it, with the DiT settings that differ.
    """
    checkpoint = resolve_checkpoint(run, "train the base DiT first (make train-dit), or set init_from=null")
    state = json.loads((checkpoint / "state.json").read_text())
    if "dit" not in state["config"]:
        raise ConfigError(f"init_from={run}: {checkpoint} is not a checkpoint of tools/train_dit.py")
    if state["architecture"].get("autoencoder_fingerprint") != pipeline.fingerprint():
        raise ConfigError(
            f"init_from={run}: that DiT was trained on latents of another autoencoder than ae_run's; "
            "give a DiT trained on the same autoencoder"
        )
    base = MMDiT(to_typed(DiTConfig, state["config"]["dit"]))
    load_module_weights(base, checkpoint, "dit")
    load_ema_weights(base, checkpoint)
    weights, ours = base.state_dict(), model.state_dict()
    problems = [
        f"{name}: {tuple(tensor.shape)} in {checkpoint}, "
        + (f"{tuple(ours[name].shape)} here" if name in ours else "absent here")
        for name, tensor in weights.items()
        if name not in ours or ours[name].shape != tensor.shape
    ]
    if problems:

        def shared(settings: dict) -> dict:  # the previous-clip encoder is what a long model adds
            return {key: value for key, value in settings.items() if key != "previous_clip_depth"}

        differences = describe_mismatch(
            shared(state["config"]["dit"]), shared(to_plain_dict(model.cfg)), "dit."
        )
        raise ConfigError(
            f"init_from={run}: its weights do not fit this DiT: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + (f". DiT settings that differ: {', '.join(differences)}" if differences else "")
        )
    model.load_state_dict(weights, strict=False)
    return sorted(set(ours) - set(weights))


def evaluate_dit(
    run_dir: Path, plan: EvalPlan, sampling: EvalSampling, dataset: DatasetConfig
) -> dict[str, Any]:
    """FVD / KVD / FAD (paper Table 4) of `plan.clips` svg samples against the real clips, with AV-Align,
    the oracle readings on the synthetic set, and the DiT's parameters and forward FLOPs."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dit = load_trained_dit(run_dir, device=device)
    samples = Path(run_dir) / "evaluation" / Task.svg
    generate_with(
        sampling,
        dit,
        Task.svg,
        samples,
        num_samples=plan.clips,
        batch_size=sampling.batch_size,
        seed=plan.seed,
        guidance_audio=sampling.guidance,
        guidance_video=sampling.guidance,
    )
    protocol = plan.protocol(dataset.fps, dataset.num_frames)
    report = evaluate(
        EvalSets.scan(dataset.data_root, protocol, samples),
        protocol,
        load_models(protocol, device),
        seeds=[plan.seed],
        batch_size=plan.batch_size,
    )
    card = model_card(dit.model.cfg)
    metrics = {key: value for key, value in report.items() if value is None or isinstance(value, int | float)}
    return metrics | {key: card[key] for key in ("params", "gflops", "gmacs_linear")}


def model_to_train(config: DiTConfig, train: TrainConfig) -> MMDiT:
    """A new DiT with train.gradient_checkpointing and train.compile applied."""
    model = MMDiT(config)
    model.enable_gradient_checkpointing(train.gradient_checkpointing)
    if train.compile:
        compile_static(model)  # static shapes: compiled once per run; the weights keep their names
    return model


def train_dit_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Stage 2 from a composed train_dit config: check everything, build or reuse the cache, train.

    With evaluate.clips > 0 the run is then evaluated and <run_dir>/metrics.json written (sweeps).
    """
    experiment, plan = to_typed(ExperimentConfig, cfg.experiment), to_typed(EvalPlan, cfg.evaluate)
    eval_sampling = to_typed(EvalSampling, cfg.evaluate_sampling)
    dataset_config = dataset_config_from(cfg)
    dit_config = to_typed(DiTConfig, cfg.dit)
    loss_config = to_typed(DiTLossConfig, cfg.dit_loss)
    loss_config.validate()
    train_config = to_typed(TrainConfig, cfg.train)
    wandb_config = to_typed(WandbConfig, cfg.wandb)
    preview = to_typed(PreviewConfig, cfg.preview)
    if not cfg.ae_run:
        raise ConfigError(
            "ae_run is not set: give the run_dir of a trained autoencoder (ae_run=outputs/runs/"
            "ae-synthetic-tiny after `make train-ae DATASET=synthetic`)"
        )
    ae_run = Path(cfg.ae_run).resolve()
    state = processes()
    pipeline = load_autoencoder(ae_run, device=state.device)
    check_compatible(dataset_config, dit_config, pipeline, str(ae_run))

    cache_dir = (
        Path(cfg.latent_cache).resolve() if cfg.latent_cache else default_cache_dir(ae_run, dataset_config)
    )
    print(f"latent cache: {cache_dir}", file=sys.stderr, flush=True)
    # Ranks share the index and cache folders: the main process builds them, the others then reuse them.
    with state.main_process_first():
        pixels = SoundingVideoDataset(dataset_config, progress=True)
        build_dit_latent_cache(pixels, pipeline, cache_dir, batch_size=cfg.encode_batch_size, progress=True)
    long = dit_config.previous_clip_depth > 0
    data = DiTLatentDataset(cache_dir, previous_clips=long, dataset_config=dataset_config, pipeline=pipeline)

    torch.manual_seed(train_config.seed)
    model = model_to_train(dit_config, train_config)
    if cfg.init_from:  # a resumed run then loads its own checkpoint over these weights
        fresh = init_from_run(model, cfg.init_from, pipeline)
        print(
            f"initialised from {cfg.init_from}; {len(fresh)} tensors keep their fresh initialisation",
            file=sys.stderr,
            flush=True,
        )
    architecture = {
        "dit": to_plain_dict(dit_config),
        "latent_stats": data.stats.to_dict(),
        "autoencoder_fingerprint": pipeline.fingerprint(),
    }
    task = DiTTrainingTask(model, data.stats, loss_config, architecture, pipeline, preview)
    run_config = OmegaConf.to_container(cfg, resolve=True) | {
        "dataset": to_plain_dict(dataset_config),
        "dit": to_plain_dict(dit_config),
        "ae_run": str(ae_run),
        "latent_cache": str(cache_dir),
    }
    print(
        f"training on {len(data)} {'(previous, current) pairs' if long else 'windows'} of {cache_dir}",
        file=sys.stderr,
        flush=True,
    )
    trainer = Trainer(task, data, train_config, cfg.run_dir, wandb_config, run_config=run_config)
    summary = trainer.train()
    summary["samples"] = str(Path(cfg.run_dir) / "samples")
    summary["latent_cache"] = str(cache_dir)
    summary["training_items"] = len(data)
    if plan.clips and trainer.is_main:
        metrics = evaluate_dit(Path(cfg.run_dir), plan, eval_sampling, dataset_config)
        write_results(
            Path(cfg.run_dir), experiment, metrics | {"step": summary["step"]}, wandb_config, run_config
        )
        summary["metrics"] = metrics
    return summary | {"is_main": trainer.is_main}
