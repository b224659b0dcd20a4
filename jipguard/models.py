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
from jax import lax
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


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         **kwargs) -> jax.Array:
  """``lax.conv_general_dilated`` with a faster kernel gradient on XLA:CPU (``nn.Conv``'s hook).

  The models' convolutions call this instead of ``lax.conv_general_dilated``. On the CPU
  backend, a stride-1, undilated, ungrouped NHWC / HWIO convolution is
  :func:`conv_fast_kernel_grad`: the same forward and input gradient, and the kernel
  gradient as kh x kw matrix products instead of XLA:CPU's weight-gradient convolution,
  which runs at 6-25 GFLOP/s on this 2-core machine (3.5x slower than the product form
  for the CIFAR CNN's 32->32 layer, B=128). That slowness is YNNPACK's, which this jaxlib
  uses for convolutions by default: with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``
  XLA's own weight gradient is as fast, but other kernels got slower (``benchmarks/README.md``,
  "XLA:CPU's YNNPACK"). Every other case, and every other backend,
  is ``lax.conv_general_dilated`` unchanged. The forward values are bitwise the same;
  the kernel gradient agrees to float32 rounding (a different summation order).
  """
  plain = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                            lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                            precision=precision, **kwargs)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  ones = (None, (1, 1), [1, 1])
  if (jax.default_backend() != "cpu" or lhs.ndim != 4 or tuple(window_strides) != (1, 1)
      or lhs_dilation not in ones or rhs_dilation not in ones or feature_group_count != 1 or kwargs
      or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc):
    return plain()
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  return conv_fast_kernel_grad(lhs, rhs, tuple(tuple(int(p) for p in pair) for pair in padding), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_fast_kernel_grad(x_BxHxWxC: jax.Array, w_KHxKWxCxD: jax.Array,
                          padding: tuple[tuple[int, int], tuple[int, int]], precision=None) -> jax.Array:
  """Stride-1 NHWC / HWIO convolution whose kernel gradient is kh x kw matrix products.

  Forward and input gradient are XLA's. The kernel gradient
  ``dw[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j] dy[b, h, w]^T`` is computed on the padded
  input flattened to rows ``(b, h, w)``: shifting a row index by ``i * W_pad + j`` is
  the (i, j) tap for every valid output position at once (dy is zero-padded to the same
  grid, so the rows that wrap into the next image row or image meet zeros). Each tap is one
  ``(C x rows) @ (rows x D)`` product on a contiguous slice, looped with ``lax.map`` so
  the kh x kw products run one after another, each on all cores.
  """
  return _conv_nhwc(x_BxHxWxC, w_KHxKWxCxD, padding, precision)


def _conv_nhwc(x, w, padding, precision):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=precision)


def _conv_fwd(x, w, padding, precision):
  return _conv_nhwc(x, w, padding, precision), (x, w)


def _conv_bwd(padding, precision, residuals, dy_BxHoxWoxD):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _conv_nhwc(x, w, padding, precision), x)
  (dx,) = input_vjp(dy_BxHoxWoxD)
  kh, kw, c, d = w.shape
  b, ho, wo, _ = dy_BxHoxWoxD.shape
  x_pad = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  hp, wp = x_pad.shape[1:3]
  rows = b * hp * wp
  x_rows = x_pad.reshape(rows, c)
  # dy on the padded grid (top-left aligned), so row r of dy meets row r + shift of x.
  dy_rows = jnp.pad(dy_BxHoxWoxD, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(rows, d)
  n = rows - ((kh - 1) * wp + kw - 1)
  dy_rows = dy_rows[:n]
  shifts = jnp.array([i * wp + j for i in range(kh) for j in range(kw)], jnp.int32)
  tap = lambda s: lax.dot_general(lax.dynamic_slice_in_dim(x_rows, s, n), dy_rows, (((0,), (0,)), ((), ())),
                                  precision=precision)
  dw = lax.map(tap, shifts).reshape(kh, kw, c, d)
  return dx, dw.astype(w.dtype)


conv_fast_kernel_grad.defvjp(_conv_fwd, _conv_bwd)

# ``nn.Conv`` (same parameters, same names) with the kernel gradient above on CPU.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def conv_layer(fast_kernel_grad: bool) -> Callable[..., nn.Module]:
  """:data:`Conv`, or plain ``nn.Conv`` where forward-mode autodiff is needed.

  ``jax.custom_vjp`` functions support reverse mode only: ``jax.jvp`` / ``jax.jacfwd`` through
  a model built with :data:`Conv` raise ``TypeError: can't apply forward-mode autodiff (jvp)
  to a custom_vjp function``. The conv models take ``fast_kernel_grad=False`` for that.
  """
  return Conv if fast_kernel_grad else nn.Conv


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
    fast_kernel_grad: Convolutions with the CPU kernel gradient of :func:`conv_general_dilated`
      (False: plain ``nn.Conv``, for forward-mode autodiff; see :func:`conv_layer`).
  """

  num_classes: int = 10
  widths: Sequence[int] = (32, 64)
  dense: int = 512
  conv_dropout: float = 0.25
  dense_dropout: float = 0.5
  fast_kernel_grad: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    for width in self.widths:
      for _ in range(2):
        x = nn.relu(norm()(conv_layer(self.fast_kernel_grad)(width, (3, 3), use_bias=False)(x)))
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
  fast_kernel_grad: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    conv = conv_layer(self.fast_kernel_grad)
    y = conv(self.width, (3, 3), (self.strides, self.strides), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = conv(self.width, (3, 3), use_bias=False)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.width or self.strides != 1:
      x = conv(self.width, (1, 1), (self.strides, self.strides), use_bias=False)(x)
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
    fast_kernel_grad: As in :class:`CNN`.
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (1, 1, 1)
  widths: Sequence[int] = (16, 32, 64)
  fast_kernel_grad: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = conv_layer(self.fast_kernel_grad)(self.widths[0], (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(width, strides, self.fast_kernel_grad)(x, train=train)
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
  one matrix product (``ensemble.SharedInputMembers``)."""
  return "Dense_0" if isinstance(model, MLP) else None


def param_count(model: nn.Module, image_shape: Sequence[int]) -> int:
  """Number of trainable parameters of ``model`` on images of ``image_shape`` (HWC)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
  return sum(int(jnp.prod(jnp.array(leaf.shape))) for leaf in jax.tree.leaves(shapes["params"]))
