from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from mmldm_data.media import (
    MediaError,
    NoAudioStreamError,
    NoVideoStreamError,
    count_frames,
    probe_media,
    read_audio,
    read_video,
    write_audio,
    write_video,
)

RATE = 44100


def _sine(frequency: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * frequency * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _peak_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


def _numbered_frames(count: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frames whose brightness encodes their index (index * 8), to check which source frame was read."""
    return np.broadcast_to(
        (np.arange(count, dtype=np.uint8) * 8)[:, None, None, None], (count, height, width, 3)
    ).copy()


def _frame_indices(frames: np.ndarray) -> list[int]:
    return [round(float(frame.mean()) / 8) for frame in frames]


def _write_with_pyav(path: Path, codec: str, planes: np.ndarray, rate: int, layout: str) -> None:
    """Encode float planar audio [C, N] with PyAV (for layouts and codecs soundfile lacks)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(planes, np.float32), format="fltp", layout=layout
        )
        frame.sample_rate = rate
        frame.pts = 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())


def _write_raw_video(path: Path, codec: str, pix_fmt: str, frames: np.ndarray, fps: int) -> None:
    """Encode frames with a given codec and pixel format (grayscale, odd sizes) with PyAV."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def sounding_mp4(tmp_path_factory) -> Path:
    """1 s at 25 fps, 440 Hz tone."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_video(path, _numbered_frames(25), 25.0, _sine(440, 1.0, RATE), RATE)
    return path


def test_write_probe_read_round_trip(sounding_mp4):
    info = probe_media(sounding_mp4)
    assert info.has_video and info.has_audio
    assert (info.width, info.height, info.fps, info.audio_rate, info.audio_channels) == (
        32,
        32,
        25.0,
        RATE,
        1,
    )
    assert info.duration == pytest.approx(1.0, abs=1e-3)
    assert count_frames(info, 10.0) == 10

    clip = read_video(sounding_mp4, fps=10.0, sample_rate=RATE)
    # Frame k is the source frame on screen at k / 10 s: source index floor(2.5 k).
    assert _frame_indices(clip.frames) == [int(2.5 * k) for k in range(10)]
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (10, 32, 32, 3)
    assert clip.audio.shape == (RATE,) and clip.audio.dtype == np.float32
    assert _peak_frequency(clip.audio, RATE) == pytest.approx(440, abs=2)


def test_written_streams_end_together(sounding_mp4):
    with av.open(str(sounding_mp4)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        video_seconds = float(video.duration * video.time_base)
        audio_seconds = float(audio.duration * audio.time_base)
    assert abs(video_seconds - audio_seconds) <= 1 / 25


def test_same_frames_write_the_same_file(tmp_path):
    """Two runs of one seed must train on the same data: x264's default rate control (mbtree) wrote
    this synthetic clip differently on most writes (decoded pixels off by up to 23)."""
    from mmldm_data.synthetic import SyntheticConfig, render_clip

    config = SyntheticConfig()
    clip = render_clip(1, 5, config)
    written = set()
    for index in range(6):
        path = tmp_path / f"{index}.mp4"
        write_video(path, clip.frames, config.fps, clip.audio, config.sample_rate)
        written.add(path.read_bytes())
    assert len(written) == 1


def test_audio_padded_or_trimmed_to_video_length(tmp_path):
    for audio_seconds in (0.3, 2.0):
        path = tmp_path / f"{audio_seconds}.mp4"
        write_video(path, _numbered_frames(10), 10.0, _sine(300, audio_seconds, RATE), RATE)
        assert len(read_audio(path, RATE)) == pytest.approx(RATE, abs=RATE / 10)


def test_seeking_reads_the_requested_span(tmp_path):
    video_path = tmp_path / "numbered.mp4"
    write_video(video_path, _numbered_frames(30), 10.0)
    clip = read_video(video_path, fps=10.0, start=1.5, num_frames=5)
    assert _frame_indices(clip.frames) == [15, 16, 17, 18, 19]

    wav_path = tmp_path / "tone.wav"
    tone = _sine(523, 1.0, RATE)
    write_audio(wav_path, tone, RATE)
    window = read_audio(wav_path, RATE, start=0.25, duration=0.1)
    np.testing.assert_allclose(window, tone[RATE // 4 : RATE // 4 + RATE // 10], atol=1e-3)


def test_frames_past_the_end_hold_the_last_one(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, _numbered_frames(10), 10.0, _sine(300, 1.0, RATE), RATE)
    clip = read_video(path, fps=10.0, start=0.5, num_frames=8, sample_rate=RATE)
    assert _frame_indices(clip.frames) == [5, 6, 7, 8, 9, 9, 9, 9]
    assert clip.audio.shape == (round(0.8 * RATE),)
    assert np.abs(clip.audio[round(0.6 * RATE) :]).max() < 0.05  # zero-padded past the end
    with pytest.raises(MediaError, match="no video frame"):
        read_video(path, fps=10.0, start=2.0, num_frames=4)


@pytest.mark.parametrize("suffix", ["wav", "flac", "mp3", "mp4"])
def test_read_audio_formats(tmp_path, suffix):
    path = tmp_path / f"tone.{suffix}"
    tone = _sine(440, 1.0, RATE)
    if suffix == "mp4":
        write_video(path, _numbered_frames(10), 10.0, tone, RATE)
    else:
        soundfile.write(str(path), tone, RATE)
    audio = read_audio(path, RATE, duration=1.0)
    assert audio.shape == (RATE,) and audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0
    assert _peak_frequency(audio, RATE) == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(audio[RATE // 10 : -RATE // 10] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_stereo_mixdown_is_the_channel_mean(tmp_path):
    path = tmp_path / "stereo.wav"
    tone = _sine(440, 0.5, RATE)
    soundfile.write(str(path), np.stack([tone, 0.5 * tone], axis=1), RATE)
    np.testing.assert_allclose(read_audio(path, RATE), 0.75 * tone, atol=1e-3)


def test_surround_mixdown_is_the_channel_mean(tmp_path):
    path = tmp_path / "surround.flac"
    tone = _sine(440, 0.5, RATE)
    gains = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    _write_with_pyav(path, "flac", gains[:, None] * tone[None], RATE, "5.1")
    assert probe_media(path).audio_channels == 6
    np.testing.assert_allclose(read_audio(path, RATE), gains.mean() * tone, atol=1e-3)


@pytest.mark.parametrize("source_rate", [8000, 48000])
def test_resampling_to_44100(tmp_path, source_rate):
    path = tmp_path / f"tone_{source_rate}.wav"
    soundfile.write(str(path), _sine(1000, 1.0, source_rate), source_rate)
    audio = read_audio(path, RATE)
    assert len(audio) == pytest.approx(RATE, abs=2)
    assert _peak_frequency(audio, RATE) == pytest.approx(1000, abs=2)


def test_compressed_stereo_in_video_container(tmp_path):
    path = tmp_path / "stereo.m4a"
    tone = _sine(440, 0.5, RATE)
    _write_with_pyav(path, "aac", np.stack([tone, tone]), RATE, "stereo")
    audio = read_audio(path, 22050, duration=0.5)
    assert audio.shape == (11025,)
    assert _peak_frequency(audio, 22050) == pytest.approx(440, abs=3)


def test_grayscale_and_odd_sized_video(tmp_path):
    frames = _numbered_frames(5, height=21, width=33)
    gray_path = tmp_path / "gray.mkv"
    _write_raw_video(gray_path, "ffv1", "gray", frames, 10)
    clip = read_video(gray_path, fps=10.0)
    assert clip.frames.shape == (5, 21, 33, 3) and _frame_indices(clip.frames) == [0, 1, 2, 3, 4]

    odd_path = tmp_path / "odd.mp4"
    write_video(odd_path, frames, 10.0)
    info = probe_media(odd_path)
    assert (info.width, info.height) == (34, 22)  # padded to even for yuv420p
    assert read_video(odd_path, fps=10.0).frames.shape == (5, 22, 34, 3)


def test_raw_stream_without_timestamps(tmp_path):
    """Raw .h264 carries no container timestamps or duration: times come from frame durations."""
    path = tmp_path / "raw.h264"
    with av.open(str(path), mode="w", format="h264") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index, image in enumerate(_numbered_frames(20)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert probe_media(path).duration == pytest.approx(2.0)
    assert _frame_indices(read_video(path, fps=10.0, start=1.0, num_frames=3).frames) == [10, 11, 12]


def test_truncated_and_corrupt_files_raise_media_error(tmp_path, sounding_mp4):
    data = sounding_mp4.read_bytes()  # index ("moov") after the media data, as write_video leaves it
    cuts = [
        ("half.mp4", data[: len(data) // 2]),
        ("no_index.mp4", data[: len(data) * 3 // 4]),
        ("junk.mp4", bytes(range(256)) * 8),
    ]
    for name, payload in cuts:
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(MediaError, match=name):
            probe_media(path)
        with pytest.raises(MediaError):
            read_video(path, fps=10.0)
    with pytest.raises(MediaError, match="no such file"):
        read_audio(tmp_path / "missing.wav", RATE)


def test_truncated_file_with_index_up_front_raises(tmp_path):
    """A 'faststart' mp4 keeps its index at the start, so only the missing tail tells the truncation."""
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        # One encoder thread: x264's threaded output varies with machine load, and with it where the
        # cut below lands (this test failed now and then in full-suite runs).
        stream = container.add_stream("libx264", rate=Fraction(10), options={"threads": "1"})
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for index, image in enumerate(
            np.random.default_rng(0).integers(0, 255, (30, 32, 32, 3), dtype=np.uint8)
        ):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    assert probe_media(path).duration == pytest.approx(3.0)
    # Cut at half: well before the last second's first frame (at 2/3 of the data, plus the index up
    # front), which a cut at 2/3 of the file kept or lost with the encoder's frame sizes.
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated"):
        probe_media(path)


def test_missing_streams(tmp_path):
    silent = tmp_path / "silent.mp4"
    write_video(silent, _numbered_frames(5), 10.0)
    assert not probe_media(silent).has_audio
    with pytest.raises(NoAudioStreamError, match="silent.mp4"):
        read_audio(silent, RATE)
    with pytest.raises(NoAudioStreamError):
        read_video(silent, fps=10.0, sample_rate=RATE)

    sound_only = tmp_path / "tone.wav"
    write_audio(sound_only, _sine(440, 0.2, RATE), RATE)
    assert count_frames(probe_media(sound_only), 10.0) == 0
    with pytest.raises(NoVideoStreamError, match="tone.wav"):
        read_video(sound_only, fps=10.0)
