"""Tests for IPProtect's sellers (Table I) and sample_models (bootstraps, out-of-bag masks)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jipguard import data, ensemble, models
from jipguard.ipprotect import sellers

_MODEL = models.MLP(num_classes=10, hidden=(32,))


def test_seller_labels_follow_the_table_i_interpretation():
  labels = np.repeat(np.arange(10), 100)
  noise = (0.0, 1.0, 3.0)
  out = sellers.seller_labels(jax.random.key(0), labels, noise, 2, 10)
  assert out.shape == (6, 1000)
  np.testing.assert_array_equal(out[0], out[1])  # A seller's models share its dataset.
  changed = (out[::2] != labels).mean(1)
  np.testing.assert_allclose(changed, [0.0, 0.5 * 0.9, 0.875 * 0.9], atol=1e-3)
  assert sellers.resample_rate(0) == 0 and sellers.resample_rate(5) == pytest.approx(1 - 1 / 32)


def test_weight_decay_is_coupled_l2_and_kills_unused_weights():
  # A weight whose data gradient is always zero (an always-black pixel) decays to ~0 under the
  # coupled L2 (torch Adam's weight_decay) within ~|w| / lr steps, and stays put without it.
  params = {"w": jnp.array([0.05, 0.05])}
  data_grad = {"w": jnp.array([0.0, 1.0])}
  for wd, expect_unused in ((0.0, 0.05), (1e-4, 0.0)):
    tx = sellers.TrainConfig(learning_rate=1e-3, weight_decay=wd).optimizer()
    p, state = params, tx.init(params)
    for _ in range(200):
      updates, state = tx.update(data_grad, state, p)
      p = optax.apply_updates(p, updates)
    assert abs(float(p["w"][0]) - expect_unused) < 2e-3, (wd, p)
  assert sellers.TrainConfig().fingerprint() == {"epochs": 5, "batch_size": 128, "learning_rate": 1e-3}
  assert sellers.TrainConfig(weight_decay=0.1).fingerprint()["weight_decay"] == 0.1
  with pytest.raises(ValueError, match="weight_decay"):
    sellers.TrainConfig(weight_decay=-1.0)


def test_out_of_bag_mask_marks_exactly_the_models_that_did_not_train_on_an_image():
  boots = sellers.sample_bootstraps(jax.random.key(5), 40, 6)
  mask = sellers.out_of_bag_mask(boots, 40)
  assert mask.shape == (40, 6)
  for i in range(40):
    trained = np.array([i in row for row in boots])
    if trained.all():
      assert np.all(mask[i] == 1)  # Fallback: every model.
    else:
      np.testing.assert_array_equal(mask[i], (~trained).astype(np.float32))
  assert 0.25 < float(np.mean(mask)) < 0.5  # ~ (1 - 1/n)^n = 0.37 of the models per image.
  # sample_models trains on exactly these bootstraps: a model that never saw an image and one
  # that did are told apart by their loss on it (memorised images have near-zero loss).
  buyer = data.load("fashion_mnist_subset", "test").subset(np.arange(40))
  omega = sellers.sample_models(
    _MODEL, sellers.TrainConfig(epochs=40, batch_size=8), jax.random.key(5), buyer, 6, progress=False
  )
  probs = jax.nn.softmax(ensemble.apply(_MODEL, omega.variables, buyer.images), -1)  # M x N x C
  p_true = np.asarray(jnp.take_along_axis(probs, jnp.asarray(buyer.labels)[None, :, None], -1)[..., 0]).T
  strict = sellers.out_of_bag_mask(boots, 40).astype(bool) & (mask.sum(1, keepdims=True) < 6)
  assert p_true[~strict].mean() > 0.85 and p_true[strict].mean() < p_true[~strict].mean() - 0.1, (
    p_true[~strict].mean(),
    p_true[strict].mean(),
  )
