from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmldm_data.media import probe_media, read_video
from mmldm_data.synthetic import (
    CLASS_NAMES,
    SyntheticConfig,
    audio_class_oracle,
    impact_frames_oracle,
    onset_times_oracle,
    render_clip,
    video_class_oracle,
    write_synthetic_dataset,
)
from mmldm_data.video import letterbox, to_uint8_frames

REPO = Path(__file__).resolve().parents[1]
CFG = SyntheticConfig()
NUM_CLIPS = 60  # 10 per class


def _same_events(found: list[float], expected: list[float], tolerance: float) -> bool:
    return len(found) == len(expected) and all(
        abs(a - b) <= tolerance for a, b in zip(found, expected, strict=True)
    )


@pytest.fixture(scope="module")
def decoded_dataset(tmp_path_factory) -> list[tuple[dict, np.ndarray, np.ndarray]]:
    """(metadata, frames, audio) of every clip, decoded back from the written mp4 files."""
    out = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic_dataset(out, NUM_CLIPS, seed=11, cfg=CFG, progress=False)
    assert summary["num_clips"] == NUM_CLIPS and summary["num_classes"] == len(CLASS_NAMES)
    metadata = json.loads((out / "metadata.json").read_text())
    decoded = []
    for clip in metadata["clips"]:
        media = read_video(out / clip["path"], CFG.fps, sample_rate=CFG.sample_rate)
        decoded.append((clip, media.frames, media.audio))
    return decoded


def test_render_is_deterministic_and_classes_differ():
    first, again = render_clip(2, seed=5, cfg=CFG), render_clip(2, seed=5, cfg=CFG)
    np.testing.assert_array_equal(first.frames, again.frames)
    np.testing.assert_array_equal(first.audio, again.audio)
    assert first.impact_frames == again.impact_frames
    assert not np.array_equal(first.frames, render_clip(2, seed=6, cfg=CFG).frames)
    assert first.frames.shape == (32, 64, 64, 3) and first.frames.dtype == np.uint8
    assert first.audio.shape == (round(3.2 * 44100),) and first.audio.dtype == np.float32
    assert np.abs(first.audio).max() <= 1.0


def test_impacts_are_onsets_and_every_window_has_one():
    for seed in range(30):
        clip = render_clip(seed % CFG.num_classes, seed, CFG)
        assert clip.impact_frames == [round(t * CFG.fps) for t in clip.onset_times]
        assert all(2 <= frame <= CFG.num_frames - 3 for frame in clip.impact_frames)  # clear of the ends
        for window_start in range(CFG.num_frames - 16 + 1):
            assert any(window_start <= frame < window_start + 16 for frame in clip.impact_frames)


def test_config_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticConfig(num_classes=len(CLASS_NAMES) + 1)
    with pytest.raises(ValueError, match="resolution"):
        SyntheticConfig(resolution=8)
    with pytest.raises(ValueError, match="class_id"):
        render_clip(4, seed=0, cfg=SyntheticConfig(num_classes=3))


def test_written_dataset_layout(decoded_dataset):
    clips = [clip for clip, _, _ in decoded_dataset]
    assert [clip["class_id"] for clip in clips] == [index % len(CLASS_NAMES) for index in range(NUM_CLIPS)]
    assert all(clip["path"].startswith(clip["class_name"] + "/") for clip in clips)
    assert all(frames.shape == (32, 64, 64, 3) for _, frames, _ in decoded_dataset)


@pytest.mark.slow
def test_oracles_on_decoded_clips(decoded_dataset):
    rng = np.random.default_rng(0)
    scores = dict.fromkeys(
        ["video_class", "audio_class", "impacts", "onsets", "noisy_video", "noisy_audio"], 0
    )
    for clip, frames, audio in decoded_dataset:
        truth = clip["class_id"]
        noisy_frames = np.clip(frames + rng.normal(0, 6, frames.shape), 0, 255).astype(np.uint8)
        noisy_audio = audio + rng.normal(0, 0.01, audio.shape).astype(np.float32)
        scores["video_class"] += video_class_oracle(frames) == truth
        scores["audio_class"] += audio_class_oracle(audio, CFG.sample_rate) == truth
        scores["impacts"] += _same_events(impact_frames_oracle(frames), clip["impact_frames"], 1)
        scores["onsets"] += _same_events(
            onset_times_oracle(audio, CFG.sample_rate), clip["onset_times"], 1 / CFG.fps
        )
        scores["noisy_video"] += video_class_oracle(noisy_frames) == truth and _same_events(
            impact_frames_oracle(noisy_frames), clip["impact_frames"], 1
        )
        scores["noisy_audio"] += audio_class_oracle(noisy_audio, CFG.sample_rate) == truth and _same_events(
            onset_times_oracle(noisy_audio, CFG.sample_rate), clip["onset_times"], 1 / CFG.fps
        )
    accuracy = {name: hits / NUM_CLIPS for name, hits in scores.items()}
    assert min(accuracy.values()) >= 0.99, accuracy


def test_oracles_on_letterboxed_frames(decoded_dataset):
    for clip, frames, _ in decoded_dataset[: len(CLASS_NAMES)]:
        # Through the model transform and back, at a size that is neither the source's nor a square of it.
        boxed = to_uint8_frames(letterbox(frames, 48))
        assert video_class_oracle(boxed) == clip["class_id"]
        assert _same_events(impact_frames_oracle(boxed), clip["impact_frames"], 1)


def test_oracles_at_256_pixels():
    cfg = SyntheticConfig(resolution=256)
    for class_id in range(cfg.num_classes):
        clip = render_clip(class_id, seed=100 + class_id, cfg=cfg)
        assert clip.frames.shape == (32, 256, 256, 3)
        assert video_class_oracle(clip.frames) == class_id
        assert _same_events(impact_frames_oracle(clip.frames), clip.impact_frames, 1)


def test_oracles_on_empty_media():
    assert video_class_oracle(np.full((4, 16, 16, 3), 50, np.uint8)) == -1
    assert impact_frames_oracle(np.full((4, 16, 16, 3), 50, np.uint8)) == []
    assert audio_class_oracle(np.zeros(4410), 44100) == -1
    assert onset_times_oracle(np.zeros(44100), 44100) == []


def _make_synthetic(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_synthetic.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_synthetic_tool(tmp_path):
    out = tmp_path / "dataset"
    result = _make_synthetic(
        "--out", str(out), "--num-clips", "4", "--seed", "3", "--num-classes", "2", "--duration", "1.6"
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 4 clips, 2 classes" in result.stdout.strip().splitlines()[-1]
    written = sorted(path.relative_to(out).as_posix() for path in out.rglob("*.mp4"))
    assert written == ["green_square/green_square_00001.mp4", "green_square/green_square_00003.mp4",
                       "red_circle/red_circle_00000.mp4", "red_circle/red_circle_00002.mp4"]  # fmt: skip
    assert probe_media(out / written[0]).duration == pytest.approx(1.6, abs=1e-3)

    # Its own folder is replaced, without stale clips; a foreign non-empty folder needs --overwrite.
    again = _make_synthetic(
        "--out",
        str(out),
        "--num-clips",
        "2",
        "--seed",
        "3",
        "--num-classes",
        "2",
        "--duration",
        "1.6",
        "--quiet",
    )
    assert again.returncode == 0, again.stderr
    assert len(list(out.rglob("*.mp4"))) == 2

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = _make_synthetic("--out", str(foreign), "--num-clips", "2", "--seed", "0")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    bad = _make_synthetic(
        "--out", str(tmp_path / "x"), "--num-clips", "2", "--seed", "0", "--num-classes", "9"
    )
    assert bad.returncode == 2 and "num_classes" in bad.stderr
