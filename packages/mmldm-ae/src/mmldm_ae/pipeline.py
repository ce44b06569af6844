"""Pixels <-> perceptual latents <-> playable media, through the frozen KL-VAE and the autoencoder.

`AutoencoderPipeline` is what later stages and tools use: the DiT trains on `encode_clips`, the
samplers turn generated latents back into frames and sound with `decode_to_media`, and the
evaluator's reconstruction metrics use both. `load_autoencoder` rebuilds one from a training run.

Inference precision (`set_inference_precision`): bf16 weights for the frozen autoencoder and VAE
(the DiT too) by default on CUDA, fp32 on the CPU; the diffusion latents and the schedulers'
arithmetic stay fp32 either way. The vocoder's weights follow (`vocoder`), its waveforms are fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import default_collate

from mmldm_ae.autoencoder import AEConfig, MultiModalAutoencoder
from mmldm_ae.engine.checkpoint import load_ema_weights, load_module_weights, resolve_checkpoint
from mmldm_ae.engine.trainer import compile_static, native_bf16
from mmldm_ae.vae import KLVAE, VAEConfig, build_vae
from mmldm_data.audio import (
    IMAGE_FLOOR_LOGMEL,
    MelConfig,
    audio_image_to_logmel,
    mel_spectrogram,
    pad_or_trim,
    waveform_to_audio_image,
)
from mmldm_data.config import ConfigError, DatasetConfig, to_typed
from mmldm_data.evaluation import ClipBatch
from mmldm_data.media import write_video
from mmldm_data.metrics.frechet import frechet_distance
from mmldm_data.metrics.i3d import I3D, i3d_features
from mmldm_data.metrics.oracle import onset_errors, read_oracles
from mmldm_data.preview import contact_sheet, save_png, spectrogram_rgb
from mmldm_data.synthetic import object_centres_oracle, oracle_class_set
from mmldm_data.video import to_uint8_frames
from mmldm_data.vocoder import load_vocoder


def pixels_to_latents(vae: KLVAE, batch: dict) -> dict:
    """A pixel batch of the dataset -> the latent batch the autoencoder trains on (VAE frozen)."""
    with torch.no_grad():
        key_frames = batch["key_frames"]  # [B, K, 3, R, R]
        targets = batch["target_frames"]  # [B, T, 3, R, R]
        latents = {
            "key_latents": vae.encode(key_frames.flatten(0, 1)).unflatten(0, key_frames.shape[:2]),
            "target_latents": vae.encode(targets.flatten(0, 1)).unflatten(0, targets.shape[:2]),
            "audio_latents": vae.encode(batch["audio_image"]),
        }
    return latents | {"target_indices": batch["target_indices"], "class_id": batch["class_id"]}


log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp32")


def set_inference_precision(precision: str | None, device: str | torch.device) -> torch.dtype:
    """The weights' dtype for sampling and evaluation: "bf16" | "fp32", None: bf16 where it runs
    natively (`native_bf16`), else fp32.

    fp32 on CUDA turns TF32 on for matmuls and convolutions (a process-wide setting): sampling
    tolerates its 10-bit mantissa, as it tolerates bf16's 8 bits.
    """
    on_cuda = torch.device(device).type == "cuda"
    precision = precision or ("bf16" if native_bf16(device) else "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS} (or null: by device), got {precision!r}")
    if precision == "bf16" and not native_bf16(device):
        log.warning(
            "bf16 on this CPU has no native kernels (no AVX512-BF16 / AMX): its convolutions run about "
            "10x slower than fp32; precision null picks fp32 here"
        )
    if precision == "fp32" and on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if on_cuda:
        # Sampling's shapes repeat (steps, batches): cuDNN times its convolution algorithms once per shape.
        torch.backends.cudnn.benchmark = True
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class DecodedClips:
    frames: Tensor  # [B, T, 3, R, R] in [-1, 1]
    audio_images: Tensor  # [B, 3, R, R] in [-1, 1]


class AutoencoderPipeline:
    def __init__(
        self, model: MultiModalAutoencoder, vae: KLVAE, dataset: DatasetConfig, class_names: list[str]
    ):
        self.model, self.vae, self.dataset, self.class_names = (
            model.eval(),
            vae.freeze(),
            dataset,
            class_names,
        )
        self._vocoders: dict[str, object] = {}
        self._trained_fingerprint: str | None = None  # of the fp32 weights, once cast for inference

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def mel(self) -> MelConfig:
        return self.dataset.mel

    def to_dtype(self, dtype: torch.dtype) -> AutoencoderPipeline:
        """Autoencoder and VAE weights in `dtype` (frozen: inference only); inputs and outputs stay fp32.

        The fingerprint stays that of the trained weights, which a DiT checks its autoencoder by."""
        if dtype != self.model_dtype and self._trained_fingerprint is None:
            self._trained_fingerprint = self.fingerprint()
        self.model.to(dtype)
        self.vae.to(dtype)
        self._vocoders.clear()  # loaded again in `dtype` when next asked for
        return self

    def optimize(self, compile: bool = False) -> AutoencoderPipeline:
        """Faster decoding on this device: on CUDA the decoder UNet and the VAE in channels_last (the
        layout their convolutions run fastest in); with `compile`, the UNet compiled for static shapes
        (`compile_static`, as train.compile: traced at the first decode, minutes on a GPU)."""
        if self.device.type == "cuda":
            self.model.decoder.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            compile_static(self.model.decoder.unet)
        return self

    @torch.no_grad()
    def encode_clips(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Pixel batch (key_frames, audio_image) -> perceptual latents z_v, z_a (posterior modes)."""
        key_frames = batch["key_frames"]
        key_latents = self.vae_encode(key_frames.flatten(0, 1)).unflatten(0, key_frames.shape[:2])
        return self.encode_latents(key_latents, self.vae_encode(batch["audio_image"]))

    def vae_encode(self, images: Tensor) -> Tensor:
        """Images [N, 3, R, R] in [-1, 1] -> VAE latents [N, C, L, L]."""
        return self.vae.encode(images.to(self.device, next(self.vae.parameters()).dtype))

    def encode_latents(self, key_latents: Tensor, audio_latents: Tensor) -> tuple[Tensor, Tensor]:
        """VAE latents of the key frames [B, K, C, L, L] and audio image [B, C, L, L] -> z_v, z_a."""
        z_v, z_a = self.model.encode(key_latents.to(self.model_dtype), audio_latents.to(self.model_dtype))
        return z_v.float(), z_a.float()

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def decode_clips(
        self,
        z_v: Tensor,
        z_a: Tensor,
        steps: int | None = None,
        guidance_audio: float | None = None,
        guidance_video: float | None = None,
        generator: torch.Generator | None = None,
        class_id: Tensor | None = None,
        sampler: str | None = None,
        noise: Tensor | None = None,
        num_frames: int | None = None,
    ) -> DecodedClips:
        """Perceptual latents [B, ...] -> frames and audio images in fp32; settings default to the
        autoencoder's config (ae.decode_steps, ae.decode_sampler, guidance); `noise` as in
        `MultiModalAutoencoder.decode`. num_frames: the dataset's by default; 0 decodes the audio
        images alone (each item decodes on its own, so they are the same), at 1/17 of the cost."""
        frame_latents, audio_latents = self.model.decode(
            z_v.to(self.device),
            z_a.to(self.device),
            num_frames=self.dataset.num_frames if num_frames is None else num_frames,
            steps=steps,
            guidance_audio=guidance_audio,
            guidance_video=guidance_video,
            generator=generator,
            class_id=class_id,
            sampler=sampler,
            noise=noise,
        )
        # One VAE batch for the audio images and every frame.
        dtype = next(self.vae.parameters()).dtype
        pixels = self.vae.decode(torch.cat([audio_latents, frame_latents.flatten(0, 1)]).to(dtype))
        pixels = pixels.float().clamp(-1, 1)
        B = audio_latents.shape[0]
        return DecodedClips(frames=pixels[B:].unflatten(0, frame_latents.shape[:2]), audio_images=pixels[:B])

    def fingerprint(self) -> str:
        """A hash of the autoencoder's and the VAE's weights: identifies what encoded a cache of
        perceptual latents."""
        if self._trained_fingerprint is not None:
            return self._trained_fingerprint
        digest = hashlib.sha1(self.vae.fingerprint().encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def vocoder(self, name: str = "hifigan-universal"):
        if name not in self._vocoders:
            self._vocoders[name] = load_vocoder(name, self.mel, self.device, self.model_dtype)
        return self._vocoders[name]

    @torch.no_grad()
    def to_media(self, audio_images: Tensor, frames: Tensor, vocoder: str = "hifigan-universal"):
        """Per clip: (uint8 frames [T, R, R, 3], waveform float32 [N] at the dataset's sample rate)."""
        num_mel_frames = self.mel.num_frames(self.dataset.clip_samples)
        logmel = audio_image_to_logmel(audio_images.float(), num_mel_frames, self.mel)
        waves = self.vocoder(vocoder)(logmel)[:, : self.dataset.clip_samples].cpu().numpy()
        return [
            (to_uint8_frames(clip.float().cpu()), wave.astype(np.float32))
            for clip, wave in zip(frames, waves, strict=True)
        ]


@dataclass
class Reconstructions:
    videos: list[Path]  # input | reconstruction side by side, with the reconstructed sound
    sheet: Image.Image  # per clip: first and last frame (input, reconstruction), both spectrograms


@torch.no_grad()
def write_reconstructions(
    pipeline: AutoencoderPipeline,
    batch: dict,
    folder: str | Path,
    steps: int | None = None,
    vocoder: str = "hifigan-universal",
    seed: int = 0,
) -> Reconstructions:
    """Round-trip a pixel batch (with all `frames`) and write what a person needs to judge it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = pipeline.dataset
    z_v, z_a = pipeline.encode_clips(batch)
    decoded = pipeline.decode_clips(
        z_v, z_a, steps=steps, generator=torch.Generator(pipeline.device).manual_seed(seed)
    )
    media = pipeline.to_media(decoded.audio_images, decoded.frames, vocoder)
    num_mel_frames = config.mel.num_frames(config.clip_samples)
    videos, rows = [], []
    for index, (frames, wave) in enumerate(media):
        original = to_uint8_frames(batch["frames"][index])
        video = folder / f"clip{index}.mp4"
        write_video(
            video, np.concatenate([original, frames], axis=2), config.fps, wave, config.mel.sample_rate
        )
        videos.append(video)
        spectrograms = [
            spectrogram_rgb(audio_image_to_logmel(image[None].float().cpu(), num_mel_frames, config.mel)[0])
            for image in (batch["audio_image"][index], decoded.audio_images[index])
        ]
        rows.append([original[0], frames[0], original[-1], frames[-1], *spectrograms])
    sheet = contact_sheet(rows, [f"clip{i}" for i in range(len(rows))], cell=96)
    save_png(sheet, folder / "contact_sheet.png")
    return Reconstructions(videos=videos, sheet=sheet)


def _centre_distances(centres: np.ndarray, other: np.ndarray) -> list[float]:
    """|other - centres| per frame and axis where both are known (centres [T, 2]; NaN: no object)."""
    gap = np.abs(other - centres)
    return gap[~np.isnan(gap)].tolist()


@torch.no_grad()
def reconstruction_metrics(
    pipeline: AutoencoderPipeline,
    dataset,
    indices: list[int],
    steps: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    oracle_vocoder: str | None = None,
    i3d: I3D | None = None,
    real_features: np.ndarray | None = None,
) -> dict[str, float]:
    """How well clips survive encode -> decode: PSNR of all decoded frames (dB, on [0, 1] pixels),
    log-mel L1 of the decoded audio images against the input audio (over the [-80, +20] dB range
    an audio image holds), the classification head's accuracy on these clips, and the seconds the
    decoding took per clip. The decoder's sampler, steps and guidance are the model config's
    (ae.decode_*); `steps` overrides its steps.

    With `oracle_vocoder` (synthetic data only), also the fraction of clips whose decoded frames,
    and whose decoded sound through that vocoder, the synthetic oracles read as the clip's class:
    what a DiT on this autoencoder can reach at best (video_oracle / audio_oracle_accuracy); and the
    median onset error (frames) of the decoded frames' impacts against the input clip's own sound
    onsets, beside the same for the input frames: how closely the decoded motion keeps the clip's
    timing (onset_error_frames / onset_error_frames_input); and the mean distance (fractions of the
    frame, per axis) of the decoded object's centre from the input's, frame by frame, beside that of
    an object held still at the input's mean place (position_error / position_error_static).
    With `i3d`, also rFVD: the Frechet distance of the decoded clips' I3D features to the inputs'
    (`real_features` [len(indices), 400] when already computed, else computed here).
    """
    config = pipeline.dataset
    num_mel_frames = config.mel.num_frames(config.clip_samples)
    floor = lambda logmel: logmel.clamp(min=IMAGE_FLOOR_LOGMEL)
    squared_errors, logmel_errors, correct, labelled = [], [], 0, 0
    oracle_hits: dict[str, list[bool]] = {"video": [], "audio": []}
    timing: dict[str, list[float]] = {"decoded": [], "input": []}  # |onset - nearest impact|, frames
    position: dict[str, list[float]] = {"decoded": [], "static": []}  # |centre - input's|, per frame and axis
    features: dict[str, list[np.ndarray]] = {"decoded": [], "input": []}
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    decode_seconds = 0.0
    # The oracles of the class set the clips' folder was made with (folders without one: colour/pitch).
    oracle_classes = oracle_class_set(dataset.config.data_root)
    for start in range(0, len(indices), batch_size):
        batch = default_collate([dataset[i] for i in indices[start : start + batch_size]])
        began = time.perf_counter()
        z_v, z_a = pipeline.encode_clips(batch)
        decoded = pipeline.decode_clips(z_v, z_a, steps=steps, generator=generator)
        decode_seconds += time.perf_counter() - began
        if i3d is not None:
            features["decoded"].append(i3d_features(i3d, decoded.frames))
            if real_features is None:
                features["input"].append(i3d_features(i3d, batch["frames"]))
        frames = (batch["frames"].to(pipeline.device) + 1) / 2
        squared_errors.append(((decoded.frames + 1) / 2 - frames).square().flatten(1).mean(1).cpu())
        reference = mel_spectrogram(batch["audio"].to(pipeline.device), config.mel)[..., :num_mel_frames]
        estimate = audio_image_to_logmel(decoded.audio_images.float(), num_mel_frames, config.mel)
        logmel_errors.append((floor(estimate) - floor(reference)).abs().flatten(1).mean(1).cpu())
        known = batch["class_id"] >= 0
        if known.any() and pipeline.class_names:
            predicted = pipeline.model.predict_class(z_v, z_a).cpu()
            correct += int((predicted[known] == batch["class_id"][known]).sum())
            labelled += int(known.sum())
        if oracle_vocoder is not None:
            truth = [dataset.class_names[c] if c >= 0 else None for c in batch["class_id"].tolist()]
            inputs = zip(map(to_uint8_frames, batch["frames"]), batch["audio"].numpy(), strict=True)
            media = pipeline.to_media(decoded.audio_images, decoded.frames, oracle_vocoder)
            for (frames, wave), (input_frames, input_wave), name in zip(media, inputs, truth, strict=True):
                reading = read_oracles(frames, wave, config.fps, config.mel.sample_rate, oracle_classes)
                for modality, found in zip(oracle_hits, reading.class_names(oracle_classes), strict=True):
                    oracle_hits[modality].append(name is not None and found == name)
                given = read_oracles(
                    input_frames, input_wave.reshape(-1), config.fps, config.mel.sample_rate, oracle_classes
                )
                timing["input"] += onset_errors(given)
                timing["decoded"] += onset_errors(replace(given, impact_frames=reading.impact_frames))
                centres = object_centres_oracle(input_frames)  # NaN where the oracle finds no object
                known = centres[~np.isnan(centres).any(axis=1)]
                position["decoded"] += _centre_distances(centres, object_centres_oracle(frames))
                position["static"] += _centre_distances(known, known.mean(axis=0)) if len(known) else []
    mse = torch.cat(squared_errors)
    metrics = {
        "clips": len(indices),
        "psnr": float((10 * torch.log10(1.0 / mse.clamp(min=1e-10))).mean()),
        "logmel_l1": float(torch.cat(logmel_errors).mean()),
        "class_accuracy": correct / labelled if labelled else float("nan"),
        "decode_seconds_per_clip": decode_seconds / len(indices),
    }
    if i3d is not None:
        real = real_features if real_features is not None else np.concatenate(features["input"])
        metrics["rfvd"] = frechet_distance(np.concatenate(features["decoded"]), real)
    if oracle_vocoder is not None:
        metrics |= {f"{m}_oracle_accuracy": float(np.mean(hits)) for m, hits in oracle_hits.items()}
        median = lambda errors: float(np.median(errors)) if errors else None
        metrics |= {
            "onset_error_frames": median(timing["decoded"]),
            "onset_error_frames_input": median(timing["input"]),
        }
        mean = lambda distances: float(np.mean(distances)) if distances else None
        metrics |= {
            "position_error": mean(position["decoded"]),
            "position_error_static": mean(position["static"]),
        }
    return metrics


def load_autoencoder(
    run_or_checkpoint: str | Path,
    device: str | torch.device = "cpu",
    vae_weights: str | None = None,
    precision: str | None = "fp32",
) -> AutoencoderPipeline:
    """Rebuild the autoencoder of a `tools/train_ae.py` run from its newest (or a given) checkpoint,
    with its EMA weights when it has them.

    The checkpoint's state.json holds the composed config of the run, so nothing else is needed;
    `vae_weights` points elsewhere when the run's VAE folder moved. `precision` as in
    `set_inference_precision` (None: by device); fp32 by default, which encoding for training needs.
    """
    path = resolve_checkpoint(run_or_checkpoint, "train one with `make train-ae`")
    state = json.loads((path / "state.json").read_text())
    config = state["config"]
    if "ae" not in config:
        raise ConfigError(f"{path} is not an autoencoder checkpoint (its config has no 'ae' section)")
    vae_config = to_typed(VAEConfig, config["vae"] | ({"weights": vae_weights} if vae_weights else {}))
    vae = build_vae(vae_config)
    model = MultiModalAutoencoder(
        to_typed(AEConfig, config["ae"]), num_classes=state["architecture"]["num_classes"]
    )
    load_module_weights(model, path, "autoencoder")
    load_ema_weights(model, path)
    dataset = to_typed(DatasetConfig, config["dataset"])
    pipeline = AutoencoderPipeline(
        model.to(device), vae.to(device), dataset, state["architecture"]["class_names"]
    )
    return pipeline.to_dtype(set_inference_precision(precision, device))


class AutoencoderReconstructor:
    """The evaluator's autoencoder round trip (mmldm_data.evaluation.Reconstructor) for rFVD / rFAD."""

    def __init__(
        self, pipeline: AutoencoderPipeline, steps: int | None = None, vocoder: str = "hifigan-universal"
    ):
        self.pipeline, self.steps, self.vocoder = pipeline, steps, vocoder

    @torch.no_grad()
    def reconstruct(self, batch: ClipBatch) -> ClipBatch:
        pipeline, config = self.pipeline, self.pipeline.dataset
        frames = batch.frames.to(pipeline.device)  # [B, T, 3, r, r] at the evaluation resolution
        if frames.shape[1] != config.num_frames:
            raise ValueError(
                f"the evaluator's clips have {frames.shape[1]} frames, the autoencoder decodes "
                f"{config.num_frames}: evaluate with the autoencoder's clip length"
            )
        size = frames.shape[-1]
        model_frames = _resize_frames(frames, config.resolution)
        audio = pad_or_trim(batch.audio.to(pipeline.device).float(), config.clip_samples)
        clips = {
            "key_frames": model_frames[:, config.key_frame_indices],
            "audio_image": waveform_to_audio_image(audio, config.mel),
        }
        z_v, z_a = pipeline.encode_clips(clips)
        decoded = pipeline.decode_clips(z_v, z_a, steps=self.steps)
        num_mel_frames = config.mel.num_frames(config.clip_samples)
        waves = pipeline.vocoder(self.vocoder)(
            audio_image_to_logmel(decoded.audio_images.float(), num_mel_frames, config.mel)
        )
        return ClipBatch(
            frames=_resize_frames(decoded.frames, size).cpu(),
            audio=pad_or_trim(waves, batch.audio.shape[-1]).cpu().to(batch.audio.dtype),
            has_audio=batch.has_audio,
            clip_ids=batch.clip_ids,
        )


def _resize_frames(frames: Tensor, size: int) -> Tensor:
    if frames.shape[-1] == size:
        return frames
    resized = F.interpolate(frames.flatten(0, 1), size=(size, size), mode="bicubic", antialias=True)
    return resized.clamp(-1, 1).unflatten(0, frames.shape[:2])


def load_reconstructor(
    checkpoint: str | Path, device: str | torch.device = "cpu", precision: str | None = None
) -> AutoencoderReconstructor:
    """Entry point the evaluator's --recon uses; precision None: as set_inference_precision."""
    return AutoencoderReconstructor(load_autoencoder(checkpoint, device=device, precision=precision))
