"""Sampling from a trained DiT: every task end to end, seeds, inputs, and errors before models load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO_ROOT, run_tool_in_process
from media_factory import stream_seconds

from mmldm_data.config import ConfigError, compose
from mmldm_data.media import MediaError
from mmldm_data.tasks import CROSS_MODAL_TASKS, Task
from mmldm_dit.generate import SampleConfig, decode_media, generate, load_trained_dit, sample_clips
from mmldm_dit.train_dit import train_dit_from_config

QUICK = dict(num_samples=1, batch_size=1, steps=2, ae_steps=2, vocoder="griffinlim", num_clips=1)
TRAIN_SETTINGS = [
    "dataset.resolution=32",
    "dataset.mel.image_size=32",
    "dataset.window_stride=8",
    "train.max_steps=1",
    "train.batch_size=4",
    "preview.samples=1",
    "preview.steps=2",
    "preview.ae_steps=2",
    "preview.clips=1",
    "preview.vocoder=griffinlim",
]


def train_run(ae_run: Path, root: Path, cache: Path, run_dir: Path, *overrides: str) -> Path:
    cfg = compose(
        REPO_ROOT / "conf",
        "train_dit",
        [
            f"ae_run={ae_run}",
            f"data_root={root}",
            f"run_dir={run_dir}",
            f"latent_cache={cache}",
            *TRAIN_SETTINGS,
            *overrides,
        ],
    )
    train_dit_from_config(cfg)
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_ae_run, synthetic_root, tiny_dit_cache, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dit-runs")
    data = (tiny_ae_run, synthetic_root, tiny_dit_cache)
    return {
        "joint": train_run(*data, folder / "joint"),
        "long": train_run(*data, folder / "long", "dit.previous_clip_depth=2"),
    }


@pytest.fixture(scope="module")
def dits(runs):
    return {name: load_trained_dit(run) for name, run in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(Task))
def test_every_task_writes_a_playable_sounding_video(dits, tmp_path, task):
    dit = dits["long" if task.needs_long_model else "joint"]
    clips = 2 if task == Task.long else 1
    settings = QUICK | {"num_clips": clips}
    summary = generate(dit, SampleConfig(run="in-memory", task=task, out_dir=str(tmp_path), **settings))
    assert summary["frames_per_sample"] == 16 * clips
    video_seconds, audio_seconds, frames = stream_seconds(tmp_path / f"{task}_0000.mp4")
    assert frames == 16 * clips
    assert video_seconds == pytest.approx(1.6 * clips, abs=0.1)
    assert audio_seconds == pytest.approx(video_seconds, abs=0.05)  # AAC frames pad the end by < 24 ms
    wave, rate = soundfile.read(tmp_path / f"{task}_0000.wav")
    assert rate == 44100 and len(wave) == 70560 * clips
    assert (tmp_path / f"{task}_0000.png").is_file()
    if task.cross_modal:
        conditions = json.loads((tmp_path / "conditions.json").read_text())
        assert conditions[f"{task}_0000.mp4"]["task"] == task
        assert conditions[f"{task}_0000.mp4"]["class"] in dit.pipeline.class_names
        assert summary["sources"] and "@" in summary["sources"][0]  # a dataset window


@pytest.mark.slow
def test_same_seed_gives_the_same_sample(dits):
    dit = dits["joint"]
    config = SampleConfig(run="in-memory", task="svg", **QUICK)
    first, second, other = (sample_clips(dit, config, None, seed, 1) for seed in (0, 0, 1))
    for modality in first:
        torch.testing.assert_close(first[modality], second[modality], rtol=0, atol=0)
        assert not torch.equal(first[modality], other[modality])
    media = [decode_media(dit.pipeline, latents, 2, "griffinlim", seed=0)[0] for latents in (first, second)]
    np.testing.assert_array_equal(media[0].frames, media[1].frames)
    np.testing.assert_array_equal(media[0].wave, media[1].wave)


@pytest.mark.slow
def test_a2v_from_an_audio_file_of_another_rate_and_length(runs, tmp_path):
    song = tmp_path / "song.wav"
    seconds = np.arange(int(2.5 * 16000)) / 16000
    soundfile.write(song, np.stack([np.sin(2 * np.pi * 440 * seconds)] * 2, axis=1) * 0.3, 16000)
    out = tmp_path / "out"
    result = run_tool_in_process(
        "sample.py",
        f"run={runs['joint']}",
        f"long_run={runs['long']}",  # chains the song's two windows
        "task=a2v",
        f"input={song}",
        f"out_dir={out}",
        *(f"{k}={v}" for k, v in QUICK.items()),
    )
    log = result.stdout + result.stderr  # Hydra sends log records to stdout
    assert "2-channel 16000 Hz resampled to mono 44100 Hz" in log
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["task"] == "a2v" and summary["sources"] == [str(song)]
    assert summary["frames_per_sample"] == 25  # the song's 2.5 s, not one clip
    video_seconds, audio_seconds, frames = stream_seconds(out / "a2v_0000.mp4")
    assert frames == 25 and audio_seconds == pytest.approx(2.5, abs=0.05)
    kept, rate = soundfile.read(out / "a2v_0000.wav", dtype="float32")
    assert (
        rate == 44100
        and np.corrcoef(kept[:1000], np.sin(2 * np.pi * 440 * np.arange(1000) / rate))[0, 1] > 0.99
    )
    assert not (out / "conditions.json").exists()  # a file has no class


@pytest.mark.slow
def test_config_errors_are_reported_before_any_model_loads(tmp_path):
    result = run_tool_in_process(
        "sample.py", f"run={tmp_path / 'no-such-run'}", "task=bogus", "guidance_audio=-1", check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown task 'bogus'" in result.stderr and "guidance_audio must be >= 0" in result.stderr
    assert "no-such-run" not in result.stderr  # nothing was loaded


def test_unreadable_or_missing_input_files_are_clear_errors(dits, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    for task in CROSS_MODAL_TASKS:
        with pytest.raises(MediaError, match="broken.mp4: not a readable media file"):
            generate(dits["joint"], SampleConfig(run="x", task=task, input=str(broken), **QUICK))
    with pytest.raises(FileNotFoundError, match="input file .*missing.wav does not exist"):
        generate(
            dits["joint"],
            SampleConfig(run="x", task="a2v", input=str(tmp_path / "missing.wav"), **QUICK),
        )
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(0), 16000)
    with pytest.raises(MediaError, match="silent.wav: the audio stream is empty"):
        generate(dits["joint"], SampleConfig(run="x", task="a2v", input=str(silent), **QUICK))
    with pytest.raises(ConfigError, match="needs the long-generation model"):
        generate(dits["joint"], SampleConfig(run="x", task="long", out_dir=str(tmp_path), **QUICK))


@pytest.mark.slow
def test_sampling_twice_into_one_folder_keeps_only_the_second_run(dits, tmp_path):
    song = tmp_path / "song.wav"
    soundfile.write(song, 0.3 * np.sin(np.linspace(0, 2000, 70560)), 44100)
    out = tmp_path / "out"
    settings = QUICK | {"out_dir": str(out)}
    generate(
        dits["joint"], SampleConfig(run="x", task="a2v", **settings | {"num_samples": 3, "batch_size": 3})
    )
    assert len(json.loads((out / "conditions.json").read_text())) == 3  # dataset windows have classes
    generate(dits["joint"], SampleConfig(run="x", task="a2v", input=str(song), **settings))
    assert sorted(p.name for p in out.iterdir()) == [
        "a2v_0000.mp4",
        "a2v_0000.png",
        "a2v_0000.wav",
        "samples.json",
    ]  # the file has no class: no conditions.json, and none of the first run's is left to label it

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "conditions.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a conditions.json this tool did not list"):
        generate(dits["joint"], SampleConfig(run="x", task="svg", **QUICK | {"out_dir": str(foreign)}))
