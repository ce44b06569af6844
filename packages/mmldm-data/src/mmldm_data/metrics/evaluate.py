"""Generated vs real sounding videos: FVD, KVD, FAD, AV-Align and the synthetic oracles (DESIGN section 6).

The protocol is MM-Diffusion's evaluator made explicit and seeded:
  * a clip is `num_frames` (16) frames at `fps` (10) taken by timestamp, with the audio of the same
    span at 44.1 kHz mono (1.6 s = 70,560 samples);
  * real clips are a seeded draw of `num_clips` (2048) windows among all sliding windows (stride
    1 frame) of the real files; a generated file gives one clip (its first window), and when
    there are more files than `num_clips` a seeded draw picks which; nothing is ever duplicated
    to reach `num_clips` (MM-Diffusion cycles its loader), so the report states the counts used;
  * frames are letterboxed to `resolution` (64 or 256, bicubic, black bars) before anything else,
    so both sets pass through the same resize whatever their native size; I3D then sees them
    resized bilinearly to short side 224 and centre-cropped (`preprocess_for_i3d`);
  * FVD = Frechet distance and KVD = unbiased polynomial MMD^2 of I3D logits; FAD per backend
    (`fad.py`); AV-Align per clip and averaged (`av_align.py`), on the letterboxed frames;
    oracles (`oracle.py`) when the real set is the project's synthetic dataset.
Real-set features are cached per (files, selected windows, protocol, feature) under
<cache>/eval, so a second evaluation against the same real set decodes nothing it has seen.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from mmldm_data.config import DatasetConfig
from mmldm_data.dataset import find_media_files
from mmldm_data.media import MediaError, count_frames, probe_media, read_video
from mmldm_data.metrics.av_align import av_align
from mmldm_data.metrics.fad import BACKENDS, AudioEmbedder, fad, load_fad_backend
from mmldm_data.metrics.frechet import frechet_distance, polynomial_mmd
from mmldm_data.metrics.i3d import I3D, default_cache_dir, load_i3d, preprocess_for_i3d
from mmldm_data.metrics.oracle import Condition, OracleReading, oracle_metrics, read_oracles
from mmldm_data.synthetic import CLASS_NAMES, GENERATOR_TAG
from mmldm_data.video import letterbox, to_uint8_frames

CACHE_VERSION = 1
RESOLUTIONS = (64, 256)
CONDITIONS_FILE = "conditions.json"
PAPER_CLIPS = 2048  # clips per side in the published protocol


class EvaluationError(ValueError):
    """An input cannot be evaluated; the message names it and says what to do."""


@dataclass(frozen=True)
class EvalProtocol:
    num_frames: int = 16
    fps: float = 10.0
    resolution: int = 256  # frames letterboxed to R x R first (64: MM-Diffusion's published setting)
    sample_rate: int = 44100
    num_clips: int = 2048
    fad_backends: tuple[str, ...] = ("aisfx",)
    extensions: tuple[str, ...] = tuple(DatasetConfig().extensions)

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise EvaluationError(f"resolution must be one of {RESOLUTIONS}, got {self.resolution}")
        if self.num_clips < 2:
            raise EvaluationError(f"num_clips must be >= 2 (a covariance needs two clips), got {self.num_clips}")
        unknown = sorted(set(self.fad_backends) - set(BACKENDS))
        if unknown:
            raise EvaluationError(f"unknown FAD backend(s) {unknown}; choose from {sorted(BACKENDS)}")

    @property
    def clip_samples(self) -> int:
        return round(self.num_frames / self.fps * self.sample_rate)

    def clip_fields(self) -> dict:
        """What a clip's features depend on (the cache key's protocol part)."""
        return {"num_frames": self.num_frames, "fps": self.fps, "resolution": self.resolution,
                "sample_rate": self.sample_rate}

    def describe(self) -> str:
        return (f"{self.num_frames} frames @ {self.fps:g} fps ({self.num_frames / self.fps:g} s) with "
                f"{self.sample_rate} Hz mono audio; frames letterboxed to {self.resolution}^2, then I3D input "
                "short side 224 bilinear + centre crop, [-1, 1]; FVD: Frechet distance (unbiased covariances) "
                "of 400-d I3D logits; KVD: unbiased MMD^2, k = (x.y/400 + 1)^3, unscaled; up to "
                f"{self.num_clips} clips per side, seeded")


# --------------------------------------------------------------------------------------------
# Clip sources and selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipRef:
    path: Path
    start_frame: int
    has_audio: bool

    def clip_id(self, root: Path) -> str:
        return f"{self.path.relative_to(root).as_posix()}@{self.start_frame}"


@dataclass
class ClipSource:
    """The usable windows of a folder of videos, and why the other files were skipped."""

    root: Path
    windows: list[ClipRef]
    files: int
    skipped: dict[str, list[str]]  # reason -> relative paths
    fingerprint: str  # of every used file's (path, size, mtime)

    @property
    def files_without_audio(self) -> int:
        return len({ref.path for ref in self.windows if not ref.has_audio})

    def summary(self) -> dict:
        return {"root": str(self.root), "files": self.files, "usable_files": len({r.path for r in self.windows}),
                "windows": len(self.windows), "files_without_audio": self.files_without_audio,
                "skipped": {reason: len(paths) for reason, paths in sorted(self.skipped.items())}}


def scan_clip_source(root: str | Path, protocol: EvalProtocol, every_window: bool, role: str) -> ClipSource:
    """Index a folder (any nesting): every window (stride 1 frame) of each file, or only its first.

    Reads container headers only. Raises EvaluationError naming the folder when no file gives a clip.
    """
    root = Path(root)
    if not root.is_dir():
        raise EvaluationError(f"{role} folder {str(root)!r} does not exist or is not a folder")
    paths = find_media_files(root, list(protocol.extensions))
    windows: list[ClipRef] = []
    skipped: dict[str, list[str]] = {}
    digest = hashlib.sha1()
    too_short = f"shorter than {protocol.num_frames} frames at {protocol.fps:g} fps"
    for path in paths:
        relative = path.relative_to(root).as_posix()
        try:
            info = probe_media(path)
        except MediaError as error:
            skipped.setdefault(f"unreadable ({error})" if len(paths) == 1 else "unreadable", []).append(relative)
            continue
        if not info.has_video:
            skipped.setdefault("no video stream", []).append(relative)
            continue
        frames = count_frames(info, protocol.fps)
        if frames < protocol.num_frames:
            skipped.setdefault(too_short, []).append(relative)
            continue
        last_start = frames - protocol.num_frames if every_window else 0
        windows.extend(ClipRef(path, start, info.has_audio) for start in range(last_start + 1))
        stat = path.stat()
        digest.update(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    if not windows:
        found = f"{len(paths)} video file(s) found" if paths else "no video file found"
        reasons = "; ".join(f"{len(files)} {reason}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                            for reason, files in sorted(skipped.items()))
        raise EvaluationError(
            f"no readable video clip in the {role} folder {str(root)!r} ({found}{'; ' + reasons if reasons else ''}). "
            f"Expected video files ({', '.join(protocol.extensions)}) at any depth, each at least "
            f"{protocol.num_frames} frames at {protocol.fps:g} fps ({protocol.num_frames / protocol.fps:g} s).")
    return ClipSource(root, windows, len(paths), skipped, digest.hexdigest())


def select_windows(source: ClipSource, num_clips: int, seed: int) -> list[ClipRef]:
    """All windows when there are at most `num_clips`, else a seeded draw without replacement (in file order)."""
    if len(source.windows) <= num_clips:
        return list(source.windows)
    chosen = np.random.default_rng(seed).choice(len(source.windows), size=num_clips, replace=False)
    return [source.windows[i] for i in sorted(chosen)]


def is_synthetic_dataset(root: Path) -> bool:
    """Whether `root` was written by mmldm_data.synthetic (its metadata.json says so)."""
    try:
        return json.loads((root / "metadata.json").read_text()).get("generator") == GENERATOR_TAG
    except (OSError, ValueError, AttributeError):
        return False


def read_conditions(root: Path) -> dict[str, Condition]:
    """<generated>/conditions.json: {"<relative path>": {"task": "a2v"|"v2a", "class": name or id}}.

    The conditional generation tools write it; joint samples need none.
    """
    path = root / CONDITIONS_FILE
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
        conditions = {}
        for relative, entry in entries.items():
            label = entry["class"]
            class_id = CLASS_NAMES.index(label) if isinstance(label, str) else int(label)
            conditions[relative] = Condition(entry["task"], class_id)
        return conditions
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise EvaluationError(
            f"{path}: cannot read it ({type(error).__name__}: {error}); expected "
            '{"<relative path>": {"task": "a2v" or "v2a", "class": "<class name>" or id}}') from None


# --------------------------------------------------------------------------------------------
# Decoding and the autoencoder hook
# --------------------------------------------------------------------------------------------


@dataclass
class ClipBatch:
    """Clips as the evaluator (and an autoencoder round trip) sees them."""

    frames: torch.Tensor  # float [B, T, 3, R, R] in [-1, 1], letterboxed
    audio: torch.Tensor  # float [B, N] mono at the protocol's rate; silence where has_audio is False
    has_audio: torch.Tensor  # bool [B]
    clip_ids: list[str]


class Reconstructor(Protocol):
    """An autoencoder round trip (the AE stage provides it through mmldm_ae.load_reconstructor)."""

    def reconstruct(self, batch: ClipBatch) -> ClipBatch:
        """Encode and decode every clip; same shapes, value ranges, order and ids as the input."""
        ...


def load_reconstructor(checkpoint: str | Path, device: str | torch.device) -> Reconstructor:
    """Import mmldm_ae only now (evaluation alone needs no autoencoder) and build its round trip."""
    if not Path(checkpoint).exists():
        raise EvaluationError(f"--recon: autoencoder checkpoint {str(checkpoint)!r} not found (give the run_dir of "
                              "tools/train_ae.py or one of its checkpoints/step_* folders)")
    try:
        autoencoder = importlib.import_module("mmldm_ae")
    except ImportError as error:
        raise EvaluationError(f"--recon needs the package mmldm_ae, which does not import ({error}). "
                              "Fix: `make setup`.") from None
    loader = getattr(autoencoder, "load_reconstructor", None)
    if loader is None:
        raise EvaluationError(
            "--recon needs mmldm_ae.load_reconstructor(checkpoint, device) returning an object with "
            "reconstruct(ClipBatch) -> ClipBatch (interface: mmldm_data.metrics.evaluate.Reconstructor); "
            "the installed mmldm_ae does not define it yet, so rFVD / rKVD / rFAD cannot be computed.")
    return loader(checkpoint, device=device)


def iter_batches(refs: Sequence[ClipRef], root: Path, protocol: EvalProtocol, batch_size: int,
                 failures: list[str]) -> Iterator[tuple[ClipBatch, int]]:
    """(batch, clips consumed) in order; a clip that fails to decode is left out and noted in `failures`."""
    for first in range(0, len(refs), batch_size):
        chunk = refs[first:first + batch_size]
        frames, audio, has_audio, clip_ids = [], [], [], []
        for ref in chunk:
            try:
                clip = read_video(ref.path, fps=protocol.fps, start=ref.start_frame / protocol.fps,
                                  num_frames=protocol.num_frames,
                                  sample_rate=protocol.sample_rate if ref.has_audio else None)
            except MediaError as error:
                failures.append(str(error))
                continue
            frames.append(letterbox(clip.frames, protocol.resolution))  # [T, 3, R, R]
            audio.append(clip.audio if clip.audio is not None else np.zeros(protocol.clip_samples, np.float32))
            has_audio.append(clip.audio is not None)
            clip_ids.append(ref.clip_id(root))
        if frames:
            yield ClipBatch(torch.stack(frames), torch.from_numpy(np.stack(audio)), torch.tensor(has_audio), clip_ids), len(chunk)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


@dataclass
class EvalModels:
    i3d: I3D
    fad: dict[str, AudioEmbedder]

    @property
    def device(self) -> torch.device:
        return next(self.i3d.parameters()).device


def load_models(protocol: EvalProtocol, device: str | torch.device = "cpu",
                fad_weights: dict[str, str] | None = None) -> EvalModels:
    """I3D and every requested FAD backend; FADWeightsError / I3DWeightsError name a missing file."""
    fad_weights = fad_weights or {}
    return EvalModels(i3d=load_i3d(device=device),
                      fad={name: load_fad_backend(name, fad_weights.get(name), device) for name in protocol.fad_backends})


def audio_feature_name(embedder: AudioEmbedder) -> str:
    """Names the embedding and the exact weights file, so other weights never hit a stale cache."""
    path = embedder.weights_path
    stamp = f"{path.resolve()}|{path.stat().st_size}|{path.stat().st_mtime_ns}" if path is not None else ""
    return f"audio__{embedder.spec.name}__{hashlib.sha1(stamp.encode()).hexdigest()[:10]}"


@dataclass
class SideFeatures:
    """Per-clip features of one side of a comparison (clips in selection order)."""

    clip_ids: list[str]
    has_audio: np.ndarray  # bool [N]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # "i3d" [N, 400], "av_align" [N], audio__* [M, D]
    oracle: list[OracleReading] | None = None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        oracle = json.dumps([asdict(r) for r in self.oracle]) if self.oracle is not None else ""
        partial = path.with_name(f"{path.stem}.partial.npz")
        np.savez(partial, clip_ids=np.array(self.clip_ids), has_audio=self.has_audio, oracle=np.array(oracle),
                 **self.arrays)
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> SideFeatures | None:
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files if key not in ("clip_ids", "has_audio", "oracle")}
                oracle_json = str(stored["oracle"])
                oracle = [OracleReading(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                          for r in json.loads(oracle_json)] if oracle_json else None
                return cls([str(clip_id) for clip_id in stored["clip_ids"]], stored["has_audio"], arrays, oracle)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def has(self, wanted: set[str]) -> bool:
        return all(name == "oracle" and self.oracle is not None or name in self.arrays for name in wanted)


def wanted_features(models: EvalModels, oracle: bool) -> dict[str, AudioEmbedder | None]:
    """Feature name -> the embedder that computes it (None: computed by the evaluator itself)."""
    wanted: dict[str, AudioEmbedder | None] = {"i3d": None, "av_align": None}
    wanted.update({audio_feature_name(embedder): embedder for embedder in models.fad.values()})
    if oracle:
        wanted["oracle"] = None
    return wanted


@torch.inference_mode()
def compute_features(refs: Sequence[ClipRef], root: Path, protocol: EvalProtocol, models: EvalModels,
                     wanted: dict[str, AudioEmbedder | None], reconstructor: Reconstructor | None = None,
                     batch_size: int = 8, progress: str | None = None) -> tuple[SideFeatures, list[str]]:
    """One decoding pass computing the `wanted` features; returns them and the decode failures."""
    failures: list[str] = []
    clip_ids: list[str] = []
    has_audio: list[np.ndarray] = []
    collected: dict[str, list[np.ndarray]] = {name: [] for name in wanted if name != "oracle"}
    oracle: list[OracleReading] | None = [] if "oracle" in wanted else None
    bar = tqdm(total=len(refs), desc=progress, unit="clip", disable=progress is None, dynamic_ncols=True)
    for batch, consumed in iter_batches(refs, root, protocol, batch_size, failures):
        if reconstructor is not None:
            batch = reconstructor.reconstruct(batch)
        clip_ids += batch.clip_ids
        with_audio = batch.has_audio.cpu().numpy().astype(bool)
        has_audio.append(with_audio)
        if "i3d" in wanted:
            clips = preprocess_for_i3d(batch.frames.to(models.device))
            collected["i3d"].append(models.i3d(clips).float().cpu().numpy())
        audio = batch.audio.float().cpu().numpy()
        for name, embedder in wanted.items():
            if embedder is not None and with_audio.any():
                collected[name].append(embedder.embed(audio[with_audio], protocol.sample_rate))
        if "av_align" in wanted or oracle is not None:
            frames = [to_uint8_frames(clip) for clip in batch.frames]  # [T, R, R, 3] each
            if "av_align" in wanted:
                collected["av_align"].append(np.array(
                    [av_align(f, a, protocol.fps, protocol.sample_rate) if ok else math.nan
                     for f, a, ok in zip(frames, audio, with_audio, strict=True)]))
            if oracle is not None:
                oracle += [read_oracles(f, a, protocol.fps, protocol.sample_rate) for f, a in zip(frames, audio, strict=True)]
        bar.update(consumed)
    bar.close()
    arrays = {name: np.concatenate(parts) for name, parts in collected.items() if parts}
    for name, embedder in wanted.items():  # no clip with sound: an empty set, still a computed result
        if embedder is not None and name not in arrays:
            arrays[name] = np.zeros((0, embedder.spec.embedding_dim), np.float32)
    features = SideFeatures(clip_ids, np.concatenate(has_audio) if has_audio else np.zeros(0, bool), arrays, oracle)
    return features, failures


def real_cache_path(source: ClipSource, refs: Sequence[ClipRef], protocol: EvalProtocol, cache_dir: Path) -> Path:
    key = json.dumps({"version": CACHE_VERSION, "root": str(source.root.resolve()), "files": source.fingerprint,
                      "clips": [ref.clip_id(source.root) for ref in refs], "protocol": protocol.clip_fields()})
    return cache_dir / f"real-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"


def cached_real_features(source: ClipSource, refs: Sequence[ClipRef], protocol: EvalProtocol, models: EvalModels,
                         wanted: dict[str, AudioEmbedder | None], cache_dir: Path, batch_size: int,
                         progress: str | None) -> tuple[SideFeatures, list[str], bool]:
    """Real-set features from the cache when it holds them all, else computed (missing ones only) and stored.

    Returns (features, decode failures, whether the cache answered everything).
    """
    path = real_cache_path(source, refs, protocol, cache_dir)
    cached = SideFeatures.load(path) if path.is_file() else None
    if cached is not None and cached.has(set(wanted)):
        return cached, [], True
    missing = {name: embedder for name, embedder in wanted.items() if cached is None or not cached.has({name})}
    fresh, failures = compute_features(refs, source.root, protocol, models, missing, batch_size=batch_size,
                                       progress=progress)
    if cached is not None and cached.clip_ids != fresh.clip_ids:
        # A clip that decoded before fails now: the cached features no longer line up, start over.
        fresh, failures = compute_features(refs, source.root, protocol, models, wanted, batch_size=batch_size,
                                           progress=progress)
    elif cached is not None:
        fresh.arrays = {**cached.arrays, **fresh.arrays}
        fresh.oracle = fresh.oracle if fresh.oracle is not None else cached.oracle
    if not failures:  # a set with decode failures is not the selection the key names
        fresh.save(path)
    return fresh, failures, False


# --------------------------------------------------------------------------------------------
# Metrics and the report
# --------------------------------------------------------------------------------------------


def compare(generated: SideFeatures, real: SideFeatures, models: EvalModels,
            conditions: Sequence[Condition | None] | None, prefix: str = "") -> tuple[dict, list[str]]:
    """Metrics of one (generated, real) pair and notes on what could not be computed."""
    metrics: dict[str, float | int | None] = {}
    notes: list[str] = []
    metrics[f"{prefix}fvd"] = frechet_distance(generated.arrays["i3d"], real.arrays["i3d"])
    metrics[f"{prefix}kvd"] = polynomial_mmd(generated.arrays["i3d"], real.arrays["i3d"])
    for embedder in models.fad.values():
        name, spec = audio_feature_name(embedder), embedder.spec
        fake, true = generated.arrays.get(name), real.arrays.get(name)
        if fake is None or true is None or len(fake) < 2 or len(true) < 2:
            metrics[f"{prefix}{spec.metric_name}"] = None
            notes.append(f"{prefix}{spec.metric_name} skipped: it needs >= 2 clips with audio on each side "
                         f"(generated {int(generated.has_audio.sum())}, real {int(real.has_audio.sum())})")
            continue
        metrics[f"{prefix}{spec.metric_name}"] = fad(fake, true, spec)
    for side, features in (("", generated), ("_real", real)):
        scores = features.arrays.get("av_align", np.zeros(0))
        defined = scores[~np.isnan(scores)]
        metrics[f"av_align{side}"] = float(defined.mean()) if len(defined) else None
        if len(defined) < len(scores) and side == "":
            notes.append(f"av_align: {len(scores) - len(defined)} of {len(scores)} generated clips have no audio, "
                         "or neither audio onsets nor motion peaks; left out of the mean")
    if generated.oracle is not None:
        metrics.update(oracle_metrics(generated.oracle, conditions))
    if real.oracle is not None:
        metrics.update({f"{key}_real": value for key, value in oracle_metrics(real.oracle).items()})
    return metrics, notes


@dataclass
class EvalSets:
    """What to compare: a generated folder, or an autoencoder round trip of the real clips, vs the real set."""

    real: ClipSource
    generated: ClipSource | None = None
    reconstructor: Reconstructor | None = None
    real_label: str = ""  # e.g. "dataset=landscape"; defaults to the folder

    @classmethod
    def scan(cls, real_root: str | Path, protocol: EvalProtocol, generated_root: str | Path | None = None,
             reconstructor: Reconstructor | None = None, real_label: str = "") -> EvalSets:
        """Index both folders (headers only), so bad input fails before any model loads."""
        if (generated_root is None) == (reconstructor is None):
            raise EvaluationError("give exactly one of a generated folder or an autoencoder to round-trip (--recon)")
        generated = (scan_clip_source(generated_root, protocol, every_window=False, role="generated")
                     if generated_root is not None else None)
        real = scan_clip_source(real_root, protocol, every_window=True, role="real")
        return cls(real, generated, reconstructor, real_label)


def evaluate(sets: EvalSets, protocol: EvalProtocol, models: EvalModels, seeds: Sequence[int],
             cache_dir: Path | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """The full report: metrics (mean over seeds), their std, per-seed values, protocol, inputs, notes."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "eval"
    real, generated = sets.real, sets.generated
    oracle = is_synthetic_dataset(real.root)
    wanted = wanted_features(models, oracle)
    conditions = read_conditions(generated.root) if generated is not None else {}
    prefix = "r" if sets.reconstructor is not None else ""

    per_seed: list[dict] = []
    notes: list[str] = []
    generated_memo: dict[tuple[str, ...], tuple[SideFeatures, list[str]]] = {}
    real_from_cache = []
    counts = {}
    for seed in seeds:
        real_refs = select_windows(real, protocol.num_clips, seed)
        real_features, real_failures, hit = cached_real_features(
            real, real_refs, protocol, models, wanted, cache_dir, batch_size,
            progress=f"real (seed {seed})" if progress else None)
        real_from_cache.append(hit)
        if generated is not None:
            refs = select_windows(generated, protocol.num_clips, seed)
            key = tuple(ref.clip_id(generated.root) for ref in refs)
            if key not in generated_memo:
                generated_memo[key] = compute_features(refs, generated.root, protocol, models, wanted,
                                                       batch_size=batch_size,
                                                       progress=f"generated (seed {seed})" if progress else None)
            fake_features, fake_failures = generated_memo[key]
            sample_conditions = [conditions.get(clip_id.rsplit("@", 1)[0]) for clip_id in fake_features.clip_ids]
        else:
            fake_features, fake_failures = compute_features(
                real_refs, real.root, protocol, models, wanted, reconstructor=sets.reconstructor,
                batch_size=batch_size, progress=f"reconstructed (seed {seed})" if progress else None)
            sample_conditions = None
        for side, failures in (("real", real_failures), ("generated", fake_failures)):
            notes += [f"{side} clip left out, decoding failed: {failure}" for failure in failures]
        for side, features in (("real", real_features), ("generated", fake_features)):
            if len(features.clip_ids) < 2:
                raise EvaluationError(f"only {len(features.clip_ids)} {side} clip(s) could be decoded; "
                                      "FVD needs at least 2 per side")
        metrics, metric_notes = compare(fake_features, real_features, models, sample_conditions, prefix)
        notes += metric_notes
        per_seed.append({"seed": seed, **metrics})
        counts = {"generated_clips": len(fake_features.clip_ids), "real_clips": len(real_features.clip_ids),
                  "generated_clips_with_audio": int(fake_features.has_audio.sum()),
                  "real_clips_with_audio": int(real_features.has_audio.sum())}

    report = summarize(per_seed)
    report.update(counts)
    report["protocol"] = {**asdict(protocol), "description": protocol.describe(), "seeds": list(seeds),
                          "fad_backends": {name: {"label": BACKENDS[name].label, "scale": BACKENDS[name].scale,
                                                  "comparable_to_published_fad": BACKENDS[name].comparable}
                                           for name in protocol.fad_backends}}
    report["inputs"] = {"real": {"label": sets.real_label or str(real.root), **real.summary(),
                                 "features_from_cache": real_from_cache},
                        "generated": generated.summary() if generated is not None else "autoencoder round trip of the real clips",
                        "synthetic_oracles": oracle}
    report["notes"] = input_notes(report, protocol, real, generated) + list(dict.fromkeys(notes))
    return report


def summarize(per_seed: list[dict]) -> dict:
    """Mean over seeds at the top level, sample std under "std" when there are several seeds."""
    keys = [key for key in per_seed[0] if key != "seed"]
    report: dict = {}
    spread: dict = {}
    for key in keys:
        values = [run[key] for run in per_seed if run.get(key) is not None]
        report[key] = float(np.mean(values)) if values else None
        if len(per_seed) > 1 and len(values) > 1:
            spread[key] = float(np.std(values, ddof=1))
    if spread:
        report["std"] = spread
    report["per_seed"] = per_seed
    return report


def input_notes(report: dict, protocol: EvalProtocol, real: ClipSource, generated: ClipSource | None) -> list[str]:
    notes = [f"{report['protocol']['fad_backends'][name]['label']}" for name in protocol.fad_backends
             if not BACKENDS[name].comparable]
    smallest = min(report["generated_clips"], report["real_clips"])
    if smallest < PAPER_CLIPS:
        notes.append(f"{report['generated_clips']} generated vs {report['real_clips']} real clips, fewer than the "
                     f"published protocol's {PAPER_CLIPS}: FVD/KVD/FAD depend on N (covariances of 400-d features "
                     "need N >> 400), so compare only runs with equal N")
    for side, source in (("real", real), ("generated", generated)):
        if source is None:
            continue
        for reason, files in sorted(source.skipped.items()):
            notes.append(f"{side}: {len(files)} file(s) skipped, {reason}: {', '.join(files[:5])}"
                         f"{' ...' if len(files) > 5 else ''}")
        if source.files_without_audio:
            notes.append(f"{side}: {source.files_without_audio} file(s) have no audio stream; audio metrics "
                         "(FAD, AV-Align, audio oracles) use only the clips with sound")
    return notes


def markdown_table(report: dict) -> str:
    """The report as a markdown table (metric | value | reference / note) followed by the notes."""
    spread = report.get("std", {})
    labels = {f"fad_{name}": spec["label"] for name, spec in report["protocol"]["fad_backends"].items()}
    rows = []
    for key in (key for key in report["per_seed"][0] if key != "seed" and not key.endswith("_real")):
        value, reference = report[key], report.get(f"{key}_real")
        if value is None:
            rows.append(f"| {key} | skipped | see notes |")
            continue
        shown = f"{value:.4g}" + (f" ± {spread[key]:.2g}" if key in spread else "")
        note = f"real clips: {reference:.4g}" if reference is not None else labels.get(key.removeprefix("r"), "")
        rows.append(f"| {key} | {shown} | {note} |")
    lines = ["| metric | value | reference / note |", "|---|---|---|", *rows, "",
             f"Clips: {report['generated_clips']} generated ({report['generated_clips_with_audio']} with audio) vs "
             f"{report['real_clips']} real ({report['real_clips_with_audio']} with audio); "
             f"seeds {report['protocol']['seeds']}.",
             f"Protocol: {report['protocol']['description']}."]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
