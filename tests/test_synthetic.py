from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tool_in_process
from scipy.optimize import linear_sum_assignment

from mmldm_data.media import probe_media, read_video
from mmldm_data.metrics.oracle import read_oracles
from mmldm_data.synthetic import (
    CLASS_NAMES,
    CLASS_SETS,
    COLOUR_PITCH,
    SHAPE_TIMBRE,
    SyntheticConfig,
    audio_class_oracle,
    impact_frames_oracle,
    onset_times_oracle,
    render_clip,
    shape_class_oracle,
    synthetic_class_set,
    timbre_class_oracle,
    video_class_oracle,
    write_synthetic_dataset,
)
from mmldm_data.video import letterbox, to_uint8_frames

CFG = SyntheticConfig()
SHAPES = SyntheticConfig(classes=SHAPE_TIMBRE)
NUM_CLIPS = 60  # 10 per class


def _same_events(found: list[float], expected: list[float], tolerance: float) -> bool:
    return len(found) == len(expected) and all(
        abs(a - b) <= tolerance for a, b in zip(found, expected, strict=True)
    )


def _with_noise(
    rng: np.random.Generator, frames: np.ndarray, audio: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The noise every oracle must shrug off: sigma 6 of 255 on pixels, 0.01 on samples."""
    noisy_frames = np.clip(frames + rng.normal(0, 6, frames.shape), 0, 255).astype(np.uint8)
    return noisy_frames, audio + rng.normal(0, 0.01, audio.shape).astype(np.float32)


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
    with pytest.raises(ValueError, match="classes must be one of colour_pitch, shape_timbre"):
        SyntheticConfig(classes="shapes")


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
        noisy_frames, noisy_audio = _with_noise(rng, frames, audio)
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
    assert shape_class_oracle(np.full((4, 16, 16, 3), 50, np.uint8)) == -1
    assert impact_frames_oracle(np.full((4, 16, 16, 3), 50, np.uint8)) == []
    assert audio_class_oracle(np.zeros(4410), 44100) == -1
    assert timbre_class_oracle(np.zeros(4410), 44100) == -1
    assert onset_times_oracle(np.zeros(44100), 44100) == []
    specks = np.full((4, 16, 16, 3), 50, np.uint8)
    specks[:, 3, 3] = (230, 100, 40)  # a coloured pixel is no silhouette
    assert shape_class_oracle(specks) == -1


# ---------------------------------------------------------------- the shape/timbre class set


def test_shape_timbre_oracles_read_every_class_clean_and_noisy():
    rng = np.random.default_rng(0)
    misread = []
    for seed in (1, 2):
        for class_id in range(SHAPES.num_classes):
            clip = render_clip(class_id, seed, SHAPES)
            for name, (frames, audio) in {
                "clean": (clip.frames, clip.audio),
                "noisy": _with_noise(rng, clip.frames, clip.audio),
            }.items():
                found = (
                    shape_class_oracle(frames),
                    timbre_class_oracle(audio, SHAPES.sample_rate),
                    _same_events(impact_frames_oracle(frames), clip.impact_frames, 1),
                    _same_events(
                        onset_times_oracle(audio, SHAPES.sample_rate), clip.onset_times, 1 / SHAPES.fps
                    ),
                )
                if found != (class_id, class_id, True, True):
                    misread.append((class_id, seed, name, found))
    assert not misread, misread


def test_shape_oracle_at_256_pixels():
    cfg = SyntheticConfig(classes=SHAPE_TIMBRE, resolution=256, duration=1.6)
    for class_id in range(cfg.num_classes):
        clip = render_clip(class_id, seed=100 + class_id, cfg=cfg)
        assert clip.frames.shape == (16, 256, 256, 3)
        assert shape_class_oracle(clip.frames) == class_id


def _one_to_one_accuracy(truth: list[int], read: list[int], classes: int) -> float:
    """Accuracy of the best one-to-one renaming of the readings: 1 when they separate the classes."""
    counts = np.zeros((classes, classes + 1))
    np.add.at(counts, (truth, read), 1)  # a reading of -1 lands in the last column, never matched
    rows, columns = linear_sum_assignment(counts[:, :classes], maximize=True)
    return counts[rows, columns].sum() / len(truth)


def test_shape_timbre_classes_differ_neither_by_colour_nor_by_pitch():
    readings = {name: {"truth": [], "colour": [], "pitch": []} for name in CLASS_SETS}
    for name in CLASS_SETS:
        cfg = SyntheticConfig(classes=name, duration=1.6)
        for seed in range(3):
            for class_id in range(cfg.num_classes):
                clip = render_clip(class_id, seed, cfg)
                readings[name]["truth"].append(class_id)
                readings[name]["colour"].append(video_class_oracle(clip.frames))
                readings[name]["pitch"].append(audio_class_oracle(clip.audio, cfg.sample_rate))
    separated = {
        (name, oracle): _one_to_one_accuracy(found["truth"], found[oracle], 6)
        for name, found in readings.items()
        for oracle in ("colour", "pitch")
    }
    assert separated[COLOUR_PITCH, "colour"] == separated[COLOUR_PITCH, "pitch"] == 1.0
    # One colour: the hue oracle gives all six classes the same answer.
    assert len(set(readings[SHAPE_TIMBRE]["colour"])) == 1
    # One pitch range: the pitch oracle, whose tone templates also catch some of the envelope (the
    # vowels' first formant, the hiss's highs), reads some classes alike; on the colour set it never does.
    assert separated[SHAPE_TIMBRE, "pitch"] < 0.8, separated


@pytest.fixture(scope="module")
def shape_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_synthetic_dataset(out, SHAPES.num_classes, seed=5, cfg=SHAPES, progress=False)
    return out


def test_shape_timbre_dataset_records_its_class_set(shape_dataset, tmp_path):
    metadata = json.loads((shape_dataset / "metadata.json").read_text())
    assert metadata["config"]["classes"] == SHAPE_TIMBRE
    assert metadata["class_names"] == list(CLASS_SETS[SHAPE_TIMBRE])
    assert sorted(path.name for path in shape_dataset.iterdir() if path.is_dir()) == sorted(
        CLASS_SETS[SHAPE_TIMBRE]
    )
    assert synthetic_class_set(shape_dataset) == SHAPE_TIMBRE
    assert synthetic_class_set(tmp_path) is None  # not a synthetic folder: no oracles
    del metadata["config"]["classes"]
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    assert synthetic_class_set(tmp_path) == COLOUR_PITCH  # written before there was a choice


def test_shape_timbre_oracles_through_mp4_and_letterbox(shape_dataset):
    for clip in json.loads((shape_dataset / "metadata.json").read_text())["clips"]:
        media = read_video(shape_dataset / clip["path"], SHAPES.fps, sample_rate=SHAPES.sample_rate)
        reading = read_oracles(media.frames, media.audio, SHAPES.fps, SHAPES.sample_rate, SHAPE_TIMBRE)
        assert (reading.video_class, reading.audio_class) == (clip["class_id"], clip["class_id"])
        assert _same_events(reading.impact_frames, clip["impact_frames"], 1)
        assert shape_class_oracle(to_uint8_frames(letterbox(media.frames, 48))) == clip["class_id"]


def _make_synthetic(*args: str) -> subprocess.CompletedProcess:
    return run_tool_in_process("make_synthetic.py", *args, check=False)


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

    shapes = _make_synthetic(
        "--out", str(out), "--num-clips", "2", "--seed", "3", "--num-classes", "2", "--duration", "1.6",
        "--classes", "shape_timbre", "--quiet",
    )  # fmt: skip
    assert shapes.returncode == 0, shapes.stderr
    assert {path.parent.name for path in out.rglob("*.mp4")} == set(CLASS_SETS["shape_timbre"][:2])
    assert synthetic_class_set(out) == "shape_timbre"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = _make_synthetic("--out", str(foreign), "--num-clips", "2", "--seed", "0")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    bad = _make_synthetic(
        "--out", str(tmp_path / "x"), "--num-clips", "2", "--seed", "0", "--num-classes", "9"
    )
    assert bad.returncode == 2 and "num_classes" in bad.stderr
