"""Exact (v, k, 1) balanced incomplete block designs from finite planes.

A (v, k, 1)-BIBD is a set of v points and b = v(v-1) / (k(k-1)) blocks of k points each, such
that every pair of distinct points lies in exactly one block. Its incidence matrix
``incidence_VxB[i, j] = 1`` iff point i lies in block j (the paper's Eq. 25).

* :func:`projective_plane`: PG(2, q), a (q^2 + q + 1, q + 1, 1)-BIBD (points and lines of GF(q)^3).
* :func:`affine_plane`: AG(2, q), a (q^2, q, 1)-BIBD (points and lines of GF(q)^2).
* :func:`paper_design`: the paper's (7,3,1), (49,7,1) and (121,11,1) designs.

Both planes need the field GF(q) for every prime power q, also q = 4, 8, 9, 16, where the
arithmetic is modulo an irreducible polynomial, not modulo q. The addition and multiplication
tables of GF(p^n), n > 1, come from the ``galois`` package (its Conway polynomials), not from
tables of our own: one well-tested implementation instead of hand-copied irreducible
polynomials, and any prime power works, not only those <= 16. Prime fields are integers
modulo p (galois builds those too, but takes ~1 s per prime field to do it). The planes then
index the q x q tables with numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

# The prime powers q <= 16: every plane order the tests construct.
PRIME_POWERS = (2, 3, 4, 5, 7, 8, 9, 11, 13, 16)


@dataclasses.dataclass(frozen=True, eq=False)
class Design:
  """A (v, k, 1)-BIBD.

  Attributes:
    name: How it was built, e.g. ``"AG(2,11)"``.
    incidence_VxB: Boolean v x b matrix, ``[i, j]`` iff point i is in block j.
  """

  name: str  # The construction, e.g. "PG(2,2)" or "AG(2,11)".
  incidence_VxB: np.ndarray  # Bool, v x b: point i lies in block j.

  @property
  def v(self) -> int:
    """Number of points."""
    return self.incidence_VxB.shape[0]

  @property
  def b(self) -> int:
    """Number of blocks."""
    return self.incidence_VxB.shape[1]

  @property
  def k(self) -> int:
    """Points per block."""
    return int(self.incidence_VxB[:, 0].sum())

  @property
  def params(self) -> tuple[int, int, int]:
    """``(v, k, lambda)`` with lambda = 1."""
    return self.v, self.k, 1


def _prime_power(q: int) -> tuple[int, int] | None:
  """``(p, n)`` with q = p^n, p prime, n >= 1; None if q is not a prime power."""
  if not isinstance(q, (int, np.integer)) or q < 2:
    return None
  p = next(d for d in range(2, q + 1) if q % d == 0)
  n, rest = 0, q
  while rest % p == 0:
    rest, n = rest // p, n + 1
  return (p, n) if rest == 1 else None


@functools.cache
def field_tables(q: int) -> tuple[np.ndarray, np.ndarray]:
  """Addition and multiplication tables of GF(q), q x q int arrays over the labels 0..q-1
  (0 and 1 are the field's 0 and 1; for q = p^n the labels are ``galois``'s integer
  representation of polynomials over GF(p)).

  Raises:
    ValueError: q is not a prime power.
  """
  pn = _prime_power(q)
  if pn is None:
    raise ValueError(f"q must be a prime power >= 2, got {q}")
  if pn[1] == 1:
    a = np.arange(q)
    return np.add.outer(a, a) % q, np.multiply.outer(a, a) % q
  import galois  # noqa: PLC0415 (numba-compiled on import: ~1 s, paid only by extension fields)

  el = galois.GF(q).elements
  return np.asarray(el[:, None] + el[None, :], np.int64), np.asarray(el[:, None] * el[None, :], np.int64)


def projective_plane(q: int) -> Design:
  """PG(2, q): points and lines of the projective plane over GF(q), a (q^2+q+1, q+1, 1)-BIBD.

  Points (and, dually, lines) are the non-zero vectors of GF(q)^3 up to a scalar, written with
  their first non-zero coordinate 1; point p lies on line l iff ``p . l = 0`` in GF(q).

  Raises:
    ValueError: q is not a prime power.
  """
  add, mul = field_tables(q)
  reps = [v for v in itertools.product(range(q), repeat=3) if any(v) and next(c for c in v if c) == 1]
  pts = np.array(reps, dtype=np.int64)  # q^2 + q + 1 normalised vectors.
  prods = [mul[pts[:, None, i], pts[None, :, i]] for i in range(3)]
  incidence = add[add[prods[0], prods[1]], prods[2]] == 0
  return Design(name=f"PG(2,{q})", incidence_VxB=incidence)


def affine_plane(q: int) -> Design:
  """AG(2, q): points and lines of the affine plane over GF(q), a (q^2, q, 1)-BIBD with q^2 + q blocks.

  Point ``(x, y)`` is number ``x * q + y`` (x, y the field elements' integer labels). Lines are
  ``y = m x + c`` (block ``m * q + c``, the q^2 non-vertical lines) then ``x = c`` (block
  ``q^2 + c``, the q vertical ones).

  Raises:
    ValueError: q is not a prime power.
  """
  add, mul = field_tables(q)
  x, y = np.meshgrid(np.arange(q), np.arange(q), indexing="ij")
  x, y = x.ravel(), y.ravel()  # Point x * q + y.
  m, c = np.meshgrid(np.arange(q), np.arange(q), indexing="ij")
  m, c = m.ravel(), c.ravel()  # Block m * q + c.
  on_line = y[:, None] == add[mul[m[None, :], x[:, None]], c[None, :]]
  vertical = x[:, None] == np.arange(q)[None, :]
  return Design(name=f"AG(2,{q})", incidence_VxB=np.concatenate([on_line, vertical], axis=1))


# The paper's designs (section V, section VI-B): (v, k) -> how to build it.
PAPER_DESIGNS = {(7, 3): ("pg", 2), (49, 7): ("ag", 7), (121, 11): ("ag", 11)}


def paper_design(v: int, k: int) -> Design:
  """The paper's (v, k, 1) designs: (7,3,1) = PG(2,2), (49,7,1) = AG(2,7), (121,11,1) = AG(2,11).

  Raises:
    ValueError: ``(v, k)`` is not one of the paper's.
  """
  if (v, k) not in PAPER_DESIGNS:
    raise ValueError(f"the paper's designs are {sorted(PAPER_DESIGNS)} (v, k), got {(v, k)}")
  kind, q = PAPER_DESIGNS[(v, k)]
  return projective_plane(q) if kind == "pg" else affine_plane(q)


def design(name: str) -> Design:
  """A design by name: ``"pg<q>"``, ``"ag<q>"`` or ``"<v>,<k>,1"`` (the paper's).

  Raises:
    ValueError: An unknown name, or q not a prime power.
  """
  name = name.strip().lower()
  if name.startswith(("pg", "ag")) and name[2:].isdigit():
    q = int(name[2:])
    return projective_plane(q) if name.startswith("pg") else affine_plane(q)
  parts = name.replace("(", "").replace(")", "").split(",")
  if len(parts) == 3 and all(p.strip().isdigit() for p in parts) and parts[2].strip() == "1":
    return paper_design(int(parts[0]), int(parts[1]))
  raise ValueError(f"unknown design {name!r}: use pg<q>, ag<q> (q a prime power) or one of 7,3,1 49,7,1 121,11,1")


def pair_counts(incidence_VxB: np.ndarray) -> np.ndarray:
  """``[i, j]``: the number of blocks holding both points i and j (the diagonal: blocks per point)."""
  a = np.asarray(incidence_VxB, dtype=np.int64)
  return a @ a.T


def is_bibd(incidence_VxB: np.ndarray, lam: int = 1) -> bool:
  """Whether the incidence matrix is a BIBD with this lambda: equal block sizes, every pair of
  distinct points in exactly ``lam`` blocks."""
  a = np.asarray(incidence_VxB, dtype=bool)
  sizes = a.sum(0)
  counts = pair_counts(a)
  off = counts[~np.eye(len(counts), dtype=bool)]
  return bool(a.ndim == 2 and sizes.min() == sizes.max() >= 2 and np.all(off == lam))
