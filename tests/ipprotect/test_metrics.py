"""Tests for IPProtect's metrics against hand-computed values."""

import math

import numpy as np
import pytest

from jipguard.ipprotect import metrics


def _logits(pred_MxN, c=3):
  return np.eye(c, dtype=np.float32)[np.asarray(pred_MxN)] * 5.0


def test_utility_compliance_and_mae_by_hand():
  labels = np.array([0, 1, 2, 0])
  orig = _logits([[0, 1, 2, 0], [0, 0, 0, 0]])  # Accuracies 1.0 and 0.5.
  san = _logits([[0, 1, 1, 1], [0, 0, 0, 1]])  # Accuracies 0.5 and 0.25.
  np.testing.assert_allclose(metrics.utility(orig, labels), [1.0, 0.5])
  np.testing.assert_allclose(metrics.utility(san, labels), [0.5, 0.25])
  assert metrics.utility_mae([1.0, 0.5], [0.5, 0.25]) == pytest.approx(0.375)
  np.testing.assert_allclose(metrics.compliance(orig, san), [0.5, 0.75])
  # Masked: model 0 on images 2 and 3 only, model 1 on image 0 only.
  mask = np.array([[False, False, True, True], [True, False, False, False]])
  np.testing.assert_allclose(metrics.utility(orig, labels, mask), [1.0, 1.0])
  np.testing.assert_allclose(metrics.utility(san, labels, mask), [0.0, 1.0])
  with pytest.raises(ValueError, match="at least one image"):
    metrics.utility(orig, labels, np.zeros((2, 4), bool))
  # Logit L2 distance: a changed argmax between one-hot*5 vectors is 5*sqrt(2).
  np.testing.assert_allclose(
    metrics.estimated_risk(orig, san), [2 * 5 * math.sqrt(2) / 4, 5 * math.sqrt(2) / 4], rtol=1e-6
  )


def test_rank_correlation():
  assert metrics.rank_correlation([0.9, 0.5, 0.2], [0.8, 0.6, 0.1]) == pytest.approx(1.0)
  assert metrics.rank_correlation([0.9, 0.5, 0.2], [0.1, 0.6, 0.8]) == pytest.approx(-1.0)
  assert math.isnan(metrics.rank_correlation([0.9, 0.5, 0.2], [0.3, 0.3, 0.3]))


def test_hoeffding_lower_bound():
  vals = np.full(50, 0.9)
  expected = 0.9 - math.sqrt(math.log(20) / 100)
  assert metrics.hoeffding_lower_bound(vals, 0.95) == pytest.approx(expected)
  assert metrics.hoeffding_lower_bound(np.full(5, 0.1), 0.95) == 0.0  # Clipped at 0.
  # More models, tighter bound; higher confidence, looser bound.
  assert metrics.hoeffding_lower_bound(np.full(500, 0.9)) > expected
  assert metrics.hoeffding_lower_bound(vals, 0.99) < expected
  with pytest.raises(ValueError):
    metrics.hoeffding_lower_bound([], 0.95)


def test_similarity_metrics():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(4, 16, 16, 1)).astype(np.float32)
  np.testing.assert_allclose(metrics.pixel_correlation(x, x), 1.0, atol=1e-6)
  np.testing.assert_allclose(metrics.pixel_correlation(x, 1 - x), -1.0, atol=1e-6)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-5)
  noise = rng.normal(size=x.shape).astype(np.float32)
  assert np.all(metrics.ssim(x, noise) < 0.3)
  assert np.all(np.abs(metrics.pixel_correlation(x, noise)) < 0.3)
