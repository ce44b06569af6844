"""Frechet distance and polynomial-kernel MMD between two feature sets (FVD, KVD, FAD).

Conventions are MM-Diffusion's (TATS/VideoGPT code): unbiased covariances; KVD is the unbiased
MMD^2 with k(x, y) = (x.y / d + 1)^3 over the full sets, not averaged over subsets and not
scaled (StyleGAN-V's KID x1000 is a different number). Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_feature_matrix(features: ArrayLike, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    matrix = np.asarray(features, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise ValueError(f"{name} must be [N, D] with N >= 2; got shape {matrix.shape}")
    return matrix


def _check_pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_feature_matrix(x, "x"), _as_feature_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    return x, y


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; eigenvalues that rounding made negative count as 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(x: ArrayLike, y: ArrayLike) -> float:
    """||mu_x - mu_y||^2 + Tr(S_x) + Tr(S_y) - 2 Tr(sqrt(sqrt(S_x) S_y sqrt(S_x))).

    x: [N, D], y: [M, D]; S are unbiased (1/(N-1)) covariances. The cross term is the trace form of
    Tr(sqrtm(S_x S_y)) computed on a symmetric PSD matrix, so it stays real and stable when the
    covariances are singular (N <= D). With fewer clips than dimensions it is the nuclear norm of
    X_c Y_c^T / sqrt((N-1)(M-1)) (centred features; the same nonzero eigenvalues), an [N, M] SVD
    instead of two [D, D] eigendecompositions.
    """
    x, y = _check_pair(x, y)
    mean_x, mean_y = x.mean(axis=0), y.mean(axis=0)
    centred_x, centred_y = x - mean_x, y - mean_y
    n, m, dim = len(x), len(y), x.shape[1]
    trace_x = np.square(centred_x).sum() / (n - 1)
    trace_y = np.square(centred_y).sum() / (m - 1)
    if min(n, m) < dim:
        singular = np.linalg.svd(centred_x @ centred_y.T, compute_uv=False)
        cross_trace = singular.sum() / np.sqrt((n - 1) * (m - 1))
    else:
        cov_x, cov_y = centred_x.T @ centred_x / (n - 1), centred_y.T @ centred_y / (m - 1)
        sqrt_cov_x = _symmetric_sqrt(cov_x)
        product = sqrt_cov_x @ cov_y @ sqrt_cov_x
        product_eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
        cross_trace = np.sqrt(np.clip(product_eigenvalues, 0.0, None)).sum()
    return float(np.sum((mean_x - mean_y) ** 2) + trace_x + trace_y - 2.0 * cross_trace)


def polynomial_mmd(x: ArrayLike, y: ArrayLike, degree: int = 3) -> float:
    """Unbiased MMD^2 over the full sets with k(a, b) = (a.b / D + 1)^degree (sklearn's defaults).

    x: [M, D], y: [N, D]. The within-set sums leave out the diagonal k(a, a); the cross term keeps
    every pair.
    """
    x, y = _check_pair(x, y)
    m, n, dim = x.shape[0], y.shape[0], x.shape[1]
    k_xx = (x @ x.T / dim + 1.0) ** degree
    k_yy = (y @ y.T / dim + 1.0) ** degree
    k_xy = (x @ y.T / dim + 1.0) ** degree
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def fvd_kvd(fake_features: ArrayLike, real_features: ArrayLike) -> dict[str, float]:
    """{"fvd": Frechet distance, "kvd": polynomial MMD^2} of I3D features [N, 400] (fake vs real)."""
    return {
        "fvd": frechet_distance(fake_features, real_features),
        "kvd": polynomial_mmd(fake_features, real_features),
    }
