#!/usr/bin/env python
"""`make demo`: the pipeline on CPU, stage by stage, into one output folder.

    python tools/demo.py --out outputs/demo

Stages now: make the synthetic sounding-video set, index it, and write previews (a contact sheet
of key frames beside their audio images and spectrograms, one mp4 with sound per class).
A finished stage is reused when its settings are unchanged (a `.stage.json` in its folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mmldm_data.audio import audio_image_to_logmel
from mmldm_data.config import DatasetConfig, to_typed
from mmldm_data.dataset import SoundingVideoDataset
from mmldm_data.media import write_video
from mmldm_data.preview import contact_sheet, save_png, spectrogram_rgb
from mmldm_data.synthetic import CLASS_NAMES, SyntheticConfig, write_synthetic_dataset
from mmldm_data.video import to_uint8_frames


def run_stage(folder: Path, settings: dict, work: Callable[[Path], dict]) -> dict:
    """Run `work(folder)` unless the folder already holds a finished run with the same settings."""
    marker = folder / ".stage.json"
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        print(f"[{folder.name}] up to date, reusing {folder}", file=sys.stderr)
        return json.loads(marker.read_text())["result"]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    print(f"[{folder.name}] running ...", file=sys.stderr)
    result = work(folder)
    result["seconds"] = round(time.perf_counter() - started, 1)
    marker.write_text(json.dumps({"key": key, "settings": settings, "result": result}, indent=1))
    print(f"[{folder.name}] done in {result['seconds']} s", file=sys.stderr)
    return result


def make_synthetic(folder: Path, num_clips: int, seed: int) -> dict:
    return write_synthetic_dataset(folder, num_clips=num_clips, seed=seed, cfg=SyntheticConfig(), progress=True)


def write_previews(folder: Path, dataset: SoundingVideoDataset) -> dict:
    """One window per class: a contact-sheet row, a spectrogram PNG and an mp4 with its sound."""
    config = dataset.config
    first_window_of_class: dict[int, int] = {}
    for index, (file_position, _) in enumerate(dataset.windows):
        first_window_of_class.setdefault(dataset.file_classes[file_position], index)
    rows, labels, videos = [], [], []
    num_mel_frames = config.mel.num_frames(config.clip_samples)
    for class_id, index in sorted(first_window_of_class.items()):
        item = dataset[index]
        name = dataset.class_names[class_id]
        logmel = audio_image_to_logmel(item["audio_image"][None], num_mel_frames, config.mel)[0]
        spectrogram = spectrogram_rgb(logmel)
        save_png(contact_sheet([[spectrogram]], cell=160), folder / f"spectrogram_{name}.png")
        audio_image = to_uint8_frames(item["audio_image"][None])[0]
        rows.append([*to_uint8_frames(item["key_frames"]), audio_image, spectrogram])
        labels.append(name)
        video = folder / f"window_{name}.mp4"
        write_video(video, to_uint8_frames(item["frames"]), config.fps, item["audio"].numpy(), config.mel.sample_rate)
        videos.append(str(video))
    sheet = save_png(contact_sheet(rows, labels), folder / "contact_sheet.png")
    return {"contact_sheet": str(sheet), "videos": videos, "classes": labels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--num-clips", type=int, default=24, help="synthetic clips (balanced over classes)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.num_clips < len(CLASS_NAMES):
        parser.error(f"--num-clips must be at least {len(CLASS_NAMES)} (one per class), got {args.num_clips}")
    started = time.perf_counter()

    data_root = args.out / "synthetic"
    synthetic = run_stage(
        data_root, {"num_clips": args.num_clips, "seed": args.seed},
        lambda folder: make_synthetic(folder, args.num_clips, args.seed),
    )
    config = to_typed(DatasetConfig, {"data_root": str(data_root), "resolution": 64, "mel": {"image_size": 64}})
    dataset = SoundingVideoDataset(config, return_all_frames=True, progress=True)
    (args.out / "index.json").write_text(json.dumps(dataset.summary.to_json(), indent=1))
    previews = run_stage(
        args.out / "previews", {"dataset": synthetic, "resolution": config.resolution},
        lambda folder: write_previews(folder, dataset),
    )

    summary = dataset.summary
    print(
        f"demo finished in {time.perf_counter() - started:.0f} s\n"
        f"  synthetic set : {data_root} ({summary.usable_files} clips, {summary.windows} windows, "
        f"{len(dataset.class_names)} classes)\n"
        f"  contact sheet : {previews['contact_sheet']}\n"
        f"  previews      : {len(previews['videos'])} mp4s with sound in {args.out / 'previews'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
