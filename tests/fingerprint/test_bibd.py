"""Every constructed design is a (v, k, 1)-BIBD: every pair of points in exactly one block."""

import itertools

import numpy as np
import pytest

from jipguard.fingerprint import bibd


@pytest.mark.parametrize("q", bibd.PRIME_POWERS)
def test_projective_plane_is_a_bibd(q):
  d = bibd.projective_plane(q)
  assert (d.v, d.b, d.k) == (q * q + q + 1, q * q + q + 1, q + 1)
  assert bibd.is_bibd(d.incidence_VxB)
  # Every point on q + 1 lines; any two lines meet in exactly one point (the dual design).
  assert np.all(d.incidence_VxB.sum(1) == q + 1)
  assert bibd.is_bibd(d.incidence_VxB.T)


@pytest.mark.parametrize("q", bibd.PRIME_POWERS)
def test_affine_plane_is_a_bibd(q):
  d = bibd.affine_plane(q)
  assert (d.v, d.b, d.k) == (q * q, q * q + q, q)
  assert bibd.is_bibd(d.incidence_VxB)
  assert np.all(d.incidence_VxB.sum(1) == q + 1)  # r = (v - 1) / (k - 1).


def test_every_pair_exactly_once_checked_pair_by_pair():
  """The matrix-product check agrees with counting blocks pair by pair (on PG(2,4))."""
  inc = bibd.projective_plane(4).incidence_VxB
  blocks = [set(np.flatnonzero(col)) for col in inc.T]
  for i, j in itertools.combinations(range(inc.shape[0]), 2):
    assert sum(i in b and j in b for b in blocks) == 1


@pytest.mark.parametrize(("v", "k", "b"), [(7, 3, 7), (49, 7, 56), (121, 11, 132)])
def test_paper_designs(v, k, b):
  d = bibd.paper_design(v, k)
  assert d.params == (v, k, 1) and d.b == b == v * (v - 1) // (k * (k - 1))
  assert bibd.is_bibd(d.incidence_VxB)
  assert bibd.design(f"{v},{k},1").name == d.name


def test_extension_fields_are_not_integers_modulo_q():
  """GF(4) is not Z/4 (2 * 2 = 0 mod 4 has no inverse); its tables make a field."""
  add, mul = bibd.field_tables(4)
  nonzero = mul[1:, 1:]
  assert np.all(nonzero != 0) and all(sorted(row) == [1, 2, 3] for row in nonzero)
  assert np.all(add == add.T) and np.all(np.diag(add) == 0)  # Characteristic 2.


def test_is_bibd_rejects_a_broken_design():
  inc = bibd.affine_plane(3).incidence_VxB.copy()
  inc[0, 0] = ~inc[0, 0]
  assert not bibd.is_bibd(inc)


@pytest.mark.parametrize("bad", [1, 6, 10, 12, 15])
def test_not_a_prime_power(bad):
  with pytest.raises(ValueError, match="prime power"):
    bibd.projective_plane(bad)


@pytest.mark.parametrize("name", ["pg6", "xx", "7,3,2", "13,4,1"])
def test_unknown_design_names(name):
  with pytest.raises(ValueError):
    bibd.design(name)
