"""What gets evaluated: folders of videos indexed into clip windows, the seeded choice among them,
conditions.json, the decoded batches, and the optional autoencoder round trip applied to them.

Scanning reads container headers only, so bad input fails before any model loads; decoding
letterboxes every clip to the protocol's resolution (see protocol.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mmldm_data.dataset import find_media_files
from mmldm_data.evaluation.protocol import EvalProtocol, EvaluationError
from mmldm_data.media import MediaError, count_frames, probe_media, read_video
from mmldm_data.metrics.oracle import Condition
from mmldm_data.synthetic import CLASS_NAMES
from mmldm_data.video import letterbox

CONDITIONS_FILE = "conditions.json"


@dataclass(frozen=True)
class ClipRef:
    path: Path
    start_frame: int
    has_audio: bool

    def clip_id(self, root: Path) -> str:
        return f"{self.path.relative_to(root).as_posix()}@{self.start_frame}"


@dataclass
class ClipSource:
    """The usable windows of a folder of videos, and why the other files were skipped."""

    root: Path
    windows: list[ClipRef]
    files: int
    skipped: dict[str, list[str]]  # reason -> relative paths
    fingerprint: str  # of every used file's (path, size, mtime)

    @property
    def files_without_audio(self) -> int:
        return len({ref.path for ref in self.windows if not ref.has_audio})

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "files": self.files,
            "usable_files": len({r.path for r in self.windows}),
            "windows": len(self.windows),
            "files_without_audio": self.files_without_audio,
            "skipped": {reason: len(paths) for reason, paths in sorted(self.skipped.items())},
        }


def scan_clip_source(root: str | Path, protocol: EvalProtocol, every_window: bool, role: str) -> ClipSource:
    """Index a folder (any nesting): every window (stride 1 frame) of each file, or only its first.

    Reads container headers only. Raises EvaluationError naming the folder when no file gives a clip.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"{role} folder {str(root)!r} does not exist or is not a folder")
    paths = find_media_files(root, list(protocol.extensions))
    windows: list[ClipRef] = []
    skipped: dict[str, list[str]] = {}
    digest = hashlib.sha1()
    too_short = f"shorter than {protocol.num_frames} frames at {protocol.fps:g} fps"
    for path in paths:
        relative = path.relative_to(root).as_posix()
        try:
            info = probe_media(path)
        except MediaError as error:
            skipped.setdefault(f"unreadable ({error})" if len(paths) == 1 else "unreadable", []).append(
                relative
            )
            continue
        if not info.has_video:
            skipped.setdefault("no video stream", []).append(relative)
            continue
        frames = count_frames(info, protocol.fps)
        if frames < protocol.num_frames:
            skipped.setdefault(too_short, []).append(relative)
            continue
        last_start = frames - protocol.num_frames if every_window else 0
        windows.extend(ClipRef(path, start, info.has_audio) for start in range(last_start + 1))
        stat = path.stat()
        digest.update(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    if not windows:
        found = f"{len(paths)} video file(s) found" if paths else "no video file found"
        reasons = "; ".join(
            f"{len(files)} {reason}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
            for reason, files in sorted(skipped.items())
        )
        raise EvaluationError(
            f"no readable video clip in the {role} folder {str(root)!r} "
            f"({found}{'; ' + reasons if reasons else ''}). "
            f"Expected video files ({', '.join(protocol.extensions)}) at any depth, each at least "
            f"{protocol.num_frames} frames at {protocol.fps:g} fps "
            f"({protocol.num_frames / protocol.fps:g} s)."
        )
    return ClipSource(root, windows, len(paths), skipped, digest.hexdigest())


def select_windows(source: ClipSource, num_clips: int, seed: int) -> list[ClipRef]:
    """All windows when there are at most `num_clips`, else a seeded draw without replacement
    (in file order).
    """
    if len(source.windows) <= num_clips:
        return list(source.windows)
    chosen = np.random.default_rng(seed).choice(len(source.windows), size=num_clips, replace=False)
    return [source.windows[i] for i in sorted(chosen)]


def read_conditions(root: Path, class_names: Sequence[str] = CLASS_NAMES) -> dict[str, Condition]:
    """<generated>/conditions.json: {"<relative path>": {"task": "a2v"|"v2a", "class": name or id}},
    a name being one of `class_names` (those of the real set's class set).

    The conditional generation tools write it; joint samples need none.
    """
    path = root / CONDITIONS_FILE
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
        conditions = {}
        for relative, entry in entries.items():
            label = entry["class"]
            class_id = list(class_names).index(label) if isinstance(label, str) else int(label)
            conditions[relative] = Condition(entry["task"], class_id)
        return conditions
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise EvaluationError(
            f"{path}: cannot read it ({type(error).__name__}: {error}); expected "
            '{"<relative path>": {"task": "a2v" or "v2a", "class": "<class name>" or id}}'
        ) from None


@dataclass
class ClipBatch:
    """Clips as the evaluator (and an autoencoder round trip) sees them."""

    frames: torch.Tensor  # float [B, T, 3, R, R] in [-1, 1], letterboxed
    audio: torch.Tensor  # float [B, N] mono at the protocol's rate; silence where has_audio is False
    has_audio: torch.Tensor  # bool [B]
    clip_ids: list[str]


class Reconstructor(Protocol):
    """An autoencoder round trip, built by the caller (mmldm_ae.pipeline.load_reconstructor) and passed in,
    so that this package never imports the autoencoder stage."""

    def reconstruct(self, batch: ClipBatch) -> ClipBatch:
        """Encode and decode every clip; same shapes, value ranges, order and ids as the input."""
        ...


def iter_batches(
    refs: Sequence[ClipRef], root: Path, protocol: EvalProtocol, batch_size: int, failures: list[str]
) -> Iterator[tuple[ClipBatch, int]]:
    """(batch, clips consumed) in order; a clip that fails to decode is left out and noted in `failures`."""
    for first in range(0, len(refs), batch_size):
        chunk = refs[first : first + batch_size]
        frames, audio, has_audio, clip_ids = [], [], [], []
        for ref in chunk:
            try:
                clip = read_video(
                    ref.path,
                    fps=protocol.fps,
                    start=ref.start_frame / protocol.fps,
                    num_frames=protocol.num_frames,
                    sample_rate=protocol.sample_rate if ref.has_audio else None,
                )
            except MediaError as error:
                failures.append(str(error))
                continue
            frames.append(letterbox(clip.frames, protocol.resolution))  # [T, 3, R, R]
            audio.append(
                clip.audio if clip.audio is not None else np.zeros(protocol.clip_samples, np.float32)
            )
            has_audio.append(clip.audio is not None)
            clip_ids.append(ref.clip_id(root))
        if frames:
            yield (
                ClipBatch(
                    torch.stack(frames), torch.from_numpy(np.stack(audio)), torch.tensor(has_audio), clip_ids
                ),
                len(chunk),
            )


@dataclass
class EvalSets:
    """What to compare: a generated folder, or an autoencoder round trip of the real clips, vs the
    real set.
    """

    real: ClipSource
    generated: ClipSource | None = None
    reconstructor: Reconstructor | None = None
    real_label: str = ""  # e.g. "dataset=landscape"; defaults to the folder

    @classmethod
    def scan(
        cls,
        real_root: str | Path,
        protocol: EvalProtocol,
        generated_root: str | Path | None = None,
        reconstructor: Reconstructor | None = None,
        real_label: str = "",
    ) -> EvalSets:
        """Index both folders (headers only), so bad input fails before any model loads."""
        if (generated_root is None) == (reconstructor is None):
            raise EvaluationError(
                "give exactly one of a generated folder or an autoencoder to round-trip (--recon)"
            )
        generated = (
            scan_clip_source(generated_root, protocol, every_window=False, role="generated")
            if generated_root is not None
            else None
        )
        real = scan_clip_source(real_root, protocol, every_window=True, role="real")
        return cls(real, generated, reconstructor, real_label)
