"""The evaluation run and its report: `evaluate` draws the clips of every seed, compares their
features and assembles the report (metrics as the mean over seeds with their std and per-seed
values, protocol, inputs, notes); `markdown_table` renders it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mmldm_data.evaluation.features import (
    EvalModels,
    SideFeatures,
    cached_real_features,
    compare,
    compute_features,
    wanted_features,
)
from mmldm_data.evaluation.protocol import PAPER_CLIPS, EvalProtocol, EvaluationError
from mmldm_data.evaluation.sources import (
    CONDITIONS_FILE,
    ClipSource,
    EvalSets,
    read_conditions,
    select_windows,
)
from mmldm_data.metrics.fad import BACKENDS
from mmldm_data.metrics.i3d import default_cache_dir
from mmldm_data.synthetic import CLASS_SETS, oracle_class_set, synthetic_class_set


def evaluate(
    sets: EvalSets,
    protocol: EvalProtocol,
    models: EvalModels,
    seeds: Sequence[int],
    cache_dir: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """The full report: metrics (mean over seeds), their std, per-seed values, protocol, inputs, notes."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "eval"
    real, generated = sets.real, sets.generated
    # The oracles read the class set the real set was made with (None: not the synthetic set, no oracles).
    classes = synthetic_class_set(real.root)  # None: not the synthetic set, no oracle metrics
    oracle_classes = oracle_class_set(real.root)
    wanted = wanted_features(models, classes is not None)
    conditions = read_conditions(generated.root, CLASS_SETS[oracle_classes]) if generated is not None else {}
    notes: list[str] = condition_notes(conditions, generated) if generated is not None else []
    prefix = "r" if sets.reconstructor is not None else ""

    per_seed: list[dict] = []
    generated_memo: dict[tuple[str, ...], tuple[SideFeatures, list[str]]] = {}
    real_from_cache = []
    counts = {}
    for seed in seeds:
        real_refs = select_windows(real, protocol.num_clips, seed)
        real_features, real_failures, hit = cached_real_features(
            real,
            real_refs,
            protocol,
            models,
            wanted,
            cache_dir,
            batch_size,
            progress=f"real (seed {seed})" if progress else None,
            oracle_classes=oracle_classes,
        )
        real_from_cache.append(hit)
        if generated is not None:
            refs = select_windows(generated, protocol.num_clips, seed)
            key = tuple(ref.clip_id(generated.root) for ref in refs)
            if key not in generated_memo:
                generated_memo[key] = compute_features(
                    refs,
                    generated.root,
                    protocol,
                    models,
                    wanted,
                    batch_size=batch_size,
                    progress=f"generated (seed {seed})" if progress else None,
                    oracle_classes=oracle_classes,
                )
            fake_features, fake_failures = generated_memo[key]
            sample_conditions = [
                conditions.get(clip_id.rsplit("@", 1)[0]) for clip_id in fake_features.clip_ids
            ]
        else:
            fake_features, fake_failures = compute_features(
                real_refs,
                real.root,
                protocol,
                models,
                wanted,
                reconstructor=sets.reconstructor,
                batch_size=batch_size,
                progress=f"reconstructed (seed {seed})" if progress else None,
                oracle_classes=oracle_classes,
            )
            sample_conditions = None
        for side, failures in (("real", real_failures), ("generated", fake_failures)):
            notes += [f"{side} clip left out, decoding failed: {failure}" for failure in failures]
        for side, features in (("real", real_features), ("generated", fake_features)):
            if len(features.clip_ids) < 2:
                raise EvaluationError(
                    f"only {len(features.clip_ids)} {side} clip(s) could be decoded; "
                    "FVD needs at least 2 per side"
                )
        metrics, metric_notes = compare(fake_features, real_features, models, sample_conditions, prefix)
        notes += metric_notes
        per_seed.append({"seed": seed, **metrics})
        counts = {
            "generated_clips": len(fake_features.clip_ids),
            "real_clips": len(real_features.clip_ids),
            "generated_clips_with_audio": int(fake_features.has_audio.sum()),
            "real_clips_with_audio": int(real_features.has_audio.sum()),
        }

    report = summarize(per_seed)
    report.update(counts)
    report["protocol"] = {
        **asdict(protocol),
        "description": protocol.describe(),
        "seeds": list(seeds),
        "fad_backends": {
            name: {
                "label": BACKENDS[name].label,
                "scale": BACKENDS[name].scale,
                "comparable_to_published_fad": BACKENDS[name].comparable,
            }
            for name in protocol.fad_backends
        },
    }
    report["inputs"] = {
        "real": {
            "label": sets.real_label or str(real.root),
            **real.summary(),
            "features_from_cache": real_from_cache,
        },
        "generated": generated.summary()
        if generated is not None
        else "autoencoder round trip of the real clips",
        "synthetic_oracles": classes,  # the class set they read, None without oracles
    }
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


def condition_notes(conditions: dict, generated: ClipSource) -> list[str]:
    """What makes a2v / v2a accuracy doubtful: conditions.json naming absent files, or clips it misses."""
    if not conditions:
        return []
    files = {ref.clip_id(generated.root).rsplit("@", 1)[0] for ref in generated.windows}
    notes = []
    if absent := sorted(set(conditions) - files):
        notes.append(
            f"generated: {CONDITIONS_FILE} names {len(absent)} file(s) that are not in the folder "
            f"({', '.join(absent[:3])}): it may belong to another sampling run"
        )
    if unlabelled := sorted(files - set(conditions)):
        notes.append(
            f"generated: {len(unlabelled)} file(s) have no entry in {CONDITIONS_FILE} "
            f"({', '.join(unlabelled[:3])}); a2v / v2a accuracy counts only the labelled ones"
        )
    return notes


def input_notes(
    report: dict, protocol: EvalProtocol, real: ClipSource, generated: ClipSource | None
) -> list[str]:
    notes = [
        f"{report['protocol']['fad_backends'][name]['label']}"
        for name in protocol.fad_backends
        if not BACKENDS[name].comparable
    ]
    smallest = min(report["generated_clips"], report["real_clips"])
    if smallest < PAPER_CLIPS:
        notes.append(
            f"{report['generated_clips']} generated vs {report['real_clips']} real clips, fewer than the "
            f"published protocol's {PAPER_CLIPS}: FVD/KVD/FAD depend on N (covariances of 400-d features "
            "need N >> 400), so compare only runs with equal N"
        )
    for side, source in (("real", real), ("generated", generated)):
        if source is None:
            continue
        for reason, files in sorted(source.skipped.items()):
            notes.append(
                f"{side}: {len(files)} file(s) skipped, {reason}: {', '.join(files[:5])}"
                f"{' ...' if len(files) > 5 else ''}"
            )
        if source.files_without_audio:
            notes.append(
                f"{side}: {source.files_without_audio} file(s) have no audio stream; audio metrics "
                "(FAD, AV-Align, audio oracles) use only the clips with sound"
            )
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
        note = (
            f"real clips: {reference:.4g}" if reference is not None else labels.get(key.removeprefix("r"), "")
        )
        rows.append(f"| {key} | {shown} | {note} |")
    lines = [
        "| metric | value | reference / note |",
        "|---|---|---|",
        *rows,
        "",
        f"Clips: {report['generated_clips']} generated "
        f"({report['generated_clips_with_audio']} with audio) vs "
        f"{report['real_clips']} real ({report['real_clips_with_audio']} with audio); "
        f"seeds {report['protocol']['seeds']}.",
        f"Protocol: {report['protocol']['description']}.",
    ]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
