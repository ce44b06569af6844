"""The one place that talks to Weights & Biases (online, offline or disabled), from rank 0 only.

Runs get a deterministic id derived from their run folder, so a resumed run appends to the same
W&B run. Offline runs are written under `<run_dir>/wandb` and uploaded later with
`wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class WandbConfig:
    mode: str = "disabled"  # "online" | "offline" | "disabled"
    project: str = "mmldm"
    entity: str | None = None
    group: str | None = None  # sweeps group their runs
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # default: the run folder's name


@dataclass
class SampleRecord:
    """One generated sample as `WandbLogger.log_samples` shows it."""

    video: Path | None  # mp4 with its sound; None for an audio-only model
    wave: np.ndarray | None  # float32 [N]; None for a video-only model
    sample_rate: int
    task: str
    condition: str = ""  # the input file or dataset window it was given, "" for none
    class_name: str = ""  # the class of that condition, "" when unknown


class WandbLogger:
    def __init__(self, config: WandbConfig, run_dir: Path, run_config: dict[str, Any], is_main: bool = True):
        if config.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb.mode must be online, offline or disabled, got {config.mode!r}")
        self.run = None
        if not is_main or config.mode == "disabled":
            return
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        self._wandb = wandb
        self.run = wandb.init(
            project=config.project,
            entity=config.entity,
            group=config.group,
            tags=[tag[:64] for tag in config.tags] or None,  # W&B refuses tags over 64 characters
            name=config.name or run_dir.name,
            id=run_id(run_dir),
            resume="allow",
            mode=config.mode,
            dir=str(run_dir),
            config=run_config,
        )

    def log(self, values: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def log_summary(self, values: dict[str, Any]) -> None:
        """Final numbers of the run (what W&B tables and sweep views show)."""
        if self.run is not None:
            self.run.summary.update(values)

    def log_video(self, name: str, path: Path, step: int, caption: str | None = None) -> None:
        """An mp4 already written (with its sound) by mmldm_data.media.write_video."""
        if self.run is not None:
            self.run.log({name: self._wandb.Video(str(path), caption=caption, format="mp4")}, step=step)

    def log_image(self, name: str, image: np.ndarray, step: int, caption: str | None = None) -> None:
        if self.run is not None:
            self.run.log({name: self._wandb.Image(image, caption=caption)}, step=step)

    def log_audio(
        self, name: str, wave: np.ndarray, sample_rate: int, step: int, caption: str | None = None
    ) -> None:
        if self.run is not None:
            self.run.log({name: self._audio(wave, sample_rate, caption)}, step=step)

    def log_samples(self, name: str, samples: list[SampleRecord], step: int) -> None:
        """Generated samples as one table: the video with its sound, the sound alone, the task, what
        conditioned it (an input file, a dataset window) and its class."""
        if self.run is None:
            return
        table = self._wandb.Table(columns=["video", "audio", "task", "condition", "class"])
        for sample in samples:
            table.add_data(
                self._wandb.Video(str(sample.video), format="mp4") if sample.video else None,
                self._audio(sample.wave, sample.sample_rate, sample.task)
                if sample.wave is not None
                else None,
                sample.task,
                sample.condition,
                sample.class_name,
            )
        self.run.log({name: table}, step=step)

    def log_model(self, folder: Path, name: str, metadata: dict[str, Any] | None = None) -> None:
        """An exported model folder (tools/export_model.py) as a W&B artifact of type "model"."""
        if self.run is not None:
            artifact = self._wandb.Artifact(name, type="model", metadata=metadata)
            artifact.add_dir(str(folder))
            self.run.log_artifact(artifact)

    def _audio(self, wave: np.ndarray, sample_rate: int, caption: str | None):
        return self._wandb.Audio(np.asarray(wave, np.float32), sample_rate=sample_rate, caption=caption)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def run_id(run_dir: Path) -> str:
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
