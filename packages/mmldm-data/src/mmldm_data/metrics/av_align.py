"""AV-Align (Yariv et al. 2024, TempoTokens): audio-video synchrony without learned weights.

Per clip: audio peaks are librosa onsets (onset_strength + onset_detect, librosa's defaults);
video peaks are strict local maxima of the mean optical-flow magnitude between consecutive frames
(OpenCV Farneback, the reference's parameters: pyramid scale 0.5, 3 levels, window 15, 3
iterations, poly_n 5, poly_sigma 1.2); the score is the IoU of the two peak sets, an audio peak
counting as matched when a video peak lies within one frame of it. As in the reference, the audio
is analysed at 22.05 kHz (librosa.load's default rate) and frames are converted to grey as OpenCV does.
"""

from __future__ import annotations

import cv2
import librosa
import numpy as np

ONSET_SAMPLE_RATE = 22050
FARNEBACK = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}


def flow_magnitudes(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [T, H, W, 3] -> [T]: entry k is the mean flow magnitude from frame k-1 to k.

    Entry 0 repeats entry 1 (as the reference does), so frame 0 is never a peak.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 2:
        raise ValueError(f"frames must be uint8 RGB [T >= 2, H, W, 3], got {frames.dtype} {frames.shape}")
    grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames]
    magnitudes = []
    for previous, current in zip(grey[:-1], grey[1:], strict=True):
        flow = cv2.calcOpticalFlowFarneback(previous, current, None, **FARNEBACK)  # [H, W, 2]
        magnitudes.append(float(np.hypot(flow[..., 0], flow[..., 1]).mean()))
    return np.array(magnitudes[:1] + magnitudes)


def video_peak_times(frames: np.ndarray, fps: float) -> np.ndarray:
    """Seconds at which the motion (flow magnitude) has a strict local maximum."""
    motion = flow_magnitudes(frames)
    is_peak = (motion[1:-1] > motion[:-2]) & (motion[1:-1] > motion[2:])
    return (np.flatnonzero(is_peak) + 1) / fps


def audio_peak_times(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Seconds of librosa's onsets in mono audio [N]."""
    audio = librosa.resample(np.asarray(audio, np.float32), orig_sr=sample_rate, target_sr=ONSET_SAMPLE_RATE)
    envelope = librosa.onset.onset_strength(y=audio, sr=ONSET_SAMPLE_RATE)
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=ONSET_SAMPLE_RATE)
    return librosa.frames_to_time(onsets, sr=ONSET_SAMPLE_RATE)


def peak_iou(audio_peaks: np.ndarray, video_peaks: np.ndarray, fps: float) -> float:
    """|matched audio peaks| / (|audio| + |video| - |matched|); NaN when neither has a peak."""
    matched = sum(bool(np.any(np.abs(video_peaks - peak) < 1.0 / fps)) for peak in audio_peaks)
    union = len(audio_peaks) + len(video_peaks) - matched
    return matched / union if union else float("nan")


def av_align(frames: np.ndarray, audio: np.ndarray, fps: float, sample_rate: int) -> float:
    """AV-Align of one clip: frames uint8 [T, H, W, 3] at `fps`, audio [N] covering the same span."""
    return peak_iou(audio_peak_times(audio, sample_rate), video_peak_times(frames, fps), fps)
