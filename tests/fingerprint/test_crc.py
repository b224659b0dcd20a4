"""Community relationship codes: the kernel, LLE weights, projected gradient, binarisation, Fig. 5."""

import functools

import numpy as np
import pytest

from jipguard.fingerprint import crc

_CFG = crc.CrcConfig(bits=12, iterations=60)


@functools.cache
def _graph():
  return crc.planted_graph([20] * 4, 0.5, 0.02, seed=0)


@functools.cache
def _factors():
  a, _ = _graph()
  q = crc.kernel(a, _CFG.walk_steps)
  w = crc.lle_weights(q, _CFG.neighbours)
  return q, w, crc.factorize(q, w, _CFG)


def test_kernel_is_psd_and_the_plain_adjacency_is_not():
  a, _ = _graph()
  assert np.linalg.eigvalsh(crc.kernel(a)).min() > -1e-10
  assert np.linalg.eigvalsh(a).min() < -0.5  # Why the paper's "use the adjacency" needs a reading.


def test_lle_weights_sum_to_one_and_reconstruct_in_kernel_space():
  q, w, _ = _factors()
  assert np.allclose(w.sum(1), 1) and np.all(np.count_nonzero(w, axis=1) == _CFG.neighbours)
  assert np.all(np.diag(w) == 0)
  # Kernel-space reconstruction error ||phi_i - sum_j w_ij phi_j||^2 is below the error of the
  # uniform weights over the same neighbours (LLE's weights minimise it, up to the regulariser).
  e = np.eye(len(q)) - w
  u = np.eye(len(q)) - (w != 0) / _CFG.neighbours
  assert np.trace(e @ q @ e.T) < np.trace(u @ q @ u.T)


def test_projected_gradient_decreases_the_objective_and_stays_non_negative():
  _, _, (c, f, history) = _factors()
  assert np.all(c >= 0) and np.all(f >= 0)
  assert np.all(np.diff(history) <= 1e-9) and history[-1] < 0.5 * history[0]


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(0)
  q, w, _ = _factors()
  c, f = rng.uniform(0, 1, (3, len(q))), rng.uniform(0, 1, (3, len(q)))
  r = f @ w.T
  grad_c = 2 * (r @ r.T) @ c @ q - 2 * r @ q
  grad_f = (2 * (c @ q @ c.T) @ r - 2 * c @ q) @ w
  d = np.zeros_like(c)
  d[1, 5] = 1e-6
  assert np.isclose((crc.objective(q, c + d, f, w) - crc.objective(q, c - d, f, w)) / 2e-6, grad_c[1, 5], rtol=1e-4)
  assert np.isclose((crc.objective(q, c, f + d, w) - crc.objective(q, c, f - d, w)) / 2e-6, grad_f[1, 5], rtol=1e-4)


def test_factors_are_community_indicators_and_codes_preserve_neighbourhoods():
  """Fig. 5 on a planted graph: each factor loads on one community; at Hamming distance <= 1
  most same-community pairs are neighbours and most other pairs are not (accuracy above the
  0.76 of calling every pair apart)."""
  _, comm = _graph()
  _, _, (_, f, _) = _factors()
  per_comm = np.stack([f[:, comm == k].mean(1) for k in range(4)], 1)  # T x communities.
  top = np.sort(per_comm, 1)
  assert np.mean(top[:, -1] > 3 * top[:, -2]) > 0.8
  codes = crc.binarize(f)
  r = crc.neighbourhood_accuracy(codes, comm, 1)
  trivial = crc.neighbourhood_accuracy(np.arange(80)[:, None] == np.arange(80)[None, :], comm, 1)
  assert r["accuracy"] > trivial["accuracy"] + 0.1 and r["same_recall"] > 0.6 and r["different_specificity"] > 0.9


def test_hamming_and_bad_input(tmp_path):
  codes = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 0]], bool)
  assert crc.hamming(codes).tolist() == [[0, 1, 2], [1, 0, 3], [2, 3, 0]]
  with pytest.raises(ValueError, match="symmetric"):
    crc.kernel(np.triu(np.ones((3, 3))))
  with pytest.raises(ValueError, match="square"):
    crc.kernel(np.ones((2, 3)))
  with pytest.raises(ValueError, match="walk_steps"):
    crc.CrcConfig(walk_steps=3)
  path = tmp_path / "edges.txt"
  path.write_text("# SNAP\n0 1\n1 2\n2 0\n5 6\n")
  a = crc.load_edge_list(path)
  assert a.shape == (5, 5) and np.allclose(a, a.T) and a.sum() == 8
  assert crc.load_edge_list(path, max_nodes=3).sum() == 6
  with pytest.raises(OSError):
    crc.load_edge_list(tmp_path / "missing.txt")
