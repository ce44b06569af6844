"""The sounding-video dataset: windows, items, the cached index, labels, splits and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_tool_in_process
from media_factory import tone, truncate, write_test_video

from mmldm_data.config import ConfigError, DatasetConfig, compose, dataset_config_from, to_typed
from mmldm_data.dataset import DatasetError, SoundingVideoDataset, is_validation_file

CLIP_FRAMES = 32  # the synthetic fixture's clips: 3.2 s at 10 fps


def synthetic_config(root: Path, **overrides) -> DatasetConfig:
    return to_typed(
        DatasetConfig, {"data_root": str(root), "resolution": 64, "mel": {"image_size": 64}, **overrides}
    )


def test_windows_slide_over_every_file(synthetic_root):
    dataset = SoundingVideoDataset(synthetic_config(synthetic_root))
    windows_per_file = CLIP_FRAMES - 16 + 1
    assert dataset.summary.usable_files == 12
    assert len(dataset) == 12 * windows_per_file
    assert len(dataset.class_names) == 6
    assert set(dataset.summary.classes.values()) == {2 * windows_per_file}
    strided = SoundingVideoDataset(synthetic_config(synthetic_root, window_stride=4))
    assert len(strided) == 12 * len(range(0, windows_per_file, 4))


def test_item_layout(synthetic_root):
    dataset = SoundingVideoDataset(synthetic_config(synthetic_root), return_all_frames=True)
    item = dataset[5]
    assert item["key_frames"].shape == (4, 3, 64, 64)
    assert item["target_frames"].shape == (2, 3, 64, 64)
    assert item["audio_image"].shape == (3, 64, 64)
    assert item["audio"].shape == (70_560,)
    assert item["frames"].shape == (16, 3, 64, 64)
    for key in ("key_frames", "target_frames", "audio_image", "frames"):
        assert item[key].dtype == torch.float32
        assert -1.0 <= item[key].min() and item[key].max() <= 1.0
    torch.testing.assert_close(item["key_frames"], item["frames"][[0, 5, 10, 15]])
    positions = (item["target_indices"] * 16).round().long()
    assert positions[0] < positions[1], "two distinct target frames, in order"
    torch.testing.assert_close(item["target_frames"], item["frames"][positions])
    file_position, start = dataset.windows[5]
    assert item["clip_id"] == f"{dataset.files[file_position].path}@{start}"
    assert (item["file"], item["start_frame"]) == (dataset.files[file_position].path, start)
    assert item["class_id"] == dataset.file_classes[file_position]
    assert dataset.class_names[item["class_id"]] == dataset.files[file_position].path.split("/")[0]
    # Without return_all_frames only the frames the item holds are converted: the same values.
    lean = SoundingVideoDataset(synthetic_config(synthetic_root))[5]
    assert "frames" not in lean
    for key in ("key_frames", "target_frames", "target_indices"):
        torch.testing.assert_close(lean[key], item[key], rtol=0, atol=0)


def test_kept_decoded_files_give_the_same_windows_from_one_decode_each(synthetic_root, monkeypatch):
    import mmldm_data.dataset as dataset_module

    plain = SoundingVideoDataset(synthetic_config(synthetic_root), return_all_frames=True)
    kept = SoundingVideoDataset(synthetic_config(synthetic_root, keep_decoded=True), return_all_frames=True)
    windows_per_file = CLIP_FRAMES - 16 + 1
    # The first, a middle and the last window of two files (the last one ends with the file).
    indices = (0, 7, windows_per_file - 1, windows_per_file + 4)
    expected = [plain[index] for index in indices]
    reads = []
    read_video = dataset_module.read_video
    counting = lambda *args, **kwargs: reads.append(args[0]) or read_video(*args, **kwargs)
    monkeypatch.setattr(dataset_module, "read_video", counting)
    for index, theirs in zip(indices, expected, strict=True):
        ours = kept[index]
        torch.testing.assert_close(ours["frames"], theirs["frames"], rtol=0, atol=0)
        # The sound agrees after the first 25 ms, where a window read alone decodes AAC after a seek.
        skip = round(0.025 * plain.config.mel.sample_rate)
        torch.testing.assert_close(ours["audio"][skip:], theirs["audio"][skip:], rtol=0, atol=2e-3)
        assert ours["audio"].shape == theirs["audio"].shape
    assert len(reads) == 2, "each file is decoded once"


def test_random_draws_are_a_function_of_seed_epoch_and_index(synthetic_root):
    dataset = SoundingVideoDataset(synthetic_config(synthetic_root, flip_p=0.5))
    draws = [dataset[3]["target_indices"] for _ in range(2)]
    torch.testing.assert_close(draws[0], draws[1])
    per_epoch = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        per_epoch.append(tuple(dataset[3]["target_indices"].tolist()))
    assert len(set(per_epoch)) > 1


def test_index_is_cached_and_follows_file_changes(synthetic_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic_root, root)
    first = SoundingVideoDataset(synthetic_config(root))
    assert first.summary.reindexed_files == 12
    assert SoundingVideoDataset(synthetic_config(root)).summary.reindexed_files == 0

    broken = sorted(root.glob("*/*.mp4"))[0]
    truncate(broken, 0.5)  # an mp4 cut short loses its index (moov) and becomes unreadable
    added = write_test_video(root / broken.parent.name / "extra.mp4", seconds=2.0, audio=tone(2.0, 44100))
    after = SoundingVideoDataset(synthetic_config(root))
    assert after.summary.reindexed_files == 2
    assert after.summary.usable_files == 12 and after.summary.skipped == {"unreadable": 1}
    assert len(after) == len(first) - (CLIP_FRAMES - 16 + 1) + (20 - 16 + 1)
    added.unlink()
    assert SoundingVideoDataset(synthetic_config(root)).summary.usable_files == 11


def test_split_is_held_out_by_file(synthetic_root):
    train = SoundingVideoDataset(synthetic_config(synthetic_root, split="train", val_fraction=0.3))
    val = SoundingVideoDataset(synthetic_config(synthetic_root, split="val", val_fraction=0.3))
    train_files = {r.path for r in train.files}
    val_files = {r.path for r in val.files}
    assert train_files.isdisjoint(val_files)
    assert len(train_files | val_files) == 12 and val_files
    assert train.class_names == val.class_names
    fractions = np.mean([is_validation_file(f"clip{i}.mp4", 0.2, seed=0) for i in range(4000)])
    assert abs(fractions - 0.2) < 0.03


def test_classes_from_label_files_and_patterns(tmp_path):
    root = tmp_path / "flat"
    for name in ("gBR_sBM_c01_d04_mBR0_ch01", "gPO_sBM_c02_d11_mPO1_ch02", "noclass"):
        write_test_video(root / f"{name}.mp4", audio=tone(2.0, 44100))
    by_pattern = SoundingVideoDataset(
        to_typed(
            DatasetConfig,
            {
                "data_root": str(root),
                "class_source": "pattern",
                "class_pattern": "_(m[A-Z]{2}[0-9])_",
                "resolution": 32,
            },
        )
    )
    assert by_pattern.class_names == ["mBR0", "mPO1"]
    assert by_pattern.summary.to_json()["skipped_reasons"] == {
        "no class (name does not match class_pattern)": 1
    }

    (tmp_path / "labels.csv").write_text("path,label\ngBR_sBM_c01_d04_mBR0_ch01.mp4,dance\nnoclass,silence\n")
    (tmp_path / "labels.json").write_text(
        json.dumps({"gPO_sBM_c02_d11_mPO1_ch02": {"class_id": 3, "class_name": "pop"}})
    )
    by_csv = SoundingVideoDataset(
        to_typed(
            DatasetConfig,
            {
                "data_root": str(root),
                "class_source": "label_file",
                "label_file": str(tmp_path / "labels.csv"),
                "resolution": 32,
            },
        )
    )
    assert by_csv.class_names == ["dance", "silence"] and by_csv.summary.usable_files == 2
    by_json = SoundingVideoDataset(
        to_typed(
            DatasetConfig,
            {
                "data_root": str(root),
                "class_source": "label_file",
                "label_file": str(tmp_path / "labels.json"),
                "resolution": 32,
            },
        )
    )
    assert by_json.class_names == ["pop"]
    assert by_json.summary.skipped["no class (not in the label file)"] == 2


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory, synthetic_root) -> Path:
    """Two good synthetic clips beside every kind of awkward or broken file."""
    root = tmp_path_factory.mktemp("mixed")
    for source in sorted(synthetic_root.glob("*/*.mp4"))[:2]:
        target = root / source.parent.name / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
    odd = root / "odd"
    # usable, though awkward
    write_test_video(odd / "stereo.mp4", audio=tone(2.0, 44100, channels=2))
    write_test_video(odd / "surround.mp4", audio=tone(2.0, 48000, channels=6), sample_rate=48000)
    write_test_video(odd / "rate8k.mp4", audio=tone(2.0, 8000), sample_rate=8000)
    write_test_video(
        odd / "gray_odd_size.mkv", size=(47, 63), gray=True, audio=tone(2.0, 22050), sample_rate=22050
    )
    write_test_video(odd / "silent.mp4", audio=np.zeros((1, 88200), np.float32))
    truncate(write_test_video(odd / "truncated_tail.mkv", seconds=4.0, audio=tone(4.0, 44100)), 0.7)
    # unusable
    write_test_video(odd / "no_audio.mp4", audio=None)
    write_test_video(odd / "empty_audio.mkv", audio=tone(2.0, 44100), audio_packets=False)
    write_test_video(odd / "too_short.mp4", seconds=1.0, audio=tone(1.0, 44100))
    truncate(write_test_video(odd / "truncated_header.mp4", audio=tone(2.0, 44100)), 0.02)
    (odd / "garbage.mp4").write_bytes(os.urandom(5000))
    (odd / "empty.mp4").write_bytes(b"")
    write_test_video(root / "not_in_class_folder.mp4", audio=tone(2.0, 44100))
    return root


EXPECTED_SKIPS = {
    "unreadable": 3,
    "no audio stream": 1,
    "empty audio stream": 1,
    "shorter than one window (16 frames at 10 fps)": 1,
    "not inside a class folder": 1,
}


@pytest.mark.slow
def test_inspect_dataset_counts_good_and_broken_files(mixed_root):
    result = run_tool_in_process(
        "inspect_dataset.py", "dataset=synthetic", f"data_root={mixed_root}", "dataset.resolution=32"
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["skipped_reasons"] == EXPECTED_SKIPS
    assert report["skipped"] == sum(EXPECTED_SKIPS.values())
    assert report["clips"] == 2 + 6
    assert report["notes"] == {"silent audio": 1, "truncated (decodable part used)": 1}
    complete_windows = 2 * (CLIP_FRAMES - 16 + 1) + 5 * (20 - 16 + 1)
    assert complete_windows + 1 <= report["windows"] < complete_windows + (40 - 16 + 1)
    assert set(report["classes"]) == {"odd"} | {
        p.parent.name for p in mixed_root.glob("*/*.mp4") if p.parent.name != "odd"
    }
    assert {f["path"] for f in report["skipped_files"]} >= {"odd/garbage.mp4", "odd/no_audio.mp4"}


def test_every_usable_awkward_file_yields_items(mixed_root):
    dataset = SoundingVideoDataset(synthetic_config(mixed_root, resolution=32))
    first_window = {}
    for index, (position, _) in enumerate(dataset.windows):
        first_window.setdefault(position, index)
    for position, index in first_window.items():
        item = dataset[index]
        assert item["key_frames"].shape == (4, 3, 32, 32), dataset.files[position].path
        assert item["audio"].shape == (70_560,)
        assert torch.isfinite(item["audio_image"]).all()
        if "silent" in dataset.files[position].path:
            assert item["audio_image"].max() == -1.0, "silence is the floor colour"


@pytest.mark.slow
def test_folder_without_usable_clip_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        SoundingVideoDataset(synthetic_config(tmp_path / "missing"))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(DatasetError, match=rf"no usable clip in '{tmp_path}'.*1 unreadable"):
        SoundingVideoDataset(synthetic_config(tmp_path))
    result = run_tool_in_process("inspect_dataset.py", f"data_root={tmp_path}", check=False)
    assert result.returncode == 2 and "no usable clip" in result.stderr and "Traceback" not in result.stderr


def test_every_dataset_preset_composes_and_typos_name_the_key(repo_root):
    presets = sorted(p.stem for p in (repo_root / "conf" / "dataset").glob("*.yaml"))
    assert presets == ["aist", "audioset", "landscape", "synthetic"]
    for name in presets:
        config = dataset_config_from(compose(repo_root / "conf", "data", [f"dataset={name}"]))
        assert config.name == name and config.mel.n_mels == 80
    audioset = dataset_config_from(compose(repo_root / "conf", "data", ["dataset=audioset"]))
    assert audioset.clip_samples == 176_400 and audioset.class_source == "none"
    with pytest.raises(ConfigError, match="dataset.fsp"):
        compose(repo_root / "conf", "data", ["dataset.fsp=3"])
    with pytest.raises(ConfigError, match="fps"):
        dataset_config_from(compose(repo_root / "conf", "data", ["dataset.fps=fast"]))
    with pytest.raises(ConfigError, match="val_fraction"):
        to_typed(DatasetConfig, {"split": "val"})
