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


CONV_IMPLS = ("auto", "xla", "xla_barrier", "patches")


def resolve_conv_impl(impl: str, kernel_size: Sequence[int] = (3, 3)) -> str:
  """``impl`` (one of :data:`CONV_IMPLS`) with ``auto`` resolved for this process's backend and
  a ``kernel_size`` kernel: on CPU ``patches`` for a 1x1 kernel and ``xla_barrier`` otherwise;
  ``xla`` on other backends.

  On XLA:CPU (2 shared cores) the kernel gradient of a 1x1 stride-2 convolution as a strided
  slice and one product took a third of the library convolution's time (no transposes, no
  dilated convolution), and a ResNet-8 training step with its shortcuts so was ~9% faster
  (186 vs 204 ms, B=128), while a 3x3 kernel's patches (9x the activations, for 16-64 channels)
  made the ResNet-8 and CNN steps 1.4-1.9x slower than Eigen's convolutions: those layers are
  memory-bound there. ``xla_barrier`` is the library convolution whose kernel gradient
  transposes a stored activation instead of recomputing it (:func:`conv_xla_barrier`): the
  ResNet-8 and CNN training steps ~20% faster (``benchmarks/README.md``, "Patch-GEMM
  convolutions" and "Materialised kernel-gradient transposes").

  Raises:
    ValueError: ``impl`` is not one of :data:`CONV_IMPLS`.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "auto":
    if jax.default_backend() != "cpu":
      return "xla"
    return "patches" if tuple(kernel_size) == (1, 1) else "xla_barrier"
  return impl


def conv_xla_barrier(
  x_BxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, strides: Sequence[int], padding: str = "SAME"
) -> jax.Array:
  """``lax.conv_general_dilated`` (NHWC, HWIO) of ``x`` behind ``lax.optimization_barrier``.

  The same function, forward and both gradients (the barrier is an identity; tested). What it
  changes is XLA:CPU's program: the kernel gradient there is a convolution with batch and
  features swapped, so it transposes the input, NHWC to CHWN. Without the barrier XLA fuses the
  input's producer (batch norm, ReLU, the residual sum) into that transpose and recomputes it
  in the transpose's order, ~10x slower than transposing the stored tensor (128x32x32x16: 16-21
  vs 2 ms); with it, the transpose reads the activation the forward stored. XLA:CPU removes
  barriers by default (its ``cse_barrier_expander`` pass): the ensemble's training programs
  of conv models keep them (``ensemble._cpu.CPU_CONV_OPTIONS``); elsewhere this is ``xla``.
  """
  x_BxHxWxC = jax.lax.optimization_barrier(x_BxHxWxC)
  return jax.lax.conv_general_dilated(
    x_BxHxWxC, kernel_HxWxIxO, tuple(strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def conv_patches(
  x_BxHxWxC: jax.Array, kernel_HxWxIxO: jax.Array, strides: Sequence[int], padding: str = "SAME"
) -> jax.Array:
  """A 2-D convolution (NHWC, HWIO) as patch extraction plus ONE matrix product.

  The kh x kw shifted, strided views of the padded input are concatenated along channels
  into ``(B, H', W', kh*kw*C)`` patches, (i, j, c) in the order of ``kernel.reshape(-1, O)``,
  and contracted with the kernel in one ``dot_general``. Equals ``lax.conv_general_dilated``
  with the same strides and padding (tested to float tolerance, forward and both gradients).
  Its derivatives are a matrix product each (kernel: patches^T @ grad; input: grad @ kernel^T,
  scattered back by the transposes of the slices, i.e. pads and adds), so, unlike XLA:CPU's
  convolutions, it has no transposes in its kernel gradient and, under ``vmap`` over stacked
  members, it is a batched matrix product rather than a grouped convolution. It writes kh*kw
  copies of the input, so it is memory-bound where channels are few (see
  :func:`resolve_conv_impl`). A 1x1 kernel is a strided slice and one product.
  """
  kh, kw, c, o = kernel_HxWxIxO.shape
  sh, sw = strides
  _, h, w, _ = x_BxHxWxC.shape
  (pt, pb), (pl, pr) = jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), padding)
  oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if pt or pb or pl or pr else x_BxHxWxC
  views = [
    jax.lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))
    for i in range(kh)
    for j in range(kw)
  ]
  patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
  return jax.lax.dot_general(patches, kernel_HxWxIxO.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())))


class Conv(nn.Module):
  """A bias-free 2-D convolution (``nn.Conv``'s parameters: ``kernel`` HWIO, same init), with
  the lowering chosen per backend.

  ``conv_impl``: ``xla`` is ``lax.conv_general_dilated`` (what ``nn.Conv`` runs);
  ``xla_barrier`` is :func:`conv_xla_barrier`; ``patches`` is :func:`conv_patches`; ``auto``
  (default) picks per backend and kernel size (:func:`resolve_conv_impl`). All compute the same
  function (tested); the parameter tree is ``nn.Conv``'s, so checkpoints do not depend on the
  choice.

  Attributes:
    features: Output channels O.
    kernel_size: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: ``SAME`` or ``VALID``.
    conv_impl: One of :data:`CONV_IMPLS`.
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x_BxHxWxC.shape[-1], self.features))
    kernel = kernel.astype(x_BxHxWxC.dtype)
    impl = resolve_conv_impl(self.conv_impl, self.kernel_size)
    if impl == "patches":
      return conv_patches(x_BxHxWxC, kernel, self.strides, self.padding)
    if impl == "xla_barrier":
      return conv_xla_barrier(x_BxHxWxC, kernel, self.strides, self.padding)
    return jax.lax.conv_general_dilated(
      x_BxHxWxC, kernel, tuple(self.strides), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def dense_relu_layers(x_BxD: jax.Array, hidden: Sequence[int], dropout: float, train: bool) -> jax.Array:
  """``Dense -> ReLU (-> Dropout)`` per width of ``hidden``, called inside a compact module
  (whose ``Dense_0``, ``Dense_1``, ... they become): the hidden layers of :class:`MLP` and of
  its split halves (``jipguard.partition.split``)."""
  for width in hidden:
    x_BxD = nn.relu(nn.Dense(width)(x_BxD))
    if dropout > 0:
      x_BxD = nn.Dropout(dropout, deterministic=not train)(x_BxD)
  return x_BxD


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
    x = dense_relu_layers(x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1), self.hidden, self.dropout, train)
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
    conv_impl: How the convolutions lower (:class:`Conv`; one of :data:`CONV_IMPLS`).
  """

  num_classes: int = 10
  widths: Sequence[int] = (32, 64)
  dense: int = 512
  conv_dropout: float = 0.25
  dense_dropout: float = 0.5
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    for width in self.widths:
      for _ in range(2):
        x = nn.relu(norm()(Conv(width, (3, 3), conv_impl=self.conv_impl)(x)))
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
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    y = Conv(self.width, (3, 3), (self.strides, self.strides), conv_impl=self.conv_impl)(x)
    y = nn.relu(norm()(y))
    y = Conv(self.width, (3, 3), conv_impl=self.conv_impl)(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != self.width or self.strides != 1:
      x = Conv(self.width, (1, 1), (self.strides, self.strides), conv_impl=self.conv_impl)(x)
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
    conv_impl: How the convolutions lower (:class:`Conv`; one of :data:`CONV_IMPLS`).
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (1, 1, 1)
  widths: Sequence[int] = (16, 32, 64)
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = Conv(self.widths[0], (3, 3), conv_impl=self.conv_impl)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(width, strides, self.conv_impl)(x, train=train)
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
