"""Latent cache: built once from a synthetic dataset, read back exactly, refused when stale, resumable."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from mmldm_ae.engine.latent_cache import (
    INDEX_FILE,
    LatentCacheDataset,
    LatentCacheError,
    auto_cache_dir,
    build_latent_cache,
    cache_matches,
    cache_mismatch,
)
from mmldm_ae.pipeline import pixels_to_latents
from mmldm_ae.vae import KLVAE, VAEConfig, build_vae
from mmldm_data.audio import MelConfig
from mmldm_data.config import DatasetConfig
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.synthetic import SyntheticConfig, write_synthetic_dataset

SHARD_SIZE = 5  # 18 windows -> 4 shards, and batches of 4 straddle shard boundaries


def tiny_vae(seed: int = 0) -> KLVAE:
    torch.manual_seed(seed)
    return build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32])).eval()


@pytest.fixture(scope="module")
def dataset_config(tmp_path_factory) -> DatasetConfig:
    root = tmp_path_factory.mktemp("synthetic6")
    write_synthetic_dataset(root, num_clips=6, seed=0, cfg=SyntheticConfig(), progress=False)
    # 6 clips of 32 frames, windows every 8 frames: 3 windows per clip.
    return DatasetConfig(data_root=str(root), resolution=32, window_stride=8, mel=MelConfig(image_size=32))


@pytest.fixture(scope="module")
def dataset(dataset_config) -> SoundingVideoDataset:
    return SoundingVideoDataset(dataset_config, return_all_frames=True)


@pytest.fixture(scope="module")
def cache_dir(dataset, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("latents")
    return build_latent_cache(
        dataset, tiny_vae(), out_dir, batch_size=4, progress=False, shard_size=SHARD_SIZE
    )


def shard_times(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(cache_dir.glob("shard-*.safetensors"))}


@pytest.mark.slow
def test_reading_the_cache_equals_encoding_directly(dataset, cache_dir):
    index = json.loads((cache_dir / INDEX_FILE).read_text())
    assert index["count"] == len(dataset) == 18 and len(index["shards"]) == 4
    assert index["frame_latent_shape"] == [16, 4, 16, 16] and index["audio_latent_shape"] == [4, 16, 16]

    cache = LatentCacheDataset(cache_dir, num_target_frames=2, seed=dataset.config.seed)
    vae = tiny_vae()
    for i in (0, 4, 5, 17):  # around a shard boundary and the last, partial shard
        item, pixels = cache[i], dataset[i]
        with torch.no_grad():
            torch.testing.assert_close(
                item["key_latents"], vae.encode(pixels["key_frames"]), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                item["target_latents"], vae.encode(pixels["target_frames"]), rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                item["audio_latents"], vae.encode(pixels["audio_image"][None])[0], rtol=1e-5, atol=1e-5
            )
        # Same seed, same rule: the cache draws the target frames the pixel dataset draws.
        assert torch.equal(item["target_indices"], pixels["target_indices"])
        assert (item["class_id"], item["clip_id"]) == (pixels["class_id"], pixels["clip_id"])
        assert item["key_latents"].shape == (4, 4, 16, 16)

    draws = [cache[3]["target_indices"] for _ in range(2)]
    cache.set_epoch(1)
    assert torch.equal(draws[0], draws[1])
    assert any(
        not torch.equal(cache[i]["target_indices"], LatentCacheDataset(cache_dir)[i]["target_indices"])
        for i in range(18)
    )


def test_stale_cache_is_refused(dataset_config, cache_dir, tmp_path):
    vae = tiny_vae()
    assert cache_matches(cache_dir, dataset_config, vae)
    assert cache_matches(
        cache_dir, replace(dataset_config, num_target_frames=3, seed=7), vae
    )  # drawn at read time

    reason = cache_mismatch(cache_dir, replace(dataset_config, window_stride=4), vae)
    assert reason and "window_stride: cached 8, now 4" in reason
    assert "another VAE" in cache_mismatch(cache_dir, dataset_config, tiny_vae(seed=1))
    rescaled = tiny_vae()
    rescaled.scale = 0.5
    assert not cache_matches(cache_dir, dataset_config, rescaled)
    assert "unflipped" in cache_mismatch(cache_dir, replace(dataset_config, flip_p=0.5), vae)
    with pytest.raises(LatentCacheError, match="another VAE"):
        LatentCacheDataset(cache_dir, dataset_config=dataset_config, vae=tiny_vae(seed=1))
    with pytest.raises(LatentCacheError, match=r"no finished latent cache.*build_latent_cache"):
        LatentCacheDataset(tmp_path)


@pytest.mark.slow
def test_rebuild_reuses_finished_shards(dataset, cache_dir, tmp_path, monkeypatch):
    out_dir = tmp_path / "copy"
    out_dir.mkdir()
    for path in cache_dir.iterdir():
        (out_dir / path.name).write_bytes(path.read_bytes())
    before = shard_times(out_dir)
    (out_dir / "shard-00001.safetensors").unlink()  # as if the first build stopped there

    vae = tiny_vae()
    encoded = []
    original_encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, **kw: encoded.append(len(x)) or original_encode(x, **kw))
    build_latent_cache(dataset, vae, out_dir, batch_size=4, progress=False, shard_size=SHARD_SIZE)
    after = shard_times(out_dir)
    # Only the missing shard's windows 5-9 (clip 1 from frame 16, clip 2 from frames 0, 8, 16, clip 3
    # from 0): their 16 + 32 + 16 distinct frames and 5 audio images.
    assert sum(encoded) == 64 + SHARD_SIZE
    assert {k: v for k, v in after.items() if k != "shard-00001.safetensors"} == {
        k: v for k, v in before.items() if k != "shard-00001.safetensors"
    }
    assert json.loads((out_dir / INDEX_FILE).read_text()) == json.loads((cache_dir / INDEX_FILE).read_text())

    other = tiny_vae(seed=1)  # new inputs: every shard is re-encoded
    build_latent_cache(dataset, other, out_dir, batch_size=8, progress=False, shard_size=SHARD_SIZE)
    assert all(shard_times(out_dir)[k] != after[k] for k in after)
    assert cache_matches(out_dir, dataset.config, other)


@pytest.mark.parametrize("flip_p", [0.0, 0.5])
def test_overlapping_windows_encode_each_frame_once(dataset_config, tmp_path, monkeypatch, flip_p):
    """18 windows of 16 frames, 3 per 32-frame clip: 192 frames (each orientation with flips) and 18 audio
    images go through the VAE, not 18 * 16; batches of 4 windows straddle the clips."""
    config = replace(dataset_config, flip_p=flip_p)
    vae = tiny_vae()
    encoded = []
    original_encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, **kw: encoded.append(len(x)) or original_encode(x, **kw))
    out_dir = build_latent_cache(
        SoundingVideoDataset(config, return_all_frames=True), vae, tmp_path, batch_size=4, progress=False
    )
    orientations = 2 if flip_p else 1
    assert sum(encoded) == orientations * 6 * 32 + 18
    cache = LatentCacheDataset(out_dir, num_target_frames=16, seed=config.seed)
    first, second = cache[0]["target_latents"], cache[1]["target_latents"]  # frames 0-15 and 8-23 of clip 0
    assert torch.equal(first[8:], second[:8])


def test_a_torn_shard_is_re_encoded_not_fatal(dataset, cache_dir, tmp_path):
    out_dir = tmp_path / "torn"
    out_dir.mkdir()
    for path in cache_dir.iterdir():
        (out_dir / path.name).write_bytes(path.read_bytes())
    torn = out_dir / "shard-00001.safetensors"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a write killed half-way
    before = shard_times(out_dir)

    build_latent_cache(dataset, tiny_vae(), out_dir, batch_size=4, progress=False, shard_size=SHARD_SIZE)
    after = shard_times(out_dir)
    assert [k for k in after if after[k] != before[k]] == ["shard-00001.safetensors"]
    rebuilt, original = load_file(torn), load_file(cache_dir / torn.name)
    assert rebuilt.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(rebuilt[key], original[key])


def test_cache_needs_all_frames_and_an_unflipped_cache_refuses_flips(dataset_config, cache_dir, tmp_path):
    with pytest.raises(LatentCacheError, match="return_all_frames=True"):
        build_latent_cache(SoundingVideoDataset(dataset_config), tiny_vae(), tmp_path, progress=False)
    with pytest.raises(LatentCacheError, match="unflipped clips only"):
        LatentCacheDataset(cache_dir, flip_p=0.5)


def test_a_flipped_cache_gives_the_pixel_paths_inputs(dataset_config, tmp_path, plain_single_thread_cpu):
    """flip_p 0.5 (the paper presets): the cache stores both orientations and each item is the pixel
    dataset's item encoded in the training step, flipped alike, within float16 storage (epoch 1 of the 18
    windows: 8 of them flipped)."""
    config = replace(dataset_config, flip_p=0.5)
    vae = tiny_vae()
    cache_dir = build_latent_cache(
        SoundingVideoDataset(config, return_all_frames=True),
        vae,
        tmp_path,
        dtype=torch.float16,
        progress=False,
    )
    cache = LatentCacheDataset(cache_dir, seed=config.seed, dataset_config=config, vae=vae, flip_p=0.5)
    unflipped = LatentCacheDataset(cache_dir, seed=config.seed)
    pixels = SoundingVideoDataset(config)  # as training reads it: key and target frames only
    cache.set_epoch(1)
    pixels.set_epoch(1)
    step = pixels_to_latents(vae, default_collate([pixels[i] for i in range(len(pixels))]))
    flipped = 0
    for i in range(len(pixels)):
        cached = cache[i]
        for key in ("key_latents", "target_latents", "audio_latents"):
            torch.testing.assert_close(cached[key].float(), step[key][i], atol=2e-2, rtol=1e-2)
        assert torch.equal(cached["target_indices"], step["target_indices"][i])
        flipped += not torch.equal(cached["key_latents"], unflipped[i]["key_latents"])
    assert 0 < flipped < len(pixels), "every item came in one orientation: the flips were not drawn"


def test_auto_cache_folder_is_named_by_what_the_latents_depend_on(dataset_config, tmp_path):
    run_dir = tmp_path / "runs" / "ae-a"
    folder = auto_cache_dir(run_dir, dataset_config, tiny_vae())
    assert folder.parent == run_dir.parent and folder.name.startswith("vae-latents-synthetic-")
    assert auto_cache_dir(tmp_path / "runs" / "ae-b", dataset_config, tiny_vae()) == folder  # shared
    others = [
        auto_cache_dir(run_dir, replace(dataset_config, flip_p=0.5), tiny_vae()),
        auto_cache_dir(run_dir, replace(dataset_config, window_stride=4), tiny_vae()),
        auto_cache_dir(run_dir, dataset_config, tiny_vae(seed=1)),
    ]
    assert len({folder, *others}) == 4
    # Draws made at read time do not matter.
    assert auto_cache_dir(run_dir, replace(dataset_config, flip_p=0.3, seed=5), tiny_vae()) == others[0]


@pytest.mark.slow
def test_cached_reals_are_the_steps_own_real_decodes(dataset, tmp_path, plain_single_thread_cpu):
    """latent_cache_reals: the discriminator's reals read from the cache equal the step's VAE decodes of
    the same latents (fp32 cache: within 1e-4 of [-1, 1] pixels; the decodes ran at other batch
    sizes), and the step then decodes only its fakes."""
    from conftest import preset

    from mmldm_ae.autoencoder import MultiModalAutoencoder, build_discriminator

    vae = tiny_vae()
    cache_dir = build_latent_cache(dataset, vae, tmp_path, batch_size=4, reals=True, progress=False)
    cache = LatentCacheDataset(cache_dir, seed=3, reals=True)
    cache.set_epoch(1)
    batch = default_collate([cache[i] for i in (0, 7, 17)])
    assert batch["target_reals"].shape == (3, 2, 3, 32, 32) and batch["audio_reals"].shape == (3, 3, 32, 32)
    config = preset("ae", "tiny", resolution=32, vae_downsample=2, adversarial=True)
    torch.manual_seed(0)
    model, discriminator = MultiModalAutoencoder(config, num_classes=6), build_discriminator(config)
    decodes = []
    decode = vae.decode
    vae.decode = lambda z: decodes.append(len(z)) or decode(z)
    per_step = {k: v for k, v in batch.items() if k not in ("target_reals", "audio_reals")}
    losses = [
        model.training_losses(b, vae, discriminator, generator=torch.Generator().manual_seed(0))
        for b in (per_step, batch)
    ]
    assert decodes == [9, 9, 9]  # fakes and reals, then fakes only
    torch.testing.assert_close(losses[1]["disc_real"], losses[0]["disc_real"], atol=1e-4, rtol=0)
    torch.testing.assert_close(losses[1]["loss"], losses[0]["loss"])
    with pytest.raises(LatentCacheError, match="no VAE decodes"):
        LatentCacheDataset(build_latent_cache(dataset, vae, tmp_path / "plain", progress=False), reals=True)
