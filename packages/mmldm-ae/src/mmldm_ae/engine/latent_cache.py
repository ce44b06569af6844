"""Sharded safetensors caches of encoded dataset windows, and the KL-VAE's cache built on them.

`ShardedCache` is one kind of cache: it plans shards, encodes every window of a dataset in
batches with a given function, writes shards atomically and the index last, and tells why a
finished cache cannot stand for given data and encoder; `ShardedCacheDataset` reads one back.
Two kinds exist: VAE latents of all frames (`VAE_LATENTS` below, the autoencoder's training data)
and perceptual latents of the autoencoder (`mmldm_dit.latents`, the DiT's training data).

Layout of `out_dir`:
    index.json                 kind, format version, what was encoded by what (dataset config and its
                               hash, the files on disk, the encoder's fingerprint), the kind's own
                               header (shapes...), the shards, and per window: clip id, class id,
                               (file, start frame); written last, so a build that stops halfway is
                               never read as complete
    shard-00000.safetensors    the kind's tensors, each [n, ...] for the shard's n windows;
    shard-00001.safetensors    metadata: start, build key
    ...
Each shard records the build key (a hash of the whole header: dataset config, files on disk,
encoder fingerprint, dtype, shard size), so an interrupted or repeated build reuses every finished
shard whose key still matches and re-encodes only the rest. A kind of cache holds unflipped clips
and refuses a dataset config with flip_p > 0, unless its header says `flipped` (the VAE cache below
stores both orientations then).

The VAE cache stores, for every window, the latents of ALL its frames and of its audio image.
The dataset draws 2 target frames per item anew each epoch, so caching only the frames drawn once
would freeze that draw; with all frames cached, target frames are drawn at read time, with the
same rule as `SoundingVideoDataset` (a pure function of (seed, epoch, index)), and key frames are
a view of the same tensor. At 64^2 (tiny VAE, 4x16x16) a window costs 16 + 1 latents of 4 KiB in
float32; at 256^2 (SD, 4x32x32) 16 KiB each, so paper-scale caches want a window_stride > 1 or
dtype=float16. Its latents are the posterior mode times the VAE's scale (deterministic, see
VAEConfig). Built for a dataset config with flip_p > 0 (the paper presets' 0.5, the authors' flips
of stages 0 and 1), it also stores the latents of every frame flipped horizontally
(frame_latents_flipped; twice the frame latents' space and encoding time, the audio is never
flipped), and `LatentCacheDataset` makes the pixel dataset's flip draw for each item, so that a run
from the cache sees the clips, flipped or not, that a run from pixels sees. The flip draw is at
read time: one cache serves every flip_p.

With `reals` (train_ae's latent_cache_reals) the cache also stores the VAE decodes of those latents
(frame_reals, frame_reals_flipped, audio_reals: pixels [3, R, R], in the cache's dtype), the
discriminator's real inputs, which the autoencoder's step otherwise decodes anew every step
(`MultiModalAutoencoder.training_losses`). They are pixels, (R / h)^2 * 3 / C = 48 times the
latents' space at the paper's 256^2 (12 MiB per window with flips in float16), so they are off by
default; with a bf16 VAE in training they differ from the step's own decodes by bf16 rounding.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from mmldm_ae.vae import KLVAE
from mmldm_data.config import DatasetConfig
from mmldm_data.dataset import SoundingVideoDataset

log = logging.getLogger(__name__)

# 2: one format for every kind (kind, encoder fingerprint and windows in the index; no clip ids in shards).
CACHE_VERSION = 2
INDEX_FILE = "index.json"
SHARD_GLOB = "shard-*.safetensors"

# Dataset settings that do not change what is encoded: target draws happen at read time, and the
# rest are bookkeeping. flip_p is checked separately (`_flip_problem`: whether the cache holds flipped clips).
_NOT_ENCODED = (
    "name",
    "num_target_frames",
    "flip_p",
    "ae_w_kl",
    "seed",
    "cache_dir",
    "index_workers",
    "num_classes",
    # How files are read (whole, kept in memory, or window by window): only a window's first ~25 ms
    # of sound differ, an artefact of decoding AAC after a seek (mmldm_data.dataset).
    "keep_decoded",
)


class LatentCacheError(RuntimeError):
    """A latent cache is missing, incomplete, or was built from other data or another encoder."""


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


def _flip_problem(flip_p: float, header: dict) -> str | None:
    """Why a cache of this `header` (or index) cannot serve dataset.flip_p = `flip_p`, or None."""
    if flip_p > 0 and not header.get("flipped", False):
        return (
            f"dataset.flip_p={flip_p}, but this latent cache holds unflipped clips only; "
            "set dataset.flip_p=0 (or, for a VAE-latent cache, rebuild it with flip_p > 0: it then "
            "stores both orientations)"
        )
    return None


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


def _shard_build_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            return (handle.metadata() or {}).get("build_key")
    # SafetensorError derives from Exception alone: name it, or a torn shard crashes every rebuild.
    except (OSError, ValueError, RuntimeError, SafetensorError):  # a torn or foreign file: re-encode it
        return None


class Fingerprinted(Protocol):
    """An encoder (KLVAE, AutoencoderPipeline): its fingerprint identifies what produced cached latents."""

    def fingerprint(self) -> str: ...


# A DataLoader batch of B windows -> {tensor name: [B, ...]}, the tensors a kind of cache stores.
BatchEncoder = Callable[[dict], dict[str, Tensor]]


@dataclass(frozen=True)
class ShardedCache:
    """One kind of latent cache: its name in the index and what its messages call encoder and builder."""

    kind: str  # recorded in the index; a reader of another kind refuses the folder
    encoder: str  # what encodes the windows, e.g. "VAE"
    builder: str  # what builds and rebuilds a cache of this kind, e.g. a tool and its setting

    def build(
        self,
        dataset: SoundingVideoDataset,
        out_dir: str | Path,
        encode: BatchEncoder,
        fingerprint: str,
        header: dict,
        *,
        batch_size: int,
        shard_size: int,
        num_workers: int = 0,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
        summarise: Callable[[Path, list[Shard]], dict] | None = None,
    ) -> Path:
        """Encode every window of `dataset` into `out_dir` with `encode`; reuse the shards that still match.

        `fingerprint` identifies the encoder, `header` is the rest of what the latents depend on
        (shapes, settings): both go into the index and the build key. `summarise(out_dir, shards)`
        returns more index entries computed from the finished shards (e.g. statistics).
        """
        config = dataset.config
        problem = _flip_problem(config.flip_p, header)
        if problem:
            raise LatentCacheError(problem)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        encoded = encoded_dataset_config(config)
        header = {
            "version": CACHE_VERSION,
            "kind": self.kind,
            "dataset_config": encoded,
            "dataset_config_hash": settings_hash(encoded),
            "data_fingerprint": data_fingerprint(dataset),
            "encoder_fingerprint": fingerprint,
            "dtype": str(dtype).removeprefix("torch."),
            "num_frames": config.num_frames,
            "count": len(dataset),
            "shard_size": shard_size,
        } | header
        build_key = settings_hash(header)
        self._warn_if_stale(out_dir, config, fingerprint)

        shards = plan_shards(len(dataset), shard_size)
        pending = [s for s in shards if _shard_build_key(out_dir / s.file) != build_key]
        if len(pending) < len(shards):
            log.info(
                "latent cache %s: reusing %d of %d shards", out_dir, len(shards) - len(pending), len(shards)
            )
        strays = set(out_dir.glob(SHARD_GLOB)) - {out_dir / s.file for s in shards}
        if pending or strays:
            # The index is written last, so a cache whose build stops halfway is never read as complete.
            (out_dir / INDEX_FILE).unlink(missing_ok=True)
        for stray in strays:
            stray.unlink()
        if pending:
            self._encode_shards(
                dataset, encode, out_dir, pending, build_key, batch_size, num_workers, dtype, progress
            )

        files, classes = dataset.files, dataset.file_classes
        index = header | {
            "build_key": build_key,
            "shards": [asdict(s) for s in shards],
            "class_names": dataset.class_names,
            "files": [f.path for f in files],
            "windows": [list(w) for w in dataset.windows],
            "class_ids": [classes[f] for f, _ in dataset.windows],
            "clip_ids": [
                f"{files[f].path}@{start}" for f, start in dataset.windows
            ],  # as the dataset names them
        }
        if summarise is not None:
            index |= summarise(out_dir, shards)
        current = out_dir / INDEX_FILE
        if not current.is_file() or json.loads(current.read_text()) != json.loads(json.dumps(index)):
            # Per-process name: ranks that reuse a finished cache must not move each other's file.
            temporary = out_dir / f"{INDEX_FILE}.{os.getpid()}.tmp"
            temporary.write_text(json.dumps(index))
            temporary.replace(current)
        return out_dir

    def _warn_if_stale(self, out_dir: Path, config: DatasetConfig, fingerprint: str) -> None:
        try:
            index = self.read_index(out_dir)
        except LatentCacheError:  # nothing finished to be stale
            return
        reason = _stale(index, config, fingerprint, self.encoder)
        if reason:
            log.warning("latent cache %s is stale (%s): re-encoding", out_dir, reason)

    @torch.inference_mode()
    def _encode_shards(
        self,
        dataset: SoundingVideoDataset,
        encode: BatchEncoder,
        out_dir: Path,
        pending: list[Shard],
        build_key: str,
        batch_size: int,
        num_workers: int,
        dtype: torch.dtype,
        progress: bool,
    ) -> None:
        indices = [i for shard in pending for i in range(shard.start, shard.start + shard.count)]
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
        bar = tqdm(total=len(indices), desc=f"encoding {self.kind}", unit="window", disable=not progress)
        rows: dict[str, list[Tensor]] = {}
        buffered = 0
        queue = iter(pending)
        shard = next(queue)
        for batch in loader:
            encoded = encode(batch)
            for name, values in encoded.items():
                rows.setdefault(name, []).extend(values.to("cpu", dtype))
            batch_windows = len(next(iter(encoded.values())))
            buffered += batch_windows
            bar.update(batch_windows)
            # Batches need not align with shards: write every shard the rows now cover.
            while shard is not None and buffered >= shard.count:
                tensors = {
                    name: torch.stack(values[: shard.count]).contiguous() for name, values in rows.items()
                }
                rows = {name: values[shard.count :] for name, values in rows.items()}
                buffered -= shard.count
                temporary = out_dir / f"{shard.file}.tmp"
                save_file(tensors, temporary, metadata={"build_key": build_key, "start": str(shard.start)})
                temporary.replace(out_dir / shard.file)  # a shard exists only once it is complete
                shard = next(queue, None)
        bar.close()

    def read_index(self, out_dir: str | Path) -> dict:
        """The index of a finished cache of this kind and format version."""
        path = Path(out_dir) / INDEX_FILE
        if not path.is_file():
            raise LatentCacheError(
                f"no finished latent cache in {str(out_dir)!r} ({INDEX_FILE} missing): "
                f"{self.builder} builds it; a rerun finishes an interrupted build"
            )
        try:
            index = json.loads(path.read_text())
        except ValueError as error:
            raise LatentCacheError(
                f"unreadable latent cache index {str(path)!r}: {error}; rebuild it with {self.builder}"
            ) from None
        if index.get("version") != CACHE_VERSION or index.get("kind") != self.kind:
            raise LatentCacheError(
                f"{str(out_dir)!r} is not a {self.kind} cache of format version {CACHE_VERSION} (found "
                f"{index.get('kind', 'no kind')}, version {index.get('version')}): "
                f"rebuild it with {self.builder}"
            )
        return index

    def mismatch(
        self, out_dir: str | Path, dataset_config: DatasetConfig, encoder: Fingerprinted
    ) -> str | None:
        """Why the cache in `out_dir` cannot stand for `dataset_config` encoded by `encoder`, or None.

        Compares settings and the encoder's weights; files changed on disk under the same settings
        are caught when `build` runs (it fingerprints the indexed files), not here.
        """
        try:
            index = self.read_index(out_dir)
        except LatentCacheError as error:
            return str(error)
        problem = _flip_problem(dataset_config.flip_p, index)
        if problem:
            return problem
        reason = _stale(index, dataset_config, encoder.fingerprint(), self.encoder)
        if reason:
            return f"latent cache {str(out_dir)!r} is stale: {reason}; rebuild it with {self.builder}"
        return None


def _stale(index: dict, dataset_config: DatasetConfig, fingerprint: str, encoder: str) -> str | None:
    wanted = encoded_dataset_config(dataset_config)
    if settings_hash(wanted) != index["dataset_config_hash"]:
        cached = index["dataset_config"]
        changed = ", ".join(
            f"{k}: cached {cached.get(k)!r}, now {wanted.get(k)!r}"
            for k in sorted(wanted.keys() | cached.keys())
            if wanted.get(k) != cached.get(k)
        )
        return f"it was built with other dataset settings ({changed})"
    if fingerprint != index["encoder_fingerprint"]:
        return f"it was encoded by another {encoder} (other weights or settings) than the one given"
    return None


class ShardedCacheDataset(Dataset):
    """A finished cache of kind `cache`: its index and its stored rows by window; subclasses make the items.

    Passing `dataset_config` and `encoder` refuses a stale cache with the reason.
    """

    cache: ShardedCache

    def __init__(
        self,
        out_dir: str | Path,
        dataset_config: DatasetConfig | None = None,
        encoder: Fingerprinted | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.index = self.cache.read_index(self.out_dir)
        if dataset_config is not None and encoder is not None:
            reason = self.cache.mismatch(self.out_dir, dataset_config, encoder)
            if reason:
                raise LatentCacheError(reason)
        self.shards = [Shard(**s) for s in self.index["shards"]]
        self._shard_starts = [s.start for s in self.shards]
        self._handles: dict[str, object] = {}  # opened lazily, per worker process

    def __getstate__(self) -> dict:
        # safetensors handles cannot cross into DataLoader workers; each worker reopens its own.
        return self.__dict__ | {"_handles": {}}

    def row(self, name: str, window: int) -> Tensor:
        """Tensor `name` of one cached window (an index over all windows), [...] as stored."""
        shard = self.shards[bisect.bisect_right(self._shard_starts, window) - 1]
        if shard.file not in self._handles:
            self._handles[shard.file] = safe_open(self.out_dir / shard.file, framework="pt")
        return self._handles[shard.file].get_slice(name)[window - shard.start]


# ---------------------------------------------------------------------------------------------
# The KL-VAE's latents of every frame, for training the autoencoder
# ---------------------------------------------------------------------------------------------

VAE_LATENTS = ShardedCache(
    kind="vae-latents",
    encoder="VAE",
    builder="tools/train_ae.py latent_cache=<folder> (mmldm_ae.engine.latent_cache.build_latent_cache)",
)


class FrameEncoder:
    """Encodes the frames of windows, each frame of a file once: overlapping windows (window_stride <
    num_frames) share frames. The windows come file by file, so only the frames of the files of the
    last call are kept."""

    def __init__(self, encoders: dict[str, Callable[[Tensor], Tensor]]):
        self.encoders = encoders  # name -> (pixels [N, 3, R, R] -> latents [N, ...])
        self.known: dict[tuple[str, int], dict[str, Tensor]] = {}  # (file, frame) -> its latents by name

    def __call__(self, frames: Tensor, files: list[str], indices: Tensor) -> dict[str, Tensor]:
        """frames [B, T, 3, R, R], the frames `indices` [B, T] of `files` -> {name: [B, T, ...]}."""
        keys = [(file, int(i)) for file, row in zip(files, indices, strict=True) for i in row]
        new: dict[tuple[str, int], int] = {}  # frames not encoded yet -> their first position in keys
        for position, key in enumerate(keys):
            if key not in self.known:
                new.setdefault(key, position)
        current = {file for file, _ in keys}
        for key in [key for key in self.known if key[0] not in current]:
            del self.known[key]
        if new:
            pixels = frames.flatten(0, 1)[list(new.values())]
            latents = {name: encode(pixels) for name, encode in self.encoders.items()}
            for i, key in enumerate(new):
                self.known[key] = {name: values[i] for name, values in latents.items()}
        return {
            name: torch.stack([self.known[key][name] for key in keys]).unflatten(0, frames.shape[:2])
            for name in self.encoders
        }


def build_latent_cache(
    dataset: SoundingVideoDataset,
    vae: KLVAE,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    reals: bool = False,
    **options,
) -> Path:
    """Encode every window of `dataset` (built with return_all_frames=True) into `out_dir`.

    Shards hold frame_latents [n, T, C, h, w] and audio_latents [n, C, h, w], and with
    dataset.config.flip_p > 0 frame_latents_flipped [n, T, C, h, w] (every frame flipped
    horizontally; the windows are read unflipped whatever flip_p draws). Reuses finished shards of
    an earlier build with the same inputs; moves `vae` to `device`. `options` go to
    `ShardedCache.build` (batch_size: 8 and shard_size: 512 unless given); batch_size counts
    windows, i.e. at most batch_size * (num_frames + 1) images per step (2 * num_frames + 1 with
    flips): a frame that an earlier window of the same file holds is not encoded again.
    With `reals`, also each latent's VAE decode as frame_reals [n, T, 3, R, R] (frame_reals_flipped)
    and audio_reals [n, 3, R, R]: the latents as stored (in `dtype`), decoded.
    """
    options = {"batch_size": 8, "shard_size": 512, **options}
    config = dataset.config
    if not dataset.return_all_frames:
        raise LatentCacheError(
            "build_latent_cache needs SoundingVideoDataset(config, return_all_frames=True)"
        )
    vae = vae.to(device).eval()
    flipped = config.flip_p > 0
    if flipped:  # the windows as they are: both orientations are encoded here
        dataset = copy.copy(dataset)
        dataset.config = replace(config, flip_p=0.0)

    encoders = {"frame_latents": lambda pixels: vae.encode(pixels.to(device))}
    if flipped:  # as SoundingVideoDataset flips: the model frames, along their width
        encoders["frame_latents_flipped"] = lambda pixels: vae.encode(pixels.to(device).flip(-1))
    encode_frames = FrameEncoder(encoders)

    def encode(batch: dict) -> dict[str, Tensor]:
        frames = batch["frames"]
        indices = batch["start_frame"][:, None] + torch.arange(frames.shape[1])
        encoded = encode_frames(frames, batch["file"], indices)
        encoded["audio_latents"] = vae.encode(batch["audio_image"].to(device))  # [B, C, h, w]
        if reals:  # what the step would decode: the stored latents
            for name in [n for n in encoded if n.endswith("_latents") or n.endswith("_latents_flipped")]:
                latents = encoded[name].to(dtype).float()
                decoded = vae.decode(latents.flatten(0, latents.ndim - 4)).unflatten(0, latents.shape[:-3])
                encoded[name.replace("latents", "reals")] = decoded
        return encoded

    header = {
        "vae": {"latent_channels": vae.latent_channels, "downsample": vae.downsample, "scale": vae.scale},
        "key_frame_indices": list(config.key_frame_indices),
        "frame_latent_shape": [config.num_frames, *vae.latent_shape(config.resolution)],
        "audio_latent_shape": list(vae.latent_shape(config.mel.image_size)),
        "flipped": flipped,
        "reals": reals,
    }
    return VAE_LATENTS.build(dataset, out_dir, encode, vae.fingerprint(), header, dtype=dtype, **options)


def auto_cache_dir(run_dir: str | Path, dataset_config: DatasetConfig, vae: KLVAE) -> Path:
    """Where latent_cache=auto keeps a run's cache: beside run_dir, named by what the latents depend on
    (the encoded dataset settings, whether flips are stored, the VAE's weights), so that runs on one
    dataset and VAE share it and runs on others never rebuild it."""
    key = settings_hash(
        [encoded_dataset_config(dataset_config), dataset_config.flip_p > 0, vae.fingerprint()]
    )
    return Path(run_dir).parent / f"vae-latents-{dataset_config.name}-{key[:12]}"


def cache_mismatch(out_dir: str | Path, dataset_config: DatasetConfig, vae: KLVAE) -> str | None:
    """Why the VAE-latent cache in `out_dir` cannot stand in for `dataset_config` encoded by `vae`,
    or None.
    """
    return VAE_LATENTS.mismatch(out_dir, dataset_config, vae)


def cache_matches(out_dir: str | Path, dataset_config: DatasetConfig, vae: KLVAE) -> bool:
    return cache_mismatch(out_dir, dataset_config, vae) is None


class LatentCacheDataset(ShardedCacheDataset):
    """Reads a VAE-latent cache like `SoundingVideoDataset` reads videos.

    Items: key_latents [K, C, h, w], target_latents [n, C, h, w], target_indices [n] (positions
    i / num_frames in [0, 1), as in the pixel dataset), audio_latents [C, h, w], class_id, clip_id.
    Latents come in the dtype the cache was built with. Flips (`flip_p`, a cache built with flips)
    and target frames are drawn as the pixel dataset draws them, so with equal seeds both give the
    same clips, flipped alike. `reals` (a cache built with reals) adds target_reals [n, 3, R, R] and
    audio_reals [3, R, R], the VAE decodes of target_latents and audio_latents. Passing
    `dataset_config` and `vae` refuses a stale cache.
    """

    cache = VAE_LATENTS

    def __init__(
        self,
        out_dir: str | Path,
        num_target_frames: int = 2,
        seed: int = 0,
        dataset_config: DatasetConfig | None = None,
        vae: KLVAE | None = None,
        flip_p: float = 0.0,
        reals: bool = False,
    ):
        super().__init__(out_dir, dataset_config, vae)
        self.num_frames = self.index["num_frames"]
        if not 1 <= num_target_frames <= self.num_frames:
            raise ValueError(f"num_target_frames must be in 1..{self.num_frames}, got {num_target_frames}")
        problem = _flip_problem(flip_p, self.index)
        if problem:
            raise LatentCacheError(f"{self.out_dir}: {problem}")
        if reals and not self.index.get("reals", False):
            raise LatentCacheError(
                f"{self.out_dir} holds no VAE decodes of its latents (reals): rebuild it with reals"
            )
        self.num_target_frames = num_target_frames
        self.flip_p, self.reals = flip_p, reals
        self.seed = seed
        self.epoch = 0
        self.key_frame_indices = self.index["key_frame_indices"]

    def __len__(self) -> int:
        return self.index["count"]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} windows")
        # The pixel dataset's draws, in its order: the flip, then the target frames.
        rng = np.random.default_rng([self.seed, self.epoch, index])
        flip = self.flip_p > 0 and rng.random() < self.flip_p
        targets = np.sort(rng.choice(self.num_frames, size=self.num_target_frames, replace=False))
        suffix = "_flipped" if flip else ""
        frame_latents = self.row(f"frame_latents{suffix}", index)  # [T, C, h, w]
        item = {
            "key_latents": frame_latents[self.key_frame_indices],
            "target_latents": frame_latents[torch.from_numpy(targets)],
            "target_indices": torch.from_numpy(targets / self.num_frames).float(),
            "audio_latents": self.row("audio_latents", index),
            "class_id": self.index["class_ids"][index],
            "clip_id": self.index["clip_ids"][index],
        }
        if self.reals:
            item["target_reals"] = self.row(f"frame_reals{suffix}", index)[torch.from_numpy(targets)]
            item["audio_reals"] = self.row("audio_reals", index)
        return item
