"""Tests of jipguard.ipprotect.baselines: Identity, Random, InstaHide, DP-MERF and the common interface."""

import math

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jipguard import data
from jipguard.ipprotect import baselines

# Tiny and fast: sklearn's 8x8 digits; a small DP-MERF so that compiles stay short.
_TINY = baselines.DPMERFConfig(num_features=200, hidden=(32,), code_dim=4, steps=300, batch_size=64, learning_rate=1e-2)


def _digits(n=120):
  ds = data.load("digits", "train")
  return ds.images[:n], ds.labels[:n]


class IdentityRandomTest(parameterized.TestCase):
  def test_identity_returns_the_input(self):
    x, y = _digits()
    xs, ys = baselines.sanitize("identity", jax.random.key(0), x, y, 10)
    np.testing.assert_array_equal(xs, x)
    np.testing.assert_array_equal(ys, y)
    assert xs.dtype == np.float32 and ys.dtype == np.int32
    assert not np.shares_memory(xs, x)

  def test_random_is_standard_normal_and_independent_of_the_data(self):
    x, y = _digits()
    xs, ys = baselines.sanitize("random", jax.random.key(0), x, y, 10)
    assert xs.shape == x.shape and xs.dtype == np.float32
    np.testing.assert_array_equal(ys, y)
    n = xs.size  # 7,680 draws: mean within 5 standard errors, std within 5%.
    assert abs(xs.mean()) < 5 / math.sqrt(n)
    assert abs(xs.std() - 1) < 0.05
    assert abs(np.corrcoef(xs.ravel(), x.ravel())[0, 1]) < 5 / math.sqrt(n)
    again, _ = baselines.sanitize("random", jax.random.key(0), x, y, 10)
    other, _ = baselines.sanitize("random", jax.random.key(1), x, y, 10)
    np.testing.assert_array_equal(again, xs)
    assert not np.allclose(other, xs)


class InstaHideTest(parameterized.TestCase):
  @parameterized.parameters(2, 4, 15)
  def test_mix_is_a_dominant_convex_combination_of_k_images_under_a_sign_mask(self, k):
    x, _ = _digits(60)
    public = baselines.public_dataset(x.shape[1:])
    key = jax.random.key(3)
    mixed, lam, signs = baselines.instahide_mix(key, x, public, k)
    n = len(x)
    assert mixed.shape == x.shape and lam.shape == (n, k) and signs.shape == x.shape
    # Coefficients: positive, sum to 1, the encoded private image strictly dominant.
    assert np.all(lam > 0)
    np.testing.assert_allclose(lam.sum(1), 1, atol=1e-6)
    if k > 1:
      assert np.all(lam[:, :1] > lam[:, 1:])
    # The sign mask is +-1 with fair coins.
    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert abs(signs.mean()) < 5 / math.sqrt(signs.size)
    # Exactly the k named images are mixed: recompute from the documented sources.
    draws = jax.jit(baselines.instahide_draws, static_argnums=(1, 2, 3, 4))(key, n, len(public), k, x.shape[1:])
    other, pub = np.asarray(draws.other_N), np.asarray(draws.public_NxQ)
    np.testing.assert_array_equal(draws.coefficients_NxJ, lam)
    assert pub.shape == (n, k - 2) and np.all(other != np.arange(n))
    assert all(len(set(row)) == k - 2 for row in pub)
    stack = np.concatenate([x[:, None], x[other][:, None], public[pub]], axis=1)  # (n, k, H, W, C)
    expected = signs * np.einsum("nk,nkhwc->nhwc", lam, 2 * stack - 1)
    np.testing.assert_allclose(mixed, expected, atol=1e-5)
    assert np.abs(mixed).max() <= 1

  def test_sanitize_uses_the_default_public_set_and_keeps_labels(self):
    x, y = _digits(40)
    xs, ys = baselines.sanitize("instahide", jax.random.key(5), x, y, 10, 4)
    mixed, _, _ = baselines.instahide_mix(jax.random.key(5), x, baselines.public_dataset(x.shape[1:]), 4)
    np.testing.assert_array_equal(xs, mixed)
    np.testing.assert_array_equal(ys, y)
    own = baselines.sanitize("instahide", jax.random.key(5), x, y, 10, 4, public_images=np.zeros_like(x))[0]
    assert not np.allclose(own, xs)

  def test_public_dataset_is_resized_and_repeated_over_channels(self):
    public = baselines.public_dataset((28, 28, 3))
    assert public.shape == (1797, 28, 28, 3) and public.dtype == np.float32
    assert 0 <= public.min() and public.max() <= 1 and public.max() > 0.5
    np.testing.assert_array_equal(public[..., 0], public[..., 2])


class DPMERFTest(parameterized.TestCase):
  def test_features_have_unit_norm_and_approximate_the_gaussian_kernel(self):
    x, _ = _digits(8)
    flat = jnp.asarray(x.reshape(len(x), -1))
    freq = baselines.rff_frequencies(jax.random.key(0), 64, 20000, length_scale=3.0)
    phi = baselines.rff_features(freq, flat)
    np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1, atol=1e-5)
    sq = np.sum(np.square(x.reshape(len(x), 1, -1) - x.reshape(1, len(x), -1)), -1)
    np.testing.assert_allclose(phi @ phi.T, np.exp(-sq / (2 * 3.0**2)), atol=0.03)

  def test_released_embedding_has_the_specified_noise_scale(self):
    x, y = _digits(100)
    m = len(x)
    freq = baselines.rff_frequencies(jax.random.key(0), 64, 400)
    clean, std0 = baselines.dp_merf_embedding(jax.random.key(1), x, y, 10, 0.0, freq)
    assert std0 == 0 and clean.shape == (400, 10)
    # One example's feature x one-hot has norm 1, so replacing it moves the mean by <= 2 / m.
    x2 = x.copy()
    x2[0] = 1 - x2[0]
    y2 = y.copy()
    y2[0] = (y[0] + 1) % 10
    moved, _ = baselines.dp_merf_embedding(jax.random.key(1), x2, y2, 10, 0.0, freq)
    assert np.linalg.norm(moved - clean) <= 2 / m + 1e-6
    stds = {}
    for sigma in (5, 40):
      noisy, std = baselines.dp_merf_embedding(jax.random.key(2), x, y, 10, sigma, freq)
      assert std == pytest.approx(sigma * 2 / m)
      diff = (noisy - clean).ravel()  # 4,000 entries: std within 5% (~4.5 standard errors).
      assert abs(diff.std() / std - 1) < 0.05
      assert abs(diff.mean()) < 5 * std / math.sqrt(diff.size)
      stds[sigma] = diff.std()
    assert stds[40] / stds[5] == pytest.approx(8, rel=0.08)
    other, _ = baselines.dp_merf_embedding(jax.random.key(3), x, y, 10, 5, freq)
    assert not np.allclose(other, baselines.dp_merf_embedding(jax.random.key(2), x, y, 10, 5, freq)[0])

  def test_gaussian_epsilon_is_exact_and_tighter_than_the_classic_bound(self):
    delta = 1e-5
    eps = {s: baselines.gaussian_epsilon(s, delta) for s in (1, 5, 10, 40)}
    assert eps[1] > eps[5] > eps[10] > eps[40] > 0
    phi = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))
    for s, e in eps.items():
      got = phi(0.5 / s - e * s) - math.exp(e) * phi(-0.5 / s - e * s)
      assert got == pytest.approx(delta, rel=1e-3)
    assert eps[5] < math.sqrt(2 * math.log(1.25 / delta)) / 5  # Classic bound, valid for eps < 1.

  def test_generator_fitted_to_a_clean_embedding_lowers_the_mmd(self):
    x, y = _digits(200)
    freq = baselines.rff_frequencies(jax.random.key(0), 64, _TINY.num_features)
    target, _ = baselines.dp_merf_embedding(jax.random.key(1), x, y, 10, 0.0, freq)

    def mmd_of_samples(fit):
      xs, ys = baselines.dp_merf_sample(jax.random.key(9), fit, 1000)
      assert xs.shape == (1000, 8, 8, 1) and 0 <= xs.min() and xs.max() <= 1
      assert np.bincount(ys, minlength=10).tolist() == [100] * 10
      emb = baselines.mean_embedding(freq, jnp.asarray(xs), jnp.asarray(ys), 10)
      return float(baselines.mmd2(emb, jnp.asarray(target)))

    generator = baselines.Generator((8, 8, 1), 10, _TINY.hidden)
    init = generator.init(jax.random.key(2), jnp.zeros((1, _TINY.code_dim)), jnp.zeros(1, jnp.int32))
    untrained = baselines.GeneratorFit(init, generator, _TINY, np.zeros(0))
    cache = baselines._train_chunk._cache_size()
    fit = baselines.dp_merf_train_generator(jax.random.key(2), target, freq, (8, 8, 1), _TINY)
    assert baselines._train_chunk._cache_size() == cache + 1  # 250 + 50 (padded) steps: one compile.
    assert fit.loss_history.shape == (_TINY.steps,) and np.all(np.isfinite(fit.loss_history))
    before, after = mmd_of_samples(untrained), mmd_of_samples(fit)
    assert after < 0.3 * before, (before, after)
    assert fit.loss_history[-20:].mean() < 0.3 * fit.loss_history[:5].mean()

  def test_sanitize_samples_the_buyer_sets_size_with_generated_labels(self):
    x, y = _digits(50)
    cfg = baselines.DPMERFConfig(**{**_TINY.__dict__, "steps": 250})  # Same chunk shape: no new compile.
    xs, ys = baselines.sanitize("dp_merf", jax.random.key(0), x, y, 10, 5, dp_merf_config=cfg)
    assert xs.shape == x.shape and xs.dtype == np.float32 and ys.dtype == np.int32
    assert 0 <= xs.min() and xs.max() <= 1
    counts = np.bincount(ys, minlength=10)
    assert counts.sum() == 50 and counts.max() - counts.min() <= 1


class ErrorTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.x, self.y = _digits(20)
    self.key = jax.random.key(0)

  def _sanitize(self, name="identity", key=None, x=None, y=None, num_classes=10, param=None, **kw):
    return baselines.sanitize(
      name,
      self.key if key is None else key,
      self.x if x is None else x,
      self.y if y is None else y,
      num_classes,
      param,
      **kw,
    )

  def test_bad_names_and_params(self):
    with pytest.raises(ValueError, match="unknown baseline 'instahyde'"):
      self._sanitize("instahyde")
    with pytest.raises(ValueError, match="takes no parameter"):
      self._sanitize("random", param=4)
    with pytest.raises(ValueError, match="needs a parameter"):
      self._sanitize("instahide")
    for k in (1, 2.5, True, "4"):
      with pytest.raises(ValueError, match="k must be an integer >= 2"):
        self._sanitize("instahide", param=k)
    for sigma in (-1, float("nan"), float("inf"), "5"):
      with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        self._sanitize("dp_merf", param=sigma)
    with pytest.raises(ValueError, match="num_features must be a positive even integer"):
      baselines.DPMERFConfig(num_features=101)

  def test_bad_data(self):
    nan = self.x.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 pixel values are NaN or infinite"):
      self._sanitize(x=nan)
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\]"):
      self._sanitize(x=self.x * 2)
    with pytest.raises(ValueError, match="float NHWC"):
      self._sanitize(x=self.x[..., 0])
    with pytest.raises(ValueError, match="labels must be integers of shape"):
      self._sanitize(y=self.y[:5])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
      self._sanitize(num_classes=3)
    with pytest.raises(ValueError, match="public images have shape"):
      self._sanitize("instahide", param=4, public_images=np.zeros((10, 4, 4, 1), np.float32))
    with pytest.raises(ValueError, match="needs at least 13 public images"):
      self._sanitize("instahide", param=15, public_images=np.zeros((3, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="need at least 2"):
      self._sanitize("instahide", x=self.x[:1], y=self.y[:1], param=4)

  def test_bad_keys(self):
    for key in (0, np.zeros(2, np.uint32), jax.random.split(jax.random.key(0), 2), jnp.zeros(3, jnp.uint32)):
      with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
        self._sanitize("random", key=key)
    self._sanitize("random", key=jax.random.PRNGKey(0))  # Raw uint32[2] keys are fine.
