"""Tests for the papers' architectures."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jipguard import models


@pytest.mark.parametrize(
  "name,shape,count",
  [
    ("mlp", (28, 28, 1), 269_322),  # 784-256-256-10
    ("mlp", (8, 8, 1), 85_002),
    ("cnn", (32, 32, 3), 2_168_554),
    ("resnet8", (32, 32, 3), 78_042),
    ("resnet20", (32, 32, 3), 272_474),
  ],
)
def test_documented_parameter_counts(name, shape, count):
  model = models.get_model(name, 10)
  assert models.param_count(model, shape) == count
  assert f"{count:,}" in models.__doc__


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_logits_shape_and_train_mode(name):
  model = models.get_model(name, 7)
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  variables = model.init(jax.random.key(1), x)
  logits = model.apply(variables, x)
  assert logits.shape == (4, 7)
  assert bool(jnp.all(jnp.isfinite(logits)))
  out, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
  assert out.shape == (4, 7)
  if "batch_stats" in variables:  # Training mode updates the running statistics.
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not jnp.allclose(a, b) for a, b in zip(before, after))


def test_cnn_dropout_depends_on_key():
  model = models.get_model("cnn", 10)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  run = lambda k: model.apply(variables, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"])[0]
  assert not jnp.allclose(run(jax.random.key(2)), run(jax.random.key(3)))
  assert jnp.allclose(run(jax.random.key(2)), run(jax.random.key(2)))


def test_unknown_model():
  with pytest.raises(ValueError, match="unknown model 'vgg'"):
    models.get_model("vgg", 10)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 4)])  # (7, 9): a trailing row / column dropped.
def test_max_pool_equals_flax_forward_and_gradient(shape):
  x = jax.random.normal(jax.random.key(0), shape)  # Continuous: no tied maxima.
  flax_pool = lambda a: nn.max_pool(a, (2, 2), strides=(2, 2))
  assert models.max_pool(x).shape == flax_pool(x).shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
  assert jnp.array_equal(models.max_pool(x), flax_pool(x))
  cotangent = jax.random.normal(jax.random.key(1), flax_pool(x).shape)
  grad = lambda pool: jax.grad(lambda a: jnp.sum(pool(a) * cotangent))(x)
  assert jnp.array_equal(grad(models.max_pool), grad(flax_pool))
  tangent = jax.random.normal(jax.random.key(2), x.shape)  # Forward mode works too (a custom JVP).
  assert jnp.array_equal(jax.jvp(models.max_pool, (x,), (tangent,))[1], jax.jvp(flax_pool, (x,), (tangent,))[1])


def test_max_pool_splits_the_gradient_of_tied_maxima():
  x = jnp.array([[1.0, 1.0], [0.0, -1.0]]).reshape(1, 2, 2, 1)
  grad = jax.grad(lambda a: models.max_pool(a).sum())(x)
  assert jnp.array_equal(grad[0, :, :, 0], jnp.array([[0.5, 0.5], [0.0, 0.0]]))
