"""Splitting a fully connected network at a named layer into a local and a remote part.

``models.MLP(hidden=(900,) * 4)`` is the paper's MNIST network (section VI-A1: five ReLU
layers, 900 hidden units; ``paper_mlp``). Its dense layers are ``Dense_0 ... Dense_4``.
Splitting at ``"Dense_1"`` (the last local layer; the paper keeps the first two local) gives

* the local part ``f_l`` (:class:`LocalMLP`): flatten, ``Dense_0 .. Dense_1``, each with its
  ReLU and dropout; its output is the hidden state H (one 900-vector per image);
* the remote part ``f_r`` (:class:`RemoteMLP`): the remaining hidden layers and the output
  layer, renamed from ``Dense_0`` on.

Guarantee (tests/partition/test_split.py): ``f_r(f_l(x)) == f(x)`` bit for bit, with the
parameters split by :func:`split_params` (the same operations in the same order), and
:func:`merge_params` inverts :func:`split_params`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax

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
    x = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return x


class RemoteMLP(nn.Module):
  """The rest of a ``models.MLP``: hidden state ``h_BxD`` -> logits."""

  num_classes: int  # Number of output logits.
  hidden: Sequence[int]  # Widths of the remote hidden layers (may be empty).
  dropout: float = 0.0  # Dropout after each hidden layer in training mode.

  @nn.compact
  def __call__(self, h_BxD: jax.Array, train: bool = False) -> jax.Array:
    x = h_BxD
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class Split:
  """A ``models.MLP`` split after its layer ``Dense_{k-1}``.

  Attributes:
    local: The local part f_l (run by every data owner).
    remote: The remote part f_r (run by the server).
    num_local: k, the number of local dense layers.
  """

  local: LocalMLP  # f_l.
  remote: RemoteMLP  # f_r.
  num_local: int  # Local dense layers: Dense_0 .. Dense_{k-1}.


def split_model(model: models.MLP, at: str = PAPER_SPLIT) -> Split:
  """Splits ``model`` after the dense layer named ``at`` (``"Dense_1"``: two local layers).

  Raises:
    ValueError: ``model`` is not a ``models.MLP``, or ``at`` is not one of its hidden layers.
  """
  if not isinstance(model, models.MLP):
    raise ValueError(f"only models.MLP splits here, got {type(model).__name__}")
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


def compose(split: Split, local_params: PyTree, remote_params: PyTree, x_BxHxWxC: jax.Array) -> jax.Array:
  """``f_r(f_l(x))`` in inference mode: ``logits_BxK``."""
  h = split.local.apply({"params": local_params}, x_BxHxWxC)
  return split.remote.apply({"params": remote_params}, h)
