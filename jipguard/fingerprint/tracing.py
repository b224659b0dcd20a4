"""Colluder tracing: from thresholded identity bits (or an extracted fingerprint) to named customers.

Decisions are statistics, so they run on the host in numpy (section V of the paper):
``e = basis^T u``, ``c = [e > tau]`` (Eq. 30), then the set of customers whose codes' AND is c.

Decoding one AND-ACC codebook (:func:`decode_book`). The candidates are the customers whose code
covers c (1 wherever c is 1): every colluder's code does, since c is their AND. On a
(v, k, 1)-BIBD an innocent's block meets each colluder's block in at most one point, so with at
most k - 1 colluders it cannot lie inside the union of their blocks (the zeros of c), and the
candidates are exactly the colluders.

Formal guarantees (noise-free bits, c the AND of the codes of a coalition T, tested):

* ``|T| <= k - 1``: status ``"exact"`` and ``colluders == T``.
* ``|T| >= k``: the candidates contain T, so there are >= k of them: status
  ``"beyond_resilience"`` and no one is named. A confident wrong set is never returned.
* Any c (also noisy): status ``"exact"`` only if at most k - 1 candidates have exactly c as their
  AND; an innocent is then named only if the bits are wrong where no coalition of <= k - 1
  explains them. c that no candidate set explains is ``"inconsistent"`` (nobody named); c with
  no zero at all names nobody (``"none"``: no customer's code is present).

Two codebooks (:func:`decode`). Each book names its part of the colluders' ids; the paper does
not say how to combine them. A coalition {(1, 1), (2, 2)} and {(1, 2), (2, 1)} average to the
same fingerprint, so in general the books determine only the *suspects*, the issued customers
whose every part was named, and a customer is *accused* only if every coalition consistent with
the books contains it: iff it is the only suspect with its part in some book. Guarantees:
accused ⊆ T ⊆ suspects whenever each book has at most k - 1 distinct parts among T; the
coalition is named exactly (status ``"exact"``) when every suspect is accused, e.g. one pirate,
or colluders sharing one book's part; otherwise the status is ``"ambiguous"``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jipguard.fingerprint import codes

STATUSES = ("exact", "ambiguous", "beyond_resilience", "inconsistent", "none")


@dataclasses.dataclass(frozen=True)
class BookDecision:
  """One codebook's decision.

  Attributes:
    status: ``exact`` (colluders named), ``beyond_resilience`` (>= k candidates: more colluders
      than the code resists), ``inconsistent`` (no coalition of <= k - 1 explains the bits),
      ``none`` (no zero bit: no customer's code present).
    colluders: The named customers (empty unless ``exact``).
    candidates: The customers whose code covers the bits.
  """

  status: str
  colluders: tuple[int, ...]
  candidates: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Decision:
  """The decision over all codebooks.

  Attributes:
    status: ``exact`` (accused == suspects: the coalition is determined), ``ambiguous`` (only
      ``accused`` are certain), or the worst book status (``beyond_resilience``,
      ``inconsistent``, ``none``), when nobody is named.
    accused: Customers named with certainty (in every coalition consistent with the books).
    suspects: Issued customers whose every part was named (the coalition is a subset).
    books: Each book's :class:`BookDecision`.
  """

  status: str
  accused: tuple[int, ...]
  suspects: tuple[int, ...]
  books: tuple[BookDecision, ...]

  @property
  def message(self) -> str:
    """One line for a report or the command line."""
    if self.status == "exact":
      return f"colluders named: {list(self.accused)}"
    if self.status == "ambiguous":
      return (
        f"{len(self.suspects)} suspects {list(self.suspects)[:20]}; named with certainty: {list(self.accused)}"
        " (the codebooks determine each part of the colluders' ids, not which parts go together)"
      )
    if self.status == "beyond_resilience":
      return "undecidable: beyond the code's collusion resilience (more colluders than k - 1); nobody is named"
    if self.status == "inconsistent":
      return "undecidable: the extracted bits are not the AND of any <= k - 1 codes; nobody is named"
    return "no customer's fingerprint found"


def decode_book(c_V: np.ndarray, codes_VxN: np.ndarray, resilience: int) -> BookDecision:
  """The customers whose AND-ACC codes AND to ``c_V`` (see the module's guarantees).

  Args:
    c_V: Thresholded bits (bool, length v).
    codes_VxN: The codebook (bool, customer j in column j).
    resilience: k - 1 of the design.

  Raises:
    ValueError: ``c_V`` is not of length v.
  """
  c = np.asarray(c_V, bool)
  book = np.asarray(codes_VxN, bool)
  if c.shape != book.shape[:1]:
    raise ValueError(f"bits must have shape ({book.shape[0]},), got {c.shape}")
  if c.all():
    return BookDecision("none", (), ())
  covers = ~np.any(c[:, None] & ~book, axis=0)
  cand = tuple(int(j) for j in np.flatnonzero(covers))
  if len(cand) > resilience:
    return BookDecision("beyond_resilience", (), cand)
  if not cand or not np.array_equal(np.all(book[:, list(cand)], axis=1), c):
    return BookDecision("inconsistent", (), cand)
  return BookDecision("exact", cand, cand)


def _combine(parts: tuple[np.ndarray, ...], named: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
  """Suspects (issued customers whose parts were all named) and the accused among them."""
  is_suspect = np.ones(len(parts[0]), bool)
  for p, n in zip(parts, named):
    is_suspect &= np.isin(p, n)
  idx = np.flatnonzero(is_suspect)
  certain = np.zeros(len(idx), bool)
  for p in parts:
    values, counts = np.unique(p[idx], return_counts=True)
    certain |= np.isin(p[idx], values[counts == 1])
  return idx, certain


def decode(
  bits: list[np.ndarray] | tuple[np.ndarray, ...],
  book: codes.CombinedCodebook,
  issued: np.ndarray | None = None,
) -> Decision:
  """Names colluders from each codebook's thresholded bits (see the module's guarantees).

  Args:
    bits: One bool vector per codebook (length its v).
    book: The combined codebook.
    issued: The customer ids that were sold (default: all ``book.num_customers``).

  Raises:
    ValueError: Wrong number or lengths of bit vectors, or issued ids out of range.
  """
  if len(bits) != len(book.books):
    raise ValueError(f"expected {len(book.books)} bit vectors (one per codebook), got {len(bits)}")
  decisions = tuple(decode_book(c, b.codes_VxN, b.resilience) for c, b in zip(bits, book.books))
  for worst in ("beyond_resilience", "inconsistent", "none"):
    if any(d.status == worst for d in decisions):
      return Decision(worst, (), (), decisions)
  issued = np.arange(book.num_customers) if issued is None else np.unique(np.asarray(issued, np.int64))
  parts = book.parts(issued)
  idx, certain = _combine(parts, [d.colluders for d in decisions])
  suspects = tuple(int(i) for i in issued[idx])
  accused = tuple(int(i) for i in issued[idx[certain]])
  if not suspects:
    return Decision("inconsistent", (), (), decisions)
  return Decision("exact" if len(accused) == len(suspects) else "ambiguous", accused, suspects, decisions)


def split_coefficients(e_L: np.ndarray, book: codes.CombinedCodebook) -> list[np.ndarray]:
  """The concatenated coefficients cut into one piece per codebook."""
  e = np.asarray(e_L)
  if e.shape != (book.length,):
    raise ValueError(f"coefficients must have shape ({book.length},), got {e.shape}")
  return np.split(e, np.cumsum([b.v for b in book.books])[:-1])


def decode_coefficients(
  e_L: np.ndarray, book: codes.CombinedCodebook, tau: float, issued: np.ndarray | None = None
) -> Decision:
  """Eq. 30 then :func:`decode`: threshold every codebook's coefficients at ``tau``.

  Raises:
    ValueError: Wrong length, or non-finite coefficients (an extraction gone wrong).
  """
  e = np.asarray(e_L, np.float64)
  if not np.all(np.isfinite(e)):
    raise ValueError("extracted coefficients are not finite")
  return decode([codes.threshold(x, tau) for x in split_coefficients(e, book)], book, issued)


def averaged_coefficients(book: codes.CombinedCodebook, coalition: np.ndarray) -> np.ndarray:
  """The coefficients of the average of the coalition's identity codes (what an averaging
  attack leaves, before extraction noise): the mean of their ``e`` (length L)."""
  return book.e(np.asarray(coalition)).mean(axis=1)
