"""Per-clip features and the metrics computed from them: the I3D and FAD models (`EvalModels`),
one decoding pass that computes every wanted feature (`compute_features`), the real-set feature
cache, and `compare`, which turns a (generated, real) pair of feature sets into FVD, KVD, FAD,
AV-Align and the synthetic oracles.

Real-set features are cached per (files, selected windows, protocol, feature) under
<cache>/eval, so a second evaluation against the same real set decodes nothing it has seen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmldm_data.evaluation.protocol import EvalProtocol
from mmldm_data.evaluation.sources import ClipRef, ClipSource, Reconstructor, iter_batches
from mmldm_data.metrics.av_align import av_align
from mmldm_data.metrics.fad import AudioEmbedder, fad, load_fad_backend
from mmldm_data.metrics.frechet import frechet_distance, polynomial_mmd
from mmldm_data.metrics.i3d import I3D, load_i3d, preprocess_for_i3d
from mmldm_data.metrics.oracle import Condition, OracleReading, oracle_metrics, read_oracles
from mmldm_data.synthetic import COLOUR_PITCH
from mmldm_data.video import to_uint8_frames

CACHE_VERSION = 1


@dataclass
class EvalModels:
    i3d: I3D
    fad: dict[str, AudioEmbedder]

    @property
    def device(self) -> torch.device:
        return next(self.i3d.parameters()).device


def load_models(
    protocol: EvalProtocol, device: str | torch.device = "cpu", fad_weights: dict[str, str] | None = None
) -> EvalModels:
    """I3D and every requested FAD backend; FADWeightsError / I3DWeightsError name a missing file."""
    fad_weights = fad_weights or {}
    return EvalModels(
        i3d=load_i3d(device=device),
        fad={name: load_fad_backend(name, fad_weights.get(name), device) for name in protocol.fad_backends},
    )


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
    arrays: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # "i3d" [N, 400], "av_align" [N], audio__* [M, D]
    oracle: list[OracleReading] | None = None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        oracle = json.dumps([asdict(r) for r in self.oracle]) if self.oracle is not None else ""
        partial = path.with_name(f"{path.stem}.partial.npz")
        np.savez(
            partial,
            clip_ids=np.array(self.clip_ids),
            has_audio=self.has_audio,
            oracle=np.array(oracle),
            **self.arrays,
        )
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> SideFeatures | None:
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {
                    key: stored[key] for key in stored.files if key not in ("clip_ids", "has_audio", "oracle")
                }
                oracle_json = str(stored["oracle"])
                oracle = (
                    [
                        OracleReading(**{k: tuple(v) if isinstance(v, list) else v for k, v in r.items()})
                        for r in json.loads(oracle_json)
                    ]
                    if oracle_json
                    else None
                )
                return cls(
                    [str(clip_id) for clip_id in stored["clip_ids"]], stored["has_audio"], arrays, oracle
                )
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
def compute_features(
    refs: Sequence[ClipRef],
    root: Path,
    protocol: EvalProtocol,
    models: EvalModels,
    wanted: dict[str, AudioEmbedder | None],
    reconstructor: Reconstructor | None = None,
    batch_size: int = 8,
    progress: str | None = None,
    oracle_classes: str = COLOUR_PITCH,
) -> tuple[SideFeatures, list[str]]:
    """One decoding pass computing the `wanted` features (the oracles reading the class set
    `oracle_classes`); returns them and the decode failures."""
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
                collected["av_align"].append(
                    np.array(
                        [
                            av_align(f, a, protocol.fps, protocol.sample_rate) if ok else math.nan
                            for f, a, ok in zip(frames, audio, with_audio, strict=True)
                        ]
                    )
                )
            if oracle is not None:
                oracle += [
                    read_oracles(f, a, protocol.fps, protocol.sample_rate, oracle_classes)
                    for f, a in zip(frames, audio, strict=True)
                ]
        bar.update(consumed)
    bar.close()
    arrays = {name: np.concatenate(parts) for name, parts in collected.items() if parts}
    for name, embedder in wanted.items():  # no clip with sound: an empty set, still a computed result
        if embedder is not None and name not in arrays:
            arrays[name] = np.zeros((0, embedder.spec.embedding_dim), np.float32)
    features = SideFeatures(
        clip_ids, np.concatenate(has_audio) if has_audio else np.zeros(0, bool), arrays, oracle
    )
    return features, failures


def real_cache_path(
    source: ClipSource, refs: Sequence[ClipRef], protocol: EvalProtocol, cache_dir: Path
) -> Path:
    key = json.dumps(
        {
            "version": CACHE_VERSION,
            "root": str(source.root.resolve()),
            "files": source.fingerprint,
            "clips": [ref.clip_id(source.root) for ref in refs],
            "protocol": protocol.clip_fields(),
        }
    )
    return cache_dir / f"real-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"


def cached_real_features(
    source: ClipSource,
    refs: Sequence[ClipRef],
    protocol: EvalProtocol,
    models: EvalModels,
    wanted: dict[str, AudioEmbedder | None],
    cache_dir: Path,
    batch_size: int,
    progress: str | None,
    oracle_classes: str = COLOUR_PITCH,
) -> tuple[SideFeatures, list[str], bool]:
    """Real-set features from the cache when it holds them all, else computed (missing ones only) and stored.

    Returns (features, decode failures, whether the cache answered everything).
    """
    path = real_cache_path(source, refs, protocol, cache_dir)
    cached = SideFeatures.load(path) if path.is_file() else None
    if cached is not None and cached.has(set(wanted)):
        return cached, [], True
    missing = {
        name: embedder for name, embedder in wanted.items() if cached is None or not cached.has({name})
    }
    common = dict(batch_size=batch_size, progress=progress, oracle_classes=oracle_classes)
    fresh, failures = compute_features(refs, source.root, protocol, models, missing, **common)
    if cached is not None and cached.clip_ids != fresh.clip_ids:
        # A clip that decoded before fails now: the cached features no longer line up, start over.
        fresh, failures = compute_features(refs, source.root, protocol, models, wanted, **common)
    elif cached is not None:
        fresh.arrays = {**cached.arrays, **fresh.arrays}
        fresh.oracle = fresh.oracle if fresh.oracle is not None else cached.oracle
    if not failures:  # a set with decode failures is not the selection the key names
        fresh.save(path)
    return fresh, failures, False


def compare(
    generated: SideFeatures,
    real: SideFeatures,
    models: EvalModels,
    conditions: Sequence[Condition | None] | None,
    prefix: str = "",
) -> tuple[dict, list[str]]:
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
            notes.append(
                f"{prefix}{spec.metric_name} skipped: it needs >= 2 clips with audio on each side "
                f"(generated {int(generated.has_audio.sum())}, real {int(real.has_audio.sum())})"
            )
            continue
        metrics[f"{prefix}{spec.metric_name}"] = fad(fake, true, spec)
    for side, features in (("", generated), ("_real", real)):
        scores = features.arrays.get("av_align", np.zeros(0))
        defined = scores[~np.isnan(scores)]
        metrics[f"av_align{side}"] = float(defined.mean()) if len(defined) else None
        if len(defined) < len(scores) and side == "":
            notes.append(
                f"av_align: {len(scores) - len(defined)} of {len(scores)} generated clips have no audio, "
                "or neither audio onsets nor motion peaks; left out of the mean"
            )
    if generated.oracle is not None:
        metrics.update(oracle_metrics(generated.oracle, conditions))
    if real.oracle is not None:
        metrics.update({f"{key}_real": value for key, value in oracle_metrics(real.oracle).items()})
    return metrics, notes
