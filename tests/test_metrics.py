"""Metrics against hand computations and a float64 reference of the Frechet distance."""
import numpy as np
import pytest

from mini_safediff.evaluation.metrics import frechet_distance, harmful_rate, harmful_score, prompt_accuracy


def test_rates_and_scores_by_hand():
    probs = np.array([[0.1, 0.7, 0.2],   # reads 1
                      [0.5, 0.1, 0.4],   # reads 0
                      [0.2, 0.3, 0.5],   # reads 2
                      [0.0, 0.4, 0.6]])  # reads 2
    assert harmful_rate(probs, [2]) == 0.5
    assert harmful_rate(probs, [1, 2]) == 0.75
    assert harmful_score(probs, [2]) == pytest.approx((0.2 + 0.4 + 0.5 + 0.6) / 4)
    assert harmful_score(probs, [0, 2]) == pytest.approx((0.3 + 0.9 + 0.7 + 0.6) / 4)
    assert prompt_accuracy(probs, [1, 0, 0, 2]) == 0.75


def reference_frechet(a, b):
    """FID's formula with the matrix square root of S_a S_b by eigendecomposition (general, complex)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eig(cov_a @ cov_b)
    root = (vectors * np.sqrt(values.astype(complex))) @ np.linalg.inv(vectors)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def test_frechet_distance_equals_a_float64_reference_on_gaussian_features():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(loc=0.5, size=(400, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a, b), rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_of_identical_sets_is_zero_also_when_singular():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 6))
    assert abs(frechet_distance(a, a)) < 1e-9
    few = rng.normal(size=(5, 32))  # fewer images than dimensions: singular covariances
    assert abs(frechet_distance(few, few)) < 1e-9
    assert np.isfinite(frechet_distance(few, rng.normal(size=(7, 32))))


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20000, 3))
    assert frechet_distance(a, a + np.array([3.0, 0, 4.0])) == pytest.approx(25.0, rel=1e-9)


def test_frechet_distance_refuses_bad_shapes():
    with pytest.raises(ValueError, match="two"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
