"""Oracle metrics for the synthetic dataset: what a generated sample got right, read from its pixels
and samples.

The synthetic oracles (mmldm_data.synthetic) recover a clip's class from its video and from its
sound (by colour and pitch, or by shape and timbre: the clips' class set), the floor impacts from
its motion and the sound onsets from its audio. From them:
  * class agreement: joint samples whose video class equals their audio class;
  * a2v / v2a accuracy: audio-to-video samples whose video class, video-to-audio samples whose audio
    class, equals the class of the conditioning clip;
  * a2v / v2a given accuracy: samples whose given modality, as decoded from its latent, still reads
    as the conditioning class (what the DiT was given; not a strict ceiling, since the decoder also
    reads the generated modality's semantic tokens); a2v / v2a agreement: samples whose generated
    modality matches the given one as decoded (what the DiT did with the latent it was given);
  * onset error: median over sound onsets of |onset - nearest impact|, in frames.
An oracle that finds nothing (no coloured object, silence) answers class -1, which never matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmldm_data.synthetic import (
    CLASS_SETS,
    COLOUR_PITCH,
    class_oracles,
    impact_frames_oracle,
    onset_times_oracle,
)
from mmldm_data.tasks import CROSS_MODAL_TASKS, Task


@dataclass(frozen=True)
class OracleReading:
    video_class: int  # -1: no coloured object
    audio_class: int  # -1: silent
    impact_frames: tuple[int, ...]
    onset_frames: tuple[float, ...]  # onset times x fps

    def class_names(self, classes: str) -> tuple[str | None, str | None]:
        """(video class, audio class) as names of the class set `classes` (None: nothing found)."""
        name = lambda found: CLASS_SETS[classes][found] if found >= 0 else None
        return name(self.video_class), name(self.audio_class)


def read_oracles(
    frames: np.ndarray, audio: np.ndarray, fps: float, sample_rate: int, classes: str = COLOUR_PITCH
) -> OracleReading:
    """Oracle reading of one clip: frames uint8 [T, H, W, 3] at `fps`, audio [N] over the same span;
    classes as ids of the class set `classes` (mmldm_data.synthetic.CLASS_SETS)."""
    video_class_oracle, audio_class_oracle = class_oracles(classes)
    return OracleReading(
        video_class=video_class_oracle(frames),
        audio_class=audio_class_oracle(audio, sample_rate),
        impact_frames=tuple(impact_frames_oracle(frames)),
        onset_frames=tuple(time * fps for time in onset_times_oracle(audio, sample_rate)),
    )


def onset_errors(reading: OracleReading) -> list[float]:
    """|onset - nearest impact| in frames, one per onset; empty when either side found none."""
    if not reading.impact_frames:
        return []
    impacts = np.asarray(reading.impact_frames, np.float64)
    return [float(np.abs(impacts - onset).min()) for onset in reading.onset_frames]


@dataclass(frozen=True)
class Condition:
    """How a sample was generated: a cross-modal task (a2v: the video is generated, or v2a) and the
    conditioning class. `task` may be given as its name."""

    task: Task
    class_id: int

    def __post_init__(self) -> None:
        if self.task not in CROSS_MODAL_TASKS:
            raise ValueError(f"task must be one of {', '.join(CROSS_MODAL_TASKS)}, got {self.task!r}")
        object.__setattr__(self, "task", Task(self.task))


def oracle_metrics(
    readings: Sequence[OracleReading], conditions: Sequence[Condition | None] | None = None
) -> dict:
    """Summary of the readings of a sample set; conditions[i] describes sample i (None: joint)."""
    conditions = list(conditions) if conditions is not None else [None] * len(readings)
    if len(conditions) != len(readings):
        raise ValueError(f"{len(conditions)} conditions for {len(readings)} readings")
    joint = [r for r, c in zip(readings, conditions, strict=True) if c is None]
    metrics: dict[str, float | int | None] = {}
    if joint:
        metrics["oracle_class_agreement"] = float(
            np.mean([r.video_class == r.audio_class and r.video_class >= 0 for r in joint])
        )
    classes = {"video": lambda r: r.video_class, "audio": lambda r: r.audio_class}
    for task in CROSS_MODAL_TASKS:
        rows = [(r, c) for r, c in zip(readings, conditions, strict=True) if c is not None and c.task == task]
        if rows:
            made, known = classes[task.generated_modality], classes[task.given_modality]
            metrics[f"oracle_{task}_accuracy"] = float(np.mean([made(r) == c.class_id for r, c in rows]))
            metrics[f"oracle_{task}_given_accuracy"] = float(
                np.mean([known(r) == c.class_id for r, c in rows])
            )
            metrics[f"oracle_{task}_agreement"] = float(np.mean([made(r) == known(r) >= 0 for r, _ in rows]))
    errors = [error for reading in readings for error in onset_errors(reading)]
    metrics["oracle_onset_error_frames"] = float(np.median(errors)) if errors else None
    metrics["oracle_onsets_matched"] = len(errors)
    return metrics
