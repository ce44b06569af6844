"""The generation tasks of MM-LDM (docs/design.md#tasks): one enum, and what differs between its members.

    svg                 audio and video from noise
    a2v / v2a           video for a given sound / sound for a given video (cross-modal)
    audio_continuation  the long-generation model continues a real clip's audio
    video_continuation  the same from a real clip's video
    long                the long-generation model from nothing, several clips

Config files keep tasks as strings (Hydra); `Task.parse` turns one into a member, or raises a
`ConfigError` that names the config key and the choices. Members are `str`s, so they compare equal
to their names, work as dict keys beside them and are written as them (JSON, f-strings).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from mmldm_data.config import ConfigError


class Task(StrEnum):
    svg = "svg"
    a2v = "a2v"
    v2a = "v2a"
    audio_continuation = "audio_continuation"
    video_continuation = "video_continuation"
    long = "long"

    @property
    def given_modality(self) -> str | None:
        """The modality the task is given (from a file or a dataset clip), or None."""
        given = {
            Task.a2v: "audio",
            Task.audio_continuation: "audio",
            Task.v2a: "video",
            Task.video_continuation: "video",
        }
        return given.get(self)

    @property
    def generated_modality(self) -> str | None:
        """The one modality a cross-modal task generates (a2v: video, v2a: audio); None: both."""
        return {Task.a2v: "video", Task.v2a: "audio"}.get(self)

    @property
    def cross_modal(self) -> bool:
        """a2v / v2a: one modality of a clip conditions the other (a model of both modalities)."""
        return self.generated_modality is not None

    @property
    def needs_long_model(self) -> bool:
        """Whether the task continues a previous clip, i.e. needs the long-generation model."""
        return self in (Task.audio_continuation, Task.video_continuation, Task.long)

    @classmethod
    def given(cls, modality: str) -> Task:
        """The cross-modal task that is given `modality`: audio -> a2v, video -> v2a."""
        (task,) = (task for task in cls if task.cross_modal and task.given_modality == modality)
        return task

    @classmethod
    def parse(cls, value: str, key: str = "task", choices: Iterable[Task] | None = None) -> Task:
        """`value` as a Task among `choices` (default: all); ConfigError naming `key` and the choices."""
        choices = tuple(cls) if choices is None else tuple(choices)
        if value not in choices:
            raise ConfigError(
                f"unknown {key} {str(value)!r}; choose one of {', '.join(str(c) for c in choices)}"
            )
        return cls(value)


CROSS_MODAL_TASKS = tuple(task for task in Task if task.cross_modal)  # a2v, v2a
