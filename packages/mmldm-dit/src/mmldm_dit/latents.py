"""The DiT's training data: perceptual latents of every window, encoded once by the frozen autoencoder.

This is the paper's MM-LDM*: the generator never sees pixels, so every window of the dataset is
encoded once (posterior modes z_a, z_v of `AutoencoderPipeline.encode_clips`) and the DiT trains
from the stored latents. The autoencoder's latents are unscaled, so the cache also records each
modality's mean and std; the DiT works on standardised latents (`LatentStats`) and its checkpoint
keeps the same numbers, so samples are unstandardised before decoding.

Layout of `out_dir`:
    index.json                 what was encoded by what (autoencoder fingerprint, dataset config and
                               its hash, the files on disk), latent shapes, per-modality mean / std,
                               and per window: clip id, class id, (file, start frame)
    shard-00000.safetensors    z_a [n, Ca, Sa, Sa], z_v [n, Cv, Sv, Sv] (float32); metadata: build key
    ...
Shards are written atomically and carry the build key, so an interrupted or repeated build reuses
every finished shard whose key still matches; the index is written last. The shard helpers are
those of the autoencoder's pixel-latent cache (`mmldm_ae.engine.latent_cache`).

The long-generation model trains on (previous, current) pairs: window (file, s) is paired with
window (file, s - num_frames) of the same file, the clip that ends where it starts.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mmldm_ae.engine.latent_cache import (
    LatentCacheError,
    Shard,
    data_fingerprint,
    encoded_dataset_config,
    plan_shards,
    read_shard_metadata,
    settings_hash,
)
from mmldm_ae.pipeline import AutoencoderPipeline
from mmldm_data.config import DatasetConfig
from mmldm_data.dataset import SoundingVideoDataset

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX_FILE = "index.json"
SHARD_GLOB = "shard-*.safetensors"
LATENT_KEYS = {"audio": "z_a", "video": "z_v"}

__all__ = [
    "LatentCacheError",
    "LatentStats",
    "DiTLatentDataset",
    "build_dit_latent_cache",
    "dit_cache_mismatch",
    "read_dit_cache_index",
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


def _cache_header(dataset: SoundingVideoDataset, pipeline: AutoencoderPipeline) -> dict:
    """Everything the cached latents depend on; its hash is the build key."""
    config = dataset.config
    encoded = encoded_dataset_config(config)
    ae = pipeline.model.cfg
    return {
        "version": CACHE_VERSION,
        "dataset_config": encoded,
        "dataset_config_hash": settings_hash(encoded),
        "data_fingerprint": data_fingerprint(dataset),
        "autoencoder_fingerprint": pipeline.fingerprint(),
        "latent_shapes": {
            "audio": [ae.latent_channels, ae.audio_latent_size, ae.audio_latent_size],
            "video": [ae.latent_channels, ae.video_latent_size, ae.video_latent_size],
        },
        "num_frames": config.num_frames,
        "count": len(dataset),
    }


def build_dit_latent_cache(
    dataset: SoundingVideoDataset,
    pipeline: AutoencoderPipeline,
    out_dir: str | Path,
    batch_size: int = 8,
    shard_size: int = 1024,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Encode every window of `dataset` with the frozen autoencoder into `out_dir`; reuse what still matches."""
    if dataset.config.flip_p > 0:
        raise LatentCacheError(
            f"dataset.flip_p={dataset.config.flip_p}: the latent cache stores unflipped clips; set dataset.flip_p=0"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = _cache_header(dataset, pipeline) | {"shard_size": shard_size}
    build_key = settings_hash(header)
    stale = dit_cache_mismatch(out_dir, dataset.config, pipeline) if (out_dir / INDEX_FILE).is_file() else None
    if stale:
        log.warning("%s; re-encoding", stale)
    shards = plan_shards(len(dataset), shard_size)
    pending = [s for s in shards if not _shard_finished(out_dir / s.file, build_key)]
    strays = set(out_dir.glob(SHARD_GLOB)) - {out_dir / s.file for s in shards}
    if pending or strays:
        # The index is written last, so a build that stops halfway is never read as complete.
        (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for stray in strays:
        stray.unlink()
    if len(pending) < len(shards):
        log.info("latent cache %s: reusing %d of %d shards", out_dir, len(shards) - len(pending), len(shards))
    if pending:
        _encode_shards(dataset, pipeline, out_dir, pending, build_key, batch_size, num_workers, progress)

    class_ids, clip_ids = [], []
    for file_position, start in dataset.windows:
        class_ids.append(dataset.file_classes[file_position])
        clip_ids.append(f"{dataset.files[file_position].path}@{start}")
    index = header | {
        "build_key": build_key,
        "shards": [asdict(s) for s in shards],
        "stats": _statistics(out_dir, shards).to_dict(),
        "class_names": dataset.class_names,
        "files": [f.path for f in dataset.files],
        "windows": [list(w) for w in dataset.windows],
        "class_ids": class_ids,
        "clip_ids": clip_ids,
    }
    temporary = out_dir / f"{INDEX_FILE}.tmp"
    temporary.write_text(json.dumps(index))
    temporary.replace(out_dir / INDEX_FILE)
    return out_dir


def _shard_finished(path: Path, build_key: str) -> bool:
    return path.is_file() and (read_shard_metadata(path) or {}).get("build_key") == build_key


@torch.inference_mode()
def _encode_shards(
    dataset: SoundingVideoDataset,
    pipeline: AutoencoderPipeline,
    out_dir: Path,
    pending: list[Shard],
    build_key: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    indices = [i for shard in pending for i in range(shard.start, shard.start + shard.count)]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    bar = tqdm(total=len(indices), desc="encoding perceptual latents", unit="window", disable=not progress)
    rows: dict[str, list[Tensor]] = {"z_a": [], "z_v": []}
    queue = iter(pending)
    shard = next(queue)
    for batch in loader:
        z_v, z_a = pipeline.encode_clips(batch)
        rows["z_a"].extend(z_a.float().cpu())
        rows["z_v"].extend(z_v.float().cpu())
        bar.update(len(z_a))
        # Batches need not align with shards: write every shard the rows now cover.
        while shard is not None and len(rows["z_a"]) >= shard.count:
            tensors = {key: torch.stack(values[: shard.count]).contiguous() for key, values in rows.items()}
            rows = {key: values[shard.count :] for key, values in rows.items()}
            temporary = out_dir / f"{shard.file}.tmp"
            save_file(tensors, temporary, metadata={"build_key": build_key, "start": str(shard.start)})
            temporary.replace(out_dir / shard.file)
            shard = next(queue, None)
    bar.close()


def _statistics(out_dir: Path, shards: list[Shard]) -> LatentStats:
    """Mean and std of every latent value per modality, accumulated in float64 shard by shard."""
    sums = {key: torch.zeros(3, dtype=torch.float64) for key in LATENT_KEYS.values()}  # count, sum, sum of squares
    for shard in shards:
        with safe_open(out_dir / shard.file, framework="pt") as handle:
            for key in sums:
                values = handle.get_tensor(key).double()
                sums[key] += torch.stack([torch.tensor(values.numel(), dtype=torch.float64), values.sum(),
                                          values.square().sum()])
    numbers = {}
    for modality, key in LATENT_KEYS.items():
        count, total, squares = sums[key].tolist()
        mean = total / count
        # A constant latent (a collapsed autoencoder) would divide by zero; 1 leaves it unscaled.
        std = max(squares / count - mean**2, 0.0) ** 0.5 or 1.0
        numbers |= {f"{modality}_mean": mean, f"{modality}_std": std}
    return LatentStats(**numbers)


def read_dit_cache_index(out_dir: str | Path) -> dict:
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        raise LatentCacheError(
            f"no finished latent cache in {str(out_dir)!r} ({INDEX_FILE} missing): tools/train_dit.py builds it "
            "(mmldm_dit.latents.build_dit_latent_cache); a rerun finishes an interrupted build"
        )
    try:
        index = json.loads(path.read_text())
    except ValueError as error:
        raise LatentCacheError(f"unreadable latent cache index {str(path)!r}: {error}; delete it to rebuild") from None
    if index.get("version") != CACHE_VERSION or "autoencoder_fingerprint" not in index:
        raise LatentCacheError(
            f"{str(out_dir)!r} is not a DiT latent cache of format version {CACHE_VERSION} (found version "
            f"{index.get('version')}); rebuild it or point latent_cache elsewhere"
        )
    return index


def dit_cache_mismatch(out_dir: str | Path, dataset_config: DatasetConfig, pipeline: AutoencoderPipeline) -> str | None:
    """Why the cache in `out_dir` cannot stand for `dataset_config` encoded by `pipeline`, or None.

    Compares settings and weights; files changed on disk under the same settings are caught by
    `build_dit_latent_cache`, which fingerprints the indexed files.
    """
    try:
        index = read_dit_cache_index(out_dir)
    except LatentCacheError as error:
        return str(error)
    wanted = encoded_dataset_config(dataset_config)
    if settings_hash(wanted) != index["dataset_config_hash"]:
        cached = index["dataset_config"]
        changed = ", ".join(
            f"{k}: cached {cached.get(k)!r}, now {wanted.get(k)!r}"
            for k in sorted(wanted.keys() | cached.keys())
            if wanted.get(k) != cached.get(k)
        )
        return f"latent cache {str(out_dir)!r} is stale: it was built with other dataset settings ({changed})"
    if pipeline.fingerprint() != index["autoencoder_fingerprint"]:
        return (
            f"latent cache {str(out_dir)!r} is stale: it was encoded by another autoencoder (other weights or "
            "VAE) than the one given"
        )
    return None


class DiTLatentDataset(Dataset):
    """Items of a latent cache: z_a [Ca, Sa, Sa], z_v [Cv, Sv, Sv] (raw, not standardised), class_id, clip_id.

    With previous_clips=True (the long-generation model) only windows whose previous clip is cached
    are items, and they also carry prev_z_a, prev_z_v. Passing `dataset_config` and `pipeline`
    refuses a stale cache with the reason.
    """

    def __init__(
        self,
        out_dir: str | Path,
        previous_clips: bool = False,
        dataset_config: DatasetConfig | None = None,
        pipeline: AutoencoderPipeline | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.index = read_dit_cache_index(self.out_dir)
        if dataset_config is not None and pipeline is not None:
            reason = dit_cache_mismatch(self.out_dir, dataset_config, pipeline)
            if reason:
                raise LatentCacheError(f"{reason}; rebuild it (tools/train_dit.py does) or use another latent_cache")
        self.stats = LatentStats(**self.index["stats"])
        self.class_names: list[str] = self.index["class_names"]
        self.shards = [Shard(**s) for s in self.index["shards"]]
        self._shard_starts = [s.start for s in self.shards]
        self._handles: dict[str, object] = {}  # opened lazily, per worker process
        self.previous = self._previous_windows()
        if previous_clips:
            self.items = [i for i, p in enumerate(self.previous) if p >= 0]
            if not self.items:
                raise LatentCacheError(
                    f"latent cache {str(self.out_dir)!r} has no window whose previous clip "
                    f"({self.index['num_frames']} frames earlier in the same file) is cached: the long model needs "
                    "videos of at least two clips and a dataset.window_stride that divides dataset.num_frames"
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

    def __getstate__(self) -> dict:
        # safetensors handles cannot cross into DataLoader workers; each worker reopens its own.
        return self.__dict__ | {"_handles": {}}

    def latents(self, window: int) -> tuple[Tensor, Tensor]:
        """(z_a, z_v) of a cached window (an index over all windows, not over items)."""
        shard = self.shards[bisect.bisect_right(self._shard_starts, window) - 1]
        if shard.file not in self._handles:
            self._handles[shard.file] = safe_open(self.out_dir / shard.file, framework="pt")
        handle = self._handles[shard.file]
        row = window - shard.start
        return handle.get_slice("z_a")[row], handle.get_slice("z_v")[row]

    def __getitem__(self, index: int) -> dict:
        window = self.items[index]
        z_a, z_v = self.latents(window)
        item = {"z_a": z_a, "z_v": z_v, "class_id": self.index["class_ids"][window],
                "clip_id": self.index["clip_ids"][window]}
        if self.previous_clips:
            item["prev_z_a"], item["prev_z_v"] = self.latents(self.previous[window])
        return item
