"""AND-ACC codes: complement columns, e = 2c - 1, Eq. 26 with f_i, the paper's example and typos."""

import itertools

import numpy as np
import pytest

from jipguard.fingerprint import bibd, codes


def test_codes_are_complements_of_the_incidence_columns():
  d = bibd.paper_design(49, 7)
  c = codes.and_acc(d)
  assert c.shape == (49, 56) and np.all(c.sum(0) == 49 - 7)
  assert np.array_equal(~c, d.incidence_VxB)
  assert np.array_equal(codes.coefficients(c), np.where(c, 1.0, -1.0))


def test_eq26_uses_f_i_and_the_basis_inverts():
  """u_j = sum_i e_ij f_i: projecting back on the orthonormal basis returns e exactly; the
  printed f_j would make u_j a multiple of one basis vector, losing the code."""
  book = codes.Codebook.of(bibd.paper_design(7, 3))
  basis = codes.random_basis(7, seed=3)
  assert np.allclose(basis.T @ basis, np.eye(7))
  e = book.e(np.arange(7))
  u = codes.identity_codes(e, basis)
  assert np.allclose(u[:, 2], sum(e[i, 2] * basis[:, i] for i in range(7)))
  assert np.allclose(codes.project(u, basis), e)
  printed = np.stack([e[:, j].sum() * basis[:, j] for j in range(7)], 1)  # sum_i e_ij f_j.
  assert not np.allclose(codes.project(printed, basis), e)


def test_paper_eq28_corrected_is_a_bibd_code_and_the_printed_one_is_not():
  assert bibd.is_bibd(~codes.PAPER_EQ28_CODES)
  assert not bibd.is_bibd(~codes.PAPER_EQ28_PRINTED)
  assert codes.PAPER_EQ28_PRINTED[:, 3].sum() == 5 and codes.PAPER_EQ28_CODES[:, 3].sum() == 4


def test_paper_eq29_and_the_worked_example():
  """u_1, u_6, u_7 of Eq. 29; customers 6 and 7 average to e = [1, 1, 0, -1, 0, 0, 0] (the paper
  prints [1, 1, 0, 0, 0, 0, 0]) and c = [1, 1, 0, 0, 0, 0, 0], the AND of columns 6 and 7."""
  e = codes.coefficients(codes.PAPER_EQ28_CODES)
  assert e[:, 0].tolist() == [-1, -1, 1, -1, 1, 1, 1]
  assert e[:, 5].tolist() == [1, 1, -1, -1, 1, 1, -1]
  assert e[:, 6].tolist() == [1, 1, 1, -1, -1, -1, 1]
  basis = codes.random_basis(7, seed=0)
  u_avg = codes.identity_codes(e[:, [5, 6]], basis).mean(1)
  e_avg = codes.project(u_avg, basis)
  assert np.allclose(e_avg, [1, 1, 0, -1, 0, 0, 0])
  c = codes.threshold(e_avg, 0.85)
  assert c.tolist() == [True, True, False, False, False, False, False]
  assert np.array_equal(c, codes.PAPER_EQ28_CODES[:, 5] & codes.PAPER_EQ28_CODES[:, 6])


@pytest.mark.parametrize(("v", "k"), [(7, 3), (49, 7)])
def test_and_of_up_to_k_minus_1_codes_is_unique(v, k):
  """k - 1 resilience, exhaustively for (7,3,1) and over random coalitions for (49,7,1): distinct
  coalitions of size <= k - 1 have distinct ANDs."""
  c = codes.and_acc(bibd.paper_design(v, k))
  rng = np.random.default_rng(0)
  seen = {}
  for size in range(1, k):
    if v == 7:
      coalitions = itertools.combinations(range(c.shape[1]), size)
    else:
      coalitions = (tuple(sorted(rng.choice(c.shape[1], size, replace=False))) for _ in range(300))
    for t in coalitions:
      key = np.all(c[:, list(t)], axis=1).tobytes()
      assert seen.setdefault(key, t) == t, (seen[key], t)


def test_k_colluders_can_frame_an_innocent():
  """The bound is tight: in PG(2,2) (k = 3), the three lines through a point cover the plane, so
  their AND (all zeros) equals the AND of any superset."""
  c = codes.and_acc(bibd.projective_plane(2))
  through_0 = np.flatnonzero(~c[0])
  assert len(through_0) == 3 and not np.any(np.all(c[:, through_0], axis=1))


def test_combined_codebook_has_17424_customers():
  book = codes.paper_codebook()
  assert book.num_customers == 132 * 132 == 17_424 and book.length == 242
  assert book.parts(17_423) == (131, 131)
  assert np.array_equal(book.e(133), np.concatenate([book.books[0].e(1), book.books[1].e(1)]))
  with pytest.raises(ValueError, match="customer ids"):
    book.parts(17_424)


@pytest.mark.parametrize(("tau", "k"), [(0.85, 13), (0.5, 4), (0.0, 2)])
def test_threshold_gives_the_and_up_to_max_averaged_colluders(tau, k):
  """K <= k averaged codes threshold to their AND; at K = k + 1 a bit where one colluder has -1
  averages to (K - 2) / K > tau and is read as 1."""
  assert codes.max_averaged_colluders(tau) == k
  c = codes.and_acc(bibd.affine_plane(5))
  rng = np.random.default_rng(1)
  for _ in range(50):
    t = rng.choice(c.shape[1], k, replace=False)
    assert np.array_equal(codes.threshold(codes.coefficients(c[:, t]).mean(1), tau), np.all(c[:, t], 1))
  one_dissent = np.ones(k + 1)
  one_dissent[0] = -1
  assert codes.threshold(np.array([one_dissent.mean()]), tau)[0]
