"""Encode a dataset once with the KL-VAE and train the autoencoder on the stored latents.

What is stored: for every window, the latents of ALL its frames and of its audio image. The
dataset draws 2 target frames per item anew each epoch, so caching only the frames drawn once
would freeze that draw; with all frames cached, target frames are drawn at read time, with the
same rule as `SoundingVideoDataset` (a pure function of (seed, epoch, index)), and key frames are
a view of the same tensor. At 64^2 (tiny VAE, 4x16x16) a window costs 16 + 1 latents of 4 KiB in
float32; at 256^2 (SD, 4x32x32) 16 KiB each, so paper-scale caches want a window_stride > 1 or
dtype=float16.

Latents are the posterior mode times the VAE's scale (deterministic, see VAEConfig), of unflipped
frames: a cache refuses a dataset config with flip_p > 0.

Layout of `out_dir`:
    index.json                 what was encoded, by what, and every window's clip id and class id
    shard-00000.safetensors    frame_latents [n, T, C, h, w], audio_latents [n, C, h, w];
    shard-00001.safetensors    metadata: start, clip_ids and class_ids (JSON), build key
    ...
Each shard is written atomically and records the build key (dataset config, files on disk, VAE
fingerprint, dtype, shard size), so an interrupted or repeated build reuses every finished shard
whose key still matches and re-encodes only the rest.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mmldm_ae.vae import KLVAE
from mmldm_data.config import DatasetConfig
from mmldm_data.dataset import SoundingVideoDataset

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX_FILE = "index.json"
SHARD_GLOB = "shard-*.safetensors"

# Dataset settings that do not change what is encoded: target draws happen at read time, and the
# rest are bookkeeping. flip_p is checked separately (the cache cannot serve flips).
_NOT_ENCODED = ("name", "num_target_frames", "flip_p", "seed", "cache_dir", "index_workers", "num_classes")


class LatentCacheError(RuntimeError):
    """A latent cache is missing, incomplete, or was built from other data or another VAE."""


def encoded_dataset_config(config: DatasetConfig) -> dict:
    """The part of a dataset config that determines the cached latents, as plain JSON values."""
    fields = {k: v for k, v in asdict(config).items() if k not in _NOT_ENCODED}
    fields["data_root"] = str(Path(config.data_root).resolve())
    return fields


def settings_hash(payload: object) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def data_fingerprint(dataset: SoundingVideoDataset) -> str:
    """The files and windows behind the dataset: catches videos added, removed or changed on disk."""
    files = [(f.path, f.size, f.mtime_ns) for f in dataset.files]
    return settings_hash({"files": files, "windows": dataset.windows, "classes": dataset.file_classes})


@dataclass
class Shard:
    file: str
    start: int
    count: int


def plan_shards(count: int, shard_size: int) -> list[Shard]:
    return [
        Shard(f"shard-{i:05d}.safetensors", start, min(shard_size, count - start))
        for i, start in enumerate(range(0, count, shard_size))
    ]


def read_shard_metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(path, framework="pt") as handle:
            return handle.metadata() or {}
    except (OSError, ValueError, RuntimeError):  # a torn or foreign file: re-encode it
        return None


def build_latent_cache(
    dataset: SoundingVideoDataset,
    vae: KLVAE,
    out_dir: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    shard_size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Encode every window of `dataset` (built with return_all_frames=True) into `out_dir`.

    Reuses finished shards of an earlier build with the same inputs; moves `vae` to `device`.
    `batch_size` counts windows, i.e. batch_size * (num_frames + 1) images per step.
    """
    config = dataset.config
    if not dataset.return_all_frames:
        raise LatentCacheError(
            "build_latent_cache needs SoundingVideoDataset(config, return_all_frames=True)"
        )
    if config.flip_p > 0:
        raise LatentCacheError(
            f"dataset.flip_p={config.flip_p}: the cache stores unflipped frames; build it with dataset.flip_p=0"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae = vae.to(device).eval()
    frame_shape = [config.num_frames, *vae.latent_shape(config.resolution)]
    encoded_config = encoded_dataset_config(config)
    header = {
        "version": CACHE_VERSION,
        "dataset_config": encoded_config,
        "dataset_config_hash": settings_hash(encoded_config),
        "data_fingerprint": data_fingerprint(dataset),
        "vae": {
            "fingerprint": vae.fingerprint(),
            "latent_channels": vae.latent_channels,
            "downsample": vae.downsample,
            "scale": vae.scale,
        },
        "dtype": str(dtype).removeprefix("torch."),
        "num_frames": config.num_frames,
        "key_frame_indices": list(config.key_frame_indices),
        "frame_latent_shape": frame_shape,
        "audio_latent_shape": list(vae.latent_shape(config.mel.image_size)),
        "count": len(dataset),
        "shard_size": shard_size,
    }
    build_key = settings_hash(header)
    shards = plan_shards(len(dataset), shard_size)

    metadata: dict[str, dict[str, str]] = {}
    pending: list[Shard] = []
    for shard in shards:
        found = read_shard_metadata(out_dir / shard.file) if (out_dir / shard.file).is_file() else None
        if found and found.get("build_key") == build_key:
            metadata[shard.file] = found
        else:
            pending.append(shard)
    if len(pending) < len(shards):
        log.info("latent cache %s: reusing %d of %d shards", out_dir, len(shards) - len(pending), len(shards))
    strays = set(out_dir.glob(SHARD_GLOB)) - {out_dir / s.file for s in shards}
    if pending or strays:
        # The index is written last, so a cache whose build stops halfway is never read as complete.
        (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for stray in strays:
        stray.unlink()

    if pending:
        metadata |= _encode_shards(
            dataset, vae, out_dir, pending, build_key, batch_size, num_workers, device, dtype, progress
        )

    clip_ids = [clip for s in shards for clip in json.loads(metadata[s.file]["clip_ids"])]
    class_ids = [c for s in shards for c in json.loads(metadata[s.file]["class_ids"])]
    index = header | {
        "build_key": build_key,
        "shards": [asdict(s) for s in shards],
        "clip_ids": clip_ids,
        "class_ids": class_ids,
    }
    temporary = out_dir / f"{INDEX_FILE}.tmp"
    temporary.write_text(json.dumps(index, indent=1))
    temporary.replace(out_dir / INDEX_FILE)
    return out_dir


@torch.inference_mode()
def _encode_shards(
    dataset: SoundingVideoDataset,
    vae: KLVAE,
    out_dir: Path,
    pending: list[Shard],
    build_key: str,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> dict[str, dict[str, str]]:
    indices = [i for shard in pending for i in range(shard.start, shard.start + shard.count)]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    bar = tqdm(total=len(indices), desc="encoding latents", unit="window", disable=not progress)
    rows: dict[str, list] = {"frames": [], "audio": [], "class_ids": [], "clip_ids": []}
    written: dict[str, dict[str, str]] = {}
    queue = iter(pending)
    shard = next(queue)
    for batch in loader:
        frames = batch["frames"].to(device)  # [B, T, 3, R, R]
        frame_latents = vae.encode(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])  # [B, T, C, h, w]
        audio_latents = vae.encode(batch["audio_image"].to(device))  # [B, C, h, w]
        rows["frames"].extend(frame_latents.to("cpu", dtype))
        rows["audio"].extend(audio_latents.to("cpu", dtype))
        rows["class_ids"].extend(int(c) for c in batch["class_id"])
        rows["clip_ids"].extend(batch["clip_id"])
        bar.update(len(frames))
        # Batches need not align with shards: write every shard the rows now cover.
        while shard is not None and len(rows["clip_ids"]) >= shard.count:
            part = {key: values[: shard.count] for key, values in rows.items()}
            rows = {key: values[shard.count :] for key, values in rows.items()}
            written[shard.file] = _write_shard(out_dir, shard, part, build_key)
            shard = next(queue, None)
    bar.close()
    return written


def _write_shard(out_dir: Path, shard: Shard, rows: dict[str, list], build_key: str) -> dict[str, str]:
    metadata = {
        "build_key": build_key,
        "start": str(shard.start),
        "clip_ids": json.dumps(rows["clip_ids"]),
        "class_ids": json.dumps(rows["class_ids"]),
    }
    tensors = {
        "frame_latents": torch.stack(rows["frames"]).contiguous(),
        "audio_latents": torch.stack(rows["audio"]).contiguous(),
    }
    temporary = out_dir / f"{shard.file}.tmp"
    save_file(tensors, temporary, metadata=metadata)
    temporary.replace(out_dir / shard.file)  # a shard exists only once it is complete
    return metadata


def _read_index(out_dir: Path) -> dict:
    path = out_dir / INDEX_FILE
    if not path.is_file():
        raise LatentCacheError(
            f"no finished latent cache in {str(out_dir)!r} ({INDEX_FILE} missing): build it with "
            "mmldm_ae.engine.latent_cache.build_latent_cache; a rerun finishes an interrupted build"
        )
    try:
        index = json.loads(path.read_text())
    except ValueError as error:
        raise LatentCacheError(
            f"unreadable latent cache index {str(path)!r}: {error}; rebuild the cache"
        ) from None
    if index.get("version") != CACHE_VERSION:
        raise LatentCacheError(
            f"latent cache {str(out_dir)!r} has format version {index.get('version')}, this code reads "
            f"{CACHE_VERSION}: rebuild it"
        )
    return index


def cache_mismatch(out_dir: str | Path, dataset_config: DatasetConfig, vae: KLVAE) -> str | None:
    """Why the cache in `out_dir` cannot stand in for `dataset_config` encoded by `vae`, or None.

    Compares settings and the VAE's weights; files changed on disk under the same settings are
    caught when `build_latent_cache` runs (it fingerprints the indexed files), not here.
    """
    try:
        index = _read_index(Path(out_dir))
    except LatentCacheError as error:
        return str(error)
    if dataset_config.flip_p > 0:
        return f"dataset.flip_p={dataset_config.flip_p}, but the cache holds unflipped frames only"
    wanted = encoded_dataset_config(dataset_config)
    if settings_hash(wanted) != index["dataset_config_hash"]:
        changed = sorted(
            k
            for k in wanted.keys() | index["dataset_config"].keys()
            if wanted.get(k) != index["dataset_config"].get(k)
        )
        details = ", ".join(
            f"{k}: cached {index['dataset_config'].get(k)!r}, now {wanted.get(k)!r}" for k in changed
        )
        return f"latent cache {str(out_dir)!r} was built with other dataset settings ({details}); rebuild it"
    if vae.fingerprint() != index["vae"]["fingerprint"]:
        return (
            f"latent cache {str(out_dir)!r} was built with another VAE (other weights, architecture or scale "
            f"{index['vae']['scale']} vs {vae.scale}); rebuild it with this VAE"
        )
    return None


def cache_matches(out_dir: str | Path, dataset_config: DatasetConfig, vae: KLVAE) -> bool:
    return cache_mismatch(out_dir, dataset_config, vae) is None


class LatentCacheDataset(Dataset):
    """Reads a latent cache like `SoundingVideoDataset` reads videos.

    Items: key_latents [K, C, h, w], target_latents [n, C, h, w], target_indices [n] (positions
    i / num_frames in [0, 1), as in the pixel dataset), audio_latents [C, h, w], class_id, clip_id.
    Latents come in the dtype the cache was built with. Target frames are drawn as the pixel
    dataset draws them, so with equal seeds (and flip_p=0) both pick the same frames. Passing
    `dataset_config` and `vae` refuses a stale cache.
    """

    def __init__(
        self,
        out_dir: str | Path,
        num_target_frames: int = 2,
        seed: int = 0,
        dataset_config: DatasetConfig | None = None,
        vae: KLVAE | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.index = _read_index(self.out_dir)
        if dataset_config is not None and vae is not None:
            reason = cache_mismatch(self.out_dir, dataset_config, vae)
            if reason:
                raise LatentCacheError(reason)
        self.num_frames = self.index["num_frames"]
        if not 1 <= num_target_frames <= self.num_frames:
            raise ValueError(f"num_target_frames must be in 1..{self.num_frames}, got {num_target_frames}")
        self.num_target_frames = num_target_frames
        self.seed = seed
        self.epoch = 0
        self.key_frame_indices = self.index["key_frame_indices"]
        self.shards = [Shard(**s) for s in self.index["shards"]]
        self._shard_starts = [s.start for s in self.shards]
        self._handles: dict[str, object] = {}  # opened lazily, per worker process

    def __len__(self) -> int:
        return self.index["count"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self) -> dict:
        # safetensors handles cannot cross into DataLoader workers; each worker reopens its own.
        return self.__dict__ | {"_handles": {}}

    def _row(self, name: str, index: int) -> Tensor:
        shard = self.shards[bisect.bisect_right(self._shard_starts, index) - 1]
        if shard.file not in self._handles:
            self._handles[shard.file] = safe_open(self.out_dir / shard.file, framework="pt")
        return self._handles[shard.file].get_slice(name)[index - shard.start]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} windows")
        frame_latents = self._row("frame_latents", index)  # [T, C, h, w]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        targets = np.sort(rng.choice(self.num_frames, size=self.num_target_frames, replace=False))
        return {
            "key_latents": frame_latents[self.key_frame_indices],
            "target_latents": frame_latents[torch.from_numpy(targets)],
            "target_indices": torch.from_numpy(targets / self.num_frames).float(),
            "audio_latents": self._row("audio_latents", index),
            "class_id": self.index["class_ids"][index],
            "clip_id": self.index["clip_ids"][index],
        }
