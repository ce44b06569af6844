"""Reading and writing audio/video files with PyAV (FFmpeg bundled in its wheel).

Conventions used throughout the project:
- times are presentation timestamps in seconds;
- video frames are uint8 RGB arrays [T, H, W, 3];
- audio is float32 mono [N] in [-1, 1].

Video is resampled to a target frame rate *by timestamps*: output frame k is the source frame on
screen at time ``start + k / fps``, so variable-frame-rate and odd-rate sources give the same
clips a player would show. Audio is mixed down to mono by averaging channels (rather than trusting
an encoder-specific downmix) and resampled with soxr.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile
import soxr

# A source frame counts as "on screen" at time t when its timestamp is at most t plus this slack,
# which absorbs float rounding between k / fps and pts * time_base.
_TIMESTAMP_SLACK = 1e-4
# Seconds decoded past the requested audio span so the resampler sees real signal at the edge.
_RESAMPLER_MARGIN = 0.05
# Last stretch of a video container that must still hold packets; a shorter file was cut off.
_TAIL_CHECK_SECONDS = 1.0
# libx264 constant rate factor: visually lossless at the small sizes the project works with.
_H264_CRF = "18"
# Frame rate assumed for a frame that states no duration in a stream that states no rate.
_FALLBACK_FPS = 25.0


class MediaError(Exception):
    """A media file could not be read or written; the message names the file and the reason."""


class NoAudioStreamError(MediaError):
    """The file has no audio stream."""


class NoVideoStreamError(MediaError):
    """The file has no video stream."""


@dataclass(frozen=True)
class MediaInfo:
    path: str
    duration: float  # seconds; the video stream's when there is one, else the audio stream's
    has_video: bool
    has_audio: bool
    width: int  # 0 without video
    height: int
    fps: float  # average frame rate; 0.0 without video
    audio_rate: int  # 0 without audio
    audio_channels: int


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    fps: float
    audio: np.ndarray | None  # float32 [round(T / fps * sample_rate)], when asked for
    sample_rate: int | None


@contextmanager
def _open_media(path: str | Path) -> Iterator[av.container.InputContainer]:
    """Open a file for reading, turning FFmpeg/OS failures into MediaError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such file")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: not a readable media file ({err})") from err
    try:
        with container:
            yield container
    except (av.error.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: decoding failed, the file is corrupt or truncated ({err})") from err


def _stream_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _frame_seconds(frame: av.AudioFrame | av.VideoFrame, fallback_fps: float) -> float:
    """How long a decoded frame lasts; video frames stating no duration last one frame period."""
    if isinstance(frame, av.AudioFrame):
        return frame.samples / frame.sample_rate
    return float(frame.duration * frame.time_base) if frame.duration else 1.0 / fallback_fps


def _timed(
    frames: Iterator[av.AudioFrame | av.VideoFrame], fallback_fps: float = _FALLBACK_FPS
) -> Iterator[tuple[float, av.AudioFrame | av.VideoFrame]]:
    """Pair decoded frames with presentation times in seconds.

    Frames without a timestamp (raw elementary streams such as .h264) start where the previous
    frame ended.
    """
    clock = 0.0
    for frame in frames:
        time = frame.time if frame.time is not None else clock
        yield time, frame
        clock = time + _frame_seconds(frame, fallback_fps)


def _stream_fps(stream: av.stream.Stream) -> float:
    return float(stream.average_rate or stream.guessed_rate or _FALLBACK_FPS)


def _decoded_duration(container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    """Duration found by decoding the whole stream, for containers whose header does not say."""
    fps = _stream_fps(stream) if stream.type == "video" else _FALLBACK_FPS
    return max(
        (time + _frame_seconds(frame, fps) for time, frame in _timed(container.decode(stream), fps)),
        default=0.0,
    )


def _check_tail_present(container: av.container.InputContainer, path: Path, duration: float) -> None:
    """Raise when the packets of the last second are missing, i.e. the file was cut short.

    Only done for files with video: their containers are indexed, so the header knows how long the
    file should be, while audio-only formats such as VBR mp3 only estimate their duration.
    """
    tail_start = max(0.0, duration - _TAIL_CHECK_SECONDS)
    container.seek(int(tail_start * av.time_base))
    tail_packets = (
        packet
        for packet in container.demux()
        if packet.size > 0 and packet.pts is not None and packet.pts * packet.time_base >= tail_start
    )
    if next(tail_packets, None) is None:
        raise MediaError(
            f"{path}: the header says {duration:.2f} s but the data stops earlier; the file is truncated"
        )


def probe_media(path: str | Path) -> MediaInfo:
    """Read stream metadata; decodes only when the container does not state its duration."""
    with _open_media(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        main = video or audio
        if main is None:
            raise MediaError(f"{path}: no audio or video stream (truncated, or not a media file)")
        duration = _stream_duration(container, main)
        if duration is None:
            duration = _decoded_duration(container, main)
        elif video is not None:
            _check_tail_present(container, Path(path), duration)
        return MediaInfo(
            path=str(path),
            duration=duration,
            has_video=video is not None,
            has_audio=audio is not None,
            width=video.codec_context.width if video else 0,
            height=video.codec_context.height if video else 0,
            fps=float(video.average_rate or video.guessed_rate or 0.0) if video else 0.0,
            audio_rate=audio.codec_context.sample_rate if audio else 0,
            audio_channels=audio.codec_context.channels if audio else 0,
        )


def count_frames(info: MediaInfo, fps: float) -> int:
    """How many frames at ``fps`` fit in the file (0 when it has no video)."""
    if not info.has_video:
        return 0
    return math.floor(info.duration * fps + _TIMESTAMP_SLACK)


@dataclass(frozen=True)
class MediaScan:
    """What a full decode of a file found; the dataset index stores it per file."""

    has_video: bool
    has_audio: bool
    video_seconds: float  # end time of the last decodable video frame
    audio_seconds: float  # decodable audio, in seconds
    audio_peak: float  # largest |sample| over all channels, in [0, 1] for float audio
    truncated: bool  # decoding stopped early (error, or less data than the header promises)


def scan_media(path: str | Path) -> MediaScan:
    """Decode every frame of the first video and audio stream once, without colour conversion.

    Metadata alone cannot tell a complete file from one cut off or corrupted midway; a decode can.
    Errors after the first frames mark the file truncated and keep what decoded before them.
    """
    with _open_media(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            raise MediaError(f"{path}: no audio or video stream (truncated, or not a media file)")
        header_seconds = {s.type: _stream_duration(container, s) for s in (video, audio) if s is not None}
    video_seconds, video_broken = _scan_stream(path, "video") if video else (0.0, False)
    audio_scan, audio_broken = _scan_stream(path, "audio") if audio else ((0.0, 0.0), False)
    audio_seconds, audio_peak = audio_scan
    if video and video_seconds == 0.0 and (not audio or audio_seconds == 0.0):
        raise MediaError(f"{path}: not a single frame decodes; the file is corrupt")
    # A file cut short often decodes without error but ends before its header says it should.
    short = lambda kind, seconds: (header_seconds.get(kind) or 0.0) - seconds > _TAIL_CHECK_SECONDS
    return MediaScan(
        has_video=video is not None,
        has_audio=audio is not None,
        video_seconds=video_seconds,
        audio_seconds=audio_seconds,
        audio_peak=audio_peak,
        truncated=video_broken or audio_broken or (video is not None and short("video", video_seconds)),
    )


def _scan_stream(path: str | Path, kind: str) -> tuple:
    """((video end seconds) or (audio seconds, peak), whether decoding hit an error)."""
    end, samples, peak, broken = 0.0, 0, 0.0, False
    to_float = av.AudioResampler(format="fltp")
    with _open_media(path) as container:
        stream = getattr(container.streams, kind)[0]
        stream.thread_type = "AUTO"
        fps = _stream_fps(stream) if kind == "video" else _FALLBACK_FPS
        try:
            for time, frame in _timed(container.decode(stream), fps):
                if kind == "video":
                    end = max(end, time + _frame_seconds(frame, fps))
                    continue
                for chunk in to_float.resample(frame):
                    samples += chunk.samples
                    if chunk.samples:
                        peak = max(peak, float(np.abs(chunk.to_ndarray()).max()))
        except (av.error.FFmpegError, OSError):
            broken = True
        if kind == "video":
            return end, broken
        return (samples / stream.codec_context.sample_rate, peak), broken


def _seek(container: av.container.InputContainer, stream: av.stream.Stream, start: float) -> None:
    """Seek to the last keyframe at or before ``start``; decoding from there reaches ``start``.

    Containers that state no duration (raw elementary streams) have no index and often no
    timestamps, so they are decoded from the beginning instead.
    """
    if start > 0 and container.duration is not None:
        container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)


def read_audio(
    path: str | Path, sample_rate: int, start: float = 0.0, duration: float | None = None
) -> np.ndarray:
    """Mono float32 audio [N] at ``sample_rate`` from any audio or video file.

    With ``duration`` the result has exactly round(duration * sample_rate) samples: zero-padded
    where the file is shorter (or its audio starts late), so that sample i is time start + i / sr.
    """
    if start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    with _open_media(path) as container:
        if not container.streams.audio:
            raise NoAudioStreamError(
                f"{path}: no audio stream; pick a file with sound or read only its video"
            )
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        native_rate = stream.codec_context.sample_rate
        stop = None if duration is None else start + duration + _RESAMPLER_MARGIN
        # Planar float keeps every channel apart, so the mono mixdown below is a plain mean.
        to_float = av.AudioResampler(format="fltp")
        _seek(container, stream, start)
        converted: list[av.AudioFrame] = []
        first_time: float | None = None
        for time, frame in _timed(container.decode(stream)):
            if first_time is None:
                first_time = time
            converted += to_float.resample(frame)
            if stop is not None and time > stop:
                break
        converted += to_float.resample(None)  # flush
    native = (
        np.concatenate([chunk.to_ndarray().mean(axis=0) for chunk in converted])
        if converted
        else np.zeros(0, np.float32)
    )  # [C, n] -> [n]
    # Align to `start`: drop samples decoded before it (seek lands on an earlier packet), or
    # prepend silence when the stream only begins after it.
    offset = round(((first_time if first_time is not None else start) - start) * native_rate)
    native = native[-offset:] if offset < 0 else np.concatenate([np.zeros(offset, np.float32), native])
    audio = soxr.resample(native, native_rate, sample_rate) if native_rate != sample_rate else native
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)
    if duration is None:
        return audio
    return _fit_length(audio, round(duration * sample_rate))


def _fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad a 1-D signal to exactly ``length`` samples."""
    if len(audio) >= length:
        return audio[:length]
    return np.pad(audio, (0, length - len(audio)))


def read_video(
    path: str | Path,
    fps: float,
    start: float = 0.0,
    num_frames: int | None = None,
    sample_rate: int | None = None,
) -> DecodedClip:
    """Frames at ``fps`` from ``start`` on, and optionally the audio of the same span.

    Frame k is the source frame on screen at ``start + k / fps``. Without ``num_frames`` all frames
    up to the end of the video are returned; with it, times past the last source frame hold that
    frame (as a player would), but ``start`` itself must lie inside the video.
    """
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    with _open_media(path) as container:
        if not container.streams.video:
            raise NoVideoStreamError(f"{path}: no video stream; use read_audio for audio-only files")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        _seek(container, stream, start)
        rgb_of: dict[int, np.ndarray] = {}  # a source frame shown at several times is converted once
        frames = []
        decoded = _timed(container.decode(stream), _stream_fps(stream))
        for source in _frames_on_screen(decoded, fps, start, num_frames):
            if id(source) not in rgb_of:
                rgb_of[id(source)] = source.to_ndarray(format="rgb24")
            frames.append(rgb_of[id(source)])
    if not frames:
        raise MediaError(f"{path}: no video frame at {start:.3f} s; the video is shorter (see probe_media)")
    if num_frames is not None:
        frames += [frames[-1]] * (num_frames - len(frames))
    clip = np.stack(frames)  # [T, H, W, 3]
    audio = None
    if sample_rate is not None:
        audio = read_audio(path, sample_rate, start=start, duration=len(clip) / fps)
    return DecodedClip(frames=clip, fps=fps, audio=audio, sample_rate=sample_rate)


def _frames_on_screen(
    decoded: Iterator[tuple[float, av.VideoFrame]], fps: float, start: float, num_frames: int | None
) -> Iterator[av.VideoFrame]:
    """Yield the source frame on screen at each time start + k / fps, in order."""
    k = 0
    wants_more = lambda: num_frames is None or k < num_frames
    shown: av.VideoFrame | None = None
    shown_end = -math.inf  # when the last decoded frame leaves the screen
    for time, frame in decoded:
        # Target times before this frame's timestamp show the previous frame. Times before the
        # first decoded frame show that frame: streams may start slightly after zero.
        while shown is not None and wants_more() and start + k / fps + _TIMESTAMP_SLACK < time:
            yield shown
            k += 1
        if not wants_more():
            return
        shown, shown_end = frame, time + _frame_seconds(frame, fps)
    while shown is not None and wants_more() and start + k / fps < shown_end - _TIMESTAMP_SLACK:
        yield shown
        k += 1


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 44100,
) -> None:
    """Write uint8 RGB frames [T, H, W, 3] (and optional mono audio) as H.264 + AAC mp4.

    Odd sizes are padded to even by repeating the last row/column (yuv420p needs even sizes). The
    audio is trimmed or zero-padded to exactly T / fps seconds so both streams end together.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            f"{path}: frames must be a non-empty uint8 array [T, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    height, width = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)
    try:
        with av.open(str(path), mode="w") as container:
            video = container.add_stream("libx264", rate=rate)
            video.width, video.height = frames.shape[2], frames.shape[1]
            video.pix_fmt = "yuv420p"
            # x264's macroblock-tree rate control made encodes of the same frames differ from run to run
            # (pixels off by up to 34), so two runs of one seed trained on different data; without it
            # the decoded frames are the same every time (files about 1.5x larger at this CRF).
            video.options = {"crf": _H264_CRF, "x264-params": "mbtree=0"}
            sound = None
            if audio is not None:
                sound = container.add_stream("aac", rate=sample_rate)
                sound.layout = "mono"
            for index, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = index
                container.mux(video.encode(frame))
            container.mux(video.encode())
            if sound is not None:
                samples = _fit_length(
                    np.asarray(audio, np.float32).reshape(-1), round(len(frames) / fps * sample_rate)
                )
                chunk = av.AudioFrame.from_ndarray(
                    np.clip(samples, -1.0, 1.0)[None], format="fltp", layout="mono"
                )
                chunk.sample_rate = sample_rate
                chunk.pts = 0
                container.mux(sound.encode(chunk))
                container.mux(sound.encode())
    except (av.error.FFmpegError, OSError) as err:
        raise MediaError(f"{path}: could not write the video ({err})") from err


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono audio; the format (wav, flac, ogg, ...) follows the file extension."""
    soundfile.write(str(path), np.clip(np.asarray(audio, np.float32), -1.0, 1.0), sample_rate)
