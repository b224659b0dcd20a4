"""The collusion decoder's guarantees (tracing.py's docstring), each tested."""

import numpy as np
import pytest

from jipguard.fingerprint import bibd, codes, tracing


def _book(v, k):
  return codes.Codebook.of(bibd.paper_design(v, k))


@pytest.mark.parametrize(("v", "k"), [(7, 3), (49, 7), (121, 11)])
def test_up_to_k_minus_1_colluders_are_named_exactly(v, k):
  book = _book(v, k)
  rng = np.random.default_rng(v)
  for size in range(1, k):
    for _ in range(40):
      t = rng.choice(book.num_customers, size, replace=False)
      d = tracing.decode_book(np.all(book.codes_VxN[:, t], 1), book.codes_VxN, book.resilience)
      assert d.status == "exact" and d.colluders == tuple(sorted(int(x) for x in t))


@pytest.mark.parametrize(("v", "k"), [(7, 3), (49, 7), (121, 11)])
def test_k_or_more_colluders_are_beyond_resilience_never_a_wrong_set(v, k):
  book = _book(v, k)
  rng = np.random.default_rng(v + 1)
  for size in range(k, min(book.num_customers, k + 12)):
    for _ in range(20):
      t = rng.choice(book.num_customers, size, replace=False)
      d = tracing.decode_book(np.all(book.codes_VxN[:, t], 1), book.codes_VxN, book.resilience)
      assert d.status == "beyond_resilience" and d.colluders == ()
      assert set(t.tolist()) <= set(d.candidates)


def test_averaged_noisy_coefficients_name_colluders_and_no_innocent():
  """Extraction noise below the thresholding margin: the colluders are named; above it, the
  decoder never names an innocent (it says undecidable or names a subset)."""
  book = codes.paper_codebook(49, 7)
  rng = np.random.default_rng(0)
  for noise in (0.03, 0.4):
    for _ in range(200):
      size = rng.integers(1, 7)
      t = rng.choice(book.num_customers, size, replace=False)
      e = tracing.averaged_coefficients(book, t) + noise * rng.standard_normal(book.length)
      d = tracing.decode_coefficients(e, book, tau=0.85)
      assert set(d.accused) <= set(t.tolist())
      if d.status in ("exact", "ambiguous"):
        assert set(t.tolist()) <= set(d.suspects) or noise > 0.1
      if noise < 0.1:  # (K - 2) / K <= 4/6 is 0.18 below tau, 1 is 0.15 above: 5 sigma.
        assert d.status in ("exact", "ambiguous") and set(t.tolist()) <= set(d.suspects)


def test_combination_of_two_books():
  """One pirate and colluders sharing a part are named exactly; {(1,1),(2,2)} and {(1,2),(2,1)}
  give the same fingerprint, so neither is named: 4 suspects, none certain."""
  book = codes.paper_codebook(7, 3)
  n = lambda a, b: a * 7 + b
  d = tracing.decode_coefficients(tracing.averaged_coefficients(book, [n(3, 4)]), book, 0.85)
  assert d.status == "exact" and d.accused == (n(3, 4),)
  d = tracing.decode_coefficients(tracing.averaged_coefficients(book, [n(3, 4), n(3, 6)]), book, 0.85)
  assert d.status == "exact" and d.accused == (n(3, 4), n(3, 6))
  e1 = tracing.averaged_coefficients(book, [n(1, 1), n(2, 2)])
  assert np.allclose(e1, tracing.averaged_coefficients(book, [n(1, 2), n(2, 1)]))
  d = tracing.decode_coefficients(e1, book, 0.85)
  assert d.status == "ambiguous" and d.accused == () and set(d.suspects) == {n(1, 1), n(1, 2), n(2, 1), n(2, 2)}
  # Only three of the four were sold: (1, 2) is the only suspect with part 2 in book 2... and
  # (2, 1) the only one with part 2 in book 1, so all three are certain.
  issued = [x for x in range(49) if x != n(2, 2)]
  d = tracing.decode_coefficients(tracing.averaged_coefficients(book, [n(1, 2), n(2, 1)]), book, 0.85, issued)
  assert d.status == "ambiguous" and set(d.accused) == {n(1, 2), n(2, 1)} and n(1, 1) in d.suspects


def test_full_scale_17424_customers_many_coalitions():
  """Code level over all 17,424 customers: accused ⊆ colluders ⊆ suspects for every coalition
  of <= 10; a coalition beyond resilience names nobody."""
  book = codes.paper_codebook()
  rng = np.random.default_rng(7)
  for size in list(range(1, 11)) * 8 + [11, 12, 13] * 8:
    t = rng.choice(book.num_customers, size, replace=False)
    d = tracing.decode_coefficients(tracing.averaged_coefficients(book, t), book, 0.85)
    parts_distinct = max(len(set(p.tolist())) for p in book.parts(t))
    if parts_distinct <= 10:
      assert d.status in ("exact", "ambiguous") and set(d.accused) <= set(t.tolist()) <= set(d.suspects)
      assert size > 1 or d.status == "exact"
    else:
      assert d.status == "beyond_resilience" and d.accused == ()


def test_edge_cases():
  book = codes.paper_codebook(7, 3)
  none = tracing.decode([np.ones(7, bool)] * 2, book)
  assert none.status == "none" and none.accused == ()
  bad = tracing.decode([np.zeros(7, bool)] * 2, book)
  assert bad.status == "beyond_resilience" and "beyond the code's collusion resilience" in bad.message
  c = np.array([1, 1, 1, 1, 1, 1, 0], bool)  # One zero: no block inside it.
  assert tracing.decode_book(c, book.books[0].codes_VxN, 2).status == "inconsistent"
  with pytest.raises(ValueError, match="shape"):
    tracing.decode_coefficients(np.zeros(13), book, 0.85)
  with pytest.raises(ValueError, match="not finite"):
    tracing.decode_coefficients(np.full(14, np.nan), book, 0.85)
  with pytest.raises(ValueError, match="one per codebook"):
    tracing.decode([np.ones(7, bool)], book)
