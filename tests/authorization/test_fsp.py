"""FSP: the L_inf budget, the feature distance falls, one compilation, targets of another class."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jipguard import data
from jipguard.authorization import fsp


@pytest.fixture(scope="module")
def surrogate():
  ds = data.load("digits", "train")
  model, variables = fsp.train_surrogate(
    ds.images[:256], ds.labels[:256], 10, fsp.SurrogateConfig(epochs=1, batch_size=64), seed=0, progress=False
  )
  return model, variables, ds.images[256:320], ds.labels[256:320]


def test_budget_and_feature_distance(surrogate):
  model, variables, x, y = surrogate
  cfg = fsp.FSPConfig(layer="ResidualBlock_1")
  targets = x[::-1]
  adv = np.asarray(fsp.perturb(model, variables, jnp.asarray(x), jnp.asarray(targets), cfg))
  assert np.abs(adv - x).max() <= cfg.epsilon + 1e-6
  assert adv.min() >= 0 and adv.max() <= 1
  f = lambda z: fsp.batch_features(model, variables, z, cfg.layer)
  before = np.sum((f(x) - f(targets)) ** 2, axis=1)
  after = np.sum((f(adv) - f(targets)) ** 2, axis=1)
  assert np.mean(after < before) > 0.9 and after.mean() < 0.8 * before.mean()


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_zero_iterations_is_the_identity_and_momentum_is_a_flag(surrogate, momentum):
  model, variables, x, _ = surrogate
  same = fsp.perturb(model, variables, jnp.asarray(x), jnp.asarray(x[::-1]), fsp.FSPConfig(iterations=0))
  np.testing.assert_array_equal(np.asarray(same), x)
  cfg = fsp.FSPConfig(momentum=momentum, iterations=3)
  adv = np.asarray(fsp.perturb(model, variables, jnp.asarray(x), jnp.asarray(x[::-1]), cfg))
  assert np.abs(adv - x).max() <= cfg.epsilon + 1e-6 and not np.array_equal(adv, x)


def test_a_second_batch_of_one_shape_compiles_nothing(surrogate):
  model, variables, x, _ = surrogate
  cfg = fsp.FSPConfig(iterations=2)
  program = fsp._perturb_jit.for_members(variables)
  fsp.perturb(model, variables, jnp.asarray(x), jnp.asarray(x[::-1]), cfg)
  size = program._cache_size()
  fsp.perturb(model, variables, jnp.asarray(x[::-1]), jnp.asarray(x), cfg)
  assert program._cache_size() == size


def test_targets_are_of_another_class_and_the_farthest_candidate():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 200)
  feats = rng.normal(size=(200, 5))
  t = fsp.choose_targets(0, labels, feats, 4, candidates=1000)
  assert np.all(labels[t] != labels)
  # With many candidates the choice is the farthest image of the chosen class.
  for i in range(0, 200, 37):
    same = np.flatnonzero(labels == labels[t[i]])
    d = np.sum((feats[same] - feats[i]) ** 2, axis=1)
    assert t[i] == same[np.argmax(d)]
  nxt = fsp.choose_targets(0, labels, feats, 4, candidates=3, target_class="next")
  np.testing.assert_array_equal(labels[nxt], (labels + 1) % 4)
  with pytest.raises(ValueError, match="two classes"):
    fsp.choose_targets(0, np.zeros(5, int), feats[:5], 4, 3)


def test_an_unknown_layer_and_bad_settings_are_refused(surrogate):
  model, variables, _, _ = surrogate
  with pytest.raises(ValueError, match="--layer"):
    fsp.features(model, variables, jnp.zeros((8, 8, 1)), "NoSuchBlock")
  with pytest.raises(ValueError, match="--epsilon"):
    fsp.FSPConfig(epsilon=0)
  assert dataclasses.replace(fsp.FSPConfig(), step=0.0).step_size == pytest.approx(0.007)
