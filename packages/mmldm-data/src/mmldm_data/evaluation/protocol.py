"""The evaluation protocol: what a clip is, how many are drawn, and the error every bad input raises.

The protocol is MM-Diffusion's evaluator made explicit and seeded:
  * a clip is `num_frames` (16) frames at `fps` (10) taken by timestamp, with the audio of the same
    span at 44.1 kHz mono (1.6 s = 70,560 samples);
  * real clips are a seeded draw of `num_clips` (2048) windows among all sliding windows (stride
    1 frame) of the real files; a generated file gives one clip (its first window), and when
    there are more files than `num_clips` a seeded draw picks which; nothing is ever duplicated
    to reach `num_clips` (MM-Diffusion cycles its loader), so the report states the counts used;
  * frames are letterboxed to `resolution` (64 or 256, bicubic, black bars) before anything else,
    so both sets pass through the same resize whatever their native size; I3D then sees them
    resized bilinearly to short side 224 and centre-cropped (`preprocess_for_i3d`);
  * FVD = Frechet distance and KVD = unbiased polynomial MMD^2 of I3D logits; FAD per backend
    (`metrics/fad.py`); AV-Align per clip and averaged (`metrics/av_align.py`), on the letterboxed
    frames; oracles (`metrics/oracle.py`) when the real set is the project's synthetic dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmldm_data.config import DatasetConfig
from mmldm_data.metrics.fad import BACKENDS

RESOLUTIONS = (64, 256)
PAPER_CLIPS = 2048  # clips per side in the published protocol


class EvaluationError(ValueError):
    """An input cannot be evaluated; the message names it and says what to do."""


@dataclass(frozen=True)
class EvalProtocol:
    num_frames: int = 16
    fps: float = 10.0
    resolution: int = 256  # frames letterboxed to R x R first (64: MM-Diffusion's published setting)
    sample_rate: int = 44100
    num_clips: int = 2048
    fad_backends: tuple[str, ...] = ("aisfx",)
    extensions: tuple[str, ...] = tuple(DatasetConfig().extensions)

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise EvaluationError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        if self.num_clips < 2:
            raise EvaluationError(
                f"num_clips must be >= 2 (a covariance needs two clips), got {self.num_clips}"
            )
        unknown = sorted(set(self.fad_backends) - set(BACKENDS))
        if unknown:
            raise EvaluationError(f"unknown FAD backend(s) {unknown}; choose from {sorted(BACKENDS)}")

    @property
    def clip_samples(self) -> int:
        return round(self.num_frames / self.fps * self.sample_rate)

    def clip_fields(self) -> dict:
        """What a clip's features depend on (the cache key's protocol part)."""
        return {name: getattr(self, name) for name in ("num_frames", "fps", "resolution", "sample_rate")}

    def describe(self) -> str:
        return (
            f"{self.num_frames} frames @ {self.fps:g} fps ({self.num_frames / self.fps:g} s) with "
            f"{self.sample_rate} Hz mono audio; frames letterboxed to {self.resolution}^2, then I3D input "
            "short side 224 bilinear + centre crop, [-1, 1]; FVD: Frechet distance (unbiased covariances) "
            "of 400-d I3D logits; KVD: unbiased MMD^2, k = (x.y/400 + 1)^3, unscaled; up to "
            f"{self.num_clips} clips per side, seeded"
        )
