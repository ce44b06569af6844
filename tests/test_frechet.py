"""Frechet distance and polynomial MMD (FVD / KVD) against direct float64 formulas."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from mmldm_data.metrics.frechet import frechet_distance, fvd_kvd, polynomial_mmd


def reference_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook form with scipy's general matrix square root of S_x S_y."""
    mean_x, mean_y = x.mean(0), y.mean(0)
    cov_x = (x - mean_x).T @ (x - mean_x) / (len(x) - 1)
    cov_y = (y - mean_y).T @ (y - mean_y) / (len(y) - 1)
    cross = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(np.sum((mean_x - mean_y) ** 2) + np.trace(cov_x + cov_y - 2 * cross))


def reference_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2, k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    d = x.shape[1]
    kernel = lambda a, b: (a @ b / d + 1.0) ** 3
    m, n = len(x), len(y)
    within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return float(within_x + within_y - 2 * cross)


def correlated_gaussian(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mixing + shift


def test_frechet_matches_scipy_reference():
    rng = np.random.default_rng(0)
    x = correlated_gaussian(rng, 300, 24)
    y = correlated_gaussian(rng, 250, 24, shift=0.3) * 1.5
    assert frechet_distance(x, y) == pytest.approx(reference_frechet(x, y), rel=1e-9)


def test_frechet_with_singular_covariances():
    # Fewer samples than dimensions, as in FVD with small N: S_x, S_y are rank deficient.
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, 64)), rng.standard_normal((40, 64)) + 0.2
    assert frechet_distance(x, y) == pytest.approx(reference_frechet(x, y), rel=1e-6)


def test_frechet_of_a_set_with_itself_is_zero_and_symmetric():
    rng = np.random.default_rng(2)
    x, y = correlated_gaussian(rng, 200, 16), correlated_gaussian(rng, 180, 16, shift=1.0)
    assert abs(frechet_distance(x, x)) < 1e-9
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-10)


def test_frechet_of_a_shift_is_the_squared_mean_difference():
    # A shifted copy has exactly the same sample covariance, so FD = ||mu_x - mu_y||^2.
    rng = np.random.default_rng(3)
    x = correlated_gaussian(rng, 500, 32)
    shift = rng.standard_normal(32)
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_frechet_uses_unbiased_covariances():
    # Against a point mass at the same mean, FD = Tr(S_x): 2 with 1/(N-1), 1 with 1/N.
    x = np.array([[0.0, 0.0], [2.0, 0.0]])
    point_mass = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert frechet_distance(x, point_mass) == pytest.approx(2.0)


def test_polynomial_mmd_matches_pairwise_reference():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((25, 8)), rng.standard_normal((20, 8)) * 1.2 + 0.5
    assert polynomial_mmd(x, y) == pytest.approx(reference_mmd(x, y), rel=1e-10)
    assert polynomial_mmd(x, y) == pytest.approx(polynomial_mmd(y, x), rel=1e-12)


def test_polynomial_mmd_separates_distributions():
    rng = np.random.default_rng(5)
    same = polynomial_mmd(rng.standard_normal((800, 16)), rng.standard_normal((800, 16)))
    shifted = polynomial_mmd(rng.standard_normal((800, 16)), rng.standard_normal((800, 16)) + 0.5)
    assert abs(same) < 0.01 < shifted


def test_fvd_kvd_accepts_float32_tensors():
    generator = torch.Generator().manual_seed(6)
    fake, real = torch.randn(64, 400, generator=generator), torch.randn(48, 400, generator=generator)
    metrics = fvd_kvd(fake, real)
    assert set(metrics) == {"fvd", "kvd"}
    assert metrics["fvd"] == pytest.approx(frechet_distance(fake.double().numpy(), real.double().numpy()))
    assert metrics["kvd"] == pytest.approx(polynomial_mmd(fake.double().numpy(), real.double().numpy()))


def test_shape_errors():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="N >= 2"):
        polynomial_mmd(np.zeros((1, 3)), np.zeros((4, 3)))
