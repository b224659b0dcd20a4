"""The papers' architectures as functional Flax (linen) modules.

Every module maps a batch of NHWC images in [0, 1] (or any real values: IPProtect's
sanitized images are unbounded) to logits, and takes ``train`` to switch dropout and
batch norm between training and inference. Modules hold no state: parameters and
batch statistics are returned by ``init`` and passed to ``apply``, so N members of
one architecture are one pytree with a leading member axis (see ``ensemble.py``).

Parameter counts (checked in ``tests/test_models.py``):

=============  =====================  ===========
name           input                  parameters
=============  =====================  ===========
``mlp``        28x28x1, 10 classes      269,322
``mlp``        8x8x1, 10 classes         85,002
``cnn``        32x32x3, 10 classes    2,168,554
``resnet8``    32x32x3, 10 classes       78,042
``resnet20``   32x32x3, 10 classes      272,474
=============  =====================  ===========
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _windows(x_BxHxWxC: jax.Array, size: int) -> jax.Array:
  """``(B, H/s, s, W/s, s, C)`` view of the non-overlapping windows (trailing rows / columns dropped)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, : h // size * size, : w // size * size]
  return x.reshape(b, h // size, size, w // size, size, c)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool(x_BxHxWxC: jax.Array, size: int = 2) -> jax.Array:
  """Non-overlapping ``size`` x ``size`` max pooling, with an elementwise gradient.

  The forward is ``nn.max_pool(x, (s, s), strides=(s, s))`` (XLA's reduce-window; a
  trailing row or column that does not fill a window is dropped, as with VALID padding).
  The derivative is a custom JVP on the windows (``x == max`` as a mask), whose transpose
  is elementwise, instead of XLA's select-and-scatter, which on XLA:CPU took 10x longer
  (CIFAR CNN, B=128, the 32x32x32 pooling after a ReLU: 76 ms vs 8 ms, where select-and-
  scatter was ~20% of a member's training step). A reshape-and-max forward gives the same
  gradient without a custom rule, but ran the CNN's B=1,000 forward in 416 ms instead of
  341 ms (``benchmarks/README.md``). Where a window's maximum is tied, the derivative is
  split evenly over the tied entries (select-and-scatter gives it all to the first one);
  after a ReLU the common tie is at zero, where both are zero.
  """
  return nn.max_pool(x_BxHxWxC, (size, size), strides=(size, size))


@max_pool.defjvp
def _max_pool_jvp(size, primals, tangents):
  (x,), (t,) = primals, tangents
  y = max_pool(x, size)
  hit = (_windows(x, size) == y[:, :, None, :, None, :]).astype(t.dtype)
  share = hit / jnp.sum(hit, axis=(2, 4), keepdims=True)
  return y, jnp.sum(_windows(t, size) * share, axis=(2, 4))


class MLP(nn.Module):
  """IPProtect's MNIST / Fashion-MNIST network: a 3-layer ReLU DNN.

  The paper says "a simple 3 layer Deep Neural Network with relu activations";
  we read that as three dense layers, ``flatten -> 256 -> ReLU -> 256 -> ReLU ->
  num_classes`` (784-256-256-10 on 28x28 images, 269,322 parameters).

  Attributes:
    num_classes: Number of output logits.
    hidden: Widths of the hidden layers.
    dropout: Dropout on the hidden units in training mode (0 in the paper; IPProtect's
      robust sanitizer sets it on a clone of the sampled models).
  """

  num_classes: int = 10
  hidden: Sequence[int] = (256, 256)
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    x = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """IPProtect's CIFAR-10 network: 4 conv layers + 2 dense, batch norm, dropout, ReLU.

  ``[conv3x3(32) BN ReLU] x2 -> maxpool -> dropout(0.25) -> [conv3x3(64) BN ReLU] x2
  -> maxpool -> dropout(0.25) -> dense(512) ReLU -> dropout(0.5) -> dense(C)``.
  The paper gives only the layer counts; widths and rates are the classic Keras
  CIFAR-10 example's; convs have no bias (batch norm follows). 2,168,554 parameters on 32x32x3.

  Attributes:
    num_classes: Number of output logits.
    widths: Channels of the two conv blocks.
    dense: Width of the hidden dense layer.
    conv_dropout: Dropout after each conv block.
    dense_dropout: Dropout before the output layer.
  """

  num_classes: int = 10
  widths: Sequence[int] = (32, 64)
  dense: int = 512
  conv_dropout: float = 0.25
  dense_dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    for width in self.widths:
      for _ in range(2):
        x = nn.relu(norm()(nn.Conv(width, (3, 3), use_bias=False)(x)))
      x = max_pool(x)
      x = nn.Dropout(self.conv_dropout, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.dense)(x))
    x = nn.Dropout(self.dense_dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
  """Basic pre-activation-free ResNet block: conv-BN-ReLU-conv-BN + shortcut, ReLU."""

  width: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.width, (3, 3), (self.strides, self.strides), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.width or self.strides != 1:
      x = nn.Conv(self.width, (1, 1), (self.strides, self.strides), use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small CIFAR-style ResNet (He et al. 2016, section 4.2) for the watermark learner.

  ``conv3x3(16) BN ReLU -> stages of basic blocks (widths 16, 32, 64, stride 2 between
  stages) -> global average pool -> dense(C)``. ``stage_sizes=(3, 3, 3)`` is ResNet-20;
  ``(1, 1, 1)`` is ResNet-8, which trains in minutes on a CPU.

  Attributes:
    num_classes: Number of output logits.
    stage_sizes: Blocks per stage.
    widths: Channels per stage.
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (1, 1, 1)
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(width, strides)(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


MODELS: dict[str, Callable[..., nn.Module]] = {
  "mlp": MLP,
  "cnn": CNN,
  "resnet8": functools.partial(ResNet, stage_sizes=(1, 1, 1)),
  "resnet20": functools.partial(ResNet, stage_sizes=(3, 3, 3)),
}


def get_model(name: str, num_classes: int) -> nn.Module:
  """Returns the architecture called ``name`` with ``num_classes`` outputs.

  Raises:
    ValueError: ``name`` is not one of ``MODELS``.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  return MODELS[name](num_classes=num_classes)


def input_layer(model: nn.Module) -> str | None:
  """The name of the Dense layer that ``model`` applies first, to its flattened input
  (``MLP``: ``Dense_0``), or None for architectures that start otherwise.

  Members of an ensemble that see the same input can compute this layer for all of them as
  one matrix product (the ``shared_input`` layout of ``ensemble.prepare``)."""
  return "Dense_0" if isinstance(model, MLP) else None


def param_count(model: nn.Module, image_shape: Sequence[int]) -> int:
  """Number of trainable parameters of ``model`` on images of ``image_shape`` (HWC)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
  return sum(int(jnp.prod(jnp.array(leaf.shape))) for leaf in jax.tree.leaves(shapes["params"]))
