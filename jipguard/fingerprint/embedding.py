"""Embedding fingerprints in weights (Eq. 27) and extracting them (section V).

Customer j's copy is fine-tuned with the loss ``l(y, f(x)) + mu * MSE(F_j - X theta_sub)``
(the read-out and the regulariser are the ground floor's ``jipguard.ensemble.projection``):

* ``theta_sub`` (:func:`theta_sub`): the chosen layers' kernels, each averaged over its output
  channels (last axis) and flattened, concatenated in path order. For a convolution kernel
  (kh, kw, c_in, c_out) that is the paper's "average over all channels" of an
  S x delta x eta tensor, giving kh * kw * c_in numbers; for a dense kernel (d_in, d_out) the
  same rule averages over the d_out units, giving d_in numbers (one per input). The layers are
  chosen by a predicate on the kernel's path (:func:`layer_predicate`), so a model split into a
  local and a remote part selects its remote layers the same way.
* ``X`` (L x P): the vendor's secret Gaussian projection, N(0, s^2) entries (:class:`Secret`).
  The paper does not give s. It sets how far the weights must move to carry F (~1 / s), how
  strongly the penalty pulls against the task loss (~s), and how much an attacker's weight
  changes move the extracted coefficients (~s): s = 4 fits ~3x faster than Uchida's s = 1
  (``PROJECTION_STD``) but loses the fingerprint to the paper's fine-tuning attack, which s = 1
  survives (docs/fingerprint.md).
* ``F_j`` (L): the customer's fingerprint (:func:`fingerprint_vector`): the community code's
  bits as +-1, then each codebook's identity code ``u = basis @ e`` (Eq. 26).

Extraction is linear: ``F^ = X theta_sub`` (:func:`extract`); each codebook's coefficients are
``e^ = basis^T u^`` and Eq. 30 thresholds them. Since theta_sub is linear in the weights, the
fingerprint of an average of models is the average of their fingerprints, however the copies
were trained; whether the averaged *model* still works depends on the copies staying aligned,
which they do when all are fine-tuned from one base (:func:`embed`).

All customers' copies are one stacked ensemble (``ensemble.EnsembleTrainer`` with this
module's :class:`Penalty`): one jitted program, one member per customer, the regulariser
vmapped with the members.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jipguard.ensemble.projection import (  # noqa: F401  (this module's API: Eq. 27's read-out)
  ProjectionPenalty,
  extract,
  layer_predicate,
  path_name,
  select_kernels,
  theta_size,
  theta_sub,
)
from jipguard.fingerprint import codes

PyTree = Any
PAPER_MU = 0.2  # The embedding weight mu of section VI-B.
PAPER_TAU = 0.85  # The hard threshold tau of Eq. 30.
PROJECTION_STD = 1.0  # Standard deviation of X's entries (the paper gives none; Uchida's 1).


@dataclasses.dataclass(frozen=True)
class Secret:
  """The vendor's secret, all drawn from one seed (kept with ``rundir.write_secret``).

  Attributes:
    seed: A 128-bit integer from ``secrets.randbits(128)``.
    length: L, the fingerprint's length.
    size: P, the length of theta_sub.
    code_lengths: v of each codebook (one orthonormal basis each).
  """

  seed: int  # Never printed or logged.
  length: int  # L.
  size: int  # P.
  code_lengths: tuple[int, ...]  # v per codebook.

  def __repr__(self) -> str:  # The seed stays out of logs and tracebacks.
    return f"Secret(length={self.length}, size={self.size}, code_lengths={self.code_lengths})"

  def _rng(self, stream: int) -> np.random.Generator:
    return np.random.default_rng([self.seed % 2**64, self.seed >> 64, stream])

  def projection(self, std: float = 1.0) -> np.ndarray:
    """X, L x P, N(0, std^2) entries (float32)."""
    return (std * self._rng(0).standard_normal((self.length, self.size))).astype(np.float32)

  def bases(self) -> tuple[np.ndarray, ...]:
    """One random orthonormal basis (v x v) per codebook."""
    return tuple(codes.random_basis(v, self._rng(1 + i)) for i, v in enumerate(self.code_lengths))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each part of the fingerprint sits: ``[crc_bits | book 1 | book 2 | ...]``.

  Attributes:
    crc_bits: Length of the community code (0: none).
    code_lengths: v of each codebook.
  """

  crc_bits: int  # The community relationship code's bits, embedded as +-1.
  code_lengths: tuple[int, ...]  # Each codebook's v coefficients.

  @property
  def length(self) -> int:
    return self.crc_bits + sum(self.code_lengths)

  def split(self, f_L: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(crc part, [each book's u part])`` of a fingerprint (last axis)."""
    f = np.asarray(f_L)
    cuts = np.cumsum([self.crc_bits, *self.code_lengths])[:-1]
    pieces = np.split(f, cuts, axis=-1)
    return pieces[0], pieces[1:]


def fingerprint_vector(
  e_L: np.ndarray, bases: Sequence[np.ndarray], layout: Layout, crc_bits: np.ndarray | None = None
) -> np.ndarray:
  """``F = (2 p - 1 || basis_1 e_1 || basis_2 e_2 ...)`` for one customer (float32, length L).

  Args:
    e_L: The customer's concatenated identity coefficients (``CombinedCodebook.e``).
    bases: One orthonormal basis per codebook.
    layout: The fingerprint's layout.
    crc_bits: The community code (``layout.crc_bits`` bits), or None when it has none.
  """
  cuts = np.cumsum(layout.code_lengths)[:-1]
  us = [codes.identity_codes(e, b) for e, b in zip(np.split(np.asarray(e_L), cuts), bases)]
  p = np.zeros(0) if crc_bits is None else 2.0 * np.asarray(crc_bits, np.float64) - 1.0
  if p.shape != (layout.crc_bits,):
    raise ValueError(f"the community code must have {layout.crc_bits} bits, got {p.shape}")
  return np.concatenate([p, *us]).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Penalty(ProjectionPenalty):
  """Eq. 27's regulariser ``mu * MSE(F_j - X theta_sub(params))`` for ONE member
  (:class:`jipguard.ensemble.projection.ProjectionPenalty` with the paper's mu by default)."""

  mu: float = PAPER_MU  # Embedding weight.


def coefficients(f_L: np.ndarray, bases: Sequence[np.ndarray], layout: Layout) -> tuple[np.ndarray, np.ndarray]:
  """``(crc_values, e_L)``: the community part as extracted (+-1 when intact) and every book's
  coefficients ``e = basis^T u`` concatenated (leading axes of ``f_L`` kept)."""
  crc, us = layout.split(f_L)
  return crc, np.concatenate([u @ b for u, b in zip(us, bases)], axis=-1)


def bit_error_rate(f_hat_L: np.ndarray, f_L: np.ndarray, bases: Sequence[np.ndarray], layout: Layout) -> np.ndarray:
  """Fraction of the fingerprint's bits read wrong: the community bits by sign, the identity
  coefficients by sign (e = +-1), over the last axis."""
  crc_hat, e_hat = coefficients(f_hat_L, bases, layout)
  crc, e = coefficients(f_L, bases, layout)
  wrong = np.concatenate([np.sign(crc_hat) != np.sign(crc), np.sign(e_hat) != np.sign(e)], axis=-1)
  return wrong.mean(-1)


def replicate(tree: PyTree, m: int) -> PyTree:
  """``m`` copies of one model's tree stacked on a new leading member axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(jnp.asarray(a), (m, *np.shape(a))), tree)
