"""Splitting a network at a named layer into a local and a remote part.

Two families split here: the fully connected ``models.MLP`` (the MNIST setting) and the staged
conv nets :class:`ConvNet` of the LFW and CIFAR-10 settings (section VI-A2).

``models.MLP(hidden=(900,) * 4)`` is the paper's MNIST network (section VI-A1: five ReLU
layers, 900 hidden units; ``paper_mlp``). Its dense layers are ``Dense_0 ... Dense_4``.
Splitting at ``"Dense_1"`` (the last local layer; the paper keeps the first two local) gives

* the local part ``f_l`` (:class:`LocalMLP`): flatten, ``Dense_0 .. Dense_1``, each with its
  ReLU and dropout; its output is the hidden state H (one 900-vector per image);
* the remote part ``f_r`` (:class:`RemoteMLP`): the remaining hidden layers and the output
  layer, renamed from ``Dense_0`` on.

A :class:`ConvNet` is a chain of stages, each convolutions then a max pool; stage i is the
submodule ``pool{i}`` and its output the paper's partition point ``pool_i``. Splitting at
``"pool2"`` gives the same module restricted to stages 1-2 (local, its output the hidden state
``h_BxHxWxC``) and to stages 3.. and the dense head (remote). Both keep the unsplit model's
submodule names, so the variables (``params`` and ``batch_stats``) split by name.

* :func:`lfw_cnn`: the LFW network (conv 8x8 x2, pool1 4x4, conv 5x5 x2, pool2 3x3, conv 5x5 x2,
  pool3 3x3, conv 5x5 x2, pool 3x3, dense 800, dropout, dense 800); every conv followed by ReLU
  and batch norm, as printed. Channels are not printed: ``(16, 32, 64, 128) * width``. Pools
  have stride 2 and SAME padding (with stride = window a 64x64 LFW face would be 1x1 before
  the fourth pool).
* :func:`vgg19_bn`: VGG-19 with batch norm (conv 3x3 -> BN -> ReLU; 2-2-4-4-4 convs of
  64-128-256-512-512 channels, 2x2 pools) and the CIFAR-10 head ``Dense(num_classes)`` on the
  512-vector; ``width`` multiplies every channel count (a smoke run uses 1/8).

Guarantee (tests/partition/test_split.py): ``f_r(f_l(x)) == f(x)`` bit for bit, with the
variables split by :func:`split_variables` (:func:`split_params` for an MLP's params; the same
operations in the same order), and :func:`merge_variables` inverts it.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jipguard import models

PyTree = Any
PAPER_HIDDEN = (900, 900, 900, 900)  # Five dense layers: four hidden of 900 units, then the output.
PAPER_SPLIT = "Dense_1"  # The first two layers are local (section VI-A1).
PAPER_DROPOUT = 0.15  # Dropout probability of section VI-A1.


def paper_mlp(num_classes: int = 10, dropout: float = PAPER_DROPOUT) -> models.MLP:
  """The paper's MNIST network as a jipguard ``models.MLP``."""
  return models.MLP(num_classes=num_classes, hidden=PAPER_HIDDEN, dropout=dropout)


class LocalMLP(nn.Module):
  """The first ``len(hidden)`` layers of a ``models.MLP``: images -> hidden state ``h_BxD``."""

  hidden: Sequence[int]  # Widths of the local layers.
  dropout: float = 0.0  # Dropout after each layer in training mode (as models.MLP).

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    return models.dense_relu_layers(x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1), self.hidden, self.dropout, train)


class RemoteMLP(nn.Module):
  """The rest of a ``models.MLP``: hidden state ``h_BxD`` -> logits."""

  num_classes: int  # Number of output logits.
  hidden: Sequence[int]  # Widths of the remote hidden layers (may be empty).
  dropout: float = 0.0  # Dropout after each hidden layer in training mode.

  @nn.compact
  def __call__(self, h_BxD: jax.Array, train: bool = False) -> jax.Array:
    x = models.dense_relu_layers(h_BxD, self.hidden, self.dropout, train)  # Dense_0 ... first,
    return nn.Dense(self.num_classes)(x)  # then the output layer, as in models.MLP.


# A conv stage: (channels of each conv, conv kernel size, pool window).
Stage = tuple[tuple[int, ...], int, int]


class ConvStage(nn.Module):
  """Convolutions (each with ReLU and batch norm) then a max pool of stride 2."""

  stage: Stage  # (channels per conv, kernel, pool window).
  norm_first: bool  # conv -> BN -> ReLU (VGG) instead of conv -> ReLU -> BN (the LFW CNN as printed).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    widths, kernel, pool = self.stage
    for width in widths:
      x = models.Conv(width, (kernel, kernel))(x)  # Bias-free: batch norm follows.
      norm = nn.BatchNorm(use_running_average=not train, momentum=0.9)
      x = nn.relu(norm(x)) if self.norm_first else norm(nn.relu(x))
    if pool == 2:
      return models.max_pool(x, 2)
    return nn.max_pool(x, (pool, pool), strides=(2, 2), padding="SAME")


class ConvNet(nn.Module):
  """Conv stages ``pool1, pool2, ...`` then dense layers ``Dense_0 ..`` and the output layer.

  ``start`` / ``stop`` restrict the module to stages ``[start, stop)``; the dense head runs only
  when ``stop`` is None. The unrestricted module is the whole network; a split's local and remote
  parts are restrictions with the same submodule names.

  Attributes:
    stages: The conv stages.
    dense: Widths of the hidden dense layers (each ReLU, then dropout).
    num_classes: Number of output logits.
    dropout: Dropout after each hidden dense layer in training mode.
    norm_first: Conv -> BN -> ReLU instead of conv -> ReLU -> BN.
    start: First stage applied.
    stop: One past the last stage applied; None: every stage and the head.
  """

  stages: tuple[Stage, ...]
  dense: tuple[int, ...] = ()
  num_classes: int = 10
  dropout: float = 0.0
  norm_first: bool = True
  start: int = 0
  stop: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    last = len(self.stages) if self.stop is None else self.stop
    for i in range(self.start, last):
      x = ConvStage(self.stages[i], self.norm_first, name=f"pool{i + 1}")(x, train)
    if self.stop is not None:
      return x
    x = x.reshape(x.shape[0], -1)
    for j, width in enumerate(self.dense):
      x = nn.relu(nn.Dense(width, name=f"Dense_{j}")(x))
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name=f"Dense_{len(self.dense)}")(x)


def _scale(widths: Sequence[int], width: float) -> tuple[int, ...]:
  return tuple(max(1, round(c * width)) for c in widths)


LFW_DROPOUT = 0.2  # "dropout(0.8)" read as keep-probability 0.8 (TensorFlow 1's argument).


def lfw_cnn(num_classes: int, width: float = 1.0, dropout: float = LFW_DROPOUT) -> ConvNet:
  """The LFW network of section VI-A2 (channels ``(16, 32, 64, 128) * width``; module docstring)."""
  c = _scale((16, 32, 64, 128), width)
  stages = (((c[0],) * 2, 8, 4), ((c[1],) * 2, 5, 3), ((c[2],) * 2, 5, 3), ((c[3],) * 2, 5, 3))
  return ConvNet(stages=stages, dense=(800, 800), num_classes=num_classes, dropout=dropout, norm_first=False)


def vgg19_bn(num_classes: int, width: float = 1.0) -> ConvNet:
  """VGG-19 with batch norm for 32x32 images (``width`` multiplies every channel count)."""
  c = _scale((64, 128, 256, 512, 512), width)
  stages = tuple(((w,) * n, 3, 2) for w, n in zip(c, (2, 2, 4, 4, 4)))
  return ConvNet(stages=stages, num_classes=num_classes, norm_first=True)


ARCHS = ("mlp", "lfw_cnn", "vgg19_bn")  # Architectures that split here.
SPLIT_POINTS = {"mlp": PAPER_SPLIT, "lfw_cnn": "pool2", "vgg19_bn": "pool2"}  # The paper's default split of each.


def build(
  arch: str, num_classes: int, *, hidden: Sequence[int] = PAPER_HIDDEN, dropout: float | None = None, width: float = 1.0
) -> nn.Module:
  """The unsplit network ``arch`` of :data:`ARCHS` (``hidden`` for the MLP, ``width`` for conv nets).

  Raises:
    ValueError: Unknown ``arch``.
  """
  if arch == "mlp":
    return models.MLP(
      num_classes=num_classes, hidden=tuple(hidden), dropout=PAPER_DROPOUT if dropout is None else dropout
    )
  if arch == "lfw_cnn":
    return lfw_cnn(num_classes, width, LFW_DROPOUT if dropout is None else dropout)
  if arch == "vgg19_bn":
    return vgg19_bn(num_classes, width)
  raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


@dataclasses.dataclass(frozen=True)
class Split:
  """A network split after its layer ``Dense_{k-1}`` (MLP) or its stage ``pool{k}`` (ConvNet).

  Attributes:
    local: The local part f_l (run by every data owner).
    remote: The remote part f_r (run by the server).
    num_local: k, the number of local dense layers or conv stages.
  """

  local: nn.Module  # f_l.
  remote: nn.Module  # f_r.
  num_local: int  # Local dense layers Dense_0 .. Dense_{k-1}, or stages pool1 .. pool{k}.

  @property
  def is_conv(self) -> bool:
    return isinstance(self.local, ConvNet)


def split_model(model: nn.Module, at: str = PAPER_SPLIT) -> Split:
  """Splits ``model`` after the dense layer (MLP: ``"Dense_1"``, two local layers) or the conv
  stage (ConvNet: ``"pool2"``) named ``at``.

  Raises:
    ValueError: ``model`` is neither a ``models.MLP`` nor a :class:`ConvNet`, or ``at`` is not
      one of its hidden layers / stages (naming the choices).
  """
  if isinstance(model, ConvNet):
    names = [f"pool{i + 1}" for i in range(len(model.stages))]
    if at not in names:
      raise ValueError(f"split point {at!r} is not a stage of the conv net; choose one of {names}")
    k = names.index(at) + 1
    return Split(local=model.clone(stop=k), remote=model.clone(start=k), num_local=k)
  if not isinstance(model, models.MLP):
    raise ValueError(f"only models.MLP and ConvNet split here, got {type(model).__name__}")
  names = [f"Dense_{i}" for i in range(len(model.hidden))]
  if at not in names:
    raise ValueError(f"split layer {at!r} is not a hidden layer of the MLP; choose one of {names}")
  k = names.index(at) + 1
  hidden = tuple(model.hidden)
  return Split(
    local=LocalMLP(hidden=hidden[:k], dropout=model.dropout),
    remote=RemoteMLP(num_classes=model.num_classes, hidden=hidden[k:], dropout=model.dropout),
    num_local=k,
  )


def split_params(params: PyTree, num_local: int) -> tuple[PyTree, PyTree]:
  """``(local_params, remote_params)`` of an MLP's ``params`` (remote layers renumbered from 0)."""
  index = {int(name.split("_")[1]): v for name, v in params.items()}
  local = {f"Dense_{i}": v for i, v in index.items() if i < num_local}
  remote = {f"Dense_{i - num_local}": v for i, v in index.items() if i >= num_local}
  return local, remote


def merge_params(local: PyTree, remote: PyTree) -> PyTree:
  """The unsplit MLP's params of a local and a remote part (inverse of :func:`split_params`)."""
  k = len(local)
  return {**local, **{f"Dense_{int(name.split('_')[1]) + k}": v for name, v in remote.items()}}


def split_variables(split: Split, variables: PyTree) -> tuple[PyTree, PyTree]:
  """``(local_variables, remote_variables)`` of the unsplit model's Flax variables (every
  collection: ``params``, ``batch_stats``)."""
  if not split.is_conv:
    parts = {c: split_params(v, split.num_local) for c, v in variables.items()}
    return {c: p[0] for c, p in parts.items()}, {c: p[1] for c, p in parts.items()}
  local_names = {f"pool{i + 1}" for i in range(split.num_local)}
  local = {c: {n: v for n, v in tree.items() if n in local_names} for c, tree in variables.items()}
  remote = {c: {n: v for n, v in tree.items() if n not in local_names} for c, tree in variables.items()}
  return local, remote


def merge_variables(split: Split, local: PyTree, remote: PyTree) -> PyTree:
  """The unsplit model's variables (inverse of :func:`split_variables`)."""
  if not split.is_conv:
    return {c: merge_params(local[c], remote[c]) for c in local}
  return {c: {**local[c], **remote[c]} for c in local}


def as_variables(tree: PyTree) -> PyTree:
  """Flax variables of a tree that is either variables already or an MLP's bare ``params``."""
  return tree if "params" in tree else {"params": tree}


def compose(split: Split, local: PyTree, remote: PyTree, x_BxHxWxC: jax.Array) -> jax.Array:
  """``f_r(f_l(x))`` in inference mode: ``logits_BxK`` (``local`` / ``remote``: variables, or an
  MLP's bare params)."""
  h = split.local.apply(as_variables(local), x_BxHxWxC)
  return split.remote.apply(as_variables(remote), h)


def hidden_shape(split: Split, image_shape: Sequence[int]) -> tuple[int, ...]:
  """The shape of one image's hidden state (``(D,)`` or ``(H, W, C)``)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(split.local.init, jax.random.key(0), x)
  return jax.eval_shape(split.local.apply, shapes, x).shape[1:]
