"""The DiT's training data: perceptual latents of every window, encoded once by the frozen autoencoder.

This is the paper's MM-LDM*: the generator never sees pixels, so every window of the dataset is
encoded once (posterior modes z_a, z_v of `AutoencoderPipeline.encode_clips`) and the DiT trains
from the stored latents. The cache is a `ShardedCache` of kind "perceptual-latents" (layout,
reuse of finished shards and stale checks: `mmldm_ae.engine.latent_cache`); its shards hold
z_a [n, Ca, Sa, Sa] and z_v [n, Cv, Sv, Sv] in float32. The autoencoder's latents are unscaled, so
the index also records each modality's mean and std; the DiT works on standardised latents
(`LatentStats`) and its checkpoint keeps the same numbers, so samples are unstandardised before
decoding.

The long-generation model trains on (previous, current) pairs: window (file, s) is paired with
window (file, s - num_frames) of the same file, the clip that ends where it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from mmldm_ae.engine.latent_cache import (
    INDEX_FILE,
    FrameEncoder,
    LatentCacheError,
    Shard,
    ShardedCache,
    ShardedCacheDataset,
)
from mmldm_ae.pipeline import AutoencoderPipeline
from mmldm_data.config import DatasetConfig
from mmldm_data.dataset import SoundingVideoDataset

LATENT_KEYS = {"audio": "z_a", "video": "z_v"}

PERCEPTUAL_LATENTS = ShardedCache(
    kind="perceptual-latents",
    encoder="autoencoder",
    builder="tools/train_dit.py (mmldm_dit.latents.build_dit_latent_cache)",
)

__all__ = [
    "INDEX_FILE",
    "LatentCacheError",
    "LatentStats",
    "DiTLatentDataset",
    "build_dit_latent_cache",
    "dit_cache_mismatch",
]


@dataclass
class LatentStats:
    """Scalar mean / std of each modality's latents over the cache: the DiT sees (z - mean) / std."""

    audio_mean: float
    audio_std: float
    video_mean: float
    video_std: float

    def standardise(self, modality: str, z: Tensor) -> Tensor:
        return (z - getattr(self, f"{modality}_mean")) / getattr(self, f"{modality}_std")

    def unstandardise(self, modality: str, z: Tensor) -> Tensor:
        return z * getattr(self, f"{modality}_std") + getattr(self, f"{modality}_mean")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def build_dit_latent_cache(
    dataset: SoundingVideoDataset,
    pipeline: AutoencoderPipeline,
    out_dir: str | Path,
    **options,
) -> Path:
    """Encode every window of `dataset` with the frozen autoencoder into `out_dir`; reuse what
    still matches. `options` go to `ShardedCache.build` (batch_size: 8 and shard_size: 1024 unless given).
    """
    options = {"batch_size": 8, "shard_size": 1024, **options}
    ae = pipeline.model.cfg
    # Overlapping windows share key frames: each is VAE-encoded once (pipeline.encode_clips, per window).
    key_frames = FrameEncoder({"key_latents": pipeline.vae_encode})
    key_frame_indices = torch.tensor(dataset.config.key_frame_indices)

    def encode(batch: dict) -> dict[str, Tensor]:
        indices = batch["start_frame"][:, None] + key_frame_indices
        key_latents = key_frames(batch["key_frames"], batch["file"], indices)["key_latents"]
        audio_latents = pipeline.vae_encode(batch["audio_image"])
        z_v, z_a = pipeline.encode_latents(key_latents, audio_latents)  # [B, Cv, Sv, Sv], [B, Ca, Sa, Sa]
        return {"z_a": z_a, "z_v": z_v}

    header = {
        "latent_shapes": {
            "audio": [ae.latent_channels, ae.audio_latent_size, ae.audio_latent_size],
            "video": [ae.latent_channels, ae.video_latent_size, ae.video_latent_size],
        }
    }

    def statistics(folder: Path, shards: list[Shard]) -> dict:  # the index's "stats" entry
        return {"stats": _statistics(folder, shards).to_dict()}

    return PERCEPTUAL_LATENTS.build(
        dataset, out_dir, encode, pipeline.fingerprint(), header, summarise=statistics, **options
    )


def _statistics(out_dir: Path, shards: list[Shard]) -> LatentStats:
    """Mean and std of every latent value per modality, accumulated in float64 shard by shard."""
    sums = {
        key: torch.zeros(3, dtype=torch.float64) for key in LATENT_KEYS.values()
    }  # count, sum, sum of squares
    for shard in shards:
        with safe_open(out_dir / shard.file, framework="pt") as handle:
            for key in sums:
                values = handle.get_tensor(key).double()
                sums[key] += torch.stack(
                    [torch.tensor(values.numel(), dtype=torch.float64), values.sum(), values.square().sum()]
                )
    numbers = {}
    for modality, key in LATENT_KEYS.items():
        count, total, squares = sums[key].tolist()
        mean = total / count
        # A constant latent (a collapsed autoencoder) would divide by zero; 1 leaves it unscaled.
        std = max(squares / count - mean**2, 0.0) ** 0.5 or 1.0
        numbers |= {f"{modality}_mean": mean, f"{modality}_std": std}
    return LatentStats(**numbers)


def dit_cache_mismatch(
    out_dir: str | Path, dataset_config: DatasetConfig, pipeline: AutoencoderPipeline
) -> str | None:
    """Why the cache in `out_dir` cannot stand for `dataset_config` encoded by `pipeline`, or None."""
    return PERCEPTUAL_LATENTS.mismatch(out_dir, dataset_config, pipeline)


class DiTLatentDataset(ShardedCacheDataset):
    """Items of a latent cache: z_a [Ca, Sa, Sa], z_v [Cv, Sv, Sv] (raw, not standardised), class_id, clip_id.

    With previous_clips=True (the long-generation model) only windows whose previous clip is cached
    are items, and they also carry prev_z_a, prev_z_v. Passing `dataset_config` and `pipeline`
    refuses a stale cache with the reason.
    """

    cache = PERCEPTUAL_LATENTS

    def __init__(
        self,
        out_dir: str | Path,
        previous_clips: bool = False,
        dataset_config: DatasetConfig | None = None,
        pipeline: AutoencoderPipeline | None = None,
    ):
        super().__init__(out_dir, dataset_config, pipeline)
        self.stats = LatentStats(**self.index["stats"])
        self.class_names: list[str] = self.index["class_names"]
        self.previous = self._previous_windows()
        if previous_clips:
            self.items = [i for i, p in enumerate(self.previous) if p >= 0]
            if not self.items:
                raise LatentCacheError(
                    f"latent cache {str(self.out_dir)!r} has no window whose previous clip "
                    f"({self.index['num_frames']} frames earlier in the same file) is cached: "
                    "the long model needs videos of at least two clips and a dataset.window_stride that "
                    "divides dataset.num_frames"
                )
        else:
            self.items = list(range(self.index["count"]))
        self.previous_clips = previous_clips

    def _previous_windows(self) -> list[int]:
        """Per cached window, the index of the window num_frames earlier in the same file, or -1."""
        position = {tuple(w): i for i, w in enumerate(self.index["windows"])}
        step = self.index["num_frames"]
        return [position.get((file, start - step), -1) for file, start in self.index["windows"]]

    def __len__(self) -> int:
        return len(self.items)

    def latents(self, window: int) -> tuple[Tensor, Tensor]:
        """(z_a, z_v) of a cached window (an index over all windows, not over items)."""
        return self.row("z_a", window), self.row("z_v", window)

    def __getitem__(self, index: int) -> dict:
        window = self.items[index]
        z_a, z_v = self.latents(window)
        item = {
            "z_a": z_a,
            "z_v": z_v,
            "class_id": self.index["class_ids"][window],
            "clip_id": self.index["clip_ids"][window],
        }
        if self.previous_clips:
            item["prev_z_a"], item["prev_z_v"] = self.latents(self.previous[window])
        return item
