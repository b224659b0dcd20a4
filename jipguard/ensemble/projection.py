"""Weight projections: a secret linear read-out of chosen kernels, and the regulariser that writes it.

A model carries a vector ``F`` (L numbers, e.g. +-1 bits) in its weights when ``X theta_sub``
reproduces it, where ``theta_sub`` (P numbers) is a fixed linear function of chosen kernels and
``X`` (L x P) a secret projection. Training adds ``mu * mean((F - X theta_sub)^2)`` to the task
loss (:class:`ProjectionPenalty`, the ``penalty`` of :class:`~jipguard.ensemble.EnsembleTrainer`);
extraction is ``X theta_sub`` (:func:`extract`). SecureMark-DL's fingerprints (Eq. 27,
``jipguard.fingerprint``) and the fingerprinted remote part of its privacy partitioning
(``jipguard.partition``) both use this form.

* ``theta_sub`` (:func:`theta_sub`): each chosen kernel averaged over its output channels (last
  axis), flattened, the kernels concatenated in path order. A convolution kernel
  (kh, kw, c_in, c_out) gives kh * kw * c_in numbers, a dense kernel (d_in, d_out) d_in.
* Kernels are chosen by a predicate on their path (:func:`layer_predicate`), so a model split
  into a local and a remote part selects its remote layers the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def path_name(path: tuple[Any, ...]) -> str:
  """A parameter's path (``jax.tree_util`` keys) as ``"Dense_0/kernel"``."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def layer_predicate(layers: Sequence[str]) -> Callable[[str], bool]:
  """A predicate on a parameter's path (``"Dense_0/kernel"``): a kernel of one of ``layers``
  (matched against any path component, so ``"Dense_1"`` also finds ``"remote/Dense_1/kernel"``)."""
  names = set(layers)
  return lambda path: path.endswith("/kernel") and any(part in names for part in path.split("/")[:-1])


def select_kernels(params: PyTree, predicate: Callable[[str], bool]) -> dict[str, jax.Array]:
  """The kernels whose path satisfies ``predicate``, by path, in path order.

  Raises:
    ValueError: No kernel matches.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = {path_name(p): leaf for p, leaf in flat if predicate(path_name(p))}
  if not chosen:
    raise ValueError(f"no kernel matches the chosen layers; the parameters are {[path_name(p) for p, _ in flat]}")
  return dict(sorted(chosen.items()))


def theta_sub(kernels: dict[str, jax.Array]) -> jax.Array:
  """Each kernel averaged over its output channels (last axis), flattened, concatenated: ``theta_P``."""
  return jnp.concatenate([jnp.mean(k, axis=-1).reshape(-1) for k in kernels.values()])


def theta_size(params: PyTree, predicate: Callable[[str], bool]) -> int:
  """P, the length of theta_sub."""
  return sum(int(np.prod(k.shape[:-1])) for k in select_kernels(params, predicate).values())


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectionPenalty:
  """``mu * MSE(F - X theta_sub(params))`` for ONE member: ``penalty(params, f_L)``.

  The ``penalty`` of ``ensemble.EnsembleTrainer``; hashed by identity, so one object serves a
  trainer's life and its epoch compiles once. X is a constant of the compiled program.

  Attributes:
    projection: X, L x P (secret).
    layers: The chosen layers (:func:`layer_predicate`).
    mu: The embedding weight.
  """

  projection: np.ndarray  # X, L x P (secret).
  layers: tuple[str, ...]  # Layers whose kernels carry F.
  mu: float  # Embedding weight.

  def __repr__(self) -> str:
    return f"{type(self).__name__}(layers={self.layers}, mu={self.mu}, shape={self.projection.shape})"

  def __call__(self, params: PyTree, f_L: jax.Array) -> jax.Array:
    theta = theta_sub(select_kernels(params, layer_predicate(self.layers)))
    return self.mu * jnp.mean((f_L - jnp.asarray(self.projection) @ theta) ** 2)


def extract(params: PyTree, projection: np.ndarray, layers: Sequence[str], *, members: bool = False) -> np.ndarray:
  """``F^ = X theta_sub`` of one model (numpy float64, length L), or of every member (M x L)
  when ``members`` (``params`` with a leading member axis).

  Raises:
    ValueError: The chosen layers' theta_sub does not match the projection's width.
  """
  kernels = select_kernels(params, layer_predicate(layers))
  x = np.asarray(projection, np.float64)
  flat = [np.asarray(k, np.float64).mean(-1).reshape((k.shape[0], -1) if members else (-1,)) for k in kernels.values()]
  theta = np.concatenate(flat, axis=-1)
  if theta.shape[-1] != x.shape[1]:
    raise ValueError(f"theta_sub has {theta.shape[-1]} entries, the projection takes {x.shape[1]}: wrong layers?")
  return theta @ x.T
