"""Evaluation metrics: I3D video features (FVD/KVD) and Frechet / kernel distances."""

from __future__ import annotations

from mmldm_data.metrics.frechet import frechet_distance, fvd_kvd, polynomial_mmd
from mmldm_data.metrics.i3d import I3D, i3d_features, load_i3d, preprocess_for_i3d

__all__ = [
    "I3D",
    "frechet_distance",
    "fvd_kvd",
    "i3d_features",
    "load_i3d",
    "polynomial_mmd",
    "preprocess_for_i3d",
]
