"""DiT training end to end at the tiny size: latent cache, exact resume, the tool, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_AE_DATASET, preset, run_tool, run_tool_in_process

from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.engine.trainer import TrainConfig, Trainer
from mmldm_ae.pipeline import load_autoencoder
from mmldm_data.config import ConfigError, DatasetConfig, compose, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_dit.dit import MMDiT
from mmldm_dit.latents import (
    INDEX_FILE,
    DiTLatentDataset,
    build_dit_latent_cache,
    dit_cache_mismatch,
)
from mmldm_dit.sampling import DiTLossConfig
from mmldm_dit.train_dit import DiTTrainingTask, PreviewConfig, train_dit_from_config

TOOL_SETTINGS = [
    "dataset.resolution=32",
    "dataset.mel.image_size=32",
    "dataset.window_stride=8",
    "train.batch_size=4",
    "train.log_every=1",
    "preview.samples=1",
    "preview.steps=2",
    "preview.ae_steps=2",
    "preview.vocoder=griffinlim",
]


def dataset_config(root: Path, **overrides) -> DatasetConfig:
    return to_typed(DatasetConfig, {"data_root": str(root), **TINY_AE_DATASET, **overrides})


@pytest.fixture(scope="module")
def pipeline(tiny_ae_run):
    return load_autoencoder(tiny_ae_run)


@pytest.fixture(scope="module")
def cache(tiny_dit_cache) -> Path:
    return tiny_dit_cache


def test_latent_cache_round_trip(synthetic_root, pipeline, cache):
    dataset = SoundingVideoDataset(dataset_config(synthetic_root))
    data = DiTLatentDataset(cache, dataset_config=dataset.config, pipeline=pipeline)
    assert len(data) == len(dataset) == 36  # 12 clips x windows at frames 0, 8, 16
    for index in (0, 13, 35):
        z_v, z_a = pipeline.encode_clips(torch.utils.data.default_collate([dataset[index]]))
        item = data[index]
        torch.testing.assert_close(item["z_a"], z_a[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["z_v"], z_v[0], rtol=1e-5, atol=1e-5)
        assert item["class_id"] == dataset[index]["class_id"] and item["clip_id"] == dataset[index]["clip_id"]
    everything = torch.stack([data[i]["z_v"] for i in range(len(data))])
    assert data.stats.video_mean == pytest.approx(everything.mean().item(), abs=1e-4)
    assert data.stats.video_std == pytest.approx(everything.std(unbiased=False).item(), rel=1e-3)
    standardised = data.stats.standardise("video", everything)
    assert standardised.std().item() == pytest.approx(1.0, rel=1e-2)
    torch.testing.assert_close(data.stats.unstandardise("video", standardised), everything)

    pairs = DiTLatentDataset(cache, previous_clips=True)
    assert len(pairs) == 12  # each file: the window at frame 16 follows the one at frame 0
    item = pairs[0]
    file, start = item["clip_id"].rsplit("@", 1)
    previous = data.index["clip_ids"].index(f"{file}@{int(start) - 16}")
    torch.testing.assert_close(item["prev_z_v"], data[previous]["z_v"])


def test_latent_cache_reuse_and_stale_detection(synthetic_root, pipeline, cache, tmp_path):
    shards = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")}
    dataset = SoundingVideoDataset(dataset_config(synthetic_root))
    build_dit_latent_cache(dataset, pipeline, cache, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*.safetensors")} == shards  # reused

    assert dit_cache_mismatch(cache, dataset.config, pipeline) is None
    other_data = dataset_config(synthetic_root, fps=8.0)
    assert "fps: cached 10.0, now 8.0" in dit_cache_mismatch(cache, other_data, pipeline)
    with torch.no_grad():
        next(pipeline.model.parameters()).add_(1.0)
    try:
        reason = dit_cache_mismatch(cache, dataset.config, pipeline)
        assert "another autoencoder" in reason
        with pytest.raises(LatentCacheError, match="stale"):
            DiTLatentDataset(cache, dataset_config=dataset.config, pipeline=pipeline)
    finally:
        with torch.no_grad():
            next(pipeline.model.parameters()).sub_(1.0)
    (tmp_path / "empty").mkdir()
    assert INDEX_FILE in dit_cache_mismatch(tmp_path / "empty", dataset.config, pipeline)


def make_task(pipeline, cache: Path, long: bool = False) -> tuple[DiTTrainingTask, DiTLatentDataset]:
    torch.manual_seed(0)
    data = DiTLatentDataset(cache, previous_clips=long)
    model = MMDiT(preset("dit", "tiny", previous_clip_depth=2 if long else 0))
    preview = PreviewConfig(samples=1, steps=2, ae_steps=2, clips=2, vocoder="griffinlim")
    task = RecordingTask(model, data.stats, DiTLossConfig(), {"long": long}, pipeline, preview)
    return task, data


class RecordingTask(DiTTrainingTask):
    """Records losses; previews are tested through the tool (decoding them is the slow part on CPU)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: list[float] = []

    def loss(self, optimizer, batch, step, modules):
        loss, numbers = super().loss(optimizer, batch, step, modules)
        self.recorded.append(round(loss.item(), 7))
        return loss, numbers

    def log_media(self, logger, step, run_dir):
        pass


@pytest.mark.parametrize("long", [False, True], ids=["joint", "long"])
def test_resumed_dit_run_matches_an_uninterrupted_one(pipeline, cache, tmp_path, long):
    settings = dict(batch_size=4, lr=1e-3, checkpoint_every=100, log_every=1, ema_decay=0.9)
    straight, data = make_task(pipeline, cache, long)
    Trainer(straight, data, TrainConfig(max_steps=3, **settings), tmp_path / "straight").train()
    first, data = make_task(pipeline, cache, long)
    Trainer(first, data, TrainConfig(max_steps=2, **settings), tmp_path / "split").train()
    second, data = make_task(pipeline, cache, long)
    Trainer(second, data, TrainConfig(max_steps=3, **settings), tmp_path / "split").train()
    assert len(straight.recorded) == 3 and first.recorded + second.recorded == straight.recorded


@pytest.mark.slow
def test_train_dit_tool_trains_resumes_and_checks_configs(
    synthetic_root, tiny_ae_run, tiny_dit_cache, tmp_path
):
    run_dir = tmp_path / "run"
    common = [
        f"ae_run={tiny_ae_run}",
        f"data_root={synthetic_root}",
        f"run_dir={run_dir}",
        f"latent_cache={tiny_dit_cache}",
        *TOOL_SETTINGS,
    ]
    first = run_tool("train_dit.py", *common, "train.max_steps=1")
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["step"] == 1 and summary["training_items"] == 36
    checkpoint = run_dir / "checkpoints" / "step_0000001"
    state = json.loads((checkpoint / "state.json").read_text())
    assert set(state["architecture"]["latent_stats"]) == {
        "audio_mean",
        "audio_std",
        "video_mean",
        "video_std",
    }
    assert (checkpoint / "dit.safetensors").is_file() and (checkpoint / "ema.safetensors").is_file()
    assert (run_dir / "samples" / "step_0000001" / "svg_0000.mp4").is_file()

    second = run_tool("train_dit.py", *common, "train.max_steps=2")
    assert "resumed from" in second.stderr and json.loads(second.stdout.strip().splitlines()[-1])["step"] == 2

    # The conditioning probe reads the run against its cache: each loss row with the true condition and
    # with another clip's of the same class.
    probe = run_tool_in_process(
        "probe_conditioning.py", str(run_dir), "--windows", "8", "--per-class", "1", "--steps", "2"
    )
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    gain, separation = report["loss_gain"], report["separation"]
    assert len(gain) == 6 and {"joint", "given", "other"} == set(gain[0]["v2a"])
    for row in separation.values():  # two different classes, apart; windows spread around their centroids
        first, second = row["closest"].split(" / ")
        assert first != second and first and second
        assert row["closest_distance"] > 0 and row["spread"] > 0
    assert "(another clip's)" in probe.stdout

    changed = run_tool_in_process(  # fails on resuming, before any step
        "train_dit.py", *common, "train.max_steps=3", "dit.depth=2", check=False
    )
    assert (
        changed.returncode == 2
        and "dit.depth: 4 -> 2" in changed.stderr
        and "Traceback" not in changed.stderr
    )


def compose_train_dit(*overrides: str):
    return compose(REPO_ROOT / "conf", "train_dit", ["run_dir=unused", *TOOL_SETTINGS, *overrides])


@pytest.mark.slow
def test_train_dit_config_errors_name_the_fix(synthetic_root, tiny_ae_run, tmp_path):
    with pytest.raises(ConfigError, match="ae_run is not set"):
        train_dit_from_config(compose_train_dit())
    with pytest.raises(ConfigError, match=r"dit.audio_latent_channels/size=8/2 .* dit.audio_latent_size=4"):
        train_dit_from_config(compose_train_dit(f"ae_run={tiny_ae_run}", "dit.audio_latent_size=2"))
    with pytest.raises(ConfigError, match=r"dataset.fps=8.0 .* was trained with 10.0"):
        train_dit_from_config(compose_train_dit(f"ae_run={tiny_ae_run}", "dataset.fps=8"))
