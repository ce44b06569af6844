#!/usr/bin/env python
r"""Sounding videos from a trained model: svg, a2v, v2a, audio / video continuation, long.

    make sample                                                   # svg from outputs/runs/dit-synthetic-tiny
    python tools/sample.py run=outputs/demo/model task=a2v input=song.wav         # an exported model
    python tools/sample.py run=outputs/runs/dit-synthetic-tiny task=a2v input=song.wav \
        long_run=outputs/runs/dit-long-synthetic-tiny                           # windows chained
    python tools/sample.py run=outputs/runs/dit-synthetic-tiny task=v2a num_samples=12   # dataset clips
    python tools/sample.py run=outputs/runs/dit-long-synthetic-tiny task=long seconds=16 \
        sampler=dpmsolver++ steps=20

A thin command line over `mmldm_dit.MMLDMPipeline`: `run` is a model folder of
tools/export_model.py or a tools/train_dit.py run. a2v / v2a from a file follow the file's length
(or `seconds`) and keep the given sound / frames. Each sample is written to out_dir as
<task>_<index>.mp4 (with sound), .wav and .png (frames and spectrogram); a2v / v2a from dataset
clips also write conditions.json for tools/eval_fvd_fad.py. With wandb.mode=online|offline the
samples are also logged as a W&B table. Ends with one JSON line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import soundfile
import torch
from omegaconf import DictConfig

from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.engine.logger import SampleRecord, WandbLogger
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import to_typed
from mmldm_data.tasks import Task
from mmldm_dit.config import register_schemas
from mmldm_dit.generate import SampleConfig, generate
from mmldm_dit.pipeline import MODEL_INDEX, MMLDMPipeline


def load(config: SampleConfig, device: str) -> MMLDMPipeline:
    if (Path(config.run) / MODEL_INDEX).is_file():
        return MMLDMPipeline.from_pretrained(
            config.run, device=device, dtype=config.precision, compile=config.compile
        )
    return MMLDMPipeline.from_runs(
        config.run,
        config.long_run,
        device=device,
        dtype=config.precision,
        use_ema=config.use_ema,
        ae_run=config.ae_run,
        compile=config.compile,
    )


def log_samples(config: SampleConfig, summary: dict) -> None:
    """The written samples as one W&B table (video with sound, sound, task, condition, class)."""
    records = []
    for record in summary["records"]:
        files = {Path(f).suffix: Path(f) for f in record["files"]}
        wave, rate = soundfile.read(files[".wav"], dtype="float32") if ".wav" in files else (None, 0)
        records.append(
            SampleRecord(files.get(".mp4"), wave, rate, record["task"], record["condition"], record["class"])
        )
    logger = WandbLogger(config.wandb, Path(config.out_dir), asdict(config))
    logger.log_samples(f"samples/{config.task}", records, step=0)
    logger.finish()


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors("sample", VAELoadError, LatentCacheError):
        config = to_typed(SampleConfig, cfg)  # validates before any model loads
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"loading {config.run} ...", file=sys.stderr, flush=True)
        pipe = load(config, device)
        task = Task(config.task)
        chain = pipe.long_dit if task.cross_modal else None
        summary = generate(pipe.model_for(task), config, chain=chain)
    if config.wandb.mode != "disabled":
        log_samples(config, summary)
    print(
        f"wrote {summary['samples']} {summary['task']} samples ({summary['frames_per_sample']} frames each) "
        f"to {summary['out_dir']}",
        file=sys.stderr,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))


if __name__ == "__main__":
    register_schemas()  # before Hydra composes conf/: every group preset starts from its schema
    sys.exit(main())
