"""Community relationship codes (section IV-A): neighbourhood-preserving hashing of a social graph.

NMF with an LLE term, ``min_{B, F >= 0} ||G - B F W^T||_F^2`` (Eq. 10), in its kernel form
(Eqs. 22-24): with ``B = phi(G) C^T`` the objective needs only the kernel ``Q = phi(G)^T phi(G)``,

    O(C, F) = tr(Q) - 2 tr(Q C^T R) + tr(R^T C Q C^T R),   R = F W^T,

solved by alternating projected gradient with Armijo steps (Eqs. 12-21; Lin 2007's rule: a
step is taken when ``O(x+) - O(x) <= sigma grad^T (x+ - x)``, Eq. 18). The gradients are
``dO/dC = 2 R R^T C Q - 2 R Q`` and ``dO/dF = (2 C Q C^T R - 2 C Q) W``.

Where the paper leaves gaps, this module reads it so (docs/fingerprint.md; each pinned by a test):

* The kernel. The paper says to use the adjacency matrix as Q directly, but an adjacency
  matrix is not positive semi-definite, and with it the quadratic term is unbounded below. We
  take the random-walk kernel ``Q = S^(2 s)`` of the normalised adjacency
  ``S = D^-1/2 (A + I) D^-1/2`` (``walk_steps`` = 2 s = 4 by default): PSD, built from the
  adjacency alone, and it weighs the community structure (S's large eigenvalues) above the
  per-node noise. The cosine similarity of closed neighbourhoods (s = 1/2 in spirit) left the
  diagonal dominant and the factors noisy (docs/fingerprint.md).
* The LLE weights (Eq. 6) need the attributes the paper says are unavailable; in kernel form
  they need only Q: the ``neighbours`` nearest customers in kernel distance
  ``Q_ii + Q_jj - 2 Q_ij``, and weights solving the local Gram system
  ``(Q_ii - Q_ij - Q_il + Q_jl) w = 1``, regularised, normalised to sum 1 (standard LLE).
* The binarisation is not given. Each customer's column of F is divided by its largest entry
  and bit t is ``F[t, i] / max_t' F[t', i] > 1/2``: the dimensions the customer loads on at
  least half as strongly as on its strongest. The factors come out as community indicators
  (tested), so customers of one community share their bits; a per-dimension median split
  (spectral hashing's rule) cut through communities and lost them.

The Hamming-neighbourhood accuracy of the paper's Fig. 5 (:func:`neighbourhood_accuracy`):
over all pairs of customers, "neighbours" is ``hamming(p_i, p_j) <= dist``, compared with the
truth "same community" (the planted communities of a stochastic block model).
"""

from __future__ import annotations

import dataclasses
import os

import networkx as nx
import numpy as np


@dataclasses.dataclass(frozen=True)
class CrcConfig:
  """Hyper-parameters of the community codes."""

  bits: int = 60  # T: code length (the paper: 15 to 60).
  walk_steps: int = 4  # Q = S^walk_steps, an even power of the normalised adjacency.
  neighbours: int = 10  # k of the LLE neighbourhoods.
  iterations: int = 200  # Alternating rounds (one projected-gradient step on C, one on F).
  lle_reg: float = 1e-3  # Regulariser of the local Gram systems (times their trace).
  sigma: float = 0.01  # Armijo's sufficient-decrease constant (Eq. 18).
  seed: int = 0  # Non-negative random start of C and F.

  def __post_init__(self):
    if self.bits < 1 or self.neighbours < 1 or self.iterations < 1:
      raise ValueError(f"bits, neighbours and iterations must be >= 1, got {self}")
    if self.walk_steps < 2 or self.walk_steps % 2:
      raise ValueError(f"walk_steps must be an even number >= 2 (a PSD kernel), got {self.walk_steps}")


def kernel(adjacency_MxM: np.ndarray, walk_steps: int = 4) -> np.ndarray:
  """Q = S^walk_steps with ``S = D^-1/2 (A + I) D^-1/2``: PSD for even ``walk_steps``.

  Raises:
    ValueError: Not a square, symmetric, finite, non-negative matrix.
  """
  a = np.asarray(adjacency_MxM, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1] or not np.all(np.isfinite(a)) or np.any(a < 0):
    raise ValueError(f"adjacency must be a square, finite, non-negative matrix, got shape {a.shape}")
  if not np.allclose(a, a.T):
    raise ValueError("adjacency must be symmetric (an undirected graph)")
  g = (a > 0).astype(np.float64)
  np.fill_diagonal(g, 1.0)
  d = 1.0 / np.sqrt(g.sum(1))
  s = d[:, None] * g * d[None, :]
  return np.linalg.matrix_power(s, walk_steps)


def lle_weights(q_MxM: np.ndarray, neighbours: int, reg: float = 1e-3) -> np.ndarray:
  """W (M x M): row i holds customer i's LLE reconstruction weights over its ``neighbours``
  nearest customers in kernel distance; each row sums to 1 (Eq. 6's constraint)."""
  q = np.asarray(q_MxM, np.float64)
  m = len(q)
  k = min(neighbours, m - 1)
  d = np.diag(q)[:, None] + np.diag(q)[None, :] - 2 * q
  np.fill_diagonal(d, np.inf)
  w = np.zeros((m, m))
  for i in range(m):
    nb = np.argsort(d[i], kind="stable")[:k]
    gram = q[i, i] - q[i, nb][:, None] - q[i, nb][None, :] + q[np.ix_(nb, nb)]
    gram += reg * max(np.trace(gram), 1e-12) * np.eye(k)
    wi = np.linalg.solve(gram, np.ones(k))
    w[i, nb] = wi / wi.sum()
  return w


def objective(q: np.ndarray, c: np.ndarray, f: np.ndarray, w: np.ndarray) -> float:
  """Eq. 24: ``tr(Q) - 2 tr(Q C^T R) + tr(R^T C Q C^T R)``, R = F W^T."""
  r = f @ w.T
  cq = c @ q
  return float(np.trace(q) - 2 * np.sum(cq * r) + np.sum((cq @ c.T) * (r @ r.T)))


def _armijo_step(fun, x, grad, alpha, sigma):
  """One projected-gradient step ``P[x - alpha grad]`` with Lin's step search (Eqs. 16-18):
  alpha grows by 10x while the condition holds, else shrinks by 10x until it does."""
  f0 = fun(x)

  def ok(a):
    xn = np.maximum(x - a * grad, 0.0)
    return fun(xn) - f0 <= sigma * np.sum(grad * (xn - x)), xn

  good, xn = ok(alpha)
  if good:
    for _ in range(20):
      good2, xn2 = ok(alpha * 10)
      if not good2 or np.array_equal(xn2, xn):
        break
      alpha, xn = alpha * 10, xn2
    return xn, alpha
  for _ in range(40):
    alpha /= 10
    good, xn = ok(alpha)
    if good:
      return xn, alpha
  return x, alpha


def factorize(q: np.ndarray, w: np.ndarray, cfg: CrcConfig) -> tuple[np.ndarray, np.ndarray, list[float]]:
  """Alternating projected gradient on Eq. 24: ``(C, F, objective per round)``, C and F >= 0 (T x M)."""
  m = len(q)
  rng = np.random.default_rng(cfg.seed)
  c = rng.uniform(0, 1, (cfg.bits, m)) / m
  f = rng.uniform(0, 1, (cfg.bits, m))
  alpha_c = alpha_f = 1.0
  history = []
  for _ in range(cfg.iterations):
    r = f @ w.T
    grad_c = 2 * (r @ r.T) @ c @ q - 2 * r @ q
    c, alpha_c = _armijo_step(lambda x, f=f: objective(q, x, f, w), c, grad_c, alpha_c, cfg.sigma)
    cq = c @ q
    grad_f = (2 * (cq @ c.T) @ r - 2 * cq) @ w
    f, alpha_f = _armijo_step(lambda x, c=c: objective(q, c, x, w), f, grad_f, alpha_f, cfg.sigma)
    history.append(objective(q, c, f, w))
  return c, f, history


def binarize(f_TxM: np.ndarray) -> np.ndarray:
  """Bit t of customer i: ``F[t, i] > max_t' F[t', i] / 2`` (bool, M x T; all zeros for a zero column)."""
  f = np.asarray(f_TxM)
  top = f.max(axis=0, keepdims=True)
  return ((f > top / 2) & (top > 0)).T


def community_codes(adjacency_MxM: np.ndarray, cfg: CrcConfig = CrcConfig()) -> np.ndarray:
  """Every customer's community relationship code, bool M x T."""
  q = kernel(adjacency_MxM, cfg.walk_steps)
  w = lle_weights(q, cfg.neighbours, cfg.lle_reg)
  _, f, _ = factorize(q, w, cfg)
  return binarize(f)


def hamming(codes_MxT: np.ndarray) -> np.ndarray:
  """Pairwise Hamming distances, M x M ints."""
  x = np.asarray(codes_MxT, np.int64)
  return x @ (1 - x).T + (1 - x) @ x.T


def neighbourhood_accuracy(codes_MxT: np.ndarray, communities_M: np.ndarray, dist: int) -> dict[str, float]:
  """Fig. 5's accuracy at threshold ``dist``: over pairs i < j, "neighbours" iff Hamming <= dist,
  against "same community". Returns ``accuracy``, ``same_recall`` (same-community pairs called
  neighbours) and ``different_specificity`` (other pairs called apart)."""
  h = hamming(codes_MxT)
  comm = np.asarray(communities_M)
  iu = np.triu_indices(len(comm), 1)
  called = h[iu] <= dist
  same = (comm[:, None] == comm[None, :])[iu]
  return {
    "accuracy": float(np.mean(called == same)),
    "same_recall": float(np.mean(called[same])) if same.any() else float("nan"),
    "different_specificity": float(np.mean(~called[~same])) if (~same).any() else float("nan"),
  }


def planted_graph(sizes: list[int], p_in: float, p_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A stochastic block model (networkx): ``(adjacency M x M, community of each node)``."""
  probs = [[p_in if i == j else p_out for j in range(len(sizes))] for i in range(len(sizes))]
  g = nx.stochastic_block_model(sizes, probs, seed=seed)
  comm = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)])
  return nx.to_numpy_array(g, nodelist=range(sum(sizes))), comm


def load_edge_list(path: str | os.PathLike, max_nodes: int | None = None) -> np.ndarray:
  """A SNAP edge list (``u v`` per line, ``#`` comments) as a symmetric adjacency matrix
  (directed edges made undirected); with ``max_nodes``, the subgraph of the first nodes by id.

  Raises:
    OSError: Missing file. ValueError: No edges.
  """
  g = nx.read_edgelist(os.fspath(path), comments="#", nodetype=int, create_using=nx.Graph)
  if g.number_of_edges() == 0:
    raise ValueError(f"{path}: no edges")
  nodes = sorted(g.nodes)[: max_nodes or None]
  return nx.to_numpy_array(g.subgraph(nodes), nodelist=nodes)
