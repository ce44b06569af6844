"""AV-Align: peak IoU bookkeeping, flow peaks, and its behaviour on synthetic clips with shifted audio."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mmldm_data.metrics.av_align import av_align, peak_iou, video_peak_times
from mmldm_data.synthetic import render_clip

FPS, SAMPLE_RATE = 10.0, 44100


def test_peak_iou_counts_matches_within_one_frame():
    assert peak_iou(np.array([0.5, 1.5]), np.array([0.52, 1.5]), FPS) == 1.0
    # 0.5 matches 0.45; 1.0 has no video peak within 0.1 s; 2.0 is an unmatched video peak.
    assert peak_iou(np.array([0.5, 1.0]), np.array([0.45, 2.0]), FPS) == pytest.approx(1 / 3)
    assert peak_iou(np.array([0.5]), np.array([0.65]), FPS) == 0.0  # over one frame apart: no match
    assert math.isnan(peak_iou(np.array([]), np.array([]), FPS))


def test_video_peaks_at_motion_bursts():
    frames = np.zeros((12, 48, 48, 3), np.uint8)
    x = np.cumsum([0, 1, 1, 1, 6, 1, 1, 1, 1, 6, 1, 1]) + 4  # the square jumps into frames 4 and 9
    for t, left in enumerate(x):
        frames[t, 18:30, left : left + 8] = 220
    np.testing.assert_allclose(video_peak_times(frames, FPS), [0.4, 0.9])


def shifted(audio: np.ndarray, frames: int) -> np.ndarray:
    """The same audio, late by `frames` video frames (silence in front, tail cut)."""
    delay = round(frames / FPS * SAMPLE_RATE)
    return np.concatenate([np.zeros(delay, audio.dtype), audio[:-delay]])


def test_av_align_is_high_for_synthetic_clips_and_falls_with_shifted_audio():
    clips = [render_clip(class_id, seed) for class_id in range(6) for seed in (0, 1)]
    aligned = np.nanmean([av_align(c.frames, c.audio, FPS, SAMPLE_RATE) for c in clips])
    late = np.nanmean([av_align(c.frames, shifted(c.audio, 4), FPS, SAMPLE_RATE) for c in clips])
    # Flow peaks come in pairs around each bounce (falling into, rising out of it) while the sound
    # has one onset, so even perfect sync scores about 1/2 here.
    assert aligned > 0.3
    assert late < aligned - 0.12
