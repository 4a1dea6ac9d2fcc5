"""flowmap_jax.digits.quality and the shipped classifier: accuracy, Frechet distance, MSE, report."""

import numpy as np
import pytest

from flowmap_jax.digits import data, quality


def _exact_moment_samples(rng, mean, cov, n):
    """n samples whose sample mean and unbiased sample covariance equal (mean, cov) exactly."""
    d = len(mean)
    z = rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    whiten = np.linalg.cholesky(np.cov(z, rowvar=False, ddof=1))
    z = np.linalg.solve(whiten, z.T).T  # identity sample covariance
    return z @ np.linalg.cholesky(cov).T + mean


def _closed_form_2d(mu_a, cov_a, mu_b, cov_b):
    # For a 2x2 matrix M with non-negative eigenvalues l1, l2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    m = cov_a @ cov_b
    tr_sqrt = np.sqrt(np.trace(m) + 2.0 * np.sqrt(np.linalg.det(m)))
    return np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_sqrt


def test_frechet_closed_form_two_gaussians():
    mu_a, mu_b = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    cov_a = np.array([[2.0, 0.7], [0.7, 1.0]])
    cov_b = np.array([[0.5, -0.3], [-0.3, 3.0]])  # does not commute with cov_a
    expected = _closed_form_2d(mu_a, cov_a, mu_b, cov_b)
    assert quality.frechet_distance_from_stats(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-10)
    rng = np.random.default_rng(0)
    fa, fb = _exact_moment_samples(rng, mu_a, cov_a, 50), _exact_moment_samples(rng, mu_b, cov_b, 70)
    assert quality.frechet_distance(fa, fb) == pytest.approx(expected, rel=1e-9)


def test_frechet_closed_form_commuting_high_dim():
    # Covariances diagonal in a shared rotated basis: FD = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(1)
    d = 64
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(1e-6, 5.0, d), rng.uniform(1e-6, 5.0, d)
    a[:5] = 0.0  # singular covariance
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = quality.frechet_distance_from_stats(mu_a, (basis * a) @ basis.T, mu_b, (basis * b) @ basis.T)
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_identical_sets_is_zero():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64)) * 10.0
    total_variance = np.trace(np.cov(features, rowvar=False))
    assert abs(quality.frechet_distance(features, features)) <= 1e-9 * total_variance
    assert np.isnan(quality.frechet_distance_from_stats(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2)))


@pytest.fixture(scope="module")
def real():
    return data.load_digits("train"), data.load_digits("heldout")


def test_classifier_heldout_accuracy(real):
    _, (images, labels) = real
    clf = quality.load_classifier()
    assert quality.label_accuracy(images, labels, clf) >= 0.98
    logits, features = quality.classifier_outputs(images[:7], clf)
    assert logits.shape == (7, 10) and features.shape == (7, 64) and features.dtype == np.float32
    # Batching and padding do not change the outputs.
    np.testing.assert_allclose(features, quality.classifier_features(images)[:7], rtol=1e-5, atol=1e-5)


def test_frechet_ranks_real_above_noise(real):
    (train, train_labels), _ = real
    rng = np.random.default_rng(3)
    noise = np.clip(rng.standard_normal(train.shape), -1, 1).astype(np.float32)
    noisy = train + 0.5 * rng.standard_normal(train.shape).astype(np.float32)
    fd_real = quality.digits_quality_report(train, train_labels)["frechet_distance"]
    fd_noisy = quality.digits_quality_report(noisy, train_labels)["frechet_distance"]
    report = quality.digits_quality_report(noise, train_labels, reference=train)
    assert fd_real < fd_noisy < report["frechet_distance"]
    assert fd_real < 0.05 * report["frechet_distance"]
    assert report["label_accuracy"] < 0.3 and report["num_samples"] == len(train)
    assert report["mse_to_reference"] == pytest.approx(np.mean((noise - train) ** 2), rel=1e-6)


def test_mse_and_input_checks():
    a = np.zeros((4, 16, 16, 1))
    assert quality.mse_to_reference(a, a + 0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="shapes differ"):
        quality.mse_to_reference(a, a[:3])
    with pytest.raises(ValueError, match="NHWC"):
        quality.classifier_features(np.zeros((4, 1, 16, 16)))
