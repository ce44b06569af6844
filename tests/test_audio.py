"""Waveform -> log-mel -> audio image conventions, checked against float64 and PIL references."""

from __future__ import annotations

import math

import librosa
import numpy as np
import pytest
import torch
from PIL import Image

from mmldm_data.audio import (
    MelConfig,
    audio_image_to_logmel,
    istft,
    logmel_to_audio_image,
    mel_spectrogram,
    pad_or_trim,
    stft,
    waveform_to_audio_image,
)

CFG = MelConfig()
CLIP_SAMPLES = 70_560  # 1.6 s at 44.1 kHz
GREY_LEVEL_NATS = math.log(10.0) * 100.0 / 255.0 / 20.0  # one uint8 step of the image, in log-mel units
IMAGE_FLOOR = math.log(1e-4)  # -80 dB: the darkest value the audio image keeps
IMAGE_CEILING = math.log(10.0)  # +20 dB
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def harmonic(num_samples: int = CLIP_SAMPLES, sample_rate: int = 44100) -> np.ndarray:
    t = np.arange(num_samples) / sample_rate
    return 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t + 1.0)


def noisy_harmonic(seed: int = 0) -> np.ndarray:
    return harmonic() + 0.1 * np.random.default_rng(seed).standard_normal(CLIP_SAMPLES)


def reference_logmel(wave: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """HiFi-GAN's mel_spectrogram written out in float64 numpy/librosa."""
    pad = (cfg.n_fft - cfg.hop_length) // 2
    padded = np.pad(wave, (pad, pad), mode="reflect")
    spec = librosa.stft(
        padded,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window="hann",
        center=False,
    )
    magnitude = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    basis = librosa.filters.mel(
        sr=cfg.filterbank_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
    )
    return np.log(np.maximum(basis @ magnitude, 1e-5))


def pil_audio_image(logmel: np.ndarray, size: int) -> np.ndarray:
    """The authors' image path: uint8 cast, PIL grey -> RGB, BICUBIC resize, [-1, 1]."""
    unit = np.clip((20 * np.log10(np.exp(logmel.astype(np.float64))) - 20 + 100) / 100, 0, 1)
    grey = Image.fromarray((unit * 255).astype(np.uint8), mode="L")
    rgb = grey.convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(rgb, dtype=np.float64).transpose(2, 0, 1) / 127.5 - 1


def smooth_logmel(num_frames: int = 275) -> torch.Tensor:
    """[1, 80, T] log-mel inside the image range whose detail survives the resizes."""
    freq = torch.linspace(0, 1, CFG.n_mels)[:, None]
    time = torch.linspace(0, 1, num_frames)[None]
    return (-5.0 + 3.0 * torch.sin(2 * math.pi * freq) * torch.cos(2 * math.pi * time))[None]


def test_paper_preset_frame_count():
    assert CFG.num_samples(1.6) == CLIP_SAMPLES
    assert CFG.num_frames(CLIP_SAMPLES) == 275
    assert mel_spectrogram(torch.zeros(CLIP_SAMPLES), CFG).shape == (80, 275)


def test_pad_or_trim():
    wave = torch.arange(10.0)[None]
    assert torch.equal(pad_or_trim(wave, 4), wave[:, :4])
    padded = pad_or_trim(wave, 13)
    assert padded.shape == (1, 13) and torch.equal(padded[:, :10], wave) and not padded[:, 10:].any()


@pytest.mark.parametrize("signal", ["harmonic", "noisy_harmonic"])
def test_mel_matches_float64_reference(signal):
    wave = {"harmonic": harmonic, "noisy_harmonic": noisy_harmonic}[signal]()
    reference = reference_logmel(wave, CFG)
    # float64: the same computation, so only rounding differs.
    exact = mel_spectrogram(torch.from_numpy(wave), CFG).numpy()
    np.testing.assert_allclose(exact, reference, rtol=0, atol=1e-9)
    # float32: error grows only where the mel approaches the 1e-5 clamp. Inside the range the
    # audio image keeps (>= -80 dB) it stays below 1e-3; measured 4.9e-4 (harmonic), 5e-6 (noisy).
    single = mel_spectrogram(torch.from_numpy(wave).float(), CFG).numpy()
    error = np.abs(single - reference)
    assert error[reference >= IMAGE_FLOOR].max() < 1e-3
    assert error[reference >= math.log(1e-3)].max() < 1e-4  # measured 2.9e-5
    assert error.max() < 5e-3  # measured 3.5e-3, in bins at the clamp


def test_mel_batched_equals_per_item():
    waves = torch.from_numpy(np.stack([harmonic(), noisy_harmonic(1), noisy_harmonic(2)])).float()
    waves = waves.reshape(3, 1, CLIP_SAMPLES).expand(3, 2, CLIP_SAMPLES)  # extra leading dim
    batched = mel_spectrogram(waves, CFG)
    assert batched.shape == (3, 2, 80, 275)
    for i in range(3):
        torch.testing.assert_close(batched[i, 1], mel_spectrogram(waves[i, 1], CFG), rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_stay_on_the_input_device(device):
    wave = torch.from_numpy(noisy_harmonic()).float()[None].to(device)
    logmel = mel_spectrogram(wave, CFG)
    image = logmel_to_audio_image(logmel, CFG)
    assert logmel.device == image.device == wave.device
    assert audio_image_to_logmel(image, logmel.shape[-1], CFG).device == wave.device


def test_mel_rejects_too_short_waveforms():
    with pytest.raises(ValueError, match="pad_or_trim"):
        mel_spectrogram(torch.zeros(100), CFG)


def test_istft_inverts_stft():
    wave = torch.from_numpy(noisy_harmonic()).float()[None]
    frames = CFG.num_frames(CLIP_SAMPLES)
    rebuilt = istft(stft(wave, CFG), CFG)
    assert rebuilt.shape == (1, frames * CFG.hop_length)
    torch.testing.assert_close(rebuilt, wave[:, : frames * CFG.hop_length], rtol=0, atol=1e-5)


def test_audio_image_layout():
    wave = torch.from_numpy(noisy_harmonic()).float()[None]
    image = waveform_to_audio_image(wave, CFG)
    assert image.shape == (1, 3, 256, 256)
    assert image.min() >= -1 and image.max() <= 1
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 0], image[:, 2])


def test_low_tone_lights_the_top_rows():
    t = torch.arange(CLIP_SAMPLES) / CFG.sample_rate
    image = waveform_to_audio_image(0.5 * torch.sin(2 * math.pi * 100 * t)[None], CFG)[0, 0]
    row_energy = image.mean(dim=1)  # [R]
    assert row_energy[:32].mean() > row_energy[128:].mean() + 0.5
    assert row_energy.argmax() < 16


def test_audio_image_matches_pil():
    waves = torch.from_numpy(np.stack([noisy_harmonic(), harmonic()])).float()
    logmel = mel_spectrogram(waves, CFG)
    image = logmel_to_audio_image(logmel, CFG).numpy()
    for ours, mel in zip(image, logmel.numpy(), strict=True):
        difference = np.abs(ours - pil_audio_image(mel, CFG.image_size)) * 127.5  # in grey levels
        # PIL works in fixed point; we stay within one grey level, and off by one on
        # at most 0.1% of pixels (measured 0.012% and 0%).
        assert difference.max() < 1 + 1e-3
        assert (difference > 0.5).mean() < 1e-3


def test_logmel_image_logmel_error_is_quantisation_plus_resize():
    logmel = smooth_logmel()
    decoded = audio_image_to_logmel(logmel_to_audio_image(logmel, CFG), logmel.shape[-1], CFG)
    error = (decoded - logmel).abs()
    # The uint8 cast truncates: half a grey level (0.023 nats) of bias on average, at most one
    # level (0.045) plus what the 80x275 -> 256x256 -> 80x275 resizes lose (measured max 0.064).
    assert error.mean() < 0.6 * GREY_LEVEL_NATS
    assert error.max() < 1.5 * GREY_LEVEL_NATS


def test_audio_logmel_survives_the_image_inside_its_range():
    logmel = mel_spectrogram(torch.from_numpy(noisy_harmonic()).float()[None], CFG)
    decoded = audio_image_to_logmel(logmel_to_audio_image(logmel, CFG), logmel.shape[-1], CFG)
    # Noise changes from frame to frame and 275 frames squeeze into 256 columns, so the
    # resizes cost more than the quantisation here: measured 0.083 nats (0.7 dB) on average.
    assert (decoded - logmel.clamp(IMAGE_FLOOR, IMAGE_CEILING)).abs().mean() < 0.1


def test_image_logmel_image_round_trip():
    logmel = mel_spectrogram(torch.from_numpy(np.stack([noisy_harmonic(), harmonic()])).float(), CFG)
    image = logmel_to_audio_image(logmel, CFG)
    again = logmel_to_audio_image(audio_image_to_logmel(image, logmel.shape[-1], CFG), CFG)
    error = (again - image).abs()
    assert error.mean() < 1.5 / 127.5  # measured 0.9 grey levels
    assert error.max() < 0.1  # measured 0.078 (10 levels) on the sharpest harmonic edges


def test_configurable_rates_and_image_size():
    cfg = MelConfig(sample_rate=22050, filterbank_rate=22050, image_size=64)
    wave = torch.from_numpy(harmonic(35_280, 22050)).float()[None]
    logmel = mel_spectrogram(wave, cfg)
    np.testing.assert_allclose(logmel[0].numpy(), reference_logmel(wave[0].double().numpy(), cfg), atol=5e-3)
    assert logmel_to_audio_image(logmel, cfg).shape == (1, 3, 64, 64)
