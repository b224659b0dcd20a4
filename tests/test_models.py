"""Tests for the papers' architectures."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jipguard import models
from jipguard.ensemble import _cpu


def _conv_options():
  """The options of the ensemble's conv training programs on CPU (Eigen convolutions,
  optimization barriers kept), so that each lowering is tested as it runs there."""
  return _cpu.CPU_CONV_OPTIONS if jax.default_backend() == "cpu" and _cpu._xla_takes_conv_options() else None


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


def _lax_conv(x, kernel, strides, padding="SAME"):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize(
  "hw,c,o,k,s",
  [
    (8, 1, 4, 3, 1),  # A 1-channel (Fashion-MNIST) stem.
    (8, 3, 16, 3, 1),  # The ResNet / CNN stem on colour images.
    (8, 16, 16, 3, 1),  # ResNet stage 1.
    (8, 16, 32, 3, 2),  # Stride-2 3x3: flax SAME pads (0, 1) on even sizes.
    (7, 16, 32, 3, 2),  # ... and (1, 1) on odd ones.
    (8, 16, 32, 1, 2),  # The 1x1 stride-2 shortcut.
    (7, 32, 64, 1, 2),
    (4, 64, 64, 3, 1),
  ],
)
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_patches_equals_lax_conv_forward_and_both_gradients(hw, c, o, k, s, padding):
  _assert_equals_lax_conv(models.conv_patches, hw, c, o, k, s, padding)


@pytest.mark.parametrize("hw,c,o,k,s", [(8, 3, 16, 3, 1), (8, 16, 16, 3, 1), (8, 16, 32, 3, 2), (7, 16, 32, 3, 2)])
def test_conv_xla_barrier_equals_lax_conv_forward_and_both_gradients(hw, c, o, k, s):
  """The 3x3 layers that take ``xla_barrier`` on CPU (the barrier is an identity: a few shapes)."""
  _assert_equals_lax_conv(models.conv_xla_barrier, hw, c, o, k, s, "SAME")


def _assert_equals_lax_conv(conv, hw, c, o, k, s, padding):
  kx, kk, kg = jax.random.split(jax.random.key(hw * c + o + k + s), 3)
  x = jax.random.normal(kx, (2, hw, hw, c))
  kernel = jax.random.normal(kk, (k, k, c, o)) / (k * k * c) ** 0.5
  g = jax.random.normal(kg, _lax_conv(x, kernel, (s, s), padding).shape)

  def forward_and_grads(conv, x, kernel, g):
    y, vjp = jax.vjp(lambda x, w: conv(x, w, (s, s), padding), x, kernel)
    return (y, *vjp(g))  # Output, input gradient, kernel gradient.

  want = jax.jit(forward_and_grads, static_argnums=0)(_lax_conv, x, kernel, g)
  program = jax.jit(forward_and_grads, static_argnums=0).lower(conv, x, kernel, g).compile(_conv_options())
  if conv is models.conv_xla_barrier and _conv_options():
    assert " opt-barrier(" in program.as_text()  # The barrier reaches XLA:CPU's program.
  got = program(x, kernel, g)
  assert got[0].shape == want[0].shape
  for a, b in zip(got, want):
    assert jnp.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_conv_patches_vmapped_over_stacked_members_equals_each_member():
  x = jax.random.normal(jax.random.key(0), (3, 2, 8, 8, 16))  # Member m's own batch.
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 16, 32))
  got = jax.jit(jax.vmap(lambda x, w: models.conv_patches(x, w, (2, 2))))(x, kernel)
  want = jax.jit(lambda x, w: jnp.stack([_lax_conv(x[m], w[m], (2, 2)) for m in range(3)]))(x, kernel)
  assert jnp.allclose(got, want, atol=1e-5)


def test_conv_has_nn_conv_parameters():
  x = jnp.zeros((1, 8, 8, 3))
  ref = nn.Conv(16, (3, 3), use_bias=False).init(jax.random.key(2), x)
  mine = models.Conv(16, (3, 3)).init(jax.random.key(2), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, ref, mine))


@pytest.mark.parametrize(
  "model",
  [
    models.CNN(widths=(4, 8), dense=16, conv_dropout=0.0, dense_dropout=0.0),
    models.ResNet(widths=(4, 8, 8)),  # Stride-2 3x3 convs and 1x1 shortcuts.
  ],
  ids=["cnn", "resnet8"],
)
def test_conv_impls_give_the_same_logits_and_gradients(model):
  x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
  y = jnp.arange(4)
  variables = model.init(jax.random.key(1), x)

  @functools.partial(jax.jit, static_argnums=1, compiler_options=_conv_options())
  def loss_and_grads(params, impl):
    def loss(params):
      logits, _ = model.clone(conv_impl=impl).apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), logits

    return jax.value_and_grad(loss, has_aux=True)(params)

  (_, want_logits), want_grads = loss_and_grads(variables["params"], "xla")
  for impl in ("patches", "xla_barrier", "auto"):
    (_, logits), grads = loss_and_grads(variables["params"], impl)
    assert jnp.allclose(logits, want_logits, atol=1e-4)
    assert jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, b, atol=1e-4, rtol=1e-3), grads, want_grads))


def test_resolve_conv_impl():
  cpu = jax.default_backend() == "cpu"
  assert models.resolve_conv_impl("auto", (1, 1)) == ("patches" if cpu else "xla")
  assert models.resolve_conv_impl("auto", (3, 3)) == ("xla_barrier" if cpu else "xla")
  assert models.resolve_conv_impl("xla", (3, 3)) == "xla"
  assert models.resolve_conv_impl("patches", (3, 3)) == "patches"
  with pytest.raises(ValueError, match="conv_impl"):
    models.resolve_conv_impl("im2col")
