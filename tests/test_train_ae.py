"""Stage-1 training end to end at a tiny size: exact resume, the tool, checkpoints, reconstructions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, preset, run_tool, run_tool_in_process

from mmldm_ae.autoencoder import MultiModalAutoencoder, build_discriminator
from mmldm_ae.engine.trainer import TrainConfig, Trainer
from mmldm_ae.pipeline import AutoencoderPipeline, load_autoencoder
from mmldm_ae.train_ae import AETrainingTask
from mmldm_ae.vae import VAEConfig, build_vae
from mmldm_data.cli import collate
from mmldm_data.config import DatasetConfig, to_typed
from mmldm_data.dataset import SoundingVideoDataset

RESOLUTION = 32
TINY_OVERRIDES = [  # 32^2 frames through a 2-block VAE (16x16 latents): seconds per step on CPU
    f"dataset.resolution={RESOLUTION}",
    f"dataset.mel.image_size={RESOLUTION}",
    "dataset.window_stride=8",
    f"ae.resolution={RESOLUTION}",
    "ae.vae_downsample=2",
    "preview_clips=1",
    "preview_steps=2",
    "vocoder=griffinlim",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32])).save_pretrained(folder)
    return folder


def dataset_config(root: Path) -> DatasetConfig:
    return to_typed(
        DatasetConfig,
        {
            "data_root": str(root),
            "resolution": RESOLUTION,
            "mel": {"image_size": RESOLUTION},
            "window_stride": 8,
        },
    )


class RecordingTask(AETrainingTask):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: list[float] = []

    def loss(self, optimizer, batch, step, modules):
        loss, numbers = super().loss(optimizer, batch, step, modules)
        if loss is not None:
            self.recorded.append(round(loss.item(), 7))
        return loss, numbers


def make_task(root: Path, vae_folder: Path) -> tuple[RecordingTask, SoundingVideoDataset]:
    torch.manual_seed(0)
    pixels = SoundingVideoDataset(dataset_config(root), return_all_frames=True)
    # adversarial: both optimisers resume
    cfg = preset("ae", "tiny", resolution=RESOLUTION, vae_downsample=2, adversarial=True)
    model = MultiModalAutoencoder(cfg, num_classes=len(pixels.class_names))
    vae = build_vae(VAEConfig(preset="tiny", weights=str(vae_folder)))
    pipeline = AutoencoderPipeline(model, vae, pixels.config, pixels.class_names)
    model.train()
    preview = collate([pixels[0]])
    architecture = {
        "ae": "tiny-32",
        "num_classes": len(pixels.class_names),
        "class_names": pixels.class_names,
    }
    task = RecordingTask(
        pipeline, build_discriminator(cfg), preview, architecture, preview_steps=2, vocoder="griffinlim"
    )
    return task, pixels


@pytest.mark.slow
def test_resumed_autoencoder_run_matches_an_uninterrupted_one(synthetic_root, vae_folder, tmp_path):
    settings = dict(batch_size=2, lr=1e-3, checkpoint_every=100, log_every=1)
    straight, data = make_task(synthetic_root, vae_folder)
    Trainer(straight, data, TrainConfig(max_steps=3, **settings), tmp_path / "straight").train()
    first, data = make_task(synthetic_root, vae_folder)
    Trainer(first, data, TrainConfig(max_steps=2, **settings), tmp_path / "split").train()
    second, data = make_task(synthetic_root, vae_folder)
    Trainer(second, data, TrainConfig(max_steps=3, **settings), tmp_path / "split").train()

    assert len(straight.recorded) == 6  # model and discriminator losses of 3 steps
    assert first.recorded + second.recorded == straight.recorded
    samples = tmp_path / "split" / "samples" / "step_0000003"
    assert (samples / "clip0.mp4").is_file() and (samples / "contact_sheet.png").is_file()


@pytest.mark.slow
def test_train_ae_tool_trains_resumes_and_checks_configs(synthetic_root, vae_folder, tmp_path):
    run_dir = tmp_path / "run"
    common = [
        f"data_root={synthetic_root}",
        f"vae.weights={vae_folder}",
        f"run_dir={run_dir}",
        *TINY_OVERRIDES,
    ]
    first = run_tool("train_ae.py", *common, "train.max_steps=1")
    assert json.loads(first.stdout.strip().splitlines()[-1])["step"] == 1
    assert (run_dir / "checkpoints" / "step_0000001" / "autoencoder.safetensors").is_file()
    assert (run_dir / "samples" / "step_0000001" / "clip0.mp4").is_file()

    second = run_tool("train_ae.py", *common, "train.max_steps=2")
    assert "resumed from" in second.stderr and "step_0000001" in second.stderr
    assert json.loads(second.stdout.strip().splitlines()[-1])["step"] == 2

    changed = run_tool_in_process(  # fails on resuming, before any step
        "train_ae.py", *common, "train.max_steps=3", "ae.latent_channels=4", check=False
    )
    assert changed.returncode == 2
    assert "ae.latent_channels: 8 -> 4" in changed.stderr and "Traceback" not in changed.stderr

    no_vae = run_tool_in_process(  # fails before any model
        "train_ae.py",
        f"data_root={synthetic_root}",
        f"run_dir={tmp_path / 'other'}",
        *TINY_OVERRIDES,
        check=False,
    )
    assert no_vae.returncode == 2 and "vae.weights is not set" in no_vae.stderr

    pipeline = load_autoencoder(run_dir)
    pixels = SoundingVideoDataset(dataset_config(synthetic_root), return_all_frames=True)
    batch = collate([pixels[0], pixels[5]])
    z_v, z_a = pipeline.encode_clips(batch)
    assert z_v.shape == (2, 8, 8, 8) and z_a.shape == (2, 8, 4, 4)
    decoded = pipeline.decode_clips(z_v, z_a, steps=2, generator=torch.Generator().manual_seed(0))
    assert decoded.frames.shape == (2, 16, 3, RESOLUTION, RESOLUTION)
    assert decoded.audio_images.shape == (2, 3, RESOLUTION, RESOLUTION)

    report = run_tool_in_process(
        "reconstruct.py",
        str(run_dir),
        "--num-clips",
        "2",
        "--steps",
        "2",
        "--vocoder",
        "griffinlim",
        "--oracles",
        "--out",
        str(tmp_path / "recon"),
    )
    metrics = json.loads(report.stdout.strip().splitlines()[-1])
    assert metrics["clips"] == 2 and metrics["psnr"] > 0 and metrics["logmel_l1"] >= 0
    assert 0.0 <= metrics["class_accuracy"] <= 1.0
    assert {"video_oracle_accuracy", "audio_oracle_accuracy", "onset_error_frames"} <= metrics.keys()
    assert metrics["onset_error_frames_input"] <= 1.0  # the clips' own bounces meet their sounds
    assert 0.0 < metrics["position_error_static"] < 0.5 and "position_error" in metrics
    assert len(list((tmp_path / "recon").glob("clip*.mp4"))) == 2


def test_initial_weights_depend_on_train_seed_alone(synthetic_root, vae_folder, tmp_path):
    from mmldm_ae.train_ae import build_ae_training
    from mmldm_data.config import compose

    def initial(run: str, seed: int, cache: str) -> dict[str, torch.Tensor]:
        overrides = [f"data_root={synthetic_root}", f"vae.weights={vae_folder}", f"run_dir={tmp_path / run}"]
        overrides += [*TINY_OVERRIDES, f"train.seed={seed}", f"latent_cache={tmp_path / cache}"]
        overrides += ["ae.adversarial=true"]  # the discriminator's weights too
        training = build_ae_training(compose(REPO_ROOT / "conf", "train_ae", overrides))
        modules = training.trainer.modules.items()
        return {
            f"{name}.{key}": value for name, module in modules for key, value in module.state_dict().items()
        }

    torch.manual_seed(123)  # whatever the process drew before, and whether the cache is built or reused
    first = initial("a", 0, "cache")
    second = initial("b", 0, "cache")
    other = initial("c", 1, "cache")
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
