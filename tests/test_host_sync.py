"""The training step never waits for the device: host syncs of a whole run do not grow with its steps.

Counted with mmldm_ae.engine.perf.HostSyncCounter (item(), float(), bool(tensor), boolean masks) over
runs of 1 and 2 steps of the tiny DiT and the tiny autoencoder (with its discriminator, 2 micro-batches);
the logging, checkpoint and final steps read the device, so runs log only at their last step.
"""

from __future__ import annotations

import pytest
import torch
from conftest import preset

from mmldm_ae.engine.perf import HostSyncCounter
from mmldm_ae.engine.trainer import TrainConfig, Trainer


def syncs_of_a_run(make_task, data, steps: int, run_dir, **train) -> HostSyncCounter:
    task = make_task()
    task.log_media = lambda *args: None
    settings = dict(max_steps=steps, log_every=100, checkpoint_every=100, **train)
    trainer = Trainer(task, data, TrainConfig(**settings), run_dir)
    with HostSyncCounter() as syncs:
        trainer.train()
    return syncs


def assert_constant(make_task, data, tmp_path, **train):
    one = syncs_of_a_run(make_task, data, 1, tmp_path / "one", **train)
    two = syncs_of_a_run(make_task, data, 2, tmp_path / "two", **train)
    assert two.count == one.count, f"per-step host syncs: {sorted(set(two.ops) - set(one.ops)) or two.ops}"


def test_the_dit_step_makes_no_host_sync(tmp_path, plain_single_thread_cpu):
    from mmldm_dit.dit import MMDiT
    from mmldm_dit.latents import LatentStats
    from mmldm_dit.sampling import DiTLossConfig
    from mmldm_dit.train_dit import DiTTrainingTask, PreviewConfig

    config = preset("dit", "tiny", depth=2)
    data = [{"z_a": torch.randn(8, 4, 4), "z_v": torch.randn(8, 8, 8), "class_id": 1} for _ in range(8)]

    def make_task():
        torch.manual_seed(0)
        return DiTTrainingTask(
            MMDiT(config), LatentStats(0, 1, 0, 1), DiTLossConfig(), {}, None, PreviewConfig()
        )

    assert_constant(make_task, data, tmp_path, batch_size=2, ema_decay=0.99)


@pytest.fixture(scope="module")
def tiny_vae():
    from mmldm_ae.vae import VAEConfig, build_vae

    torch.manual_seed(0)
    return build_vae(VAEConfig(preset="tiny", block_out_channels=[8, 16]))


def test_the_autoencoder_step_makes_no_host_sync(tmp_path, tiny_vae, plain_single_thread_cpu):
    from mmldm_ae.autoencoder import MultiModalAutoencoder, build_discriminator
    from mmldm_ae.pipeline import AutoencoderPipeline
    from mmldm_ae.train_ae import AETrainingTask
    from mmldm_data.config import DatasetConfig

    R = 16
    config = preset("ae", "tiny", resolution=R, vae_downsample=2, adversarial=True)
    # Pixels, so that the VAE encode of the step is counted too; class -1 (unlabelled) included.
    data = [
        {
            "key_frames": torch.rand(4, 3, R, R) * 2 - 1,
            "target_frames": torch.rand(2, 3, R, R) * 2 - 1,
            "target_indices": torch.tensor([0.0, 0.5]),
            "audio_image": torch.rand(3, R, R) * 2 - 1,
            "class_id": i % 3 - 1,
        }
        for i in range(8)
    ]

    def make_task():
        torch.manual_seed(0)
        model = MultiModalAutoencoder(config, num_classes=2)
        pipeline = AutoencoderPipeline(model, tiny_vae, DatasetConfig(data_root="unused"), ["a", "b"])
        return AETrainingTask(pipeline, build_discriminator(config), {}, {})

    assert_constant(make_task, data, tmp_path, batch_size=2, grad_accum=2)
