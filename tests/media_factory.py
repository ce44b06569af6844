"""Media files with chosen defects, written with PyAV, for tests of readers and the index."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def moving_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [T, H, W, 3]: a bright square sliding over a dark noisy background."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 40, size=(num_frames, height, width, 3), dtype=np.uint8)
    side = max(2, min(height, width) // 4)
    for t in range(num_frames):
        x = (t * 3) % max(1, width - side)
        frames[t, height // 3 : height // 3 + side, x : x + side] = (230, 60, 40)
    return frames


def tone(
    seconds: float, sample_rate: int, channels: int = 1, frequency: float = 440.0, amplitude: float = 0.3
) -> np.ndarray:
    """float32 [C, N]: a sine, each channel a little detuned."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return np.stack(
        [amplitude * np.sin(2 * np.pi * (frequency + 20 * c) * t) for c in range(channels)]
    ).astype(np.float32)


def write_test_video(
    path: Path,
    seconds: float = 2.0,
    fps: int = 10,
    size: tuple[int, int] = (48, 64),  # (height, width)
    audio: np.ndarray | None = None,  # float32 [C, N]; None writes no audio stream
    sample_rate: int = 44100,
    gray: bool = False,
    audio_packets: bool = True,  # False: an audio stream that holds no samples
) -> Path:
    height, width = size
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = moving_frames(round(seconds * fps), height, width)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264" if not gray else "ffv1", rate=fps)
        video.width, video.height = width, height
        video.pix_fmt = "gray" if gray else "yuv420p"
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=sample_rate)
            audio_stream.layout = LAYOUTS[audio.shape[0]]
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if gray:
                frame = frame.reformat(format="gray")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if audio_stream is not None and audio_packets:
            chunk = 1024
            for offset in range(0, audio.shape[1], chunk):
                piece = np.ascontiguousarray(audio[:, offset : offset + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=LAYOUTS[audio.shape[0]])
                frame.sample_rate = sample_rate
                frame.pts = offset
                frame.time_base = Fraction(1, sample_rate)
                container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode())
    return path


def truncate(path: Path, keep_fraction: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def stream_seconds(path: Path) -> tuple[float, float, int]:
    """(video seconds, audio seconds, decoded frames) of an mp4, read back with PyAV."""
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video))
        video_seconds = float(video.duration * video.time_base)
        audio_seconds = float(audio.duration * audio.time_base)
    return video_seconds, audio_seconds, frames
