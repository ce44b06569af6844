"""Frechet Audio Distance (FAD) with selectable embedding networks.

FAD = scale * Frechet distance between the embeddings of generated and real audio clips (same
`frechet_distance` as FVD). Each backend fixes its sample rate, front end and scale:

  vggish     VGGish (Hershey et al. 2017), the common FAD standard (google-research
             frechet_audio_distance): 16 kHz, log-mel examples of 0.96 s (hop 0.96 s), the 128-d
             embedding before the PCA/quantisation post-processing and before torchvggish's final
             ReLU (the TF `vggish/embedding` tensor has none), scale 1. A 1.6 s clip gives one example.
             Weights (torchvggish's conversion of the TF checkpoint, Apache-2.0):
             https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth
  audioclip  AudioCLIP's ESResNeXt-fbsp audio head (Guzhov et al. 2022), as MM-Diffusion's
             evaluator uses it: 44.1 kHz mono 1.6 s, raw (not L2-normalised) 1024-d features,
             scale 1e4, and samples in [-1, 1] fed without AudioCLIP's x32768 int16 gain (the
             quirk that MM-Diffusion's published numbers depend on).
             Weights (the full AudioCLIP checkpoint; only its `audio.*` tensors are read, MIT):
             https://github.com/AndreyGuzhov/AudioCLIP/releases/download/v0.1/AudioCLIP-Full-Training.pt
  aisfx      offline stand-in: the sound-effects CNN of Ma & Lerch (ISMIR 2022), whose weights ship
             inside the PyPI wheel `aisfx==0.1.2` (aisfx/models/checkpoint.pth, CC-BY-4.0). 44.1 kHz,
             the package's librosa front end (peak-normalised clip, 96 HTK mel bands, n_fft 2048,
             hop 1024, log10(1e4 x + 1) / 9.4578, blocks of 100 frames), 512-d, scale 1.
             NOT comparable to any published FAD: use it to rank this project's own runs only.

Nothing is downloaded at run time. A backend's weights come from an explicit path, else the
environment variable MMLDM_<NAME>_WEIGHTS, else <$MMLDM_CACHE or ~/.cache/mmldm>/weights/<file name>;
a missing file raises FADWeightsError naming the public source and these three places.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import librosa
import numpy as np
import scipy.signal
import soxr
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from mmldm_data.metrics.frechet import ArrayLike, frechet_distance
from mmldm_data.metrics.i3d import default_cache_dir


class FADWeightsError(FileNotFoundError):
    """The weights of a FAD backend are missing or do not fit its network."""


@dataclass(frozen=True)
class BackendSpec:
    name: str
    sample_rate: int
    embedding_dim: int
    scale: float  # reported FAD = scale * Frechet distance
    comparable: bool  # whether the number can be compared with published FAD values
    label: str  # one line for reports
    weights_file: str
    weights_source: str  # public origin of the weights file

    @property
    def weights_env(self) -> str:
        return f"MMLDM_{self.name.upper()}_WEIGHTS"

    @property
    def metric_name(self) -> str:
        return f"fad_{self.name}"


# One row per backend: name, sample rate, embedding width, FAD scale, comparable with published values.
# fmt: off
VGGISH = BackendSpec("vggish", 16000, 128, 1.0, True,
    label="VGGish 128-d (pre-PCA, no final ReLU), 16 kHz, 0.96 s examples; the common FAD standard",
    weights_file="vggish-10086976.pth",
    weights_source="https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth")
AUDIOCLIP = BackendSpec("audioclip", 44100, 1024, 1e4, True,
    label="AudioCLIP ESResNeXt-fbsp 1024-d, 44.1 kHz 1.6 s, x1e4, no x32768 gain (MM-Diffusion protocol)",
    weights_file="AudioCLIP-Full-Training.pt",
    weights_source="https://github.com/AndreyGuzhov/AudioCLIP/releases/download/v0.1/AudioCLIP-Full-Training.pt")
AISFX = BackendSpec("aisfx", 44100, 512, 1.0, False,
    label="aisfx sound-effects CNN 512-d (offline stand-in, CC-BY-4.0): NOT comparable to published FAD",
    weights_file="aisfx/models/checkpoint.pth",
    weights_source="PyPI wheel aisfx==0.1.2 (`pip install --no-deps aisfx==0.1.2`)")
# fmt: on
BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (VGGISH, AUDIOCLIP, AISFX)}


def resolve_weights_path(spec: BackendSpec, weights: str | Path | None = None) -> Path:
    """The weights file of a downloadable backend: explicit path, environment variable, or cache."""
    default = default_cache_dir() / "weights" / spec.weights_file
    path = Path(weights) if weights is not None else Path(os.environ.get(spec.weights_env, default))
    if path.is_file():
        return path
    raise FADWeightsError(
        f"FAD backend {spec.name!r} needs its weights file {spec.weights_file}, not found at {path}. "
        f"Nothing is downloaded at run time: fetch it from {spec.weights_source} on a machine with "
        f"internet, then pass it explicitly (tools/eval_fvd_fad.py --fad-weights {spec.name}=PATH), set "
        f"{spec.weights_env}=PATH, or copy it to {default}."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or of a pickled state dict (loaded with weights_only=True)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... on bad files
        raise FADWeightsError(
            f"{path}: not a readable PyTorch state dict ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(state, dict):
        raise FADWeightsError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, backend: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first_lines = "\n".join(str(error).splitlines()[:4])
        raise FADWeightsError(f"{path} does not fit the {backend} network:\n{first_lines}") from None


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """float32 [B, N] -> [B, round(N * target / source)] (soxr, as the project's decoder)."""
    if source_rate == target_rate:
        return audio
    return np.stack([soxr.resample(clip, source_rate, target_rate) for clip in audio]).astype(np.float32)


class AudioEmbedder(nn.Module):
    """A FAD backend: its network and front end; `embed` turns clips into embeddings."""

    spec: BackendSpec
    weights_path: Path | None = None  # set by the loaders; part of the real-set cache key

    def embed_resampled(self, audio: np.ndarray) -> torch.Tensor:
        """float32 [B, N] at spec.sample_rate -> [M, D] (M >= B when a clip gives several examples)."""
        raise NotImplementedError

    @torch.inference_mode()
    def embed(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono clips float [B, N] in [-1, 1] at `sample_rate` -> embeddings float32 [M, D]."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 2:
            raise ValueError(f"audio must be [clips, samples], got shape {audio.shape}")
        return self.embed_resampled(resample(audio, sample_rate, self.spec.sample_rate)).float().cpu().numpy()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def fad(fake_embeddings: ArrayLike, real_embeddings: ArrayLike, spec: BackendSpec) -> float:
    """The backend's FAD: scale x Frechet distance of [M, D] embeddings (fake vs real)."""
    return spec.scale * frechet_distance(fake_embeddings, real_embeddings)


#################################################################################
#                                      VGGish                                   #
#################################################################################

VGGISH_WINDOW, VGGISH_HOP, VGGISH_FFT = 400, 160, 512  # 25 ms / 10 ms at 16 kHz
VGGISH_MEL_BANDS, VGGISH_MEL_RANGE_HZ, VGGISH_LOG_OFFSET = 64, (125.0, 7500.0), 0.01
VGGISH_EXAMPLE_FRAMES = 96  # 0.96 s, also the hop between examples


def vggish_mel_matrix() -> np.ndarray:
    """[257, 64] VGGish mel filterbank (mel_features.spectrogram_to_mel_matrix).

    Its triangles are linear in mel (librosa's are linear in Hz), and published VGGish FAD depends
    on this exact front end, hence not librosa's filters.
    """

    def hertz_to_mel(hertz: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(hertz) / 700.0)

    bins_mel = hertz_to_mel(np.linspace(0.0, VGGISH.sample_rate / 2, VGGISH_FFT // 2 + 1))[:, None]
    edges = np.linspace(*hertz_to_mel(VGGISH_MEL_RANGE_HZ), VGGISH_MEL_BANDS + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    weights = np.maximum(
        0.0, np.minimum((bins_mel - lower) / (centre - lower), (upper - bins_mel) / (upper - centre))
    )
    weights[0] = 0.0  # the DC bin never contributes
    return weights


def vggish_examples(waveform: np.ndarray) -> np.ndarray:
    """float [N] at 16 kHz -> log-mel examples float32 [E, 96, 64] (vggish_input.waveform_to_examples).

    Frames and examples that do not fit whole are dropped, as in the reference.
    """
    min_samples = VGGISH_WINDOW + (VGGISH_EXAMPLE_FRAMES - 1) * VGGISH_HOP
    if len(waveform) < min_samples:
        raise ValueError(
            f"VGGish needs at least {min_samples / VGGISH.sample_rate:.3f} s of audio, "
            f"got {len(waveform)} samples"
        )
    periodic_hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(VGGISH_WINDOW) / VGGISH_WINDOW)
    frames = np.lib.stride_tricks.sliding_window_view(waveform.astype(np.float64), VGGISH_WINDOW)[
        ::VGGISH_HOP
    ]
    magnitude = np.abs(np.fft.rfft(frames * periodic_hann, n=VGGISH_FFT))  # [F, 257]
    log_mel = np.log(magnitude @ vggish_mel_matrix() + VGGISH_LOG_OFFSET)  # [F, 64]
    examples = np.lib.stride_tricks.sliding_window_view(log_mel, VGGISH_EXAMPLE_FRAMES, axis=0)[
        ::VGGISH_EXAMPLE_FRAMES
    ]
    return rearrange(examples, "e m t -> e t m").astype(np.float32)


class VGGish(AudioEmbedder):
    """VGGish in torchvggish's module layout: log-mel [B, 1, 96, 64] -> embedding [B, 128]."""

    spec = VGGISH

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for width in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 128),
            nn.ReLU(inplace=True),
        )

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        x = self.features(log_mel)  # [B, 512, 6, 4]
        x = rearrange(x, "b c h w -> b (h w c)")  # TF flattens channels-last
        return self.embeddings[:-1](x)  # the TF embedding has no final ReLU

    def embed_resampled(self, audio: np.ndarray) -> torch.Tensor:
        examples = np.concatenate([vggish_examples(clip) for clip in audio])  # [M, 96, 64]
        return self(torch.from_numpy(examples)[:, None].to(self.device))


def load_vggish(weights: str | Path | None = None, device: str | torch.device = "cpu") -> VGGish:
    path = resolve_weights_path(VGGISH, weights)
    model = VGGish()
    load_strict(model, read_state_dict(path), path, "vggish")
    model.weights_path = path
    return model.eval().requires_grad_(False).to(device)


#################################################################################
#                         AudioCLIP audio head (ESResNeXt-fbsp)                 #
#################################################################################

AUDIOCLIP_FFT, AUDIOCLIP_HOP, AUDIOCLIP_WINDOW = 2048, 561, 1654
AUDIOCLIP_BANDS = 3  # the spectrogram is cut into 3 frequency bands, fed as the image's 3 channels
AUDIOCLIP_LOG10_FLOOR = 1e-18


class LinearFBSP(nn.Module):
    """AudioCLIP's trainable Fourier basis: frames [.., L] -> complex spectrum [.., K].

    Filter k is a carrier exp(-i fc_k t) under a sinc window of width fb_k / m_k raised to the
    power m_k, scaled by sqrt(fb_k) / sqrt(L), with t spanning [-pi, pi] over the frame.
    """

    eps = 1e-8

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.zeros(out_features))
        self.fb = nn.Parameter(torch.ones(out_features))
        self.fc = nn.Parameter(torch.arange(out_features, dtype=torch.float32))

    def filterbank(self, length: int) -> torch.Tensor:
        """complex64 [K, length]."""
        t = math.pi * torch.linspace(-1.0, 1.0, length, device=self.m.device) + self.eps  # [L]
        m, fb, fc = self.m[:, None], self.fb[:, None], self.fc[:, None]  # [K, 1]
        window = torch.sinc(fb * t / (m + self.eps) / math.pi)  # sin(x) / x, [K, L]
        # A real base to a real power m, on the principal branch (the original's complex `power`).
        window = torch.polar(window.abs() ** m, m * torch.atan2(torch.zeros_like(window), window))
        carrier = torch.polar(torch.ones_like(t), -fc * t)
        return fb.sqrt() * window * carrier / math.sqrt(length)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.to(torch.complex64) @ self.filterbank(frames.shape[-1]).T


class AttentionGate(nn.Module):
    """AudioCLIP's Attention2d: a sigmoid gate computed from a block's input, sized like its output."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: tuple[int, int], padding: tuple[int, int]
    ) -> None:
        super().__init__()
        self.conv_depth = nn.Conv2d(in_channels, in_channels, kernel, padding=padding, groups=in_channels)
        self.conv_point = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        x = F.adaptive_max_pool2d(x, size)
        return torch.sigmoid(self.bn(self.conv_point(self.conv_depth(x))))


class AudioCLIPAudio(ResNet, AudioEmbedder):
    """AudioCLIP's audio tower: waveform [B, N] at 44.1 kHz -> raw features [B, 1024].

    A ResNeXt-50 (32x4d) over a log-power spectrogram from `LinearFBSP`, with attention gates
    around each stage; module names are AudioCLIP's (`audio.*` in its checkpoint).
    """

    spec = AUDIOCLIP

    def __init__(self) -> None:
        ResNet.__init__(
            self, Bottleneck, [3, 4, 6, 3], num_classes=AUDIOCLIP.embedding_dim, groups=32, width_per_group=4
        )
        self.fbsp = LinearFBSP(AUDIOCLIP_FFT // 2 + 1)
        self.att1 = AttentionGate(64, 256, (3, 1), (1, 0))
        self.att2 = AttentionGate(256, 512, (1, 5), (0, 2))
        self.att3 = AttentionGate(512, 1024, (3, 1), (1, 0))
        self.att4 = AttentionGate(1024, 2048, (1, 5), (0, 2))
        self.att5 = AttentionGate(2048, 2048, (3, 5), (1, 2))
        window = scipy.signal.get_window("blackmanharris", AUDIOCLIP_WINDOW, fftbins=True)
        # Fixed by the configuration, so not read from checkpoints (which may or may not hold it).
        self.register_buffer("window", torch.from_numpy(window).float(), persistent=False)

    def log_power_spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, N] -> dB power [B, 3, 341, F]."""
        # AudioCLIP maps int16-range input to [-1, 1]; MM-Diffusion feeds [-1, 1] audio straight in.
        x = (audio.float() + 32768.0) * 2.0 / 65535.0 - 1.0
        num_frames = 1 + math.ceil(max(x.shape[-1] - AUDIOCLIP_WINDOW, 0) / AUDIOCLIP_HOP)
        pad = (num_frames - 1) * AUDIOCLIP_HOP + AUDIOCLIP_WINDOW - x.shape[-1]
        x = F.pad(x, (pad // 2, pad - pad // 2))
        frames = x.unfold(-1, AUDIOCLIP_WINDOW, AUDIOCLIP_HOP) * self.window  # [B, F, 1654]
        centring = AUDIOCLIP_FFT - AUDIOCLIP_WINDOW
        frames = F.pad(frames, (centring // 2, centring - centring // 2))  # [B, F, 2048]
        spectrum = rearrange(self.fbsp(frames), "b f k -> b k f")  # [B, 1025, F]
        band_height = spectrum.shape[1] // AUDIOCLIP_BANDS
        bands = rearrange(
            spectrum[:, : band_height * AUDIOCLIP_BANDS], "b (c k) f -> b c k f", c=AUDIOCLIP_BANDS
        )
        power = bands.real**2 + bands.imag**2
        power = torch.where(power > 0, power, torch.full_like(power, AUDIOCLIP_LOG10_FLOOR))
        return 10.0 * torch.log10(power)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.log_power_spectrogram(audio)))))
        stages = (
            (self.layer1, self.att1),
            (self.layer2, self.att2),
            (self.layer3, self.att3),
            (self.layer4, self.att4),
        )
        for stage, gate in stages:
            stage_input = x
            x = stage(x)
            x = x * gate(stage_input, x.shape[-2:])
        pooled = self.avgpool(x)  # [B, 2048, 1, 1]
        pooled = pooled * self.att5(x, pooled.shape[-2:])
        return self.fc(torch.flatten(pooled, 1))

    def embed_resampled(self, audio: np.ndarray) -> torch.Tensor:
        return self(torch.from_numpy(audio).to(self.device))


def load_audioclip(weights: str | Path | None = None, device: str | torch.device = "cpu") -> AudioCLIPAudio:
    """The audio tower from AudioCLIP-Full-Training.pt (keys `audio.*`) or from a file of its keys alone."""
    path = resolve_weights_path(AUDIOCLIP, weights)
    state = read_state_dict(path)
    if any(key.startswith("audio.") for key in state):
        state = {
            key.removeprefix("audio."): value for key, value in state.items() if key.startswith("audio.")
        }
    state.pop("window", None)
    # AudioCLIP builds LinearFBSP(bias=False) as Parameter(None), an empty tensor that is never used.
    if "fbsp.bias" in state and state["fbsp.bias"].numel() == 0:
        del state["fbsp.bias"]
    model = AudioCLIPAudio()
    load_strict(model, state, path, "audioclip")
    model.weights_path = path
    return model.eval().requires_grad_(False).to(device)


#################################################################################
#                           aisfx (offline stand-in)                            #
#################################################################################

AISFX_CHECKPOINT_SHA256 = "499ea75909c932a2f94c35fa722fa4fabc5bcb7e84917209cc5f7402627b7eb5"
AISFX_FFT, AISFX_HOP, AISFX_MEL_BANDS = 2048, 1024, 96
AISFX_BLOCK_FRAMES, AISFX_BLOCK_HOP = 100, 50  # ~2.3 s blocks, 50 % overlap (the package's defaults)
AISFX_LOG_MAX = 9.457798957824707  # the package's "original" normaliser: max over its training data


def aisfx_blocks(waveform: np.ndarray) -> np.ndarray:
    """float [N] at 44.1 kHz -> normalised log-mel blocks float32 [E, 100, 96] (aisfx's librosa path).

    A clip shorter than one block is zero-padded to it, as the package's `blocking` does.
    """
    peak = np.abs(waveform).max()
    waveform = waveform / peak if peak > 0 else waveform
    mel = librosa.feature.melspectrogram(
        y=waveform,
        sr=AISFX.sample_rate,
        n_fft=AISFX_FFT,
        hop_length=AISFX_HOP,
        win_length=AISFX_FFT,
        n_mels=AISFX_MEL_BANDS,
        fmin=0.0,
        fmax=AISFX.sample_rate / 2,
        htk=True,
        norm=1.0,
        power=2.0,
    )
    log_mel = (np.log10(mel * 1e4 + 1.0) / AISFX_LOG_MAX).T  # [T, 96]
    log_mel = np.pad(log_mel, ((0, max(0, AISFX_BLOCK_FRAMES - len(log_mel))), (0, 0)))
    blocks = np.lib.stride_tricks.sliding_window_view(log_mel, AISFX_BLOCK_FRAMES, axis=0)[::AISFX_BLOCK_HOP]
    return rearrange(blocks, "e m t -> e t m").astype(np.float32)


class AiSfxConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class AiSfx(AudioEmbedder):
    """aisfx's EmbeddingNet (the DCASE cross-task 8-layer CNN): [B, 100, 96] -> [B, 512]."""

    spec = AISFX

    def __init__(self) -> None:
        super().__init__()
        self.conv_block1 = AiSfxConvBlock(1, 64)
        self.conv_block2 = AiSfxConvBlock(64, 128)
        self.conv_block3 = AiSfxConvBlock(128, 256)
        self.conv_block4 = AiSfxConvBlock(256, 512)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        x = log_mel[:, None]  # [B, 1, time, mel]
        for block in (self.conv_block1, self.conv_block2, self.conv_block3):
            x = F.max_pool2d(block(x), kernel_size=2)
        x = self.conv_block4(x)  # [B, 512, time / 8, mel / 8]
        return x.mean(dim=3).amax(dim=2)

    def embed_resampled(self, audio: np.ndarray) -> torch.Tensor:
        blocks = np.concatenate([aisfx_blocks(clip) for clip in audio])
        return self(torch.from_numpy(blocks).to(self.device))


def find_aisfx_checkpoint() -> Path:
    """The checkpoint inside the installed aisfx wheel, found without importing the package."""
    spec = importlib.util.find_spec("aisfx")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location).parent / AISFX.weights_file
        if path.is_file():
            return path
    raise FADWeightsError(
        f"The offline FAD backend 'aisfx' reads {AISFX.weights_file} from the PyPI package aisfx, which "
        f"is {'installed without it' if locations else 'not installed'}. "
        "Fix: `pip install --no-deps aisfx==0.1.2` "
        "(listed in requirements-nodeps.txt; `make setup` installs it), or choose other --fad-backends."
    )


def load_aisfx(weights: str | Path | None = None, device: str | torch.device = "cpu") -> AiSfx:
    """aisfx's X-Sequential-CE embedding net; `weights` defaults to the installed wheel's checkpoint."""
    path = Path(weights) if weights is not None else find_aisfx_checkpoint()
    if not path.is_file():
        raise FADWeightsError(f"aisfx weights not found: {path}. Fix: `pip install --no-deps aisfx==0.1.2`.")
    if weights is None and hashlib.sha256(path.read_bytes()).hexdigest() != AISFX_CHECKPOINT_SHA256:
        raise FADWeightsError(
            f"{path} is not the aisfx 0.1.2 checkpoint (sha256 differs); reinstall aisfx==0.1.2."
        )
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        # The checkpoint is a pickled (state dict, {dataset: (numpy index, classes)}) pair; numpy
        # scalars are allowed as data, nothing else beyond torch's weights-only set.
        allowed = [
            (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
            np.dtype,
            np.dtypes.Int64DType,
        ]
        with torch.serialization.safe_globals(allowed):
            payload = torch.load(path, map_location="cpu", weights_only=True)
        state = payload[0] if isinstance(payload, tuple) else payload
        state = {
            key.removeprefix("embedding_net."): value
            for key, value in state.items()
            if not key.startswith("fc.")
        }  # fc.*: the training classifiers, unused for embeddings
    model = AiSfx()
    load_strict(model, state, path, "aisfx")
    model.weights_path = path
    return model.eval().requires_grad_(False).to(device)


LOADERS: dict[str, Callable[..., AudioEmbedder]] = {
    "vggish": load_vggish,
    "audioclip": load_audioclip,
    "aisfx": load_aisfx,
}


def load_fad_backend(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> AudioEmbedder:
    """A loaded FAD backend by name (one of BACKENDS)."""
    if name not in LOADERS:
        raise ValueError(f"unknown FAD backend {name!r}; choose from {sorted(LOADERS)}")
    return LOADERS[name](weights, device=device)
