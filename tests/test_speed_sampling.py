"""Sampling off the critical path: media written by a background writer while the next batch samples,
the clips of a long sample decoded in a few batched decoder calls with the clip-by-clip result, and
compile=true giving the eager result without recompiling between batches."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import preset

from mmldm_ae.autoencoder import MultiModalAutoencoder
from mmldm_ae.pipeline import AutoencoderPipeline
from mmldm_ae.vae import VAEConfig, build_vae
from mmldm_data.audio import MelConfig
from mmldm_data.config import DatasetConfig
from mmldm_dit import generate as generate_module
from mmldm_dit.generate import SampleConfig, SampleMedia, decode_clip_batches, decode_media, generate

R = 16  # frames and audio images 16^2 -> VAE latents 8^2


@pytest.fixture(scope="module")
def tiny_pipeline() -> AutoencoderPipeline:
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(preset="tiny", block_out_channels=[8, 16]))
    model = MultiModalAutoencoder(preset("ae", "tiny", resolution=R, vae_downsample=2), num_classes=2)
    dataset = DatasetConfig(
        data_root="unused",
        resolution=R,
        num_frames=4,
        key_frame_indices=[0, 1, 2, 3],
        mel=MelConfig(image_size=R),
    )
    return AutoencoderPipeline(model, vae, dataset, ["a", "b"])


def perceptual_latents(pipeline: AutoencoderPipeline, batch: int, clips: int) -> tuple[torch.Tensor, ...]:
    cfg = pipeline.model.cfg
    generator = torch.Generator().manual_seed(1)
    z_v = torch.randn(
        batch, clips, cfg.latent_channels, cfg.video_latent_size, cfg.video_latent_size, generator=generator
    )
    z_a = torch.randn(
        batch, clips, cfg.latent_channels, cfg.audio_latent_size, cfg.audio_latent_size, generator=generator
    )
    return z_v, z_a


@pytest.mark.parametrize("clips_per_call", [4, 16])
def test_batched_clip_decoding_equals_clip_by_clip(tiny_pipeline, clips_per_call, plain_single_thread_cpu):
    """2 samples x 3 clips in 2 decoder calls (2 + 1 clips each) or 1 == 3 calls of one clip each, each
    from a decoder seeded alike (the seamless joins' one decoder noise)."""
    z_v, z_a = perceptual_latents(tiny_pipeline, 2, 3)
    frames, images = decode_clip_batches(
        tiny_pipeline, z_v, z_a, steps=2, seed=7, clips_per_call=clips_per_call
    )
    for clip in range(3):
        alone = tiny_pipeline.decode_clips(
            z_v[:, clip], z_a[:, clip], steps=2, generator=torch.Generator().manual_seed(7)
        )
        # oneDNN blocks a convolution by its batch size, so the last bits differ with it (1.2e-5 on an
        # AVX2-only CPU); another clip's noise or latent would differ by tenths.
        torch.testing.assert_close(frames[:, clip], alone.frames, atol=1e-4, rtol=0)
        torch.testing.assert_close(images[:, clip], alone.audio_images, atol=1e-4, rtol=0)


def test_decoder_calls_are_bounded_and_batched(tiny_pipeline, monkeypatch, plain_single_thread_cpu):
    """A 2-sample x 5-clip long sample at 4 clips per call: 3 calls (2 + 2 + 1 clips each), not 5."""
    calls = []
    decode = tiny_pipeline.decode_clips

    def counting(z_v, *args, **kwargs):
        calls.append(z_v.shape[0])
        return decode(z_v, *args, **kwargs)

    monkeypatch.setattr(tiny_pipeline, "decode_clips", counting)
    z_v, z_a = perceptual_latents(tiny_pipeline, 2, 5)
    decode_clip_batches(tiny_pipeline, z_v, z_a, steps=1, clips_per_call=4)
    assert calls == [4, 4, 2]
    calls.clear()
    media = decode_media(tiny_pipeline, {"video": z_v, "audio": z_a}, steps=1, vocoder="griffinlim")
    assert calls == [10]  # the default bound takes both samples' 5 clips at once
    assert media[0].frames.shape == (5 * 4, R, R, 3)


def test_decoding_only_the_kept_media_gives_the_same_media(tiny_pipeline, plain_single_thread_cpu):
    """a2v / v2a samples carry the given media as it was: its decoded copy is not vocoded (a2v) or
    decoded at all (v2a: the audio images alone, 1 of 17 decoder items per clip)."""
    z_v, z_a = perceptual_latents(tiny_pipeline, 2, 1)
    frames, images = decode_clip_batches(tiny_pipeline, z_v, z_a, steps=2, seed=3)
    no_frames, alone = decode_clip_batches(tiny_pipeline, z_v, z_a, steps=2, seed=3, num_frames=0)
    assert no_frames.shape[2] == 0
    torch.testing.assert_close(alone, images, rtol=0, atol=1e-4)  # batch-size rounding only
    latents = {"video": z_v, "audio": z_a}
    both = decode_media(tiny_pipeline, latents, steps=2, vocoder="griffinlim", seed=3)
    sound = decode_media(tiny_pipeline, latents, steps=2, vocoder="griffinlim", seed=3, keep=("audio",))
    picture = decode_media(tiny_pipeline, latents, steps=2, vocoder="griffinlim", seed=3, keep=("video",))
    for full, audio_only, video_only in zip(both, sound, picture, strict=True):
        assert audio_only.frames is None and video_only.wave is None
        assert audio_only.wave.shape == full.wave.shape
        np.testing.assert_array_equal(video_only.frames, full.frames)


def test_the_vocoder_follows_the_pipelines_precision():
    """bf16 sampling vocodes with bf16 HiFi-GAN weights (3.1x faster on the CPU, tests/test_vocoder.py)."""
    vae = build_vae(VAEConfig(preset="tiny", block_out_channels=[8, 16]))
    model = MultiModalAutoencoder(preset("ae", "tiny", resolution=R, vae_downsample=2), num_classes=2)
    pipeline = AutoencoderPipeline(
        model, vae, DatasetConfig(data_root="unused", mel=MelConfig(image_size=R)), ["a"]
    )
    assert pipeline.vocoder().dtype == torch.float32
    pipeline.to_dtype(torch.bfloat16)
    assert pipeline.vocoder().dtype == torch.bfloat16
    wave = pipeline.vocoder()(torch.full((1, pipeline.mel.n_mels, 4), -5.0))
    assert wave.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The background writer
# --------------------------------------------------------------------------------------------


def fake_run(monkeypatch, events: list, fail_row: int | None = None, write_seconds: float = 0.05):
    """generate() over a fake sampler (2 batches of 2 tiny samples) and the real write_sample, slowed."""
    dataset = DatasetConfig(data_root="unused", resolution=R, num_frames=4)
    pipeline = SimpleNamespace(dataset=dataset, class_names=["a", "b"])
    rng = np.random.default_rng(0)

    def iterate_samples(dit, config, conditioning, chain):
        for row in range(config.num_samples):
            events.append(("sampled", row, time.perf_counter()))
            media = SampleMedia(
                frames=rng.integers(0, 255, (4, R, R, 3), dtype=np.uint8),
                wave=rng.standard_normal(dataset.clip_samples).astype(np.float32) * 0.1,
            )
            yield row, media, -1, ""

    def write_sample(pipeline, media, folder, name):
        time.sleep(write_seconds)
        row = int(name.rsplit("_", 1)[1])
        if row == fail_row:
            raise OSError(f"disk full while writing {name}")
        paths = real_write(pipeline, media, folder, name)
        events.append(("written", row, time.perf_counter(), threading.current_thread().name))
        return paths

    real_write = generate_module.write_sample
    monkeypatch.setattr(generate_module, "iterate_samples", iterate_samples)
    monkeypatch.setattr(generate_module, "write_sample", write_sample)
    return SimpleNamespace(pipeline=pipeline)


def test_samples_are_written_in_the_background_and_all_before_returning(monkeypatch, tmp_path):
    events = []
    dit = fake_run(monkeypatch, events)
    summary = generate(
        dit, SampleConfig(run="x", task="svg", num_samples=4, batch_size=2, out_dir=str(tmp_path))
    )
    written = [e for e in events if e[0] == "written"]
    assert [e[1] for e in written] == [0, 1, 2, 3]
    assert all(e[3].startswith("media-writer") for e in written)  # not the sampling thread
    sampled = {e[1]: e[2] for e in events if e[0] == "sampled"}
    # Sampling went on while sample 0 was being written.
    assert sampled[1] < written[0][2]
    assert summary["files"] == 12
    for record in summary["records"]:
        assert [Path(f).suffix for f in record["files"]] == [".mp4", ".wav", ".png"]
        assert all(Path(f).stat().st_size > 0 for f in record["files"])


def test_a_failed_write_raises_and_stops_sampling(monkeypatch, tmp_path):
    events = []
    dit = fake_run(monkeypatch, events, fail_row=0, write_seconds=0.0)
    config = SampleConfig(run="x", task="svg", num_samples=40, batch_size=2, out_dir=str(tmp_path))
    with pytest.raises(OSError, match="disk full while writing svg_0000"):
        generate(dit, config)
    assert len([e for e in events if e[0] == "sampled"]) < 40
    assert not (tmp_path / generate_module.SAMPLES_FILE).exists()


# --------------------------------------------------------------------------------------------
# compile=true
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_sampling_equals_eager_and_never_recompiles(tmp_path, monkeypatch):
    """svg at batch 2 twice (2 DiT steps, 2 decoder steps): the compiled DiT and decoder UNet give the
    eager latents and decoded clips within 1e-4, and the second batch traces nothing: the dynamo
    graph count after it is the one after the first batch. The graphs run through the eager
    backend: capture, guards and recompiles are dynamo's whatever the backend, and inductor's code
    generation would take 80 s of the suite's 10 minutes on 2 cores."""
    from torch._dynamo.utils import counters

    module_compile = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: module_compile(self, backend="eager", **kw)
    )

    from mmldm_dit.dit import MMDiT
    from mmldm_dit.generate import TrainedDiT, compile_for_sampling, sample_clips
    from mmldm_dit.latents import LatentStats

    torch.manual_seed(0)
    # A small UNet (no cross-attention blocks) and a one-block DiT: compile time grows with the ops.
    ae = preset(
        "ae",
        "tiny",
        resolution=R,
        vae_downsample=2,
        unet_channels=[8, 16],
        unet_cross_attention=[False, False],
    )
    dataset = DatasetConfig(data_root="unused", resolution=R, num_frames=4, key_frame_indices=[0, 1, 2, 3])
    pipeline = AutoencoderPipeline(
        MultiModalAutoencoder(ae, num_classes=2),
        build_vae(VAEConfig(preset="tiny", block_out_channels=[8, 16])),
        replace(dataset, mel=MelConfig(image_size=R)),
        ["a", "b"],
    )
    model = MMDiT(preset("dit", "tiny", depth=1, audio_latent_size=2, video_latent_size=4)).eval()
    dit = TrainedDiT(model, LatentStats(0.0, 1.0, 0.0, 1.0), pipeline, None, tmp_path)
    config = SampleConfig(run="x", steps=2)

    def batches() -> list[list[torch.Tensor]]:
        outputs = []
        for seed in (0, 1):
            z = sample_clips(dit, config, None, seed, 2)
            outputs.append([*z.values(), *decode_clip_batches(pipeline, z["video"], z["audio"], 2, seed)])
            graphs.append(counters["stats"]["unique_graphs"])
        return outputs

    graphs = []
    eager = batches()
    torch._dynamo.reset()
    counters.clear()
    graphs.clear()
    compile_for_sampling(dit)
    compiled = batches()
    assert graphs[0] >= 2, "neither the DiT nor the UNet was compiled"
    assert graphs[1] == graphs[0], f"the second batch recompiled: {graphs}"
    for ours, reference in zip(sum(compiled, []), sum(eager, []), strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
