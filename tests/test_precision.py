"""Inference and training precision and the sampling loops' host syncs (issue 14 item 1).

bf16 weights must give the samples of fp32 weights within a stated tolerance, and neither the DiT's
sampling loop nor the signal decoder's may read a value back from the device per step (counted on
the CPU at the dispatcher, `mmldm_ae.engine.perf.HostSyncCounter`: .item(), bool(), int(), float(),
boolean masks, nonzero, device-to-host copies).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import preset
from test_autoencoder import NUM_CLASSES, seeded, small_config
from test_dit import as_if_trained

import mmldm_ae.pipeline as pipeline
from mmldm_ae.autoencoder import MultiModalAutoencoder
from mmldm_ae.engine.diffusion import SAMPLERS
from mmldm_ae.engine.perf import HostSyncCounter
from mmldm_ae.engine.trainer import runtime_precision
from mmldm_ae.pipeline import set_inference_precision
from mmldm_data.config import ConfigError
from mmldm_dit.dit import MMDiT
from mmldm_dit.sampling import sample

pytestmark = pytest.mark.usefixtures("plain_single_thread_cpu")

# Relative L2 error of bf16 against fp32 samples (measured on these tiny models: DiT 0.017, decoder
# 0.010); bf16 keeps 8 mantissa bits, 0.4% per rounding.
BF16_TOLERANCE = 0.05


def host_syncs(run) -> int:
    with HostSyncCounter() as syncs:
        run()
    return syncs.count


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def dit() -> MMDiT:
    torch.manual_seed(0)
    return as_if_trained(MMDiT(preset("dit", "tiny"))).eval()


@pytest.fixture(scope="module")
def autoencoder() -> MultiModalAutoencoder:
    torch.manual_seed(0)
    return MultiModalAutoencoder(small_config(adversarial=False), NUM_CLASSES).eval()


def latents(model: MultiModalAutoencoder, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, g = model.cfg, seeded(3)
    return (
        torch.randn(batch, cfg.latent_channels, cfg.video_latent_size, cfg.video_latent_size, generator=g),
        torch.randn(batch, cfg.latent_channels, cfg.audio_latent_size, cfg.audio_latent_size, generator=g),
    )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_dit_sampling_reads_nothing_back_per_step(dit, sampler):
    cond = torch.randn(1, *dit.cfg.latent_shape("audio"))
    counts = [
        host_syncs(lambda steps=steps: sample(dit, "a2v", cond_a=cond, sampler=sampler, steps=steps))
        for steps in (2, 5)
    ]
    assert counts[0] == counts[1], f"{sampler}: {counts} host syncs for 2 / 5 steps"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_decoder_loop_reads_nothing_back_per_step(autoencoder, sampler):
    z_v, z_a = latents(autoencoder)
    counts = [
        host_syncs(
            lambda steps=steps: autoencoder.decode(
                z_v, z_a, num_frames=2, steps=steps, sampler=sampler, guidance_fraction=0.5
            )
        )
        for steps in (2, 6)
    ]
    assert counts[0] == counts[1], f"{sampler}: {counts} host syncs for 2 / 6 steps"


def test_bf16_dit_sampling_agrees_with_fp32(dit):
    half = copy.deepcopy(dit).to(torch.bfloat16)
    samples = sample(dit, batch_size=2, steps=4), sample(half, batch_size=2, steps=4)
    for reference, value in zip(*samples, strict=True):
        assert value.dtype == torch.float32  # latents stay fp32 whatever the weights
        assert relative_error(value, reference) < BF16_TOLERANCE


def test_bf16_decoding_agrees_with_fp32(autoencoder):
    z_v, z_a = latents(autoencoder)
    half = MultiModalAutoencoder(autoencoder.cfg, NUM_CLASSES).eval()
    half.load_state_dict(autoencoder.state_dict())
    half.to(torch.bfloat16)
    reference = autoencoder.decode(z_v, z_a, num_frames=2, steps=4, generator=seeded(1))
    value = half.decode(z_v, z_a, num_frames=2, steps=4, generator=seeded(1))
    for ref, val in zip(reference, value, strict=True):
        assert val.dtype == torch.float32
        assert relative_error(val, ref) < BF16_TOLERANCE


def test_inference_precision_by_device(monkeypatch, caplog):
    for native, default in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(pipeline, "native_bf16", lambda device, native=native: native)
        assert set_inference_precision(None, "cpu") == default
    monkeypatch.setattr(pipeline, "native_bf16", lambda device: False)
    assert set_inference_precision("bf16", "cpu") == torch.bfloat16  # asked for: kept, with a warning
    assert "no native kernels" in caplog.text
    with pytest.raises(ConfigError, match="precision"):
        set_inference_precision("fp16", "cpu")


def test_bf16_training_runs_in_fp32_on_a_cpu_without_bf16_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((False, "no"), (True, "bf16")):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda native=native: native)
        assert runtime_precision("bf16") == expected
        assert runtime_precision("no") == "no" and runtime_precision("fp16") == "fp16"
