"""Generated vs real sounding videos: FVD, KVD, FAD, AV-Align and the synthetic oracles
(docs/design.md#evaluation).

    protocol.py  EvalProtocol (clip length, rate, resolution, clip count, FAD backends) and EvaluationError
    sources.py   folders -> clip windows, the seeded draw, conditions.json, decoded ClipBatches, EvalSets
                 and the Reconstructor interface of an autoencoder round trip (rFVD / rKVD / rFAD)
    features.py  I3D and FAD models, per-clip features with the real-set cache, compare()
    report.py    evaluate() over seeds, the summary and notes, markdown_table()
    references.py the synthetic benchmark's reference sets (real, shuffled, swapped) and evaluate_sets()

The metric primitives (Frechet distance, I3D, FAD backends, AV-Align, oracles) live in
mmldm_data.metrics. The autoencoder round trip is given by the caller as a Reconstructor, so this
package imports nothing from the later stages.
"""

from __future__ import annotations

from mmldm_data.evaluation.features import EvalModels, load_models
from mmldm_data.evaluation.protocol import RESOLUTIONS, EvalProtocol, EvaluationError
from mmldm_data.evaluation.references import REFERENCE_SETS, evaluate_sets, write_references
from mmldm_data.evaluation.report import evaluate, markdown_table
from mmldm_data.evaluation.sources import CONDITIONS_FILE, ClipBatch, EvalSets, Reconstructor

__all__ = [
    "CONDITIONS_FILE",
    "REFERENCE_SETS",
    "RESOLUTIONS",
    "ClipBatch",
    "EvalModels",
    "EvalProtocol",
    "EvalSets",
    "EvaluationError",
    "Reconstructor",
    "evaluate",
    "evaluate_sets",
    "load_models",
    "markdown_table",
    "write_references",
]
