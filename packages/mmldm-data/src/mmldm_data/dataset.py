"""Sounding-video dataset: a folder of video files cut into sliding windows (docs/design.md#data).

Indexing verifies every file once (decodable span of video and audio, silence), caches what it
found keyed by each file's size and modification time, and re-verifies only files that changed.
Files that cannot be used are skipped with a reason and counted; they never crash a run.

Each item holds, for a window of `num_frames` frames at `fps` (paper: 16 @ 10 fps = 1.6 s):
    key_frames      [K, 3, R, R]  frames at key_frame_indices (paper: 0, 5, 10, 15), in [-1, 1]
    target_frames   [2, 3, R, R]  two distinct frames the signal decoder learns to reconstruct
    target_indices  [2]           their positions i / num_frames, in [0, 1)
    audio_image     [3, R, R]     the mel "audio image", in [-1, 1]
    audio           [N]           the raw mono waveform, N = clip seconds * sample rate
    class_id        int           -1 when the dataset has no classes
    clip_id         str           "<relative path>@<start frame>"
    file            str           the relative path of the clip's file
    start_frame     int           the window's first frame in that file
    frames          [T, 3, R, R]  all frames, only with return_all_frames=True
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmldm_data.audio import waveform_to_audio_image
from mmldm_data.config import DatasetConfig
from mmldm_data.media import DecodedClip, MediaError, read_video, scan_media
from mmldm_data.video import to_model_frames

log = logging.getLogger(__name__)

INDEX_VERSION = 1
SILENCE_PEAK = 1e-4  # below -80 dBFS the audio image is the floor colour everywhere


class DatasetError(RuntimeError):
    """The dataset cannot be used at all (no usable clip, bad label file, missing folder)."""


# --------------------------------------------------------------------------------------------
# File records and the cached index
# --------------------------------------------------------------------------------------------


@dataclass
class FileRecord:
    """What indexing learnt about one file; cached between runs."""

    path: str  # relative to data_root, with forward slashes
    size: int
    mtime_ns: int
    video_seconds: float = 0.0  # decodable span of the video stream
    audio_seconds: float = 0.0
    audio_peak: float = 0.0
    has_video: bool = False
    has_audio: bool = False
    truncated: bool = False  # a decode error stopped reading early; the part before it is used
    error: str | None = None  # why the file could not be opened or decoded at all

    def frames_at(self, fps: float) -> int:
        # Frame k exists when its timestamp k / fps lies inside the decodable span.
        return max(0, math.floor(self.video_seconds * fps + 1e-6))


@dataclass
class IndexSummary:
    data_root: str
    files: int = 0
    usable_files: int = 0
    windows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: dict[str, int] = field(default_factory=dict)  # kept, but worth knowing (silent, truncated)
    classes: dict[str, int] = field(default_factory=dict)  # class name -> windows
    split: str = "all"
    reindexed_files: int = 0  # files verified in this run (the rest came from the cache)

    def to_json(self) -> dict:
        return {
            "data_root": self.data_root,
            "files": self.files,
            "clips": self.usable_files,
            "windows": self.windows,
            "skipped": sum(self.skipped.values()),
            "skipped_reasons": dict(sorted(self.skipped.items())),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped_files],
            "notes": dict(sorted(self.notes.items())),
            "classes": self.classes,
            "split": self.split,
            "reindexed_files": self.reindexed_files,
        }


def find_media_files(root: Path, extensions: list[str]) -> list[Path]:
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in wanted)
    return sorted(found)


def verify_file(root: str, relative_path: str, size: int, mtime_ns: int) -> FileRecord:
    record = FileRecord(path=relative_path, size=size, mtime_ns=mtime_ns)
    try:
        scan = scan_media(Path(root) / relative_path)
    except MediaError as error:
        record.error = str(error)
        return record
    record.has_video, record.has_audio = scan.has_video, scan.has_audio
    record.video_seconds, record.audio_seconds = scan.video_seconds, scan.audio_seconds
    record.audio_peak, record.truncated = scan.audio_peak, scan.truncated
    return record


def _cache_file(config: DatasetConfig, root: Path) -> Path:
    key = hashlib.sha1(f"{root.resolve()}|{INDEX_VERSION}".encode()).hexdigest()[:12]
    if config.cache_dir:
        return Path(config.cache_dir) / f"index-{key}.json"
    local = root / ".mmldm_cache"
    if os.access(root, os.W_OK):
        return local / f"index-{key}.json"
    return Path(os.environ.get("MMLDM_CACHE", Path.home() / ".cache" / "mmldm")) / f"index-{key}.json"


def build_file_index(config: DatasetConfig, progress: bool = False) -> tuple[list[FileRecord], int]:
    """Verify every media file under data_root, reusing cached records of unchanged files.

    Returns the records (sorted by path) and how many files were verified in this call.
    """
    root = Path(config.data_root)
    if not root.is_dir():
        raise DatasetError(
            f"data_root {str(root)!r} is not a folder: set dataset.data_root (or data_root=) to the "
            "folder that holds your video files"
        )
    cache_path = _cache_file(config, root)
    cached: dict[str, FileRecord] = {}
    if cache_path.is_file():
        try:
            payload = json.loads(cache_path.read_text())
            if payload.get("version") == INDEX_VERSION:
                cached = {r["path"]: FileRecord(**r) for r in payload["files"]}
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable index cache %s; rebuilding it", cache_path)

    records: list[FileRecord] = []
    to_verify: list[tuple[str, str, int, int]] = []
    for path in find_media_files(root, config.extensions):
        stat = path.stat()
        relative = path.relative_to(root).as_posix()
        previous = cached.get(relative)
        if previous and previous.size == stat.st_size and previous.mtime_ns == stat.st_mtime_ns:
            records.append(previous)
        else:
            to_verify.append((str(root), relative, stat.st_size, stat.st_mtime_ns))

    if to_verify:
        records.extend(_verify_all(to_verify, config.index_workers, progress))
        records.sort(key=lambda r: r.path)
        _write_cache(cache_path, records)
    elif len(records) != len(cached):  # files were removed
        _write_cache(cache_path, records)
    return records, len(to_verify)


def _verify_all(jobs: list[tuple[str, str, int, int]], workers: int, progress: bool) -> list[FileRecord]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="indexing", unit="file", disable=not progress)
    results = []
    if workers > 0:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for record in pool.map(verify_file, *zip(*jobs, strict=True), chunksize=4):
                results.append(record)
                bar.update()
    else:
        for job in jobs:
            results.append(verify_file(*job))
            bar.update()
    bar.close()
    return results


def _write_cache(cache_path: Path, records: list[FileRecord]) -> None:
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"version": INDEX_VERSION, "files": [asdict(r) for r in records]}))
        temporary.replace(cache_path)
    except OSError as error:  # a read-only cache location only costs re-verification next time
        log.warning("could not write the index cache %s: %s", cache_path, error)


# --------------------------------------------------------------------------------------------
# Labels and splits
# --------------------------------------------------------------------------------------------


def read_label_file(path: str) -> dict[str, str]:
    """Map file keys to class names from a CSV (columns path,label) or a JSON object.

    Keys may be relative paths or bare file stems; JSON values may be a name, an id, or an object
    with `class_name` / `class_id` (the authors' vid2class.json layout).
    """
    label_path = Path(path)
    if not label_path.is_file():
        raise DatasetError(
            f"label file {path!r} does not exist: give dataset.label_file=PATH to a CSV or JSON"
        )
    try:
        if label_path.suffix.lower() == ".json":
            raw = json.loads(label_path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("the top level must be an object {file: label}")
            labels = {}
            for key, value in raw.items():
                if isinstance(value, dict):
                    value = value.get("class_name", value.get("class_id"))
                labels[str(key)] = str(value)
            return labels
        with label_path.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except (ValueError, OSError, csv.Error) as error:
        raise DatasetError(f"cannot read label file {path!r}: {error}") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] in (
        ["path", "label"],
        ["file", "label"],
        ["id", "label"],
    ):
        rows = rows[1:]
    bad = [i + 1 for i, row in enumerate(rows) if len(row) < 2]
    if bad:
        raise DatasetError(f"label file {path!r}: rows {bad[:5]} need two columns: path,label")
    return {row[0].strip(): row[1].strip() for row in rows}


def class_of(record: FileRecord, config: DatasetConfig, labels: dict[str, str] | None) -> str | None:
    if config.class_source == "none":
        return None
    if config.class_source == "folder":
        parts = record.path.split("/")
        return parts[0] if len(parts) > 1 else None
    if config.class_source == "pattern":
        match = re.search(config.class_pattern or "", record.path.rsplit("/", 1)[-1])
        return match.group(1) if match else None
    assert labels is not None
    stem = record.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return labels.get(record.path, labels.get(stem))


def is_validation_file(relative_path: str, val_fraction: float, seed: int) -> bool:
    # A hash of the path, not a shuffle: adding files never moves old ones across the split.
    digest = hashlib.sha1(f"{seed}:{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def skip_reason(record: FileRecord, config: DatasetConfig) -> str | None:
    if record.error:
        return "unreadable"
    if not record.has_video:
        return "no video stream"
    if not record.has_audio:
        return "no audio stream"
    if record.audio_seconds <= 0:
        return "empty audio stream"
    if record.frames_at(config.fps) < config.num_frames:
        return f"shorter than one window ({config.num_frames} frames at {config.fps:g} fps)"
    return None


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


class SoundingVideoDataset(Dataset):
    def __init__(self, config: DatasetConfig, return_all_frames: bool = False, progress: bool = False):
        config.validate()
        self.config = config
        self.return_all_frames = return_all_frames
        self.epoch = 0
        records, reindexed = build_file_index(config, progress=progress)
        labels = read_label_file(config.label_file) if config.class_source == "label_file" else None

        summary = IndexSummary(data_root=config.data_root, files=len(records), split=config.split)
        summary.reindexed_files = reindexed
        usable: list[tuple[FileRecord, str | None]] = []
        for record in records:
            reason = skip_reason(record, config)
            class_name = class_of(record, config, labels)
            if reason is None and class_name is None and config.class_source in ("label_file", "pattern"):
                missing = (
                    "not in the label file" if labels is not None else "name does not match class_pattern"
                )
                reason = f"no class ({missing})"
            if reason is not None:
                summary.skipped[reason] = summary.skipped.get(reason, 0) + 1
                detail = f"{reason}: {record.error}" if record.error else reason
                summary.skipped_files.append((record.path, detail))
                continue
            if record.audio_peak < SILENCE_PEAK:
                summary.notes["silent audio"] = summary.notes.get("silent audio", 0) + 1
            if record.truncated:
                summary.notes["truncated (decodable part used)"] = (
                    summary.notes.get("truncated (decodable part used)", 0) + 1
                )
            usable.append((record, class_name))

        if config.class_source == "none":
            self.class_names: list[str] = []
        else:
            self.class_names = sorted({name for _, name in usable if name is not None})
            if config.class_source == "folder":
                unlabeled = [r for r, name in usable if name is None]
                for record in unlabeled:
                    summary.skipped["not inside a class folder"] = (
                        summary.skipped.get("not inside a class folder", 0) + 1
                    )
                    summary.skipped_files.append((record.path, "not inside a class folder"))
                usable = [(r, name) for r, name in usable if name is not None]

        if config.split != "all":
            want_val = config.split == "val"
            usable = [
                (r, name)
                for r, name in usable
                if is_validation_file(r.path, config.val_fraction, config.split_seed) == want_val
            ]

        class_index = {name: i for i, name in enumerate(self.class_names)}
        self.files: list[FileRecord] = []
        self.file_classes: list[int] = []
        self.windows: list[tuple[int, int]] = []  # (file position, start frame)
        window_classes: Counter[str] = Counter()
        for record, name in usable:
            position = len(self.files)
            self.files.append(record)
            self.file_classes.append(class_index[name] if name is not None else -1)
            starts = range(0, record.frames_at(config.fps) - config.num_frames + 1, config.window_stride)
            self.windows.extend((position, start) for start in starts)
            if name is not None:
                window_classes[name] += len(starts)

        summary.usable_files = len(self.files)
        summary.windows = len(self.windows)
        summary.classes = dict(sorted(window_classes.items()))
        self.summary = summary
        if not self.windows:
            scanned = f"{summary.files} media files found" if summary.files else "no media files found"
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(summary.skipped.items())) or "none skipped"
            split_note = f" in split {config.split!r}" if config.split != "all" else ""
            raise DatasetError(
                f"no usable clip{split_note} in {config.data_root!r} ({scanned}; skipped: {reasons}). "
                f"Expected video files ({', '.join(config.extensions)}) with an audio stream, at least "
                f"{config.clip_seconds:g} s long"
                + (", inside one folder per class" if config.class_source == "folder" else "")
                + "."
            )
        if (
            config.num_classes is not None
            and self.class_names
            and len(self.class_names) != config.num_classes
        ):
            log.warning(
                "dataset %s: found %d classes in %s, the preset expects %d",
                config.name,
                len(self.class_names),
                config.data_root,
                config.num_classes,
            )
        self._failed_reads = 0
        self._decoded: dict[int, DecodedClip] = {}  # file position -> the whole file (dataset.keep_decoded)

    def __len__(self) -> int:
        return len(self.windows)

    def set_epoch(self, epoch: int) -> None:
        """Random draws (target frames, flips) depend on (seed, epoch, index) only, so runs resume exactly."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        # A file can still fail here (changed on disk, or a decoder corner case the index missed):
        # fall through to the next windows instead of killing a long training run.
        for attempt in range(len(self.windows) if len(self.windows) < 8 else 8):
            position = (index + attempt) % len(self.windows)
            try:
                return self._load_window(position)
            except MediaError as error:
                self._failed_reads += 1
                log.warning("skipping window %d: %s", position, error)
        raise DatasetError(f"8 windows in a row from {self.config.data_root!r} failed to decode; see the log")

    def _read_window(self, file_position: int, start: int) -> DecodedClip:
        """The window of `num_frames` frames from frame `start` of a file, with its sound.

        With dataset.keep_decoded every file is decoded whole once and its windows are sliced from
        memory. The frames are the same either way; the sound differs in a window's first ~25 ms,
        where a window read on its own starts decoding AAC after a seek, without the previous
        frame its first one overlaps (the whole-file decode is the faithful one)."""
        config = self.config
        path = Path(config.data_root) / self.files[file_position].path
        if not config.keep_decoded:
            return read_video(
                path,
                fps=config.fps,
                start=start / config.fps,
                num_frames=config.num_frames,
                sample_rate=config.mel.sample_rate,
            )
        if file_position not in self._decoded:
            self._decoded[file_position] = read_video(path, config.fps, sample_rate=config.mel.sample_rate)
        whole = self._decoded[file_position]
        frames = whole.frames[start : start + config.num_frames]
        # As read_video: times past the last frame hold it, the sound past the end is silence.
        frames = np.concatenate([frames, frames[-1:].repeat(config.num_frames - len(frames), 0)])
        first = round(start / config.fps * config.mel.sample_rate)
        audio = whole.audio[first : first + config.clip_samples]
        audio = np.pad(audio, (0, config.clip_samples - len(audio)))
        return DecodedClip(frames=frames, fps=config.fps, audio=audio, sample_rate=config.mel.sample_rate)

    def _load_window(self, index: int) -> dict:
        config = self.config
        file_position, start = self.windows[index]
        record = self.files[file_position]
        clip = self._read_window(file_position, start)
        rng = np.random.default_rng([config.seed, self.epoch, index])
        flip = config.flip_p > 0 and rng.random() < config.flip_p
        targets = np.sort(rng.choice(config.num_frames, size=config.num_target_frames, replace=False))
        # Resize and convert only the frames the item holds (6 of 16 for training), not the whole window.
        used = range(config.num_frames) if self.return_all_frames else [*config.key_frame_indices, *targets]
        converted = to_model_frames(clip.frames[list(used)], config.resolution, config.frame_mode)
        if flip:
            converted = converted.flip(-1)
        frames = dict(zip(used, converted, strict=True))  # frame index -> [3, R, R]
        audio = torch.from_numpy(clip.audio).float()
        audio_image = waveform_to_audio_image(audio[None], config.mel)[0]
        item = {
            "key_frames": torch.stack([frames[i] for i in config.key_frame_indices]),
            "target_frames": torch.stack([frames[i] for i in targets]),
            "target_indices": torch.from_numpy(targets / config.num_frames).float(),
            "audio_image": audio_image,
            "audio": audio,
            "class_id": self.file_classes[file_position],
            "clip_id": f"{record.path}@{start}",
            "file": record.path,
            "start_frame": start,
        }
        if self.return_all_frames:
            item["frames"] = converted
        return item
