"""Customer identity codes: AND anti-collusion codes (AND-ACC) on a BIBD, and two combined.

Trappe, Wu, Wang & Liu's AND-ACC (the paper's section IV-B): customer j's code is the bit
complement of column j of a (v, k, 1)-BIBD's incidence matrix, ``c_j = 1 - incidence[:, j]``
(v - k ones, the k zeros on block j). The code is carried by the coefficients
``e_j = 2 c_j - 1`` in {-1, +1}^v on an orthonormal basis ``f_1 .. f_v`` of R^v:
``u_j = sum_i e_ij f_i`` (Eq. 26, whose ``f_j`` is a typo for ``f_i``: with ``f_j`` every term
would be the same vector). Averaging the u of K colluders averages their e, and
``e_avg[i] = 1`` exactly where every colluder's bit is 1: the logical AND of their codes,
which the hard threshold ``e_avg > tau`` (Eq. 30) recovers while K < 2 / (1 - tau).

Two codebooks side by side (section VI-B) serve b_1 * b_2 customers: customer n is the pair
``(n // b_2, n % b_2)`` and carries ``u^(1)_{n // b_2} || u^(2)_{n % b_2}``. Two (121, 11, 1)
designs (AG(2, 11), 132 blocks each) give 132 x 132 = 17,424 customers (the paper prints
17,421) with 2 x 121 = 242 coefficients.

The paper's worked example (Eqs. 28-29) is :data:`PAPER_EQ28_CODES`, with its one typo
corrected: row 2, column 4 is 0 (printed 1, which gives column 4 five ones where every other
column has four, and breaks the design).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.stats

from jipguard.fingerprint import bibd

# Eq. 28 of the paper (codes, i.e. complements of a (7,3,1) incidence matrix: customer j is
# column j), with row 2 column 4 corrected from 1 to 0. Its complement is a (7,3,1)-BIBD.
PAPER_EQ28_CODES = np.array(
  [
    [0, 0, 0, 1, 1, 1, 1],
    [0, 1, 1, 0, 0, 1, 1],
    [1, 0, 1, 0, 1, 0, 1],
    [0, 1, 1, 1, 1, 0, 0],
    [1, 1, 0, 0, 1, 1, 0],
    [1, 0, 1, 1, 0, 1, 0],
    [1, 1, 0, 1, 0, 0, 1],
  ],
  dtype=bool,
)
# Eq. 28 as printed (row 2, column 4 is 1): not the complement of a BIBD.
PAPER_EQ28_PRINTED = PAPER_EQ28_CODES.copy()
PAPER_EQ28_PRINTED[1, 3] = True


def and_acc(design: bibd.Design | np.ndarray) -> np.ndarray:
  """The AND-ACC code matrix ``codes_VxN`` (bool): column j is customer j's code, the complement
  of the design's column j."""
  inc = design.incidence_VxB if isinstance(design, bibd.Design) else np.asarray(design, bool)
  return ~inc.astype(bool)


def coefficients(codes_VxN: np.ndarray) -> np.ndarray:
  """``e = 2 c - 1``: the codes' coefficients in {-1, +1}, float64 ``e_VxN``."""
  return 2.0 * np.asarray(codes_VxN, np.float64) - 1.0


def random_basis(v: int, seed: int) -> np.ndarray:
  """A random orthonormal basis of R^v (Haar measure), the columns ``f_1 .. f_v`` of ``basis_VxV``;
  a secret of the vendor (draw ``seed`` with ``secrets``)."""
  if v == 1:
    return np.ones((1, 1))
  return scipy.stats.ortho_group.rvs(v, random_state=np.random.default_rng(seed))


def identity_codes(e_VxN: np.ndarray, basis_VxV: np.ndarray) -> np.ndarray:
  """Eq. 26 (with ``f_i``): ``u_j = sum_i e_ij f_i``, i.e. ``u_VxN = basis_VxV @ e_VxN``."""
  return np.asarray(basis_VxV) @ np.asarray(e_VxN)


def project(u_VxN: np.ndarray, basis_VxV: np.ndarray) -> np.ndarray:
  """The coefficients of ``u`` on the basis, ``e = basis^T u`` (the inverse of :func:`identity_codes`)."""
  return np.asarray(basis_VxV).T @ np.asarray(u_VxN)


def threshold(e_V: np.ndarray, tau: float) -> np.ndarray:
  """Eq. 30, the hard-threshold detector: ``c_i = [e_i > tau]`` (bool)."""
  return np.asarray(e_V) > tau


def max_averaged_colluders(tau: float) -> int:
  """The largest K for which thresholding an average of K codes at ``tau`` gives their AND.

  A bit where all K colluders have +1 averages to 1 > tau; a bit where j >= 1 of them have -1
  averages to at most 1 - 2/K, which stays <= tau while K <= 2 / (1 - tau). tau = 0.85: K <= 13.
  """
  return int(np.floor(2.0 / (1.0 - tau) + 1e-9))


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
  """One AND-ACC codebook on a (v, k, 1) design.

  Attributes:
    design: The BIBD.
    codes_VxN: Bool codes, customer j in column j (N = b, the design's blocks).
  """

  design: bibd.Design  # The (v, k, 1)-BIBD.
  codes_VxN: np.ndarray  # and_acc(design).

  @classmethod
  def of(cls, design: bibd.Design) -> Codebook:
    return cls(design=design, codes_VxN=and_acc(design))

  @property
  def v(self) -> int:
    """Code length (coefficients per customer)."""
    return self.design.v

  @property
  def num_customers(self) -> int:
    return self.design.b

  @property
  def resilience(self) -> int:
    """k - 1: the AND of any <= k - 1 codes names exactly their customers."""
    return self.design.k - 1

  def e(self, customers: np.ndarray | int) -> np.ndarray:
    """Coefficients ``e`` of ``customers`` (V, or V x len)."""
    return coefficients(self.codes_VxN[:, customers])


@dataclasses.dataclass(frozen=True, eq=False)
class CombinedCodebook:
  """Codebooks side by side: customer n is ``np.unravel_index(n, (b_1, b_2, ...))``.

  Attributes:
    books: The codebooks (usually two).
  """

  books: tuple[Codebook, ...]  # One code index per book.

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(b.num_customers for b in self.books)

  @property
  def num_customers(self) -> int:
    return int(np.prod(self.shape))

  @property
  def length(self) -> int:
    """Coefficients per customer: the sum of the books' v."""
    return sum(b.v for b in self.books)

  def parts(self, customers: np.ndarray | int) -> tuple[np.ndarray, ...]:
    """Each book's code index of ``customers`` (ValueError outside [0, num_customers))."""
    c = np.asarray(customers)
    if np.any((c < 0) | (c >= self.num_customers)):
      raise ValueError(f"customer ids must be in [0, {self.num_customers}), got {c.min()}..{c.max()}")
    return np.unravel_index(c, self.shape)

  def e(self, customers: np.ndarray | int) -> np.ndarray:
    """Concatenated coefficients of ``customers`` (L, or L x len; L = :attr:`length`)."""
    return np.concatenate([b.e(i) for b, i in zip(self.books, self.parts(customers))], axis=0)


def paper_codebook(v: int = 121, k: int = 11, books: int = 2) -> CombinedCodebook:
  """The paper's identity code: ``books`` (v, k, 1) codebooks side by side (default: 2 x (121,11,1))."""
  book = Codebook.of(bibd.paper_design(v, k))
  return CombinedCodebook(books=(book,) * books)
