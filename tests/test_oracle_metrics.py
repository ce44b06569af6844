"""Oracle metrics of the synthetic dataset: class agreement, a2v / v2a accuracy, onset-impact error."""

from __future__ import annotations

import numpy as np
import pytest

from mmldm_data.metrics.oracle import Condition, OracleReading, oracle_metrics, read_oracles
from mmldm_data.synthetic import render_clip

FPS, SAMPLE_RATE = 10.0, 44100


def window(class_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first 16 frames (1.6 s) and their audio, as the evaluator reads a clip."""
    clip = render_clip(class_id, seed)
    return clip.frames[:16], clip.audio[:70560]


def test_real_clips_agree_and_sound_on_impact():
    readings = [read_oracles(*window(class_id, 0), FPS, SAMPLE_RATE) for class_id in range(6)]
    assert [r.video_class for r in readings] == [r.audio_class for r in readings] == list(range(6))
    metrics = oracle_metrics(readings)
    assert metrics["oracle_class_agreement"] == 1.0
    assert metrics["oracle_onset_error_frames"] < 0.75 and metrics["oracle_onsets_matched"] >= 6


def test_mismatched_and_late_audio_are_caught():
    frames, _ = window(0, 0)
    _, other_audio = window(3, 0)
    swapped = read_oracles(frames, other_audio, FPS, SAMPLE_RATE)
    assert oracle_metrics([swapped])["oracle_class_agreement"] == 0.0

    frames, audio = window(2, 1)
    late = np.concatenate([np.zeros(13230, np.float32), audio[:-13230]])  # 3 frames late
    in_sync = oracle_metrics([read_oracles(frames, audio, FPS, SAMPLE_RATE)])["oracle_onset_error_frames"]
    out_of_sync = oracle_metrics([read_oracles(frames, late, FPS, SAMPLE_RATE)])["oracle_onset_error_frames"]
    assert out_of_sync > in_sync + 1.5


def test_conditional_accuracy_uses_the_generated_modality():
    reading = OracleReading(video_class=2, audio_class=4, impact_frames=(5,), onset_frames=(5.5,))
    metrics = oracle_metrics([reading, reading], [Condition("a2v", 2), Condition("v2a", 2)])
    assert metrics["oracle_a2v_accuracy"] == 1.0  # a2v generated the video: class 2 as asked
    assert metrics["oracle_v2a_accuracy"] == 0.0  # v2a generated the audio: class 4, not 2
    assert metrics["oracle_a2v_given_accuracy"] == 0.0  # the given audio decoded as class 4
    assert metrics["oracle_v2a_given_accuracy"] == 1.0
    assert metrics["oracle_a2v_agreement"] == metrics["oracle_v2a_agreement"] == 0.0
    assert "oracle_class_agreement" not in metrics
    assert metrics["oracle_onset_error_frames"] == 0.5


def test_a_sample_that_follows_a_misread_condition_agrees_but_misses():
    # v2a given a video of class 1 whose latent decodes as class 3; the sound follows the latent.
    followed = OracleReading(video_class=3, audio_class=3, impact_frames=(), onset_frames=())
    silent = OracleReading(video_class=1, audio_class=-1, impact_frames=(), onset_frames=())
    metrics = oracle_metrics([followed, silent], [Condition("v2a", 1), Condition("v2a", 1)])
    assert metrics["oracle_v2a_accuracy"] == 0.0
    assert metrics["oracle_v2a_given_accuracy"] == 0.5
    assert metrics["oracle_v2a_agreement"] == 0.5  # silence never agrees


def test_silence_never_counts_as_agreement():
    frames, _ = window(1, 0)
    reading = read_oracles(frames, np.zeros(70560, np.float32), FPS, SAMPLE_RATE)
    assert reading.audio_class == -1 and reading.onset_frames == ()
    metrics = oracle_metrics([reading])
    assert metrics["oracle_class_agreement"] == 0.0 and metrics["oracle_onset_error_frames"] is None
    with pytest.raises(ValueError, match="task must be one of"):
        Condition("t2v", 0)
    with pytest.raises(ValueError, match="1 conditions for 2 readings"):
        oracle_metrics([reading, reading], [None])
