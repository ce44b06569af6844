"""Sounding videos from a trained DiT: the library behind `tools/sample.py`, `MMLDMPipeline` and the
DiT's previews.

A trained DiT run knows everything it needs: its checkpoint holds the DiT config, the latent
statistics it was trained with and the fingerprint of its autoencoder; its config names the
autoencoder run and the latent cache. `load_trained_dit` rebuilds all of it, `generate` runs a task
(`mmldm_data.tasks.Task`):

    svg                 audio and video from noise (one clip)
    a2v / v2a           video for a given sound / sound for a given video: a file or an array of
                        any length (cut into clip windows, docs/design.md#long), or clips of the
                        dataset (read from the latent cache)
    audio_continuation  the long model continues a real clip's audio (prev_a) for num_clips clips
    video_continuation  the same from a real clip's video (prev_v)
    long                the long model from nothing, num_clips clips (10 x 16 frames = 160 frames)

A given sound or video longer than one clip is cut into windows; with a long-generation model
(`chain`) window k is generated as a continuation of window k-1 (`sampling.sample_long`), without
one each window is generated alone. a2v keeps the given sound and v2a the given frames unless
`resynthesize` asks for the autoencoder's reconstruction of them.

Latents are unstandardised, decoded by the autoencoder (signal decoder + KL-VAE) and the vocoder,
and clips are joined without seams (`decode_media`): frames dissolve over JOIN_FRAMES on each side
of a join, the log-mels likewise over JOIN_MEL_FRAMES, and the sound of all clips is vocoded at
once. Each sample is written as <task>_<index>.mp4 (H.264 + AAC), .wav and .png (frames and the
spectrogram of the sound), by a background thread while the next batch samples (`MediaWriter`).
For a2v / v2a from labelled dataset clips, conditions.json records each sample's task and
conditioning class in the format of `mmldm_data.evaluation`, so that `tools/eval_fvd_fad.py`
reports a2v / v2a oracle accuracy on the synthetic set.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr
import torch
from torch import Tensor

from mmldm_ae.engine.checkpoint import load_ema_weights, load_module_weights, resolve_checkpoint
from mmldm_ae.engine.logger import WandbConfig
from mmldm_ae.engine.trainer import compile_static, peak_memory_gb
from mmldm_ae.pipeline import PRECISIONS, AutoencoderPipeline, load_autoencoder, set_inference_precision
from mmldm_data.audio import audio_image_to_logmel, mel_spectrogram, pad_or_trim, waveform_to_audio_image
from mmldm_data.config import ConfigError, DatasetConfig, to_typed
from mmldm_data.evaluation import CONDITIONS_FILE
from mmldm_data.media import MediaError, probe_media, read_audio, read_video, write_audio, write_video
from mmldm_data.preview import contact_sheet, save_png, spectrogram_rgb
from mmldm_data.tasks import Task
from mmldm_data.video import to_model_frames, to_uint8_frames
from mmldm_dit.dit import MODALITIES, DiTConfig, MMDiT
from mmldm_dit.latents import DiTLatentDataset, LatentStats
from mmldm_dit.sampling import DEFAULT_GUIDANCE, SAMPLERS, sample, sample_long

log = logging.getLogger(__name__)
# What one `generate` call wrote into its out_dir, so that the next call into the same folder replaces it.
SAMPLES_FILE = "samples.json"

SHEET_FRAMES = 8  # frames per contact-sheet row, evenly spread over the sample
# Items on each side of a clip join that dissolve into the other clip (docs/design.md#long): the jump
# between two independently decoded clips spreads over 2 * JOIN + 1 steps. 2 of 16 frames (0.2 s
# at 10 fps); 8 log-mel frames (46 ms at hop 256 / 44.1 kHz), a usual audio cross-fade length.
JOIN_FRAMES = 2
JOIN_MEL_FRAMES = 8
ENCODE_BATCH = 8  # windows of a given clip encoded at once
# Clips in one decoder call (B samples x k clips each; x (1 + T) items, x 2 with guidance): a long
# sample's 10 clips at batch 1 decode in one call, at batch 4 in three.
DECODE_CLIPS = 16
WRITE_QUEUE = 8  # samples decoded but not yet written before sampling waits for the writer


@dataclass
class SampleConfig:
    # run_dir of tools/train_dit.py, one of its checkpoints/step_* folders, or a model folder of
    # tools/export_model.py
    run: str | None = None
    task: str = "svg"  # a name of mmldm_data.tasks.Task
    out_dir: str = "outputs/samples"
    num_samples: int = 4
    batch_size: int = 4
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 50
    guidance_audio: float = DEFAULT_GUIDANCE  # paper Eq. 9 s; 0: no guidance
    guidance_video: float = DEFAULT_GUIDANCE
    num_clips: int = 10  # long / continuations: clips generated (16 frames each: 10 -> 160 frames)
    # Length of each sample: a2v / v2a from input (null: the input's length; windows of one clip are
    # chained), long / continuations (null: num_clips clips). svg makes one clip.
    seconds: float | None = None
    # a2v / audio_continuation: a file with sound (any rate and length); v2a / video_continuation: a
    # video file. null: dataset clips from the run's latent cache (`clips`, or evenly spread).
    input: str | None = None
    clips: list[int] | None = None
    # a2v / v2a from input: the given modality as the autoencoder reconstructs it, not the input itself
    resynthesize: bool = False
    long_run: str | None = None  # a2v / v2a: the long-generation run that chains windows (run= a run_dir)
    ae_run: str | None = None  # the autoencoder, when it moved since the DiT was trained
    ae_steps: int | None = None  # DDIM steps of the autoencoder's decoder (null: its ae.decode_steps)
    vocoder: str = "hifigan-universal"
    use_ema: bool = True
    # bf16 | fp32 weights of the DiT, the autoencoder and the VAE; null: bf16 where native (CUDA,
    # AMX CPUs), else fp32
    precision: str | None = None
    # torch.compile the DiT and the decoder UNet (static shapes: compiled at the first batch, then no
    # recompiles between steps or batches of the same size; minutes on a GPU, see `compile_for_sampling`)
    compile: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)  # tools/sample.py: the samples as a W&B table

    def validate(self) -> None:
        problems = []
        if self.run is None:
            problems.append(
                "run is not set: give the run_dir of a tools/train_dit.py run (run=outputs/runs/...) "
                "or a model folder of tools/export_model.py"
            )
        try:
            task = Task.parse(self.task)
        except ConfigError as error:
            problems.append(str(error))
            task = None
        if self.sampler not in SAMPLERS:
            problems.append(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        for name in ("guidance_audio", "guidance_video"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (0: no guidance), got {getattr(self, name)}")
        for name in ("num_samples", "batch_size", "steps", "num_clips"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ae_steps is not None and self.ae_steps < 1:
            problems.append(f"ae_steps must be >= 1 or null, got {self.ae_steps}")
        if self.precision not in (None, *PRECISIONS):
            problems.append(f"precision must be one of {PRECISIONS} or null, got {self.precision!r}")
        if self.seconds is not None and not self.seconds > 0:
            problems.append(f"seconds must be > 0 or null, got {self.seconds}")
        if self.input is not None and task is not None and task.given_modality is None:
            problems.append(
                f"input is only read by tasks that are given a clip "
                f"({', '.join(t for t in Task if t.given_modality)}), not {self.task}"
            )
        if self.seconds is not None and task == Task.svg:
            problems.append("seconds: svg makes one clip; for a longer sample use task=long")
        if self.seconds is not None and task is not None and task.cross_modal and self.input is None:
            problems.append("seconds: a2v / v2a on dataset clips make one clip each; give input=<file>")
        if self.clips is not None and len(self.clips) != self.num_samples:
            problems.append(
                f"clips lists {len(self.clips)} dataset windows for num_samples={self.num_samples}"
            )
        ConfigError.raise_if_any(problems, "invalid sample config")


@dataclass
class TrainedDiT:
    """A trained DiT with what it needs to make media: its latent statistics and its autoencoder."""

    model: MMDiT
    stats: LatentStats
    pipeline: AutoencoderPipeline
    latent_cache: Path | None
    checkpoint: Path

    @property
    def long(self) -> bool:
        return self.model.previous_encoder is not None

    def standardise(self, modality: str, z: Tensor | None) -> Tensor | None:
        return None if z is None else self.stats.standardise(modality, z)

    def unstandardise(self, modality: str, z: Tensor | None) -> Tensor | None:
        return None if z is None else self.stats.unstandardise(modality, z)


def load_trained_dit(
    run_or_checkpoint: str | Path,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    ae_run: str | None = None,
    precision: str | None = "fp32",
    pipeline: AutoencoderPipeline | None = None,
    compile: bool = False,
) -> TrainedDiT:
    """Rebuild a tools/train_dit.py run: the DiT (EMA weights when it has them) and its autoencoder.

    `pipeline`: an autoencoder already loaded (a base and a long DiT share one); it must be the one
    the DiT was trained on. `precision` as in `mmldm_ae.pipeline.set_inference_precision`; `compile`
    as in `compile_for_sampling`.
    """
    checkpoint = resolve_checkpoint(run_or_checkpoint, "train one with `make train-dit`")
    state = json.loads((checkpoint / "state.json").read_text())
    config, architecture = state["config"], state["architecture"]
    if "dit" not in config or "latent_stats" not in architecture:
        raise ConfigError(
            f"{checkpoint} is not a DiT checkpoint of tools/train_dit.py (no dit config or latent stats)"
        )
    model = MMDiT(to_typed(DiTConfig, config["dit"]))
    load_module_weights(model, checkpoint, "dit")
    if use_ema:
        load_ema_weights(model, checkpoint)
    source = (
        "the autoencoder given"
        if pipeline is not None
        else f"the autoencoder in {ae_run or config['ae_run']}"
    )
    pipeline = pipeline or load_autoencoder(ae_run or config["ae_run"], device=device, precision=precision)
    if pipeline.fingerprint() != architecture["autoencoder_fingerprint"]:
        raise ConfigError(
            f"{source} is not the one the DiT in {checkpoint} was trained on "
            "(other weights): pass ae_run=<the autoencoder run it was trained with>"
        )
    cache = Path(config["latent_cache"]) if config.get("latent_cache") else None
    model = model.to(device, set_inference_precision(precision, device)).eval()
    trained = TrainedDiT(model, LatentStats(**architecture["latent_stats"]), pipeline, cache, checkpoint)
    return compile_for_sampling(trained, compile)


def compile_for_sampling(dit: TrainedDiT, compile: bool = True) -> TrainedDiT:
    """`dit` tuned for its device (`AutoencoderPipeline.optimize`); with `compile`, the DiT and the
    decoder UNet torch.compiled in place for static shapes (`compile_static`, as train.compile).

    Each model is traced at its first call per input shape: the DiT once per task (the guided batch
    is one shape for every step), the UNet once for the guided and once for the unguided steps and
    once per decoder batch of `decode_clip_batches`; later steps and batches of the same size reuse
    the graphs. On the CPU the tiny presets take about half a minute (DiT) and one to two minutes
    (UNet) to compile, on a GPU the paper's models minutes; worth it for many samples only.
    """
    dit.pipeline.optimize(compile)
    if compile:
        compile_static(dit.model)
    return dit


# --------------------------------------------------------------------------------------------
# Conditioning clips
# --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """The given modality's raw latents [n, windows, C, S, S] (None for svg / long), where each sample's
    came from, and, for a file or an array, the given media itself (`GivenMedia.data`)."""

    modality: str | None
    latents: Tensor | None = None
    class_ids: list[int] = field(default_factory=list)  # -1: unknown
    sources: list[str] = field(default_factory=list)
    given: GivenMedia | None = None  # the same for every sample


@dataclass
class GivenMedia:
    """A given sound (float32 [N] at the model's rate) or video (uint8 [F, R, R, 3] at the model's fps
    and resolution), `seconds` long, and its model frames / waveform padded to whole windows."""

    modality: str
    data: np.ndarray
    seconds: float
    windows: Tensor  # audio: waveforms [W, clip_samples]; video: frames [W, T, 3, R, R] in [-1, 1]


def load_conditioning(dit: TrainedDiT, config: SampleConfig) -> Conditioning:
    task = Task(config.task)
    modality = task.given_modality
    if modality is None:
        return Conditioning(None, class_ids=[-1] * config.num_samples, sources=[""] * config.num_samples)
    if config.input is not None:
        # A continuation continues the given file's first clip.
        seconds = dit.pipeline.dataset.clip_seconds if task.needs_long_model else config.seconds
        return conditioning_from_media(
            dit.pipeline, config.input, modality, config.num_samples, seconds, config.input
        )
    if dit.latent_cache is None or not dit.latent_cache.is_dir():
        raise FileNotFoundError(
            f"task {config.task} without input= reads dataset clips from the run's latent cache "
            f"({dit.latent_cache}), which is missing: give input=<file> "
            "or rebuild the cache with tools/train_dit.py"
        )
    cache = DiTLatentDataset(dit.latent_cache)
    windows = cache.index["count"]
    chosen = config.clips or torch.linspace(0, windows - 1, config.num_samples).round().long().tolist()
    outside = [c for c in chosen if not 0 <= c < windows]
    if outside:
        raise ConfigError(f"clips {outside} are not windows of the latent cache (0..{windows - 1})")
    latents = torch.stack([cache.latents(c)[MODALITIES.index(modality)] for c in chosen])
    return Conditioning(
        modality,
        latents[:, None],
        [cache.index["class_ids"][c] for c in chosen],
        [cache.index["clip_ids"][c] for c in chosen],
    )


@torch.no_grad()
def conditioning_from_items(
    dit: TrainedDiT, items: list[dict], modality: str, sources: list[str]
) -> Conditioning:
    """Conditioning on clips outside the latent cache (e.g. held-out windows of a dataset): items of
    `SoundingVideoDataset`, encoded by the DiT's autoencoder. Items with all their frames
    (return_all_frames) give the autoencoder its own key frames, whatever the dataset's settings."""
    key_frame_indices = dit.pipeline.dataset.key_frame_indices
    latents = []
    for start in range(0, len(items), ENCODE_BATCH):
        batch = items[start : start + ENCODE_BATCH]
        key_frames = [
            item["frames"][key_frame_indices] if "frames" in item else item["key_frames"] for item in batch
        ]
        z_v, z_a = dit.pipeline.encode_clips(
            {
                "key_frames": torch.stack(key_frames),
                "audio_image": torch.stack([item["audio_image"] for item in batch]),
            }
        )
        latents.append((z_a if modality == "audio" else z_v).cpu())
    return Conditioning(
        modality, torch.cat(latents)[:, None], [int(item["class_id"]) for item in items], list(sources)
    )


def conditioning_from_media(
    pipeline: AutoencoderPipeline,
    source: str | Path | np.ndarray | tuple[int, np.ndarray],
    modality: str,
    count: int,
    seconds: float | None = None,
    label: str = "array",
) -> Conditioning:
    """`count` samples conditioned on one given sound or video (`read_given`), window by window."""
    given = read_given(pipeline.dataset, source, modality, seconds)
    latents = encode_windows(pipeline, given)
    return Conditioning(
        modality, latents[None].expand(count, *latents.shape), [-1] * count, [label] * count, given
    )


def read_given(
    config: DatasetConfig,
    source: str | Path | np.ndarray | tuple[int, np.ndarray],
    modality: str,
    seconds: float | None = None,
) -> GivenMedia:
    """A sound (a file with sound, a float array [N] or [N, channels] at the model's rate, or a
    (sample_rate, array) pair as Gradio gives) or a video (a file, or uint8 frames [F, H, W, 3] at the
    model's fps), `seconds` long (null: its own length), cut into windows of one clip; what was
    adapted is logged as a warning."""
    fps, rate, length = config.fps, config.mel.sample_rate, config.num_frames
    name = str(source) if isinstance(source, str | Path) else "the given array"
    if seconds is not None and round(seconds * fps) < 1:
        raise ConfigError(f"seconds={seconds} is shorter than one frame at {fps:g} fps")
    if modality == "audio":
        wave = _given_wave(source, rate, seconds)
        if len(wave) == 0:
            raise MediaError(f"{name}: the audio stream is empty; a2v needs at least a moment of sound")
        seconds = seconds or len(wave) / rate
        if round(seconds * fps) < 1:
            raise MediaError(f"{name}: {seconds:.3g} s of sound is shorter than one frame at {fps:g} fps")
        total = round(seconds * rate)
        wave = np.pad(wave, (0, max(0, total - len(wave))))[:total]
        windows = math.ceil(round(seconds * fps) / length)
        padded = pad_or_trim(torch.from_numpy(wave), windows * config.clip_samples)
        return GivenMedia("audio", wave, seconds, padded.view(windows, config.clip_samples))
    frames = _given_frames(source, fps, seconds)
    if len(frames) == 0:
        raise MediaError(f"{name}: no frames; v2a needs at least one frame")
    count = round(seconds * fps) if seconds else len(frames)
    # Past its end a video holds its last frame, as a player does.
    frames = frames[np.minimum(np.arange(count), len(frames) - 1)]
    model_frames = to_model_frames(frames, config.resolution, config.frame_mode)  # [F, 3, R, R]
    windows = math.ceil(count / length)
    held = model_frames[torch.arange(windows * length).clamp(max=count - 1)]
    return GivenMedia(
        "video", to_uint8_frames(model_frames), count / fps, held.view(windows, length, *held.shape[1:])
    )


def _given_wave(source, rate: int, seconds: float | None) -> np.ndarray:
    if not isinstance(source, str | Path):
        native, wave = source if isinstance(source, tuple) else (rate, source)
        wave = np.asarray(wave)
        if np.issubdtype(wave.dtype, np.integer):  # Gradio's microphone gives int16
            wave = wave / np.iinfo(wave.dtype).max
        wave = wave.astype(np.float32)
        wave = wave.mean(axis=1) if wave.ndim == 2 else wave  # [N, channels], as soundfile and Gradio
        if wave.ndim != 1:
            raise ConfigError(f"audio must be an array [N] or [N, channels], got shape {wave.shape}")
        return soxr.resample(wave, native, rate).astype(np.float32) if native != rate else wave
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    info = probe_media(path)  # MediaError names an unreadable file
    if not info.has_audio:
        raise MediaError(f"{path}: no audio stream; a2v and audio_continuation need a file with sound")
    if not info.duration > 0:
        raise MediaError(f"{path}: the audio stream is empty; a2v needs at least a moment of sound")
    if info.audio_rate != rate or info.audio_channels != 1:
        log.warning(
            "%s: %d-channel %d Hz resampled to mono %d Hz", path, info.audio_channels, info.audio_rate, rate
        )
    if seconds is not None and abs(info.duration - seconds) * rate >= 1:
        fitted = "cut" if info.duration > seconds else "zero-padded"
        log.warning("%s: %.3g s %s to %g s", path, info.duration, fitted, seconds)
    # Only what is used is read (the rest of a long file would be decoded for nothing).
    return read_audio(path, rate, duration=seconds)


def _given_frames(source, fps: float, seconds: float | None) -> np.ndarray:
    if not isinstance(source, str | Path):
        frames = np.asarray(source)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ConfigError(f"video must be uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
        return frames
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    info = probe_media(path)
    if not info.has_video:
        raise MediaError(f"{path}: no video stream; v2a and video_continuation need a video file")
    if abs(info.fps - fps) > 1e-3:
        log.warning("%s: %.3g fps read at %g fps", path, info.fps, fps)
    count = round(seconds * fps) if seconds else None
    return read_video(path, fps=fps, num_frames=count).frames


@torch.no_grad()
def encode_windows(pipeline: AutoencoderPipeline, given: GivenMedia) -> Tensor:
    """Raw perceptual latents [W, C, S, S] of each window of a given sound or video (the other
    modality's input all zeros, as for an unknown one)."""
    config = pipeline.dataset
    resolution, image = config.resolution, config.mel.image_size
    latents = []
    for chunk in given.windows.split(ENCODE_BATCH):
        n = len(chunk)
        if given.modality == "audio":
            key_frames = torch.zeros(n, len(config.key_frame_indices), 3, resolution, resolution)
            audio_image = waveform_to_audio_image(chunk, config.mel)
        else:
            key_frames = chunk[:, config.key_frame_indices]
            audio_image = torch.zeros(n, 3, image, image)
        z_v, z_a = pipeline.encode_clips({"key_frames": key_frames, "audio_image": audio_image})
        latents.append((z_a if given.modality == "audio" else z_v).cpu())
    return torch.cat(latents)


# --------------------------------------------------------------------------------------------
# Sampling, decoding and writing
# --------------------------------------------------------------------------------------------


def sample_clips(
    dit: TrainedDiT,
    config: SampleConfig,
    given: Tensor | None,
    seed: int,
    batch_size: int,
    chain: TrainedDiT | None = None,
) -> dict[str, Tensor]:
    """Raw latents [B, clips, C, S, S] of the modalities the model makes (and a2v / v2a's given one).

    given: raw latents [B, windows, C, S, S] of the given modality. Several windows of a2v / v2a are
    chained through `chain` (a long-generation model) when there is one, else sampled one by one.
    """
    task = Task(config.task)
    modality = task.given_modality
    windows = 1 if given is None else given.shape[1]
    chained = not task.needs_long_model and windows > 1 and chain is not None
    net = chain if chained else dit
    device = next(net.model.parameters()).device
    given = net.standardise(modality, given.to(device)) if given is not None else None
    settings = dict(
        guidance_audio=config.guidance_audio,
        guidance_video=config.guidance_video,
        sampler=config.sampler,
        steps=config.steps,
        seed=seed,
        progress=True,
    )
    if task.needs_long_model:
        previous = {f"prev_{modality[0]}": given[:, 0]} if modality else {}
        z_a, z_v = sample_long(net.model, clip_count(config, dit), batch_size, **previous, **settings)
    elif chained:
        z_a, z_v = sample_long(net.model, windows, batch_size, **{f"cond_{modality[0]}": given}, **settings)
    else:
        conditions = {f"cond_{modality[0]}": given.flatten(0, 1)} if modality else {}
        z_a, z_v = (
            None if z is None else z.unflatten(0, (batch_size, windows))
            for z in sample(net.model, task, batch_size * windows, **conditions, **settings)
        )
    latents = {"audio": net.unstandardise("audio", z_a), "video": net.unstandardise("video", z_v)}
    return {m: z for m, z in latents.items() if z is not None}


def clip_count(config: SampleConfig, dit: TrainedDiT) -> int:
    """Clips of a long / continuation sample: enough for config.seconds, else config.num_clips."""
    if config.seconds is None:
        return config.num_clips
    return math.ceil(round(config.seconds * dit.pipeline.dataset.fps) / dit.pipeline.dataset.num_frames)


@dataclass
class SampleMedia:
    frames: np.ndarray | None  # uint8 [clips * T, R, R, 3]; None for an audio-only model
    wave: np.ndarray | None  # float32 [clips * clip_samples]; None for a video-only model


def dissolve_joins(clips: Tensor, overlap: int) -> Tensor:
    """Clips [B, K, T, ...] joined in time -> [B, K * T, ...], each join dissolved over `overlap` items
    on either side.

    Around the join of clips a and b, item p of the 2 * overlap items is (1 - w_p) A_p + w_p B_p with
    w_p = p / (2 * overlap + 1): A is a's items, then its last one held; B is b's first one held,
    then b's items. The jump between the clips spreads over 2 * overlap + 1 steps and both ends
    meet the clips unchanged.
    """
    B, K, T = clips.shape[:3]
    if not 0 <= overlap <= T // 2:
        raise ValueError(f"a join dissolves over 0..{T // 2} items of a {T}-item clip, got {overlap}")
    joined = clips.flatten(1, 2).clone()
    if overlap == 0:
        return joined
    tail = (1,) * (clips.ndim - 3)
    weight = (torch.arange(1, 2 * overlap + 1, dtype=clips.dtype) / (2 * overlap + 1)).view(1, -1, *tail)
    for k in range(1, K):
        a, b = clips[:, k - 1], clips[:, k]
        held_a = a[:, -1:].expand(-1, overlap, *a.shape[2:])
        held_b = b[:, :1].expand(-1, overlap, *b.shape[2:])
        A, B_ = torch.cat([a[:, T - overlap :], held_a], 1), torch.cat([held_b, b[:, :overlap]], 1)
        joined[:, k * T - overlap : k * T + overlap] = (1 - weight) * A + weight * B_
    return joined


@torch.no_grad()
def decode_media(
    pipeline: AutoencoderPipeline,
    latents: dict[str, Tensor],
    steps: int | None = None,
    vocoder: str = "hifigan-universal",
    seed: int = 0,
    join_frames: int = JOIN_FRAMES,
    join_mel_frames: int = JOIN_MEL_FRAMES,
    keep: tuple[str, ...] | None = None,
) -> list[SampleMedia]:
    """Raw latents [B, clips, C, S, S] per modality -> media; clips decode in batches and join in time.

    Every clip decodes from the same decoder noise (one seed, `decode_clip_batches`), so that the
    decoder's own randomness does not change at a join; frames and log-mels dissolve over the joins
    (`dissolve_joins`), and the sound of all clips is vocoded in one piece, then stretched to exactly
    one clip of samples per clip of frames (a clip's mel covers all but its last hop remainder, 160 of
    70,560 samples at the paper's settings, which would otherwise be gaps).

    A single-modal model's missing modality is decoded from the autoencoder's null latent (that of
    an all-zero input, which its guidance dropout trains) and then left out. `keep` (default: the
    modalities of `latents`) names the media to return: a2v and v2a samples that carry the given
    media as it was need not vocode or convert the decoded copy of it.
    """
    keep = tuple(latents) if keep is None else keep
    some = next(iter(latents.values()))
    batch, clips = some.shape[:2]
    z = {
        m: latents.get(m, _null_latent(pipeline, m, batch)[:, None].expand(-1, clips, -1, -1, -1))
        for m in MODALITIES
    }
    config = pipeline.dataset
    num_frames = config.num_frames if "video" in keep else 0
    frames, images = decode_clip_batches(pipeline, z["video"], z["audio"], steps, seed, num_frames=num_frames)
    frames = dissolve_joins(frames, join_frames) if num_frames else None  # [B, clips * T, 3, R, R]
    waves = None
    if "audio" in keep:
        num_mel_frames = config.mel.num_frames(config.clip_samples)
        logmel = audio_image_to_logmel(images.flatten(0, 1), num_mel_frames, config.mel)  # [B * clips, M, n]
        logmel = logmel.unflatten(0, (batch, clips)).transpose(2, 3)  # [B, clips, n, M]
        logmel = dissolve_joins(logmel, min(join_mel_frames, num_mel_frames // 2)).transpose(1, 2)
        waves = pipeline.vocoder(vocoder)(logmel.to(pipeline.device)).float().cpu().numpy()
    total = clips * config.clip_samples
    return [
        SampleMedia(
            frames=to_uint8_frames(frames[b]) if "video" in keep else None,
            wave=_stretch(waves[b], total) if waves is not None else None,
        )
        for b in range(batch)
    ]


def decode_clip_batches(
    pipeline: AutoencoderPipeline,
    z_v: Tensor,
    z_a: Tensor,
    steps: int | None = None,
    seed: int = 0,
    clips_per_call: int = DECODE_CLIPS,
    num_frames: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Perceptual latents z_v, z_a [B, K, ...] of B samples of K clips -> frames [B, K, T, 3, R, R] and
    audio images [B, K, 3, R, R] (fp32, on the CPU), decoded as clip by clip but in a few batches.
    T = num_frames, by default the dataset's; 0 decodes the audio images alone.

    One decoder call takes the same k = clips_per_call // B clip positions of every sample (B * k
    clips; k at least 1). Every clip of sample b starts from sample b's noise of one draw from
    `seed`, which is what a decoder seeded with `seed` for each clip position alone would draw.
    """
    (B, K), cfg = z_v.shape[:2], pipeline.model.cfg
    T = pipeline.dataset.num_frames if num_frames is None else num_frames
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    noise = torch.randn(
        B * (1 + T),
        cfg.vae_channels,
        cfg.latent_size,
        cfg.latent_size,
        generator=generator,
        device=pipeline.device,
    )
    audio_noise, frame_noise = noise[:B], noise[B:].unflatten(0, (B, T))  # items [audio images; frames]
    per_call = max(1, clips_per_call // B)
    frames, images = [], []
    for start in range(0, K, per_call):
        k = min(per_call, K - start)
        decoded = pipeline.decode_clips(
            z_v[:, start : start + k].flatten(0, 1),
            z_a[:, start : start + k].flatten(0, 1),
            steps=steps,
            noise=torch.cat(
                [audio_noise.repeat_interleave(k, 0), frame_noise.repeat_interleave(k, 0).flatten(0, 1)]
            ),
            num_frames=T,
        )
        frames.append(decoded.frames.float().cpu().unflatten(0, (B, k)))
        images.append(decoded.audio_images.float().cpu().unflatten(0, (B, k)))
    return torch.cat(frames, 1), torch.cat(images, 1)


def _stretch(wave: np.ndarray, samples: int) -> np.ndarray:
    """`wave` resampled to exactly `samples` samples (a change of a few parts per thousand)."""
    if len(wave) != samples:
        wave = soxr.resample(wave, len(wave), samples)
    return np.pad(wave, (0, max(0, samples - len(wave))))[:samples].astype(np.float32)


def _null_latent(pipeline: AutoencoderPipeline, modality: str, batch: int) -> Tensor:
    cfg = pipeline.model.cfg
    side = cfg.latent_size
    zeros = torch.zeros(
        batch,
        cfg.num_key_frames,
        cfg.vae_channels,
        side,
        side,
        device=pipeline.device,
        dtype=pipeline.model_dtype,
    )
    z_v, z_a = pipeline.model.encode(zeros, zeros[:, 0])
    return (z_a if modality == "audio" else z_v).float()


def write_sample(pipeline: AutoencoderPipeline, media: SampleMedia, folder: Path, name: str) -> list[Path]:
    """<name>.mp4 (with sound when there is sound), <name>.wav, <name>.png (frames, spectrogram)."""
    config = pipeline.dataset
    folder.mkdir(parents=True, exist_ok=True)
    written, row = [], []
    if media.frames is not None:
        written.append(folder / f"{name}.mp4")
        write_video(written[-1], media.frames, config.fps, media.wave, config.mel.sample_rate)
        picks = (
            np.linspace(0, len(media.frames) - 1, min(SHEET_FRAMES, len(media.frames))).round().astype(int)
        )
        row += [media.frames[i] for i in picks]
    if media.wave is not None:
        written.append(folder / f"{name}.wav")
        write_audio(written[-1], media.wave, config.mel.sample_rate)
        logmel = mel_spectrogram(torch.from_numpy(media.wave)[None], config.mel)[0]
        row.append(spectrogram_rgb(logmel))
    written.append(save_png(contact_sheet([row], [name], cell=96), folder / f"{name}.png"))
    return written


def check_task(dit: TrainedDiT, config: SampleConfig) -> None:
    """What config.validate() cannot know: whether this model can do the task."""
    config.validate()
    task = Task(config.task)
    if task.needs_long_model and not dit.long:
        raise ConfigError(
            f"task {config.task} needs the long-generation model (tools/train_dit.py --config-name "
            f"train_dit_long); {dit.checkpoint} has dit.previous_clip_depth=0"
        )
    if task.cross_modal and not dit.model.cfg.joint:
        raise ConfigError(
            f"task {config.task} needs a model of both modalities; this one has "
            f"dit.modalities={dit.model.cfg.modalities}"
        )


def iterate_samples(
    dit: TrainedDiT,
    config: SampleConfig,
    conditioning: Conditioning | None = None,
    chain: TrainedDiT | None = None,
) -> Iterator[tuple[int, SampleMedia, int, str]]:
    """(sample index, its media, its conditioning class id or -1, its conditioning source), batch by batch.

    `conditioning` replaces what config.input / config.clips name (one entry per sample); `chain`, a
    long-generation model, chains the windows of a given sound or video longer than one clip.
    """
    check_task(dit, config)
    task = Task(config.task)
    if conditioning is None:
        conditioning = load_conditioning(dit, config)
    elif conditioning.modality != task.given_modality or len(conditioning.class_ids) != config.num_samples:
        raise ConfigError(
            f"task {config.task} with num_samples={config.num_samples} was given {conditioning.modality} "
            f"conditioning for {len(conditioning.class_ids)} samples"
        )
    given = conditioning.given
    seconds = given.seconds if given is not None and task.cross_modal else config.seconds
    clips = clip_count(config, dit) if task.needs_long_model else 1
    for batch_index, start in enumerate(range(0, config.num_samples, config.batch_size)):
        rows = range(start, min(start + config.batch_size, config.num_samples))
        seed = config.seed + batch_index * clips
        latents = conditioning.latents[rows.start : rows.stop] if conditioning.latents is not None else None
        sampled = sample_clips(dit, config, latents, seed, len(rows), chain)
        as_given = given is not None and task.cross_modal and not config.resynthesize
        keep = tuple(m for m in sampled if not (as_given and m == given.modality))
        media = decode_media(dit.pipeline, sampled, config.ae_steps, config.vocoder, seed, keep=keep)
        for row, sample_media in zip(rows, media, strict=True):
            if as_given:
                setattr(sample_media, "wave" if given.modality == "audio" else "frames", given.data)
            yield (
                row,
                trim(sample_media, seconds, dit.pipeline.dataset),
                conditioning.class_ids[row],
                conditioning.sources[row],
            )
        print(f"{config.task}: {rows.stop}/{config.num_samples} samples", file=sys.stderr, flush=True)


def trim(media: SampleMedia, seconds: float | None, config: DatasetConfig) -> SampleMedia:
    """The media cut to `seconds` (None: as they are)."""
    if seconds is None:
        return media
    frames, samples = round(seconds * config.fps), round(seconds * config.mel.sample_rate)
    return SampleMedia(
        frames=None if media.frames is None else media.frames[:frames],
        wave=None
        if media.wave is None
        else np.pad(media.wave, (0, max(0, samples - len(media.wave))))[:samples],
    )


def clear_previous_samples(out_dir: Path) -> None:
    """Remove what an earlier `generate` wrote into `out_dir` (listed in its samples.json), so that
    old samples and an old conditions.json never mix with new ones; other files are left alone."""
    manifest = out_dir / SAMPLES_FILE
    if manifest.is_file():
        previous = json.loads(manifest.read_text())["files"]
        for name in previous:
            (out_dir / name).unlink(missing_ok=True)
        manifest.unlink()
        log.info("%s: removed the %d files of the previous sampling", out_dir, len(previous))
    elif (out_dir / CONDITIONS_FILE).is_file():
        raise ConfigError(
            f"{out_dir} holds a {CONDITIONS_FILE} this tool did not list as its own: new samples would be "
            "labelled by it; pass another out_dir= (or remove that folder)"
        )


class MediaWriter:
    """Writes samples on one background thread while the caller samples the next batch.

    `submit(fn, *args)` queues a write; with WRITE_QUEUE writes pending it first waits for the oldest.
    A write that failed raises its error in the caller at the next `submit` (sampling stops there)
    and at the latest when the `with` block ends, which returns only once every write has finished.
    """

    def __init__(self, queue: int = WRITE_QUEUE):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="media-writer")
        self._pending: deque[Future] = deque()
        self._queue = queue

    def submit(self, fn, *args) -> Future:
        self._raise_failed()
        if len(self._pending) >= self._queue:
            self._pending.popleft().result()
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def _raise_failed(self) -> None:
        for future in self._pending:
            if future.done():
                future.result()

    def __enter__(self) -> MediaWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        # On an error of the caller, writes not started are dropped; the caller's error propagates.
        self._pool.shutdown(wait=True, cancel_futures=error_type is not None)
        if error_type is None:
            while self._pending:
                self._pending.popleft().result()


def generate(
    dit: TrainedDiT,
    config: SampleConfig,
    conditioning: Conditioning | None = None,
    chain: TrainedDiT | None = None,
) -> dict:
    """Run one task and write its samples to config.out_dir; returns a summary (see `iterate_samples`),
    with one record per sample (its files, task, condition and class) under "records".

    Files are written by a `MediaWriter` while the next batch samples; the function returns once all
    are written, and a failed write raises its error."""
    out_dir = Path(config.out_dir)
    started, conditions, sources = time.perf_counter(), {}, set()
    config.validate()
    task = Task(config.task)
    clear_previous_samples(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.compile:
        for model in (dit, chain):
            if model is not None:
                compile_for_sampling(model)
    records, writes, frames_per_sample = [], [], 0
    with MediaWriter() as writer:
        for row, media, class_id, source in iterate_samples(dit, config, conditioning, chain):
            sources.add(source)
            name = f"{config.task}_{row:04d}"
            writes.append(writer.submit(write_sample, dit.pipeline, media, out_dir, name))
            class_name = dit.pipeline.class_names[class_id] if class_id >= 0 else ""
            if task.cross_modal and class_id >= 0:
                conditions[f"{name}.mp4"] = {"task": config.task, "class": class_name}
            records.append({"task": config.task, "condition": source, "class": class_name})
            frames_per_sample = len(media.frames) if media.frames is not None else 0
    written: list[str] = []
    for record, write in zip(records, writes, strict=True):
        paths = write.result()
        record["files"] = [str(path) for path in paths]
        written += [Path(path).name for path in paths]
    files = len(written)
    if conditions:
        (out_dir / CONDITIONS_FILE).write_text(json.dumps(conditions, indent=1))
        written.append(CONDITIONS_FILE)
    (out_dir / SAMPLES_FILE).write_text(json.dumps({"task": config.task, "files": written}, indent=1))
    seconds = time.perf_counter() - started
    return {
        "task": config.task,
        "samples": config.num_samples,
        "frames_per_sample": frames_per_sample,
        "seconds": round(seconds, 2),
        "seconds_per_sample": round(seconds / config.num_samples, 3),
        "peak_mem_gb": round(peak_memory_gb(), 3),
        "out_dir": str(out_dir),
        "conditions": str(out_dir / CONDITIONS_FILE) if conditions else None,
        "sources": sorted(sources - {""}),
        "files": files,
        "records": records,
    }
