"""Waveform <-> log-mel <-> audio image, with the exact conventions of the MM-LDM authors.

The mel follows HiFi-GAN's ``meldataset.mel_spectrogram`` (jik876): ``center=False`` with
reflect padding of ``(n_fft - hop) / 2`` on each side, a periodic Hann window, magnitude
``sqrt(re^2 + im^2 + 1e-9)``, librosa's slaney filterbank and ``log(clamp(mel, 1e-5))``.

The paper preset stores audio at 44.1 kHz but builds the filterbank for 22.05 kHz (the
authors' quirk, docs/design.md#mel). The filterbank only acts on FFT bins, so the 80 mel bands
then cover about 0-16 kHz of the 44.1 kHz signal, and a 22.05 kHz HiFi-GAN (hop 256) turns
such a mel back into the same number of samples, which are written at 44.1 kHz.

The audio image maps the dB range [-80, +20] to [0, 1], quantises to uint8 like the
authors' ``np.uint8`` cast, repeats the grey image on 3 channels and resizes it bicubically
to ``R x R`` (mel bin 0 on row 0), as their PIL pipeline does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import librosa
import torch
import torch.nn.functional as F
from einops import pack, repeat, unpack
from torch import Tensor

# The authors' image scaling: x = (20*log10(mel) - DB_REF + DB_RANGE) / DB_RANGE.
DB_REF = 20.0
DB_RANGE = 100.0
LOG_CLAMP = 1e-5
# The quietest level an audio image can hold (-80 dB, pixel value 0), as a natural-log mel.
IMAGE_FLOOR_LOGMEL = (DB_REF - DB_RANGE) / 20.0 * math.log(10.0)
MAGNITUDE_EPS = 1e-9


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 44100  # rate of the stored waveform (paper preset)
    filterbank_rate: int = 22050  # rate the mel filterbank is built for (authors' quirk)
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0  # Hz at filterbank_rate: about 16 kHz of the 44.1 kHz waveform (paper preset)
    image_size: int = 256  # audio image side R

    @property
    def stft_padding(self) -> int:
        """Reflect padding on each side of the waveform (HiFi-GAN's center=False framing)."""
        return (self.n_fft - self.hop_length) // 2

    def num_frames(self, num_samples: int) -> int:
        """Mel frames for ``num_samples`` samples (70,560 -> 275 at the paper preset)."""
        return (num_samples + 2 * self.stft_padding - self.n_fft) // self.hop_length + 1

    def num_samples(self, seconds: float) -> int:
        """Waveform length of a clip of ``seconds`` (1.6 s -> 70,560 at 44.1 kHz)."""
        return round(seconds * self.sample_rate)


def pad_or_trim(wave: Tensor, num_samples: int) -> Tensor:
    """Cut ``wave [..., N]`` to ``num_samples``, or zero-pad its end as the authors' loader does."""
    length = wave.shape[-1]
    if length >= num_samples:
        return wave[..., :num_samples]
    return F.pad(wave, (0, num_samples - length))


@functools.lru_cache(maxsize=16)
def _mel_basis(cfg: MelConfig, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Same call as HiFi-GAN's librosa_mel_fn: slaney scale and slaney area normalisation.
    basis = librosa.filters.mel(
        sr=cfg.filterbank_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax
    )
    return torch.from_numpy(basis).to(device=device, dtype=dtype)  # [n_mels, n_fft // 2 + 1]


@functools.lru_cache(maxsize=16)
def _hann_window(win_length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.hann_window(win_length, device=device, dtype=dtype)


def mel_basis(
    cfg: MelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Cached mel filterbank ``[n_mels, n_fft // 2 + 1]`` built for ``cfg.filterbank_rate``."""
    return _mel_basis(cfg, torch.device(device), dtype)


def hann_window(
    cfg: MelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """Cached periodic Hann window of ``cfg.win_length`` samples."""
    return _hann_window(cfg.win_length, torch.device(device), dtype)


def stft(wave: Tensor, cfg: MelConfig) -> Tensor:
    """Complex STFT ``[B, n_fft // 2 + 1, frames]`` of ``wave [B, N]`` with HiFi-GAN's framing."""
    padded = F.pad(wave[:, None], (cfg.stft_padding, cfg.stft_padding), mode="reflect")[:, 0]
    return torch.stft(
        padded,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        win_length=cfg.win_length,
        window=hann_window(cfg, wave.device, wave.dtype),
        center=False,
        return_complex=True,
    )


def istft(spec: Tensor, cfg: MelConfig) -> Tensor:
    """Least-squares inverse of :func:`stft`: ``[B, n_fft // 2 + 1, T]`` -> ``[B, T * hop]``.

    torch.istft cannot invert ``center=False`` frames (the window envelope is zero at the
    padded edges), so the overlap-add is written out and the reflect padding cropped.
    """
    num_frames = spec.shape[-1]
    window = hann_window(cfg, spec.device, spec.real.dtype)
    left = (cfg.n_fft - cfg.win_length) // 2
    window = F.pad(window, (left, cfg.n_fft - cfg.win_length - left))  # as torch.stft centres it
    frames = torch.fft.irfft(spec, n=cfg.n_fft, dim=1) * window[:, None]  # [B, n_fft, T]
    fold = functools.partial(
        F.fold,
        output_size=(1, (num_frames - 1) * cfg.hop_length + cfg.n_fft),
        kernel_size=(1, cfg.n_fft),
        stride=(1, cfg.hop_length),
    )
    signal = fold(frames)[:, 0, 0]
    envelope = fold(repeat(window.square(), "k -> 1 k t", t=num_frames))[0, 0, 0]
    crop = slice(cfg.stft_padding, cfg.stft_padding + num_frames * cfg.hop_length)
    return signal[:, crop] / envelope[crop]


def mel_spectrogram(wave: Tensor, cfg: MelConfig) -> Tensor:
    """Natural-log mel ``[..., n_mels, frames]`` of a waveform ``[..., N]`` in [-1, 1]."""
    if wave.shape[-1] < cfg.n_fft:
        raise ValueError(
            f"mel_spectrogram needs at least n_fft={cfg.n_fft} samples, got a waveform of shape "
            f"{tuple(wave.shape)}; zero-pad it first (audio.pad_or_trim)."
        )
    if not wave.is_floating_point():
        raise TypeError(f"mel_spectrogram expects a float waveform in [-1, 1], got dtype {wave.dtype}.")
    flat, packed_shape = pack([wave], "* n")
    spec = stft(flat, cfg)
    magnitude = torch.sqrt(spec.real.square() + spec.imag.square() + MAGNITUDE_EPS)
    mel = mel_basis(cfg, wave.device, wave.dtype) @ magnitude
    logmel = torch.log(torch.clamp(mel, min=LOG_CLAMP))
    [logmel] = unpack(logmel, packed_shape, "* m t")
    return logmel


def _resize_bicubic(image: Tensor, size: tuple[int, int]) -> Tensor:
    # antialias=True selects torch's port of PIL's resampling (cubic a=-0.5, support widened
    # when downscaling), which is what the authors' PIL BICUBIC resize does.
    return F.interpolate(image, size=size, mode="bicubic", align_corners=False, antialias=True)


def _resize_like_pil(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    # PIL resizes a uint8 image in two passes, horizontal then vertical, and rounds to uint8
    # after each; torch's 1-D antialiased passes use PIL's weights, so copying the order and
    # the rounding keeps the result within one grey level of PIL's.
    height, width = size
    for pass_size in ((pixels.shape[-2], width), (height, width)):
        pixels = torch.clamp(torch.floor(_resize_bicubic(pixels, pass_size) + 0.5), 0.0, 255.0)
    return pixels


def logmel_to_audio_image(logmel: Tensor, cfg: MelConfig) -> Tensor:
    """Audio image ``[B, 3, R, R]`` in [-1, 1] from a natural-log mel ``[B, n_mels, T]``."""
    decibels = 20.0 / math.log(10.0) * logmel
    unit = torch.clamp((decibels - DB_REF + DB_RANGE) / DB_RANGE, 0.0, 1.0)
    grey = torch.floor(unit * 255.0)  # the authors' uint8 cast truncates
    rgb = repeat(grey, "b m t -> b c m t", c=3)
    return _resize_like_pil(rgb, (cfg.image_size, cfg.image_size)) / 127.5 - 1.0


def audio_image_to_logmel(image: Tensor, num_frames: int, cfg: MelConfig) -> Tensor:
    """Natural-log mel ``[B, n_mels, num_frames]`` from an audio image ``[B, 3, R, R]``.

    Values outside [-1, 1] (e.g. from a generator) are clipped: the forward mapping never
    produces them.
    """
    grey = image.clamp(-1.0, 1.0).mean(dim=1, keepdim=True)  # resize and channel mean commute
    unit = _resize_bicubic(grey, (cfg.n_mels, num_frames))[:, 0]
    unit = (unit + 1.0) * (127.5 / 255.0)
    decibels = unit * DB_RANGE - DB_RANGE + DB_REF
    return decibels * (math.log(10.0) / 20.0)


def waveform_to_audio_image(wave: Tensor, cfg: MelConfig) -> Tensor:
    """Audio image ``[B, 3, R, R]`` of a waveform ``[B, N]``."""
    return logmel_to_audio_image(mel_spectrogram(wave, cfg), cfg)
