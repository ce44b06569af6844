"""Sounding videos from a trained DiT: the library behind `tools/sample.py` (and the DiT's previews).

A trained DiT run knows everything it needs: its checkpoint holds the DiT config, the latent
statistics it was trained with and the fingerprint of its autoencoder; its config names the
autoencoder run and the latent cache. `load_trained_dit` rebuilds all of it, `generate` runs a task
(`mmldm_data.tasks.Task`):

    svg                 audio and video from noise
    a2v / v2a           video for a given sound / sound for a given video: an input file, or clips
                        of the dataset (read from the latent cache)
    audio_continuation  the long model continues a real clip's audio (prev_a) for num_clips clips
    video_continuation  the same from a real clip's video (prev_v)
    long                the long model from nothing, num_clips clips (10 x 16 frames = 160 frames)

Latents are unstandardised, decoded by the autoencoder (signal decoder + KL-VAE) and the vocoder,
and each sample is written as <task>_<index>.mp4 (H.264 + AAC), .wav and .png (frames and the
spectrogram of the sound). For a2v / v2a from labelled dataset clips, conditions.json records each
sample's task and conditioning class in the format of `mmldm_data.evaluation`, so that
`tools/eval_fvd_fad.py` reports a2v / v2a oracle accuracy on the synthetic set.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmldm_ae.engine.checkpoint import load_ema_weights, load_module_weights, resolve_checkpoint
from mmldm_ae.engine.trainer import peak_memory_gb
from mmldm_ae.pipeline import AutoencoderPipeline, load_autoencoder
from mmldm_data.audio import mel_spectrogram, pad_or_trim, waveform_to_audio_image
from mmldm_data.config import ConfigError, to_typed
from mmldm_data.evaluation import CONDITIONS_FILE
from mmldm_data.media import MediaError, probe_media, read_audio, read_video, write_audio, write_video
from mmldm_data.preview import contact_sheet, save_png, spectrogram_rgb
from mmldm_data.tasks import Task
from mmldm_data.video import to_model_frames
from mmldm_dit.dit import MODALITIES, DiTConfig, MMDiT
from mmldm_dit.latents import DiTLatentDataset, LatentStats
from mmldm_dit.sampling import DEFAULT_GUIDANCE, SAMPLERS, sample, sample_long

log = logging.getLogger(__name__)
# What one `generate` call wrote into its out_dir, so that the next call into the same folder replaces it.
SAMPLES_FILE = "samples.json"

SHEET_FRAMES = 8  # frames per contact-sheet row, evenly spread over the sample


@dataclass
class SampleConfig:
    run: str | None = None  # run_dir of tools/train_dit.py, or one of its checkpoints/step_* folders
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
    # a2v / audio_continuation: a file with sound (any rate and length); v2a / video_continuation: a
    # video file. null: dataset clips from the run's latent cache (`clips`, or evenly spread).
    input: str | None = None
    clips: list[int] | None = None
    ae_run: str | None = None  # the autoencoder, when it moved since the DiT was trained
    ae_steps: int | None = None  # DDIM steps of the autoencoder's decoder (null: its ae.decode_steps)
    vocoder: str = "hifigan-universal"
    use_ema: bool = True

    def validate(self) -> None:
        problems = []
        if self.run is None:
            problems.append(
                "run is not set: give the run_dir of a tools/train_dit.py run (run=outputs/runs/...)"
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
        if self.input is not None and task is not None and task.given_modality is None:
            problems.append(
                f"input is only read by tasks that are given a clip "
                f"({', '.join(t for t in Task if t.given_modality)}), not {self.task}"
            )
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
) -> TrainedDiT:
    """Rebuild a tools/train_dit.py run: the DiT (EMA weights when it has them) and its autoencoder."""
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
    pipeline = load_autoencoder(ae_run or config["ae_run"], device=device)
    if pipeline.fingerprint() != architecture["autoencoder_fingerprint"]:
        raise ConfigError(
            f"the autoencoder in {ae_run or config['ae_run']} is not the one "
            f"the DiT in {checkpoint} was trained on "
            "(other weights): pass ae_run=<the autoencoder run it was trained with>"
        )
    cache = Path(config["latent_cache"]) if config.get("latent_cache") else None
    return TrainedDiT(
        model.to(device).eval(), LatentStats(**architecture["latent_stats"]), pipeline, cache, checkpoint
    )


# --------------------------------------------------------------------------------------------
# Conditioning clips
# --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """The given modality's raw latents [n, C, S, S] (None for svg / long) and where each came from."""

    modality: str | None
    latents: Tensor | None = None
    class_ids: list[int] = field(default_factory=list)  # -1: unknown
    sources: list[str] = field(default_factory=list)


def load_conditioning(dit: TrainedDiT, config: SampleConfig) -> Conditioning:
    modality = Task(config.task).given_modality
    if modality is None:
        return Conditioning(None, class_ids=[-1] * config.num_samples, sources=[""] * config.num_samples)
    if config.input is not None:
        latent = encode_file(dit.pipeline, Path(config.input), modality)
        return Conditioning(
            modality,
            latent.expand(config.num_samples, -1, -1, -1),
            [-1] * config.num_samples,
            [config.input] * config.num_samples,
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
        latents,
        [cache.index["class_ids"][c] for c in chosen],
        [cache.index["clip_ids"][c] for c in chosen],
    )


@torch.no_grad()
def conditioning_from_items(
    dit: TrainedDiT, items: list[dict], modality: str, sources: list[str]
) -> Conditioning:
    """Conditioning on clips outside the latent cache (e.g. held-out windows of a dataset): items of
    `SoundingVideoDataset`, encoded by the DiT's autoencoder."""
    latents = []
    for start in range(0, len(items), 8):
        batch = items[start : start + 8]
        z_v, z_a = dit.pipeline.encode_clips(
            {
                "key_frames": torch.stack([item["key_frames"] for item in batch]),
                "audio_image": torch.stack([item["audio_image"] for item in batch]),
            }
        )
        latents.append((z_a if modality == "audio" else z_v).cpu())
    return Conditioning(
        modality, torch.cat(latents), [int(item["class_id"]) for item in items], list(sources)
    )


@torch.no_grad()
def encode_file(pipeline: AutoencoderPipeline, path: Path, modality: str) -> Tensor:
    """One clip of a media file -> its raw perceptual latent [1, C, S, S], with a warning for what was
    adapted."""
    config = pipeline.dataset
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    info = probe_media(path)  # MediaError names an unreadable file
    resolution = config.resolution
    key_frames = torch.zeros(1, len(config.key_frame_indices), 3, resolution, resolution)
    audio_image = torch.zeros(1, 3, config.mel.image_size, config.mel.image_size)
    if modality == "audio":
        if not info.has_audio:
            raise MediaError(f"{path}: no audio stream; a2v and audio_continuation need a file with sound")
        if not info.duration > 0:
            raise MediaError(f"{path}: the audio stream is empty; a2v needs at least a moment of sound")
        # Only the clip is read (the rest of a long file would be decoded for nothing).
        wave = read_audio(path, config.mel.sample_rate, duration=min(info.duration, config.clip_seconds))
        adapted = []
        if info.audio_rate != config.mel.sample_rate or info.audio_channels != 1:
            adapted.append(
                f"{info.audio_channels}-channel {info.audio_rate} Hz resampled to mono "
                f"{config.mel.sample_rate} Hz"
            )
        if abs(info.duration - config.clip_seconds) * config.mel.sample_rate >= 1:
            fitted = "cut" if info.duration > config.clip_seconds else "zero-padded"
            adapted.append(f"{info.duration:.3g} s {fitted} to {config.clip_seconds:g} s")
        if adapted:
            log.warning("%s: %s", path, "; ".join(adapted))
        wave = pad_or_trim(torch.from_numpy(wave)[None], config.clip_samples)
        audio_image = waveform_to_audio_image(wave, config.mel)
    else:
        if not info.has_video:
            raise MediaError(f"{path}: no video stream; v2a and video_continuation need a video file")
        clip = read_video(path, fps=config.fps, num_frames=config.num_frames)
        if abs(info.fps - config.fps) > 1e-3 or abs(info.duration - config.clip_seconds) > 0.5 / config.fps:
            log.warning(
                "%s: %.3g fps, %.3g s taken as its first %d frames at %g fps (%g s)",
                path,
                info.fps,
                info.duration,
                config.num_frames,
                config.fps,
                config.clip_seconds,
            )
        frames = to_model_frames(clip.frames, resolution, config.frame_mode)  # [T, 3, R, R]
        key_frames = frames[config.key_frame_indices][None]
    z_v, z_a = pipeline.encode_clips({"key_frames": key_frames, "audio_image": audio_image})
    return (z_a if modality == "audio" else z_v).cpu()


# --------------------------------------------------------------------------------------------
# Sampling, decoding and writing
# --------------------------------------------------------------------------------------------


def sample_clips(
    dit: TrainedDiT, config: SampleConfig, given: Tensor | None, seed: int, batch_size: int
) -> dict[str, Tensor]:
    """Raw latents [B, clips, C, S, S] of the modalities the model makes (and a2v / v2a's given one)."""
    model, device = dit.model, next(dit.model.parameters()).device
    task = Task(config.task)
    modality = task.given_modality
    given = dit.standardise(modality, given.to(device)) if given is not None else None
    settings = dict(
        guidance_audio=config.guidance_audio,
        guidance_video=config.guidance_video,
        sampler=config.sampler,
        steps=config.steps,
        seed=seed,
        progress=True,
    )
    if task.needs_long_model:
        previous = {f"prev_{modality[0]}": given} if modality else {}
        z_a, z_v = sample_long(model, config.num_clips, batch_size, **previous, **settings)
    else:
        conditions = {f"cond_{modality[0]}": given} if modality else {}
        z_a, z_v = (
            None if z is None else z[:, None]
            for z in sample(model, task, batch_size, **conditions, **settings)
        )
    latents = {"audio": dit.unstandardise("audio", z_a), "video": dit.unstandardise("video", z_v)}
    return {m: z for m, z in latents.items() if z is not None}


@dataclass
class SampleMedia:
    frames: np.ndarray | None  # uint8 [clips * T, R, R, 3]; None for an audio-only model
    wave: np.ndarray | None  # float32 [clips * clip_samples]; None for a video-only model


@torch.no_grad()
def decode_media(
    pipeline: AutoencoderPipeline,
    latents: dict[str, Tensor],
    steps: int | None = None,
    vocoder: str = "hifigan-universal",
    seed: int = 0,
) -> list[SampleMedia]:
    """Raw latents [B, clips, C, S, S] per modality -> media; clips decode one by one and join in time.

    A single-modal model's missing modality is decoded from the autoencoder's null latent (that of
    an all-zero input, which its guidance dropout trains) and then left out.
    """
    some = next(iter(latents.values()))
    batch, clips = some.shape[:2]
    z = {
        m: latents.get(m, _null_latent(pipeline, m, batch)[:, None].expand(-1, clips, -1, -1, -1))
        for m in MODALITIES
    }
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    clip_samples = pipeline.dataset.clip_samples
    frames, waves = [], []
    for clip in range(clips):
        decoded = pipeline.decode_clips(
            z["video"][:, clip], z["audio"][:, clip], steps=steps, generator=generator
        )
        media = pipeline.to_media(decoded.audio_images, decoded.frames, vocoder)
        frames.append([f for f, _ in media])
        # Exactly one clip of sound per clip of frames (vocoders may end a few samples short), so
        # that joined clips stay in sync.
        waves.append([np.pad(w, (0, max(0, clip_samples - len(w))))[:clip_samples] for _, w in media])
    return [
        SampleMedia(
            frames=np.concatenate([frames[c][b] for c in range(clips)]) if "video" in latents else None,
            wave=np.concatenate([waves[c][b] for c in range(clips)]) if "audio" in latents else None,
        )
        for b in range(batch)
    ]


def _null_latent(pipeline: AutoencoderPipeline, modality: str, batch: int) -> Tensor:
    cfg = pipeline.model.cfg
    side = cfg.latent_size
    zeros = torch.zeros(batch, cfg.num_key_frames, cfg.vae_channels, side, side, device=pipeline.device)
    z_v, z_a = pipeline.model.encode(zeros, zeros[:, 0])
    return z_a if modality == "audio" else z_v


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
) -> Iterator[tuple[int, SampleMedia, int, str]]:
    """(sample index, its media, its conditioning class id or -1, its conditioning source), batch by batch.

    `conditioning` replaces what config.input / config.clips name (one entry per sample).
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
    clips = config.num_clips if task.needs_long_model else 1
    for batch_index, start in enumerate(range(0, config.num_samples, config.batch_size)):
        rows = range(start, min(start + config.batch_size, config.num_samples))
        seed = config.seed + batch_index * clips
        given = conditioning.latents[rows.start : rows.stop] if conditioning.latents is not None else None
        latents = sample_clips(dit, config, given, seed, len(rows))
        media = decode_media(dit.pipeline, latents, config.ae_steps, config.vocoder, seed)
        for row, sample_media in zip(rows, media, strict=True):
            yield row, sample_media, conditioning.class_ids[row], conditioning.sources[row]
        print(f"{config.task}: {rows.stop}/{config.num_samples} samples", file=sys.stderr, flush=True)


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


def generate(dit: TrainedDiT, config: SampleConfig, conditioning: Conditioning | None = None) -> dict:
    """Run one task and write its samples to config.out_dir; returns a summary (see `iterate_samples`)."""
    out_dir = Path(config.out_dir)
    started, files, conditions, sources = time.perf_counter(), 0, {}, set()
    config.validate()
    task = Task(config.task)
    clear_previous_samples(out_dir)
    written: list[str] = []
    for row, media, class_id, source in iterate_samples(dit, config, conditioning):
        sources.add(source)
        name = f"{config.task}_{row:04d}"
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = write_sample(dit.pipeline, media, out_dir, name)
        files += len(paths)
        written += [Path(path).name for path in paths]
        if task.cross_modal and class_id >= 0:
            conditions[f"{name}.mp4"] = {
                "task": config.task,
                "class": dit.pipeline.class_names[class_id],
            }
    if conditions:
        (out_dir / CONDITIONS_FILE).write_text(json.dumps(conditions, indent=1))
        written.append(CONDITIONS_FILE)
    (out_dir / SAMPLES_FILE).write_text(json.dumps({"task": config.task, "files": written}, indent=1))
    seconds = time.perf_counter() - started
    clips = config.num_clips if task.needs_long_model else 1
    return {
        "task": config.task,
        "samples": config.num_samples,
        "frames_per_sample": clips * dit.pipeline.dataset.num_frames,
        "seconds": round(seconds, 2),
        "seconds_per_sample": round(seconds / config.num_samples, 3),
        "peak_mem_gb": round(peak_memory_gb(), 3),
        "out_dir": str(out_dir),
        "conditions": str(out_dir / CONDITIONS_FILE) if conditions else None,
        "sources": sorted(sources - {""}),
        "files": files,
    }
