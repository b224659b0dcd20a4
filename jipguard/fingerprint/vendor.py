"""The vendor's operations on models: per-customer copies as one ensemble, and the attacks.

* :func:`embed`: fine-tunes one copy per customer from ONE base model, all copies one stacked
  ensemble (``ensemble.EnsembleTrainer`` with :class:`embedding.Penalty`: one jitted program,
  the regulariser vmapped over customers). Copies from one base stay aligned, so an average of
  copies is still a working model and the averaging attack is meaningful.
* :func:`average`: the averaging collusion attack (parameters of a coalition averaged).
* :func:`prune`: magnitude pruning of the fingerprinted layers (the smallest alpha of weights
  set to zero), and :func:`masks` to keep them zero while the pruned model is fine-tuned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jipguard import ensemble
from jipguard.fingerprint import embedding

PyTree = Any


def stack_copies(state: ensemble.EnsembleState, m: int) -> ensemble.EnsembleState:
  """Member 0 of ``state`` repeated ``m`` times (every customer starts from the same base)."""
  return jax.tree.map(lambda a: jnp.repeat(a[:1], m, axis=0), state)


def embed(
  trainer: ensemble.EnsembleTrainer,
  base: ensemble.EnsembleState,
  fingerprints_MxL: np.ndarray,
  keys_M: jax.Array,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  epochs: int,
  **fit_kwargs: Any,
) -> ensemble.FitResult:
  """Fine-tunes one copy of ``base`` (member 0) per fingerprint, all as one ensemble.

  Args:
    trainer: An ``EnsembleTrainer`` whose ``penalty`` is an :class:`embedding.Penalty`.
    base: The base model (its member 0).
    fingerprints_MxL: One fingerprint per customer (:func:`embedding.fingerprint_vector`).
    keys_M: One PRNG key per customer (its batches' order).
    images, labels: The training data.
    epochs: Fine-tuning epochs.
    **fit_kwargs: Passed to ``trainer.fit`` (checkpoint, eval_data, progress, ...).

  Raises:
    ValueError: The trainer has no :class:`embedding.Penalty`, or shapes disagree.
  """
  if not isinstance(trainer.penalty, embedding.Penalty):
    raise ValueError("embed needs a trainer whose penalty is an embedding.Penalty")
  f = np.asarray(fingerprints_MxL, np.float32)
  if f.ndim != 2 or f.shape[1] != trainer.penalty.projection.shape[0] or f.shape[0] != keys_M.shape[0]:
    raise ValueError(
      f"fingerprints must be ({keys_M.shape[0]}, {trainer.penalty.projection.shape[0]}) (customers x L), got {f.shape}"
    )
  return trainer.fit(
    keys_M, images, labels, epochs=epochs, init_state=stack_copies(base, f.shape[0]), penalty_data=f, **fit_kwargs
  )


def average(tree_M: PyTree, coalition: Sequence[int] | np.ndarray) -> PyTree:
  """The averaging attack: the mean over the coalition's members (the member axis kept, size 1)."""
  idx = jnp.asarray(np.asarray(coalition, np.int32))
  return jax.tree.map(lambda a: jnp.mean(a[idx], axis=0, keepdims=True), tree_M)


def masks(params: PyTree, layers: Sequence[str], alpha: float) -> PyTree:
  """Per leaf, 1 where a weight survives magnitude pruning of ``alpha`` of each chosen kernel
  (per member: the smallest |w| of each member's kernel go), 1 everywhere else.

  Raises:
    ValueError: alpha outside [0, 1).
  """
  if not 0.0 <= alpha < 1.0:
    raise ValueError(f"alpha must be in [0, 1), got {alpha}")
  chosen = embedding.layer_predicate(layers)

  def mask(path, a):
    if not chosen(embedding.path_name(path)):
      return jnp.ones_like(a)
    flat = jnp.abs(a).reshape(a.shape[0], -1)
    cut = jnp.quantile(flat, alpha, axis=1, method="lower")
    return (jnp.abs(a) > cut.reshape((-1,) + (1,) * (a.ndim - 1))).astype(a.dtype) if alpha > 0 else jnp.ones_like(a)

  return jax.tree_util.tree_map_with_path(mask, params)


def prune(params: PyTree, layers: Sequence[str], alpha: float) -> PyTree:
  """Magnitude pruning (the paper's [50]): the smallest ``alpha`` of each chosen kernel's weights
  set to zero, per member (leading member axis)."""
  return jax.tree.map(jnp.multiply, params, masks(params, layers, alpha))


def masked(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` whose updates are multiplied by the parameters' pruning mask (zero weights stay zero):
  sparse fine-tuning. The mask is the kernels' non-zero pattern at ``init`` (biases, whose
  zeros are their initial value, are not masked)."""

  def keep(path, p):
    return (p != 0).astype(p.dtype) if embedding.path_name(path).endswith("kernel") else jnp.ones_like(p)

  def init(params):
    return (tx.init(params), jax.tree_util.tree_map_with_path(keep, params))

  def update(updates, state, params=None):
    inner, mask = state
    updates, inner = tx.update(updates, inner, params)
    return jax.tree.map(jnp.multiply, updates, mask), (inner, mask)

  return optax.GradientTransformation(init, update)
