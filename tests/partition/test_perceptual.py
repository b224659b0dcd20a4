"""DPD_aux, the stand-in for the paper's DPD: a distance with the properties a perceptual distance needs."""

import numpy as np
import pytest

from jipguard import data
from jipguard.partition import perceptual


@pytest.fixture(scope="module")
def dpd():
  ds = data.load("fashion_mnist_subset")
  cfg = perceptual.PerceptualConfig(epochs=2, widths=(8, 16))
  return perceptual.train(ds.images[:256], ds.labels[:256], num_classes=10, cfg=cfg), ds.images[1000:1100]


def test_dpd_aux_is_zero_on_equal_images_symmetric_and_grows_with_noise(dpd):
  d, x = dpd
  assert d.train_accuracy > 0.3  # Chance is 0.1: the features were trained.
  np.testing.assert_allclose(d(x, x), 0, atol=1e-6)
  y = x[::-1]
  np.testing.assert_allclose(d(x, y), d(y, x), rtol=1e-5, atol=1e-6)
  rng = np.random.default_rng(0)
  means = [d(x, np.clip(x + s * rng.standard_normal(x.shape), 0, 1)).mean() for s in (0.05, 0.1, 0.2, 0.4)]
  assert all(a < b for a, b in zip(means, means[1:])), means
  assert ((0 <= d(x, y)) & (d(x, y) <= 4 * 4)).all()  # At most 4 per conv layer.
  np.testing.assert_allclose(d(x, y, chunk=7), d(x, y), rtol=1e-5, atol=1e-6)  # Chunking changes nothing.


def test_dpd_aux_refuses_bad_input(dpd):
  d, x = dpd
  with pytest.raises(ValueError, match="shape"):
    d(x, x[:3])
  with pytest.raises(ValueError, match="finite"):
    d(x, x * np.nan)
  with pytest.raises(ValueError, match="batch_size"):
    perceptual.train(x[:8], np.zeros(8), num_classes=10)
