"""A trained model as one portable object: export, move, load, and a2v / v2a at any length."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from media_factory import stream_seconds
from safetensors.torch import load_file, save_file
from test_sample_tool import train_run
from torch import nn

from mmldm_ae.engine.checkpoint import ema_state_dict, load_ema_weights, newest_valid_checkpoint
from mmldm_ae.engine.logger import SampleRecord, WandbConfig, WandbLogger
from mmldm_data.config import ConfigError
from mmldm_data.media import write_video
from mmldm_dit import MMLDMPipeline
from mmldm_dit.generate import dissolve_joins
from mmldm_dit.pipeline import export_model

QUICK = dict(steps=1, ae_steps=1, vocoder="griffinlim")


@pytest.fixture(scope="module")
def exported(tiny_ae_run, synthetic_root, tiny_dit_cache, tmp_path_factory) -> Path:
    """A long-generation DiT (one training step, with an EMA) exported, then moved. The long model
    alone runs every task (its training drops the previous clip on some rows), at half the cost of
    training a one-clip model beside it."""
    folder = tmp_path_factory.mktemp("pipeline")
    data = (tiny_ae_run, synthetic_root, tiny_dit_cache)
    overrides = ("dit.previous_clip_depth=2", "train.ema_decay=0.9", "train.max_steps=2")  # EMA != weights
    long = train_run(*data, folder / "dit_long", *overrides)
    export_model(long, folder / "model")
    ema = load_file(newest_valid_checkpoint(long) / "ema.safetensors")
    exported = load_file(folder / "model" / "dit_long" / "model.safetensors")
    trained = load_file(newest_valid_checkpoint(long) / "dit.safetensors")
    assert ema.keys() <= exported.keys() and all(torch.equal(ema[k], exported[k]) for k in ema)  # by name
    assert not all(torch.equal(ema[k], trained[k]) for k in ema)  # the EMA, not the trained weights
    moved = tmp_path_factory.mktemp("elsewhere") / "my-model"
    shutil.move(folder / "model", moved)
    shutil.rmtree(folder)  # the runs, and with them every path the folder could point at
    return moved


@pytest.fixture(scope="module")
def pipe(exported) -> MMLDMPipeline:
    return MMLDMPipeline.from_pretrained(exported, device="cpu", dtype=torch.float32)


@pytest.mark.slow
def test_moved_model_folder_gives_a2v_from_an_array_and_a_5_s_v2a(exported, pipe, tmp_path):
    texts = [p.read_text() for p in exported.rglob("*") if p.suffix in (".json", ".md")]
    assert not any(str(exported.parent.parent) in text or '"/' in text for text in texts)  # nothing absolute
    card = (exported / "README.md").read_text()
    assert "| dit_long | 2 |" in card and "Licences" in card
    assert pipe.tasks == ("svg", "a2v", "v2a", "audio_continuation", "video_continuation", "long")

    song = 0.3 * np.sin(np.linspace(0, 1500, int(1.2 * pipe.sample_rate))).astype(np.float32)
    a2v = pipe(task="a2v", audio=song, seed=0, **QUICK)
    assert a2v.frames.shape == (12, 32, 32, 3) and a2v.frames.dtype == np.uint8
    np.testing.assert_array_equal(a2v.waveform, song)  # the given sound, not its re-synthesis
    half = pipe(task="a2v", audio=(22050, song[::2]), seconds=0.5, **QUICK)  # (rate, array) as Gradio gives
    assert half.frames.shape[0] == 5 and len(half.waveform) == pipe.sample_rate // 2

    video = tmp_path / "five_seconds.mp4"
    write_video(video, np.random.default_rng(0).integers(0, 255, (50, 40, 48, 3), np.uint8), 10.0)
    v2a = pipe(task="v2a", video=str(video), seed=0, **QUICK)
    assert len(v2a.waveform) == 5 * pipe.sample_rate and len(v2a.frames) == 50 and v2a.seconds == 5.0
    video_seconds, audio_seconds, frames = stream_seconds(v2a.save(tmp_path / "v2a.mp4"))
    assert frames == 50 and video_seconds == pytest.approx(5.0, abs=0.1)
    assert audio_seconds == pytest.approx(5.0, abs=0.05)


@pytest.mark.slow
def test_save_pretrained_round_trips_the_weights(pipe, tmp_path):
    again = MMLDMPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "copy"), dtype=torch.float32)
    for a, b in ((pipe.long_dit.model, again.long_dit.model), (pipe.autoencoder.vae, again.autoencoder.vae)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    assert again.long_dit.stats == pipe.long_dit.stats and again.class_names == pipe.class_names


@pytest.mark.slow
def test_compile_on_request_compiles_the_dit_and_the_decoder_unet_only(pipe):
    """from_pretrained(compile=True) marks the DiT and the decoder UNet for torch.compile (traced at the
    first call: tests/test_speed_sampling.py runs them); the weights keep their names."""
    compiled = MMLDMPipeline.from_pretrained(pipe.long_dit.checkpoint.parent, device="cpu", compile=True)
    is_compiled = lambda module: getattr(module, "_compiled_call_impl", None) is not None
    assert is_compiled(compiled.long_dit.model) and is_compiled(compiled.autoencoder.model.decoder.unet)
    assert not is_compiled(pipe.long_dit.model) and not is_compiled(compiled.autoencoder.vae)
    assert compiled.long_dit.model.state_dict().keys() == pipe.long_dit.model.state_dict().keys()


@pytest.mark.slow
def test_wrong_inputs_are_clear_errors(pipe, tmp_path):
    with pytest.raises(ConfigError, match="task a2v needs audio="):
        pipe(task="a2v", **QUICK)
    with pytest.raises(ConfigError, match="task v2a takes video, not audio"):
        pipe(task="v2a", audio=np.zeros(100, np.float32), video=np.zeros((4, 8, 8, 3), np.uint8), **QUICK)
    with pytest.raises(ConfigError, match="svg makes one clip"):
        pipe(task="svg", seconds=5, **QUICK)
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        MMLDMPipeline.from_pretrained(tmp_path)


def test_joins_dissolve_from_one_clip_into_the_next():
    clips = torch.stack([torch.zeros(6), torch.ones(6)])[None, :, :, None]  # [B=1, K=2, T=6, 1]
    joined = dissolve_joins(clips, 2)[0, :, 0]
    torch.testing.assert_close(joined, torch.tensor([0, 0, 0, 0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1]))
    assert torch.equal(dissolve_joins(clips, 0), clips.flatten(1, 2))  # no overlap: plain concatenation


def test_ema_weights_are_stored_by_name_and_survive_a_reordered_module(tmp_path):
    first = nn.Sequential()
    first.add_module("a", nn.Linear(2, 3))
    first.add_module("b", nn.Linear(3, 1))
    shadows = [torch.full_like(p, float(i)) for i, p in enumerate(first.parameters())]
    save_file(ema_state_dict(first, shadows), tmp_path / "ema.safetensors")
    assert set(load_file(tmp_path / "ema.safetensors")) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    reordered = nn.Sequential()  # same names, other parameter order
    reordered.add_module("b", nn.Linear(3, 1))
    reordered.add_module("a", nn.Linear(2, 3))
    assert load_ema_weights(reordered, tmp_path)
    assert torch.all(reordered.a.weight == 0) and torch.all(reordered.b.bias == 3)
    with pytest.raises(ValueError, match="does not match the model"):
        load_ema_weights(nn.Linear(2, 3), tmp_path)


def test_samples_table_and_model_artifact_reach_wandb(monkeypatch, tmp_path):
    logged, artifacts = [], []

    class FakeRun:
        def log(self, values, step):
            logged.append(values)

        def log_artifact(self, artifact):
            artifacts.append(artifact)

    import wandb

    logger = WandbLogger(WandbConfig(mode="disabled"), tmp_path, {})
    logger.run, logger._wandb = FakeRun(), wandb
    wave = np.zeros(4410, np.float32)
    logger.log_samples("samples", [SampleRecord(None, wave, 44100, "v2a", "clip.mp4", "circle")], step=0)
    table = logged[0]["samples"]
    assert table.columns == ["video", "audio", "task", "condition", "class"]
    assert isinstance(table.data[0][1], wandb.Audio) and table.data[0][2:] == ["v2a", "clip.mp4", "circle"]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(json.dumps({}))
    logger.log_model(tmp_path / "model", "my-model")
    assert artifacts[0].type == "model" and artifacts[0].name == "my-model"
